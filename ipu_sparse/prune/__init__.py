"""Pruning: magnitude, Wanda, SparseGPT (unstructured and N:M), OWL layer ratios, one driver.

``prune_(model, PruneConfig(...), calib)`` prunes in place; ``magnitude_prune_`` / ``magnitude_masks``
are the data-free quick forms. Masks are keep masks (True = kept) everywhere: see ``common``."""
from .api import prune_
from .common import Masks, format_report, sparsity_report
from .config import METHODS, PruneConfig
from .magnitude import magnitude_masks, magnitude_prune_

__all__ = ["METHODS", "Masks", "PruneConfig", "prune_", "magnitude_masks", "magnitude_prune_", "sparsity_report",
           "format_report"]
