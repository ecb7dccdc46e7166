"""Pruning: magnitude, Wanda, SparseGPT (unstructured and N:M), OWL layer ratios, one driver."""
from .api import METHODS, prune_
from .common import format_report, sparsity_report

__all__ = ["METHODS", "prune_", "sparsity_report", "format_report"]
