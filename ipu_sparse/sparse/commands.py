"""CLI: ``ipu-sparse sparsify``, ``ipu-sparse inspect``, ``ipu-sparse account``.

Handlers import the modules they run (models, loaders, kernels) inside the function, so
`ipu-sparse --help` and argument errors stay fast; everything else is imported at the top.
"""
from __future__ import annotations

import argparse
import sys

from ..config import PRESETS, ModelConfig, get_preset
from ..errors import UserError
from ..fileio import atomic_write_text, check_output_path, sha256_file
from .formats import DEFAULT_FORMAT, FORMAT_NAMES, SPARSE_DTYPE_CHOICES, VALUE_DTYPES

HEAD_DTYPE_CHOICES = tuple(VALUE_DTYPES) + ("int8",)


def register(sub) -> None:
    p = sub.add_parser("sparsify", help="convert a pruned (dense-with-zeros) model to a sparse checkpoint",
                       description="Store the exact zeros of a pruned model's projections in a compact sparse "
                                   "format. --magnitude S prunes each projection to sparsity S by magnitude first "
                                   "(for quick speed/size tests; use `ipu-sparse prune` for accuracy).")
    p.add_argument("--model", required=True, help="checkpoint directory, .gguf file or preset name")
    p.add_argument("--format", default=DEFAULT_FORMAT, choices=FORMAT_NAMES, help=f"sparse format (default {DEFAULT_FORMAT})")
    p.add_argument("--dtype", default="bf16", choices=SPARSE_DTYPE_CHOICES,
                   help="value dtype (default bf16; int8: bitmap only, with an fp32 scale a row)")
    p.add_argument("--out", required=True, help="output checkpoint directory")
    p.add_argument("--magnitude", type=float, default=None, metavar="SPARSITY",
                   help="magnitude-prune every selected projection to this sparsity first")
    p.add_argument("--include-head", action="store_true",
                   help="also prune (--magnitude) and store sparsely the LM head, as an untied copy")
    p.add_argument("--dense-dtype", choices=tuple(VALUE_DTYPES), default=None,
                   help="storage of the dense tensors (embedding, norms); default: --dtype (bf16 for int8)")
    p.add_argument("--head-dtype", choices=HEAD_DTYPE_CHOICES, default=None,
                   help="keep the LM head dense but store it in this dtype (untied copy; int8: with fp32 scales)")
    p.add_argument("--head-group-size", type=int, default=0, metavar="N",
                   help="int8 head: one scale per N columns (default 0: one scale a row)")
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
    p.add_argument("--format", default=DEFAULT_FORMAT, choices=FORMAT_NAMES)
    p.add_argument("--dtype", default="fp16", choices=SPARSE_DTYPE_CHOICES, help="value dtype (default fp16)")
    p.add_argument("--include-head", action="store_true", help="count the LM head as sparse (untied copy)")
    p.add_argument("--head-dtype", choices=HEAD_DTYPE_CHOICES, default=None,
                   help="count a dense LM head stored in this dtype (untied copy)")
    p.add_argument("--head-group-size", type=int, default=0, metavar="N",
                   help="int8 head: one scale per N columns (default 0: one scale a row)")
    p.add_argument("--context", type=int, default=512, help="context length for attention FLOPs (default 512)")
    p.add_argument("--layers", action="store_true", help="print every layer")
    p.add_argument("--json", default=None, metavar="PATH", help="also write the result as JSON")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --json file")
    p.set_defaults(func=cmd_account)


def _check_fraction(name: str, value) -> None:
    if value is not None and not 0.0 <= value < 1.0:
        raise UserError(f"{name} must be in [0, 1), got {value}")


def _check_head_group(args) -> None:
    if args.head_group_size < 0:
        raise UserError(f"--head-group-size must be >= 0, got {args.head_group_size}")
    if args.head_group_size and args.head_dtype != "int8":
        raise UserError(f"--head-group-size {args.head_group_size}: only with --head-dtype int8")


def cmd_sparsify(args) -> int:
    from ..loading import load_model
    from ..prune.magnitude import magnitude_prune_
    from .checkpoint import save_sparse_checkpoint

    _check_fraction("--magnitude", args.magnitude)
    _check_fraction("--min-sparsity", args.min_sparsity)
    _check_head_group(args)
    if args.dtype == "int8" and args.format != "bitmap":
        raise UserError(f"--dtype int8: only the bitmap format stores int8 values, not {args.format}")
    check_output_path(args.out, args.overwrite)
    lm = load_model(args.model)
    model = lm.model
    extra = {"source": lm.source}
    if args.magnitude is not None:
        magnitude_prune_(model, args.magnitude, include_head=args.include_head)
        extra["pruning"] = {"method": "magnitude", "sparsity": args.magnitude, "include_head": args.include_head}
    elif lm.meta and "pruning" in lm.meta:
        extra["pruning"] = lm.meta["pruning"]
    out = save_sparse_checkpoint(model, lm.tokenizer, args.out, format=args.format, dtype=args.dtype,
                                 include_head=args.include_head, head_dtype=args.head_dtype,
                                 min_sparsity=args.min_sparsity, extra_meta=extra, overwrite=args.overwrite,
                                 dense_dtype=args.dense_dtype, head_group_size=args.head_group_size)
    print(f"wrote {out}", file=sys.stderr)
    return cmd_inspect(argparse.Namespace(checkpoint=str(out), layers=False, verify=False))


def cmd_inspect(args) -> int:
    from ..checkpoint import read_meta
    from .accounting import format_table
    from .checkpoint import SPARSE_FORMAT, format_disk_line, summarize, validate_meta

    meta = read_meta(args.checkpoint)
    if meta["format"] != SPARSE_FORMAT:
        if meta["format"] == "dense":
            cfg = ModelConfig.from_dict(meta["config"])
            print(f"{args.checkpoint}: dense checkpoint (version {meta.get('version')}), "
                  f"model {cfg.name}, dtype {meta.get('dtype')}")
            if args.verify:
                verify_checkpoint(args.checkpoint, meta)
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
    result = summarize(meta)
    print(format_table(result, per_layer=args.layers))
    print(format_disk_line(args.checkpoint, result))
    if args.verify:
        verify_checkpoint(args.checkpoint, meta)
    return 0


def verify_checkpoint(path, meta) -> None:
    """Check every file the metadata records against its hash, then load the checkpoint (any format:
    every tensor's name, shape, dtype, index bound and finiteness). A checkpoint that records no
    hashes is refused as unverifiable."""
    from pathlib import Path

    from ..checkpoint import META_FILE
    from ..loading import load_checkpoint

    files = meta.get("files") or {}
    if not files:
        raise UserError(f"{path}: unverifiable: {META_FILE} records no content hashes")
    for name, want in sorted(files.items()):
        f = Path(path) / name
        if not f.is_file():
            raise UserError(f"{f}: missing (recorded in {META_FILE})")
        if sha256_file(f) != want:
            raise UserError(f"{f}: content hash does not match {META_FILE} (corrupt or modified file)")
    load_checkpoint(path)
    print(f"verified: {len(files)} file hash(es), every tensor, shape, index bound and value is valid")


def cmd_account(args) -> int:
    import json
    from pathlib import Path

    from .accounting import account, format_table, head_storage, rows_from_config, rows_from_meta, rows_from_model

    _check_fraction("--sparsity", args.sparsity)
    _check_head_group(args)
    if args.dtype == "int8" and args.format != "bitmap":
        raise UserError(f"--dtype int8: only the bitmap format stores int8 values, not {args.format}")
    if args.json:
        check_output_path(args.json, args.overwrite, directory=False)
    spec = args.model
    meta = None
    head_dtype, group = args.head_dtype, args.head_group_size
    if spec in PRESETS and args.sparsity is not None:
        cfg = get_preset(spec)  # no weights needed
        rows = rows_from_config(cfg, args.sparsity, args.format, args.dtype, args.include_head)
        tied = cfg.tie_embeddings
    elif (Path(spec) / "ipu_sparse.json").is_file() and args.sparsity is None:
        from ..checkpoint import read_meta

        meta = read_meta(spec)
        cfg = ModelConfig.from_dict(meta["config"])
        if meta["format"] == "sparse":
            from .checkpoint import validate_meta

            validate_meta(meta, spec)
            rows = rows_from_meta(meta)
            tied = bool(meta["head"].get("source_tied", cfg.tie_embeddings))
        else:
            meta = None
    if args.sparsity is None and meta is None:
        from ..loading import load_model

        model = load_model(spec).model
        cfg, tied = model.config, model.config.tie_embeddings
        rows = rows_from_model(model, args.format, args.dtype, args.include_head)
        if head_storage(model)[0] is not None:  # a model whose head is stored in its own dtype
            head_dtype, group = head_storage(model)
    elif args.sparsity is not None and spec not in PRESETS:
        from ..loading import load_model

        cfg = load_model(spec).model.config
        rows = rows_from_config(cfg, args.sparsity, args.format, args.dtype, args.include_head)
        tied = cfg.tie_embeddings
    if meta is not None and meta["head"]["kind"] in ("low_precision", "quantized"):
        head_dtype, group = meta["head"]["dtype"], int(meta["head"].get("group_size", 0))
    if head_dtype == "int8":
        from .formats import q8_group_count

        q8_group_count(cfg.d_model, group)  # a group size that does not divide d_model: one clear line
    result = account(cfg, rows, context=args.context, head_dtype=head_dtype, tied_in_source=tied,
                     head_group_size=group)
    print(format_table(result, per_layer=args.layers))
    if args.json:
        out = atomic_write_text(args.json, json.dumps(result, indent=1), args.overwrite)
        print(f"wrote {out}", file=sys.stderr)
    return 0
