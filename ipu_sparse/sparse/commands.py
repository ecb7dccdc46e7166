"""CLI: ``ipu-sparse sparsify``, ``ipu-sparse inspect``, ``ipu-sparse account``."""
from __future__ import annotations

import sys


def register(sub) -> None:
    p = sub.add_parser("sparsify", help="convert a pruned (dense-with-zeros) model to a sparse checkpoint",
                       description="Store the exact zeros of a pruned model's projections in a compact sparse "
                                   "format. --magnitude S prunes each projection to sparsity S by magnitude first "
                                   "(for quick speed/size tests; use `ipu-sparse prune` for accuracy).")
    p.add_argument("--model", required=True, help="checkpoint directory, .gguf file or preset name")
    p.add_argument("--format", default="bitmap", choices=("bitmap", "csr16"), help="sparse format (default bitmap)")
    p.add_argument("--dtype", default="bf16", choices=("fp32", "bf16", "fp16"), help="value dtype (default bf16)")
    p.add_argument("--out", required=True, help="output checkpoint directory")
    p.add_argument("--magnitude", type=float, default=None, metavar="SPARSITY",
                   help="magnitude-prune every selected projection to this sparsity first")
    p.add_argument("--include-head", action="store_true",
                   help="also prune (--magnitude) and store sparsely the LM head, as an untied copy")
    p.add_argument("--head-dtype", choices=("fp32", "bf16", "fp16"), default=None,
                   help="keep the LM head dense but store it in this dtype (untied copy)")
    p.add_argument("--min-sparsity", type=float, default=0.0,
                   help="leave projections with fewer zeros than this dense (default 0: convert all)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.set_defaults(func=cmd_sparsify)

    p = sub.add_parser("inspect", help="summarise a sparse (or dense) checkpoint: layers, sparsity, bytes, format")
    p.add_argument("checkpoint", help="checkpoint directory")
    p.add_argument("--layers", action="store_true", help="print every layer")
    p.add_argument("--verify", action="store_true", help="also load and validate every tensor")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("account", help="bytes per layer and FLOPs per token, dense fp16 vs sparse",
                       description="Memory (every index byte counted) and compute per token of a model, dense fp16 "
                                   "vs sparse. Sparsity comes from the model's exact zeros / sparse layers, or from "
                                   "--sparsity (uniform, no weights needed: works for every preset).")
    p.add_argument("--model", required=True, help="preset name, checkpoint directory or .gguf")
    p.add_argument("--sparsity", type=float, default=None, help="assume this uniform sparsity for every projection")
    p.add_argument("--format", default="bitmap", choices=("bitmap", "csr16"))
    p.add_argument("--dtype", default="fp16", choices=("fp32", "bf16", "fp16"), help="value dtype (default fp16)")
    p.add_argument("--include-head", action="store_true", help="count the LM head as sparse (untied copy)")
    p.add_argument("--head-dtype", choices=("fp32", "bf16", "fp16"), default=None,
                   help="count a dense LM head stored in this dtype (untied copy)")
    p.add_argument("--context", type=int, default=512, help="context length for attention FLOPs (default 512)")
    p.add_argument("--layers", action="store_true", help="print every layer")
    p.add_argument("--json", default=None, metavar="PATH", help="also write the result as JSON")
    p.set_defaults(func=cmd_account)


def _check_fraction(name: str, value) -> None:
    from ..errors import UserError

    if value is not None and not 0.0 <= value < 1.0:
        raise UserError(f"{name} must be in [0, 1), got {value}")


def magnitude_prune_(model, sparsity: float, include_head: bool = False) -> None:
    """Zero the smallest-magnitude weights of each projection (per layer) to reach ``sparsity`` exactly."""
    import torch

    if include_head:
        model.untie_lm_head_()
    with torch.no_grad():
        for _, mod in model.linear_layers(include_head=include_head):
            w = mod.weight
            k = int(round(sparsity * w.numel()))
            if k == 0:
                continue
            a = w.detach().abs().flatten().float()
            t = a.kthvalue(k).values  # O(n) threshold
            drop = a < t
            ties = (a == t).nonzero().flatten()[: k - int(drop.sum())]  # quantised weights tie a lot
            drop[ties] = True
            w.view(-1)[drop] = 0


def cmd_sparsify(args) -> int:
    from ..loading import load_model
    from .checkpoint import save_sparse_checkpoint

    _check_fraction("--magnitude", args.magnitude)
    _check_fraction("--min-sparsity", args.min_sparsity)
    lm = load_model(args.model)
    model = lm.model
    extra = {"source": lm.source}
    if args.magnitude is not None:
        if args.include_head and model.config.tie_embeddings:
            model.sparse_source_tied = True
        magnitude_prune_(model, args.magnitude, include_head=args.include_head)
        extra["pruning"] = {"method": "magnitude", "sparsity": args.magnitude, "include_head": args.include_head}
    elif lm.meta and "pruning" in lm.meta:
        extra["pruning"] = lm.meta["pruning"]
    out = save_sparse_checkpoint(model, lm.tokenizer, args.out, format=args.format, dtype=args.dtype,
                                 include_head=args.include_head, head_dtype=args.head_dtype,
                                 min_sparsity=args.min_sparsity, extra_meta=extra, overwrite=args.overwrite)
    print(f"wrote {out}", file=sys.stderr)
    return cmd_inspect(_Args(checkpoint=str(out), layers=False, verify=False))


class _Args:
    def __init__(self, **kw):
        self.__dict__.update(kw)


def cmd_inspect(args) -> int:
    from ..checkpoint import read_meta
    from ..errors import UserError
    from .accounting import format_table
    from .checkpoint import SPARSE_FORMAT, summarize, validate_meta

    meta = read_meta(args.checkpoint)
    if meta["format"] != SPARSE_FORMAT:
        if meta["format"] == "dense":
            print(f"{args.checkpoint}: dense checkpoint (version {meta.get('version')}), "
                  f"model {meta['config'].get('name')}, dtype {meta.get('dtype')}")
            return 0
        raise UserError(f"{args.checkpoint}: unknown checkpoint format {meta['format']!r}")
    validate_meta(meta, args.checkpoint)
    cfg = meta["config"]
    print(f"{args.checkpoint}: sparse checkpoint v{meta['version']}, model {cfg.get('name')}, "
          f"formats {sorted({v['format'] for v in meta['layers'].values()})}, "
          f"value dtypes {sorted({v['dtype'] for v in meta['layers'].values()})}, dense tensors {meta['dtype']}, "
          f"head {meta['head']['kind']}")
    if "pruning" in meta:
        print(f"pruning: {meta['pruning']}")
    print(format_table(summarize(meta), per_layer=args.layers))
    if args.verify:
        from .checkpoint import load_sparse_checkpoint

        load_sparse_checkpoint(args.checkpoint, meta)
        print("verified: every tensor, shape and index bound is valid")
    return 0


def cmd_account(args) -> int:
    import json
    from pathlib import Path

    from ..config import PRESETS, get_preset
    from .accounting import account, format_table, rows_from_config, rows_from_meta, rows_from_model

    _check_fraction("--sparsity", args.sparsity)
    spec = args.model
    meta = None
    if spec in PRESETS and args.sparsity is not None:
        cfg = get_preset(spec)  # no weights needed
        rows = rows_from_config(cfg, args.sparsity, args.format, args.dtype, args.include_head)
        tied = cfg.tie_embeddings
    elif (Path(spec) / "ipu_sparse.json").is_file() and args.sparsity is None:
        from ..checkpoint import read_meta
        from ..config import ModelConfig

        meta = read_meta(spec)
        cfg = ModelConfig.from_dict(meta["config"])
        if meta["format"] == "sparse":
            rows = rows_from_meta(meta)
            tied = bool(meta["head"].get("source_tied", cfg.tie_embeddings))
        else:
            meta = None
    if args.sparsity is None and meta is None:
        from ..loading import load_model

        model = load_model(spec).model
        cfg, tied = model.config, model.config.tie_embeddings
        rows = rows_from_model(model, args.format, args.dtype, args.include_head)
    elif args.sparsity is not None and spec not in PRESETS:
        from ..loading import load_model

        cfg = load_model(spec).model.config
        rows = rows_from_config(cfg, args.sparsity, args.format, args.dtype, args.include_head)
        tied = cfg.tie_embeddings
    head_dtype = args.head_dtype
    if meta is not None and meta["head"]["kind"] == "low_precision":
        head_dtype = meta["head"]["dtype"]
    result = account(cfg, rows, context=args.context, head_dtype=head_dtype, tied_in_source=tied)
    print(format_table(result, per_layer=args.layers))
    if args.json:
        from ..checkpoint import atomic_write_text

        out = atomic_write_text(args.json, json.dumps(result, indent=1))
        print(f"wrote {out}", file=sys.stderr)
    return 0
