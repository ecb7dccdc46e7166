"""int8 sparse values (bitmap + per-row scales) and the int8 LM head (``QuantizedLinear``):
quantization error bounds, kernels (compiled on every code path, and reference) against the
dequantized dense matmul, modules, checkpoints (round trip, corrupted scales), accounting, CLI."""
import copy
import json

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from ipu_sparse.checkpoint import META_FILE
from ipu_sparse.cli import main as cli_main
from ipu_sparse.errors import UserError
from ipu_sparse.fileio import sha256_file
from ipu_sparse.loading import load_checkpoint
from ipu_sparse.prune import magnitude_prune_
from ipu_sparse.sparse import kernels
from ipu_sparse.sparse.accounting import LayerRow, account, rows_from_model
from ipu_sparse.sparse.checkpoint import save_sparse_checkpoint
from ipu_sparse.sparse.formats import (Bitmap, FormatError, dequantize_q8, format_nbytes, from_dense, q8_nbytes,
                                       quantize_q8)
from ipu_sparse.sparse.linear import QuantizedLinear, SparseConfig, SparseLinear, densify_, sparsify_

IDX = torch.tensor([[1, 7, 30, 99, 4, 5, 200, 17]])


def sparse_weight(rows, cols, density, seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g) * (torch.rand(rows, cols, generator=g) < density)
    if rows > 2:
        w[1] = 0  # an empty row
    return w


def assert_matmul_close(y, x, w_deq, bias=None):
    ref = F.linear(x, w_deq, bias)
    bound = (x.abs() @ w_deq.abs().t()) * 1e-5 + 1e-5  # fp32 sums in another order
    assert bool(((y - ref).abs() <= bound).all()), float((y - ref).abs().max())


# ----- quantization --------------------------------------------------------------------------------

@pytest.mark.parametrize("rows,cols,density", [(7, 37, 0.3), (64, 128, 0.2), (5, 16, 1.0), (3, 9, 0.0)])
def test_int8_bitmap_round_trip_error_bound(rows, cols, density):
    w = sparse_weight(rows, cols, density, 0)
    m = from_dense(w, "bitmap", "int8")
    assert m.values.dtype == torch.int8 and m.scales.dtype == torch.float32 and m.scales.shape == (rows,)
    assert m.tensor_names == ("mask", "row_ptr", "values", "scales")
    absmax = w.abs().amax(1)
    torch.testing.assert_close(m.scales, torch.where(absmax > 0, absmax / 127, torch.ones_like(absmax)))
    assert int(m.values.abs().max()) <= 127 if m.nnz else True
    deq = m.to_dense()
    assert deq.dtype == torch.float32
    # round to nearest: |error| <= scale / 2 per row; zeros stay exactly zero; the mask is unchanged
    assert bool(((deq - w).abs() <= m.scales[:, None] / 2 * (1 + 1e-6)).all())
    assert bool((deq[w == 0] == 0).all())
    assert torch.equal(m.dense_mask(), w != 0)
    assert m.nbytes() == format_nbytes("bitmap", rows, cols, m.nnz, "int8") == \
        rows * ((cols + 7) // 8) + 4 * (rows + 1) + m.nnz + 4 * rows
    # validated rebuild, and conversions both ways
    again = Bitmap((rows, cols), **m.tensors())
    assert torch.equal(again.to_dense(), deq)
    assert torch.equal(m.to(dtype=torch.float32).to_dense(), deq)
    assert torch.equal(from_dense(w, "bitmap", "fp32").to(dtype="int8").values, m.values)


@pytest.mark.parametrize("group", [0, 8, 32])
def test_quantize_q8_error_bound(group):
    w = torch.randn(40, 64)
    w[3] = 0
    q, s = quantize_q8(w, group)
    g = 1 if group == 0 else 64 // group
    assert q.dtype == torch.int8 and s.shape == (40, g) and bool((s > 0).all())
    deq = dequantize_q8(q, s)
    per_col_scale = s.repeat_interleave(64 // g, dim=1)
    assert bool(((deq - w).abs() <= per_col_scale / 2 * (1 + 1e-6)).all())
    assert q8_nbytes(40, 64, group) == 40 * 64 + 4 * 40 * g
    with pytest.raises(UserError, match="group size 24"):
        quantize_q8(w, 24)


def test_csr16_refuses_int8():
    with pytest.raises(UserError, match="csr16 does not store int8"):
        from_dense(sparse_weight(4, 8, 0.5, 0), "csr16", "int8")
    with pytest.raises(UserError, match="csr16"):
        SparseConfig(format="csr16", dtype="int8")


@pytest.mark.parametrize("bad,match", [
    (lambda s: s.neg(), "scales holds"),
    (lambda s: s.index_fill(0, torch.tensor([2]), float("nan")), "scales holds"),
    (lambda s: s.index_fill(0, torch.tensor([0]), 0.0), "scales holds"),
    (lambda s: s[:-1], r"scales must be float32 of shape \(7,\)"),
    (lambda s: s.double(), "scales must be float32"),
])
def test_bad_scales_rejected(bad, match):
    m = from_dense(sparse_weight(7, 37, 0.4, 1), "bitmap", "int8")
    t = m.tensors()
    t["scales"] = bad(t["scales"])
    with pytest.raises(FormatError, match=match):
        Bitmap(m.shape, where="w", **t)
    t.pop("scales")
    with pytest.raises(FormatError, match="lacks tensors"):
        Bitmap(m.shape, where="w", **t)


# ----- kernels -----------------------------------------------------------------------------------

@pytest.mark.parametrize("batch", [1, 3, 8, 70])
@pytest.mark.parametrize("rows,cols,density", [(33, 100, 0.2), (16, 576, 0.5), (9, 37, 0.8)])
def test_int8_bitmap_kernels_match_dequantized_dense(rows, cols, density, batch, isas):
    m = from_dense(sparse_weight(rows, cols, density, rows + cols), "bitmap", "int8")
    w_deq = m.to_dense()
    x = torch.randn(batch, cols)
    bias = torch.randn(rows)
    for b in (None, bias):
        assert_matmul_close(kernels.sparse_matmul(x, m, b, backend="reference"), x, w_deq, b)
    if not isas:
        pytest.skip("compiled kernel not built")
    for isa in isas:
        kernels.set_isa(isa)
        for b in (None, bias):
            assert_matmul_close(kernels.sparse_matmul(x, m, b, backend="compiled"), x, w_deq, b)


def test_int8_kernel_rejects_missing_or_bad_scales():
    ext = kernels.load_extension()
    if ext is None:
        pytest.skip("compiled kernel not built")
    m = from_dense(sparse_weight(6, 20, 0.5, 3), "bitmap", "int8")
    x = torch.randn(1, 20)
    with pytest.raises(RuntimeError, match="scales"):
        ext.bitmap_matmul(x, m.mask, m.row_ptr, m.values, None, 6, 20)
    with pytest.raises(RuntimeError, match="scales"):
        ext.bitmap_matmul(x, m.mask, m.row_ptr, m.values, None, 6, 20, m.scales[:-1].contiguous())
    f = from_dense(sparse_weight(6, 20, 0.5, 3), "bitmap", "fp32")
    with pytest.raises(RuntimeError, match="scales"):
        ext.bitmap_matmul(x, f.mask, f.row_ptr, f.values, None, 6, 20, m.scales)


@pytest.mark.parametrize("batch", [1, 2, 5])
@pytest.mark.parametrize("rows,cols,group", [(50, 576, 0), (50, 576, 32), (30, 64, 16), (20, 24, 8), (10, 40, 0)])
def test_q8_gemv_matches_dequantized_dense(rows, cols, group, batch, isas):
    if not isas:
        pytest.skip("compiled kernel not built")
    ext = kernels.load_extension()
    q, s = quantize_q8(torch.randn(rows, cols), group)
    x = torch.randn(batch, cols)
    bias = torch.randn(rows)
    for isa in isas:
        kernels.set_isa(isa)
        assert_matmul_close(ext.q8_matmul(x, q, s), x, dequantize_q8(q, s))
        assert_matmul_close(ext.q8_matmul(x, q, s, bias), x, dequantize_q8(q, s), bias)
    with pytest.raises(RuntimeError, match="groups"):
        ext.q8_matmul(x, q, torch.ones(rows, 7))


# ----- modules -----------------------------------------------------------------------------------

def test_sparse_linear_int8_forward_state_dict_and_dtype_cast():
    lin = nn.Linear(100, 33)
    with torch.no_grad():
        lin.weight.mul_(torch.rand(33, 100) < 0.3)
    sl = SparseLinear.from_linear(lin, "bitmap", "int8")
    assert set(sl.state_dict()) == {"mask", "row_ptr", "values", "scales", "bias"}
    w_deq = sl.weight
    for n in (1, 4, 300):  # kernel path, batched kernel path, dense path (>= dense_rows_threshold)
        x = torch.randn(n, 100)
        assert_matmul_close(sl(x), x, w_deq, lin.bias.detach())
    other = SparseLinear.from_linear(lin, "bitmap", "int8")
    other.load_state_dict(sl.state_dict())
    sd = sl.state_dict()
    sd["scales"] = -sd["scales"]
    with pytest.raises(FormatError, match="scales"):
        other.load_state_dict(sd)
    sl.to(torch.bfloat16)  # floating buffers cast; the scales stay fp32 for the kernel
    assert sl.scales.dtype == torch.float32
    dense = densify_(nn.Sequential(SparseLinear.from_linear(lin, "bitmap", "int8")))[0]
    assert isinstance(dense, nn.Linear) and torch.equal(dense.weight, w_deq)


@pytest.mark.parametrize("group", [0, 32])
def test_quantized_linear_kernel_and_dense_paths(group):
    lin = nn.Linear(64, 300, bias=False)
    ql = QuantizedLinear.from_linear(lin, group)
    assert ql.qweight.dtype == torch.int8 and ql.scales.shape == (300, 1 if group == 0 else 2)
    assert ql.group_size == group and ql.nbytes() == q8_nbytes(300, 64, group)
    w = dequantize_q8(ql.qweight, ql.scales)
    for n in (1, 3, 9, 40):  # compiled GEMV up to kernel_rows_max rows, then dequantized GEMM
        x = torch.randn(2, n, 64)
        assert_matmul_close(ql(x).reshape(-1, 300), x.reshape(-1, 64), w)
    with pytest.raises(UserError, match="bias"):
        QuantizedLinear.from_linear(nn.Linear(64, 8))
    with pytest.raises(UserError, match="scales"):
        QuantizedLinear(ql.qweight, ql.scales.neg())
    with pytest.raises(UserError, match="divid"):
        QuantizedLinear(ql.qweight, torch.ones(300, 3))


# ----- checkpoints -------------------------------------------------------------------------------

@pytest.fixture
def pruned_llama(tiny_llama):
    magnitude_prune_(tiny_llama, 0.8)
    return tiny_llama


@pytest.mark.parametrize("group", [0, 16])
def test_checkpoint_round_trip_int8_values_and_head(pruned_llama, tmp_path, group):
    ref = sparsify_(copy.deepcopy(pruned_llama), SparseConfig(dtype="int8", head_dtype="int8",
                                                               head_group_size=group))
    assert isinstance(ref.lm_head, QuantizedLinear) and ref.embed.weight is not ref.lm_head.weight
    out = save_sparse_checkpoint(pruned_llama, None, tmp_path / "ck", dtype="int8", head_dtype="int8",
                                 head_group_size=group, dense_dtype="fp32")
    meta = json.loads((out / META_FILE).read_text())
    assert meta["head"] == {"kind": "quantized", "dtype": "int8", "group_size": group, "source_tied": True}
    assert all(v["dtype"] == "int8" for v in meta["layers"].values())
    m = load_checkpoint(out).model
    q = m.layers[0].attn.q_proj
    assert isinstance(q, SparseLinear) and q.values.dtype == torch.int8 and q.scales.shape == (q.out_features,)
    assert isinstance(m.lm_head, QuantizedLinear) and torch.equal(m.lm_head.qweight, ref.lm_head.qweight)
    for name, mod in ref.linear_layers():
        got = dict(m.linear_layers())[name]
        assert torch.equal(got.values, mod.values) and torch.equal(got.scales, mod.scales)
    torch.testing.assert_close(m(IDX), ref(IDX), rtol=1e-5, atol=1e-5)
    # the int8 model stays close to the fp32 pruned model
    with torch.no_grad():
        logits, want = m(IDX), pruned_llama(IDX)
    assert float((logits - want).abs().max()) < 0.05 * float(want.abs().max())


def _rewrite(path, fn):
    from safetensors import safe_open
    from safetensors.torch import save_file

    st = path / "model.safetensors"
    with safe_open(str(st), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        md = f.metadata()
    fn(tensors)
    save_file(tensors, str(st), metadata=md)
    meta = json.loads((path / META_FILE).read_text())
    meta["files"]["model.safetensors"] = sha256_file(st)
    (path / META_FILE).write_text(json.dumps(meta))


def _set(name, fn):
    return lambda t: t.__setitem__(name, fn(t[name]))


@pytest.mark.parametrize("edit,match", [
    (_set("layers.0.attn.q_proj.scales", lambda s: s.neg()), "layers.0.attn.q_proj.*scales"),
    (_set("layers.0.attn.q_proj.scales", lambda s: s.index_fill(0, torch.tensor([1]), float("nan"))),
     "layers.0.attn.q_proj.*scales"),
    (_set("layers.1.mlp.down_proj.scales", lambda s: s[:-1].clone()), "layers.1.mlp.down_proj.*scales"),
    (lambda t: t.pop("layers.1.mlp.up_proj.scales"), "layers.1.mlp.up_proj.scales"),
    (_set("layers.0.attn.k_proj.values", lambda v: v.to(torch.int16)), "layers.0.attn.k_proj.values"),
    (_set("lm_head.scales", lambda s: s.neg()), "lm_head.*scales"),
    (_set("lm_head.scales", lambda s: s.index_fill(0, torch.tensor([0]), float("inf"))), "lm_head.*scales"),
    (_set("lm_head.scales", lambda s: s[:, :0].clone()), "lm_head.scales"),
    (_set("lm_head.qweight", lambda q: q.float()), "lm_head.qweight"),
])
def test_corrupted_int8_tensors_rejected(pruned_llama, tmp_path, edit, match):
    out = save_sparse_checkpoint(pruned_llama, None, tmp_path / "ck", dtype="int8", head_dtype="int8")
    _rewrite(out, edit)
    with pytest.raises(UserError, match=match):
        load_checkpoint(out)


def test_bad_quantized_head_metadata(pruned_llama, tmp_path):
    out = save_sparse_checkpoint(pruned_llama, None, tmp_path / "ck", dtype="int8", head_dtype="int8")
    meta = json.loads((out / META_FILE).read_text())
    meta["head"]["group_size"] = 7  # does not divide d_model
    (out / META_FILE).write_text(json.dumps(meta))
    with pytest.raises(UserError, match="group size 7"):
        load_checkpoint(out)


# ----- accounting and CLI ------------------------------------------------------------------------

def test_accounting_int8_bytes(pruned_llama):
    m = sparsify_(copy.deepcopy(pruned_llama), SparseConfig(dtype="int8", head_dtype="int8"))
    rows = rows_from_model(m)
    for r in rows:
        mod = dict(m.linear_layers())[r.name]
        assert r.value_dtype == "int8" and r.bytes == mod.nbytes()  # every stored byte, scales included
    cfg = m.config
    V, D = cfg.vocab_size, cfg.d_model
    row_head = account(cfg, rows, head_dtype="int8")["lm_head"]
    assert row_head["bytes"] == V * D + 4 * V == m.lm_head.nbytes()
    assert account(cfg, rows, head_dtype="int8", head_group_size=16)["lm_head"]["bytes"] == V * D + 4 * V * (D // 16)
    r = LayerRow("x", 10, 20, 40, "bitmap", "int8")
    assert r.bytes == 10 * 3 + 4 * 11 + 40 + 4 * 10


def test_cli_int8(tmp_path, capsys):
    out = tmp_path / "q"
    assert cli_main(["sparsify", "--model", "tiny-llama", "--magnitude", "0.8", "--dtype", "int8",
                     "--head-dtype", "int8", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "value dtypes ['int8']" in text and "head quantized" in text and "dense int8" in text
    assert cli_main(["inspect", str(out), "--layers", "--verify"]) == 0
    assert "verified" in capsys.readouterr().out
    js = tmp_path / "acc.json"
    assert cli_main(["account", "--model", str(out), "--json", str(js)]) == 0
    acc = json.loads(js.read_text())
    meta = json.loads((out / META_FILE).read_text())
    assert acc["sparse_layers"]["bytes"] == meta["totals"]["sparse_layer_bytes"]
    assert acc["lm_head"]["kind"].startswith("dense int8")
    assert cli_main(["account", "--model", "smollm2-135m", "--sparsity", "0.8", "--dtype", "int8",
                     "--head-dtype", "int8", "--head-group-size", "32"]) == 0
    assert "groups of 32" in capsys.readouterr().out
    capsys.readouterr()
    for argv, match in [
        (["sparsify", "--model", "tiny-llama", "--format", "csr16", "--dtype", "int8", "--out", str(tmp_path / "c")],
         "csr16"),
        (["sparsify", "--model", "tiny-llama", "--head-group-size", "32", "--out", str(tmp_path / "g")],
         "--head-dtype int8"),
        (["account", "--model", "tiny-llama", "--sparsity", "0.5", "--head-dtype", "int8",
          "--head-group-size", "7"], "group size 7"),
    ]:
        assert cli_main(argv) == 2
        err = capsys.readouterr().err
        assert match in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "c").exists() and not (tmp_path / "g").exists()
