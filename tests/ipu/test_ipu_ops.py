"""Sparse-matmul op wrapper: CPU reference equals dense; IPU path calls custom_op (PopTorch TEST DOUBLE)."""
import hashlib
import sys

import pytest
import torch
import torch.nn as nn

from ipu_sparse.config import get_preset
from ipu_sparse.ipu.ops import (IpuSparseLinear, csr_from_dense, export_patterns_, read_pattern, running_on_ipu,
                                to_ipu_sparse_)
from ipu_sparse.model import build_model
from ipu_sparse.prune import magnitude_prune_

from ipu_poptorch_double import PoptorchDouble


def sparse_linear(rows=24, cols=40, sparsity=0.8, bias=True, seed=0):
    torch.manual_seed(seed)
    lin = nn.Linear(cols, rows, bias=bias)
    with torch.no_grad():
        lin.weight.mul_(torch.rand_like(lin.weight) > sparsity)
    return lin


def test_csr_from_dense_round_trip():
    lin = sparse_linear()
    row_ptr, col_idx, values = csr_from_dense(lin.weight)
    assert row_ptr[-1] == values.numel() == int((lin.weight != 0).sum())
    m = IpuSparseLinear(row_ptr, col_idx, values, lin.weight.shape)
    assert torch.equal(m.to_dense(), lin.weight.detach())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_reference_matches_dense(dtype):
    lin = sparse_linear()
    m = IpuSparseLinear.from_module(lin)
    x = torch.randn(2, 5, 40)
    want = lin(x)
    got = m.to(dtype)(x.to(dtype)).float()
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got, want, rtol=tol, atol=tol)


def test_from_module_with_to_csr():
    lin = sparse_linear(bias=False)

    class Sparse(nn.Module):  # the sparse-module interface: to_csr() -> (row_ptr, col_idx, values)
        in_features, out_features, bias = 40, 24, None

        def to_csr(self):
            return csr_from_dense(lin.weight)

    m = IpuSparseLinear.from_module(Sparse())
    x = torch.randn(3, 40)
    torch.testing.assert_close(m(x), lin(x))


def test_model_conversion_keeps_logits_and_is_found(tiny_luminous):
    magnitude_prune_(tiny_luminous, 0.8, scope="row")
    idx = torch.randint(0, 256, (1, 12))
    want = tiny_luminous(idx)
    to_ipu_sparse_(tiny_luminous)
    names = [n for n, m in tiny_luminous.linear_layers()]
    assert all(isinstance(tiny_luminous.get_submodule(n), IpuSparseLinear) for n in names)
    assert len(names) == 2 * 6  # q k v o up down per layer, still found (is_sparse_linear)
    torch.testing.assert_close(tiny_luminous(idx), want, rtol=1e-4, atol=1e-5)


def test_pattern_file_round_trip(tmp_path):
    m = IpuSparseLinear.from_module(sparse_linear())
    path, digest = m.export_pattern(tmp_path, "layer")
    rows, cols, row_ptr, col_idx = read_pattern(path)
    assert (rows, cols) == (24, 40)
    assert (row_ptr == m.row_ptr.numpy()).all() and (col_idx == m.col_idx.numpy()).all()
    assert digest == hashlib.sha256(open(path, "rb").read()).hexdigest()
    assert digest[:16] in path


def test_ipu_path_calls_custom_op_with_values_as_input(monkeypatch, tmp_path):
    double = PoptorchDouble(running_on_ipu=True)
    monkeypatch.setitem(sys.modules, "poptorch", double)
    assert running_on_ipu()
    m = IpuSparseLinear.from_module(sparse_linear(bias=False))
    with pytest.raises(RuntimeError, match="export_patterns_"):
        m(torch.randn(2, 40))
    model = build_model(get_preset("tiny-llama"), seed=0)
    magnitude_prune_(model, 0.8, scope="row")
    to_ipu_sparse_(model)
    assert export_patterns_(model, tmp_path) == 14
    out = model(torch.randint(0, 256, (1, 4)))
    assert out.shape == (1, 4, 256)
    assert len(double.custom_ops) == 14
    op = double.custom_ops[0]
    q = model.layers[0].attn.q_proj
    assert (op["name"], op["domain"], op["version"]) == ("SparseMatMul", "ipu_sparse", 1)
    assert op["inputs"] == [(4, 64), (q.nnz,)]          # x and the non-zero values (a weight input)
    a = op["attributes"]
    assert a["pattern_path"] == q.pattern_path and a["pattern_hash"] == q.pattern_hash
    assert (a["rows"], a["cols"], a["nnz"]) == (64, 64, q.nnz)
    assert all(not isinstance(v, torch.Tensor) for v in a.values())  # no tensors in attributes


def test_no_poptorch_means_cpu(monkeypatch):
    monkeypatch.delitem(sys.modules, "poptorch", raising=False)
    assert not running_on_ipu()


def test_custom_op_domain_is_ours_and_matches_the_cpp_op():
    """Finding 8: PopART reserves ai.graphcore; the Python call and the C++ registration agree."""
    import re
    from pathlib import Path

    from ipu_sparse.ipu.ops import OP_DOMAIN, OP_NAME, OP_VERSION

    assert OP_DOMAIN != "ai.graphcore"
    cpp = (Path(__file__).resolve().parents[2] / "popart_ops" / "sparse_matmul.cpp").read_text()
    m = re.search(r'SparseMatMulId\s*=\s*\{"([^"]+)",\s*"([^"]+)",\s*(\d+)\}', cpp)
    assert m and (m.group(1), m.group(2), int(m.group(3))) == (OP_DOMAIN, OP_NAME, OP_VERSION)


def test_double_rejects_reserved_domain(monkeypatch):
    double = PoptorchDouble(running_on_ipu=True)
    with pytest.raises(RuntimeError, match="ai.graphcore"):
        double.custom_op([torch.zeros(1, 2)], "SparseMatMul", "ai.graphcore", 1, [torch.zeros(1, 2)])


def test_example_output_on_input_device(tmp_path):
    """Finding 9: the example output is made where the input lives (not always on the CPU)."""
    m = IpuSparseLinear.from_module(sparse_linear(bias=False))
    m.export_pattern(tmp_path, "layer")
    x = torch.randn(3, 40, device="meta")
    inputs, name, domain, version, examples, attributes = m.custom_op_args(x)
    assert examples[0].device == x.device and examples[0].shape == (3, 24)


def test_ipu_layer_refuses_a_bad_csr_index():
    lin = sparse_linear()
    row_ptr, col_idx, values = csr_from_dense(lin.weight)
    bad_rp = row_ptr.clone()
    bad_rp[1] = row_ptr[-1]  # non-monotone, still from 0 to nnz
    bad_col = col_idx.clone()
    bad_col[0] = lin.in_features
    for rp, col in [(bad_rp, col_idx), (row_ptr, bad_col), (row_ptr[:-1], col_idx)]:
        with pytest.raises(ValueError, match="IpuSparseLinear"):
            IpuSparseLinear(rp, col, values, tuple(lin.weight.shape))
