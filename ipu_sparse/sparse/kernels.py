"""Sparse x dense matmul: the compiled CPU kernel, and the pure-torch reference (the oracle).

``sparse_matmul(x, W, bias)`` computes ``x @ W.T + bias`` for a ``SparseMatrix`` W
(fp32 accumulation whatever the value dtype; int8 values are summed widened to fp32 and each
row's sum multiplied by its scale) and returns fp32.

Backends:
* ``compiled`` -- ``ipu_sparse.sparse._kernels`` (every ``csrc/*.cpp``), built by
  ``python setup.py build_ext --inplace`` (or an install with torch importable at build time),
  else compiled once on first use and cached under ``~/.cache/ipu_sparse`` (``build.jit_load``;
  ``IPU_SPARSE_CACHE`` moves it, ``IPU_SPARSE_JIT=0`` turns it off, ``IPU_SPARSE_JIT=1`` uses it
  even when an in-place build exists). Reads the bitmap / csr16 storage directly; each format class names its
  kernel (``SparseMatrix.kernel``) and has validated its index when it was built.
* ``reference`` -- gathers ``x[:, col]``, multiplies by the values and sums each row with
  ``index_add_``; always available, used by the tests as the oracle.

``auto`` (the default) uses the compiled kernel when it is importable and the inputs are
on the CPU, and otherwise the reference, logging once why. Environment: ``IPU_SPARSE_BACKEND``
(auto/compiled/reference), ``IPU_SPARSE_ISA`` (force avx512/avx2/scalar), ``IPU_SPARSE_NO_EXT=1``
(behave as if the extension were not built, no JIT build either), ``IPU_SPARSE_JIT`` (see above).
"""
from __future__ import annotations

import logging
import os
from typing import Optional

import torch

from ..errors import UserError
from . import build
from .formats import SparseMatrix

log = logging.getLogger(__name__)

BACKENDS = ("auto", "compiled", "reference")


class KernelBinding:
    """Which sparse matmul this process runs: the chosen backend and the compiled module, loaded once.

    A loaded extension module is process-wide (like torch's own backends), so there is one
    instance, ``BINDING``; the module-level functions below are its public interface.
    """

    def __init__(self, backend: str):
        self.backend = backend
        self.ext = None        # the compiled module once loaded, else None
        self.tried = False     # whether loading was attempted
        self.reason = None     # why the compiled module is unavailable
        self.fast = None       # the module while the backend allows it (read by SparseLinear.forward)
        self.source = None     # "built in place" or "JIT-built, cached in DIR"

    def load_extension(self):
        """The compiled module, or None (the reason is in ``extension_status()``)."""
        if self.tried:
            return self.ext
        self.tried = True
        jit = os.environ.get("IPU_SPARSE_JIT", "")
        ext = None
        if os.environ.get("IPU_SPARSE_NO_EXT"):
            self.reason = "compiled kernel disabled by IPU_SPARSE_NO_EXT"
        else:
            if jit != "1":
                try:
                    from . import _kernels as ext  # built in place by setup.py build_ext
                    self.source = "built in place"
                    stale = build.newer_sources(getattr(ext, "__file__", "") or "")
                    if stale:
                        log.warning("ipu_sparse: the in-place sparse kernel is older than %s; rebuild it with "
                                    "`python setup.py build_ext --inplace`", ", ".join(stale))
                except ImportError as exc:
                    self.reason = f"compiled kernel not built in place ({exc})"
            if ext is None and jit != "0":
                try:
                    ext = build.jit_load()
                    self.source = "JIT-built, cached in " + build.jit_dir(torch.__version__)
                except Exception as jit_exc:  # compiler or headers missing, read-only cache, ...
                    self.reason = (self.reason + "; " if self.reason else "") + f"JIT build failed: {jit_exc}"
            elif ext is None:
                self.reason += "; JIT build disabled by IPU_SPARSE_JIT=0"
        if ext is not None:
            forced = os.environ.get("IPU_SPARSE_ISA")
            if forced:
                try:
                    ext.set_isa(forced)
                except RuntimeError as exc:
                    raise UserError(f"IPU_SPARSE_ISA={forced}: {exc}") from None
            self.reason = None
        else:
            log.warning("ipu_sparse: using the pure-torch sparse kernel: %s", self.reason)
        self.ext = ext
        return ext

    def extension_status(self) -> str:
        """One line: which kernel runs and why."""
        ext = self.load_extension()
        if ext is None:
            return f"reference (pure torch): {self.reason}"
        return (f"compiled ({ext.isa()}; best on this CPU: {ext.best_isa()}; threads {torch.get_num_threads()}; "
                f"{self.source})")

    def set_backend(self, name: str) -> None:
        if name not in BACKENDS:
            raise UserError(f"unknown sparse backend {name!r} ({', '.join(BACKENDS)})")
        self.backend = name
        self.fast = None  # re-resolved on the next call

    def get_backend(self) -> str:
        return self.backend

    def set_isa(self, name: str) -> None:
        """Force the compiled kernel's code path (``avx512``, ``avx2``, ``scalar``); for tests and benchmarks."""
        ext = self.load_extension()
        if ext is None:
            raise UserError(f"no compiled kernel: {self.reason}")
        try:
            ext.set_isa(name)
        except RuntimeError as exc:
            raise UserError(str(exc)) from None

    def fast_extension(self):
        """The compiled module when the backend is ``auto`` or ``compiled`` and it is available, else None."""
        if self.backend == "reference":
            self.fast = None
            return None
        ext = self.ext if self.tried else self.load_extension()
        if ext is None and self.backend == "compiled":
            raise UserError(f"compiled sparse kernel requested but unavailable: {self.reason}")
        self.fast = ext
        return ext

    def use_compiled(self, x: torch.Tensor, backend: str) -> bool:
        if backend == "reference":
            return False
        ext = self.load_extension()
        if backend == "compiled":
            if ext is None:
                raise UserError(f"compiled sparse kernel requested but unavailable: {self.reason}")
            return True
        return ext is not None and x.device.type == "cpu" and not (torch.is_grad_enabled() and x.requires_grad)


BINDING = KernelBinding(os.environ.get("IPU_SPARSE_BACKEND", "auto"))
load_extension = BINDING.load_extension
extension_status = BINDING.extension_status
set_backend = BINDING.set_backend
get_backend = BINDING.get_backend
set_isa = BINDING.set_isa
fast_extension = BINDING.fast_extension


def reference_matmul(x: torch.Tensor, w: SparseMatrix, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Pure-torch ``x (B, cols) @ W.T (+ bias)`` in fp32, from the stored index (no dense W)."""
    cache = getattr(w, "_ref_index", None)
    if cache is None:
        cache = (w.row_indices().to(x.device), w.column_indices().to(x.device))
        w._ref_index = cache
    rows_idx, cols_idx = cache
    xf = x.float()
    prod = xf[:, cols_idx] * w.values.float()  # (B, nnz)
    y = torch.zeros(x.shape[0], w.rows, dtype=torch.float32, device=x.device)
    y.index_add_(1, rows_idx, prod)  # (B, rows)
    if w.dtype == torch.int8:  # int8 values: W[r, c] = q * scales[r]
        y *= w.scales.to(y.device)
    if bias is not None:
        y += bias.float()
    return y


def sparse_matmul(x: torch.Tensor, w: SparseMatrix, bias: Optional[torch.Tensor] = None,
                  backend: Optional[str] = None) -> torch.Tensor:
    """``x (B, cols) @ W.T + bias`` -> (B, rows) fp32."""
    backend = backend or BINDING.backend
    if not BINDING.use_compiled(x, backend):
        return reference_matmul(x, w, bias)
    ext = BINDING.ext
    xf = x if (x.dtype == torch.float32 and x.is_contiguous()) else x.float().contiguous()
    b = None if bias is None else (bias if bias.dtype == torch.float32 else bias.float())
    if w.kernel is None:  # a format without a compiled kernel
        return reference_matmul(x, w, bias)
    return w.compiled_matmul(ext, xf, b)
