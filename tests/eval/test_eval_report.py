"""The recovery benchmark's report (ipu_sparse.eval.report): projection, zero-shot margin, dense reuse."""
import json
import math
from pathlib import Path

import pytest

from ipu_sparse.eval import report


def test_projection_recovers_power_law():
    curve = [{"tokens": 0, "wt2_ppl_curve": 30.0, "label": "teacher"}]
    curve += [{"tokens": t, "wt2_ppl_curve": 500 * t ** -0.1, "label": "step"} for t in (1e4, 2e4, 4e4, 8e4)]
    pj = report.projection(curve, 60.0)
    assert pj["points"] == 4 and pj["exponent"] == pytest.approx(-0.1, abs=1e-9)
    assert pj["tokens_to_target"] == pytest.approx((500 / 60) ** 10, rel=1e-6)
    flat = [{"tokens": t, "wt2_ppl_curve": 100.0 + t * 1e-3, "label": "step"} for t in (1e4, 2e4, 4e4)]
    assert report.projection(flat, 60.0)["tokens_to_target"] is None  # rising curve: no projection
    assert report.projection(curve[:3], 60.0) is None  # too few points


def test_margin_above_chance_and_dense_reuse(tmp_path):
    (tmp_path / "results").mkdir()
    def zs(h, p, w, n=1000):  # hellaswag (acc_norm), piqa, winogrande accuracies on n items
        return {"hellaswag": {"acc": 0, "acc_norm": h, "n": n}, "piqa": {"acc": p, "n": n}, "winogrande": {"acc": w, "n": n}}

    other = {"settings": {"model": "m"}, "rows": {"dense": {"wt2_ppl_40w": 29.0, "wt2_ppl_full": 27.0,
                                                            "zeroshot": zs(0.45, 0.7, 0.51), "zeroshot_limit": 10}}}
    (tmp_path / "results" / "recover_a.json").write_text(json.dumps(other))
    res_path = tmp_path / "results" / "recover_b.json"
    results = {"rows": {}}
    report.reuse_dense_evaluations(results, "m", 10, res_path)
    assert results["rows"]["dense"]["wt2_ppl_full"] == 27.0 and results["rows"]["dense"]["zeroshot_limit"] == 10
    results2 = {"rows": {}}
    report.reuse_dense_evaluations(results2, "m", 20, res_path)  # other zero-shot limit: not copied
    assert "zeroshot" not in results2["rows"]["dense"]
    results3 = {"rows": {}}
    report.reuse_dense_evaluations(results3, "other-model", 10, res_path)
    assert results3["rows"]["dense"] == {}

    results["rows"]["sparse"] = {"wt2_ppl_40w": 60.0, "zeroshot": zs(0.35, 0.6, 0.58), "zeroshot_limit": 10}
    report.write_recovery_report(results, tmp_path / "results", "b", windows=40, curve_windows=0)
    kept = results["rows"]["sparse"]["zeroshot_margin_kept"]
    # winogrande: dense 0.51 is within two standard errors of chance (0.5) on 1000 items: left out
    assert kept == pytest.approx(((0.35 - 0.25) / (0.45 - 0.25) + (0.6 - 0.5) / (0.7 - 0.5)) / 2)
    assert results["rows"]["sparse"]["zeroshot_margin_tasks"] == ["hellaswag", "piqa"]
    table = (tmp_path / "results" / "recover_b.md").read_text()
    assert "left out: winogrande" in table
    assert "| sparse | 60.00 |" in table and f"{100 * kept:.0f}%" in table
    assert not math.isnan(kept)


def test_above_chance_and_margin_kept():
    dense = {"piqa": {"acc": 0.70, "n": 100}, "winogrande": {"acc": 0.55, "n": 100}, "hellaswag": {"acc": 0.2,
                                                                                                   "acc_norm": 0.40, "n": 100}}
    # piqa: 0.2 above chance, 2 SE = 0.092; winogrande: 0.05 above, 2 SE = 0.0995; hellaswag uses acc_norm
    assert report.above_chance(dense, "piqa") and not report.above_chance(dense, "winogrande")
    assert report.above_chance(dense, "hellaswag") and report.zeroshot_score(dense, "hellaswag") == 0.40
    sparse = {"piqa": {"acc": 0.6}, "hellaswag": {"acc_norm": 0.25}}
    assert report.margin_kept(sparse, dense, ["piqa", "hellaswag"]) == pytest.approx((0.5 + 0.0) / 2)
    assert report.margin_kept({"piqa": {"acc": 0.6}}, dense, ["piqa", "hellaswag"]) is None  # a task missing
    assert report.margin_kept(sparse, dense, []) is None


def test_projection_wording_and_dense_curve_point():
    def run_row(ppls, minutes=10.0, **extra):
        curve = [{"tokens": 0, "block_tokens": 0, "wt2_ppl_curve": 30.0, "heldout_ppl": 1.0, "label": "teacher"}]
        curve += [{"tokens": t, "block_tokens": 0, "wt2_ppl_curve": p, "heldout_ppl": 1.0, "label": f"step {t}"}
                  for t, p in zip((1000, 2000, 4000), ppls)]
        return dict({"wt2_ppl_40w": ppls[-1], "tokens": 4000, "train_minutes": minutes, "curve": curve}, **extra)

    results = {"rows": {"falling": run_row([400.0, 200.0, 100.0]), "rising": run_row([100.0, 110.0, 120.0]),
                        "reached": run_row([70.0, 60.0, 50.0]), "flat": run_row([100.0, 99.9, 99.8]),
                        "gradual": run_row([400.0, 200.0, 100.0], recover_config={"gradual": [0.5]})}}
    table = report.recovery_table(results, windows=40, curve_windows=8)
    assert "dense 30.00" in table  # the teacher's curve point when the dense row has none
    # falling: ppl = 400 * (t / 1000)^-1, so 60 (2x dense) at 400 / 60 * 1000 tokens, at 4000 tokens / 600 s
    need = 400 / 60 * 1000
    assert f"- *falling*: ppl ~ tokens^-1.000 over 3 points (last 100.0 at 4,000 tokens); 2x dense (60.0 on these 8 " \
           f"windows) projected at {need:,.0f} tokens (~{need / (4000 / 600) / 3600:,.1f} h" in table
    assert "*rising*" in table and "does not decrease" in table
    assert "- *reached*:" in table and "already reached" in table
    assert "beyond 1e11 tokens" in table
    assert "*gradual*" not in table.split("Projection")[1]  # a gradual curve spans several sparsities: no fit
    assert results["rows"]["falling"]["projection"]["tokens_to_target"] == pytest.approx(need)
    assert "projection" not in results["rows"]["gradual"]
    # so flat that the target lies past any float: infinity, not an overflow
    flatter = [{"tokens": t, "wt2_ppl_curve": p, "label": "step"} for t, p in ((1e3, 100.0), (2e3, 99.999), (4e3, 99.998))]
    assert report.projection(flatter, 60.0)["tokens_to_target"] == math.inf


@pytest.mark.parametrize("tag", ["improved80", "improved70", "sparsegpt50", "improved80_chatmix"])
def test_report_of_committed_results_reproduces_their_table(tag):
    """The committed tables were written by this report from the committed JSON (with the benchmark's
    default --windows 40 --curve-windows 8)."""
    results_dir = Path(__file__).resolve().parents[2] / "results"
    results = report.load_results(results_dir / f"recover_smollm2_{tag}.json")
    committed = json.loads((results_dir / f"recover_smollm2_{tag}.json").read_text())
    assert report.recovery_table(results, 40, 8) + "\n" == (results_dir / f"recover_smollm2_{tag}.md").read_text()
    assert results == committed  # the derived fields stored in the JSON are the ones recomputed
