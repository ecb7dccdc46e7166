"""Magnitude pruning: remove the weights of smallest |w|, per matrix or per output row.

The baseline every pruning paper compares against (e.g. Han et al. 2015); it needs
no calibration data.
"""
from __future__ import annotations

from typing import List, Optional, Sequence

import torch
import torch.nn as nn

from ..errors import UserError
from .common import InputStats, check_sparsity, lowest_k_mask, lowest_k_per_row, nm_mask, split_evenly


class PruneSolver:
    """One solver per ``nn.Linear``: ``add_batch`` streams calibration inputs, ``prune`` zeroes
    weights in place and returns the mask (True = pruned), ``free`` drops the statistics.

    ``stats`` may be shared by Linears that read the same input (q/k/v, gate/up)."""

    needs_stats = False
    needs_hessian = False

    def __init__(self, layer: nn.Linear, stats: Optional[InputStats] = None):
        self.layer = layer
        self.rows, self.columns = layer.weight.shape
        if stats is None and self.needs_stats:
            stats = InputStats(self.columns, hessian=self.needs_hessian, device=layer.weight.device)
        self.stats = stats

    def add_batch(self, inp: torch.Tensor, out: Optional[torch.Tensor] = None) -> None:
        if self.stats is not None:
            self.stats.add(inp)

    def score(self) -> torch.Tensor:
        raise NotImplementedError

    def select(self, count: int, prune_n: int = 0, prune_m: int = 0) -> torch.Tensor:
        """Mask with exactly ``count`` True entries (or the N:M pattern), spread evenly over rows."""
        score = self.score()
        if prune_n:
            return nm_mask(score, prune_n, prune_m)
        return lowest_k_per_row(score, split_evenly(count, self.rows))

    def prune(self, sparsity: Optional[float] = None, prune_n: int = 0, prune_m: int = 0,
              count: Optional[int] = None, **_unused) -> torch.Tensor:
        if count is None:
            count = int(round(check_sparsity(sparsity if sparsity is not None else 0.0) * self.rows * self.columns))
        mask = self.select(count, prune_n, prune_m)
        with torch.no_grad():
            self.layer.weight.masked_fill_(mask, 0.0)
        return mask

    @classmethod
    def prune_group(cls, solvers: Sequence["PruneSolver"], counts: Sequence[int], prune_n: int = 0,
                    prune_m: int = 0, **opts) -> List[torch.Tensor]:
        """Prune Linears that share one input; methods with a shared solve override this.
        ``refit_iters`` > 0 (needs the Hessian): least-squares refit of the kept weights afterwards."""
        refit_iters = int(opts.get("refit_iters", 0) or 0)
        dense = [s.layer.weight.detach().clone() for s in solvers] if refit_iters else None
        masks = [s.prune(count=c, prune_n=prune_n, prune_m=prune_m) for s, c in zip(solvers, counts)]
        if refit_iters:
            from .sparsegpt import refit_group

            refit_group(solvers, dense, masks, percdamp=opts.get("percdamp", 0.01), iters=refit_iters)
        return masks

    def free(self) -> None:
        if self.stats is not None:
            self.stats.free()
        self.stats = None


class Magnitude(PruneSolver):
    """|w| ranking; ``scope="matrix"`` (one threshold per matrix) or ``"row"`` (per output row)."""

    def __init__(self, layer: nn.Linear, stats: Optional[InputStats] = None, scope: str = "matrix"):
        super().__init__(layer, stats)
        if scope not in ("matrix", "row"):
            raise UserError(f"magnitude scope {scope!r}: expected 'matrix' or 'row'")
        self.scope = scope

    def score(self) -> torch.Tensor:
        return self.layer.weight.detach().float().abs()

    def select(self, count: int, prune_n: int = 0, prune_m: int = 0) -> torch.Tensor:
        if self.scope == "matrix" and not prune_n:
            return lowest_k_mask(self.score(), count)
        return super().select(count, prune_n, prune_m)


class MagnitudeRow(Magnitude):
    def __init__(self, layer: nn.Linear, stats: Optional[InputStats] = None):
        super().__init__(layer, stats, scope="row")
