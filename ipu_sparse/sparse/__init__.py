"""Sparse storage and CPU sparse inference.

``formats``: one class per format (bitmap, compact; csr16) owning its bytes, CSR view, kernel and
validation; the ``FORMATS`` registry; exact dense round trip, ``format_nbytes``.
``kernels``: compiled sparse x dense matmul with a pure-torch reference.
``linear``: ``SparseLinear``, ``sparsify_(model, SparseConfig(...), filter_fn)``; dense heads stored
in 16 bits (``LowPrecisionLinear``) or int8 (``QuantizedLinear``).
``checkpoint``: safetensors + JSON sparse checkpoints. ``accounting``: bytes and FLOPs.
"""
from __future__ import annotations

from .formats import FORMATS, Bitmap, CSR16, FormatError, SparseMatrix, format_nbytes, from_dense
from .linear import LowPrecisionLinear, QuantizedLinear, SparseConfig, SparseLinear, sparsify_

__all__ = ["FORMATS", "Bitmap", "CSR16", "FormatError", "SparseMatrix", "format_nbytes", "from_dense", "SparseLinear",
           "LowPrecisionLinear", "QuantizedLinear", "SparseConfig", "sparsify_"]
