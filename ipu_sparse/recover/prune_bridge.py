"""Re-pruning between gradual phases with the project's pruning methods (``ipu_sparse.prune``)."""
from __future__ import annotations

import torch

from ..errors import UserError
from .masks import Masks, masks_from_zeros


def prune_with_project_method(student, sparsity: float, method: str, calib_ids: torch.Tensor) -> Masks:
    """Prune ``student`` in place with ``ipu_sparse.prune.prune_`` on ``calib_ids`` (n, L); return its masks."""
    try:
        from ..prune.api import prune_
    except ImportError:
        raise UserError(f"pruning method {method!r} needs ipu_sparse.prune, which is not available") from None
    prune_(student, method=method, sparsity=sparsity, calib=calib_ids, progress=False)
    return masks_from_zeros(student)
