"""Sparse checkpoints: exact save/load round trip, loader integration, validation of bad files, CLI."""
import copy
import json

import pytest
import torch

from ipu_sparse.checkpoint import META_FILE, save_dense_checkpoint
from ipu_sparse.cli import main as cli_main
from ipu_sparse.errors import UserError
from ipu_sparse.fileio import sha256_file
from ipu_sparse.loading import LoadedModel, load_checkpoint, load_model
from ipu_sparse.loading.tokenizer import ByteTokenizer
from ipu_sparse.prune import magnitude_prune_
from ipu_sparse.sparse.checkpoint import save_sparse_checkpoint
from ipu_sparse.sparse.linear import LowPrecisionLinear, SparseConfig, SparseLinear, sparse_modules, sparsify_

IDX = torch.tensor([[1, 7, 30, 99, 4, 5, 200, 17]])


@pytest.fixture
def pruned_llama(tiny_llama):
    magnitude_prune_(tiny_llama, 0.8)
    return tiny_llama


@pytest.mark.parametrize("fmt", ["bitmap", "csr16"])
def test_round_trip_fp32_exact(pruned_llama, tmp_path, fmt):
    out = save_sparse_checkpoint(pruned_llama, ByteTokenizer(256), tmp_path / "ck", format=fmt, dtype="fp32")
    meta = json.loads((out / META_FILE).read_text())
    assert meta["format"] == "sparse" and meta["version"] == 1 and meta["head"]["kind"] == "tied"
    assert len(meta["layers"]) == 14 and all(v["format"] == fmt for v in meta["layers"].values())
    assert all(abs(v["sparsity"] - 0.8) < 0.01 for v in meta["layers"].values())
    lm = load_checkpoint(out)  # the package's loader dispatches to the sparse one
    assert isinstance(lm, LoadedModel) and isinstance(lm.tokenizer, ByteTokenizer)
    sp = sparse_modules(lm.model)
    assert len(sp) == 14
    for name, mod in pruned_llama.linear_layers():
        assert torch.equal(sp[name].weight, mod.weight)  # bit-exact weights
    assert lm.model.lm_head.weight is lm.model.embed.weight
    torch.testing.assert_close(lm.model(IDX), pruned_llama(IDX), rtol=1e-4, atol=1e-4)
    assert isinstance(load_model(str(out)).model.layers[0].attn.q_proj, SparseLinear)


def test_round_trip_luminous_bias_bf16_and_sparse_head(tiny_luminous, tmp_path):
    magnitude_prune_(tiny_luminous, 0.8, include_head=True)
    out = save_sparse_checkpoint(tiny_luminous, None, tmp_path / "ck", dtype="bf16", include_head=True,
                                 dense_dtype="fp32")
    lm = load_checkpoint(out)
    assert isinstance(lm.model.lm_head, SparseLinear)
    for name, mod in tiny_luminous.linear_layers(include_head=True):
        got = dict(lm.model.linear_layers(include_head=True))[name]
        assert torch.equal(got.weight, mod.weight.to(torch.bfloat16))
        assert torch.equal(got.bias, mod.bias.float()) if mod.bias is not None else got.bias is None
    ref = sparsify_(copy.deepcopy(tiny_luminous), SparseConfig(dtype="bf16", include_head=True))
    torch.testing.assert_close(lm.model(IDX), ref(IDX), rtol=1e-5, atol=1e-5)


def test_low_precision_head_and_already_sparse_model(pruned_llama, tmp_path):
    m = sparsify_(copy.deepcopy(pruned_llama), SparseConfig(format="csr16", dtype="fp16", head_dtype="fp16"))
    out = save_sparse_checkpoint(m, None, tmp_path / "ck", format="bitmap", dense_dtype="fp32")  # stored as they are
    meta = json.loads((out / META_FILE).read_text())
    assert meta["head"] == {"kind": "low_precision", "dtype": "fp16", "source_tied": True}
    assert {v["format"] for v in meta["layers"].values()} == {"csr16"}
    lm = load_checkpoint(out)
    assert isinstance(lm.model.lm_head, LowPrecisionLinear)
    torch.testing.assert_close(lm.model(IDX), m(IDX), rtol=1e-5, atol=1e-5)


def test_dense_tensors_stored_16bit_by_default_fp32_on_request(pruned_llama, tmp_path):
    from safetensors import safe_open

    def dtypes(path):
        with safe_open(str(path / "model.safetensors"), framework="pt") as f:
            return {k: f.get_tensor(k).dtype for k in f.keys()}

    for dense_dtype, want in ((None, torch.bfloat16), ("fp16", torch.float16), ("fp32", torch.float32)):
        out = save_sparse_checkpoint(pruned_llama, None, tmp_path / f"ck-{dense_dtype}", dtype="bf16",
                                     dense_dtype=dense_dtype)
        dt = dtypes(out)
        assert dt["embed.weight"] == want and dt["norm.weight"] == want and dt["layers.0.attn_norm.weight"] == want
        assert dt["layers.0.attn.q_proj.values"] == torch.bfloat16  # sparse values keep their own dtype
        assert json.loads((out / META_FILE).read_text())["dtype"] == str(want).replace("torch.", "")
        lm = load_checkpoint(out)
        assert torch.equal(lm.model.embed.weight, pruned_llama.embed.weight.to(want).float())
        assert lm.model.lm_head.weight is lm.model.embed.weight


def test_overwrite_and_extra_meta(pruned_llama, tmp_path):
    out = tmp_path / "ck"
    save_sparse_checkpoint(pruned_llama, None, out, extra_meta={"pruning": {"method": "magnitude"}})
    with pytest.raises(UserError, match="already exists"):
        save_sparse_checkpoint(pruned_llama, None, out)
    save_sparse_checkpoint(pruned_llama, None, out, overwrite=True)
    with pytest.raises(UserError, match="reserved"):
        save_sparse_checkpoint(pruned_llama, None, tmp_path / "x", extra_meta={"layers": {}})
    assert not (tmp_path / "x").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["ck"]  # no temporary directories left


# ----- bad files -------------------------------------------------------------------------------

@pytest.fixture
def saved(pruned_llama, tmp_path):
    return save_sparse_checkpoint(pruned_llama, None, tmp_path / "ck", dtype="bf16")


def _edit_meta(path, fn):
    meta = json.loads((path / META_FILE).read_text())
    fn(meta)
    (path / META_FILE).write_text(json.dumps(meta))


def _rewrite_tensors(path, fn, metadata=None):
    """Change tensors and re-hash (so the structural checks, not the hash, must catch it)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    st = path / "model.safetensors"
    with safe_open(str(st), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        md = f.metadata()
    fn(tensors)
    save_file(tensors, str(st), metadata=metadata if metadata is not None else md)
    _edit_meta(path, lambda m: m["files"].__setitem__("model.safetensors", sha256_file(st)))


@pytest.mark.parametrize("edit,match", [
    (lambda m: m.__setitem__("version", 99), "version"),
    (lambda m: m.__setitem__("format", "sparse-v9"), "format"),
    (lambda m: m["layers"]["layers.0.attn.q_proj"].__setitem__("dtype", "int8"), "int8"),
    (lambda m: m["layers"]["layers.0.attn.q_proj"].__setitem__("shape", [64, 65]), "layers.0.attn.q_proj"),
    (lambda m: m["layers"]["layers.0.attn.q_proj"].__setitem__("format", "coo"), "layers.0.attn.q_proj"),
    (lambda m: m["layers"]["layers.0.attn.q_proj"].__setitem__("nnz", 3), "layers.0.attn.q_proj"),
    (lambda m: m["layers"].__setitem__("layers.0.attn_norm", m["layers"]["layers.0.attn.q_proj"]), "attn_norm"),
    (lambda m: m.__setitem__("head", {"kind": "magic"}), "head"),
    (lambda m: m["files"].__setitem__("model.safetensors", "0" * 64), "hash"),
])
def test_bad_metadata(saved, edit, match):
    _edit_meta(saved, edit)
    with pytest.raises(UserError, match=match):
        load_checkpoint(saved)


def test_truncated_file(saved):
    st = saved / "model.safetensors"
    st.write_bytes(st.read_bytes()[:1000])
    with pytest.raises(UserError, match="hash"):
        load_checkpoint(saved)
    _edit_meta(saved, lambda m: m["files"].__setitem__("model.safetensors", sha256_file(st)))
    with pytest.raises(UserError, match="corrupt or truncated"):
        load_checkpoint(saved)


def test_wrong_magic(saved):
    _rewrite_tensors(saved, lambda t: None, metadata={"format": "pt"})
    with pytest.raises(UserError, match="magic"):
        load_checkpoint(saved)


def _set_col(t):
    c = t["layers.1.mlp.down_proj.mask"]
    c[0, -1] = 255
    c[0, -2] = 255


@pytest.mark.parametrize("fn,match", [
    (lambda t: t.__setitem__("layers.1.mlp.down_proj.mask", t["layers.1.mlp.down_proj.mask"][:, :-1].clone()),
     "layers.1.mlp.down_proj"),
    (_set_col, "layers.1.mlp.down_proj"),
    (lambda t: t.__setitem__("layers.0.attn.k_proj.values", t["layers.0.attn.k_proj.values"].to(torch.int16)),
     "layers.0.attn.k_proj"),
    (lambda t: t.__setitem__("layers.0.attn.k_proj.values", t["layers.0.attn.k_proj.values"].float()),
     "layers.0.attn.k_proj"),
    (lambda t: t.pop("layers.0.mlp.up_proj.row_ptr"), "layers.0.mlp.up_proj.row_ptr"),
    (lambda t: t.__setitem__("embed.weight", t["embed.weight"][:-1].clone()), "embed.weight"),
    (lambda t: t.__setitem__("stray.weight", torch.zeros(2)), "stray.weight"),
])
def test_bad_tensors(saved, fn, match):
    _rewrite_tensors(saved, fn)
    with pytest.raises(UserError, match=match):
        load_checkpoint(saved)


def test_csr_index_out_of_bounds(pruned_llama, tmp_path):
    out = save_sparse_checkpoint(pruned_llama, None, tmp_path / "ck", format="csr16")

    def bump(t):
        c = t["layers.0.mlp.down_proj.col_idx"]
        c[-1] = 128  # down_proj has 128 columns
    _rewrite_tensors(out, bump)
    with pytest.raises(UserError, match="layers.0.mlp.down_proj.*out of bounds"):
        load_checkpoint(out)


# ----- CLI --------------------------------------------------------------------------------------

def test_cli_sparsify_inspect_account(tmp_path, capsys):
    dense = save_dense_checkpoint(load_model("tiny-llama").model, ByteTokenizer(256), tmp_path / "dense")
    out = tmp_path / "sparse"
    assert cli_main(["sparsify", "--model", str(dense), "--format", "bitmap", "--dtype", "fp16",
                     "--magnitude", "0.8", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "sparsity 0.800" in text and "whole model" in text
    assert cli_main(["sparsify", "--model", str(dense), "--out", str(out)]) == 2  # exists
    capsys.readouterr()
    assert cli_main(["inspect", str(out), "--layers", "--verify"]) == 0
    text = capsys.readouterr().out
    assert "layers.1.mlp.down_proj" in text and "verified" in text
    js = tmp_path / "acc.json"
    assert cli_main(["account", "--model", str(out), "--json", str(js)]) == 0
    acc = json.loads(js.read_text())
    assert abs(acc["sparse_layers"]["sparsity"] - 0.8) < 1e-3
    assert cli_main(["inspect", str(dense)]) == 0
    assert "dense checkpoint" in capsys.readouterr().out
    assert cli_main(["inspect", str(tmp_path / "missing")]) == 2
    assert cli_main(["sparsify", "--model", "tiny-llama", "--magnitude", "1.5", "--out", str(tmp_path / "z")]) == 2


@pytest.mark.slow
def test_smollm2_sparse_matches_dense_with_zeros(smollm2, tmp_path):
    model = copy.deepcopy(smollm2.model)
    magnitude_prune_(model, 0.8)
    idx = torch.tensor([smollm2.tokenizer.encode("The capital of France is")])
    ref = model(idx)
    out = save_sparse_checkpoint(model, smollm2.tokenizer, tmp_path / "ck", dtype="bf16", head_dtype="bf16")
    meta = json.loads((out / META_FILE).read_text())
    assert meta["totals"]["sparse_layer_bytes"] / meta["totals"]["sparse_layer_dense_fp16_bytes"] < 0.27
    lm = load_checkpoint(out)
    got = lm.model(idx)
    assert torch.equal(got[0, -1].argmax(), ref[0, -1].argmax())
    assert (got - ref).abs().max() < 0.05 * ref.abs().max()


@pytest.mark.slow
def test_smollm2_80pct_bitmap_bytes_on_disk_match_accounting(smollm2, tmp_path, capsys):
    """An 80% bitmap checkpoint (bf16 values, dense tensors 16-bit by default) is as small on disk as
    the accounting says (within 1%) and at most 45% of the dense fp16 model; inspect prints both."""
    from ipu_sparse.sparse.checkpoint import disk_bytes, summarize

    model = copy.deepcopy(smollm2.model)
    magnitude_prune_(model, 0.8)
    out = save_sparse_checkpoint(model, smollm2.tokenizer, tmp_path / "ck", format="bitmap", dtype="bf16")
    result = summarize(json.loads((out / META_FILE).read_text()))
    on_disk, accounted = disk_bytes(out), result["whole_model"]["bytes"]
    assert abs(on_disk - accounted) / accounted < 0.01
    assert on_disk / result["whole_model"]["dense_fp16_bytes"] <= 0.45
    assert cli_main(["inspect", str(out)]) == 0
    text = capsys.readouterr().out
    assert f"on disk: model.safetensors {on_disk / 1e6:.2f} MB" in text and "of dense fp16" in text
    lm = load_checkpoint(out)
    idx = torch.tensor([smollm2.tokenizer.encode("The capital of France is")])
    got, ref = lm.model(idx), model(idx)
    assert torch.equal(got[0, -1].argmax(), ref[0, -1].argmax())
    assert (got - ref).abs().max() < 0.05 * ref.abs().max()
