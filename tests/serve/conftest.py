"""A tiny model served on 127.0.0.1 (a free port) for the duration of one test."""
import json
import threading
import time
import urllib.error
import urllib.request

import pytest


class SlowBackend:
    """The CPU backend with a pause after every token (so a test can act while a request generates);
    records how many generations overlap (must never exceed one per engine)."""

    name = "cpu"

    def __init__(self, inner, delay: float):
        self.inner, self.delay = inner, delay
        self.running = self.max_running = 0
        self.tokens = []  # tokens made per generation, in order
        self.lock = threading.Lock()

    def run(self, prompt_ids, max_new_tokens, sampling, stop_ids, on_token):
        with self.lock:
            self.running += 1
            self.max_running = max(self.max_running, self.running)
            self.tokens.append(0)
        slot = len(self.tokens) - 1

        def slow(tok):
            self.tokens[slot] += 1
            time.sleep(self.delay)
            on_token(tok)

        try:
            self.inner.run(prompt_ids, max_new_tokens, sampling, stop_ids, slow)
        finally:
            with self.lock:
                self.running -= 1


def http(method, url, body=None, raw=None, timeout=30):
    """(status, parsed JSON or text) of one request; errors are returned, not raised."""
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    req = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as res:
            status, text, ctype = res.status, res.read().decode(), res.headers.get("content-type", "")
    except urllib.error.HTTPError as err:
        status, text, ctype = err.code, err.read().decode(), err.headers.get("content-type", "")
    return status, (json.loads(text) if ctype.startswith("application/json") else text)


@pytest.fixture
def make_server():
    """make_server(engines) -> a started BackgroundServer; every server is stopped at the end of the test."""
    from ipu_sparse.serve.app import create_app
    from ipu_sparse.serve.server import BackgroundServer

    started = []

    def make(engines):
        srv = BackgroundServer(create_app(engines), host="127.0.0.1", port=0).start()
        started.append((srv, engines))
        return srv

    yield make
    for srv, engines in started:
        srv.stop()
        for e in engines:
            e.shutdown()


@pytest.fixture
def tiny_engine():
    from ipu_sparse.loading import load_model
    from ipu_sparse.serve.engine import Engine

    def make(name="tiny-llama", max_queue=8, delay=None, role="model", lm=None):
        lm = lm or load_model("tiny-llama")
        eng = Engine(name, lm, role=role, max_queue=max_queue)
        if delay is not None:
            eng.backend = SlowBackend(eng.backend, delay)
        return eng

    return make
