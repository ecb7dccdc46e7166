"""``ipu-sparse eval``: perplexity (WikiText-2, any text file), zero-shot tasks and the chat probe.

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
    p = sub.add_parser("eval", help="perplexity (WikiText-2 / a text file), zero-shot accuracy, chat probe",
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
    p.add_argument("--task-batch-size", type=int, default=16,
                   help="rows per forward for zero-shot (a row: one context and its continuations; default 16)")
    g = p.add_argument_group("chat")
    g.add_argument("--chat-probe", action="store_true",
                   help="short factual questions through the chat template, greedy: prints 'answers kept: k/n'")
    g.add_argument("--chat-probe-file", default=None, metavar="JSON", help="questions file (default: the shipped probe)")
    g.add_argument("--reference", default=None, metavar="MODEL",
                   help="score relative to this model (n = questions it gets right; k = those both get right)")
    g.add_argument("--chat-side-by-side", default=None, metavar="OUT.md",
                   help="write three longer answers of --reference and the model side by side (markdown)")
    g.add_argument("--verbose", action="store_true", help="per-question table of the chat probe")
    p.add_argument("--json", default=None, metavar="PATH", help="also write every number and setting as JSON")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --json / --chat-side-by-side file")
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
    probe = _check_chat_args(args)
    want_wt2 = args.wikitext2 or (not args.text and not tasks and probe is None and not args.chat_side_by_side)
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
            tk = r["tokens"]
            print(f"{t:<11} acc {r['acc']:.4f}{extra}  (n={r['n']}, limit={args.limit}, {r['seconds']:.1f} s, "
                  f"{tk['forward_tokens']} forward tokens for {tk['requests']} requests)")
    if probe is not None or args.chat_side_by_side:
        _chat(args, lm, probe, results)
    if args.json:
        atomic_write_text(args.json, json.dumps(results, indent=1), args.overwrite)
        print(f"wrote {args.json}", file=sys.stderr)
    return 0


def _check_chat_args(args):
    """Validate the chat options before any model is loaded; the probe's questions (or None)."""
    if args.reference and not (args.chat_probe or args.chat_side_by_side):
        raise UserError("--reference is used by --chat-probe and --chat-side-by-side; give one of them")
    if args.chat_side_by_side:
        if not args.reference:
            raise UserError("--chat-side-by-side needs --reference (the model to compare with)")
        check_output_path(args.chat_side_by_side, args.overwrite, directory=False)
    if args.chat_probe_file and not args.chat_probe:
        raise UserError("--chat-probe-file needs --chat-probe")
    if not args.chat_probe:
        return None
    from .chat import load_probe

    return load_probe(args.chat_probe_file)


def _chat(args, lm, probe, results: dict) -> None:
    """The chat probe and/or the side-by-side page; fills ``results["chat_probe"]``."""
    import argparse

    from .chat import LONG_PROMPTS, chat_answers, probe_table, run_probe, side_by_side_markdown

    ref = None
    if args.reference:
        ref = load_for_cli(argparse.Namespace(**dict(vars(args), model=args.reference))).model
    if probe is not None:
        ref_answers = None if ref is None else chat_answers(ref, lm.tokenizer, [it.question for it in probe])
        r = run_probe(lm.model, lm.tokenizer, probe, ref_answers)
        r["reference"] = args.reference
        results["chat_probe"] = r
        if args.verbose:
            print(probe_table(r))
        against = f" (questions {args.reference} gets right: {r['n']} of {r['questions']})" if ref is not None else ""
        print(f"answers kept: {r['k']}/{r['n']}{against}")
    if args.chat_side_by_side:
        n_new = 200
        ref_long = chat_answers(ref, lm.tokenizer, LONG_PROMPTS, n_new, skip_too_long=True)
        model_long = chat_answers(lm.model, lm.tokenizer, LONG_PROMPTS, n_new, skip_too_long=True)
        page = side_by_side_markdown(args.reference, args.model, LONG_PROMPTS, ref_long, model_long, n_new)
        atomic_write_text(args.chat_side_by_side, page, args.overwrite)
        print(f"wrote {args.chat_side_by_side}", file=sys.stderr)
