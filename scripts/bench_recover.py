"""Recovery benchmark: SmolLM2-135M pruned one-shot, then recovered under fixed CPU-time budgets.

Rows: dense; one-shot (--prune-method, --sparsity); one-shot + recovery at each budget in --budgets
(minutes of training, evaluation excluded); optionally gradual pruning + recovery (--gradual, in
--gradual-minutes). Columns: WikiText-2 perplexity (L=512, first --windows windows; --full adds the
full test set), zero-shot accuracies (--zeroshot-limit N per task, if > 0), tokens seen, minutes, text
source. Every option of `ipu-sparse recover` applies to each run (--snapshot-minutes to the longest
one); --prune-method is also the one-shot method. Everything is cached/resumable under --work: the
pruned checkpoint, the data-free text, each recovery run (an interrupted run continues where it
stopped), each evaluation. The report (ipu_sparse.eval.report) is rewritten from the JSON at the end,
or alone with --report-only.

    .venv/bin/python scripts/bench_recover.py --budgets 15,30,60
    .venv/bin/python scripts/bench_recover.py --report-only --tag smollm2_improved80

Writes results/recover_<tag>.json, results/recover_<tag>.md and results/recover_<tag>.png.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

from ipu_sparse.checkpoint import save_dense_checkpoint
from ipu_sparse.eval.chat import chat_answers
from ipu_sparse.eval.perplexity import wikitext2_ids, windows_ppl
from ipu_sparse.eval.report import (CHAT_QUESTIONS, load_results, reuse_dense_evaluations, save_results,
                                    write_recovery_report)
from ipu_sparse.eval.unseen import fiction_ppl
from ipu_sparse.eval.zeroshot import TASKS, evaluate_tasks
from ipu_sparse.loading import load_model
from ipu_sparse.prune import PruneConfig, prune_
from ipu_sparse.recover.commands import add_training_arguments, config_from_args, training_windows
from ipu_sparse.recover.masks import masks_of_loaded
from ipu_sparse.recover.run_io import STATE_FILE
from ipu_sparse.recover.teacher_cache import prepare_teacher_cache
from ipu_sparse.recover.train import Recovery

RESULTS = Path(__file__).resolve().parents[1] / "results"


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m", help="the dense model: teacher, and pruned for the student")
    ap.add_argument("--student", default=None,
                    help="an existing pruned checkpoint to recover (instead of pruning --model here)")
    ap.add_argument("--student-label", default=None, help="row name of --student (default: from its metadata)")
    ap.add_argument("--budgets", default="15,30,60", help="recovery budgets in minutes (comma-separated)")
    ap.add_argument("--gradual-minutes", type=float, default=60.0, help="budget of the --gradual run")
    ap.add_argument("--curve-windows", type=int, default=8, help="WikiText-2 windows per curve point (0: none)")
    ap.add_argument("--windows", type=int, default=40, help="WikiText-2 windows of the table (quick protocol)")
    ap.add_argument("--full", action="store_true", help="also the full WikiText-2 test set")
    ap.add_argument("--zeroshot-limit", type=int, default=0, help="items per zero-shot task (0: skip)")
    ap.add_argument("--work", default=os.path.join(os.path.expanduser("~"), ".cache", "ipu_sparse", "recover-bench"),
                    help="cache of checkpoints, text and runs (large: kept out of the repository)")
    ap.add_argument("--results", default=str(RESULTS), help="directory of the results files")
    ap.add_argument("--report-only", action="store_true", help="rewrite the table/plot from the JSON, run nothing")
    ap.add_argument("--variant", default="", help="label of this recovery setting (row names and run directories)")
    ap.add_argument("--tag", default=None, help="output name (default: smollm2_<prune-method><sparsity>)")
    add_training_arguments(ap)
    ap.set_defaults(prune_method="sparsegpt", sparsity=0.8, selfdistill_tokens=60_000, block_epochs=1,
                    heldout_windows=4, eval_every=20, save_every_minutes=5.0, data_cache=None)
    return ap


class Bench:
    """The rows of one results file: evaluations cached in it, saved after each."""

    def __init__(self, args, res_path: Path, results: dict, teacher, tok):
        self.args, self.res_path, self.results = args, res_path, results
        self.teacher, self.tok = teacher, tok
        self.wt_ids = wikitext2_ids(tok)
        self.teacher_cache = None  # a TeacherCache of the training windows with --teacher-cache

    def wt_ppl(self, model, n):
        return windows_ppl(model, self.wt_ids, 512, n, 4, source="wikitext-2 test", progress=False).ppl

    def save(self) -> None:
        save_results(self.res_path, self.results)

    def evaluate(self, model, name, quick=False) -> dict:
        """The table's quick perplexity, zero-shot if asked, and unless ``quick`` (snapshots) --full."""
        args = self.args
        row = self.results["rows"].setdefault(name, {})
        if f"wt2_ppl_{args.windows}w" not in row:
            t0 = time.time()
            row[f"wt2_ppl_{args.windows}w"] = self.wt_ppl(model, args.windows)
            log(f"{name}: WikiText-2 ppl (L=512, {args.windows} windows) {row[f'wt2_ppl_{args.windows}w']:.2f} "
                f"({time.time() - t0:.0f} s)")
        if args.unseen_passages and row.get("unseen_passages") != args.unseen_passages:
            row["unseen_ppl"] = fiction_ppl(model, self.tok, args.unseen_passages).ppl  # text never trained on
            row["unseen_passages"] = args.unseen_passages
        if args.full and not quick and "wt2_ppl_full" not in row:
            row["wt2_ppl_full"] = self.wt_ppl(model, None)
        if args.zeroshot_limit and row.get("zeroshot_limit") != args.zeroshot_limit:
            row["zeroshot"] = evaluate_tasks(model, self.tok, TASKS, limit=args.zeroshot_limit, progress=False)
            row["zeroshot_limit"] = args.zeroshot_limit
        self.save()
        return row

    def chat(self, model) -> list:
        answers = chat_answers(model, self.tok, CHAT_QUESTIONS, 60)
        return [{"question": q, "answer": a} for q, a in zip(CHAT_QUESTIONS, answers)]

    def recover(self, name, run_dir: Path, cfg, windows, source, masks, student_model) -> None:
        """One recovery run (resumed if ``run_dir`` holds one) and its row, with its snapshots' rows."""
        args = self.args

        def extra_eval(model):
            return {"x_wt2_ppl": self.wt_ppl(model, args.curve_windows)} if args.curve_windows else {}

        run = Recovery(self.teacher, student_model, self.tok, windows, cfg, run_dir, masks=masks,
                       resume=(run_dir / STATE_FILE).is_file(), progress=not args.no_progress, student_source=name,
                       extra_eval=extra_eval, teacher_cache=self.teacher_cache)
        summary = run.run()
        row = self.results["rows"].setdefault(name, {})
        if row.get("tokens") != summary["tokens"] or row.get("block_tokens") != summary["block_tokens"]:
            for k in list(row):
                if k.startswith("wt2") or k in ("zeroshot", "chat", "unseen_ppl", "unseen_passages"):
                    row.pop(k)
        row.update({"tokens": summary["tokens"], "block_tokens": summary["block_tokens"],
                    "train_minutes": round(summary["elapsed_s"] / 60, 2), "finished": summary["finished"],
                    "source": source, "run_dir": str(run_dir), "sparsity": summary["sparsity"],
                    "recover_config": {k: v for k, v in vars(cfg).items()},
                    "curve": [{"tokens": h["tokens"], "block_tokens": h.get("block_tokens", 0),
                               "wt2_ppl_curve": h.get("x_wt2_ppl"), "heldout_ppl": h["heldout_ppl"],
                               "unseen_ppl": h.get("unseen_ppl"),
                               "label": h["eval"]} for h in run.state.history if "eval" in h]})
        self.evaluate(run.student, name)
        if "chat" not in row:
            row["chat"] = self.chat(run.student)
        self.save()
        for m, info in sorted(run.state.snapshots.items(), key=lambda kv: float(kv[0])):
            sname = f"{name} (snapshot at {float(m):g} min)"
            srow = self.results["rows"].setdefault(sname, {})
            srow.update({"tokens": info["tokens"], "block_tokens": info["block_tokens"],
                         "train_minutes": round(info["elapsed_s"] / 60, 2), "source": source,
                         "recover_config": row["recover_config"], "snapshot_of": name})
            snap_model = load_model(str(run.snapshot_dir(float(m))), device=args.device).model
            self.evaluate(snap_model, sname, quick=True)
            if "chat" not in srow:
                srow["chat"] = self.chat(snap_model)
            self.save()


def pruned_student(args, work: Path, tok) -> Path:
    """--student, or --model pruned one-shot with --prune-method to --sparsity (cached under --work)."""
    pruned_dir = Path(args.student) if args.student else work / f"pruned-{args.prune_method}-{args.sparsity}"
    if not pruned_dir.is_dir():
        student = load_model(args.model, device=args.device)
        t0 = time.time()
        info = prune_(student.model, PruneConfig(method=args.prune_method, sparsity=args.sparsity), tokenizer=tok,
                      progress=True)
        log(f"pruned with {args.prune_method} to {args.sparsity} in {time.time() - t0:.0f} s")
        save_dense_checkpoint(student.model, tok, pruned_dir,
                              extra_meta={"pruning": {k: v for k, v in info.items() if k != "report"}})
    return pruned_dir


def main() -> int:
    args = build_parser().parse_args()
    tag = args.tag or f"smollm2_{args.prune_method}{int(round(args.sparsity * 100))}"
    res_path = Path(args.results) / f"recover_{tag}.json"
    results = load_results(res_path)
    results.setdefault("rows", {})
    if not args.report_only:
        run_all(args, tag, res_path, results)
    print(write_recovery_report(results, Path(args.results), tag, args.windows, args.curve_windows))
    save_results(res_path, results)  # with the derived projection / zero-shot margin fields
    return 0


def run_all(args, tag: str, res_path: Path, results: dict) -> None:
    if args.threads:
        torch.set_num_threads(args.threads)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    results["settings"] = vars(args)
    teacher_l = load_model(args.model, device=args.device)
    bench = Bench(args, res_path, results, teacher_l.model, teacher_l.tokenizer)
    tok = bench.tok

    reuse_dense_evaluations(results, args.model, args.zeroshot_limit, res_path)
    dense = bench.evaluate(bench.teacher, "dense")
    if args.curve_windows and f"wt2_ppl_{args.curve_windows}w" not in dense:
        dense[f"wt2_ppl_{args.curve_windows}w"] = bench.wt_ppl(bench.teacher, args.curve_windows)
    if "chat" not in dense:
        dense["chat"] = bench.chat(bench.teacher)

    pruned_dir = pruned_student(args, work, tok)
    oneshot = args.student_label or f"one-shot {args.prune_method} {args.sparsity:.0%}"
    bench.evaluate(load_model(str(pruned_dir), device=args.device).model, oneshot)

    args.data_cache = args.data_cache or str(work / "data")
    cfg0 = config_from_args(args)
    windows = training_windows(args, cfg0, tok, bench.teacher)
    if args.teacher_cache:  # the teacher's top-k outputs on the training windows, computed once for every run
        bench.teacher_cache = prepare_teacher_cache(args.teacher_cache, bench.teacher, windows, cfg0.teacher_topk,
                                                    cfg0.temperature, bf16=cfg0.bf16, hidden=cfg0.hidden_weight > 0,
                                                    batch_size=cfg0.batch_size, progress=not args.no_progress, log=log)
    source = ("user text: " + windows.source if args.text
              else windows.source if args.text_mix or args.kd_answers_only
              else f"data-free (teacher-written, {windows.n_tokens:,} tokens)")
    log(f"training text: {source}")

    budgets = [float(b) for b in args.budgets.split(",") if b.strip()]
    v = f" [{args.variant}]" if args.variant else ""
    for minutes in budgets:
        student_l = load_model(str(pruned_dir), device=args.device)
        snap = args.snapshot_minutes if minutes == max(budgets) else ()
        cfg = config_from_args(args, max_minutes=minutes, gradual=(), target_sparsity=None,
                               snapshot_minutes=tuple(m for m in snap if m < minutes))
        bench.recover(f"{oneshot} + recovery {minutes:g} min{v}", work / f"run-{tag}-{minutes:g}min{args.variant}",
                      cfg, windows, source, masks_of_loaded(student_l), student_l.model)
    if args.gradual:
        steps = ",".join(f"{s:g}" for s in args.gradual)
        cfg = config_from_args(args, max_minutes=args.gradual_minutes, snapshot_minutes=())
        name = f"gradual {steps}->{args.sparsity:g} ({args.prune_method}) + recovery {args.gradual_minutes:g} min"
        bench.recover(name, work / f"run-{tag}-gradual-{args.gradual_minutes:g}min", cfg, windows, source, None,
                      load_model(args.model, device=args.device).model)


if __name__ == "__main__":
    sys.exit(main())
