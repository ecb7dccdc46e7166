"""The OpenAI-compatible API, driven by the official ``openai`` client against a tiny model served
on 127.0.0.1: chat and completions (streaming and not), usage, stop strings, seeds, every error
case, the bounded FIFO queue (503 when full, one generation at a time per model) and a client
that disconnects mid-stream."""
import http.client as httpclient
import json
import threading
import time

import openai
import pytest

from ipu_sparse.generate import SamplingConfig, generate
from ipu_sparse.loading import load_model

from .conftest import http

MSGS = [{"role": "user", "content": "Hello, Lumi"}]


def client(srv):
    return openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0, timeout=60)


def reference(prompt_ids, max_tokens, temperature=0.0, seed=None):
    """What our generate() makes for the same prompt (no server), as text."""
    lm = load_model("tiny-llama")
    out = generate(lm.model, prompt_ids, max_tokens, SamplingConfig(temperature=temperature, seed=seed),
                   lm.tokenizer.stop_ids)
    return lm.tokenizer.decode([t for t in out if t not in lm.tokenizer.stop_ids]), out


def chat_ids(messages):
    tok = load_model("tiny-llama").tokenizer
    return tok.encode(tok.apply_chat_template(messages, add_generation_prompt=True))


def wait_for(cond, timeout=20.0):
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.01)


def test_models_and_health(make_server, tiny_engine):
    srv = make_server([tiny_engine()])
    models = client(srv).models.list().data
    assert [m.id for m in models] == ["tiny-llama"]
    info = models[0].model_extra["ipu_sparse"]
    assert info["context_length"] == 128 and info["backend"] == "cpu" and info["sparse"] is False
    status, body = http("GET", srv.url + "/health")
    assert status == 200 and body["status"] == "ok" and body["models"][0]["generating"] == 0
    assert client(srv).models.retrieve("tiny-llama").id == "tiny-llama"


def test_chat_non_streaming_equals_generate(make_server, tiny_engine):
    srv = make_server([tiny_engine()])
    r = client(srv).chat.completions.create(model="tiny-llama", messages=MSGS, max_tokens=12, temperature=0)
    ids = chat_ids(MSGS)
    text, out = reference(ids, 12)
    assert r.object == "chat.completion" and r.model == "tiny-llama"
    assert r.choices[0].message.role == "assistant" and r.choices[0].message.content == text
    assert r.choices[0].finish_reason == ("stop" if out[-1] == 2 else "length")
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(ids), len(out))
    assert r.usage.total_tokens == len(ids) + len(out)


def test_chat_streaming_equals_non_streaming(make_server, tiny_engine):
    srv = make_server([tiny_engine()])
    c = client(srv)
    full = c.chat.completions.create(model="tiny-llama", messages=MSGS, max_tokens=20, temperature=0)
    chunks = list(c.chat.completions.create(model="tiny-llama", messages=MSGS, max_tokens=20, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == full.choices[0].message.content
    finishes = [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason]
    assert finishes == [full.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == full.usage.completion_tokens
    assert all(ch.id == chunks[0].id for ch in chunks)


def test_completions_streaming_sampling_and_seed(make_server, tiny_engine):
    srv = make_server([tiny_engine()])
    c = client(srv)
    prompt = "The capital of France is"
    ids = load_model("tiny-llama").tokenizer.encode(prompt)
    kw = dict(model="tiny-llama", prompt=prompt, max_tokens=16, temperature=0.9, top_p=0.95, seed=7)
    a = c.completions.create(**kw)
    b = c.completions.create(**kw)
    assert a.object == "text_completion" and a.choices[0].text == b.choices[0].text  # the seed reproduces
    text, out = reference(ids, 16, temperature=0.9, seed=7)
    assert a.usage.prompt_tokens == len(ids) and a.usage.completion_tokens == len(out)
    streamed = "".join(ch.choices[0].text for ch in c.completions.create(stream=True, **kw) if ch.choices)
    assert streamed == a.choices[0].text
    greedy = c.completions.create(model="tiny-llama", prompt=prompt, max_tokens=16, temperature=0)
    assert greedy.choices[0].text == reference(ids, 16)[0]


def test_stop_string_ends_the_answer_and_is_not_sent(make_server, tiny_engine):
    srv = make_server([tiny_engine()])
    c = client(srv)
    prompt = "abc"
    full = c.completions.create(model="tiny-llama", prompt=prompt, max_tokens=30, temperature=0).choices[0].text
    assert len(full) > 6
    stop = full[4:6]
    cut = full[:full.index(stop)]
    r = c.completions.create(model="tiny-llama", prompt=prompt, max_tokens=30, temperature=0, stop=[stop, "zzzz"])
    assert r.choices[0].text == cut and r.choices[0].finish_reason == "stop"
    streamed = "".join(ch.choices[0].text for ch in c.completions.create(
        model="tiny-llama", prompt=prompt, max_tokens=30, temperature=0, stop=stop, stream=True) if ch.choices)
    assert streamed == cut


@pytest.mark.parametrize("body,status,param,code", [
    ({"model": "gpt-4", "messages": MSGS}, 404, "model", "model_not_found"),
    ({"messages": MSGS}, 400, "model", "missing_required_parameter"),
    ({"model": "tiny-llama"}, 400, "messages", "missing_required_parameter"),
    ({"model": "tiny-llama", "messages": [{"role": "wizard", "content": "x"}]}, 400, "messages[0].role", None),
    ({"model": "tiny-llama", "messages": MSGS, "temperature": 2.5}, 400, "temperature", "invalid_value"),
    ({"model": "tiny-llama", "messages": MSGS, "temperature": "hot"}, 400, "temperature", "invalid_value"),
    ({"model": "tiny-llama", "messages": MSGS, "top_p": 0}, 400, "top_p", "invalid_value"),
    ({"model": "tiny-llama", "messages": MSGS, "max_tokens": 0}, 400, "max_tokens", "invalid_value"),
    ({"model": "tiny-llama", "messages": MSGS, "max_tokens": 1.5}, 400, "max_tokens", "invalid_value"),
    ({"model": "tiny-llama", "messages": MSGS, "seed": -1}, 400, "seed", "invalid_value"),
    ({"model": "tiny-llama", "messages": MSGS, "stop": ["a", "b", "c", "d", "e"]}, 400, "stop", "invalid_value"),
    ({"model": "tiny-llama", "messages": MSGS, "n": 2}, 400, "n", "invalid_value"),
    ({"model": "tiny-llama", "messages": MSGS, "stream": "yes"}, 400, "stream", "invalid_value"),
    ({"model": "tiny-llama", "messages": MSGS, "logprobs": True}, 400, "logprobs", "unsupported_parameter"),
    ({"model": "tiny-llama", "messages": [{"role": "user", "content": "x" * 200}]}, 400, "messages",
     "context_length_exceeded"),
    ({"model": "tiny-llama", "messages": MSGS, "max_tokens": 100}, 400, "max_tokens", "context_length_exceeded"),
])
def test_errors_in_openai_shape(make_server, tiny_engine, body, status, param, code):
    srv = make_server([tiny_engine()])
    got, err = http("POST", srv.url + "/v1/chat/completions", body)
    assert got == status
    assert set(err) == {"error"} and set(err["error"]) == {"message", "type", "param", "code"}
    assert err["error"]["param"] == param and err["error"]["message"]
    if code:
        assert err["error"]["code"] == code
    assert err["error"]["type"] == "invalid_request_error"


def test_errors_through_the_openai_client(make_server, tiny_engine):
    srv = make_server([tiny_engine()])
    c = client(srv)
    with pytest.raises(openai.NotFoundError) as e:
        c.chat.completions.create(model="nope", messages=MSGS)
    assert e.value.status_code == 404 and e.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError) as e:
        c.completions.create(model="tiny-llama", prompt="x" * 127, max_tokens=5)
    assert e.value.body["code"] == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError) as e:
        c.chat.completions.create(model="tiny-llama", messages=MSGS, temperature=-1)
    assert e.value.body["param"] == "temperature"


def test_bad_json_and_unknown_routes(make_server, tiny_engine):
    srv = make_server([tiny_engine()])
    for raw in (b"{not json", b"[1, 2]", b"\xff\xfe"):
        status, err = http("POST", srv.url + "/v1/chat/completions", raw=raw)
        assert status == 400 and err["error"]["code"] == "invalid_json" and err["error"]["type"] == "invalid_request_error"
    status, err = http("POST", srv.url + "/v1/completions", raw=b"")
    assert status == 400 and err["error"]["code"] == "invalid_json"
    status, err = http("GET", srv.url + "/v1/engines")
    assert status == 404 and err["error"]["code"] == "not_found"
    status, err = http("GET", srv.url + "/v1/chat/completions")
    assert status == 405 and err["error"]["code"] == "method_not_allowed"
    status, err = http("GET", srv.url + "/v1/models/nope")
    assert status == 404 and err["error"]["code"] == "model_not_found"


def test_concurrent_requests_queue_fifo_and_503_when_full(make_server, tiny_engine):
    """One generates, one waits (max_queue=1), the third gets 503; the two answers equal the ones
    made alone (no interleaving in the KV cache) and the generations never overlapped."""
    eng = tiny_engine(max_queue=1, delay=0.02)
    srv = make_server([eng])
    c = client(srv)
    prompts = ["first question", "second question"]
    results, order = {}, []

    def ask(i):
        r = c.completions.create(model="tiny-llama", prompt=prompts[i], max_tokens=30, temperature=0)
        results[i] = r.choices[0].text
        order.append(i)

    t0 = threading.Thread(target=ask, args=(0,))
    t0.start()
    wait_for(lambda: http("GET", srv.url + "/health")[1]["models"][0]["generating"] == 1)
    t1 = threading.Thread(target=ask, args=(1,))
    t1.start()
    wait_for(lambda: http("GET", srv.url + "/health")[1]["models"][0]["queued"] == 1)
    with pytest.raises(openai.InternalServerError) as e:
        c.completions.create(model="tiny-llama", prompt="third", max_tokens=5)
    assert e.value.status_code == 503 and e.value.body["code"] == "server_busy"
    t0.join(60)
    t1.join(60)
    assert order == [0, 1]
    tok = load_model("tiny-llama").tokenizer
    for i, p in enumerate(prompts):
        assert results[i] == reference(tok.encode(p), 30)[0]
    assert eng.backend.max_running == 1
    status, body = http("GET", srv.url + "/health")
    assert body["models"][0] == {"id": "tiny-llama", "role": "model", "generating": 0, "queued": 0, "max_queue": 1,
                                 "served": 2}


def test_client_disconnect_mid_stream_frees_the_slot(make_server, tiny_engine):
    eng = tiny_engine(max_queue=0, delay=0.05)
    srv = make_server([eng])
    host, port = srv.url.split("//")[1].split(":")
    conn = httpclient.HTTPConnection(host, int(port), timeout=30)
    body = json.dumps({"model": "tiny-llama", "prompt": "tell me a long story", "max_tokens": 100,
                       "temperature": 0, "stream": True})
    conn.request("POST", "/v1/completions", body=body, headers={"Content-Type": "application/json"})
    res = conn.getresponse()
    assert res.status == 200 and res.getheader("content-type").startswith("text/event-stream")
    first = res.read(6)
    assert first == b"data: "
    conn.sock.shutdown(2)
    conn.close()
    wait_for(lambda: http("GET", srv.url + "/health")[1]["models"][0]["generating"] == 0, timeout=10)
    assert eng.backend.tokens[0] < 100  # stopped early, not run to max_tokens
    r = client(srv).completions.create(model="tiny-llama", prompt="next", max_tokens=3, temperature=0)
    assert r.usage.completion_tokens >= 1  # the slot is free again (max_queue=0 would answer 503 otherwise)


def test_compare_models_show_accounted_bytes_and_flops(make_server, tiny_engine):
    from ipu_sparse.prune import magnitude_prune_
    from ipu_sparse.sparse.accounting import account, rows_from_model
    from ipu_sparse.sparse.linear import SparseConfig, sparsify_

    sparse_lm = load_model("tiny-llama")
    magnitude_prune_(sparse_lm.model, 0.8)
    sparsify_(sparse_lm.model, SparseConfig(format="bitmap", dtype="bf16"))
    srv = make_server([tiny_engine("tiny-sparse", lm=sparse_lm, role="sparse"), tiny_engine("tiny-dense", role="dense")])
    models = {m.id: m.model_extra["ipu_sparse"] for m in client(srv).models.list().data}
    sp, de = models["tiny-sparse"], models["tiny-dense"]
    acc = account(sparse_lm.model.config, rows_from_model(sparse_lm.model), context=512)["whole_model"]
    assert sp["weight_bytes"] == acc["bytes"] and sp["flops_per_token"] == acc["flops_per_token"]
    assert de["weight_bytes"] == acc["dense_fp16_bytes"] and de["flops_per_token"] == acc["dense_flops_per_token"]
    assert sp["role"] == "sparse" and de["role"] == "dense" and abs(sp["sparsity"] - 0.8) < 0.01
    assert sp["weight_bytes"] < de["weight_bytes"] and sp["flops_per_token"] < de["flops_per_token"]
    c = client(srv)
    for name in models:  # both answer
        r = c.chat.completions.create(model=name, messages=MSGS, max_tokens=4, temperature=0)
        assert r.model == name and r.usage.completion_tokens >= 1


def test_an_internal_failure_is_a_500_in_the_openai_shape(make_server, tiny_engine):
    eng = tiny_engine()

    def broken(messages):
        raise RuntimeError("template exploded")

    eng.encode_chat = broken
    srv = make_server([eng])
    status, err = http("POST", srv.url + "/v1/chat/completions", {"model": "tiny-llama", "messages": MSGS})
    assert status == 500 and err["error"]["type"] == "server_error" and "template exploded" in err["error"]["message"]
    assert client(srv).completions.create(model="tiny-llama", prompt="still up", max_tokens=2).usage.completion_tokens
