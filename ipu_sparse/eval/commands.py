"""``ipu-sparse eval``: perplexity (WikiText-2, any text file) and zero-shot tasks.

Handlers import the modules they run (models, loaders, kernels) inside the function, so
`ipu-sparse --help` and argument errors stay fast; everything else is imported at the top.
"""
from __future__ import annotations

import json
import sys

from ..commands import add_model_args, load_for_cli
from ..errors import UserError
from ..fileio import atomic_write_text, check_output_path


def register(sub) -> None:
    p = sub.add_parser("eval", help="perplexity (WikiText-2 / a text file) and zero-shot accuracy",
                       description="Evaluate a preset, .gguf file or checkpoint directory. With no selection, "
                                   "WikiText-2 perplexity is measured.")
    add_model_args(p)
    p.add_argument("--wikitext2", action="store_true", help="WikiText-2 test perplexity (rows joined with \\n\\n)")
    p.add_argument("--wikitext2-path", default=None, help="WikiText-2 raw test file (default ../shared/data/wikitext-2/wiki.test.raw)")
    p.add_argument("--text", default=None, metavar="FILE", help="perplexity of a UTF-8 text file")
    p.add_argument("--tasks", default=None, help="comma list of lambada,hellaswag,piqa,arc_easy,winogrande (or 'all')")
    p.add_argument("--limit", type=int, default=None, help="first N items of each task")
    p.add_argument("--seq-len", type=int, default=512, help="perplexity window length L (default 512)")
    p.add_argument("--max-windows", type=int, default=None, help="only the first N windows (quick runs)")
    p.add_argument("--batch-size", type=int, default=4, help="windows per batch for perplexity (default 4)")
    p.add_argument("--task-batch-size", type=int, default=16, help="requests per batch for zero-shot (default 16)")
    p.add_argument("--json", default=None, metavar="PATH", help="also write every number and setting as JSON")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --json file")
    p.set_defaults(func=cmd_eval)


def cmd_eval(args) -> int:
    from .zeroshot import TASKS

    tasks = []
    if args.tasks:
        tasks = list(TASKS) if args.tasks.strip() == "all" else [t.strip() for t in args.tasks.split(",") if t.strip()]
        unknown = [t for t in tasks if t not in TASKS]
        if unknown:
            raise UserError(f"unknown task(s) {', '.join(unknown)} (choose from {', '.join(TASKS)}, or all)")
    if args.text:
        from pathlib import Path

        if not Path(args.text).is_file():
            raise UserError(f"{args.text}: text file not found")
    if args.json:
        check_output_path(args.json, args.overwrite, directory=False)
    want_wt2 = args.wikitext2 or (not args.text and not tasks)
    lm = load_for_cli(args)
    model, tok = lm.model, lm.tokenizer
    if want_wt2 or args.text:
        model.config.check_context(args.seq_len, "--seq-len")
    results = {"model": args.model, "settings": {"seq_len": args.seq_len, "max_windows": args.max_windows,
                                                  "limit": args.limit, "dtype": args.dtype, "tasks": tasks}}
    if lm.meta and "pruning" in lm.meta:
        results["pruning"] = lm.meta["pruning"]
    if want_wt2:
        from .perplexity import wikitext2_ppl

        r = wikitext2_ppl(model, tok, args.wikitext2_path, args.seq_len, args.max_windows, args.batch_size)
        results["wikitext2"] = r.to_dict()
        print(f"wikitext2 ppl {r.ppl:.3f}  (L={r.seq_len}, windows={r.windows}, tokens={r.tokens}, {r.seconds:.1f} s)")
    if args.text:
        from .perplexity import text_ppl

        r = text_ppl(model, tok, args.text, args.seq_len, args.max_windows, args.batch_size)
        results["text"] = r.to_dict()
        print(f"{args.text} ppl {r.ppl:.3f}  (L={r.seq_len}, windows={r.windows}, tokens={r.tokens}, {r.seconds:.1f} s)")
    if tasks:
        from .zeroshot import evaluate_task

        results["tasks"] = {}
        for t in tasks:
            r = evaluate_task(model, tok, t, args.limit, args.task_batch_size)
            results["tasks"][t] = r
            extra = f" acc_norm {r['acc_norm']:.4f}" if "acc_norm" in r else ""
            print(f"{t:<11} acc {r['acc']:.4f}{extra}  (n={r['n']}, limit={args.limit}, {r['seconds']:.1f} s)")
    if args.json:
        atomic_write_text(args.json, json.dumps(results, indent=1), args.overwrite)
        print(f"wrote {args.json}", file=sys.stderr)
    return 0
