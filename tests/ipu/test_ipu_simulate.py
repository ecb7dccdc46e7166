"""Staged CPU simulation equals the plain model; estimates are labelled and consistent."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ipu_sparse.config import get_preset
from ipu_sparse.ipu.planner import PlanConfig, make_plan
from ipu_sparse.ipu.simulate import estimate_stages, simulate
from ipu_sparse.model import build_model
from ipu_sparse.prune import magnitude_prune_

ROOT = Path(__file__).resolve().parents[2]


def test_magnitude_prune_exact_sparsity(tiny_llama):
    magnitude_prune_(tiny_llama, 0.75, scope="row")
    for _, m in tiny_llama.linear_layers():
        assert (m.weight == 0).float().mean().item() == pytest.approx(0.75, abs=1e-6)


@pytest.mark.parametrize("preset, n_ipus, shards", [("tiny-llama-4l", 4, {}), ("tiny-luminous", 4, {}),
                                                    ("tiny-llama-4l", 4, dict(embed_shards=2, head_shards=2)),
                                                    ("tiny-llama", 2, {})])
def test_staged_equals_plain(preset, n_ipus, shards):
    cfg = get_preset(preset)
    model = build_model(cfg, seed=0)
    magnitude_prune_(model, 0.8, scope="row")
    plan = make_plan(PlanConfig(cfg, n_ipus=n_ipus, sparsity=0.8, kv_len=128, **shards))
    idx = torch.randint(0, cfg.vocab_size, (2, 16))
    res = simulate(model, plan, idx, repeats=1)
    assert res["max_abs_diff_vs_unsplit_same_modules"] <= 1e-6
    assert res["max_abs_diff_vs_plain"] <= 1e-4
    assert [s["ipu"] for s in res["stages"]] == [ipu for ipu, _ in plan.stages]
    assert all(s["cpu_ms"] > 0 for s in res["stages"])
    assert not hasattr(model, "_ipu_originals") or not model.__dict__.get("_ipu_originals")
    assert model.ipu_placement is None and isinstance(model.embed, torch.nn.Embedding)  # originals restored
    if shards:
        assert type(model.embed).__name__ == "Embedding"  # restored after the run


def test_estimates_sparse_below_dense():
    plan = make_plan(PlanConfig(get_preset("luminous-base-13b"), n_ipus=16, sparsity=0.8, sparse_head=True, kv_len=512))
    est = estimate_stages(plan)
    r = est["summary"]["sparse_over_dense"]
    assert 0.15 < r["flops"] < 0.3          # ~20 % of the matmul FLOPs plus attention
    assert r["sram_read_bytes"] < 0.6 and r["energy"] < 1.0
    assert "ESTIMATE" in est["summary"]["label"]
    assert "source" in est["constants"]["energy_pj_per_flop"]
    assert len(est["stages"]) == len(plan.stages)
    links = [s["link_bytes"] for s in est["stages"]]
    assert links[-1] == 0 and all(b == 5120 * 2 for b in links[:-1])


def test_cli_simulate_tiny(tmp_path):
    out = tmp_path / "sim.json"
    r = subprocess.run([sys.executable, "-m", "ipu_sparse", "simulate", "--model", "tiny-luminous", "--ipus", "4",
                        "--sparsity", "0.8", "--random-init", "--prompt-len", "16", "--json", str(out)],
                       cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "max |staged - plain model|" in r.stdout and "ESTIMATE" in r.stdout
    assert out.exists()


def test_cli_plan_luminous(tmp_path):
    r = subprocess.run([sys.executable, "-m", "ipu_sparse", "plan", "--model", "luminous-base-13b", "--ipus", "16",
                        "--sparsity", "0.8", "--sparse-head", "--kv-len", "512"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "dense fp16" in r.stdout and "DOES NOT FIT" in r.stdout and "of dense" in r.stdout
    r = subprocess.run([sys.executable, "-m", "ipu_sparse", "plan", "--model", "luminous-base-13b", "--ipus", "4"],
                       cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 2 and "does not fit 4 x gc200" in r.stderr and r.stderr.count("\n") == 1


@pytest.fixture(scope="module")
def pruned_smollm2(smollm2):
    import copy

    model = copy.deepcopy(smollm2.model)
    magnitude_prune_(model, 0.8, scope="row")
    return model


@pytest.mark.slow
@pytest.mark.parametrize("n_ipus", [4, 16])
def test_smollm2_split_equals_plain(smollm2, pruned_smollm2, n_ipus):
    import copy

    model = copy.deepcopy(pruned_smollm2)
    cfg = model.config
    plan = make_plan(PlanConfig(cfg, n_ipus=n_ipus, sparsity=0.8, kv_len=2048))
    assert plan.fits and sum(plan.layers_per_ipu) == 30
    idx = torch.tensor([smollm2.tokenizer.encode("The capital of France is Paris, and the capital of Italy is")])
    res = simulate(model, plan, idx, repeats=1)
    assert len(res["stages"]) == n_ipus + 1  # the tied head returns to the embedding's IPU0
    assert res["stages"][-1]["units"] == ["lm_head"] and res["stages"][-1]["ipu"] == 0
    assert res["max_abs_diff_vs_unsplit_same_modules"] == 0.0
    assert res["max_abs_diff_vs_plain"] <= 1e-3


@pytest.mark.skipif(__import__("importlib").util.find_spec("poptorch") is not None, reason="poptorch is installed here")
def test_cli_ipu_generate_without_sdk_is_one_line_error():
    r = subprocess.run([sys.executable, "-m", "ipu_sparse", "ipu-generate", "--model", "tiny-llama", "--compile-only"],
                       cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 2 and "poptorch is not importable" in r.stderr and r.stderr.count("\n") == 1


def test_poprun_script_dry_run():
    script = ROOT / "scripts" / "poprun_ipu.sh"
    r = subprocess.run(["bash", str(script), "--pod", "64", "--ipus-per-replica", "16", "--hosts", "a,b,c,d",
                        "--partition", "p", "--cache", "/tmp/x", "--dry-run", "--", "--model", "m"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    for flag in ("poprun", "--num-instances 4", "--num-replicas 4", "--ipus-per-replica 16", "--vipu-partition p",
                 "--executable-cache-path /tmp/x", "ipu-generate --ipus 16"):
        assert flag in r.stdout
    r = subprocess.run(["bash", str(script), "--pod", "16", "--compile-only", "--dry-run"], capture_output=True, text=True)
    assert r.returncode == 0 and "poprun" not in r.stdout and "--compile-only" in r.stdout
    r = subprocess.run(["bash", str(script), "--pod", "16", "--replicas", "2", "--dry-run"], capture_output=True, text=True)
    assert r.returncode == 2 and "exceed the POD16" in r.stderr
