"""The C++ decode engine (ipu_sparse.sparse.engine): logits of one step against the torch step,
greedy generation against the torch path, fallbacks, threads, code paths, and SmolLM2 (slow)."""
import copy
import logging

import pytest
import torch

from ipu_sparse.config import get_preset
from ipu_sparse.generate import generate
from ipu_sparse.model import build_model
from ipu_sparse.sparse import kernels
from ipu_sparse.sparse.engine import DecodeEngine, engine_enabled, unsupported_reason
from ipu_sparse.sparse.linear import SparseConfig, sparsify_

EXT = kernels.load_extension()
pytestmark = pytest.mark.skipif(EXT is None or not hasattr(EXT, "DecodeEngine"),
                                reason="compiled extension with the decode engine not built")
ISAS = ["auto", "scalar"]


def prune_(model, sparsity=0.8):
    """Magnitude-prune every decoder projection in place (exact zeros)."""
    with torch.no_grad():
        for _, lin in model.linear_layers():
            w = lin.weight
            k = int(w.numel() * sparsity)
            thr = w.abs().flatten().kthvalue(k).values
            w[w.abs() <= thr] = 0
    return model


def make(preset="tiny-llama", sparse=None, dtype="fp32", head_dtype=None, seed=0, model_dtype=torch.float32,
         bias=False):
    cfg = get_preset(preset)
    if bias:
        cfg = cfg.replace(attn_bias=True, mlp_bias=True)
    model = prune_(build_model(cfg, seed=seed))
    if bias:
        with torch.no_grad():
            for _, lin in model.linear_layers():
                lin.bias.normal_(0, 0.02)
    if sparse is not None:
        sparsify_(model, SparseConfig(format=sparse, dtype=dtype, head_dtype=head_dtype))
    elif head_dtype is not None:
        sparsify_(model, SparseConfig(format="bitmap", dtype="fp32", head_dtype=head_dtype),
                  filter_fn=lambda mod, fqn: False)
    return model.to(model_dtype).eval()


@torch.inference_mode()
def step_pairs(model, prompt, steps, isa="auto", bf16_dot=False, int8_dot=False):
    """(torch logits, engine logits) of each decode step after a torch prefill, both from the same cache."""
    eng = DecodeEngine.from_model(model, isa=isa, bf16_dot=bf16_dot, min_thread_bytes=0,  # every thread
                                  int8_dot=int8_dot)
    assert eng is not None, unsupported_reason(model)
    P = len(prompt)
    model.setup_cache(1, P + steps + 1)
    try:
        logits = model(torch.tensor([prompt]), input_pos=torch.arange(P), last_only=True)[0, -1]
        eng.attach_cache()
        out = []
        for t in range(steps):
            tok = int(logits.argmax())
            ref = model(torch.tensor([[tok]]), input_pos=torch.tensor([P + t]), last_only=True)[0, -1].float()
            got = eng.step(tok, P + t)  # rewrites the cache slot the torch step just wrote
            out.append((ref, got))
            logits = ref
    finally:
        model.clear_cache()
    return out


def assert_close_steps(pairs, rtol):
    for ref, got in pairs:
        assert got.shape == ref.shape and got.dtype == torch.float32
        scale = float(ref.abs().max())
        err = float((got - ref).abs().max())
        assert err <= rtol * scale, f"max error {err} vs logits scale {scale}"


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("preset,bias", [("tiny-llama", False), ("tiny-luminous", False), ("tiny-llama", True)])
@pytest.mark.parametrize("sparse", [None, "bitmap"])
def test_fp32_step_matches_torch(preset, bias, sparse, isa, threads):
    model = make(preset, sparse=sparse, bias=bias)
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        pairs = step_pairs(model, [3, 17, 99, 5, 42], 6, isa)
    finally:
        torch.set_num_threads(old)
    assert_close_steps(pairs, 1e-5)


@pytest.fixture
def one_thread():
    """Tiny models decode on one thread (the engine picks one for them anyway; torch is faster so too)."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.mark.parametrize("prompt_len", [1, 2, 9, 33])
@pytest.mark.parametrize("sparse", [None, "bitmap"])
def test_fp32_greedy_tokens_identical(sparse, prompt_len, one_thread):
    model = make("tiny-llama-4l", sparse=sparse, seed=prompt_len)
    prompt = [(7 * i + 3) % 256 for i in range(prompt_len)]
    fast = generate(model, prompt, 40, engine=True)
    slow = generate(model, prompt, 40, engine=False)
    assert fast == slow and len(fast) == 40


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("case", ["dense-bf16-model", "bitmap-bf16-fp16-head", "bitmap-bf16-dot", "bitmap-fp16-bf16-head",
                                  "dense-fp16-head"])
def test_16bit_steps_close_to_torch(case, isa):
    bf16_dot = False
    if case == "dense-bf16-model":
        model = make(model_dtype=torch.bfloat16)
        rtol = 3e-2  # torch rounds every activation to bf16; the engine keeps them in fp32
    elif case == "bitmap-bf16-fp16-head":
        model, rtol = make(sparse="bitmap", dtype="bf16", head_dtype="fp16"), 2e-3
    elif case == "bitmap-bf16-dot":  # activations rounded to bf16 for the bitmap layers too
        model, rtol, bf16_dot = make(sparse="bitmap", dtype="bf16", head_dtype="fp16"), 2e-2, True
    elif case == "bitmap-fp16-bf16-head":
        model, rtol = make(sparse="bitmap", dtype="fp16", head_dtype="bf16"), 1e-2
    else:
        model, rtol = make(head_dtype="fp16"), 2e-3
    assert_close_steps(step_pairs(model, [1, 2, 3, 4], 5, isa, bf16_dot), rtol)


def test_bf16_greedy_agreement_reported(capsys, one_thread):
    model = make("tiny-llama-4l", sparse="bitmap", dtype="bf16", head_dtype="fp16", seed=3)
    prompt = [11, 22, 33, 44, 55]
    fast = generate(model, prompt, 40, engine=True)
    slow = generate(model, prompt, 40, engine=False)
    agree = next((i for i, (a, b) in enumerate(zip(fast, slow)) if a != b), len(fast))
    with capsys.disabled():
        print(f"\nbf16 values + fp16 head: engine and torch agree on the first {agree}/40 greedy tokens")
    assert agree >= 10


@pytest.mark.parametrize("isa", ISAS)
def test_int8_values_and_int8_head(isa):
    for head_group in (0, 16):
        model = build_model(get_preset("tiny-llama"), seed=1)
        prune_(model)
        sparsify_(model, SparseConfig(format="bitmap", dtype="int8", head_dtype="int8", head_group_size=head_group))
        assert type(model.lm_head).__name__ == "QuantizedLinear"
        # int8 widened to fp32 against fp32 activations: the torch path's numbers up to summation order
        assert_close_steps(step_pairs(model.eval(), [9, 8, 7], 5, isa), 2e-3)
        # VNNI with activations quantized to 8 bits per op (the default): ~1% of the logits' scale
        assert_close_steps(step_pairs(model.eval(), [9, 8, 7], 5, isa, int8_dot=True), 5e-2)


def test_csr16_falls_back_and_names_the_module(caplog, one_thread):
    model = make(sparse="csr16")
    with caplog.at_level(logging.DEBUG, logger="ipu_sparse.sparse.engine"):
        assert DecodeEngine.from_model(model) is None
    assert "layers.0.attn.q_proj" in caplog.text and "csr16" in caplog.text
    assert "csr16" in unsupported_reason(model)
    prompt = [4, 8, 15, 16]
    assert generate(model, prompt, 12) == generate(model, prompt, 12, engine=False)


def test_unsupported_module_falls_back():
    model = make()
    model.layers[1].mlp.down_proj = torch.nn.Sequential(model.layers[1].mlp.down_proj)
    assert "layers.1.mlp.down_proj" in unsupported_reason(model)
    assert DecodeEngine.from_model(model) is None


def test_switches(monkeypatch):
    monkeypatch.setenv("IPU_SPARSE_ENGINE", "0")
    assert not engine_enabled() and engine_enabled(True)
    monkeypatch.setenv("IPU_SPARSE_ENGINE", "1")
    assert engine_enabled() and not engine_enabled(False)
    model = make()
    kernels.set_backend("reference")
    try:
        assert DecodeEngine.from_model(model) is None
    finally:
        kernels.set_backend("auto")


def test_weights_are_read_in_place():
    """The engine reads the model's tensors, not copies: an in-place weight change shows in its logits."""
    model = make(sparse="bitmap")
    before = step_pairs(model, [1, 2, 3], 1)[0][1]
    with torch.no_grad():
        model.lm_head.weight.mul_(2)  # tied to the embedding: changes the lookup too
    after = step_pairs(model, [1, 2, 3], 1)
    assert not torch.allclose(before, after[0][1])
    assert_close_steps(after, 1e-5)


def test_bad_step_arguments():
    model = make()
    eng = DecodeEngine.from_model(model)
    with pytest.raises(RuntimeError):
        eng.step(1, 0)  # no cache attached
    model.setup_cache(1, 8)
    try:
        eng.attach_cache()
        with pytest.raises(RuntimeError):
            eng.step(1, 8)
        with pytest.raises(RuntimeError):
            eng.step(256, 0)
        eng.set_profile(True)
        eng.step(1, 0)
        prof = dict(eng.profile())
        assert set(prof) >= {"attention", "norm+head"} and all(v >= 0 for v in prof.values())
    finally:
        model.clear_cache()


@pytest.mark.slow
def test_smollm2_80pct_fp32_greedy_identical(smollm2):
    model = prune_(copy.deepcopy(smollm2.model), 0.8)
    sparsify_(model, SparseConfig(format="bitmap", dtype="fp32"))
    assert DecodeEngine.from_model(model) is not None
    prompt = smollm2.tokenizer.encode("The capital of France is")
    fast = generate(model, prompt, 64, engine=True)
    slow = generate(model, prompt, 64, engine=False)
    assert fast == slow
