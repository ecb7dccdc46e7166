"""Load the Lumi chat page in Debian's headless Chromium, type one question, send it, wait for
the streamed answers and save a screenshot.

    .venv/bin/python scripts/screenshot_chat.py --model SPARSE_CHECKPOINT --compare smollm2-135m \
        --out results/lumi_chat.png

Starts ``ipu-sparse serve``'s application on 127.0.0.1 (a free port) and drives Chromium over
the DevTools protocol on a pipe (``--remote-debugging-pipe``: no extra package, no open port):
open the page, type the question into the box, press Send, wait (bounded) until every column
has its answer, capture the PNG. Needs ``chromium`` (``apt-get install chromium``).
"""
from __future__ import annotations

import argparse
import base64
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


class DevTools:
    """Chrome DevTools protocol over ``--remote-debugging-pipe`` (fd 3 in, fd 4 out, NUL-separated JSON)."""

    def __init__(self, chromium: str, profile: str, size: str):
        to_chrome_r, self._to_chrome = os.pipe()
        self._from_chrome, from_chrome_w = os.pipe()

        def fds():  # in the child: its fd 3 reads our commands, its fd 4 writes the answers
            os.dup2(to_chrome_r, 3)
            os.dup2(from_chrome_w, 4)

        self.proc = subprocess.Popen(
            [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--remote-debugging-pipe",
             f"--user-data-dir={profile}", f"--window-size={size}", "about:blank"],
            preexec_fn=fds, close_fds=False, stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL)
        os.close(to_chrome_r)
        os.close(from_chrome_w)
        self._buf, self._id = b"", 0

    def call(self, method: str, session: str = None, timeout: float = 60.0, **params):
        self._id += 1
        msg = {"id": self._id, "method": method, "params": params}
        if session:
            msg["sessionId"] = session
        os.write(self._to_chrome, json.dumps(msg).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            while b"\0" in self._buf:
                raw, self._buf = self._buf.split(b"\0", 1)
                reply = json.loads(raw)
                if reply.get("id") == self._id:
                    if "error" in reply:
                        raise RuntimeError(f"{method}: {reply['error']}")
                    return reply.get("result", {})
            if time.monotonic() > deadline:
                raise TimeoutError(f"{method}: no answer from chromium in {timeout} s")
            chunk = os.read(self._from_chrome, 1 << 20)
            if not chunk:
                raise RuntimeError("chromium closed the DevTools pipe")
            self._buf += chunk

    def close(self) -> None:
        try:
            self.call("Browser.close", timeout=10)
        except Exception:
            pass
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        os.close(self._to_chrome)
        os.close(self._from_chrome)


def evaluate(dt: DevTools, session: str, expression: str):
    res = dt.call("Runtime.evaluate", session, expression=expression, returnByValue=True, awaitPromise=True)
    return res.get("result", {}).get("value")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="the (sparse) model, as for ipu-sparse serve --model")
    ap.add_argument("--compare", default=None, help="the dense model shown beside it")
    ap.add_argument("--question", default="What is the capital of France?")
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--out", default="results/lumi_chat.png")
    ap.add_argument("--size", default="1400,820", help="window size W,H")
    ap.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for the answers")
    ap.add_argument("--chromium", default=shutil.which("chromium") or shutil.which("chromium-browser"))
    args = ap.parse_args()
    if not args.chromium:
        print("chromium not found: apt-get install -y chromium", file=sys.stderr)
        return 2

    from ipu_sparse.loading import load_model
    from ipu_sparse.serve.app import create_app
    from ipu_sparse.serve.commands import model_id
    from ipu_sparse.serve.engine import Engine
    from ipu_sparse.serve.server import BackgroundServer

    engines = [Engine(model_id(args.model), load_model(args.model), role="sparse" if args.compare else "model")]
    if args.compare:
        engines.append(Engine(model_id(args.compare), load_model(args.compare), role="dense"))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with BackgroundServer(create_app(engines)) as srv, tempfile.TemporaryDirectory() as profile:
        dt = DevTools(args.chromium, profile, args.size)
        try:
            target = dt.call("Target.createTarget", url=srv.url + "/")["targetId"]
            session = dt.call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
            deadline = time.monotonic() + args.timeout
            while not evaluate(dt, session, "document.querySelectorAll('.column').length > 0"):
                assert time.monotonic() < deadline, "the page did not show the models"
                time.sleep(0.2)
            evaluate(dt, session, f"document.getElementById('max-tokens').value = {int(args.max_tokens)};"
                                  "document.getElementById('prompt').focus()")
            dt.call("Input.insertText", session, text=args.question)  # typed, as a user would
            evaluate(dt, session, "document.getElementById('send').click()")
            done = ("document.querySelectorAll('.msg.assistant .meta, .msg.error').length === "
                    "document.querySelectorAll('.column').length")
            while not evaluate(dt, session, done):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"the answers did not arrive within {args.timeout} s")
                time.sleep(0.5)
            answers = evaluate(dt, session, "Array.from(document.querySelectorAll('.column')).map(c => "
                                            "c.querySelector('.model-name').textContent + ': ' + "
                                            "c.querySelector('.msg.assistant, .msg.error').textContent)")
            png = base64.b64decode(dt.call("Page.captureScreenshot", session, format="png")["data"])
        finally:
            dt.close()
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_bytes(png)
    tmp.replace(out)
    for a in answers:
        print(a, file=sys.stderr)
    print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
