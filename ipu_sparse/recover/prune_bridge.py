"""Re-pruning between gradual phases with the project's pruning methods (``ipu_sparse.prune``)."""
from __future__ import annotations

import torch

from ..prune import PruneConfig, prune_
from .masks import Masks, masks_from_zeros


def prune_with_project_method(student, sparsity: float, method: str, calib_ids: torch.Tensor) -> Masks:
    """Prune ``student`` in place with ``ipu_sparse.prune.prune_`` on ``calib_ids`` (n, L); return its masks."""
    prune_(student, PruneConfig(method=method, sparsity=sparsity), calib_ids, progress=False)
    return masks_from_zeros(student)
