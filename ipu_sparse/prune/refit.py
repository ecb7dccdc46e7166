"""Masked least-squares refit of the kept weights, shared by every pruning method.

Once a mask is fixed, the kept weights of each row solve min ||X (W_r - T_r)^T||^2 over the
calibration inputs X (H = X^T X), with the pruned positions held at zero; rows are independent.
``masked_refit`` runs a few conjugate-gradient steps on it (all rows at once). SparseGPT uses it
after its greedy column sweep; any other method through ``refit_group`` (e.g. Wanda's mask,
which has no weight update). Masks are keep masks (True = kept, see ``common``).
"""
from __future__ import annotations

from typing import List, Sequence, Tuple

import torch


def damped(H: torch.Tensor, percdamp: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """Copy of H with dead inputs (zero diagonal) made harmless and ``percdamp`` damping added."""
    H = H.clone().double()
    dead = torch.diagonal(H) == 0
    H[dead, dead] = 1.0
    damp = percdamp * torch.mean(torch.diagonal(H))
    H += damp * torch.eye(H.shape[0], dtype=H.dtype, device=H.device)
    return H, dead


def masked_refit(W: torch.Tensor, target: torch.Tensor, H: torch.Tensor, keep: torch.Tensor,
                 iters: int = 30) -> torch.Tensor:
    """Conjugate gradient on min_W sum_r (W_r - T_r) H (W_r - T_r)^T with W = 0 where ``keep`` is False,
    all rows at once (each row is an independent quadratic; step sizes are per row). Starts from
    ``W``; the objective never increases."""
    keep = keep.to(W.dtype)
    W = W * keep
    R = ((target - W) @ H) * keep  # negative gradient (rows, cols)
    P = R.clone()
    rs = (R * R).sum(1)
    for _ in range(iters):
        AP = (P @ H) * keep
        pap = (P * AP).sum(1)
        alpha = torch.where(pap > 0, rs / pap.clamp_min(1e-30), torch.zeros_like(rs))
        W.addcmul_(alpha.view(-1, 1), P)
        R.addcmul_(alpha.view(-1, 1), AP, value=-1.0)
        rs_new = (R * R).sum(1)
        beta = torch.where(rs > 0, rs_new / rs.clamp_min(1e-30), torch.zeros_like(rs))
        P = R + beta.view(-1, 1) * P
        rs = rs_new
    return W


def refit_group(solvers: Sequence, dense: Sequence[torch.Tensor], masks: Sequence[torch.Tensor],
                percdamp: float = 0.01, iters: int = 30) -> None:
    """Refit the kept weights of ``solvers`` (Linears sharing one input and its Hessian) towards their
    ``dense`` weights: min ||X (W - W_dense)^T|| with the keep ``masks`` fixed."""
    Hd, _ = damped(solvers[0].stats.H, percdamp)
    W0 = torch.cat([w.float() for w in dense], 0)
    keep = torch.cat(list(masks), 0)
    W = torch.cat([s.layer.weight.detach().float() for s in solvers], 0)
    W = masked_refit(W, W0, Hd.float(), keep, iters)
    write_back(solvers, W, keep)


def write_back(solvers: Sequence, W: torch.Tensor, keep: torch.Tensor) -> List[torch.Tensor]:
    """Copy the row-stacked ``W`` (zeros where ``keep`` is False) into the solvers' Linears;
    return each one's keep mask."""
    masks, r = [], 0
    with torch.no_grad():
        for s in solvers:
            w = s.layer.weight
            w.copy_(W[r:r + s.rows].to(w.dtype))
            w.masked_fill_(~keep[r:r + s.rows], 0.0)
            masks.append(keep[r:r + s.rows].clone())
            r += s.rows
    return masks
