"""Compiled kernel == pure-torch reference, for every code path, format, dtype and batch size."""
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from ipu_sparse.sparse import kernels
from ipu_sparse.sparse.formats import FORMATS, from_dense

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def make_case(rows, cols, density, seed, dtype, fmt):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g) * (torch.rand(rows, cols, generator=g) < density)
    if rows > 2:
        w[1] = 0  # an empty row
    return from_dense(w, fmt, dtype), w.to(dtype).float()


def close(y, ref, w, x):
    # fp32 accumulation in a different order: error bounded by the sum of |products|
    bound = (x.abs() @ w.abs().t()) * 1e-6 + 1e-6
    return bool(((y - ref).abs() <= bound).all())


def test_reference_matches_dense():
    for fmt in FORMATS:
        for dt in DTYPES:
            m, w = make_case(37, 70, 0.3, 0, dt, fmt)
            x = torch.randn(5, 70)
            b = torch.randn(37)
            assert close(kernels.reference_matmul(x, m, b), F.linear(x, w, b), w, x)


@pytest.mark.skipif(kernels.load_extension() is None, reason="compiled kernel not built")
@pytest.mark.parametrize("isa", ["scalar", "avx2", "avx512"])
@pytest.mark.parametrize("fmt", sorted(FORMATS))
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16", "fp16"])
def test_kernel_matches_reference(isa, fmt, dtype, isas):
    if isa not in isas:
        pytest.skip(f"CPU lacks {isa}")
    kernels.set_isa(isa)
    for rows, cols, density in [(1, 1, 1.0), (7, 13, 0.5), (33, 64, 0.2), (64, 100, 0.9), (17, 250, 0.05),
                                (96, 576, 0.2), (40, 1536, 0.0), (5, 300, 1.0)]:
        m, w = make_case(rows, cols, density, rows * cols, dtype, fmt)
        for batch in [1, 2, 3, 8, 9, 16, 32, 33, 70]:
            x = torch.randn(batch, cols)
            for bias in (None, torch.randn(rows)):
                y = kernels.sparse_matmul(x, m, bias, backend="compiled")
                ref = kernels.reference_matmul(x, m, bias)
                assert y.shape == (batch, rows) and y.dtype == torch.float32
                assert close(y, ref, w, x), (rows, cols, density, batch, (y - ref).abs().max())


@pytest.mark.skipif(kernels.load_extension() is None, reason="compiled kernel not built")
@settings(max_examples=40, deadline=None)
@given(rows=st.integers(1, 50), cols=st.integers(1, 200), density=st.floats(0, 1), batch=st.integers(1, 40),
       seed=st.integers(0, 10**6), fmt=st.sampled_from(sorted(FORMATS)), dtype=st.sampled_from(DTYPES))
def test_kernel_property(rows, cols, density, batch, seed, fmt, dtype):
    m, w = make_case(rows, cols, density, seed, dtype, fmt)
    x = torch.randn(batch, cols, generator=torch.Generator().manual_seed(seed))
    assert close(kernels.sparse_matmul(x, m, None, backend="compiled"), kernels.reference_matmul(x, m), w, x)


@pytest.mark.skipif(kernels.load_extension() is None, reason="compiled kernel not built")
def test_kernel_rejects_bad_inputs_without_crashing():
    from ipu_sparse.errors import UserError

    m, _ = make_case(8, 16, 0.5, 0, torch.bfloat16, "bitmap")
    ext = kernels.load_extension()
    with pytest.raises(RuntimeError):
        ext.bitmap_matmul(torch.randn(2, 15), m.mask, m.row_ptr, m.values, None, 8, 16)
    with pytest.raises(RuntimeError):
        ext.bitmap_matmul(torch.randn(2, 16), m.mask, m.row_ptr, m.values[:-1], None, 8, 16)
    with pytest.raises(RuntimeError):
        ext.bitmap_matmul(torch.randn(2, 16), m.mask, m.row_ptr.long(), m.values, None, 8, 16)
    with pytest.raises(RuntimeError):
        ext.set_isa("sse9")
    with pytest.raises(UserError):
        kernels.set_backend("cuda")


def test_reference_backend_and_status():
    m, w = make_case(9, 20, 0.4, 3, torch.float16, "csr16")
    x = torch.randn(4, 20)
    before = kernels.get_backend()
    kernels.set_backend("reference")
    try:
        y = kernels.sparse_matmul(x, m)
    finally:
        kernels.set_backend(before)
    assert close(y, F.linear(x, w), w, x)
    status = kernels.extension_status()
    assert status.startswith("compiled") or status.startswith("reference")
