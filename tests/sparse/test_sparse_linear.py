"""SparseLinear == dense-with-zeros linear, for every format and dtype; sparsify_ on whole models."""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from ipu_sparse.errors import UserError
from ipu_sparse.prune import magnitude_prune_
from ipu_sparse.sparse import kernels
from ipu_sparse.sparse.formats import FORMATS
from ipu_sparse.sparse.linear import LowPrecisionLinear, SparseConfig, SparseLinear, sparse_modules, sparsify_

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# Against the dense layer run *entirely* in the low-precision dtype (output rounding included).
LOWP_RTOL = {"bf16": 2e-2, "fp16": 2e-3}


def pruned_linear(inp, out, sparsity, bias=True, seed=0):
    torch.manual_seed(seed)
    lin = nn.Linear(inp, out, bias=bias)
    with torch.no_grad():
        lin.weight.mul_(torch.rand_like(lin.weight) >= sparsity)
    return lin


@pytest.mark.parametrize("backend", ["auto", "reference"])
@pytest.mark.parametrize("fmt", sorted(FORMATS))
@pytest.mark.parametrize("dname", sorted(DTYPES))
def test_sparse_linear_equals_dense_with_zeros(fmt, dname, backend):
    dt = DTYPES[dname]
    lin = pruned_linear(96, 40, 0.8)
    sp = SparseLinear.from_linear(lin, fmt, dt)
    assert sp.is_sparse_linear and sp.in_features == 96 and sp.out_features == 40
    assert sp.nnz == int((lin.weight != 0).sum())
    w_q = lin.weight.detach().to(dt).float()  # the weight as stored
    assert torch.equal(sp.weight.float(), w_q)
    before = kernels.get_backend()
    kernels.set_backend(backend)
    try:
        for shape in [(1, 96), (3, 96), (2, 5, 96), (33, 96)]:
            x = torch.randn(*shape)
            y = sp(x)
            assert y.shape == (*shape[:-1], 40) and y.dtype == torch.float32
            # exact up to fp32 summation order
            torch.testing.assert_close(y, F.linear(x, w_q, lin.bias), rtol=1e-5, atol=1e-5)
            if dt is torch.float32:
                torch.testing.assert_close(y, lin(x), rtol=1e-5, atol=1e-5)
            else:  # vs the whole dense layer in bf16/fp16
                xl = x.to(dt)
                yl = sp(xl)
                assert yl.dtype == dt
                try:
                    ref = F.linear(xl, lin.weight.to(dt), lin.bias.to(dt)).float()
                except RuntimeError:  # torch 2.0: no fp16 matmul on CPU; round the fp32 result instead
                    ref = F.linear(xl.float(), lin.weight.to(dt).float(), lin.bias.to(dt).float()).to(dt).float()
                torch.testing.assert_close(yl.float(), ref, rtol=LOWP_RTOL[dname], atol=LOWP_RTOL[dname])
    finally:
        kernels.set_backend(before)


def test_sparse_linear_no_bias_and_empty():
    lin = pruned_linear(30, 7, 1.0, bias=False)  # all zeros
    sp = SparseLinear.from_linear(lin, "bitmap", torch.bfloat16)
    assert sp.nnz == 0 and sp.sparsity == 1.0
    assert torch.equal(sp(torch.randn(4, 30)), torch.zeros(4, 7))


def test_sparsify_tiny_llama_matches_dense_with_zeros(tiny_llama):
    magnitude_prune_(tiny_llama, 0.8)
    dense = copy.deepcopy(tiny_llama)
    idx = torch.randint(0, 256, (2, 12))
    ref = dense(idx)
    for fmt in FORMATS:
        m = sparsify_(copy.deepcopy(tiny_llama), SparseConfig(format=fmt, dtype="fp32"))
        sp = sparse_modules(m)
        assert len(sp) == 2 * 7
        assert len(list(m.linear_layers())) == 14  # still found by the model's introspection
        torch.testing.assert_close(m(idx), ref, rtol=1e-4, atol=1e-4)
    m = sparsify_(copy.deepcopy(tiny_llama), SparseConfig(dtype="bf16"))
    assert (m(idx) - ref).abs().max() < 0.05 * ref.abs().max()


def test_sparsify_luminous_bias_and_filter(tiny_luminous):
    magnitude_prune_(tiny_luminous, 0.7)
    ref = tiny_luminous(torch.arange(10)[None])
    m = sparsify_(copy.deepcopy(tiny_luminous), SparseConfig(format="csr16", dtype="fp32"),
                  filter_fn=lambda mod, fqn: "mlp" in fqn)
    names = sorted(sparse_modules(m))
    assert names and all(".mlp." in n for n in names)
    assert all(sparse_modules(m)[n].bias is not None for n in names)
    torch.testing.assert_close(m(torch.arange(10)[None]), ref, rtol=1e-4, atol=1e-4)


def test_sparsify_head_options(tiny_llama):
    magnitude_prune_(tiny_llama, 0.8, include_head=True)
    assert tiny_llama.lm_head.weight is not tiny_llama.embed.weight
    idx = torch.randint(0, 256, (1, 9))
    ref = tiny_llama(idx)
    m = sparsify_(copy.deepcopy(tiny_llama), SparseConfig(dtype="fp32", include_head=True))
    assert isinstance(m.lm_head, SparseLinear)
    torch.testing.assert_close(m(idx), ref, rtol=1e-4, atol=1e-4)
    m = sparsify_(copy.deepcopy(tiny_llama), SparseConfig(dtype="fp32", head_dtype="fp16"))
    assert isinstance(m.lm_head, LowPrecisionLinear) and m.lm_head.weight.dtype == torch.float16
    assert (m(idx) - ref).abs().max() < 1e-2 * ref.abs().max() + 1e-3


def test_min_sparsity_keeps_dense_layers(tiny_llama):
    m = sparsify_(tiny_llama, SparseConfig(min_sparsity=0.5))  # random init: no zeros
    assert not sparse_modules(m)


def test_bad_config():
    with pytest.raises(UserError):
        SparseConfig(format="coo")
    with pytest.raises(UserError):
        SparseConfig(dtype="int4")
    with pytest.raises(UserError):
        SparseConfig(format="csr16", dtype="int8")  # int8 values: bitmap only
    with pytest.raises(UserError):
        SparseConfig(head_dtype="int4")
    with pytest.raises(UserError):
        SparseConfig(min_sparsity=2.0)


def test_kv_cache_decode_with_sparse_layers(tiny_llama):
    from ipu_sparse.generate import generate

    magnitude_prune_(tiny_llama, 0.8)
    ref = generate(tiny_llama, [1, 5, 9, 13], 10)
    m = sparsify_(copy.deepcopy(tiny_llama), SparseConfig(dtype="fp32"))
    assert generate(m, [1, 5, 9, 13], 10) == ref


def test_to_csr_for_the_ipu_path():
    lin = pruned_linear(50, 9, 0.7)
    sp = SparseLinear.from_linear(lin, "bitmap", torch.float32)
    row_ptr, col_idx, values = sp.to_csr()
    dense = torch.sparse_csr_tensor(row_ptr.long(), col_idx.long(), values, (9, 50)).to_dense()
    assert torch.equal(dense, lin.weight.detach())


def test_densify_inverts_sparsify(tiny_llama):
    from ipu_sparse.sparse.linear import SparseConfig, densify_, sparsify_

    with torch.no_grad():
        for _, m in tiny_llama.linear_layers():
            m.weight[m.weight.abs() < m.weight.abs().median()] = 0
    idx = torch.randint(0, 256, (1, 9))
    ref = tiny_llama(idx)
    sparsify_(tiny_llama, SparseConfig(format="csr16", dtype="fp32"))
    assert all(getattr(m, "is_sparse_linear", False) for _, m in tiny_llama.linear_layers())
    densify_(tiny_llama)
    assert all(type(m) is torch.nn.Linear for _, m in tiny_llama.linear_layers())
    torch.testing.assert_close(tiny_llama(idx), ref)


@pytest.mark.parametrize("fmt", ["bitmap", "csr16"])
def test_many_rows_take_the_expanded_dense_path_and_agree(fmt):
    torch.manual_seed(0)
    lin = nn.Linear(40, 24)
    with torch.no_grad():
        lin.weight[torch.rand_like(lin.weight) < 0.7] = 0
    sl = SparseLinear.from_linear(lin, fmt, torch.float32)
    x = torch.randn(SparseLinear.dense_rows_threshold + 3, 40)
    with torch.no_grad():
        torch.testing.assert_close(sl(x), lin(x), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(sl(x[:5]), lin(x[:5]), rtol=1e-5, atol=1e-5)
