"""Pieces every pruning method shares: exact-count selection, N:M patterns, streamed
input statistics and the sparsity report.

Masks (the one convention of the whole package): a sparsity mask is a bool tensor shaped
like the weight, ``True`` where the weight is KEPT and ``False`` where it is pruned (the
convention of ``torch.nn.utils.prune`` and torchao); ``Masks`` maps decoder-Linear names
(``model.linear_layers()``) to them. Solvers return keep masks, ``recover`` holds them fixed
during training, checkpoints store them. The ``lowest_*`` helpers below are *selections*
(``True`` = among the lowest scores, i.e. to be pruned); solvers negate them into keep masks.

"Exact sparsity": a matrix asked for sparsity ``s`` loses exactly ``k`` weights, where
the ``k`` of all matrices add up to ``round(s * total)``; ties in a score are broken
by position (stable sort), so a mask is a deterministic function of its inputs.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import torch

from ..errors import UserError


# ----- validation -------------------------------------------------------------------
def check_sparsity(sparsity) -> float:
    try:
        s = float(sparsity)
    except (TypeError, ValueError):
        raise UserError(f"sparsity {sparsity!r} is not a number") from None
    if not (0.0 <= s < 1.0):
        raise UserError(f"sparsity {s} is outside [0, 1)")
    return s


def parse_nm(nm) -> Tuple[int, int]:
    """``"2:4"`` or ``(2, 4)`` -> (n, m): keep ``n`` weights in every ``m`` consecutive inputs."""
    if isinstance(nm, str):
        parts = nm.split(":")
        try:
            n, m = (int(p) for p in parts)
            if len(parts) != 2:
                raise ValueError
        except ValueError:
            raise UserError(f"N:M pattern {nm!r}: expected two integers like 2:4") from None
    else:
        try:
            n, m = (int(v) for v in nm)
        except (TypeError, ValueError):
            raise UserError(f"N:M pattern {nm!r}: expected two integers like (2, 4)") from None
    if n <= 0 or m <= 0:
        raise UserError(f"N:M pattern {n}:{m}: N and M must be positive")
    if n >= m:
        raise UserError(f"N:M pattern {n}:{m}: N must be smaller than M (N weights kept out of every M)")
    return n, m


def check_nm_width(name: str, in_features: int, m: int) -> None:
    if in_features % m:
        raise UserError(f"{name}: input width {in_features} is not divisible by M={m} of the N:M pattern")


# ----- integer bookkeeping ----------------------------------------------------------
def split_evenly(total: int, parts: int) -> List[int]:
    """``total`` split into ``parts`` integers differing by at most one (larger ones first)."""
    base, extra = divmod(int(total), int(parts))
    return [base + (1 if i < extra else 0) for i in range(parts)]


def split_proportional(total: int, weights: Sequence[float]) -> List[int]:
    """Integers proportional to ``weights`` that add up to ``total`` (largest remainder; ties by position)."""
    wsum = float(sum(weights))
    if wsum <= 0:
        return [0] * len(weights)
    ideal = [total * w / wsum for w in weights]
    out = [int(x) for x in ideal]
    order = sorted(range(len(ideal)), key=lambda i: (-(ideal[i] - out[i]), i))
    for i in order[: int(total) - sum(out)]:
        out[i] += 1
    return out


def allocate_counts(sizes: Sequence[int], sparsities: Sequence[float], total_sparsity: Optional[float] = None) -> List[int]:
    """Weights to remove from each matrix: about ``sizes[j] * sparsities[j]``, scaled and rounded
    (largest remainder, ties by position) so that the sum is exactly
    ``round(total_sparsity * sum(sizes))`` (default: the size-weighted mean sparsity)."""
    sizes = [int(s) for s in sizes]
    ideal = [s * float(p) for s, p in zip(sizes, sparsities)]
    isum = sum(ideal)
    total = int(round(isum if total_sparsity is None else total_sparsity * sum(sizes)))
    total = min(total, sum(sizes))
    if isum > 0:
        ideal = [min(float(s), x * total / isum) for s, x in zip(sizes, ideal)]
    out = [int(x) for x in ideal]
    order = sorted(range(len(ideal)), key=lambda i: (-(ideal[i] - int(ideal[i])), i))
    need = total - sum(out)
    while need > 0:  # one pass normally; again only when capped matrices are full
        progressed = False
        for i in order:
            if need == 0:
                break
            if out[i] < sizes[i]:
                out[i] += 1
                need -= 1
                progressed = True
        if not progressed:
            break
    return out


# ----- masks and selections ------------------------------------------------------------
Masks = Dict[str, torch.Tensor]  # decoder-Linear name -> keep mask (True = kept)


def lowest_k(score: torch.Tensor, k: int) -> torch.Tensor:
    """Selection of the ``k`` smallest entries of ``score`` (whole tensor); ties go to the lower index."""
    flat = score.reshape(-1)
    mask = torch.zeros(flat.numel(), dtype=torch.bool, device=score.device)
    if k > 0:
        idx = torch.sort(flat, stable=True)[1][:k]
        mask[idx] = True
    return mask.view(score.shape)


def lowest_k_per_row(score: torch.Tensor, k_rows: Sequence[int]) -> torch.Tensor:
    """Selection of the ``k_rows[r]`` smallest entries of each row ``r``; ties go to the lower column."""
    rows, cols = score.shape
    ks = torch.as_tensor(list(k_rows), dtype=torch.long, device=score.device).view(rows, 1)
    idx = torch.sort(score, dim=1, stable=True)[1]  # (rows, cols) column order by score
    take = torch.arange(cols, device=score.device).view(1, cols) < ks  # (rows, cols)
    mask = torch.zeros_like(take)
    mask.scatter_(1, idx, take)
    return mask


def nm_lowest(score: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """N:M selection: in every group of ``m`` consecutive inputs of a row, the ``m - n`` lowest scores."""
    rows, cols = score.shape
    groups = score.reshape(rows, cols // m, m)  # (rows, cols/m, m)
    idx = torch.sort(groups, dim=-1, stable=True)[1]
    take = (torch.arange(m, device=score.device) < (m - n)).expand_as(idx)
    mask = torch.zeros_like(take)
    mask.scatter_(-1, idx, take)
    return mask.reshape(rows, cols)


def is_nm(weight: torch.Tensor, n: int, m: int) -> bool:
    """Whether every group of ``m`` consecutive inputs of every row has at most ``n`` non-zeros."""
    rows, cols = weight.shape
    nz = (weight.reshape(rows, cols // m, m) != 0).sum(-1)
    return bool((nz <= n).all())


# ----- streamed input statistics -------------------------------------------------------
class InputStats:
    """Statistics of one Linear input, streamed over calibration batches.

    ``sq``: sum of x_j^2 per input column (Wanda's ||X_j||^2).  ``H``: X^T X (fp32, summed over
    every token; SparseGPT's Hessian up to the constant 2/n, which its damping rule ignores).
    ``G``: X_pruned^T X_dense when a dense target is used (see ``sparsegpt.dense_target``).
    Linears fed the same tensor (q/k/v, gate/up) share one object, so each is computed once.
    """

    def __init__(self, columns: int, hessian: bool = False, cross: bool = False, device=None):
        self.columns = columns
        self.tokens = 0
        self.sq = torch.zeros(columns, dtype=torch.float64, device=device)
        self.H = torch.zeros(columns, columns, dtype=torch.float32, device=device) if hessian else None
        self.G = torch.zeros(columns, columns, dtype=torch.float32, device=device) if cross else None
        self.cache: Optional[Dict[float, tuple]] = None  # a dict: solvers may keep factors of H in it (reused stats)

    def add(self, inp: torch.Tensor, dense_inp: Optional[torch.Tensor] = None, chunk: int = 16384) -> None:
        x = inp.reshape(-1, inp.shape[-1]).float()  # (tokens, columns)
        xd = dense_inp.reshape(-1, dense_inp.shape[-1]).float() if dense_inp is not None else None
        for s in range(0, x.shape[0], chunk):
            xs = x[s:s + chunk]
            if self.H is None:
                self.sq += xs.double().pow(2).sum(0)
            else:
                self.H.addmm_(xs.t(), xs)  # batched X^T X: one matmul per chunk of tokens
            if self.G is not None and xd is not None:
                self.G.addmm_(xs.t(), xd[s:s + chunk])
        if self.H is not None:
            self.sq = torch.diagonal(self.H).double().clone()
        self.tokens += x.shape[0]

    def free(self) -> None:
        self.H = self.G = self.cache = None


# ----- reporting -------------------------------------------------------------------------
def sparsity_report(model) -> Dict[str, object]:
    """Zeros per decoder Linear, per layer, over all decoder Linears and over all parameters."""
    per_linear: Dict[str, Dict[str, float]] = {}
    per_layer: Dict[str, Dict[str, float]] = {}
    lin_zeros = lin_total = 0
    for name, mod in model.linear_layers():
        w = mod.weight.detach()
        z, n = int((w == 0).sum()), w.numel()
        per_linear[name] = {"zeros": z, "numel": n, "sparsity": z / n}
        layer = ".".join(name.split(".")[:2])
        entry = per_layer.setdefault(layer, {"zeros": 0, "numel": 0})
        entry["zeros"] += z
        entry["numel"] += n
        lin_zeros += z
        lin_total += n
    for entry in per_layer.values():
        entry["sparsity"] = entry["zeros"] / entry["numel"]
    seen = set()
    all_zeros = all_total = 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        all_zeros += int((p.detach() == 0).sum())
        all_total += p.numel()
    return {
        "linear": {"zeros": lin_zeros, "numel": lin_total, "sparsity": lin_zeros / max(1, lin_total)},
        "all_params": {"zeros": all_zeros, "numel": all_total, "sparsity": all_zeros / max(1, all_total)},
        "per_layer": per_layer,
        "per_linear": per_linear,
    }


def format_report(report: Dict[str, object]) -> str:
    lines = [f"{'layer':<12} {'sparsity':>9} {'zeros':>10} {'weights':>10}"]
    for layer, e in report["per_layer"].items():
        lines.append(f"{layer:<12} {e['sparsity']:>9.4f} {e['zeros']:>10d} {e['numel']:>10d}")
    lin, allp = report["linear"], report["all_params"]
    lines.append(f"{'decoder Linears':<16} {lin['sparsity']:.4f} ({lin['zeros']}/{lin['numel']})")
    lines.append(f"{'all parameters':<16} {allp['sparsity']:.4f} ({allp['zeros']}/{allp['numel']})")
    return "\n".join(lines)
