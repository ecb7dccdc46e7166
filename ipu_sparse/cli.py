"""The ``ipu-sparse`` command line.

Each concern registers its own subcommands from a small ``commands`` module
(argument definitions only; heavy imports happen inside the handlers), so adding a
capability never means editing a long central file.
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys
from typing import List, Optional

from .errors import UserError

# Modules with ``register(subparsers)``; listed in the order the help shows them.
COMMAND_MODULES = (
    "ipu_sparse.commands",          # generate, chat, info
    "ipu_sparse.prune.commands",    # prune
    "ipu_sparse.eval.commands",     # eval
    "ipu_sparse.sparse.commands",   # sparsify, inspect, account
    "ipu_sparse.recover.commands",  # recover
    "ipu_sparse.ipu.commands",      # plan, simulate, ipu
)


def build_parser() -> argparse.ArgumentParser:
    from . import __version__
    from .config import describe_presets

    parser = argparse.ArgumentParser(
        prog="ipu-sparse",
        description="80%-sparse language models: prune, store, evaluate, run on CPU, plan and run on IPUs.",
        epilog="model presets (--model NAME, or a .gguf file / checkpoint directory):\n" + describe_presets(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"ipu-sparse {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            if importlib.util.find_spec(name) is None:
                continue
        except ModuleNotFoundError:  # the concern's package is not part of this build
            continue
        importlib.import_module(name).register(sub)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help(sys.stderr)
        return 2
    try:
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
