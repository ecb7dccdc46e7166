"""The report of a recovery benchmark (``scripts/bench_recover.py``): a results file of rows (dense,
one-shot pruned, recovered) becomes a Markdown table and a PNG of the perplexity curves, with

- a power-law projection of each recovery curve to a perplexity target (``projection``),
- the zero-shot margin above chance each row keeps relative to dense (``margin_kept``), over the tasks
  where dense is significantly above chance (``above_chance``),
- the dense model's evaluations taken from the other results files of the same model
  (``reuse_dense_evaluations``: deterministic, computed once for all of them).

Results file: ``{"settings": {...}, "rows": {name: row}}``; a row holds ``wt2_ppl_<n>w`` (WikiText-2
perplexity on the first n windows), ``wt2_ppl_full``, ``zeroshot`` ({task: {"acc", "acc_norm", "n"}}),
``chat`` (answers to ``CHAT_QUESTIONS``) and, for a recovery run, ``tokens``, ``block_tokens``,
``train_minutes``, ``source``, ``recover_config`` and ``curve`` (evaluation points of the run).
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Dict, List, Optional

from ..fileio import atomic_file, atomic_write_text

# chance accuracy of each zero-shot task (LAMBADA: open vocabulary, ~0)
CHANCE = {"lambada": 0.0, "hellaswag": 0.25, "piqa": 0.5, "arc_easy": 0.25, "winogrande": 0.5}

CHAT_QUESTIONS = (
    "What is the capital of France?",
    "Give me two tips for staying healthy.",
    "Explain in one sentence what a computer does.",
)


def load_results(path: Path) -> dict:
    """A results file, or an empty one if there is none yet."""
    return json.loads(path.read_text()) if path.is_file() else {}


def save_results(path: Path, results: dict) -> None:
    atomic_write_text(path, json.dumps(results, indent=1))


def reuse_dense_evaluations(results: dict, model: str, zeroshot_limit: int, res_path: Path) -> None:
    """Copy the dense model's evaluations (deterministic) from the other ``recover_*.json`` results files
    of the same model beside ``res_path``, so that the teacher's full test set and zero-shot tasks are
    computed once for all of them."""
    dense = results["rows"].setdefault("dense", {})
    for other in sorted(Path(res_path).parent.glob("recover_*.json")):
        if other == res_path:
            continue
        data = load_results(other)
        if data.get("settings", {}).get("model") != model:
            continue
        src = data.get("rows", {}).get("dense", {})
        for k, v in src.items():
            if k.startswith("wt2_ppl_") or k == "chat":
                dense.setdefault(k, v)
        if zeroshot_limit and src.get("zeroshot_limit") == zeroshot_limit and "zeroshot" not in dense:
            dense["zeroshot"], dense["zeroshot_limit"] = src["zeroshot"], src.get("zeroshot_limit")


def projection(curve: List[dict], target: float) -> Optional[Dict[str, Any]]:
    """Power-law fit ppl = a * tokens^b over the end-to-end distillation points (tokens > 0) of a curve;
    returns the fit and the tokens at which it reaches ``target`` (None if it does not decrease)."""
    pts = [(c["tokens"], c["wt2_ppl_curve"]) for c in curve
           if c["tokens"] > 0 and c["wt2_ppl_curve"] is not None and c["label"] != "teacher"]
    if len(pts) < 3:
        return None
    xs = [math.log(t) for t, _ in pts]
    ys = [math.log(p) for _, p in pts]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / max(sum((x - mx) ** 2 for x in xs), 1e-12)
    a = my - b * mx
    out = {"points": len(pts), "exponent": b, "log_a": a, "last_tokens": pts[-1][0], "last_ppl": pts[-1][1],
           "target": target}
    out["tokens_to_target"] = None
    if b < 0:  # a nearly flat curve reaches the target past any float: infinity
        log_need = (math.log(target) - a) / b
        out["tokens_to_target"] = math.exp(log_need) if log_need < 700 else math.inf
    return out


def zeroshot_score(z: dict, task: str) -> float:
    """acc_norm where the task defines it, else acc."""
    return z[task].get("acc_norm", z[task].get("acc"))


def above_chance(dense_z: dict, task: str) -> bool:
    """Dense is above chance by at least two standard errors of its accuracy on these items."""
    acc, n = zeroshot_score(dense_z, task), dense_z[task].get("n") or 1
    return acc - CHANCE.get(task, 0.0) >= 2 * math.sqrt(max(acc * (1 - acc), 1e-12) / n)


def margin_fractions(z: dict, dense_z: dict, tasks: List[str]) -> List[float]:
    """(acc - chance) / (dense acc - chance) for each of ``tasks`` that ``z`` has."""
    return [(zeroshot_score(z, t) - CHANCE.get(t, 0.0)) / (zeroshot_score(dense_z, t) - CHANCE.get(t, 0.0))
            for t in tasks if t in z]


def margin_kept(z: dict, dense_z: dict, tasks: List[str]) -> Optional[float]:
    """Mean over ``tasks`` of the margin above chance kept relative to dense; None unless ``z`` has them all."""
    fr = margin_fractions(z, dense_z, tasks)
    if fr and len(fr) == len(tasks):
        return sum(fr) / len(fr)
    return None


def dense_curve_ppl(results: dict, curve_windows: int) -> Optional[float]:
    """Dense perplexity on the curve's windows: the dense row's, else the teacher's point recorded at the
    start of a run's curve."""
    dense_c = results.get("rows", {}).get("dense", {}).get(f"wt2_ppl_{curve_windows}w")
    if not dense_c:
        dense_c = next((c["wt2_ppl_curve"] for r in results.get("rows", {}).values() for c in r.get("curve", [])
                        if c["label"] == "teacher" and c["wt2_ppl_curve"]), None)
    return dense_c


def _ppl_table(results: dict, windows: int) -> List[str]:
    lines = [f"| model | WikiText-2 ppl (L=512, first {windows} windows) | full test | block phase "
             f"| end-to-end KD tokens | train min | training text |", "|---|---|---|---|---|---|---|"]
    for name, row in results["rows"].items():
        ppl = row.get(f"wt2_ppl_{windows}w")
        full = row.get("wt2_ppl_full")
        rc = row.get("recover_config") or {}
        block = ""
        if rc.get("block_epochs"):
            block = (f"{rc['block_windows']}x{rc['seq_len']} tokens x {rc['block_epochs']} ep., lr {rc['block_lr']:g}"
                     f" ({row.get('block_tokens', 0):,} block-token passes)")
        kd = f"{row['tokens']:,} (lr {rc.get('lr', 0):g})" if "tokens" in row else ""
        lines.append(f"| {name} | {ppl:.2f} | {'' if full is None else f'{full:.2f}'} | {block} | {kd} | "
                     f"{row.get('train_minutes', '')} | {row.get('source', '')} |" if ppl is not None
                     else f"| {name} | (not evaluated) ||||||")
    return lines


def _projection_lines(results: dict, dense_c: float, curve_windows: int) -> List[str]:
    """Fits each recovery curve (stored as the row's ``projection``) and says when it reaches 2x dense."""
    lines = []
    for name, row in results["rows"].items():
        if row.get("snapshot_of") or not row.get("curve") or (row.get("recover_config") or {}).get("gradual"):
            continue  # (a gradual run's curve spans several sparsities: no single power law)
        pj = projection(row["curve"], 2 * dense_c)
        if pj is None:
            continue
        row["projection"] = pj
        # average over the run's training time, block phase included
        tok_s = row["tokens"] / max(60 * row.get("train_minutes", 0), 1) if row.get("tokens") else None
        need = pj["tokens_to_target"]
        if need is None:
            when = "does not decrease"
        elif pj["last_ppl"] <= 2 * dense_c:
            when = "already reached"
        elif need > 1e11:
            when = "projected beyond 1e11 tokens (a nearly flat curve)"
        else:
            when = f"projected at {need:,.0f} tokens" + (
                f" (~{need / tok_s / 3600:,.1f} h of 2-core training at this run's average {tok_s:.0f} tokens/s)"
                if tok_s else "")
        lines.append(f"- *{name}*: ppl ~ tokens^{pj['exponent']:.3f} over {pj['points']} points "
                     f"(last {pj['last_ppl']:.1f} at {pj['last_tokens']:,} tokens); 2x dense "
                     f"({2 * dense_c:.1f} on these {curve_windows} windows) {when}")
    if not lines:
        return []
    return ["", f"Projection (power law fitted to the end-to-end distillation curve, WikiText-2 first "
            f"{curve_windows} windows; dense {dense_c:.2f}):", ""] + lines


def _zeroshot_table(results: dict) -> List[str]:
    """Accuracies and the margin kept (stored as the row's ``zeroshot_margin_kept`` / ``_tasks``)."""
    zs = [(n, r["zeroshot"]) for n, r in results["rows"].items() if "zeroshot" in r]
    if not zs:
        return []
    tasks = list(zs[0][1])
    dense_z = results["rows"].get("dense", {}).get("zeroshot")
    kept_tasks = [t for t in tasks if dense_z and t in dense_z and above_chance(dense_z, t)]
    dropped = [t for t in tasks if t not in kept_tasks]
    lines = ["", f"Zero-shot (first {zs[0][1][tasks[0]].get('n', '?')} items per task; acc_norm where defined, "
             "else acc; last column: mean over tasks of (acc - chance) / (dense acc - chance), over the tasks "
             "where dense is at least two standard errors above chance"
             + (f"; left out: {', '.join(dropped)}" if dropped else "") + ")", "",
             "| model | " + " | ".join(tasks) + " | margin above chance kept |",
             "|---|" + "---|" * (len(tasks) + 1)]
    for n, z in zs:
        cells = [f"{zeroshot_score(z, t):.3f}" for t in tasks]
        kept = margin_kept(z, dense_z, kept_tasks)
        cell = ""
        if kept is not None:
            fr = margin_fractions(z, dense_z, kept_tasks)
            cell = f"{100 * sum(fr) / len(fr):.0f}%"
            results["rows"][n]["zeroshot_margin_kept"] = kept
            results["rows"][n]["zeroshot_margin_tasks"] = kept_tasks
        lines.append(f"| {n} | " + " | ".join(cells) + f" | {cell} |")
    return lines


def _chat_lines(results: dict) -> List[str]:
    chats = [(n, r["chat"]) for n, r in results["rows"].items() if "chat" in r]
    if not chats:
        return []
    lines = ["", "Greedy answers (60 tokens max):", ""]
    for i, q in enumerate(CHAT_QUESTIONS):
        lines.append(f"**{q}**")
        for n, c in chats:
            lines.append(f"- *{n}*: {c[i]['answer'][:300]!r}")
        lines.append("")
    return lines


def recovery_table(results: dict, windows: int, curve_windows: int) -> str:
    """The Markdown report of ``results``: perplexity table, projections, zero-shot table, greedy answers.
    Stores the derived fields (``projection``, ``zeroshot_margin_kept``, ``zeroshot_margin_tasks``) in
    the rows."""
    lines = _ppl_table(results, windows)
    dense_c = dense_curve_ppl(results, curve_windows)
    if dense_c:
        lines += _projection_lines(results, dense_c, curve_windows)
    lines += _zeroshot_table(results)
    lines += _chat_lines(results)
    return "\n".join(lines)


def plot_recovery(results: dict, curve_windows: int, path: Path) -> None:
    """WikiText-2 perplexity of each recovery run against token passes (PNG), dense and 2x dense as lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for name, row in results["rows"].items():
        curve = [c for c in row.get("curve", []) if c["wt2_ppl_curve"] is not None and c["label"] != "teacher"
                 and not row.get("snapshot_of")]
        if curve:
            ax.plot([c["tokens"] + c["block_tokens"] for c in curve], [c["wt2_ppl_curve"] for c in curve], "o-",
                    label=name)
    dense = dense_curve_ppl(results, curve_windows)
    if dense:
        ax.axhline(dense, color="k", ls="--", label=f"dense ({curve_windows} windows)")
        ax.axhline(2 * dense, color="gray", ls=":", label="2x dense (target)")
    ax.set_yscale("log")
    ax.set_xlabel("token passes: block reconstruction (calibration tokens x blocks), then end-to-end KD tokens")
    ax.set_ylabel(f"WikiText-2 ppl (L=512, first {curve_windows} windows)")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_file(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)


def write_recovery_report(results: dict, results_dir: Path, tag: str, windows: int, curve_windows: int) -> str:
    """``recover_<tag>.md`` (and ``.png`` if matplotlib is installed) into ``results_dir``; returns the table."""
    table = recovery_table(results, windows, curve_windows)
    results_dir = Path(results_dir)
    atomic_write_text(results_dir / f"recover_{tag}.md", table + "\n")
    try:
        plot_recovery(results, curve_windows, results_dir / f"recover_{tag}.png")
    except ImportError:  # matplotlib is optional: no plot without it
        pass
    return table
