"""The Lumi chat page: served by us (no external assets), and every URL its script fetches is an
endpoint the server answers; the serve command's own errors."""
import re

import pytest

from ipu_sparse.cli import main

from .conftest import http


def test_page_and_assets_load_and_are_self_contained(make_server, tiny_engine):
    srv = make_server([tiny_engine()])
    status, html = http("GET", srv.url + "/")
    assert status == 200 and "<title>Lumi" in html
    assets = re.findall(r'(?:src|href)="([^"]+)"', html)
    assert sorted(assets) == ["/static/lumi.css", "/static/lumi.js"]
    bodies = {}
    for url in assets:
        status, bodies[url] = http("GET", srv.url + url)
        assert status == 200 and bodies[url]
    for text in [html] + list(bodies.values()):
        assert not re.search(r"https?://", text), "the page must not load anything from elsewhere"
    assert http("GET", srv.url + "/static/missing.js")[0] == 404


def test_every_fetch_in_the_script_hits_a_served_endpoint(make_server, tiny_engine):
    from ipu_sparse.serve.app import create_app, endpoints

    srv = make_server([tiny_engine()])
    js = http("GET", srv.url + "/static/lumi.js")[1]
    calls = re.findall(r'fetch\("([^"]+)"(\s*,\s*\{\s*method:\s*"(\w+)")?', js)
    urls = {(url, method or "GET") for url, _, method in calls}
    assert urls == {("/v1/models", "GET"), ("/health", "GET"), ("/v1/chat/completions", "POST")}
    served = {(e["path"], m) for e in endpoints(create_app([tiny_engine()])) for m in e["methods"]}
    assert urls <= served
    # and they answer what the script reads
    status, models = http("GET", srv.url + "/v1/models")
    assert status == 200 and models["data"][0]["ipu_sparse"]["weight_bytes"] > 0
    assert http("GET", srv.url + "/health")[1]["models"][0]["id"] == "tiny-llama"
    status, text = http("POST", srv.url + "/v1/chat/completions",
                        {"model": "tiny-llama", "messages": [{"role": "user", "content": "hi"}], "stream": True,
                         "max_tokens": 3, "temperature": 0, "stream_options": {"include_usage": True}})
    events = [line[6:] for line in text.split("\n\n") if line.startswith("data: ")]
    assert status == 200 and events[-1] == "[DONE]" and '"usage"' in events[-2] and '"timings"' in events[-2]


def test_serve_command_errors(capsys):
    assert main(["serve", "--model", "tiny-llama", "--port", "70000"]) == 2
    assert "--port" in capsys.readouterr().err
    assert main(["serve", "--model", "tiny-llama", "--max-queue", "-1"]) == 2
    assert "--max-queue" in capsys.readouterr().err
    try:
        import poptorch  # noqa: F401
    except ImportError:
        assert main(["serve", "--model", "tiny-llama", "--ipu"]) == 2
        err = capsys.readouterr().err
        assert "poptorch" in err and "Traceback" not in err
    else:  # pragma: no cover - IPU hosts
        pytest.skip("poptorch is installed: the --ipu error case does not apply")


def test_serve_command_refuses_a_busy_port(capsys):
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(1)
    try:
        assert main(["serve", "--model", "tiny-llama", "--port", str(s.getsockname()[1])]) == 2
        assert "cannot listen on 127.0.0.1" in capsys.readouterr().err
    finally:
        s.close()
