"""``PruneSolver``: the interface every pruning method implements, one object per ``nn.Linear``.

As in the SparseGPT/Wanda reference code: ``add_batch`` streams calibration inputs into
statistics, ``prune`` zeroes weights in place, ``free`` drops the statistics. A method defines
``score`` (lower = pruned first) or overrides ``prune_group`` when it updates the kept weights.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import torch
import torch.nn as nn

from .common import InputStats, check_sparsity, lowest_k_per_row, nm_lowest, split_evenly
from .refit import refit_group


class PruneSolver:
    """One solver per ``nn.Linear``; ``prune`` returns its keep mask (True = kept).

    ``stats`` may be shared by Linears that read the same input (q/k/v, gate/up)."""

    needs_stats = False    # needs calibration inputs (Wanda, SparseGPT)
    needs_hessian = False  # needs X^T X, not only the column norms (SparseGPT)

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

    def count_for(self, sparsity: Optional[float]) -> int:
        """Weights to remove from this Linear for ``sparsity``."""
        return int(round(check_sparsity(sparsity if sparsity is not None else 0.0) * self.rows * self.columns))

    def keep_mask(self, count: int, prune_n: int = 0, prune_m: int = 0) -> torch.Tensor:
        """Keep mask with exactly ``count`` False entries (or the N:M pattern), spread evenly over rows."""
        score = self.score()
        if prune_n:
            return ~nm_lowest(score, prune_n, prune_m)
        return ~lowest_k_per_row(score, split_evenly(count, self.rows))

    def prune(self, sparsity: Optional[float] = None, prune_n: int = 0, prune_m: int = 0,
              count: Optional[int] = None) -> torch.Tensor:
        if count is None:
            count = self.count_for(sparsity)
        keep = self.keep_mask(count, prune_n, prune_m)
        with torch.no_grad():
            self.layer.weight.masked_fill_(~keep, 0.0)
        return keep

    @staticmethod
    def options(config) -> Dict[str, object]:
        """The keyword options of ``prune_group`` taken from a ``PruneConfig``."""
        return dict(percdamp=config.percdamp, refit_iters=config.refit_iters)

    @classmethod
    def prune_group(cls, solvers: Sequence["PruneSolver"], counts: Sequence[int], prune_n: int = 0,
                    prune_m: int = 0, percdamp: float = 0.01, refit_iters: int = 0) -> List[torch.Tensor]:
        """Prune Linears that share one input; methods with a shared solve override this.
        ``refit_iters`` > 0 (needs the Hessian): least-squares refit of the kept weights afterwards."""
        dense = [s.layer.weight.detach().clone() for s in solvers] if refit_iters else None
        masks = [s.prune(count=c, prune_n=prune_n, prune_m=prune_m) for s, c in zip(solvers, counts)]
        if refit_iters:
            refit_group(solvers, dense, masks, percdamp=percdamp, iters=refit_iters)
        return masks

    def free(self) -> None:
        if self.stats is not None:
            self.stats.free()
        self.stats = None
