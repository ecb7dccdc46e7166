"""Wanda: prune by |W_ij| * ||X_j||_2, compared within each output row.

Sun, Liu, Bair, Kolter, "A Simple and Effective Pruning Approach for Large Language
Models", 2023 (arXiv:2306.11695), Eq. (1): S_ij = |W_ij| * ||X_j||_2, with the
comparison group being each output row (Sec. 3). No weight update.
"""
from __future__ import annotations

import torch

from .solver import PruneSolver


class Wanda(PruneSolver):
    needs_stats = True
    needs_hessian = False

    def score(self) -> torch.Tensor:
        # ||X_j||^2 over every calibration token (scale does not change a per-row ranking).
        col_norm = self.stats.sq.to(torch.float32).sqrt().view(1, -1)  # (1, in)
        return self.layer.weight.detach().float().abs() * col_norm  # (out, in)
