"""CLI: ``ipu-sparse serve`` (OpenAI-compatible API + the Lumi chat page).

Handlers import the modules they run (models, loaders, kernels) inside the function, so
`ipu-sparse --help` and argument errors stay fast; everything else is imported at the top.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..errors import UserError


def register(sub) -> None:
    from ..commands import add_model_args

    p = sub.add_parser("serve", help="serve a model over the OpenAI HTTP API with the Lumi chat page at /",
                       description="OpenAI-compatible server (POST /v1/chat/completions, /v1/completions, GET "
                                   "/v1/models, /health) and a chat page at /. With --compare DENSE the page shows "
                                   "the dense model's answer next to the (sparse) --model's, with tokens/s, bytes "
                                   "of weights and FLOPs per token of each.")
    add_model_args(p)
    p.add_argument("--compare", default=None, metavar="DENSE",
                   help="a second model (usually the dense original) served beside --model for comparison")
    p.add_argument("--name", default=None, help="model id in the API (default: derived from --model)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8080, help="port (default 8080; 0 = any free port)")
    p.add_argument("--max-queue", type=int, default=8,
                   help="requests that may wait per model while one generates; more get HTTP 503 (default 8)")
    p.add_argument("--ipu", action="store_true",
                   help="generate on IPUs with PopTorch (the ipu-generate path; needs the Poplar SDK)")
    p.add_argument("--ipus", type=int, default=1, help="IPUs for --ipu (default 1)")
    p.add_argument("--kv-len", type=int, default=None, help="static KV-cache length for --ipu (default: the context)")
    p.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"))
    p.set_defaults(func=cmd_serve)


def model_id(spec: str) -> str:
    """``smollm2-135m`` for a preset, the directory or file name (without .gguf) for a path."""
    path = Path(spec)
    if path.exists():
        name = path.resolve().name
        return name[:-5] if name.endswith(".gguf") else name
    return spec


def ipu_backend(model, args):
    """The ``ipu-generate`` path (plan, sparse ops, compiled decode step) as a serving backend."""
    from ..ipu.commands import add_plan_args, plan_config_from_args
    from ..ipu.generate import compile_for_ipu
    from ..ipu.pipeline import import_poptorch
    from ..ipu.planner import plan_or_raise
    from .ipu_backend import IpuBackend

    poptorch = import_poptorch()  # a clear one-line error where the Poplar SDK is missing
    parser = argparse.ArgumentParser()
    add_plan_args(parser, args.model, args.ipus)
    plan_args = parser.parse_args([])
    plan_args.ipus = args.ipus
    plan_args.kv_len = args.kv_len or model.config.max_seq_len
    plan = plan_or_raise(plan_config_from_args(plan_args, model.config))
    executor, _step, rows = compile_for_ipu(model, plan, Path("out") / "ipu-serve", poptorch=poptorch)
    return IpuBackend(executor, plan.config.kv_len, rows)


def build_engines(args):
    from ..commands import load_for_cli
    from .engine import Engine, model_figures

    specs = [("sparse" if args.compare else "model", args.model)]
    if args.compare:
        specs.append(("dense", args.compare))
    engines = []
    for role, spec in specs:
        args.model = spec
        lm = load_for_cli(args)
        name = args.name if (args.name and role != "dense") else model_id(spec)
        if any(e.id == name for e in engines):
            name = f"{name}-{role}"
        figures = model_figures(lm.model)  # before the IPU path converts the layers
        backend = ipu_backend(lm.model, args) if args.ipu else None
        engines.append(Engine(name, lm, role=role, max_queue=args.max_queue, backend=backend, source=spec,
                              figures=figures))
    args.model = specs[0][1]
    return engines


def cmd_serve(args) -> int:
    if args.max_queue < 0:
        raise UserError(f"--max-queue must be >= 0, got {args.max_queue}")
    if not 0 <= args.port <= 65535:
        raise UserError(f"--port must be in [0, 65535], got {args.port}")
    from .app import create_app
    from .server import serve_forever

    if args.ipu:
        from ..ipu.pipeline import import_poptorch

        import_poptorch()  # fail before loading any weights
    engines = build_engines(args)
    for e in engines:
        f = e.figures
        print(f"{e.id} ({e.role}, {e.backend.name}): {f['weight_bytes'] / 1e6:.1f} MB of weights (fp16 accounting), "
              f"{f['flops_per_token'] / 1e6:.1f} MFLOP/token, context {e.context}", file=sys.stderr)
    serve_forever(create_app(engines), args.host, args.port, log_level=args.log_level)
    for e in engines:
        e.shutdown()
    return 0
