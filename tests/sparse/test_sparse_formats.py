"""Formats: exact dense <-> sparse round trips (property-tested), byte counts, validation."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ipu_sparse.errors import UserError
from ipu_sparse.sparse.formats import (Bitmap, CSR16, FORMATS, format_nbytes, from_dense, from_tensors)

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def random_sparse(rows, cols, density, seed, empty_rows=0, empty_cols=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g)
    w = w * (torch.rand(rows, cols, generator=g) < density)
    if rows and empty_rows:
        w[torch.randperm(rows, generator=g)[:empty_rows]] = 0
    if cols and empty_cols:
        w[:, torch.randperm(cols, generator=g)[:empty_cols]] = 0
    return w


@settings(max_examples=60, deadline=None)
@given(rows=st.integers(0, 40), cols=st.integers(0, 300), density=st.floats(0.0, 1.0),
       seed=st.integers(0, 2**31 - 1), empty_rows=st.integers(0, 5), empty_cols=st.integers(0, 20),
       fmt=st.sampled_from(sorted(FORMATS)), dtype=st.sampled_from(DTYPES))
def test_round_trip_exact(rows, cols, density, seed, empty_rows, empty_cols, fmt, dtype):
    w = random_sparse(rows, cols, density, seed, empty_rows, empty_cols).to(dtype)
    m = from_dense(w, fmt).validate()
    assert m.dtype == dtype and m.shape == (rows, cols)
    assert m.nnz == int((w != 0).sum())
    assert torch.equal(m.to_dense(), w)  # exact, zeros included
    assert m.nbytes() == format_nbytes(fmt, rows, cols, m.nnz, dtype)
    # rebuilt from its stored tensors (as a checkpoint load does)
    again = from_tensors(fmt, m.shape, m.tensors())
    assert torch.equal(again.to_dense(), w)
    row_ptr, col_idx, values = m.to_csr()
    assert row_ptr.dtype == torch.int32 and col_idx.dtype == torch.int32
    dense = torch.zeros(rows, cols, dtype=dtype)
    for r in range(rows):
        s, e = int(row_ptr[r]), int(row_ptr[r + 1])
        dense[r, col_idx[s:e].long()] = values[s:e]
    assert torch.equal(dense, w)


def test_value_dtype_conversion_rounds_like_torch():
    w = random_sparse(16, 40, 0.5, 0)
    for fmt in FORMATS:
        for dt in DTYPES:
            assert torch.equal(from_dense(w, fmt, dt).to_dense(), w.to(dt))


def test_csr16_columns_above_int16_range():
    w = torch.zeros(2, 40000)
    w[0, 39999] = 1.5
    w[1, 32768] = -2.0
    w[1, 5] = 3.0
    m = CSR16.from_dense(w).validate()
    assert torch.equal(m.to_dense(), w)
    assert m.column_indices().tolist() == [39999, 5, 32768]


def test_compact_format_under_30_percent_at_80_sparsity():
    for rows, cols in [(576, 576), (192, 576), (1536, 576), (576, 1536), (49152, 576)]:
        nnz = int(0.2 * rows * cols)
        dense16 = format_nbytes("dense", rows, cols, 0, "fp16")
        ratio = format_nbytes("bitmap", rows, cols, nnz, "fp16") / dense16
        assert ratio <= 0.30, (rows, cols, ratio)
        assert format_nbytes("csr16", rows, cols, nnz, "fp16") / dense16 > 0.40  # the seed's CSR


def test_format_nbytes_formulas():
    assert format_nbytes("csr16", 10, 20, 7, "bf16") == 4 * 11 + 7 * 4
    assert format_nbytes("bitmap", 10, 20, 7, "fp32") == 10 * 3 + 4 * 11 + 7 * 4
    assert format_nbytes("dense", 10, 20, 0, torch.float32) == 800
    with pytest.raises(UserError):
        format_nbytes("coo", 1, 1, 0, "fp16")
    with pytest.raises(UserError):
        format_nbytes("bitmap", 2, 2, 5, "fp16")
    with pytest.raises(UserError):
        format_nbytes("bitmap", 2, 2, 1, "int8")


def _tamper(m, **changes):
    t = dict(m.tensors())
    t.update(changes)
    return t


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_validation_rejects_bad_structures(fmt):
    w = random_sparse(6, 21, 0.5, 1)
    m = from_dense(w, fmt, torch.bfloat16)
    bad_rp = m.row_ptr.clone()
    bad_rp[-1] += 1
    cases = [
        _tamper(m, row_ptr=bad_rp),
        _tamper(m, row_ptr=m.row_ptr.to(torch.int64)),
        _tamper(m, values=m.values.to(torch.int32)),
        _tamper(m, values=m.values[:-1]),
    ]
    for tensors in cases:
        with pytest.raises(UserError, match="layers.0.q"):
            from_tensors(fmt, (6, 21), tensors, where="layers.0.q")
    with pytest.raises(UserError, match="lacks"):
        from_tensors(fmt, (6, 21), {"values": m.values}, where="x")


def test_validation_rejects_out_of_bounds_indices():
    w = random_sparse(4, 21, 0.5, 2)
    m = CSR16.from_dense(w)
    col = m.col_idx.clone()
    col[0] = 21
    with pytest.raises(UserError, match="out of bounds"):
        from_tensors("csr16", (4, 21), _tamper(m, col_idx=col))
    col = m.col_idx.clone()
    if m.row_counts()[0] >= 2:
        col[1] = col[0]
        with pytest.raises(UserError, match="increasing"):
            from_tensors("csr16", (4, 21), _tamper(m, col_idx=col))
    b = Bitmap.from_dense(w)
    mask = b.mask.clone()
    mask[0, -1] |= 0x80  # column 23 of a 21-column matrix
    with pytest.raises(UserError, match="out of bounds"):
        from_tensors("bitmap", (4, 21), _tamper(b, mask=mask))
    mask = b.mask.clone()
    mask[1, 0] ^= 0x01  # popcount no longer matches row_ptr
    with pytest.raises(UserError, match="row"):
        from_tensors("bitmap", (4, 21), _tamper(b, mask=mask))


def test_unsupported_dtype_and_shape():
    with pytest.raises(UserError):
        from_dense(torch.zeros(3, 3, dtype=torch.int32), "bitmap")
    with pytest.raises(UserError):
        from_dense(torch.zeros(3), "bitmap")
    with pytest.raises(UserError):
        from_dense(torch.zeros(3, 3), "bitmap", "int8")
    with pytest.raises(UserError):
        CSR16.from_dense(torch.zeros(1, 70000))
