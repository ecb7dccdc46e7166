"""``ipu-sparse prune``: one-shot pruning to a checkpoint, with a per-layer sparsity table.

Handlers import the modules they run (models, loaders, kernels) inside the function, so
`ipu-sparse --help` and argument errors stay fast; everything else is imported at the top.
"""
from __future__ import annotations

import json
import sys

from ..commands import add_model_args, load_for_cli
from ..errors import UserError
from ..fileio import atomic_write_text, check_output_path
from ..sparse.formats import FORMAT_NAMES

REPORT_FILE = "pruning_report.json"


def register(sub) -> None:
    p = sub.add_parser("prune", help="prune every decoder Linear (magnitude, Wanda, SparseGPT; N:M; OWL)",
                       description="One-shot pruning with a sequential calibration pass; writes a checkpoint "
                                   "(pruned weights as exact zeros, or a sparse format) and a per-layer sparsity table.")
    add_model_args(p)
    p.add_argument("--method", default="sparsegpt", help="magnitude | magnitude-row | wanda | sparsegpt (default sparsegpt)")
    p.add_argument("--sparsity", type=float, default=None, help="fraction of decoder-Linear weights to remove, in [0, 1)")
    p.add_argument("--nm", default=None, metavar="N:M", help="semi-structured: keep N of every M inputs (2:4, 4:8)")
    p.add_argument("--owl", action="store_true", help="OWL outlier-weighted per-layer ratios (same average sparsity)")
    p.add_argument("--owl-lambda", type=float, default=0.08, help="OWL ratio spread lambda (default 0.08)")
    p.add_argument("--owl-m", type=float, default=5.0, help="OWL outlier threshold M x mean (default 5)")
    p.add_argument("--owl-nsamples", type=int, default=32, help="calibration windows for the OWL ratio pass (default 32)")
    p.add_argument("--calib", default=None, metavar="PATH", help="calibration text (default ../shared/data/wikitext-2/wiki.valid.tokens)")
    p.add_argument("--nsamples", type=int, default=128, help="calibration windows (default 128)")
    p.add_argument("--seq-len", type=int, default=512, help="calibration window length (default 512)")
    p.add_argument("--seed", type=int, default=0, help="calibration sampling seed (default 0)")
    p.add_argument("--sequential", default="group", choices=("group", "layer"),
                   help="group: prune q/k/v, o, gate/up, down in turn, each from inputs of the pruned ones (default); "
                        "layer: all statistics from the dense layer, as the reference drivers")
    p.add_argument("--batch-size", type=int, default=None, help="calibration windows per forward chunk (default all at once)")
    p.add_argument("--blocksize", type=int, default=128, help="SparseGPT column block (default 128)")
    p.add_argument("--percdamp", type=float, default=0.01, help="SparseGPT damping, fraction of mean diag(H) (default 0.01)")
    p.add_argument("--refit-iters", type=int, default=0, help="masked least-squares refit steps after masking (default 0 = off)")
    p.add_argument("--dense-target", action="store_true", help="SparseGPT: fit each layer to the dense model's outputs")
    p.add_argument("--alloc-step", type=float, default=0.0,
                   help="per-projection sparsity within each layer: search offsets of +-STEP (attention vs MLP, q/k vs "
                        "v/o, gate/up vs down; same layer total) by layer-output error (default 0 = off; e.g. 0.05)")
    p.add_argument("--alloc-nsamples", type=int, default=8,
                   help="windows the allocation candidates are pruned on (and as many more they are scored on; default 8)")
    p.add_argument("--recon-steps", type=int, default=0,
                   help="joint reconstruction: Adam steps on the kept weights of each pruned layer towards the dense "
                        "layer's outputs, masks held (default 0 = off)")
    p.add_argument("--recon-lr", type=float, default=2e-4, help="learning rate of those steps (default 2e-4)")
    p.add_argument("--recon-batch", type=int, default=4, help="calibration windows per step (default 4)")
    p.add_argument("--format", default="dense", choices=("dense",) + FORMAT_NAMES,
                   help="checkpoint format: dense (default, exact zeros) or a sparse format of ipu_sparse.sparse")
    p.add_argument("--sparse-dtype", default=None,
                   help="value dtype of a sparse --format: fp32, bf16, fp16, int8 (bitmap only; default: that "
                        "format's default)")
    p.add_argument("--out", required=True, help="output checkpoint directory")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.set_defaults(func=cmd_prune)


def cmd_prune(args) -> int:
    from pathlib import Path

    from .common import format_report
    from .config import PruneConfig

    # Validate everything a user can get wrong before the model is loaded or anything is written.
    if args.nm is None and args.sparsity is None:
        raise UserError("give --sparsity S (0 <= S < 1) or --nm N:M")
    config = PruneConfig(method=args.method, sparsity=args.sparsity, nm=args.nm, owl=args.owl,
                         owl_lambda=args.owl_lambda, owl_m=args.owl_m, owl_nsamples=args.owl_nsamples,
                         nsamples=args.nsamples, seq_len=args.seq_len, seed=args.seed, sequential=args.sequential,
                         batch_size=args.batch_size, blocksize=args.blocksize, percdamp=args.percdamp,
                         refit_iters=args.refit_iters, dense_target=args.dense_target,
                         alloc_step=args.alloc_step, alloc_nsamples=args.alloc_nsamples,
                         recon_steps=args.recon_steps, recon_lr=args.recon_lr, recon_batch=args.recon_batch)
    if args.calib is not None and not Path(args.calib).is_file():
        raise UserError(f"{args.calib}: calibration file not found")
    if args.sparse_dtype is not None:
        from ..sparse.formats import value_dtype

        if args.format == "dense":
            raise UserError(f"--sparse-dtype {args.sparse_dtype}: only for a sparse --format, not dense")
        value_dtype(args.sparse_dtype, int8=True)
        if args.sparse_dtype == "int8" and args.format != "bitmap":
            raise UserError(f"--sparse-dtype int8: only the bitmap format stores int8 values, not {args.format}")
    out = check_output_path(args.out, args.overwrite)
    from ..loading import save_checkpoint
    from .api import prune_

    lm = load_for_cli(args)
    if config.needs_calibration:
        lm.model.config.check_context(args.seq_len, "--seq-len")
    summary = prune_(lm.model, config, args.calib, tokenizer=lm.tokenizer)
    report = summary["report"]
    print(format_report(report))
    print(f"pruned with {args.method} in {summary['time_s']:.1f} s (measured)")
    settings = {k: v for k, v in summary.items() if k != "report"}
    settings.update(model=args.model, calib=args.calib or "wikitext-2/wiki.valid.tokens (default)")
    meta = {"pruning": dict(settings, per_layer_sparsity={k: v["sparsity"] for k, v in report["per_layer"].items()},
                            linear_sparsity=report["linear"]["sparsity"],
                            all_params_sparsity=report["all_params"]["sparsity"])}
    save_checkpoint(lm.model, lm.tokenizer, out, args.format, args.sparse_dtype, extra_meta=meta, overwrite=args.overwrite)
    atomic_write_text(out / REPORT_FILE, json.dumps({"settings": settings, "report": report}, indent=1))
    print(f"wrote {out} ({args.format}) and {out / REPORT_FILE}", file=sys.stderr)
    return 0
