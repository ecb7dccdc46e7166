"""Pointwise (1x1-block) sparse matmul: the PopART custom op on IPU, a CPU reference elsewhere.

``IpuSparseLinear`` replaces an ``nn.Linear`` whose weight has exact zeros (or a sparse module
exposing ``to_csr() -> (row_ptr, col_idx, values)``). Inside ``forward``:

* on IPU (``poptorch.isRunningOnIpu()``): ``poptorch.custom_op([x, values], "SparseMatMul",
  "ipu_sparse", 1, ...)`` (a domain of our own: PopART's custom-op guide forbids ``ai.graphcore``). The non-zero values are a *weight input* (a Parameter), so they
  live in the initializer file, not in the ONNX protobuf (capped at 2 GB). The pattern (row
  pointers + column indices) is written out of band by ``export_patterns_`` and passed as a
  file path plus a content hash; the C++ op (``popart_ops/``) compiles it into the program.
* elsewhere: a CPU reference, ``torch.sparse_csr`` @ dense, equal to ``F.linear`` on the
  dense weight with exact zeros.

poptorch is never imported here: if it has not been imported by the IPU entry point, we are
not running on an IPU.
"""
from __future__ import annotations

import hashlib
import os
import struct
import sys
import warnings
from pathlib import Path
from typing import Callable, Optional, Tuple

import numpy as np
import torch
import torch.nn as nn

from ..errors import UserError
from ..fileio import atomic_write_bytes
from ..model import set_module
from ..sparse.formats import check_csr, csr_from_dense
from .opcheck import active_tracer

PATTERN_MAGIC = b"IPUSPAT1"
PATTERN_VERSION = 1
OP_NAME, OP_DOMAIN, OP_VERSION = "SparseMatMul", "ipu_sparse", 1  # must match SparseMatMulId in popart_ops/


def running_on_ipu() -> bool:
    poptorch = sys.modules.get("poptorch")
    return bool(poptorch is not None and poptorch.isRunningOnIpu())


class IpuSparseLinear(nn.Module):
    """y = x W^T (+ b) with W stored as CSR (values are a Parameter; the pattern is buffers)."""

    is_sparse_linear = True

    def __init__(self, row_ptr: torch.Tensor, col_idx: torch.Tensor, values: torch.Tensor,
                 shape: Tuple[int, int], bias: Optional[torch.Tensor] = None):
        super().__init__()
        rows, cols = int(shape[0]), int(shape[1])
        check_csr(row_ptr, col_idx, values.numel(), (rows, cols), where="IpuSparseLinear")  # FormatError (ValueError)
        self.out_features, self.in_features = rows, cols
        self.register_buffer("row_ptr", row_ptr.to(torch.int32).clone())
        self.register_buffer("col_idx", col_idx.to(torch.int32).clone())
        self.values = nn.Parameter(values.detach().clone(), requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        self.pattern_path: Optional[str] = None
        self.pattern_hash: Optional[str] = None

    @classmethod
    def from_module(cls, mod: nn.Module) -> "IpuSparseLinear":
        """From a sparse module with ``to_csr()`` or an ``nn.Linear`` with exact zeros."""
        bias = getattr(mod, "bias", None)
        if hasattr(mod, "to_csr"):
            row_ptr, col_idx, values = mod.to_csr()
            shape = (int(mod.out_features), int(mod.in_features))
        elif isinstance(mod, nn.Linear):
            row_ptr, col_idx, values = csr_from_dense(mod.weight)
            shape = tuple(mod.weight.shape)
        else:
            raise TypeError(f"cannot convert {type(mod).__name__}: needs to_csr() or nn.Linear")
        return cls(torch.as_tensor(row_ptr), torch.as_tensor(col_idx), torch.as_tensor(values), shape, bias)

    @property
    def nnz(self) -> int:
        return self.values.numel()

    def to_csr(self) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.row_ptr, self.col_idx, self.values.detach()

    def to_dense(self) -> torch.Tensor:
        return self.csr_tensor(self.values.detach()).to_dense()

    def csr_tensor(self, values: torch.Tensor) -> torch.Tensor:
        with warnings.catch_warnings():  # torch marks sparse CSR as beta; the pattern is validated in __init__
            warnings.simplefilter("ignore", UserWarning)
            return torch.sparse_csr_tensor(self.row_ptr.long(), self.col_idx.long(), values,
                                           (self.out_features, self.in_features))

    def extra_repr(self) -> str:
        density = self.nnz / float(self.out_features * self.in_features)
        return f"in={self.in_features}, out={self.out_features}, nnz={self.nnz} ({1 - density:.1%} sparse)"

    # -- forward --
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)  # (N, K)
        if running_on_ipu():
            y = self._ipu_matmul(x2)  # (N, M)
        else:
            tracer = active_tracer()
            if tracer is None:
                y = self._reference_matmul(x2)
            else:  # ipu-check: record the custom-op call an IPU would make; its CPU kernel is not traced
                tracer.custom_op(self, *self.custom_op_args(x2))
                with tracer.paused_region():
                    y = self._reference_matmul(x2)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.reshape(*lead, self.out_features)

    def _reference_matmul(self, x2: torch.Tensor) -> torch.Tensor:
        # CPU sparse kernels in torch 2.0 cover fp32/fp64; other dtypes compute in fp32.
        ctype = x2.dtype if x2.dtype in (torch.float32, torch.float64) else torch.float32
        w = self.csr_tensor(self.values.detach().to(ctype))
        return torch.mm(w, x2.to(ctype).t()).t().to(x2.dtype)  # (M, K) @ (K, N) -> (N, M)

    def custom_op_args(self, x2: torch.Tensor):
        """(inputs, name, domain, domain_version, example_outputs, attributes) of the custom-op call."""
        if self.pattern_path is None:
            raise RuntimeError("sparse pattern not exported: call ipu_sparse.ipu.ops.export_patterns_(model, dir) "
                               "before compiling for the IPU")
        example = torch.zeros(x2.shape[0], self.out_features, dtype=x2.dtype, device=x2.device)  # (N, M)
        attributes = {"pattern_path": self.pattern_path, "pattern_hash": self.pattern_hash,
                      "rows": self.out_features, "cols": self.in_features, "nnz": self.nnz}
        return [x2, self.values], OP_NAME, OP_DOMAIN, OP_VERSION, [example], attributes

    def _ipu_matmul(self, x2: torch.Tensor) -> torch.Tensor:
        import poptorch  # already imported: running_on_ipu() said so

        inputs, name, domain, version, examples, attributes = self.custom_op_args(x2)
        return poptorch.custom_op(inputs, name, domain, version, example_outputs=examples, attributes=attributes)[0]

    # -- pattern file --
    def pattern_bytes(self) -> bytes:
        """Binary pattern read by popart_ops/SparseMatMul.cpp: magic, version, rows, cols, nnz
        (little-endian u32 version, u64 sizes), then row_ptr u32[rows+1], col_idx u32[nnz]."""
        header = PATTERN_MAGIC + struct.pack("<IQQQ", PATTERN_VERSION, self.out_features, self.in_features, self.nnz)
        return (header + self.row_ptr.numpy().astype("<u4").tobytes()
                + self.col_idx.numpy().astype("<u4").tobytes())

    def export_pattern(self, directory, name: str) -> Tuple[str, str]:
        data = self.pattern_bytes()
        digest = hashlib.sha256(data).hexdigest()
        path = Path(directory) / f"{name}.{digest[:16]}.spat"
        if not path.exists():
            atomic_write_bytes(path, data)
        self.pattern_path, self.pattern_hash = str(path.resolve()), digest
        return self.pattern_path, digest


def read_pattern(path) -> Tuple[int, int, np.ndarray, np.ndarray]:
    """(rows, cols, row_ptr, col_idx) from a pattern file (the format the C++ op reads)."""
    data = Path(path).read_bytes()
    if data[:8] != PATTERN_MAGIC:
        raise ValueError(f"{path}: not a sparse pattern file (bad magic)")
    version, rows, cols, nnz = struct.unpack_from("<IQQQ", data, 8)
    if version != PATTERN_VERSION:
        raise ValueError(f"{path}: pattern version {version}, expected {PATTERN_VERSION}")
    off = 8 + struct.calcsize("<IQQQ")
    row_ptr = np.frombuffer(data, "<u4", rows + 1, off)
    col_idx = np.frombuffer(data, "<u4", nnz, off + 4 * (rows + 1))
    return rows, cols, row_ptr, col_idx


def to_ipu_sparse_(model: nn.Module, include_head: bool = False,
                   filter_fn: Optional[Callable[[str, nn.Module], bool]] = None) -> nn.Module:
    """Replace the model's projections (``model.linear_layers``) by ``IpuSparseLinear`` in place."""
    for name, mod in list(model.linear_layers(include_head=include_head)):
        if isinstance(mod, IpuSparseLinear) or (filter_fn is not None and not filter_fn(name, mod)):
            continue
        if name == "lm_head" and getattr(model.config, "tie_embeddings", False):
            continue  # a tied head shares the dense embedding
        set_module(model, name, IpuSparseLinear.from_module(mod))
    return model


DEFAULT_OP_LIB = Path(__file__).resolve().parents[2] / "popart_ops" / "build" / "libsparse_matmul.so"


def load_custom_op(path=None) -> str:
    """Load the PopART op library (its static creators register the op); IPU hosts only."""
    import ctypes

    lib = Path(path or os.environ.get("IPU_SPARSE_POPART_OPS_LIB") or DEFAULT_OP_LIB)
    if not lib.exists():
        raise UserError(f"PopART sparse-matmul op not built: {lib} is missing (build popart_ops/, see "
                        "popart_ops/README.md, or set IPU_SPARSE_POPART_OPS_LIB)")
    ctypes.cdll.LoadLibrary(str(lib))
    return str(lib)


def export_patterns_(model: nn.Module, directory) -> int:
    """Write every IpuSparseLinear's pattern file under ``directory``; returns how many."""
    n = 0
    for name, mod in model.named_modules():
        if isinstance(mod, IpuSparseLinear):
            mod.export_pattern(directory, name or "root")
            n += 1
    return n
