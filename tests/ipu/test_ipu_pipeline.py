"""parallelize_ / deparallelize_ / ipu_options against the PopTorch TEST DOUBLE (tests/ipu/ipu_poptorch_double.py)."""
import sys

import pytest
import torch

from ipu_sparse.config import get_preset
from ipu_sparse.errors import UserError
from ipu_sparse.ipu.options import ipu_options
from ipu_sparse.ipu.pipeline import VocabShardedEmbedding, VocabShardedHead, deparallelize_, parallelize_
from ipu_sparse.ipu.planner import PlanConfig, make_plan
from ipu_sparse.model import build_model

from ipu_poptorch_double import PoptorchDouble


@pytest.fixture
def poptorch(monkeypatch):
    double = PoptorchDouble()
    monkeypatch.setitem(sys.modules, "poptorch", double)
    return double


def tiny4(n_ipus=4, **kw):
    cfg = get_preset("tiny-llama-4l")
    return build_model(cfg, seed=0), make_plan(PlanConfig(cfg, n_ipus=n_ipus, kv_len=128, **kw))


def test_block_assignment_follows_plan(poptorch):
    model, plan = tiny4()
    parallelize_(model, plan)
    got = [(uid, ipu) for _, uid, ipu in poptorch.blocks]
    want = [(u.name, plan.placement[u.name]) for u in plan.units if u.kind != "head"]
    first_head = next(u for u in plan.units if u.kind == "head")
    want += [("norm", plan.placement[first_head.name])]
    want += [(u.name, plan.placement[u.name]) for u in plan.units if u.kind == "head"]
    assert got == want
    for module, uid, _ in poptorch.blocks:  # the annotated module is the model's own
        assert module is (model.norm if uid == "norm" else model.get_submodule(uid))
    # running the model executes the blocks in plan order, on the planned IPUs
    model(torch.randint(0, 256, (1, 8)))
    assert poptorch.executed == got
    ipus = [ipu for _, ipu in poptorch.executed]
    assert ipus == sorted(ipus)  # contiguous stages


def test_user_layers_per_ipu_reaches_blocks(poptorch):
    model, plan = tiny4(n_ipus=2, layers_per_ipu=[3, -1])
    parallelize_(model, plan)
    layer_ipus = [ipu for _, uid, ipu in poptorch.blocks if uid.startswith("layers.")]
    assert layer_ipus == [0, 0, 0, 1]


def test_deparallelize_restores_model(poptorch):
    model, plan = tiny4(n_ipus=4, embed_shards=2, head_shards=2)
    idx = torch.randint(0, 256, (2, 8))
    before = model(idx)
    embed, head = model.embed, model.lm_head
    state = {k: v.clone() for k, v in model.state_dict().items()}
    parallelize_(model, plan)
    assert isinstance(model.embed, VocabShardedEmbedding) and isinstance(model.lm_head, VocabShardedHead)
    assert torch.equal(model(idx), before)  # sharded embedding/head compute the same logits
    with pytest.raises(RuntimeError, match="already parallelized"):
        parallelize_(model, plan)
    deparallelize_(model)
    assert model.embed is embed and model.lm_head is head
    assert poptorch.removed == [model]
    assert not any(m._forward_pre_hooks for m in model.modules())
    assert set(model.state_dict()) == set(state)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())
    n = len(poptorch.executed)
    assert torch.equal(model(idx), before) and len(poptorch.executed) == n  # no block hooks left


def test_tied_head_goes_with_embedding(poptorch):
    cfg = get_preset("smollm2-135m").replace(n_layers=3, name="smol-3l")  # tied, shape only
    plan = make_plan(PlanConfig(cfg, n_ipus=2, kv_len=256))
    assert plan.placement["lm_head"] == plan.placement["embed"] == 0
    assert plan.stages[-1] == (0, ["lm_head"])  # execution returns to IPU0 for the head


def test_options_sharded(poptorch):
    _, plan = tiny4()
    opts = ipu_options(plan, mode="sharded", executable_cache="/tmp/cache", initializers_file="/tmp/init.onnx",
                       compile_only=True)
    assert poptorch.option("Options.setExecutionStrategy")["strategy"] == ("ShardedExecution", ("AutoStage.AutoIncrement",))
    assert poptorch.option("Options.deviceIterations") == {"device_iterations": 1}
    amp = poptorch.option("Options.setAvailableMemoryProportion")["available_memory_proportion"]
    assert amp == {f"IPU{a.ipu}": a.matmul_proportion for a in plan.ipus}
    assert poptorch.option("Options.Precision.setPartialsType") == {"dtype": torch.half}
    assert poptorch.option("Options.enableExecutableCaching") == {"path": "/tmp/cache"}
    assert poptorch.option("Options._Popart.set") == {"key": "saveInitializersToFile", "value": "/tmp/init.onnx"}
    assert poptorch.option("Options.useOfflineIpuTarget") == {"ipu_version": 2}
    assert poptorch.option("Options.autoRoundNumIPUs") is None  # 4 is a power of two
    assert opts is not None


def test_options_pipelined_needs_iterations(poptorch):
    _, plan = tiny4()
    ipu_options(plan, mode="pipelined")
    assert poptorch.option("Options.deviceIterations") == {"device_iterations": len(plan.stages)}
    with pytest.raises(UserError, match="below the 4 pipeline stages"):
        ipu_options(plan, mode="pipelined", device_iterations=2)
    with pytest.raises(UserError, match="unknown execution mode 'fast'"):
        ipu_options(plan, mode="fast")


def test_options_non_power_of_two(poptorch):
    cfg = get_preset("tiny-llama-4l")
    plan = make_plan(PlanConfig(cfg, n_ipus=3, kv_len=128))
    ipu_options(plan)
    assert poptorch.option("Options.autoRoundNumIPUs") == {"auto_round_num_ipus": True}


class _Popdist:
    """TEST DOUBLE for popdist: reports a poprun environment."""

    def __init__(self, double):
        self.calls = []
        outer = self

        class _PT:
            @staticmethod
            def Options(ipus_per_replica=None):
                outer.calls.append(ipus_per_replica)
                return double.Options()

        self.poptorch = _PT

    def isPopdistEnvSet(self):
        return True


def test_options_under_poprun_use_popdist(poptorch):
    _, plan = tiny4()
    pd = _Popdist(poptorch)
    ipu_options(plan, popdist=pd, replication_factor=4)
    assert pd.calls == [4]
    assert poptorch.option("Options.replicationFactor") is None  # poprun sets replication


def test_double_rejects_unknown_option(poptorch):
    opts = poptorch.Options()
    with pytest.raises(AttributeError):
        opts.setMemoryProportion({})
    with pytest.raises(TypeError):
        opts.deviceIterations(iterations=2)


def test_ipu_modules_import_without_poptorch():
    import subprocess
    from pathlib import Path

    code = ("import sys; import ipu_sparse.ipu.planner, ipu_sparse.ipu.hardware, ipu_sparse.ipu.ops, "
            "ipu_sparse.ipu.pipeline, ipu_sparse.ipu.options, ipu_sparse.ipu.generate, ipu_sparse.ipu.simulate, ipu_sparse.ipu.opcheck, ipu_sparse.ipu.check, "
            "ipu_sparse.ipu.commands; assert 'poptorch' not in sys.modules and 'popdist' not in sys.modules")
    root = Path(__file__).resolve().parents[2]
    r = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_parallelize_without_poptorch_is_a_user_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "poptorch", None)  # makes `import poptorch` raise ImportError
    model, plan = tiny4()
    with pytest.raises(UserError, match="poptorch is not importable"):
        parallelize_(model, plan)
