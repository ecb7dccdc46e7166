"""The recovery benchmark's report helpers (scripts/bench_recover.py): projection, zero-shot margin, dense reuse."""
import importlib.util
import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_recover", ROOT / "scripts" / "bench_recover.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_projection_recovers_power_law(bench):
    curve = [{"tokens": 0, "wt2_ppl_curve": 30.0, "label": "teacher"}]
    curve += [{"tokens": t, "wt2_ppl_curve": 500 * t ** -0.1, "label": "step"} for t in (1e4, 2e4, 4e4, 8e4)]
    pj = bench.projection(curve, 60.0)
    assert pj["points"] == 4 and pj["exponent"] == pytest.approx(-0.1, abs=1e-9)
    assert pj["tokens_to_target"] == pytest.approx((500 / 60) ** 10, rel=1e-6)
    flat = [{"tokens": t, "wt2_ppl_curve": 100.0 + t * 1e-3, "label": "step"} for t in (1e4, 2e4, 4e4)]
    assert bench.projection(flat, 60.0)["tokens_to_target"] is None  # rising curve: no projection
    assert bench.projection(curve[:3], 60.0) is None  # too few points


def test_margin_above_chance_and_dense_reuse(bench, tmp_path, monkeypatch):
    monkeypatch.setattr(bench, "ROOT", tmp_path)
    (tmp_path / "results").mkdir()
    def zs(h, p, w, n=1000):  # hellaswag (acc_norm), piqa, winogrande accuracies on n items
        return {"hellaswag": {"acc": 0, "acc_norm": h, "n": n}, "piqa": {"acc": p, "n": n}, "winogrande": {"acc": w, "n": n}}

    other = {"settings": {"model": "m"}, "rows": {"dense": {"wt2_ppl_40w": 29.0, "wt2_ppl_full": 27.0,
                                                            "zeroshot": zs(0.45, 0.7, 0.51), "zeroshot_limit": 10}}}
    (tmp_path / "results" / "recover_a.json").write_text(json.dumps(other))
    res_path = tmp_path / "results" / "recover_b.json"
    results = {"rows": {}}
    bench.reuse_dense_evaluations(results, "m", 10, res_path)
    assert results["rows"]["dense"]["wt2_ppl_full"] == 27.0 and results["rows"]["dense"]["zeroshot_limit"] == 10
    results2 = {"rows": {}}
    bench.reuse_dense_evaluations(results2, "m", 20, res_path)  # other zero-shot limit: not copied
    assert "zeroshot" not in results2["rows"]["dense"]
    results3 = {"rows": {}}
    bench.reuse_dense_evaluations(results3, "other-model", 10, res_path)
    assert results3["rows"]["dense"] == {}

    results["rows"]["sparse"] = {"wt2_ppl_40w": 60.0, "zeroshot": zs(0.35, 0.6, 0.58), "zeroshot_limit": 10}
    args = SimpleNamespace(windows=40, curve_windows=0)
    bench.write_outputs(results, "b", args)
    kept = results["rows"]["sparse"]["zeroshot_margin_kept"]
    # winogrande: dense 0.51 is within two standard errors of chance (0.5) on 1000 items: left out
    assert kept == pytest.approx(((0.35 - 0.25) / (0.45 - 0.25) + (0.6 - 0.5) / (0.7 - 0.5)) / 2)
    assert results["rows"]["sparse"]["zeroshot_margin_tasks"] == ["hellaswag", "piqa"]
    table = (tmp_path / "results" / "recover_b.md").read_text()
    assert "left out: winogrande" in table
    assert "| sparse | 60.00 |" in table and f"{100 * kept:.0f}%" in table
    assert not math.isnan(kept)
