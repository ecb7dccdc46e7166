"""``prune_(model, method=..., sparsity=...)``: one in-place call for every method."""
from __future__ import annotations

import sys
import time
from typing import Any, Dict, List, Optional, Union

import torch

from ..errors import UserError
from .common import InputStats, allocate_counts, check_nm_width, check_sparsity, parse_nm, sparsity_report
from .magnitude import Magnitude, MagnitudeRow
from .sparsegpt import SparseGPT
from .wanda import Wanda

METHODS = {
    "magnitude": Magnitude,        # per matrix
    "magnitude-row": MagnitudeRow,  # per output row
    "wanda": Wanda,
    "sparsegpt": SparseGPT,
}


def layer_outlier_ratios(model, tokens: torch.Tensor, m: float = 5.0, progress: bool = False) -> List[float]:
    """OWL outlier ratio of every decoder layer, from a dense pass (Wanda scores per Linear)."""
    from tqdm import tqdm

    from .driver import _hooked_pass, linear_groups
    from .owl import outlier_ratio

    L = tokens.shape[1]
    cos, sin = model.rope(torch.arange(L, device=tokens.device))
    ratios = []
    with torch.inference_mode():
        x = model.embed(tokens)
        for layer in tqdm(model.layers, desc="OWL outlier ratios", unit="layer", file=sys.stderr, disable=not progress):
            groups = linear_groups(layer, x[:1, : min(L, 8)], cos[: min(L, 8)], sin[: min(L, 8)])
            leaders = {id(g[0][1]): gi for gi, g in enumerate(groups)}
            stats = [InputStats(g[0][1].weight.shape[1], device=x.device) for g in groups]
            x = _hooked_pass(layer, x, cos, sin, leaders, lambda gi, inp: stats[gi].add(inp))
            scores = [mod.weight.detach().float().abs() * stats[gi].sq.float().sqrt().view(1, -1)
                      for gi, g in enumerate(groups) for _, mod in g]
            ratios.append(outlier_ratio(scores, m))
    return ratios


def prune_(model, method: str = "sparsegpt", sparsity: Optional[float] = None, nm=None, owl: bool = False,
           calib: Union[None, str, torch.Tensor] = None, tokenizer=None, nsamples: int = 128, seq_len: int = 512,
           seed: int = 0, batch_size: Optional[int] = None, sequential: str = "group", blocksize: int = 128,
           percdamp: float = 0.01, refit_iters: int = 0, dense_target: bool = False,
           owl_lambda: float = 0.08, owl_m: float = 5.0, owl_nsamples: Optional[int] = 32,
           cache_dir: Optional[str] = None, progress: bool = True) -> Dict[str, Any]:
    """Prune every decoder Linear of ``model`` in place (dense weights with exact zeros).

    ``method``: magnitude | magnitude-row | wanda | sparsegpt.  ``sparsity`` in [0, 1), exact over the
    decoder Linears; ``nm="2:4"`` semi-structured instead (sparsity then 1 - N/M). ``owl``: per-layer
    ratios (OWL) with the same average.  ``calib``: (n, L) token tensor or text path (needs
    ``tokenizer``; default WikiText-2 validation).  ``refit_iters``: masked least-squares refit of
    the kept weights; ``dense_target``: fit each layer to the dense model's outputs (SparseGPT).
    Returns a summary with per-layer sparsity and the wall time."""
    t0 = time.time()
    if method not in METHODS:
        raise UserError(f"unknown pruning method {method!r} (choose from {', '.join(METHODS)})")
    cls = METHODS[method]
    prune_n = prune_m = 0
    if nm is not None:
        prune_n, prune_m = parse_nm(nm)
        implied = 1.0 - prune_n / prune_m
        if sparsity is not None and abs(float(sparsity) - implied) > 1e-9:
            raise UserError(f"sparsity {sparsity} contradicts the N:M pattern {prune_n}:{prune_m} (implies {implied})")
        if owl:
            raise UserError("OWL layer ratios apply to unstructured sparsity, not to an N:M pattern")
        sparsity = implied
    if sparsity is None:
        raise UserError("give a sparsity (0 <= s < 1) or an N:M pattern")
    sparsity = check_sparsity(sparsity)
    if sequential not in ("group", "layer"):
        raise UserError(f"sequential={sequential!r}: expected 'group' or 'layer'")
    if dense_target and method != "sparsegpt":
        raise UserError("the dense-target correction is implemented for sparsegpt only")
    linears = list(model.linear_layers())
    if not linears:
        raise UserError("model has no decoder Linear layers to prune")
    if prune_m:
        for name, mod in linears:
            check_nm_width(name, mod.weight.shape[1], prune_m)

    needs_data = cls.needs_stats or owl or refit_iters > 0
    tokens = None
    if needs_data:
        if isinstance(calib, torch.Tensor):
            tokens = calib.long()
        else:
            if tokenizer is None:
                raise UserError("calibration from a text file needs the model's tokenizer")
            from .calib import calibration_windows

            tokens = calibration_windows(tokenizer, calib, nsamples, seq_len, seed, cache_dir=cache_dir)
        tokens = tokens.to(model.embed.weight.device)

    n_layers = len(model.layers)
    layer_sparsity = [sparsity] * n_layers
    outlier = None
    if owl:
        sub = tokens if not owl_nsamples else tokens[: int(owl_nsamples)]
        outlier = layer_outlier_ratios(model, sub, owl_m, progress=progress)
        from .owl import owl_sparsities

        layer_sparsity = owl_sparsities(outlier, sparsity, owl_lambda)

    # exact counts per Linear (N:M fixes them by the pattern)
    names = [n for n, _ in linears]
    sizes = [m.weight.numel() for _, m in linears]
    layer_idx = [int(n.split(".")[1]) for n in names]
    counts = dict(zip(names, allocate_counts(sizes, [layer_sparsity[i] for i in layer_idx], sparsity)))

    opts = dict(blocksize=blocksize, percdamp=percdamp, refit_iters=refit_iters, dense_target=dense_target)
    if not needs_data:  # magnitude: no calibration pass
        with torch.no_grad():
            for name, mod in linears:
                cls(mod).prune(count=counts[name], prune_n=prune_n, prune_m=prune_m)
    else:
        from .driver import sequential_prune

        hessian = cls.needs_hessian or refit_iters > 0

        def make_stats_factory(i, groups):
            return lambda g: InputStats(groups[g][0][1].weight.shape[1], hessian=hessian, cross=dense_target,
                                        device=tokens.device)

        def prune_group_factory(i):
            def prune_group(g, group, stats):
                solvers = [cls(mod, stats) for _, mod in group]
                cls.prune_group(solvers, [counts[f"layers.{i}.{name}"] for name, _ in group], prune_n, prune_m, **opts)
                stats.free()
            return prune_group

        sequential_prune(model, tokens, prune_group_factory, make_stats_factory, sequential=sequential,
                         batch_size=batch_size, dense_target=dense_target, progress=progress)
    report = sparsity_report(model)
    return {
        "method": method, "sparsity": sparsity, "nm": f"{prune_n}:{prune_m}" if prune_m else None, "owl": bool(owl),
        "owl_lambda": owl_lambda if owl else None, "owl_m": owl_m if owl else None,
        "owl_nsamples": (owl_nsamples or (None if tokens is None else int(tokens.shape[0]))) if owl else None,
        "layer_target_sparsity": layer_sparsity, "layer_outlier_ratio": outlier,
        "nsamples": None if tokens is None else int(tokens.shape[0]), "seq_len": None if tokens is None else int(tokens.shape[1]),
        "seed": seed, "sequential": sequential, "blocksize": blocksize, "percdamp": percdamp,
        "refit_iters": refit_iters, "dense_target": dense_target,
        "time_s": time.time() - t0, "report": report,
    }
