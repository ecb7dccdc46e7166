"""Sparse weight formats: one class per format, and the registry of those classes.

A weight W (rows, cols) = (out_features, in_features) with exact zeros is stored as:

``csr16`` (PopSparse's host format, and the seed's): ``row_ptr`` (rows+1) int32 offsets,
    ``col_idx`` (nnz) 16-bit column indices (stored as int16 because torch 2.0 has no
    uint16; read back with ``& 0xFFFF``, so up to 65536 columns), ``values`` (nnz).
    Bytes: 4 (rows+1) + nnz (2 + v).

``bitmap`` (this project's compact format): ``mask`` (rows, ceil(cols/8)) uint8 with
    bit j of byte b set when column 8b+j is non-zero (little-endian bit order, so 16
    columns are one little-endian uint16), ``row_ptr`` (rows+1) int32 offsets into the
    packed values (lets threads start at any row), ``values`` (nnz) packed row-major.
    Bytes: rows ceil(cols/8) + 4 (rows+1) + nnz v, exactly, whatever the pattern.
    At 80% sparsity with 2-byte values that is 1/16 + 0.2 = 26.3% of dense fp16 (plus
    4 bytes a row); CSR16 is 40% (+row_ptr). The bitmap costs one bit per *dense*
    element, so it beats 8-bit indices (one byte per *non-zero*) below 87.5% sparsity,
    and its kernel reads x contiguously (no gathers).

v is the value size: 4 (fp32), 2 (bf16, fp16), 1 (int8, bitmap only). Values are the non-zeros
in row-major order in both formats, so converting between them only rebuilds the index.

int8 values (bitmap only) add ``scales`` (rows,) fp32: W[r, c] = values[k] * scales[r],
symmetric round-to-nearest from each row's absmax over the kept weights (q in [-127, 127],
scale = absmax / 127; a row with no kept weight has scale 1). Bytes: + 4 rows. A kept weight
below scale / 2 rounds to q = 0 and keeps its mask bit (the index never changes).
``quantize_q8`` stores a dense matrix the same way in groups of columns (the int8 LM head).

Each format class owns everything about its format: its byte count (``byte_parts`` /
``nbytes_for``, the only byte formulas), its conversion from dense and its CSR view
(``from_dense``, ``to_csr``), the compiled kernel that reads it (``kernel``,
``kernel_matmul``) and its validation (``validate``). ``FORMATS`` maps a name to its class;
command lines take their ``--format`` choices from it.

Validation: building a format object from tensors (``CSR16(shape, row_ptr=..., ...)``,
``from_tensors``) checks the index contents in O(nnz + rows cols / 8) vectorized torch ops --
row_ptr starts at 0, is non-decreasing and ends at nnz, column indices are in range and
strictly increasing within a row, the bitmap's popcount of each row equals its number of
values, dtypes and shapes agree -- so the compiled kernel, which trusts the index, is never
handed one that would read out of bounds. A failure raises ``FormatError`` (a ``ValueError``
for library callers, and a ``UserError`` so the command line reports it as one line).
"""
from __future__ import annotations

from typing import Dict, Optional, Sequence, Tuple, Type, Union

import torch

from ..errors import UserError

VALUE_DTYPES: Dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# Sparse values may also be int8 (with per-row scales); dense tensors are always floating point.
SPARSE_VALUE_DTYPES: Dict[str, torch.dtype] = dict(VALUE_DTYPES, int8=torch.int8)
SPARSE_DTYPE_CHOICES = tuple(SPARSE_VALUE_DTYPES)  # the choices of every sparse --dtype option
DTYPE_NAMES: Dict[torch.dtype, str] = {v: k for k, v in SPARSE_VALUE_DTYPES.items()}
Q8_MAX = 127
DEFAULT_FORMAT = "bitmap"
CSR16_MAX_COLS = 1 << 16
MAX_NNZ = (1 << 31) - 1  # row_ptr is int32


class FormatError(UserError, ValueError):
    """Tensors that do not form a valid matrix of their format (index contents, dtypes or shapes)."""


def value_dtype(spec: Union[str, torch.dtype], int8: bool = False) -> torch.dtype:
    """``"bf16"`` / ``torch.bfloat16`` / ``"bfloat16"`` -> torch dtype (fp32, bf16, fp16; also int8
    with ``int8=True``, for sparse values and the quantized head)."""
    table = SPARSE_VALUE_DTYPES if int8 else VALUE_DTYPES
    known = ", ".join(table)
    if isinstance(spec, torch.dtype):
        if spec not in table.values():
            raise UserError(f"unsupported value dtype {spec} ({known})")
        return spec
    aliases = {"float32": "fp32", "float": "fp32", "bfloat16": "bf16", "float16": "fp16", "half": "fp16"}
    name = aliases.get(str(spec), str(spec))
    if name not in table:
        raise UserError(f"unsupported value dtype {spec!r} ({known})")
    return table[name]


def _value_size(value_dtype_spec) -> int:
    if value_dtype_spec in (1, 2, 4, 8) and isinstance(value_dtype_spec, int):
        return int(value_dtype_spec)
    return torch.empty((), dtype=value_dtype(value_dtype_spec, int8=True)).element_size()


def _is_int8(value_dtype_spec) -> bool:
    if isinstance(value_dtype_spec, int) and not isinstance(value_dtype_spec, bool):
        return value_dtype_spec == 1
    return value_dtype(value_dtype_spec, int8=True) == torch.int8


# ----- int8 quantization: the one place that rounds weights to int8 ------------------------------

def _q8_scales(absmax: torch.Tensor) -> torch.Tensor:
    """Symmetric int8 scales from absolute maxima (1 where everything is zero)."""
    return torch.where(absmax > 0, absmax / Q8_MAX, torch.ones_like(absmax))


def _q8_round(x: torch.Tensor) -> torch.Tensor:
    """Already scaled values -> int8 (round to nearest, clamp to +-127)."""
    return torch.round(x).clamp_(-Q8_MAX, Q8_MAX).to(torch.int8)


def quantize_rows(values: torch.Tensor, rows_idx: torch.Tensor, rows: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Packed values (nnz,) of rows ``rows_idx`` (int64, nnz) -> (int8 (nnz,), fp32 scales (rows,)):
    symmetric round-to-nearest from each row's absmax; rows without values get scale 1."""
    v = values.detach().float()
    absmax = torch.zeros(rows, dtype=torch.float32)
    if v.numel():
        absmax.scatter_reduce_(0, rows_idx, v.abs(), reduce="amax", include_self=True)
    scales = _q8_scales(absmax)
    return _q8_round(v / scales[rows_idx]), scales


def q8_group_count(cols: int, group_size: int) -> int:
    """Scale groups per row of a ``quantize_q8`` matrix (group_size 0: one per row)."""
    if group_size < 0 or (group_size and cols % group_size):
        raise UserError(f"int8 group size {group_size} does not divide {cols} columns")
    return 1 if group_size == 0 else cols // group_size


def quantize_q8(weight: torch.Tensor, group_size: int = 0) -> Tuple[torch.Tensor, torch.Tensor]:
    """Dense (rows, cols) -> (int8 (rows, cols), fp32 scales (rows, G)), G = cols / group_size
    (group_size 0: per row, G = 1); symmetric round-to-nearest from each group's absmax."""
    w = _check_dense(weight).float()
    rows, cols = w.shape
    g = q8_group_count(cols, group_size)
    wg = w.reshape(rows, g, cols // g)  # (rows, G, group)
    scales = _q8_scales(wg.abs().amax(-1) if cols else torch.zeros(rows, g))  # (rows, G)
    q = _q8_round(wg / scales.unsqueeze(-1))
    return q.reshape(rows, cols).contiguous(), scales.contiguous()


def dequantize_q8(qweight: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Inverse of ``quantize_q8``: (rows, cols) in ``dtype``."""
    rows, cols = qweight.shape
    g = scales.shape[1]
    w = qweight.to(torch.float32).reshape(rows, g, cols // g) * scales.unsqueeze(-1)  # (rows, G, group)
    return w.reshape(rows, cols).to(dtype)


def q8_nbytes(rows: int, cols: int, group_size: int = 0) -> int:
    """Bytes of a ``quantize_q8`` matrix: one byte a weight + an fp32 scale per group."""
    return rows * cols + 4 * rows * q8_group_count(cols, group_size)


def check_scales(scales, shape: Tuple[int, ...], name: str, where: str) -> None:
    """fp32 scales of exactly ``shape``, finite and > 0 (FormatError naming ``name``)."""
    if not isinstance(scales, torch.Tensor) or scales.dtype != torch.float32 or tuple(scales.shape) != tuple(shape):
        raise FormatError(f"{where}: {name} must be float32 of shape {tuple(shape)}, got "
                          f"{getattr(scales, 'dtype', type(scales))} {tuple(getattr(scales, 'shape', ()))}")
    if scales.numel() and not bool((torch.isfinite(scales) & (scales > 0)).all()):
        bad = int((~(torch.isfinite(scales) & (scales > 0))).sum())
        raise FormatError(f"{where}: {name} holds {bad} values that are not finite and > 0")


def _check_sizes(rows: int, cols: int, nnz: int) -> Tuple[int, int, int]:
    rows, cols, nnz = int(rows), int(cols), int(nnz)
    if rows < 0 or cols < 0 or nnz < 0 or nnz > rows * cols:
        raise UserError(f"format_nbytes: bad sizes rows={rows} cols={cols} nnz={nnz}")
    return rows, cols, nnz


def format_nbytes(fmt: str, rows: int, cols: int, nnz: int, value_dtype="fp16") -> int:
    """Bytes of a (rows, cols) matrix with ``nnz`` non-zeros stored in ``fmt`` (every index byte counted).

    Exact for every format and every sparsity pattern (bitmap and csr16 sizes depend
    only on rows, cols and nnz): ``format_nbytes(f, ...) == SparseMatrix.nbytes()``.
    ``fmt`` may also be ``"dense"`` (rows * cols values). ``value_dtype``: "fp32",
    "bf16", "fp16", a torch dtype, or a size in bytes.
    """
    rows, cols, nnz = _check_sizes(rows, cols, nnz)
    v = _value_size(value_dtype)
    if fmt == "dense":
        return rows * cols * v
    return format_class(fmt).nbytes_for(rows, cols, nnz, v)


# ----- dense -> CSR: the one conversion every format builds on ----------------------------------

def _check_dense(weight: torch.Tensor) -> torch.Tensor:
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise UserError(f"expected a 2-D weight tensor, got {getattr(weight, 'shape', type(weight))}")
    if not weight.is_floating_point():
        raise UserError(f"expected a floating-point weight, got {weight.dtype}")
    return weight.detach().cpu()


def _row_ptr_from_counts(counts: torch.Tensor) -> torch.Tensor:
    row_ptr = torch.zeros(counts.numel() + 1, dtype=torch.int64)
    row_ptr[1:] = torch.cumsum(counts.to(torch.int64), 0)
    return row_ptr.to(torch.int32)


def _nonzeros(w: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(non-zero mask (rows, cols), row_ptr int32 (rows+1,), values (nnz,) row-major) of a checked dense weight."""
    nz = w != 0
    if int(nz.sum()) > MAX_NNZ:
        raise UserError(f"matrix has more than {MAX_NNZ} non-zeros")
    return nz, _row_ptr_from_counts(nz.sum(1)), w[nz]


def csr_from_dense(weight: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Plain CSR of the exact non-zeros: (row_ptr int32 (rows+1,), col_idx int32 (nnz,), values (nnz,)
    in the weight's dtype), row-major. The dense -> CSR conversion of the package (csr16 and the
    IPU's pattern files are built from it)."""
    w = _check_dense(weight)
    nz, row_ptr, values = _nonzeros(w)
    return row_ptr, nz.nonzero()[:, 1].to(torch.int32), values


# ----- validation of stored indices ----------------------------------------------------------------

def _check_row_ptr(row_ptr: torch.Tensor, rows: int, cols: int, nnz: int, where: str) -> torch.Tensor:
    """row_ptr (rows+1,) runs from 0 to nnz, non-decreasing, at most ``cols`` a row; returns the row counts."""
    if row_ptr.dim() != 1 or row_ptr.numel() != rows + 1:
        raise FormatError(f"{where}: row_ptr must have shape ({rows + 1},), got {tuple(row_ptr.shape)}")
    rp = row_ptr.to(torch.int64)
    if int(rp[0]) != 0 or int(rp[-1]) != nnz:
        raise FormatError(f"{where}: row_ptr must run from 0 to nnz={nnz}, got {int(rp[0])}..{int(rp[-1])}")
    counts = rp[1:] - rp[:-1]
    if rows and (int(counts.min()) < 0 or int(counts.max()) > cols):
        raise FormatError(f"{where}: row_ptr is not non-decreasing with at most {cols} entries per row")
    return counts


def _check_columns(col: torch.Tensor, row_ptr: torch.Tensor, counts: torch.Tensor, cols: int, where: str) -> None:
    """Column indices (int32 or int64, value order) in [0, cols) and strictly increasing within each row."""
    if not col.numel():
        return
    lo, hi = (int(v) for v in torch.aminmax(col))
    if lo < 0 or hi >= cols:
        raise FormatError(f"{where}: column index {hi if hi >= cols else lo} out of bounds for {cols} columns")
    row_start = torch.zeros(col.numel(), dtype=torch.bool)
    row_start[row_ptr[:-1].to(torch.int64)[counts > 0]] = True
    if bool(((col[1:] <= col[:-1]) & ~row_start[1:]).any()):
        raise FormatError(f"{where}: column indices are not strictly increasing within a row")


def check_csr(row_ptr: torch.Tensor, col_idx: torch.Tensor, nnz: int, shape: Tuple[int, int],
              where: str = "CSR") -> None:
    """Validate a plain CSR index (any integer dtypes) of ``nnz`` values for a ``shape`` matrix
    (FormatError otherwise): the checks every CSR-indexed format and the IPU layer share."""
    rows, cols = int(shape[0]), int(shape[1])
    if row_ptr.is_floating_point() or col_idx.is_floating_point():
        raise FormatError(f"{where}: row_ptr and col_idx must be integer tensors, got {row_ptr.dtype}, {col_idx.dtype}")
    if col_idx.dim() != 1 or col_idx.numel() != nnz:
        raise FormatError(f"{where}: col_idx must have shape ({nnz},), got {tuple(col_idx.shape)}")
    counts = _check_row_ptr(row_ptr, rows, cols, nnz, where)
    _check_columns(col_idx if col_idx.dtype in (torch.int32, torch.int64) else col_idx.to(torch.int64),
                   row_ptr, counts, cols, where)


def _popcount_rows(mask: torch.Tensor) -> torch.Tensor:
    """Set bits of each row of a uint8 (rows, nbytes) mask, int64 (rows,); SWAR popcount, no unpacking."""
    x = mask - ((mask >> 1) & 0x55)
    x = (x & 0x33) + ((x >> 2) & 0x33)
    x = (x + (x >> 4)) & 0x0F
    return x.sum(1, dtype=torch.int64)


# ----- the formats ---------------------------------------------------------------------------------

class SparseMatrix:
    """Base class: a (rows, cols) matrix stored sparsely. Subclasses define the index.

    ``cls(shape, **tensors)`` builds one from its stored tensors and validates them
    (``FormatError``); ``from_dense`` builds one from a dense weight.
    """

    name = "?"
    version = 1
    tensor_names: Tuple[str, ...] = ()
    # Compiled kernel (ipu_sparse.sparse._kernels) that reads this format:
    # ``ext.<kernel>(x, *tensors in tensor_names order, bias, rows, cols)``; None: reference only.
    kernel: Optional[str] = None

    def __init__(self, shape: Tuple[int, int], where: str = "matrix", **tensors: torch.Tensor):
        names = self._names_for(tensors)
        missing = [k for k in names if k not in tensors]
        if missing:
            raise FormatError(f"{where}: {self.name} matrix lacks tensors {missing}")
        self._set(shape, tensors)
        self.validate(where)

    @classmethod
    def tensor_names_for(cls, dtype) -> Tuple[str, ...]:
        """The stored tensors of a matrix with ``dtype`` values (int8 adds ``scales``)."""
        return cls.tensor_names

    @classmethod
    def _names_for(cls, tensors: Dict[str, torch.Tensor]) -> Tuple[str, ...]:
        v = tensors.get("values")
        return cls.tensor_names_for(v.dtype if isinstance(v, torch.Tensor) else None)

    def _set(self, shape, tensors: Dict[str, torch.Tensor]) -> None:
        self.shape = (int(shape[0]), int(shape[1]))
        self.tensor_names = self._names_for(tensors)  # this matrix's tensors (class default + scales for int8)
        for key in self.tensor_names:
            setattr(self, key, tensors[key])

    @classmethod
    def _trusted(cls, shape, tensors: Dict[str, torch.Tensor]) -> "SparseMatrix":
        """Wrap tensors this module built itself (from_dense, to): no validation."""
        self = cls.__new__(cls)
        self._set(shape, tensors)
        return self

    # ----- byte count ------------------------------------------------------------------------
    @classmethod
    def byte_parts(cls, rows: int, cols: int, nnz: int, value_dtype="fp16") -> Dict[str, int]:
        """Bytes of each stored tensor of a (rows, cols) matrix with ``nnz`` non-zeros."""
        raise NotImplementedError

    @classmethod
    def nbytes_for(cls, rows: int, cols: int, nnz: int, value_dtype="fp16") -> int:
        return sum(cls.byte_parts(rows, cols, nnz, value_dtype).values())

    # ----- common properties -----------------------------------------------------------
    @property
    def rows(self) -> int:
        return self.shape[0]

    @property
    def cols(self) -> int:
        return self.shape[1]

    @property
    def nnz(self) -> int:
        return int(self.values.numel())

    @property
    def dtype(self) -> torch.dtype:
        return self.values.dtype

    @property
    def density(self) -> float:
        total = self.rows * self.cols
        return self.nnz / total if total else 0.0

    @property
    def sparsity(self) -> float:
        return 1.0 - self.density if self.rows * self.cols else 0.0

    def tensors(self) -> Dict[str, torch.Tensor]:
        return {k: getattr(self, k) for k in self.tensor_names}

    def nbytes(self) -> int:
        """Actual storage bytes of every tensor (equals ``format_nbytes`` for this shape/nnz)."""
        return sum(t.numel() * t.element_size() for t in self.tensors().values())

    def dense_nbytes(self, value_dtype="fp16") -> int:
        return format_nbytes("dense", self.rows, self.cols, 0, value_dtype)

    def row_counts(self) -> torch.Tensor:
        return (self.row_ptr[1:].to(torch.int64) - self.row_ptr[:-1].to(torch.int64))

    def to(self, device=None, dtype: Optional[torch.dtype] = None) -> "SparseMatrix":
        """Move to ``device`` and/or cast the values to ``dtype`` (indices keep their types); to or from
        int8 the values are quantized / dequantized (``scales`` added / dropped)."""
        out = dict(self.tensors())
        if dtype is not None:
            dt = value_dtype(dtype, int8=True)
            if dt == torch.int8 and self.dtype != torch.int8:
                self._check_int8()
                out["values"], out["scales"] = quantize_rows(self.values, self.row_indices(), self.rows)
            elif dt != torch.int8:
                out["values"] = self.float_values().to(dt) if self.dtype == torch.int8 else self.values.to(dt)
                out.pop("scales", None)
        if device is not None:
            out = {k: t.to(device) for k, t in out.items()}
        return self._trusted(self.shape, out)

    def float_values(self) -> torch.Tensor:
        """The values in fp32 (int8 values times their row's scale)."""
        if self.values.dtype != torch.int8:
            return self.values.float()
        return self.values.float() * self.scales[self.row_indices().to(self.scales.device)]

    @classmethod
    def _check_int8(cls) -> None:
        if "scales" not in cls.tensor_names_for(torch.int8):
            raise UserError(f"{cls.name} does not store int8 values (use the bitmap format)")

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(shape={self.shape}, nnz={self.nnz}, sparsity={self.sparsity:.3f}, "
                f"dtype={DTYPE_NAMES.get(self.dtype, self.dtype)}, bytes={self.nbytes()})")

    # ----- kernel binding ------------------------------------------------------------------
    @classmethod
    def kernel_matmul(cls, ext, x: torch.Tensor, tensors: Sequence[torch.Tensor], bias: Optional[torch.Tensor],
                      rows: int, cols: int) -> torch.Tensor:
        """``x (B, cols) fp32 contiguous @ W.T + bias`` -> (B, rows) fp32 by the compiled kernel, from
        this format's tensors (in ``tensor_names`` order) of a validated matrix."""
        return getattr(ext, cls.kernel)(x, *tensors, bias, rows, cols)

    def compiled_matmul(self, ext, x: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        return self.kernel_matmul(ext, x, [getattr(self, k) for k in self.tensor_names], bias, self.rows, self.cols)

    # ----- interface -------------------------------------------------------------------
    @classmethod
    def from_dense(cls, weight: torch.Tensor, dtype=None) -> "SparseMatrix":
        raise NotImplementedError

    def to_dense(self, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        raise NotImplementedError

    def column_indices(self) -> torch.Tensor:
        """Column of each value, int64 (nnz,), in value order."""
        raise NotImplementedError

    def validate(self, where: str = "matrix") -> "SparseMatrix":
        """Check dtypes, shapes and index contents (FormatError naming ``where``); returns self."""
        raise NotImplementedError

    def to_csr(self) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(row_ptr int32 (rows+1), col_idx int32 (nnz), values (nnz)): plain CSR, e.g. for PopSparse
        (int8 values dequantized to fp32)."""
        values = self.float_values() if self.dtype == torch.int8 else self.values
        return self.row_ptr, self.column_indices().to(torch.int32), values

    def row_indices(self) -> torch.Tensor:
        """Row of each value, int64 (nnz,)."""
        return torch.repeat_interleave(torch.arange(self.rows), self.row_counts())

    # ----- helpers shared by the subclasses -----------------------------------------------
    def _check_common(self, where: str) -> torch.Tensor:
        """values and row_ptr; returns the row counts."""
        rows, cols = self.shape
        if rows < 0 or cols < 0:
            raise FormatError(f"{where}: negative shape {self.shape}")
        v, rp = self.values, self.row_ptr
        int8_ok = "scales" in self.tensor_names_for(torch.int8)
        if not isinstance(v, torch.Tensor) or v.dtype not in DTYPE_NAMES or (v.dtype == torch.int8 and not int8_ok):
            raise FormatError(f"{where}: values have unsupported dtype {getattr(v, 'dtype', type(v))} for "
                              f"{self.name} ({', '.join(SPARSE_VALUE_DTYPES if int8_ok else VALUE_DTYPES)})")
        if v.dim() != 1:
            raise FormatError(f"{where}: values must be 1-D, got shape {tuple(v.shape)}")
        if v.numel() > rows * cols:
            raise FormatError(f"{where}: {v.numel()} values for a {rows}x{cols} matrix")
        if not isinstance(rp, torch.Tensor) or rp.dtype != torch.int32 or rp.dim() != 1 or rp.numel() != rows + 1:
            raise FormatError(f"{where}: row_ptr must be int32 of shape ({rows + 1},), got "
                              f"{getattr(rp, 'dtype', type(rp))} {tuple(getattr(rp, 'shape', ()))}")
        return _check_row_ptr(rp, rows, cols, v.numel(), where)


class CSR16(SparseMatrix):
    name = "csr16"
    tensor_names = ("row_ptr", "col_idx", "values")
    kernel = "csr_matmul"

    @classmethod
    def byte_parts(cls, rows: int, cols: int, nnz: int, value_dtype="fp16") -> Dict[str, int]:
        """int32 row pointers, one 2-byte column index per non-zero, the values. (Beyond 65536
        columns, which csr16 cannot store, PopSparse's CSR needs 4-byte column indices: counted so.)"""
        v = _value_size(value_dtype)
        if _is_int8(value_dtype):
            cls._check_int8()
        index_bytes = 2 if cols <= CSR16_MAX_COLS else 4
        return {"row_ptr": 4 * (rows + 1), "col_idx": index_bytes * nnz, "values": v * nnz}

    @classmethod
    def from_dense(cls, weight: torch.Tensor, dtype=None) -> "CSR16":
        w = _check_dense(weight)
        rows, cols = w.shape
        if cols > CSR16_MAX_COLS:
            raise UserError(f"csr16 stores at most {CSR16_MAX_COLS} columns, got {cols}")
        dt = value_dtype(dtype, int8=True) if dtype is not None else value_dtype(w.dtype)
        if dt == torch.int8:
            cls._check_int8()
        row_ptr, col, values = csr_from_dense(w)
        col16 = torch.where(col >= 1 << 15, col - (1 << 16), col).to(torch.int16)
        return cls._trusted((rows, cols), {"row_ptr": row_ptr, "col_idx": col16, "values": values.to(dt)})

    def column_indices(self) -> torch.Tensor:
        return self.col_idx.to(torch.int64) & 0xFFFF

    def to_dense(self, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        out = torch.zeros(self.shape, dtype=dtype or self.dtype, device=self.values.device)
        out[self.row_indices().to(out.device), self.column_indices()] = self.values.to(out.dtype)
        return out

    def validate(self, where: str = "matrix") -> "CSR16":
        counts = self._check_common(where)
        c = self.col_idx
        if not isinstance(c, torch.Tensor) or c.dtype != torch.int16 or c.dim() != 1 or c.numel() != self.values.numel():
            raise FormatError(f"{where}: col_idx must be int16 of shape ({self.values.numel()},), got "
                              f"{getattr(c, 'dtype', type(c))} {tuple(getattr(c, 'shape', ()))}")
        if self.cols > CSR16_MAX_COLS:
            raise FormatError(f"{where}: csr16 stores at most {CSR16_MAX_COLS} columns, got {self.cols}")
        _check_columns(c.to(torch.int32) & 0xFFFF, self.row_ptr, counts, self.cols, where)
        return self


def _pack_bits(nz: torch.Tensor) -> torch.Tensor:
    """bool (rows, cols) -> uint8 (rows, ceil(cols/8)), bit j of byte b = column 8b+j."""
    rows, cols = nz.shape
    nbytes = (cols + 7) // 8
    padded = torch.zeros(rows, nbytes * 8, dtype=torch.uint8)
    padded[:, :cols] = nz.to(torch.uint8)
    weights = (torch.ones(8, dtype=torch.int32) << torch.arange(8, dtype=torch.int32))  # (8,)
    return (padded.view(rows, nbytes, 8).to(torch.int32) * weights).sum(-1).to(torch.uint8)


_BYTE_BITS = ((torch.arange(256).unsqueeze(-1) >> torch.arange(8)) & 1).bool()  # (256, 8): bit j of each byte


def _unpack_bits(mask: torch.Tensor, cols: int) -> torch.Tensor:
    """uint8 (rows, nbytes) -> bool (rows, cols); one table lookup per byte."""
    rows, nbytes = mask.shape
    bits = _BYTE_BITS.to(mask.device)[mask.long()]  # (rows, nbytes, 8)
    return bits.reshape(rows, nbytes * 8)[:, :cols]


class Bitmap(SparseMatrix):
    name = "bitmap"
    tensor_names = ("mask", "row_ptr", "values")
    kernel = "bitmap_matmul"

    quantized_tensor_names = tensor_names + ("scales",)

    @classmethod
    def tensor_names_for(cls, dtype) -> Tuple[str, ...]:
        return cls.quantized_tensor_names if dtype == torch.int8 else cls.tensor_names

    @classmethod
    def byte_parts(cls, rows: int, cols: int, nnz: int, value_dtype="fp16") -> Dict[str, int]:
        """One bit per dense element (rows padded to whole bytes), int32 row pointers, the values
        (+ an fp32 scale a row for int8 values)."""
        v = _value_size(value_dtype)
        parts = {"mask": rows * ((cols + 7) // 8), "row_ptr": 4 * (rows + 1), "values": v * nnz}
        if _is_int8(value_dtype):
            parts["scales"] = 4 * rows
        return parts

    @classmethod
    def from_dense(cls, weight: torch.Tensor, dtype=None) -> "Bitmap":
        w = _check_dense(weight)
        rows, cols = w.shape
        dt = value_dtype(dtype, int8=True) if dtype is not None else value_dtype(w.dtype)
        nz, row_ptr, values = _nonzeros(w)
        tensors = {"mask": _pack_bits(nz), "row_ptr": row_ptr}
        if dt == torch.int8:
            counts = (row_ptr[1:] - row_ptr[:-1]).to(torch.int64)
            tensors["values"], tensors["scales"] = quantize_rows(values, torch.repeat_interleave(
                torch.arange(rows), counts), rows)
        else:
            tensors["values"] = values.to(dt)
        return cls._trusted((rows, cols), tensors)

    @classmethod
    def kernel_matmul(cls, ext, x: torch.Tensor, tensors: Sequence[torch.Tensor], bias: Optional[torch.Tensor],
                      rows: int, cols: int) -> torch.Tensor:
        if len(tensors) == 4:  # int8 values + scales
            return ext.bitmap_matmul(x, tensors[0], tensors[1], tensors[2], bias, rows, cols, tensors[3])
        return ext.bitmap_matmul(x, *tensors, bias, rows, cols)

    def dense_mask(self) -> torch.Tensor:
        return _unpack_bits(self.mask, self.cols)

    def column_indices(self) -> torch.Tensor:
        return self.dense_mask().nonzero()[:, 1]

    def to_dense(self, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """Dense weight in ``dtype`` (default: the value dtype; fp32 for int8 values, dequantized)."""
        quantized = self.dtype == torch.int8
        out = torch.zeros(self.shape, dtype=dtype or (torch.float32 if quantized else self.dtype),
                          device=self.values.device)
        values = self.float_values() if quantized else self.values
        # values are stored in row-major order of the set bits, which is masked_scatter_'s order
        return out.masked_scatter_(self.dense_mask(), values.to(out.dtype))

    def validate(self, where: str = "matrix") -> "Bitmap":
        counts = self._check_common(where)
        rows, cols = self.shape
        m = self.mask
        if not isinstance(m, torch.Tensor) or m.dtype != torch.uint8 or tuple(m.shape) != (rows, (cols + 7) // 8):
            raise FormatError(f"{where}: mask must be uint8 of shape ({rows}, {(cols + 7) // 8}), "
                              f"got {getattr(m, 'dtype', type(m))} {tuple(getattr(m, 'shape', ()))}")
        if cols % 8 and rows:
            pad_bits = int((m[:, -1].to(torch.int32) >> (cols % 8)).max())
            if pad_bits:
                raise FormatError(f"{where}: mask has bits set beyond column {cols - 1} (index out of bounds)")
        popcount = _popcount_rows(m)
        if not torch.equal(popcount, counts):
            bad = int((popcount != counts).nonzero()[0, 0])
            raise FormatError(f"{where}: row {bad} has {int(popcount[bad])} mask bits but row_ptr gives "
                              f"{int(counts[bad])} values")
        if self.values.dtype == torch.int8:
            check_scales(self.scales, (rows,), "scales", where)
        return self


FORMATS: Dict[str, Type[SparseMatrix]] = {cls.name: cls for cls in (Bitmap, CSR16)}
FORMAT_NAMES = tuple(sorted(FORMATS))  # the choices of every --format option


def format_class(name: str, where: Optional[str] = None) -> Type[SparseMatrix]:
    """The class of sparse format ``name`` (UserError naming ``where`` for an unknown name)."""
    if name not in FORMATS:
        prefix = f"{where}: " if where else ""
        raise UserError(f"{prefix}unknown sparse format {name!r} (known: {', '.join(FORMAT_NAMES)})")
    return FORMATS[name]


def from_dense(weight: torch.Tensor, fmt: str = DEFAULT_FORMAT, dtype=None) -> SparseMatrix:
    """Store ``weight`` (exact zeros are dropped) in format ``fmt`` with value dtype ``dtype``."""
    return format_class(fmt).from_dense(weight, dtype)


def from_tensors(fmt: str, shape, tensors: Dict[str, torch.Tensor], where: str = "matrix") -> SparseMatrix:
    """Rebuild and validate a stored matrix (names every missing or bad tensor)."""
    cls = format_class(fmt, where)
    try:
        shape = (int(shape[0]), int(shape[1]))
    except (TypeError, ValueError, IndexError):
        raise UserError(f"{where}: bad shape {shape!r}") from None
    names = cls._names_for(tensors)  # int8 values bring their scales
    return cls(shape, where=where, **{k: tensors[k] for k in names if k in tensors})
