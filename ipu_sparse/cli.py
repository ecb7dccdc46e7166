"""The ``ipu-sparse`` command line.

Each concern registers its own subcommands from a small ``commands`` module
(argument definitions only; heavy imports happen inside the handlers), so adding a
capability never means editing a long central file.
"""
from __future__ import annotations

import argparse
import math
import sys
from typing import List, Optional

from . import __version__
from . import commands as core_commands
from .config import describe_presets
from .errors import UserError
from .eval import commands as eval_commands
from .ipu import commands as ipu_commands
from .prune import commands as prune_commands
from .recover import commands as recover_commands
from .serve import commands as serve_commands
from .sparse import commands as sparse_commands

# Modules with ``register(subparsers)``; listed in the order the help shows them.
COMMAND_MODULES = (
    core_commands,     # generate, chat, info
    prune_commands,    # prune
    eval_commands,     # eval
    sparse_commands,   # sparsify, inspect, account
    recover_commands,  # recover
    ipu_commands,      # plan, simulate, ipu
    serve_commands,    # serve
)


class OneLineParser(argparse.ArgumentParser):
    """An argument parser whose errors are one line (the usage is one ``--help`` away), exit code 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


# Lower bounds of integer options, by destination name, for every subcommand that has them.
INT_MINIMUM = {
    "threads": 1, "max_new_tokens": 0, "limit": 1, "max_windows": 1, "context": 1, "kv_len": 1, "seq_len": 1,
    "prompt_len": 1, "ipus": 1, "batch": 1, "batch_size": 1, "task_batch_size": 1, "nsamples": 1,
    "owl_nsamples": 1, "blocksize": 1, "refit_iters": 0, "top_k": 0, "steps": 1, "max_tokens": 1,
    "embed_shards": 1, "head_shards": 1, "heldout_windows": 1, "grad_accum": 1,
    "alloc_nsamples": 1, "recon_steps": 0, "recon_batch": 1,
}
SEED_LIMIT = 2 ** 63  # torch generators take 64-bit seeds


def _option_names(parser: argparse.ArgumentParser, command: Optional[str]):
    """dest -> the option string a user typed for it (``--max-new-tokens``), for ``command``'s parser."""
    names = {}
    parsers = [parser]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction) and command in action.choices:
            parsers.append(action.choices[command])
    for p in parsers:
        for action in p._actions:
            if action.option_strings:
                names[action.dest] = max(action.option_strings, key=len)
    return names


def check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Checks that hold for every subcommand: numbers are finite, counts are in range, seeds fit
    64 bits. Raises ``UserError`` naming the option and the value."""
    names = _option_names(parser, getattr(args, "command", None))
    for dest, value in vars(args).items():
        flag = names.get(dest, dest)
        values = value if isinstance(value, (list, tuple)) else [value]
        for v in values:
            if isinstance(v, float) and not math.isfinite(v):
                raise UserError(f"{flag} {v}: not a finite number")
        if isinstance(value, bool) or not isinstance(value, int):
            continue
        if dest == "seed" and not 0 <= value < SEED_LIMIT:
            raise UserError(f"{flag} {value}: must be in [0, 2**63)")
        if dest in INT_MINIMUM and value < INT_MINIMUM[dest]:
            raise UserError(f"{flag} {value}: must be >= {INT_MINIMUM[dest]}")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="ipu-sparse",
        description="80%-sparse language models: prune, store, evaluate, run on CPU, plan and run on IPUs.",
        epilog="model presets (--model NAME, or a .gguf file / checkpoint directory):\n" + describe_presets(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"ipu-sparse {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module in COMMAND_MODULES:
        module.register(sub)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help(sys.stderr)
        return 2
    try:
        check_args(parser, args)
        rc = args.func(args)
    except UserError as exc:
        print(f"ipu-sparse {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"ipu-sparse {args.command}: interrupted", file=sys.stderr)
        return 130
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
