"""Magnitude pruning: remove the weights of smallest |w|, per matrix or per output row.

The baseline every pruning paper compares against (e.g. Han et al. 2015); it needs
no calibration data. ``magnitude_prune_`` / ``magnitude_masks`` are the quick forms for
callers outside ``prune_`` (sparse-format tests, the IPU simulation, gradual recovery):
each matrix loses exactly ``round(sparsity * numel)`` weights (``scope="row"``: exactly
``round(sparsity * in_features)`` per output row).
"""
from __future__ import annotations

from typing import Iterable, Iterator, Optional, Tuple

import torch
import torch.nn as nn

from ..errors import UserError
from .common import InputStats, Masks, check_sparsity, lowest_k
from .solver import PruneSolver

SCOPES = ("matrix", "row")


class Magnitude(PruneSolver):
    """|w| ranking; ``scope="matrix"`` (one threshold per matrix) or ``"row"`` (per output row)."""

    def __init__(self, layer: nn.Linear, stats: Optional[InputStats] = None, scope: str = "matrix"):
        super().__init__(layer, stats)
        if scope not in SCOPES:
            raise UserError(f"magnitude scope {scope!r}: expected 'matrix' or 'row'")
        self.scope = scope

    def score(self) -> torch.Tensor:
        return self.layer.weight.detach().float().abs()

    def keep_mask(self, count: int, prune_n: int = 0, prune_m: int = 0) -> torch.Tensor:
        if self.scope == "matrix" and not prune_n:
            return ~lowest_k(self.score(), count)
        return super().keep_mask(count, prune_n, prune_m)


class MagnitudeRow(Magnitude):
    def __init__(self, layer: nn.Linear, stats: Optional[InputStats] = None):
        super().__init__(layer, stats, scope="row")


def _solvers(model, sparsity: float, scope: str, include_head: bool,
             names: Optional[Iterable[str]] = None) -> Iterator[Tuple[str, Magnitude, int]]:
    """(name, solver, weights to remove) for each selected Linear."""
    sparsity = check_sparsity(sparsity)
    wanted = set(names) if names is not None else None
    for name, mod in model.linear_layers(include_head=include_head):
        if wanted is not None and name not in wanted:
            continue
        solver = Magnitude(mod, scope=scope)
        if scope == "row":
            count = solver.rows * int(round(sparsity * solver.columns))
        else:
            count = int(round(sparsity * solver.rows * solver.columns))
        yield name, solver, count


@torch.no_grad()
def magnitude_masks(model, sparsity: float, names: Optional[Iterable[str]] = None, scope: str = "matrix",
                    include_head: bool = False) -> Masks:
    """Keep masks (on the CPU) of magnitude pruning to ``sparsity``, without changing the weights.

    Already-zero weights have the smallest magnitude, so re-pruning a pruned model to a
    higher sparsity keeps every earlier pruned position pruned (masks only shrink)."""
    return {name: solver.keep_mask(count).cpu()
            for name, solver, count in _solvers(model, sparsity, scope, include_head, names)}


@torch.no_grad()
def magnitude_prune_(model, sparsity: float, scope: str = "matrix", include_head: bool = False) -> None:
    """Zero the smallest-magnitude weights of every decoder Linear in place (and of the LM head,
    untied first, with ``include_head``)."""
    if include_head:
        model.untie_lm_head_()
    for _, solver, count in _solvers(model, sparsity, scope, include_head):
        solver.prune(count=count)
