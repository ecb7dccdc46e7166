"""``SparseLinear`` and the in-place conversion ``sparsify_(model, config, filter_fn)``.

Contract (tests/sparse/test_sparse_linear.py): for a pruned ``nn.Linear`` (dense weight with
exact zeros), ``SparseLinear.from_linear(lin, fmt, dtype)(x)`` equals
``F.linear(x, W_q, b)`` where ``W_q`` is the weight rounded to the value dtype -- exactly in
fp32 up to summation order. Against the dense layer run entirely in bf16/fp16 the difference is
that dtype's rounding of the output (rtol 2e-2 bf16, 2e-3 fp16 in the tests); the sparse path
accumulates in fp32 and is the more accurate of the two.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, Dict, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import UserError
from ..model import set_module
from . import kernels
from .formats import (DEFAULT_FORMAT, SparseMatrix, check_scales, dequantize_q8, format_class, from_dense,
                      q8_nbytes, quantize_q8, value_dtype)

log = logging.getLogger(__name__)


def _keep_scales_fp32(module: nn.Module) -> None:
    """``module.to(torch.bfloat16)`` casts every floating buffer: int8 scales stay fp32 (the kernels read fp32)."""
    s = module._buffers.get("scales")
    if s is not None and s.dtype != torch.float32:
        module._buffers["scales"] = s.float()


class SparseLinear(nn.Module):
    """A linear layer whose weight is a ``SparseMatrix`` (bitmap or csr16); bias stays dense fp32.

    The format's tensors are buffers (``mask``/``col_idx``, ``row_ptr``, ``values``, and ``scales``
    for int8 values), so ``.to(device)`` and ``state_dict()`` see them. Input of any float dtype;
    output in the input's dtype; fp32 accumulation.
    """

    is_sparse_linear = True

    def __init__(self, weight: SparseMatrix, bias: Optional[torch.Tensor] = None):
        super().__init__()
        self.in_features, self.out_features = weight.cols, weight.rows
        self.format = weight.name
        self.format_class = type(weight)  # owns the byte count, CSR view, kernel and validation
        self.tensor_names = weight.tensor_names  # the buffers that hold the weight (int8 adds scales)
        for key, t in weight.tensors().items():
            self.register_buffer(key, t)
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone())
        self._matrix: Optional[SparseMatrix] = None
        self._matrix_key = None

    def _apply(self, fn, *args, **kwargs):
        out = super()._apply(fn, *args, **kwargs)
        _keep_scales_fp32(self)
        return out

    @classmethod
    def from_linear(cls, linear: nn.Linear, fmt: str = DEFAULT_FORMAT, dtype=None) -> "SparseLinear":
        w = linear.weight.detach()
        return cls(from_dense(w, fmt, dtype if dtype is not None else w.dtype),
                   None if linear.bias is None else linear.bias.detach())

    @property
    def matrix(self) -> SparseMatrix:
        """The weight as a format object (views of this module's buffers, validated when they change)."""
        tensors = {k: getattr(self, k) for k in self.tensor_names}
        key = tuple(t.data_ptr() for t in tensors.values()) + tuple(t.dtype for t in tensors.values())
        if self._matrix is None or self._matrix_key != key:
            self._matrix = self.format_class((self.out_features, self.in_features), **tensors)
            self._matrix_key = key
        return self._matrix

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        # Incoming index tensors are validated before they replace the buffers the kernel reads.
        incoming = {k: state_dict[prefix + k] for k in self.tensor_names if prefix + k in state_dict}
        if incoming:
            tensors = {k: incoming.get(k, getattr(self, k)) for k in self.tensor_names}
            self.format_class((self.out_features, self.in_features), where=f"state dict {prefix.rstrip('.') or 'layer'}",
                              **tensors)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    @property
    def weight(self) -> torch.Tensor:
        """A dense copy of the weight (zeros included), in the value dtype (fp32 for int8 values,
        dequantized). Materialised on every access."""
        return self.matrix.to_dense()

    def to_csr(self):
        """(row_ptr int32, col_idx int32, values): plain CSR of the weight (PopSparse's host format)."""
        return self.matrix.to_csr()

    @property
    def nnz(self) -> int:
        return int(self.values.numel())

    @property
    def sparsity(self) -> float:
        return self.matrix.sparsity

    def nbytes(self) -> int:
        return self.matrix.nbytes() + (0 if self.bias is None else self.bias.numel() * self.bias.element_size())

    # From this many input rows on (long prefills, perplexity windows), expanding the weight once
    # (~20 ms for 1536x576) and running a dense GEMM beats the row-wise sparse kernel (~0.1 ms/row).
    dense_rows_threshold = 256

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.in_features)  # (N, in)
        ext = kernels.BINDING.fast or kernels.fast_extension()
        buf = self._buffers  # direct dict access: nn.Module.__getattr__ costs ~1 us per buffer
        bias = buf["bias"]
        if x2.shape[0] >= self.dense_rows_threshold and x.device.type == "cpu":
            w = self.matrix.to_dense().to(torch.float32)  # (out, in), zeros included
            y = F.linear(x2.to(torch.float32), w, bias)
        elif ext is not None and x.dtype == torch.float32 and not x.requires_grad and x.device.type == "cpu" \
                and (bias is None or bias.dtype == torch.float32) and self.format_class.kernel is not None:
            # decode hot path: straight to the format's compiled kernel (it checks shapes and dtypes; the
            # index contents were validated when this layer was built or its state dict loaded)
            y = self.format_class.kernel_matmul(ext, x2.contiguous(), [buf[k] for k in self.tensor_names], bias,
                                                self.out_features, self.in_features)
        else:
            y = kernels.sparse_matmul(x2, self.matrix, self.bias)  # (N, out) fp32
        y = y.view(*shape[:-1], self.out_features)
        return y if y.dtype == x.dtype else y.to(x.dtype)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, format={self.format}, "
                f"dtype={str(self.values.dtype).replace('torch.', '')}, sparsity={self.sparsity:.3f}, "
                f"bias={self.bias is not None}")


class LowPrecisionLinear(nn.Module):
    """A dense linear layer stored and run in bf16/fp16 inside an fp32 model (the dense LM-head option).

    Decode is memory-bound, so halving the bytes of the 49152x576 head roughly halves its time.
    """

    def __init__(self, weight: torch.Tensor, bias: Optional[torch.Tensor] = None, dtype=torch.float16):
        super().__init__()
        dt = value_dtype(dtype)
        self.out_features, self.in_features = weight.shape
        self.weight = nn.Parameter(weight.detach().to(dt).clone(), requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias.detach().to(dt).clone(), requires_grad=False)

    @classmethod
    def from_linear(cls, linear: nn.Linear, dtype=torch.float16) -> "LowPrecisionLinear":
        return cls(linear.weight, linear.bias, dtype)

    _native = True  # torch 2.0 has no fp16 matmul on CPU: then compute in fp32 (slow, correct)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._native:
            try:
                return F.linear(x.to(self.weight.dtype), self.weight, self.bias).to(x.dtype)
            except RuntimeError as exc:
                log.warning("LowPrecisionLinear: %s matmul unavailable in torch %s (%s); computing in fp32",
                            self.weight.dtype, torch.__version__, exc)
                self._native = False
        bias = None if self.bias is None else self.bias.float()
        return F.linear(x.float(), self.weight.float(), bias).to(x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, dtype={self.weight.dtype}"


class QuantizedLinear(nn.Module):
    """A dense linear layer stored as int8 with fp32 scales (the int8 LM-head option), no bias.

    Buffers: ``qweight`` int8 (out, in) and ``scales`` fp32 (out, G): W[o, i] = qweight[o, i] *
    scales[o, i // (in / G)] (G = 1: one scale a row; ``quantize_q8``). Batch 1 (and up to
    ``kernel_rows_max`` rows) runs the compiled int8 GEMV, which reads each weight row once for all
    rows of x; more rows dequantize the weight into a temporary fp32 matrix for one GEMM (for a
    512-token prefill of SmolLM2's 49152x576 head, dequantizing costs a few % of the GEMM; keeping a
    dequantized copy would undo the memory saving).
    """

    kernel_rows_max = 8

    def __init__(self, qweight: torch.Tensor, scales: torch.Tensor, where: str = "QuantizedLinear"):
        super().__init__()
        if not isinstance(qweight, torch.Tensor) or qweight.dtype != torch.int8 or qweight.dim() != 2:
            raise UserError(f"{where}: qweight must be a 2-D int8 tensor, got "
                            f"{getattr(qweight, 'dtype', type(qweight))} {tuple(getattr(qweight, 'shape', ()))}")
        self.out_features, self.in_features = qweight.shape
        groups = scales.shape[1] if isinstance(scales, torch.Tensor) and scales.dim() == 2 else 0
        if groups < 1 or self.in_features % groups:
            raise UserError(f"{where}: scales must have shape ({self.out_features}, G) with G dividing "
                            f"{self.in_features}, got {tuple(getattr(scales, 'shape', ()))}")
        check_scales(scales, (self.out_features, groups), "scales", where)
        self.register_buffer("qweight", qweight.contiguous())
        self.register_buffer("scales", scales.contiguous())
        self.bias = None

    def _apply(self, fn, *args, **kwargs):
        out = super()._apply(fn, *args, **kwargs)
        _keep_scales_fp32(self)
        return out

    @property
    def group_size(self) -> int:
        """Columns per scale (0: one scale a row)."""
        g = self.scales.shape[1]
        return 0 if g == 1 else self.in_features // g

    @classmethod
    def from_linear(cls, linear: nn.Module, group_size: int = 0) -> "QuantizedLinear":
        if getattr(linear, "bias", None) is not None:
            raise UserError("QuantizedLinear stores no bias (an int8 head is for bias-free LM heads)")
        return cls(*quantize_q8(linear.weight.detach(), group_size))

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized weight, fp32 (materialised on every access)."""
        return dequantize_q8(self.qweight, self.scales)

    def nbytes(self) -> int:
        return q8_nbytes(self.out_features, self.in_features, self.group_size)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        if prefix + "scales" in state_dict:
            check_scales(state_dict[prefix + "scales"], tuple(self.scales.shape), "scales",
                         f"state dict {prefix.rstrip('.') or 'layer'}")
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.in_features)
        ext = kernels.BINDING.fast or kernels.fast_extension()
        if ext is not None and x2.shape[0] <= self.kernel_rows_max and x.device.type == "cpu" \
                and not x.requires_grad:
            y = ext.q8_matmul(x2.to(torch.float32).contiguous(), self.qweight, self.scales, None)
        else:
            y = F.linear(x2.to(torch.float32), dequantize_q8(self.qweight, self.scales))
        y = y.view(*shape[:-1], self.out_features)
        return y if y.dtype == x.dtype else y.to(x.dtype)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, dtype=int8, "
                f"group_size={self.group_size or 'row'}")


@dataclass
class SparseConfig:
    """What ``sparsify_`` does.

    format: "bitmap" (compact, default) or "csr16". dtype: value dtype "fp32", "bf16", "fp16", or
    "int8" (bitmap only: int8 values with a per-row fp32 scale).
    include_head: also convert the LM head (untied from the embedding first).
    min_sparsity: leave layers with fewer exact zeros than this dense.
    head_dtype: if set (e.g. "fp16", "int8") and the head is not converted to sparse, store the dense
    head in that dtype (an untied copy when tied to the embedding; int8: ``QuantizedLinear``).
    head_group_size: columns per scale of an int8 head (0: one scale a row).
    """

    format: str = DEFAULT_FORMAT
    dtype: str = "bf16"
    include_head: bool = False
    min_sparsity: float = 0.0
    head_dtype: Optional[str] = None
    head_group_size: int = 0

    def __post_init__(self) -> None:
        fc = format_class(self.format)
        if value_dtype(self.dtype, int8=True) == torch.int8:
            fc._check_int8()
        if self.head_dtype is not None:
            value_dtype(self.head_dtype, int8=True)
        if not isinstance(self.head_group_size, int) or self.head_group_size < 0:
            raise UserError(f"head_group_size must be an integer >= 0, got {self.head_group_size!r}")
        if not 0.0 <= self.min_sparsity <= 1.0:
            raise UserError(f"min_sparsity must be in [0, 1], got {self.min_sparsity}")


def _default_targets(model: nn.Module, include_head: bool) -> Dict[str, nn.Module]:
    if hasattr(model, "linear_layers"):
        return dict(model.linear_layers(include_head=include_head))
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}


def sparsify_(model: nn.Module, config: Optional[SparseConfig] = None,
              filter_fn: Optional[Callable[[nn.Module, str], bool]] = None) -> nn.Module:
    """Replace selected ``nn.Linear`` modules of ``model`` by ``SparseLinear`` in place; returns ``model``.

    Selected: the decoder projections (``model.linear_layers``; plus the LM head with
    ``config.include_head``), or, for other models, every ``nn.Linear``; then narrowed by
    ``filter_fn(module, fqn)`` when given. Weights keep their exact zeros' positions.
    """
    config = config or SparseConfig()
    targets = _default_targets(model, config.include_head)
    if config.include_head and hasattr(model, "untie_lm_head_"):
        if "lm_head" in targets and (filter_fn is None or filter_fn(model.lm_head, "lm_head")):
            model.untie_lm_head_()  # records head_untied for the accounting of the dense baseline
            targets["lm_head"] = model.lm_head
    converted = 0
    with torch.no_grad():
        for fqn, mod in targets.items():
            if not isinstance(mod, nn.Linear):
                continue  # already sparse
            if filter_fn is not None and not filter_fn(mod, fqn):
                continue
            w = mod.weight
            if w.numel() and float((w == 0).sum()) / w.numel() < config.min_sparsity:
                continue
            set_module(model, fqn, SparseLinear.from_linear(mod, config.format, config.dtype))
            converted += 1
        head = getattr(model, "lm_head", None)
        if config.head_dtype is not None and isinstance(head, nn.Linear):
            if getattr(getattr(model, "config", None), "tie_embeddings", False):
                model.untie_lm_head_()  # the head gets its own matrix; the embedding stays as it is
                head = model.lm_head
            if value_dtype(config.head_dtype, int8=True) == torch.int8:
                model.lm_head = QuantizedLinear.from_linear(head, config.head_group_size)
            else:
                model.lm_head = LowPrecisionLinear.from_linear(head, config.head_dtype)
    return model


def sparse_modules(model: nn.Module) -> Dict[str, SparseLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, SparseLinear)}


def densify_(model: nn.Module) -> nn.Module:
    """Inverse of ``sparsify_``: every ``SparseLinear`` / ``LowPrecisionLinear`` / ``QuantizedLinear``
    back to an fp32 ``nn.Linear`` holding the same weights (pruned ones as exact zeros, int8 ones
    dequantized); returns ``model``."""
    with torch.no_grad():
        for fqn, mod in list(model.named_modules()):
            if not isinstance(mod, (SparseLinear, LowPrecisionLinear, QuantizedLinear)):
                continue
            w = mod.weight.detach().float()
            lin = nn.Linear(mod.in_features, mod.out_features, bias=mod.bias is not None)
            lin.weight.copy_(w)
            if mod.bias is not None:
                lin.bias.copy_(mod.bias.detach().float())
            set_module(model, fqn, lin)
    return model
