"""SparseGPT: one-shot pruning with an OBS-style column-block solve.

Frantar & Alistarh, "SparseGPT: Massive Language Models Can Be Accurately Pruned in
One-Shot", ICML 2023 (arXiv:2301.00774), Algorithm 1: for each block of ``blocksize``
columns choose the mask by w^2 / [H^-1]_cc^2 (Eq. 3 / adaptive mask selection), then
prune column by column and spread each column's error over the not-yet-visited columns
with the rows of the upper Cholesky factor of the damped inverse Hessian
H = X^T X + lambda * I, lambda = percdamp * mean(diag H).

Differences from the reference code, each measured in docs/pruning.md:
* Linears that read the same input (q/k/v, gate/up) share one Hessian and one inverse;
  their weights are stacked row-wise and solved together (rows are independent given H),
  masks still chosen per matrix with an exact count.
* Exact counts per block (the reference thresholds with ``<=`` and can prune extra ties).
* Optional ``refit`` (``refit.masked_refit``): after the mask is fixed, a few conjugate-gradient
  steps on the masked least-squares problem min ||X (W - W0)^T|| (rows independent) move the kept
  weights to the optimum the greedy column sweep only approximates.
* Optional dense target (``dense_target``): W0 is replaced by argmin ||X_p W^T - X_d W0^T||,
  i.e. W0 G^T H^-1 with G = X_p^T X_d, so each layer also corrects the error the
  already-pruned layers put into its input.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import torch

from .common import split_proportional
from .refit import damped, masked_refit, write_back
from .solver import PruneSolver


def inverse_cholesky_upper(H: torch.Tensor) -> torch.Tensor:
    """Upper Cholesky factor U of H^-1 (H^-1 = U^T U), as Algorithm 1 uses it.

    H^-1 comes from a triangular solve with H's Cholesky factor (several times faster on CPU than
    ``cholesky_inverse``), in the precision of ``H`` (float64 here)."""
    L = torch.linalg.cholesky(H)
    eye = torch.eye(H.shape[0], dtype=H.dtype, device=H.device)
    Linv = torch.linalg.solve_triangular(L, eye, upper=False)
    Hinv = Linv.t() @ Linv
    return torch.linalg.cholesky(Hinv, upper=True)


def sparsegpt_solve(W: torch.Tensor, Hinv: torch.Tensor, segments: Sequence[Tuple[int, int, int]],
                    prune_n: int = 0, prune_m: int = 0, blocksize: int = 128,
                    subblock: int = 16) -> Tuple[torch.Tensor, torch.Tensor]:
    """Algorithm 1 on ``W`` (rows, cols), fp32; returns (W, keep mask).

    ``segments``: (row_start, row_end, count) per stacked matrix; each loses exactly ``count``
    weights, split over column blocks in proportion to their widths (unused with N:M).
    Works on W^T so that a column is a contiguous row: the per-column rank-1 update is then a
    contiguous ``addr_`` (about 100x faster on CPU than updating a strided column slice), and
    within a block the error reaches columns beyond a ``subblock`` by one matmul (the same lazy
    update the paper uses between blocks; exact, only the order of additions differs). N:M
    groups must not straddle sub-blocks, so ``subblock`` is rounded to a multiple of M."""
    rows, cols = W.shape
    if prune_m:
        subblock = max(prune_m, subblock // prune_m * prune_m)
        blocksize = max(prune_m, blocksize // prune_m * prune_m)
    Wt = W.t().contiguous()  # (cols, rows)
    maskt = torch.zeros_like(Wt, dtype=torch.bool)  # True = pruned inside the solve, as in the reference code
    starts = list(range(0, cols, blocksize))
    widths = [min(blocksize, cols - s) for s in starts]
    per_block = [split_proportional(c, widths) for (_, _, c) in segments]
    for b, i1 in enumerate(starts):
        i2 = i1 + widths[b]
        W1 = Wt[i1:i2].clone()  # (bs, rows)
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        d = torch.diagonal(Hinv1)  # (bs,)
        mask1 = torch.zeros_like(W1, dtype=torch.bool)
        if prune_n == 0:
            score = W1.pow(2) / d.pow(2).view(-1, 1)  # OBS saliency w^2 / [H^-1]_cc^2, (bs, rows)
            for s, (r0, r1, _) in enumerate(segments):
                k = per_block[s][b]
                if k:
                    seg = score[:, r0:r1].t().reshape(-1)  # row-major order of the original matrix
                    idx = torch.sort(seg, stable=True)[1][:k]
                    sel = torch.zeros(seg.numel(), dtype=torch.bool, device=W.device)
                    sel[idx] = True
                    mask1[:, r0:r1] = sel.view(r1 - r0, -1).t()
        bs = widths[b]
        for j1 in range(0, bs, subblock):  # rank-1 updates inside a sub-block, one matmul after it
            j2 = min(bs, j1 + subblock)
            for i in range(j1, j2):
                if prune_n and i % prune_m == 0:
                    sc = W1[i:i + prune_m].pow(2) / d[i:i + prune_m].pow(2).view(-1, 1)  # (m, rows)
                    idx = torch.sort(sc, dim=0, stable=True)[1][: prune_m - prune_n]  # (m-n, rows)
                    mask1[i:i + prune_m].scatter_(0, idx, True)
                w = W1[i]
                q = w.masked_fill(mask1[i], 0.0)
                err = (w - q) / d[i]  # (rows,)
                W1[i:j2].addr_(Hinv1[i, i:j2], err, alpha=-1.0)  # spread the error over later columns
                W1[i] = q
                Err1[i] = err
            if j2 < bs:
                W1[j2:].addmm_(Hinv1[j1:j2, j2:].t(), Err1[j1:j2], alpha=-1.0)
        Wt[i1:i2] = W1
        maskt[i1:i2] = mask1
        Wt[i2:].addmm_(Hinv[i1:i2, i2:].t(), Err1, alpha=-1.0)  # lazy batch update of later blocks
    Wt.masked_fill_(maskt, 0.0)
    return Wt.t().contiguous(), (~maskt).t().contiguous()


class SparseGPT(PruneSolver):
    needs_stats = True
    needs_hessian = True

    def prune(self, sparsity: Optional[float] = None, prune_n: int = 0, prune_m: int = 0,
              count: Optional[int] = None, blocksize: int = 128, percdamp: float = 0.01, refit_iters: int = 0,
              dense_target: bool = False) -> torch.Tensor:
        if count is None:
            count = self.count_for(sparsity)
        return self.prune_group([self], [count], prune_n, prune_m, blocksize=blocksize, percdamp=percdamp,
                                refit_iters=refit_iters, dense_target=dense_target)[0]

    @staticmethod
    def options(config) -> Dict[str, object]:
        return dict(blocksize=config.blocksize, percdamp=config.percdamp, refit_iters=config.refit_iters,
                    dense_target=config.dense_target)

    @classmethod
    def prune_group(cls, solvers: Sequence[PruneSolver], counts: Sequence[int], prune_n: int = 0,
                    prune_m: int = 0, blocksize: int = 128, percdamp: float = 0.01, refit_iters: int = 0,
                    dense_target: bool = False) -> List[torch.Tensor]:
        stats = solvers[0].stats
        factors = stats.cache.get(percdamp) if stats.cache is not None else None
        if factors is None:  # statistics shared by several solves (``stats.cache`` a dict) factor H once
            Hd, dead = damped(stats.H, percdamp)
            factors = (Hd, dead, inverse_cholesky_upper(Hd).float())
            if stats.cache is not None:
                stats.cache[percdamp] = factors
        Hd, dead, Hinv = factors
        W0 = torch.cat([s.layer.weight.detach().double() for s in solvers], 0)  # (sum rows, cols)
        if dense_target and stats.G is not None:
            # argmin_W ||X_p W^T - X_d W0^T||: W0 G^T (H + lambda I)^-1, G = X_p^T X_d
            W0 = torch.linalg.solve(Hd, stats.G.double() @ W0.t()).t()
        W0[:, dead] = 0.0
        segments, r = [], 0
        for s, c in zip(solvers, counts):
            segments.append((r, r + s.rows, int(c)))
            r += s.rows
        W, keep = sparsegpt_solve(W0.float().clone(), Hinv, segments, prune_n, prune_m, blocksize)
        if refit_iters:
            W = masked_refit(W, W0.float(), Hd.float(), keep, refit_iters)
        return write_back(solvers, W, keep)

