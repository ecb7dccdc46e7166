"""Recovery benchmark: SmolLM2-135M pruned one-shot, then recovered under fixed CPU-time budgets.

Rows: dense; one-shot (--method, --sparsity); one-shot + recovery at each budget in --budgets
(minutes of training, evaluation excluded); optionally gradual pruning + recovery (--gradual).
Columns: WikiText-2 perplexity (L=512, first --windows windows; --full adds the full test set),
zero-shot accuracies (--zeroshot-limit N per task, if > 0), tokens seen, minutes, text source.
Everything is cached/resumable under --work: the pruned checkpoint, the data-free text, each
recovery run (an interrupted run continues with `--resume` semantics), each evaluation.

Run heavy: flock /tmp/ipu_sparse_heavy.lock .venv/bin/python scripts/bench_recover.py --budgets 15,30,60
Writes results/recover_<tag>.json, results/recover_<tag>.md and results/recover_<tag>.png.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

QUESTIONS = (
    "What is the capital of France?",
    "Give me two tips for staying healthy.",
    "Explain in one sentence what a computer does.",
)


# chance accuracy of each zero-shot task (LAMBADA: open vocabulary, ~0)
CHANCE = {"lambada": 0.0, "hellaswag": 0.25, "piqa": 0.5, "arc_easy": 0.25, "winogrande": 0.5}


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def load_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def save_json(path: Path, data: dict) -> None:
    from ipu_sparse.checkpoint import atomic_write_text

    atomic_write_text(path, json.dumps(data, indent=1))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--method", default="sparsegpt", help="one-shot pruning method of the student")
    ap.add_argument("--sparsity", type=float, default=0.8)
    ap.add_argument("--student", default=None,
                    help="an existing pruned checkpoint to recover (instead of pruning with --method here)")
    ap.add_argument("--student-label", default=None, help="row name of --student (default: from its metadata)")
    ap.add_argument("--snapshots", default="", help="e.g. 15,30: also evaluate the longest run's student as it "
                    "was after these training minutes (rows marked as snapshots of that run)")
    ap.add_argument("--budgets", default="15,30,60", help="recovery budgets in minutes (comma-separated)")
    ap.add_argument("--gradual", default="", help="e.g. 0.5,0.65: also run gradual pruning + recovery")
    ap.add_argument("--gradual-minutes", type=float, default=60.0)
    ap.add_argument("--text", nargs="+", default=None, help="training text (default: data-free self-distillation)")
    ap.add_argument("--selfdistill-tokens", type=int, default=60_000)
    ap.add_argument("--mix-selfdistill", type=float, default=0.0,
                    help="with --text: data-free (teacher-written chat) windows as this fraction of the training windows")
    ap.add_argument("--block-epochs", type=int, default=1)
    ap.add_argument("--block-windows", type=int, default=32)
    ap.add_argument("--block-batch", type=int, default=2)
    ap.add_argument("--block-lr", type=float, default=2e-4)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--grad-accum", type=int, default=1)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--hidden-weight", type=float, default=0.0)
    ap.add_argument("--bf16", action="store_true")
    ap.add_argument("--heldout-windows", type=int, default=4, help="held-out windows of the training text")
    ap.add_argument("--eval-every", type=int, default=20, help="steps between curve points")
    ap.add_argument("--curve-windows", type=int, default=8, help="WikiText-2 windows per curve point (0: none)")
    ap.add_argument("--windows", type=int, default=40, help="WikiText-2 windows of the table (quick protocol)")
    ap.add_argument("--full", action="store_true", help="also the full WikiText-2 test set")
    ap.add_argument("--zeroshot-limit", type=int, default=0, help="items per zero-shot task (0: skip)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--work", default=os.path.join(os.path.expanduser("~"), ".cache", "ipu_sparse", "recover-bench"),
                    help="cache of checkpoints, text and runs (large: kept out of the repository)")
    ap.add_argument("--report-only", action="store_true", help="rewrite the table/plot from the JSON, run nothing")
    ap.add_argument("--variant", default="", help="label of this recovery setting (row names and run directories)")
    ap.add_argument("--tag", default=None, help="output name (default: smollm2_<method><sparsity>)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from ipu_sparse.checkpoint import save_dense_checkpoint
    from ipu_sparse.eval.perplexity import wikitext2_ids, windows_ppl
    from ipu_sparse.loading import load_model
    from ipu_sparse.recover.data import SelfDistillConfig, build_windows
    from ipu_sparse.recover.masks import masks_of_loaded
    from ipu_sparse.recover.train import RecoverConfig, Recovery

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    tag = args.tag or f"smollm2_{args.method}{int(round(args.sparsity * 100))}"
    res_path = ROOT / "results" / f"recover_{tag}.json"
    results = load_json(res_path)
    results.setdefault("rows", {})
    if args.report_only:
        write_outputs(results, tag, args)
        save_json(res_path, results)  # with the derived projection / zero-shot margin fields
        return 0
    results["settings"] = vars(args)

    teacher_l = load_model(args.model, device=args.device)
    teacher, tok = teacher_l.model, teacher_l.tokenizer
    wt_ids = wikitext2_ids(tok)

    def wt_ppl(model, n):
        return windows_ppl(model, wt_ids, 512, n, 4, source="wikitext-2 test", progress=False).ppl

    def evaluate(model, name, quick=False):
        """The table's quick perplexity, zero-shot if asked, and unless ``quick`` (snapshots) --full."""
        row = results["rows"].setdefault(name, {})
        if f"wt2_ppl_{args.windows}w" not in row:
            t0 = time.time()
            row[f"wt2_ppl_{args.windows}w"] = wt_ppl(model, args.windows)
            log(f"{name}: WikiText-2 ppl (L=512, {args.windows} windows) {row[f'wt2_ppl_{args.windows}w']:.2f} "
                f"({time.time() - t0:.0f} s)")
        if args.full and not quick and "wt2_ppl_full" not in row:
            row["wt2_ppl_full"] = wt_ppl(model, None)
        if args.zeroshot_limit and row.get("zeroshot_limit") != args.zeroshot_limit:
            from ipu_sparse.eval.zeroshot import TASKS, evaluate_tasks

            row["zeroshot"] = evaluate_tasks(model, tok, TASKS, limit=args.zeroshot_limit, progress=False)
            row["zeroshot_limit"] = args.zeroshot_limit
        save_json(res_path, results)
        return row

    def chat(model):
        from ipu_sparse.generate import generate

        out = []
        for q in QUESTIONS:
            ids = tok.encode(tok.apply_chat_template([{"role": "user", "content": q}]))
            ans = generate(model, ids, 60, stop_ids=tok.stop_ids)
            out.append({"question": q, "answer": tok.decode(ans).strip()})
        return out

    reuse_dense_evaluations(results, args.model, args.zeroshot_limit, res_path)
    evaluate(teacher, "dense")
    if args.curve_windows and f"wt2_ppl_{args.curve_windows}w" not in results["rows"]["dense"]:
        results["rows"]["dense"][f"wt2_ppl_{args.curve_windows}w"] = wt_ppl(teacher, args.curve_windows)
    if "chat" not in results["rows"]["dense"]:
        results["rows"]["dense"]["chat"] = chat(teacher)

    # one-shot pruned student (cached checkpoint, or --student)
    pruned_dir = Path(args.student) if args.student else work / f"pruned-{args.method}-{args.sparsity}"
    if not pruned_dir.is_dir():
        from ipu_sparse.prune.api import prune_

        student = load_model(args.model, device=args.device)
        t0 = time.time()
        info = prune_(student.model, method=args.method, sparsity=args.sparsity, tokenizer=tok, progress=True)
        log(f"pruned with {args.method} to {args.sparsity} in {time.time() - t0:.0f} s")
        save_dense_checkpoint(student.model, tok, pruned_dir,
                              extra_meta={"pruning": {k: v for k, v in info.items() if k != "report"}})
    oneshot = args.student_label or f"one-shot {args.method} {args.sparsity:.0%}"
    student_l = load_model(str(pruned_dir), device=args.device)
    evaluate(student_l.model, oneshot)

    sd = SelfDistillConfig(n_tokens=args.selfdistill_tokens)
    windows = build_windows(tok, 512, args.batch_size, args.heldout_windows, texts=args.text, teacher=teacher,
                            cache_dir=work / "data", selfdistill=sd, progress=True, mix_selfdistill=args.mix_selfdistill)
    source = "user text: " + windows.source if args.text else f"data-free (teacher-written, {windows.n_tokens:,} tokens)"
    log(f"training text: {source}")

    def extra_eval(model):
        return {"x_wt2_ppl": wt_ppl(model, args.curve_windows)} if args.curve_windows else {}

    snapshots = tuple(float(m) for m in args.snapshots.split(",") if m.strip())

    def recover(name, run_dir, minutes, masks, student_model, gradual=(), snap=()):
        cfg = RecoverConfig(seq_len=512, batch_size=args.batch_size, grad_accum=args.grad_accum, lr=args.lr,
                            temperature=args.temperature, hidden_weight=args.hidden_weight,
                            block_epochs=args.block_epochs, block_windows=args.block_windows,
                            block_batch=args.block_batch, block_lr=args.block_lr, bf16=args.bf16,
                            gradual=tuple(gradual), target_sparsity=args.sparsity if gradual else None,
                            prune_method=args.method, max_minutes=minutes, eval_every=args.eval_every,
                            heldout_windows=args.heldout_windows, save_every_minutes=5,
                            snapshot_minutes=tuple(m for m in snap if m < minutes))
        resume = (run_dir / "train_state.pt").is_file()
        run = Recovery(teacher, student_model, tok, windows, cfg, run_dir, masks=masks, resume=resume,
                       progress=True, student_source=name, extra_eval=extra_eval)
        summary = run.run()
        row = results["rows"].setdefault(name, {})
        if row.get("tokens") != summary["tokens"] or row.get("block_tokens") != summary["block_tokens"]:
            for k in list(row):
                if k.startswith("wt2") or k in ("zeroshot", "chat"):
                    row.pop(k)
        row.update({"tokens": summary["tokens"], "block_tokens": summary["block_tokens"],
                    "train_minutes": round(summary["elapsed_s"] / 60, 2), "finished": summary["finished"],
                    "source": source, "run_dir": str(run_dir), "sparsity": summary["sparsity"],
                    "recover_config": {k: v for k, v in vars(cfg).items()},
                    "curve": [{"tokens": h["tokens"], "block_tokens": h.get("block_tokens", 0),
                               "wt2_ppl_curve": h.get("x_wt2_ppl"), "heldout_ppl": h["heldout_ppl"],
                               "label": h["eval"]} for h in run.state["history"] if "eval" in h]})
        evaluate(run.student, name)
        if "chat" not in row:
            row["chat"] = chat(run.student)
        save_json(res_path, results)
        for m, info in sorted(run.state.get("snapshots", {}).items(), key=lambda kv: float(kv[0])):
            sname = f"{name} (snapshot at {float(m):g} min)"
            srow = results["rows"].setdefault(sname, {})
            srow.update({"tokens": info["tokens"], "block_tokens": info["block_tokens"],
                         "train_minutes": round(info["elapsed_s"] / 60, 2), "source": source,
                         "recover_config": row["recover_config"], "snapshot_of": name})
            snap_model = load_model(str(run.snapshot_dir(float(m))), device=args.device).model
            evaluate(snap_model, sname, quick=True)
            if "chat" not in srow:
                srow["chat"] = chat(snap_model)
            save_json(res_path, results)

    budgets = [float(b) for b in args.budgets.split(",") if b.strip()]
    for minutes in budgets:
        student_l = load_model(str(pruned_dir), device=args.device)
        masks = masks_of_loaded(student_l)
        v = f" [{args.variant}]" if args.variant else ""
        recover(f"{oneshot} + recovery {minutes:g} min{v}", work / f"run-{tag}-{minutes:g}min{args.variant}",
                minutes, masks, student_l.model, snap=snapshots if minutes == max(budgets) else ())
    if args.gradual:
        steps = [float(x) for x in args.gradual.split(",")]
        dense_student = load_model(args.model, device=args.device)
        recover(f"gradual {args.gradual}->{args.sparsity:g} ({args.method}) + recovery {args.gradual_minutes:g} min",
                work / f"run-{tag}-gradual-{args.gradual_minutes:g}min",
                args.gradual_minutes, None, dense_student.model, gradual=steps)

    write_outputs(results, tag, args)
    return 0


def reuse_dense_evaluations(results: dict, model: str, zeroshot_limit: int, res_path: Path) -> None:
    """Copy the dense model's evaluations (deterministic) from the other recovery results files of the same
    model, so that the teacher's full test set and zero-shot tasks are computed once for all tags."""
    dense = results["rows"].setdefault("dense", {})
    for other in sorted((ROOT / "results").glob("recover_*.json")):
        if other == res_path:
            continue
        data = load_json(other)
        if data.get("settings", {}).get("model") != model:
            continue
        src = data.get("rows", {}).get("dense", {})
        for k, v in src.items():
            if k.startswith("wt2_ppl_") or k == "chat":
                dense.setdefault(k, v)
        if zeroshot_limit and src.get("zeroshot_limit") == zeroshot_limit and "zeroshot" not in dense:
            dense["zeroshot"], dense["zeroshot_limit"] = src["zeroshot"], src.get("zeroshot_limit")


def projection(curve, target: float):
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
    out["tokens_to_target"] = math.exp((math.log(target) - a) / b) if b < 0 else None
    return out


def write_outputs(results: dict, tag: str, args) -> None:
    w = args.windows
    lines = [f"| model | WikiText-2 ppl (L=512, first {w} windows) | full test | block phase | end-to-end KD tokens "
             f"| train min | training text |", "|---|---|---|---|---|---|---|"]
    for name, row in results["rows"].items():
        ppl = row.get(f"wt2_ppl_{w}w")
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
    dense_c = results.get("rows", {}).get("dense", {}).get(f"wt2_ppl_{args.curve_windows}w")
    if not dense_c:  # the teacher's point recorded at the start of each run's curve
        dense_c = next((c["wt2_ppl_curve"] for r in results.get("rows", {}).values() for c in r.get("curve", [])
                        if c["label"] == "teacher" and c["wt2_ppl_curve"]), None)
    if dense_c:
        proj_lines = []
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
            proj_lines.append(f"- *{name}*: ppl ~ tokens^{pj['exponent']:.3f} over {pj['points']} points "
                              f"(last {pj['last_ppl']:.1f} at {pj['last_tokens']:,} tokens); 2x dense "
                              f"({2 * dense_c:.1f} on these {args.curve_windows} windows) {when}")
        if proj_lines:
            lines += ["", f"Projection (power law fitted to the end-to-end distillation curve, WikiText-2 first "
                      f"{args.curve_windows} windows; dense {dense_c:.2f}):", ""] + proj_lines
    zs = [(n, r["zeroshot"]) for n, r in results["rows"].items() if "zeroshot" in r]
    if zs:
        tasks = list(zs[0][1])
        dense_z = results["rows"].get("dense", {}).get("zeroshot")

        def score(z, t):
            return z[t].get("acc_norm", z[t].get("acc"))

        def significant(t):
            """dense is above chance by at least two standard errors of its accuracy on these items"""
            acc, n = score(dense_z, t), dense_z[t].get("n") or 1
            return acc - CHANCE.get(t, 0.0) >= 2 * math.sqrt(max(acc * (1 - acc), 1e-12) / n)

        kept_tasks = [t for t in tasks if dense_z and t in dense_z and significant(t)]
        dropped = [t for t in tasks if t not in kept_tasks]
        lines += ["", f"Zero-shot (first {zs[0][1][tasks[0]].get('n', '?')} items per task; acc_norm where defined, "
                  "else acc; last column: mean over tasks of (acc - chance) / (dense acc - chance), over the tasks "
                  "where dense is at least two standard errors above chance"
                  + (f"; left out: {', '.join(dropped)}" if dropped else "") + ")", "",
                  "| model | " + " | ".join(tasks) + " | margin above chance kept |",
                  "|---|" + "---|" * (len(tasks) + 1)]
        for n, z in zs:
            cells = [f"{score(z, t):.3f}" for t in tasks]
            kept = ""
            fr = [(score(z, t) - CHANCE.get(t, 0.0)) / (score(dense_z, t) - CHANCE.get(t, 0.0)) for t in kept_tasks
                  if t in z]
            if fr and len(fr) == len(kept_tasks):
                kept = f"{100 * sum(fr) / len(fr):.0f}%"
                results["rows"][n]["zeroshot_margin_kept"] = sum(fr) / len(fr)
                results["rows"][n]["zeroshot_margin_tasks"] = kept_tasks
            lines.append(f"| {n} | " + " | ".join(cells) + f" | {kept} |")
    chats = [(n, r["chat"]) for n, r in results["rows"].items() if "chat" in r]
    if chats:
        lines += ["", "Greedy answers (60 tokens max):", ""]
        for i, q in enumerate(QUESTIONS):
            lines.append(f"**{q}**")
            for n, c in chats:
                lines.append(f"- *{n}*: {c[i]['answer'][:300]!r}")
            lines.append("")
    table = "\n".join(lines)
    print(table)
    from ipu_sparse.checkpoint import atomic_write_text

    atomic_write_text(ROOT / "results" / f"recover_{tag}.md", table + "\n")
    try:
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
        cw = args.curve_windows
        dense = dense_c
        if dense:
            ax.axhline(dense, color="k", ls="--", label=f"dense ({cw} windows)")
            ax.axhline(2 * dense, color="gray", ls=":", label="2x dense (target)")
        ax.set_yscale("log")
        ax.set_xlabel("token passes: block reconstruction (calibration tokens x blocks), then end-to-end KD tokens")
        ax.set_ylabel(f"WikiText-2 ppl (L=512, first {args.curve_windows} windows)")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(ROOT / "results" / f"recover_{tag}.png", dpi=110)
    except ImportError:
        pass


if __name__ == "__main__":
    sys.exit(main())
