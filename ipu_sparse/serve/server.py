"""Run the application with uvicorn: in the foreground (``ipu-sparse serve``) or on a thread
(tests, the screenshot script), bound to a socket we create so port 0 picks a free port."""
from __future__ import annotations

import socket
import threading
import time
from typing import Optional

from ..errors import UserError


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host:port`` (``port`` 0: a free one), or a one-line error."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise UserError(f"cannot listen on {host}:{port} ({exc.strerror or exc})") from None
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


def _config(app, log_level: str):
    import uvicorn

    return uvicorn.Config(app, log_level=log_level, access_log=log_level == "info", timeout_graceful_shutdown=5,
                          lifespan="off")


def url_of(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def serve_forever(app, host: str = "127.0.0.1", port: int = 8080, log_level: str = "info") -> None:
    import sys

    import uvicorn

    sock = bind(host, port)
    print(f"serving on {url_of(sock)}  (chat page: {url_of(sock)}/ , API: {url_of(sock)}/v1)", file=sys.stderr)
    uvicorn.Server(_config(app, log_level)).run(sockets=[sock])


class BackgroundServer:
    """The app served on a thread; ``url`` once started; ``stop()`` ends it (also as a context manager)."""

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning"):
        import uvicorn

        self.sock = bind(host, port)
        self.url = url_of(self.sock)
        self.server = uvicorn.Server(_config(app, log_level))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]},
                                       name="ipu-sparse-serve", daemon=True)

    def start(self, timeout: float = 30.0) -> "BackgroundServer":
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the server on {self.url} did not start within {timeout} s")
            time.sleep(0.02)
        return self

    def stop(self, timeout: float = 30.0) -> None:
        self.server.should_exit = True
        if self.thread.is_alive():
            self.thread.join(timeout)
        self.sock.close()

    def __enter__(self) -> "BackgroundServer":
        return self.start()

    def __exit__(self, *exc) -> Optional[bool]:
        self.stop()
        return None
