"""The op-coverage gate (`ipu-sparse ipu-check`), the planner-vs-built map, and the PopTorch TEST DOUBLE's
loud failures. The trace is what PopTorch 3.4 sees (../shared/poptorch_ops.json); CI runs it on torch 2.0.1 too."""
import json
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from ipu_sparse.cli import main
from ipu_sparse.config import get_preset
from ipu_sparse.ipu.check import check_ipu_graph
from ipu_sparse.ipu.generate import build_ipu_graph, compile_for_ipu, generate_ids, release, step_inputs
from ipu_sparse.ipu.opcheck import OP_TABLE_PATH, OpTable, trace_ops
from ipu_sparse.ipu.ops import IpuSparseLinear
from ipu_sparse.ipu.pipeline import built_vs_plan, deparallelize_, planned_blocks
from ipu_sparse.ipu.planner import PlanConfig, make_plan
from ipu_sparse.model import Attention, KVCache, build_model
from ipu_sparse.prune import magnitude_prune_

from ipu_poptorch_double import PoptorchDouble

SHARED_TABLE = Path(__file__).resolve().parents[3] / "shared" / "poptorch_ops.json"


def test_packaged_op_table_equals_the_extracted_one():
    if not SHARED_TABLE.exists():
        pytest.skip(f"{SHARED_TABLE} not present next to the repository")
    assert json.loads(OP_TABLE_PATH.read_text()) == json.loads(SHARED_TABLE.read_text())


def test_table_applies_poptorch_naming_rules():
    t = OpTable.load()
    assert t.outplace_name("index_copy_") == "index_copy" and not t.lowerable("index_copy_")
    assert t.outplace_name("masked_fill_") == "masked_fill" and t.lowerable("masked_fill_")
    assert t.outplace_name("zero_") == "zeros_like" and t.outplace_name("fill_") == "full_like"
    assert t.outplace_name("copy_") == "copy_" and t.lowerable("copy_")
    assert t.lowerable("empty_strided") and t.lowerable("view") and t.lowerable("_unsafe_view")
    assert not t.lowerable("repeat_interleave") and not t.lowerable("_to_copy")  # _to_copy: via its composite


class _Unlowerable(nn.Module):
    """What model.py used to do on the IPU path: index_copy_ cache writes, repeat_interleave GQA, SDPA."""

    def __init__(self):
        super().__init__()
        self.register_buffer("cache", torch.zeros(1, 2, 8, 4))

    def forward(self, k, pos):
        self.cache.index_copy_(2, pos, k)
        kv = self.cache.repeat_interleave(2, dim=1)
        return F.scaled_dot_product_attention(kv, kv, kv)


def test_trace_flags_unlowerable_ops_with_their_module():
    root = nn.Sequential(nn.Linear(4, 4), _Unlowerable())
    report = trace_ops(root[1], [((torch.randn(1, 2, 1, 4), torch.tensor([3])), {})])
    bad = {r.name: r.module for r in report.unlowerable}
    assert {"index_copy", "repeat_interleave", "scaled_dot_product_attention"} <= set(bad)
    assert not report.ok
    ok = trace_ops(root[0], [((torch.randn(2, 4),), {})])
    assert ok.ok and "addmm" in {r.name for r in ok.ops.values()}
    assert "_to_copy" not in {r.name for r in trace_ops(nn.Identity(), [((torch.randn(2),), {})]).ops.values()}


def test_cast_is_judged_by_its_composite_kernel():
    class Cast(nn.Module):
        def forward(self, x):
            return x.to(torch.float16).float() * 2

    report = trace_ops(Cast(), [((torch.randn(3),), {})])
    names = {r.lowered_as for r in report.ops.values()}
    assert report.ok and "copy_" in names and "_to_copy" not in names


@pytest.mark.parametrize("argv", [
    ["--model", "tiny-llama", "--ipus", "2", "--sparsity", "0.8"],                                   # GQA, tied head
    ["--model", "tiny-llama-4l", "--ipus", "4", "--sparsity", "0.8", "--sparse-head", "--head-shards", "2",
     "--strategy", "pipelined"],
    ["--model", "tiny-luminous", "--ipus", "2", "--sparsity", "0.8", "--sparse-head", "--strategy", "sharded"],
    ["--model", "tiny-luminous", "--ipus", "2", "--sparsity", "0.5", "--embed-shards", "2", "--strategy",
     "pipelined", "--replicas", "2"],
])
def test_ipu_check_passes_on_the_ipu_graph(argv, capsys):
    rc = main(["ipu-check"] + argv)
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "ipu-check: OK: 0 unsupported ops" in out and "custom op ipu_sparse::SparseMatMul" in out
    assert "UNSUPPORTED" not in out and "copy_" in out  # the KV cache is written with copy_


def test_ipu_check_fails_on_an_unlowerable_model(monkeypatch, capsys):
    """The gate can fail: the former cache write (index_copy_) and GQA (repeat_interleave) are reported with
    the module that emits them, and the command exits non-zero."""
    def update(self, input_pos, k, v):
        self.k.index_copy_(2, input_pos, k)
        self.v.index_copy_(2, input_pos, v)
        return self.k, self.v

    def attend(self, q, k, v, input_pos):
        rep = self.n_heads // self.n_kv_heads
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        return F.scaled_dot_product_attention(q, k, v)

    monkeypatch.setattr(KVCache, "update", update)
    monkeypatch.setattr(Attention, "_attend_static", attend)
    rc = main(["ipu-check", "--model", "tiny-llama", "--ipus", "2", "--sparsity", "0.8"])
    out = capsys.readouterr().out
    assert rc == 1
    assert "UNSUPPORTED aten::index_copy (PopTorch looks up 'index_copy'" in out
    assert "in model.layers.0.attn on IPU0" in out and "in model.layers.1.attn on IPU1" in out
    # torch 2.0.1 dispatches aten::repeat_interleave.Tensor; newer torch expands scalar repeats itself,
    # so there only the call is caught (PopTorch 3.4 runs on 2.0.1: both are reported there)
    assert "UNSUPPORTED call of torch function repeat_interleave()" in out
    if torch.__version__.startswith("2.0."):
        assert "UNSUPPORTED aten::repeat_interleave (" in out
    assert "UNSUPPORTED call of torch function scaled_dot_product_attention()" in out  # caught on every torch
    assert "ipu-check: FAILED" in out


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["sharded", "pipelined"])
def test_ipu_check_smollm2_80_sparse_head(strategy, capsys):
    rc = main(["ipu-check", "--model", "smollm2-135m", "--ipus", "4", "--sparsity", "0.8", "--sparse-head",
               "--kv-len", "256", "--strategy", strategy])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "sparse head" in out and "UNSUPPORTED" not in out and "PLAN MISMATCH" not in out
    assert "in model.lm_head" in out  # the head really is a sparse custom op


# ----- planner map == what parallelize_ builds ---------------------------------------------

@pytest.mark.parametrize("preset,kw", [
    ("tiny-llama-4l", dict(n_ipus=4)),
    ("tiny-llama-4l", dict(n_ipus=3, sparse_head=True, head_shards=2, embed_shards=2)),
    ("tiny-luminous", dict(n_ipus=2, sparse_head=True)),
    ("tiny-llama", dict(n_ipus=2, layers_per_ipu=[0, 2])),
])
def test_planner_map_equals_what_parallelize_builds(monkeypatch, tmp_path, preset, kw):
    double = PoptorchDouble()
    monkeypatch.setitem(sys.modules, "poptorch", double)
    model = build_model(get_preset(preset), seed=0)
    if kw.get("sparse_head"):
        model.untie_lm_head_()
    magnitude_prune_(model, 0.8, include_head=bool(kw.get("sparse_head")))
    plan = make_plan(PlanConfig(model.config, sparsity=0.8, kv_len=32, seq_len=1, **kw))
    build_ipu_graph(model, plan, tmp_path, dtype=torch.float32, poptorch=double)
    assert [(uid, ipu) for _, uid, ipu in double.blocks] == planned_blocks(plan)
    assert built_vs_plan(model, plan, model.ipu_placement.blocks) == []
    heads = [u for u in plan.units if u.kind == "head" and u.pinned_to is None]
    for u in heads:  # --sparse-head builds sparse head slices, each with its own pattern file
        sparse = [m for m in model.get_submodule(u.name).modules() if isinstance(m, IpuSparseLinear)]
        assert bool(sparse) == bool(kw.get("sparse_head"))
        assert all(m.pattern_path and Path(m.pattern_path).exists() for m in sparse)
    deparallelize_(model, poptorch=double)


def test_built_vs_plan_reports_a_dense_head_planned_sparse(monkeypatch, tmp_path):
    double = PoptorchDouble()
    monkeypatch.setitem(sys.modules, "poptorch", double)
    model = build_model(get_preset("tiny-luminous"), seed=0)
    magnitude_prune_(model, 0.8)  # head not pruned: its "sparse" form holds every weight
    plan = make_plan(PlanConfig(model.config, n_ipus=2, sparsity=0.8, kv_len=32, seq_len=1, sparse_head=True))
    build_ipu_graph(model, plan, tmp_path, dtype=torch.float32, poptorch=double)
    problems = built_vs_plan(model, plan, model.ipu_placement.blocks)
    assert len(problems) == 1 and "lm_head" in problems[0] and "non-zeros" in problems[0]


def test_ipu_check_reports_plan_mismatch(tmp_path):
    model = build_model(get_preset("tiny-luminous"), seed=0)
    magnitude_prune_(model, 0.8)
    plan = make_plan(PlanConfig(model.config, n_ipus=2, sparsity=0.8, kv_len=32, seq_len=1, sparse_head=True))
    res = check_ipu_graph(model, plan, tmp_path)
    assert res.report.ok and not res.ok and "lm_head" in res.plan_problems[0]


# ----- the test double fails where PopTorch would -------------------------------------------

def _compiled(monkeypatch, tmp_path, **option_kw):
    double = PoptorchDouble()
    monkeypatch.setitem(sys.modules, "poptorch", double)
    cfg = get_preset("tiny-llama")
    model = build_model(cfg, seed=0)
    plan = make_plan(PlanConfig(cfg, n_ipus=2, fmt="dense", sparsity=0.0, kv_len=16, seq_len=1))
    return double, model, plan


def test_double_rejects_input_rows_not_a_multiple_of_iterations(monkeypatch, tmp_path):
    double, model, plan = _compiled(monkeypatch, tmp_path)
    executor, _, rows = compile_for_ipu(model, plan, tmp_path, mode="pipelined", dtype=torch.float32,
                                        load_op=False, poptorch=double)
    assert rows == len(plan.stages) > 1
    with pytest.raises(RuntimeError, match="multiple of deviceIterations x replicas"):
        executor(torch.zeros(1, 1, dtype=torch.long), torch.zeros(1, dtype=torch.long))  # the former (1,) position
    release(executor, model, poptorch=double)


def test_double_rejects_buffer_writes_under_replication_without_broadcast_off(monkeypatch, tmp_path):
    from ipu_sparse.ipu import options as options_mod

    double, model, plan = _compiled(monkeypatch, tmp_path)
    real = options_mod.ipu_options

    def replicated(*args, **kw):
        opts = real(*args, **kw)
        opts.replicationFactor(2)
        return opts

    monkeypatch.setattr("ipu_sparse.ipu.generate.ipu_options", replicated)
    monkeypatch.setattr("ipu_sparse.ipu.generate.execution_shape",
                        lambda plan, mode="sharded", popdist=None: options_mod.ExecutionShape(1, 2))
    executor, _, rows = compile_for_ipu(model, plan, tmp_path, dtype=torch.float32, load_op=False, poptorch=double)
    assert rows == 2 and double.option("Options.broadcastBuffers") == {"broadcast_buffers": False}
    assert len(generate_ids(executor, [3, 4], 2, kv_len=16, rows=rows)) == 4
    release(executor, model, poptorch=double)

    def broadcasting(*args, **kw):
        opts = replicated(*args, **kw)
        opts.broadcastBuffers(True)
        return opts

    monkeypatch.setattr("ipu_sparse.ipu.generate.ipu_options", broadcasting)
    model = build_model(get_preset("tiny-llama"), seed=0)
    with pytest.raises(RuntimeError, match="does not support broadcasting buffers"):
        compile_for_ipu(model, plan, tmp_path, dtype=torch.float32, load_op=False, poptorch=double)


def test_double_rejects_unlowerable_ops(monkeypatch, tmp_path):
    double, model, plan = _compiled(monkeypatch, tmp_path)
    monkeypatch.setattr(Attention, "_attend_static",
                        lambda self, q, k, v, pos: F.scaled_dot_product_attention(q, self._expand_kv(k),
                                                                                  self._expand_kv(v)))
    with pytest.raises(RuntimeError, match="Unsupported ops found in compiled model: aten::scaled_dot_product"):
        compile_for_ipu(model, plan, tmp_path, dtype=torch.float32, load_op=False, poptorch=double)


class _PopdistDouble:
    """TEST DOUBLE for popdist under poprun: 2 local replicas; its Options set the replication, as popdist does."""

    def __init__(self, double):
        self.inits = 0
        outer = self

        class _PT:
            @staticmethod
            def Options(ipus_per_replica=None):
                return double.Options().replicationFactor(outer.getNumLocalReplicas())

        self.poptorch = _PT

    def isPopdistEnvSet(self):
        return True

    def init(self):
        self.inits += 1

    def getNumLocalReplicas(self):
        return 2


def test_poprun_run_feeds_rows_for_local_replicas(monkeypatch, tmp_path):
    from ipu_sparse.ipu.options import init_popdist

    double, model, plan = _compiled(monkeypatch, tmp_path)
    pd = _PopdistDouble(double)
    assert init_popdist(pd) is pd and pd.inits == 1  # popdist.init() first, as Graphcore's examples do
    executor, _, rows = compile_for_ipu(model, plan, tmp_path, dtype=torch.float32, load_op=False, poptorch=double,
                                        popdist=pd)
    assert rows == 2 and executor.split == 2
    out = executor(*step_inputs(5, 0, rows))
    assert out.shape == (2, model.config.vocab_size) and torch.equal(out[0], out[1])
    release(executor, model, poptorch=double)
