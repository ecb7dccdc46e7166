"""scripts/bench_decode.py end to end in its smoke mode (tiny preset, llama.cpp rows off): seconds."""
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "bench_decode.py"


def run(*args, cwd):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=600)


def test_quick_run_writes_json_table_and_chart(tmp_path):
    out = tmp_path / "res" / "bench"
    proc = run("--quick", "--model", "tiny-llama", "--no-llamacpp", "--out", str(out), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(Path(f"{out}.json").read_text())
    names = [r["name"] for r in res["rows"]]
    assert names[:2] == ["ours dense fp32", "ours dense bf16"]
    for kind in ("80% bf16, fp16 head", "80% bf16, int8 head", "80% int8, fp16 head", "80% int8, int8 head",
                 "torch path (engine off)"):
        assert any(kind in n for n in names), kind
    assert not any(n.startswith("llama.cpp") for n in names)
    for r in res["rows"]:  # measured, or skipped with a reason: never both, never neither
        assert ("skipped" in r) != ("tok_s" in r), r
        if "skipped" in r:
            assert r["skipped"].strip()
            continue
        assert r["tok_s"] > 0 and len(r["rates"]) == 1 and len(r["tokens"]) == 8
        assert r["bytes_per_token"] == r["bytes"]["total"] > 0
        assert abs(r["GBps"] - r["bytes_per_token"] * r["tok_s"] / 1e9) < 1e-9
    dense = next(r for r in res["rows"] if r["name"] == "ours dense fp32")
    sparse = next(r for r in res["rows"] if r["name"] == "ours sparse 80% bf16, fp16 head")
    assert "tok_s" in dense and "tok_s" in sparse
    assert sparse["bytes"]["projections"] < dense["bytes"]["projections"] / 4
    assert dense["tokens_equal_to_ours_dense_fp32"] == 8
    for kind in ("dram", "l3"):
        assert res["bandwidth"][kind]["read_GBps"] > 0 and res["bandwidth"][kind]["copy_GBps"] > 0
    table = Path(f"{out}.md").read_text()
    assert "| ours sparse 80% bf16, fp16 head |" in table and "--quick" in table
    assert Path(f"{out}.png").read_bytes()[:4] == b"\x89PNG"
    assert sorted(p.name for p in out.parent.iterdir()) == ["bench.json", "bench.md", "bench.png"]  # no temporaries


def test_bad_sparsity_is_one_line_and_no_output(tmp_path):
    proc = run("--quick", "--model", "tiny-llama", "--no-llamacpp", "--sparsities", "0.8,1.5",
               "--out", str(tmp_path / "b"), cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "--sparsities" in proc.stderr and "Traceback" not in proc.stderr
    assert not list(tmp_path.iterdir())
