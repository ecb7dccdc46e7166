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
    assert format_nbytes("bitmap", 10, 20, 7, "int8") == 10 * 3 + 4 * 11 + 7 + 4 * 10  # + fp32 scale a row
    with pytest.raises(UserError):
        format_nbytes("csr16", 2, 2, 1, "int8")  # int8 values are bitmap only
    with pytest.raises(UserError):
        format_nbytes("bitmap", 2, 2, 1, "int4")


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
        from_dense(torch.zeros(3, 3), "bitmap", "int4")
    with pytest.raises(UserError):
        from_dense(torch.zeros(3, 3), "csr16", "int8")  # int8 values: bitmap only
    with pytest.raises(UserError):
        CSR16.from_dense(torch.zeros(1, 70000))


# ----- validation where a format object is built from tensors ------------------------------------

def _csr_tampers(m):
    """(name, tensors) of every way the stored index of a valid matrix ``m`` is made invalid."""
    rp = m.row_ptr
    counts = m.row_counts()
    assert int(counts[0]) >= 1 and int((counts > 0).sum()) >= 3
    non_monotone = rp.clone()
    non_monotone[1] = rp[-1]  # jumps to nnz, then falls back: start 0 and end nnz still hold
    not_from_zero = rp.clone()
    not_from_zero[0] = 1
    not_to_nnz = rp.clone()
    not_to_nnz[-1] -= 1
    cases = [
        ("row_ptr non-monotone", dict(row_ptr=non_monotone)),
        ("row_ptr not from 0", dict(row_ptr=not_from_zero)),
        ("row_ptr not to nnz", dict(row_ptr=not_to_nnz)),
        ("row_ptr too short", dict(row_ptr=rp[:-1].clone())),
        ("row_ptr int64", dict(row_ptr=rp.to(torch.int64))),
        ("values int32", dict(values=m.values.to(torch.int32))),
        ("values 2-D", dict(values=m.values.view(1, -1))),
        ("values one short", dict(values=m.values[:-1].clone())),
    ]
    if isinstance(m, CSR16):
        col = m.col_idx.clone()
        col[0] = m.cols  # one past the last column
        wrapped = m.col_idx.clone()
        wrapped[0] = -1  # read back as 65535
        dup = m.col_idx.clone()
        first_row = next(r for r in range(m.rows) if counts[r] >= 2)
        s = int(rp[first_row])
        dup[s + 1] = dup[s]
        cases += [("column out of range", dict(col_idx=col)), ("column 65535", dict(col_idx=wrapped)),
                  ("column repeated in a row", dict(col_idx=dup)),
                  ("col_idx int32", dict(col_idx=m.col_idx.to(torch.int32))),
                  ("col_idx one short", dict(col_idx=m.col_idx[:-1].clone()))]
    else:
        pad = m.mask.clone()
        pad[0, -1] |= 0x80  # a bit beyond the last column
        flipped = m.mask.clone()
        flipped[2, 0] ^= 0x01  # popcount of row 2 no longer matches row_ptr
        cases += [("mask bit beyond the last column", dict(mask=pad)), ("mask popcount", dict(mask=flipped)),
                  ("mask int16", dict(mask=m.mask.to(torch.int16))),
                  ("mask one row short", dict(mask=m.mask[:-1].clone()))]
    return [(name, _tamper(m, **change)) for name, change in cases]


def _valid_matrix(fmt):
    w = random_sparse(6, 21, 0.5, 3)
    w[:, 20] = 1.0  # every row has a value in the last byte's columns
    return from_dense(w, fmt, torch.bfloat16)


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_every_tampering_is_refused_where_tensors_become_a_matrix(fmt):
    from ipu_sparse.sparse.formats import FormatError

    m = _valid_matrix(fmt)
    cls = FORMATS[fmt]
    cls(m.shape, **m.tensors())  # the untampered tensors pass
    cases = _csr_tampers(m)
    assert len(cases) >= 12
    for name, tensors in cases:
        # a library caller gets a ValueError ...
        with pytest.raises(ValueError, match="layers.3.q"):
            cls(m.shape, where="layers.3.q", **tensors)
        with pytest.raises(FormatError):
            cls(m.shape, **tensors)
        # ... and a file's tensors a UserError (one line on the command line)
        with pytest.raises(UserError, match="ckpt: q"):
            from_tensors(fmt, m.shape, tensors, where="ckpt: q")


class _SpyKernels:
    """Stands in for the compiled extension: records every call, and whether its index was valid."""

    def __init__(self):
        self.calls = []

    def _call(self, fmt, x, tensors, bias, rows, cols):
        cls = FORMATS[fmt]
        try:
            m = cls((rows, cols), **dict(zip(cls.tensor_names, tensors)))
            ok = True
        except ValueError:
            m, ok = None, False
        self.calls.append((fmt, ok))
        from ipu_sparse.sparse.kernels import reference_matmul
        return reference_matmul(x, m, bias) if ok else torch.zeros(x.shape[0], rows)

    def bitmap_matmul(self, x, mask, row_ptr, values, bias, rows, cols):
        return self._call("bitmap", x, (mask, row_ptr, values), bias, rows, cols)

    def csr_matmul(self, x, row_ptr, col_idx, values, bias, rows, cols):
        return self._call("csr16", x, (row_ptr, col_idx, values), bias, rows, cols)


@pytest.fixture
def spy_kernels(monkeypatch):
    from ipu_sparse.sparse import kernels

    spy = _SpyKernels()
    monkeypatch.setattr(kernels.BINDING, "ext", spy)
    monkeypatch.setattr(kernels.BINDING, "tried", True)
    monkeypatch.setattr(kernels.BINDING, "backend", "compiled")
    monkeypatch.setattr(kernels.BINDING, "fast", None)
    return spy


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_the_kernel_is_never_reached_with_a_bad_index(fmt, spy_kernels):
    from ipu_sparse.sparse import kernels
    from ipu_sparse.sparse.linear import SparseLinear

    m = _valid_matrix(fmt)
    x = torch.randn(3, 21)
    layer = SparseLinear(m, torch.randn(6))
    want = layer(x)
    assert spy_kernels.calls == [(fmt, True)]  # the layer's decode path does use the (spied) kernel
    torch.testing.assert_close(want, x @ m.to_dense().float().t() + layer.bias)
    state = layer.state_dict()
    for name, tensors in _csr_tampers(m):
        with pytest.raises(ValueError):
            kernels.sparse_matmul(x, type(m)(m.shape, **tensors))
        bad_state = dict(state, **tensors)
        with pytest.raises(ValueError, match="state dict"):
            layer.load_state_dict(bad_state)
        torch.testing.assert_close(layer(x), want)  # the layer kept its valid index
    assert all(ok for _, ok in spy_kernels.calls), name
    assert len(spy_kernels.calls) == 1 + len(_csr_tampers(m))



def test_format_options_take_their_choices_from_the_registry():
    import argparse

    from ipu_sparse.cli import build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    for command, extra in [("sparsify", ()), ("account", ()), ("prune", ("dense",))]:
        option = next(a for a in sub.choices[command]._actions if "--format" in a.option_strings)
        assert tuple(option.choices) == extra + tuple(sorted(FORMATS)), command


def test_byte_count_is_the_format_classes():
    for fmt, cls in FORMATS.items():
        m = _valid_matrix(fmt)
        parts = cls.byte_parts(m.rows, m.cols, m.nnz, m.dtype)
        assert parts == {k: t.numel() * t.element_size() for k, t in m.tensors().items()}
        assert format_nbytes(fmt, m.rows, m.cols, m.nnz, m.dtype) == cls.nbytes_for(m.rows, m.cols, m.nnz, 2) == m.nbytes()
