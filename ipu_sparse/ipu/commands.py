"""IPU subcommands: plan (memory per IPU), simulate (staged CPU run + estimates), ipu-generate,
ipu-check (the op-coverage gate: what PopTorch 3.4 could not lower in the ipu-generate graph).

Handlers import the modules they run (models, loaders, kernels) inside the function, so
`ipu-sparse --help` and argument errors stay fast; everything else is imported at the top.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..config import PRESETS, get_preset
from ..errors import UserError
from ..fileio import atomic_write_text, check_output_path


def _int_list(text: str, what: str):
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UserError(f"{what}: expected comma-separated integers, got {text!r}") from None


def _float_or_list(text: str, what: str):
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UserError(f"{what}: expected a number or comma-separated numbers, got {text!r}") from None
    if not values:
        raise UserError(f"{what}: empty value")
    return values[0] if len(values) == 1 else values


def add_plan_args(p: argparse.ArgumentParser, default_model: str, default_ipus: int) -> None:
    p.add_argument("--model", default=default_model, help=f"model preset (default: {default_model})")
    p.add_argument("--ipus", type=int, default=default_ipus, help=f"number of IPUs, 1-64 (default: {default_ipus})")
    p.add_argument("--sparsity", default="0.8", help="uniform sparsity, or one value per layer, comma-separated (default: 0.8)")
    p.add_argument("--format", dest="fmt", default="csr16", choices=("csr16", "dense"), help="weight storage (default: csr16)")
    p.add_argument("--ipu-type", default="gc200", choices=("gc200", "bow"))
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--seq-len", type=int, default=None, help="tokens per forward call (default: 128, capped at --kv-len)")
    p.add_argument("--kv-len", type=int, default=None, help="static KV-cache length (default: the model's max_seq_len)")
    p.add_argument("--layers-per-ipu", default=None,
                   help="decoder layers per IPU, comma-separated, -1 = share the rest (default: balanced by bytes)")
    p.add_argument("--matmul-proportion", default=None,
                   help="available memory proportion, one value or one per IPU (default: the free fraction per IPU)")
    p.add_argument("--sparse-head", action="store_true", help="prune and store the (untied) LM head sparse too")
    p.add_argument("--embed-shards", type=int, default=None, help="vocabulary slices of the embedding (default: auto)")
    p.add_argument("--head-shards", type=int, default=None, help="vocabulary slices of the LM head (default: auto)")
    p.add_argument("--reserve", type=float, default=None,
                   help="fraction of each IPU kept for code, exchange buffers and stacks (default: hardware.RESERVE_FRACTION)")


def plan_config_from_args(args, cfg):
    from . import hardware as hw
    from .planner import PlanConfig

    kv = args.kv_len or cfg.max_seq_len
    return PlanConfig(
        model=cfg, n_ipus=args.ipus, sparsity=_float_or_list(args.sparsity, "--sparsity"), fmt=args.fmt,
        ipu_type=args.ipu_type, batch=args.batch, seq_len=args.seq_len or min(128, kv), kv_len=kv,
        layers_per_ipu=_int_list(args.layers_per_ipu, "--layers-per-ipu") if args.layers_per_ipu else None,
        matmul_proportion=_float_or_list(args.matmul_proportion, "--matmul-proportion") if args.matmul_proportion else None,
        sparse_head=args.sparse_head, embed_shards=args.embed_shards, head_shards=args.head_shards,
        reserve_fraction=hw.RESERVE_FRACTION if args.reserve is None else args.reserve)


def write_json(path, data, overwrite: bool) -> None:
    atomic_write_text(path, json.dumps(data, indent=1, default=str), overwrite)


def register(sub) -> None:
    p = sub.add_parser("plan", help="plan on-chip memory per IPU (dense vs sparse; fits or says what would)")
    add_plan_args(p, "luminous-base-13b", 16)
    p.add_argument("--json", default=None, help="also write the plan as JSON here")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("simulate", help="run the planned pipeline stage by stage on CPU; check it equals the "
                                        "plain model; estimate IPU time and energy (dense vs sparse)")
    add_plan_args(p, "smollm2-135m", 4)
    p.add_argument("--random-init", action="store_true", help="random weights instead of loading the checkpoint")
    p.add_argument("--prompt-len", type=int, default=64, help="tokens run through the pipeline (default: 64)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tolerance", type=float, default=1e-3, help="max |staged - plain| allowed (default: 1e-3)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads for the timed stages (default: 1, steadier timings on shared cores)")
    p.add_argument("--json", default=None, help="write the results as JSON here")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=cmd_simulate)

    p = sub.add_parser("ipu-generate", help="generate on IPUs with PopTorch (needs the Poplar SDK); "
                                            "--compile-only builds the executable offline")
    add_plan_args(p, "smollm2-135m", 1)
    p.add_argument("--prompt", default="The capital of France is")
    p.add_argument("--max-new-tokens", type=int, default=32)
    add_strategy_arg(p)
    p.add_argument("--compile-only", action="store_true",
                   help="compile (offline Mk2 target when no IPU is attached), fill the executable cache, export")
    p.add_argument("--work-dir", default="out/ipu", help="patterns, initializers, exported executable")
    p.add_argument("--executable-cache", default=None, help="PopTorch executable cache directory")
    p.set_defaults(func=cmd_ipu_generate)

    p = sub.add_parser("ipu-check", help="build the IPU graph as ipu-generate would and list every op "
                                         "PopTorch 3.4 could not lower (CPU only; exit 1 if any)")
    add_plan_args(p, "smollm2-135m", 1)
    add_strategy_arg(p)
    p.add_argument("--replicas", type=int, default=1, help="replicas per process to check the input split for")
    p.add_argument("--random-init", action="store_true", help="random weights instead of loading the checkpoint")
    p.add_argument("--work-dir", default=None, help="where pattern files go (default: a temporary directory)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_ipu_check)


def add_strategy_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--strategy", "--mode", dest="strategy", default="sharded", choices=("sharded", "pipelined"),
                   help="PopTorch execution strategy (default: sharded, as generation uses)")


def _config(name: str):
    if name in PRESETS:
        return get_preset(name)
    if Path(name).exists():
        from ..loading import load_model

        return load_model(name).model.config
    return get_preset(name)  # raises UserError listing the presets


def cmd_plan(args) -> int:
    from .planner import fmt_bytes, check_fits
    from .report import compare_dense_sparse, format_table

    if args.json:
        check_output_path(args.json, args.overwrite, directory=False)
    pc = plan_config_from_args(args, _config(args.model))
    cmp = compare_dense_sparse(pc)
    plan = cmp["sparse_plan"]
    print(format_table(plan))
    if pc.fmt != "dense":
        dense = cmp["dense_plan"]
        worst = max(dense.ipus, key=lambda a: -a.free)
        print(f"dense {pc.dtype}: weights {fmt_bytes(cmp['dense_weight_bytes'])}, planned {fmt_bytes(cmp['dense_total_bytes'])} "
              f"vs {fmt_bytes(cmp['capacity_bytes'])} on chip -> {'FITS' if cmp['dense_fits'] else 'DOES NOT FIT'}"
              + ("" if cmp["dense_fits"] else f" (worst: IPU{worst.ipu} {fmt_bytes(-worst.free)} over)"))
        print(f"sparse ({pc.fmt}): weights {fmt_bytes(cmp['sparse_weight_bytes'])} = {cmp['weight_ratio']:.1%} of dense; "
              f"planned total {fmt_bytes(cmp['sparse_total_bytes'])} = {cmp['total_ratio']:.1%} of dense's "
              f"-> {'FITS' if cmp['sparse_fits'] else 'DOES NOT FIT'}")
    if args.json:
        data = plan.to_dict()
        data["comparison"] = {k: v for k, v in cmp.items() if not k.endswith("_plan")}
        write_json(args.json, data, args.overwrite)
    check_fits(plan)  # raises PlanError (one line, exit 2) naming the IPU, the bytes over, what fits
    return 0


def _load_for_simulation(args):
    import torch

    from ..model import build_model

    if args.random_init or (args.model in PRESETS and args.model.startswith("tiny")):
        return build_model(get_preset(args.model), seed=args.seed), None
    from ..loading import load_model

    print(f"loading {args.model} ...", file=sys.stderr)
    lm = load_model(args.model, dtype=torch.float32)
    return lm.model, lm.tokenizer


def cmd_simulate(args) -> int:
    import torch

    from ..prune.magnitude import magnitude_prune_
    from .planner import make_plan
    from .simulate import format_simulation, simulate, tokens_for

    if args.json:
        check_output_path(args.json, args.overwrite, directory=False)
    torch.set_num_threads(max(1, args.threads))
    model, tokenizer = _load_for_simulation(args)
    model.config.check_context(args.prompt_len, "--prompt-len")
    args.kv_len = args.kv_len or min(model.config.max_seq_len, 2048)
    pc = plan_config_from_args(args, model.config)
    plan = make_plan(pc)
    sparsity = pc.layer_sparsity()[0] if len(set(pc.layer_sparsity())) == 1 else None
    if sparsity is None:
        raise UserError("simulate prunes uniformly: give one --sparsity value")
    if pc.fmt != "dense":
        magnitude_prune_(model, sparsity, scope="row")
    idx = tokens_for(model.config, tokenizer, "The quick brown fox jumps over the lazy dog. " * 8, args.prompt_len)
    torch.manual_seed(args.seed)
    res = simulate(model, plan, idx, sparse_ops=pc.fmt != "dense")
    res["plan_fits"] = plan.fits
    print(format_simulation(res))
    print(f"plan: layers_per_ipu {plan.layers_per_ipu}, {len(plan.stages)} stages, "
          f"{'fits' if plan.fits else 'DOES NOT FIT'} on {pc.n_ipus} x {pc.ipu_type}")
    if args.json:
        write_json(args.json, res, args.overwrite)
    if not res["max_abs_diff_vs_plain"] <= args.tolerance:
        raise UserError(f"staged output differs from the plain model by {res['max_abs_diff_vs_plain']:.3e} "
                        f"> --tolerance {args.tolerance}")
    return 0


def load_for_ipu(args, random_init: bool = False):
    """The model (and tokenizer) as the IPU commands use it: untied head for --sparse-head."""
    import torch

    from ..model import build_model

    if random_init or (args.model in PRESETS and args.model.startswith("tiny")):
        model, tokenizer = build_model(get_preset(args.model), seed=getattr(args, "seed", 0)), None
    else:
        from ..loading import load_model

        print(f"loading {args.model} ...", file=sys.stderr)
        lm = load_model(args.model, dtype=torch.float32)
        model, tokenizer = lm.model, lm.tokenizer
    if args.sparse_head and model.config.tie_embeddings:
        model.untie_lm_head_()  # a sparse head needs its own matrix (the embedding stays dense)
    return model, tokenizer


def cmd_ipu_check(args) -> int:
    import tempfile

    from .check import check_ipu_graph
    from .planner import make_plan

    model, _ = load_for_ipu(args, random_init=args.random_init)
    args.kv_len = args.kv_len or min(model.config.max_seq_len, 2048)
    args.seq_len = args.seq_len or 1
    pc = plan_config_from_args(args, model.config)
    plan = make_plan(pc)  # the check does not need the plan to fit, only its placement
    if pc.fmt != "dense":
        from ..prune.magnitude import magnitude_prune_

        sparsity = pc.layer_sparsity()
        if len(set(sparsity)) != 1:
            raise UserError("ipu-check prunes uniformly: give one --sparsity value")
        magnitude_prune_(model, sparsity[0], include_head=pc.sparse_head)  # zeros where the plan puts them
    with tempfile.TemporaryDirectory(prefix="ipu-check-") as tmp:
        res = check_ipu_graph(model, plan, args.work_dir or tmp, strategy=args.strategy,
                              replication_factor=args.replicas)
    r = res.report
    print(f"ipu-check: {pc.model.name}, {pc.n_ipus} IPUs, {args.strategy}, format {pc.fmt}, sparsity {pc.sparsity}"
          f"{', sparse head' if pc.sparse_head else ''}; {len(plan.stages)} stages; inputs of {res.rows} rows "
          f"(batch {pc.batch} x deviceIterations {res.device_iterations} x replicas {res.replicas}); "
          f"decode steps at positions {res.step_positions}")
    print(r.format())
    for p in res.plan_problems:
        print(f"PLAN MISMATCH {p}")
    n_bad = len(r.unlowerable) + len(r.problems) + len(res.plan_problems)
    print(f"ipu-check: {'OK' if res.ok else 'FAILED'}: {len(r.unlowerable)} unsupported ops, "
          f"{len(r.problems)} custom-op problems, {len(res.plan_problems)} plan mismatches"
          f"{'' if plan.fits else ' (note: this plan does not fit; see ipu-sparse plan)'}")
    return 0 if n_bad == 0 else 1


def cmd_ipu_generate(args) -> int:
    from .generate import compile_for_ipu, generate_ids, release
    from .options import init_popdist
    from .pipeline import built_vs_plan, import_poptorch
    from .planner import plan_or_raise

    poptorch = import_poptorch()
    popdist = init_popdist()
    model, tokenizer = load_for_ipu(args)
    args.kv_len = args.kv_len or model.config.max_seq_len
    plan = plan_or_raise(plan_config_from_args(args, model.config))
    executor, step, rows = compile_for_ipu(model, plan, args.work_dir, mode=args.strategy,
                                           compile_only=args.compile_only, executable_cache=args.executable_cache,
                                           poptorch=poptorch, popdist=popdist)
    try:
        problems = built_vs_plan(model, plan, model.ipu_placement.blocks)
        if problems:
            raise UserError("the built model differs from the plan: " + "; ".join(problems))
        if args.compile_only:
            print(f"compiled: {Path(args.work_dir) / 'decode.popef'}")
            return 0
        ids = generate_ids(executor, tokenizer.encode(args.prompt), args.max_new_tokens, plan.config.kv_len,
                           rows=rows, eos_id=getattr(tokenizer, "eos_id", None))
        print(tokenizer.decode(ids))
    finally:
        release(executor, model, poptorch=poptorch)
    return 0
