"""Generation entry point: with the PopTorch TEST DOUBLE here; on real IPUs where poptorch imports."""
import importlib.util
import os
import sys
from pathlib import Path

import pytest
import torch

from ipu_sparse.config import get_preset
from ipu_sparse.ipu.generate import DecodeStep, compile_for_ipu, generate_ids, release
from ipu_sparse.ipu.ops import to_ipu_sparse_
from ipu_sparse.ipu.planner import PlanConfig, make_plan
from ipu_sparse.model import build_model
from ipu_sparse.prune import magnitude_prune_

from ipu_poptorch_double import PoptorchDouble

HAVE_POPTORCH = importlib.util.find_spec("poptorch") is not None
ROOT = Path(__file__).resolve().parents[2]


def test_decode_step_matches_full_forward():
    cfg = get_preset("tiny-llama-4l")
    model = build_model(cfg, seed=0)
    ids = torch.randint(0, 256, (1, 10))
    full = model(ids)[0]
    model.setup_cache(1, 32, static=True)
    step = DecodeStep(model)
    for p in range(10):
        out = step(ids[:, p:p + 1], torch.tensor([[p]]))  # one row per sample
        torch.testing.assert_close(out[0], full[p], rtol=1e-4, atol=1e-5)


def test_compile_only_with_double(monkeypatch, tmp_path):
    double = PoptorchDouble()
    monkeypatch.setitem(sys.modules, "poptorch", double)
    cfg = get_preset("tiny-llama-4l")
    model = build_model(cfg, seed=0)
    magnitude_prune_(model, 0.8, scope="row")
    plan = make_plan(PlanConfig(cfg, n_ipus=4, sparsity=0.8, kv_len=64, seq_len=1))
    # fp32 here: the double runs the graph on CPU, and torch 2.0.1 has no fp16 CPU attention
    executor, step, rows = compile_for_ipu(model, plan, tmp_path, compile_only=True, dtype=torch.float32,
                                           load_op=False, poptorch=double)
    assert executor.exported_to == str(tmp_path / "decode.popef")
    assert double.option("Options.useOfflineIpuTarget") == {"ipu_version": 2}
    assert double.option("Options.broadcastBuffers") == {"broadcast_buffers": False}
    assert len(list((tmp_path / "patterns").glob("*.spat"))) == 4 * 7
    assert model.cache_len == 64 and model.static_cache
    assert executor.trace.custom_ops and not executor.trace.unlowerable
    assert {c["domain"] for c in executor.trace.custom_ops} == {"ipu_sparse"}
    ids = generate_ids(executor, [1, 5, 7], max_new_tokens=4, kv_len=64, rows=rows)
    assert len(ids) == 7 and ids[:3] == [1, 5, 7]
    release(executor, model, poptorch=double)
    assert executor.detached and model.cache_len == 0
    assert not any(m._forward_pre_hooks for m in model.modules())


@pytest.mark.parametrize("mode", ["sharded", "pipelined"])
def test_generation_through_double_equals_cpu(monkeypatch, tmp_path, mode):
    """Greedy tokens through the compiled step (pipelined: deviceIterations = stages, so every
    input has that many rows) equal CPU generation with the same pruned weights."""
    from ipu_sparse.generate import generate

    double = PoptorchDouble()
    monkeypatch.setitem(sys.modules, "poptorch", double)
    cfg = get_preset("tiny-llama-4l")
    model = build_model(cfg, seed=0)
    magnitude_prune_(model, 0.8, scope="row")
    want = [1, 5, 7] + generate(model, [1, 5, 7], 6)
    plan = make_plan(PlanConfig(cfg, n_ipus=2, sparsity=0.8, kv_len=32, seq_len=1))
    executor, _, rows = compile_for_ipu(model, plan, tmp_path, mode=mode, dtype=torch.float32, load_op=False,
                                        poptorch=double)
    assert rows == (len(plan.stages) if mode == "pipelined" else 1)
    try:
        assert generate_ids(executor, [1, 5, 7], 6, kv_len=32, rows=rows) == want
    finally:
        release(executor, model, poptorch=double)


@pytest.mark.ipu
@pytest.mark.skipif(not HAVE_POPTORCH, reason="poptorch is not importable (needs the Graphcore Poplar SDK and an IPU)")
def test_cpu_vs_ipu_tiny(tmp_path):  # pragma: no cover - runs on IPU hosts only
    """CPU reference vs IPU on a tiny config (as graphcore/examples do), with the custom op loaded."""
    lib = ROOT / "popart_ops" / "build" / "libsparse_matmul.so"
    if not lib.exists():
        pytest.skip(f"custom op not built: {lib} (see popart_ops/README.md)")
    import poptorch

    cfg = get_preset("tiny-llama-4l")
    model = build_model(cfg, seed=0)
    magnitude_prune_(model, 0.8, scope="row")
    ids = torch.randint(0, 256, (1, 6))
    reference = model(ids)[0, -1]
    to_ipu_sparse_(model)
    plan = make_plan(PlanConfig(cfg, n_ipus=min(4, int(os.environ.get("IPUS", "4"))), sparsity=0.8, kv_len=64, seq_len=1))
    executor, _, rows = compile_for_ipu(model, plan, tmp_path, poptorch=poptorch)
    try:
        for p in range(ids.shape[1]):
            out = executor(ids[:, p:p + 1].repeat(rows, 1), torch.full((rows, 1), p))
        torch.testing.assert_close(out[0].float(), reference, rtol=2e-2, atol=2e-2)
    finally:
        release(executor, model, poptorch=poptorch)
