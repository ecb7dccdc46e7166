"""OWL: outlier-weighted layerwise sparsity ratios.

Yin et al., "Outlier Weighed Layerwise Sparsity (OWL): A Missing Secret Sauce for
Pruning LLMs to High Sparsity", 2023 (arXiv:2310.05175), Sec. 3: the layer outlier
ratio D_l is the fraction of Wanda scores |W_ij| * ||X_j|| above ``m`` times the layer's
mean score; layers with more outliers are pruned less:
    r_l = lambda-scaled min-max normalisation of D_l, shifted so the mean density is 1 - s,
giving densities in [1 - s - lambda, 1 - s + lambda] (the paper's defaults: m = 5, lambda = 0.08).
The mean over layers equals ``s``; ``allocate_counts`` then makes the total exact.
"""
from __future__ import annotations

import sys
from typing import List, Sequence

import torch
from tqdm import tqdm

from ..errors import UserError
from .common import InputStats
from .driver import hooked_pass, linear_groups


def outlier_ratio(scores: Sequence[torch.Tensor], m: float) -> float:
    """Fraction of all entries of ``scores`` (one layer's Linears) above ``m`` x their mean."""
    flat = torch.cat([s.reshape(-1).float() for s in scores])
    return float((flat > m * flat.mean()).float().mean())


def owl_sparsities(outlier_ratios: Sequence[float], sparsity: float, lam: float = 0.08) -> List[float]:
    """Per-layer sparsities from per-layer outlier ratios (mean equal to ``sparsity``)."""
    if lam < 0:
        raise UserError(f"OWL lambda {lam} must be >= 0")
    d = torch.tensor(list(outlier_ratios), dtype=torch.float64)
    span = float(d.max() - d.min())
    if span == 0.0 or lam == 0.0:
        return [float(sparsity)] * len(d)
    density = (d - d.min()) / span * (2 * lam)
    density = density - density.mean() + (1.0 - sparsity)
    out = (1.0 - density).clamp(0.0, 0.999)
    # clamping can move the mean; put the difference back on the unclamped layers
    free = (out > 0.0) & (out < 0.999)
    if free.any():
        out[free] += (sparsity * len(out) - float(out.sum())) / int(free.sum())
    return [float(v) for v in out]


def layer_outlier_ratios(model, tokens: torch.Tensor, m: float = 5.0, progress: bool = False) -> List[float]:
    """OWL outlier ratio of every decoder layer, from a dense pass (Wanda scores per Linear)."""
    L = tokens.shape[1]
    cos, sin = model.rope(torch.arange(L, device=tokens.device))
    ratios = []
    with torch.inference_mode():
        x = model.embed(tokens)  # (n, L, D)
        for layer in tqdm(model.layers, desc="OWL outlier ratios", unit="layer", file=sys.stderr, disable=not progress):
            groups = linear_groups(layer, x[:1, : min(L, 8)], cos[: min(L, 8)], sin[: min(L, 8)])
            leaders = {id(g[0][1]): gi for gi, g in enumerate(groups)}
            stats = [InputStats(g[0][1].weight.shape[1], device=x.device) for g in groups]
            x = hooked_pass(layer, x, cos, sin, leaders, lambda gi, inp: stats[gi].add(inp))
            scores = [mod.weight.detach().float().abs() * stats[gi].sq.float().sqrt().view(1, -1)
                      for gi, g in enumerate(groups) for _, mod in g]
            ratios.append(outlier_ratio(scores, m))
    return ratios
