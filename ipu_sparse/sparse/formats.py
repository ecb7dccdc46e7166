"""Sparse weight formats: exact dense <-> sparse conversion, validation, byte counts.

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

v is the value size: 4 (fp32), 2 (bf16, fp16). Values are the non-zeros in row-major
order in both formats, so converting between them only rebuilds the index.
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple, Union

import torch

from ..errors import UserError

VALUE_DTYPES: Dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DTYPE_NAMES: Dict[torch.dtype, str] = {v: k for k, v in VALUE_DTYPES.items()}
FORMAT_NAMES = ("bitmap", "csr16")
DEFAULT_FORMAT = "bitmap"
CSR16_MAX_COLS = 1 << 16
MAX_NNZ = (1 << 31) - 1  # row_ptr is int32


def value_dtype(spec: Union[str, torch.dtype]) -> torch.dtype:
    """``"bf16"`` / ``torch.bfloat16`` / ``"bfloat16"`` -> torch dtype (fp32, bf16, fp16 only)."""
    if isinstance(spec, torch.dtype):
        if spec not in DTYPE_NAMES:
            raise UserError(f"unsupported sparse value dtype {spec} (fp32, bf16, fp16)")
        return spec
    aliases = {"float32": "fp32", "float": "fp32", "bfloat16": "bf16", "float16": "fp16", "half": "fp16"}
    name = aliases.get(str(spec), str(spec))
    if name not in VALUE_DTYPES:
        raise UserError(f"unsupported sparse value dtype {spec!r} (fp32, bf16, fp16)")
    return VALUE_DTYPES[name]


def _value_size(value_dtype_spec) -> int:
    if value_dtype_spec in (1, 2, 4, 8) and isinstance(value_dtype_spec, int):
        return int(value_dtype_spec)
    return torch.empty((), dtype=value_dtype(value_dtype_spec)).element_size()


def format_nbytes(fmt: str, rows: int, cols: int, nnz: int, value_dtype="fp16") -> int:
    """Bytes of a (rows, cols) matrix with ``nnz`` non-zeros stored in ``fmt`` (every index byte counted).

    Exact for every format and every sparsity pattern (bitmap and csr16 sizes depend
    only on rows, cols and nnz): ``format_nbytes(f, ...) == SparseMatrix.nbytes()``.
    ``fmt`` may also be ``"dense"`` (rows * cols values). ``value_dtype``: "fp32",
    "bf16", "fp16", a torch dtype, or a size in bytes.
    """
    rows, cols, nnz = int(rows), int(cols), int(nnz)
    if rows < 0 or cols < 0 or nnz < 0 or nnz > rows * cols:
        raise UserError(f"format_nbytes: bad sizes rows={rows} cols={cols} nnz={nnz}")
    v = _value_size(value_dtype)
    if fmt == "dense":
        return rows * cols * v
    if fmt == "csr16":
        return 4 * (rows + 1) + nnz * (2 + v)
    if fmt == "bitmap":
        return rows * ((cols + 7) // 8) + 4 * (rows + 1) + nnz * v
    raise UserError(f"unknown sparse format {fmt!r} (known: dense, {', '.join(FORMAT_NAMES)})")


def _row_ptr_from_counts(counts: torch.Tensor) -> torch.Tensor:
    row_ptr = torch.zeros(counts.numel() + 1, dtype=torch.int64)
    row_ptr[1:] = torch.cumsum(counts.to(torch.int64), 0)
    return row_ptr.to(torch.int32)


class SparseMatrix:
    """Base class: a (rows, cols) matrix stored sparsely. Subclasses define the index."""

    name = "?"
    version = 1
    tensor_names: Tuple[str, ...] = ()

    def __init__(self, shape: Tuple[int, int], **tensors: torch.Tensor):
        self.shape = (int(shape[0]), int(shape[1]))
        for key in self.tensor_names:
            setattr(self, key, tensors[key])

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
        """Move to ``device`` and/or cast the values to ``dtype`` (indices keep their types)."""
        out = {}
        for k, t in self.tensors().items():
            t = t.to(device) if device is not None else t
            if k == "values" and dtype is not None:
                t = t.to(value_dtype(dtype))
            out[k] = t
        return type(self)(self.shape, **out)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(shape={self.shape}, nnz={self.nnz}, sparsity={self.sparsity:.3f}, "
                f"dtype={DTYPE_NAMES.get(self.dtype, self.dtype)}, bytes={self.nbytes()})")

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
        raise NotImplementedError

    def to_csr(self) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(row_ptr int32 (rows+1), col_idx int32 (nnz), values (nnz)): plain CSR, e.g. for PopSparse."""
        return self.row_ptr, self.column_indices().to(torch.int32), self.values

    def row_indices(self) -> torch.Tensor:
        """Row of each value, int64 (nnz,)."""
        return torch.repeat_interleave(torch.arange(self.rows), self.row_counts())

    # ----- helpers shared by the subclasses -----------------------------------------------
    def _check_common(self, where: str) -> None:
        rows, cols = self.shape
        if rows < 0 or cols < 0:
            raise UserError(f"{where}: negative shape {self.shape}")
        v, rp = self.values, self.row_ptr
        if v.dtype not in DTYPE_NAMES:
            raise UserError(f"{where}: values have unsupported dtype {v.dtype} (fp32, bf16, fp16)")
        if v.dim() != 1:
            raise UserError(f"{where}: values must be 1-D, got shape {tuple(v.shape)}")
        if v.numel() > rows * cols:
            raise UserError(f"{where}: {v.numel()} values for a {rows}x{cols} matrix")
        if rp.dtype != torch.int32 or rp.dim() != 1 or rp.numel() != rows + 1:
            raise UserError(f"{where}: row_ptr must be int32 of shape ({rows + 1},), got {rp.dtype} {tuple(rp.shape)}")
        rp64 = rp.to(torch.int64)
        if int(rp64[0]) != 0 or int(rp64[-1]) != v.numel():
            raise UserError(f"{where}: row_ptr must run from 0 to nnz={v.numel()}, got {int(rp64[0])}..{int(rp64[-1])}")
        counts = rp64[1:] - rp64[:-1]
        if rows and (int(counts.min()) < 0 or int(counts.max()) > cols):
            raise UserError(f"{where}: row_ptr is not non-decreasing with at most {cols} entries per row")


def _check_dense(weight: torch.Tensor) -> torch.Tensor:
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise UserError(f"expected a 2-D weight tensor, got {getattr(weight, 'shape', type(weight))}")
    if not weight.is_floating_point():
        raise UserError(f"expected a floating-point weight, got {weight.dtype}")
    return weight.detach().cpu()


class CSR16(SparseMatrix):
    name = "csr16"
    tensor_names = ("row_ptr", "col_idx", "values")

    @classmethod
    def from_dense(cls, weight: torch.Tensor, dtype=None) -> "CSR16":
        w = _check_dense(weight)
        rows, cols = w.shape
        if cols > CSR16_MAX_COLS:
            raise UserError(f"csr16 stores at most {CSR16_MAX_COLS} columns, got {cols}")
        dt = value_dtype(dtype) if dtype is not None else value_dtype(w.dtype)
        nz = w != 0  # (rows, cols)
        if int(nz.sum()) > MAX_NNZ:
            raise UserError(f"matrix has more than {MAX_NNZ} non-zeros")
        col = nz.nonzero()[:, 1].to(torch.int32)  # row-major order
        col16 = torch.where(col >= 1 << 15, col - (1 << 16), col).to(torch.int16)
        return cls((rows, cols), row_ptr=_row_ptr_from_counts(nz.sum(1)), col_idx=col16, values=w[nz].to(dt))

    def column_indices(self) -> torch.Tensor:
        return self.col_idx.to(torch.int64) & 0xFFFF

    def to_dense(self, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        out = torch.zeros(self.shape, dtype=dtype or self.dtype, device=self.values.device)
        out[self.row_indices().to(out.device), self.column_indices()] = self.values.to(out.dtype)
        return out

    def validate(self, where: str = "matrix") -> "CSR16":
        self._check_common(where)
        c = self.col_idx
        if c.dtype != torch.int16 or c.dim() != 1 or c.numel() != self.values.numel():
            raise UserError(f"{where}: col_idx must be int16 of shape ({self.values.numel()},), got {c.dtype} {tuple(c.shape)}")
        if self.cols > CSR16_MAX_COLS:
            raise UserError(f"{where}: csr16 stores at most {CSR16_MAX_COLS} columns, got {self.cols}")
        col = self.column_indices()
        if col.numel():
            if int(col.max()) >= self.cols:
                raise UserError(f"{where}: column index {int(col.max())} out of bounds for {self.cols} columns")
            # strictly increasing within each row (no duplicates, canonical order)
            rows = self.row_indices()
            same_row = rows[1:] == rows[:-1]
            if bool((same_row & (col[1:] <= col[:-1])).any()):
                raise UserError(f"{where}: column indices are not strictly increasing within a row")
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

    @classmethod
    def from_dense(cls, weight: torch.Tensor, dtype=None) -> "Bitmap":
        w = _check_dense(weight)
        rows, cols = w.shape
        dt = value_dtype(dtype) if dtype is not None else value_dtype(w.dtype)
        nz = w != 0
        if int(nz.sum()) > MAX_NNZ:
            raise UserError(f"matrix has more than {MAX_NNZ} non-zeros")
        return cls((rows, cols), mask=_pack_bits(nz), row_ptr=_row_ptr_from_counts(nz.sum(1)), values=w[nz].to(dt))

    def dense_mask(self) -> torch.Tensor:
        return _unpack_bits(self.mask, self.cols)

    def column_indices(self) -> torch.Tensor:
        return self.dense_mask().nonzero()[:, 1]

    def to_dense(self, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        out = torch.zeros(self.shape, dtype=dtype or self.dtype, device=self.values.device)
        # values are stored in row-major order of the set bits, which is masked_scatter_'s order
        return out.masked_scatter_(self.dense_mask(), self.values.to(out.dtype))

    def validate(self, where: str = "matrix") -> "Bitmap":
        self._check_common(where)
        rows, cols = self.shape
        m = self.mask
        if m.dtype != torch.uint8 or tuple(m.shape) != (rows, (cols + 7) // 8):
            raise UserError(f"{where}: mask must be uint8 of shape ({rows}, {(cols + 7) // 8}), "
                            f"got {m.dtype} {tuple(m.shape)}")
        if cols % 8 and rows:
            pad_bits = int((m[:, -1].to(torch.int32) >> (cols % 8)).max())
            if pad_bits:
                raise UserError(f"{where}: mask has bits set beyond column {cols - 1} (index out of bounds)")
        popcount = _unpack_bits(m, cols).sum(1)
        if not torch.equal(popcount, self.row_counts()):
            bad = int((popcount != self.row_counts()).nonzero()[0, 0])
            raise UserError(f"{where}: row {bad} has {int(popcount[bad])} mask bits but row_ptr gives "
                            f"{int(self.row_counts()[bad])} values")
        return self


FORMATS = {"bitmap": Bitmap, "csr16": CSR16}


def format_class(name: str):
    if name not in FORMATS:
        raise UserError(f"unknown sparse format {name!r} (known: {', '.join(FORMAT_NAMES)})")
    return FORMATS[name]


def from_dense(weight: torch.Tensor, fmt: str = DEFAULT_FORMAT, dtype=None) -> SparseMatrix:
    """Store ``weight`` (exact zeros are dropped) in format ``fmt`` with value dtype ``dtype``."""
    return format_class(fmt).from_dense(weight, dtype)


def from_tensors(fmt: str, shape, tensors: Dict[str, torch.Tensor], where: str = "matrix") -> SparseMatrix:
    """Rebuild and validate a stored matrix (names every missing or bad tensor)."""
    cls = format_class(fmt)
    missing = [k for k in cls.tensor_names if k not in tensors]
    if missing:
        raise UserError(f"{where}: {fmt} matrix lacks tensors {missing}")
    try:
        shape = (int(shape[0]), int(shape[1]))
    except (TypeError, ValueError, IndexError):
        raise UserError(f"{where}: bad shape {shape!r}") from None
    return cls(shape, **{k: tensors[k] for k in cls.tensor_names}).validate(where)
