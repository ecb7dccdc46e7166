"""``prune_(model, config, calib)``: one in-place call for every method."""
from __future__ import annotations

import time
from typing import Any, Dict, List, Optional, Union

import torch

from ..errors import UserError
from .calib import calibration_tokens
from .common import allocate_counts, check_nm_width, sparsity_report
from .config import PruneConfig
from .driver import prune_layers_
from .owl import layer_outlier_ratios, owl_sparsities


def prune_(model, config: PruneConfig, calib: Union[None, str, torch.Tensor] = None, *, tokenizer=None,
           cache_dir: Optional[str] = None, progress: bool = True) -> Dict[str, Any]:
    """Prune every decoder Linear of ``model`` in place to ``config`` (dense weights with exact zeros).

    ``calib``: (n, L) calibration token tensor, or a text file (default WikiText-2 validation) from
    which ``config.nsamples`` windows are drawn with ``tokenizer`` (cached under ``cache_dir``);
    unused when the method needs no data. Returns a summary with per-layer sparsity and the wall time."""
    t0 = time.time()
    linears = list(model.linear_layers())
    if not linears:
        raise UserError("model has no decoder Linear layers to prune")
    if config.prune_m:
        for name, mod in linears:
            check_nm_width(name, mod.weight.shape[1], config.prune_m)
    tokens = None
    if config.needs_calibration:
        tokens = calibration_tokens(calib, tokenizer, config.nsamples, config.seq_len, config.seed, cache_dir)
        tokens = tokens.to(model.embed.weight.device)

    layer_sparsity = [config.sparsity] * len(model.layers)
    outlier = None
    if config.owl:
        sub = tokens[: config.owl_nsamples] if config.owl_nsamples else tokens
        outlier = layer_outlier_ratios(model, sub, config.owl_m, progress=progress)
        layer_sparsity = owl_sparsities(outlier, config.sparsity, config.owl_lambda)

    offsets = prune_layers_(model, config, exact_counts(linears, layer_sparsity, config.sparsity), tokens,
                            progress=progress)
    summary = _summary(config, tokens, layer_sparsity, outlier, time.time() - t0, sparsity_report(model))
    summary["alloc_offsets"] = offsets
    return summary


def exact_counts(linears, layer_sparsity: List[float], sparsity: float) -> Dict[str, int]:
    """Weights to remove per Linear (``layers.i.*`` at about ``layer_sparsity[i]``), exactly
    ``round(sparsity * total)`` in all (N:M patterns fix the counts themselves)."""
    names = [n for n, _ in linears]
    sizes = [m.weight.numel() for _, m in linears]
    layer_idx = [int(n.split(".")[1]) for n in names]
    return dict(zip(names, allocate_counts(sizes, [layer_sparsity[i] for i in layer_idx], sparsity)))


def _summary(config: PruneConfig, tokens: Optional[torch.Tensor], layer_sparsity, outlier, seconds: float,
             report: Dict[str, Any]) -> Dict[str, Any]:
    owl = config.owl
    n = None if tokens is None else int(tokens.shape[0])
    return {
        "method": config.method, "sparsity": config.sparsity,
        "nm": f"{config.prune_n}:{config.prune_m}" if config.prune_m else None, "owl": bool(owl),
        "owl_lambda": config.owl_lambda if owl else None, "owl_m": config.owl_m if owl else None,
        "owl_nsamples": (config.owl_nsamples or n) if owl else None,
        "layer_target_sparsity": layer_sparsity, "layer_outlier_ratio": outlier,
        "nsamples": n, "seq_len": None if tokens is None else int(tokens.shape[1]),
        "seed": config.seed, "sequential": config.sequential, "blocksize": config.blocksize,
        "percdamp": config.percdamp, "refit_iters": config.refit_iters, "dense_target": config.dense_target,
        "alloc_step": config.alloc_step, "alloc_nsamples": config.alloc_nsamples if config.alloc_step else None,
        "recon_steps": config.recon_steps, "recon_lr": config.recon_lr if config.recon_steps else None,
        "recon_batch": config.recon_batch if config.recon_steps else None,
        "time_s": seconds, "report": report,
    }
