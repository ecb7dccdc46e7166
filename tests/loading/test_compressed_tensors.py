"""compressed-tensors (sparse-bitmask) export and import.

Without the library: our round trip, the CLI, bad directories. With it (the optional extra; the
sparse-bitmask compressor ships in compressed-tensors <= 0.14, which needs torch >= 2.1 for its
float8 types, so these tests skip on Python 3.8 + torch 2.0.1): our export decompresses with the
library to exactly our weights, transformers' LlamaForCausalLM on the library's decompressed
weights and the directory's config.json gives our logits, and a directory written by the
library's compressor loads in ipu-sparse."""
import copy
import json

import pytest
import torch

from ipu_sparse.cli import main
from ipu_sparse.errors import UserError
from ipu_sparse.loading import load_model
from ipu_sparse.loading.compressed_tensors import save_compressed_tensors
from ipu_sparse.prune import magnitude_prune_
from ipu_sparse.sparse.linear import SparseConfig, SparseLinear, sparse_modules, sparsify_

IDX = torch.tensor([[1, 7, 30, 99, 4, 5, 200, 17]])
NO_LIBRARY = ("compressed-tensors with the sparse-bitmask compressor is not installed (the optional extra; "
              "it needs torch >= 2.1, so not on Python 3.8 + torch 2.0.1)")


def ct_library():
    # Where torch can run the library, `make venv` installs it: a broken install fails here, it is
    # not skipped. Only torch < 2.1 (no float8 types: Python 3.8 + torch 2.0.1) skips.
    if not hasattr(torch, "float8_e4m3fn"):
        pytest.skip(NO_LIBRARY)
    from compressed_tensors.compressors import BaseCompressor, ModelCompressor
    from compressed_tensors.config import BitmaskConfig

    assert "sparse-bitmask" in BaseCompressor.registered_names(), "compressed-tensors lacks sparse-bitmask"
    return ModelCompressor, BitmaskConfig


@pytest.fixture
def sparse_llama():
    lm = load_model("tiny-llama")
    magnitude_prune_(lm.model, 0.8)
    sparsify_(lm.model, SparseConfig(format="bitmap", dtype="bf16"))
    return lm


def test_round_trip_keeps_sparse_layers_and_values(sparse_llama, tmp_path):
    out = save_compressed_tensors(sparse_llama.model, sparse_llama.tokenizer, tmp_path / "ct")
    hf = json.loads((out / "config.json").read_text())
    sc = hf["quantization_config"]["sparsity_config"]
    assert hf["quantization_config"]["quant_method"] == "compressed-tensors" and sc["format"] == "sparse-bitmask"
    assert abs(sc["global_sparsity"] - 0.8) < 0.01 and sc["ignore"] == ["lm_head"] and hf["torch_dtype"] == "bfloat16"
    lm = load_model(str(out))
    assert lm.meta["format"] == "compressed-tensors" and lm.tokenizer is not None
    got, want = sparse_modules(lm.model), sparse_modules(sparse_llama.model)
    assert set(got) == set(want) and len(got) == 14
    for name, mod in want.items():
        assert got[name].format == "bitmap" and got[name].values.dtype == torch.bfloat16
        for key in ("mask", "row_ptr", "values"):
            assert torch.equal(getattr(got[name], key), getattr(mod, key))
    ref = copy.deepcopy(sparse_llama.model)
    with torch.no_grad():
        ref.embed.weight.copy_(ref.embed.weight.to(torch.bfloat16).float())  # dense tensors are stored bf16
        for n, p in ref.named_parameters():
            p.copy_(p.to(torch.bfloat16).float())
    torch.testing.assert_close(lm.model(IDX), ref(IDX), rtol=1e-5, atol=1e-5)


def test_cli_export_from_a_sparse_checkpoint_and_serve_it(tmp_path, capsys):
    ck, ct = tmp_path / "ck", tmp_path / "ct"
    assert main(["sparsify", "--model", "tiny-llama", "--magnitude", "0.8", "--out", str(ck)]) == 0
    assert main(["export", "--model", str(ck), "--compressed-tensors", str(ct)]) == 0
    assert main(["export", "--model", str(ck), "--compressed-tensors", str(ct)]) == 2  # exists
    assert "already exists" in capsys.readouterr().err
    a, b = load_model(str(ck)).model, load_model(str(ct)).model
    assert isinstance(b.layers[1].mlp.down_proj, SparseLinear)
    for (name, x), (_, y) in zip(sparse_modules(a).items(), sparse_modules(b).items()):
        assert torch.equal(x.weight, y.weight), name
    torch.testing.assert_close(a(IDX), b(IDX), rtol=1e-5, atol=1e-5)


def _rewrite(path, fn):
    from safetensors import safe_open
    from safetensors.torch import save_file

    st = path / "model.safetensors"
    with safe_open(str(st), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    fn(tensors)
    save_file(tensors, str(st))


def test_bad_directories_are_one_line_errors(sparse_llama, tmp_path):
    good = save_compressed_tensors(sparse_llama.model, None, tmp_path / "ct")
    q = "model.layers.0.self_attn.q_proj"
    cases = {
        "missing": (lambda t: t.pop(f"{q}.row_offsets"), "lacks"),
        "popcount": (lambda t: t[f"{q}.bitmask"].__setitem__((0, 0), 0), "mask bits"),
        "shape": (lambda t: t.__setitem__(f"{q}.shape", torch.tensor([64, 65])), "self_attn.q_proj: mask must be"),
    }
    import shutil

    for name, (edit, match) in cases.items():
        d = tmp_path / name
        shutil.copytree(good, d)
        _rewrite(d, edit)
        with pytest.raises(UserError, match=match):
            load_model(str(d))
    d = tmp_path / "quantized"
    shutil.copytree(good, d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["quantization_config"]["config_groups"] = {"group_0": {"targets": ["Linear"]}}
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UserError, match="quantized"):
        load_model(str(d))
    cfg["quantization_config"].pop("config_groups")
    cfg["quantization_config"]["sparsity_config"]["format"] = "sparse-24-bitmask"
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UserError, match="sparse-24-bitmask"):
        load_model(str(d))


def test_export_decompresses_with_the_library_to_exactly_our_weights(sparse_llama, tmp_path):
    ModelCompressor, _ = ct_library()
    out = save_compressed_tensors(sparse_llama.model, None, tmp_path / "ct")
    compressor = ModelCompressor.from_pretrained(str(out))
    assert compressor.sparsity_config.format == "sparse-bitmask"
    dense = dict(compressor.sparsity_compressor.decompress(str(out)))
    from ipu_sparse.loading.hf import ours_to_hf

    for name, mod in sparse_modules(sparse_llama.model).items():
        w = dense[ours_to_hf(name + ".weight")]
        assert w.dtype == torch.bfloat16 and torch.equal(w, mod.weight), name
    assert torch.equal(dense["model.embed_tokens.weight"], sparse_llama.model.embed.weight.to(torch.bfloat16))
    assert torch.equal(dense["model.norm.weight"], sparse_llama.model.norm.weight.to(torch.bfloat16))


def _transformers_logits(path, idx):
    """transformers' LlamaForCausalLM from the directory's config.json with the weights the
    compressed-tensors library decompresses from it (fp32)."""
    import transformers

    ModelCompressor, _ = ct_library()
    hf = json.loads((path / "config.json").read_text())
    hf.pop("quantization_config")
    config = transformers.LlamaConfig(**{k: v for k, v in hf.items() if k not in ("architectures", "torch_dtype")})
    model = transformers.LlamaForCausalLM(config).eval()
    sd = {k: v.float() for k, v in ModelCompressor.from_pretrained(str(path)).sparsity_compressor.decompress(str(path))}
    missing, unexpected = model.load_state_dict(sd, strict=False)
    assert not unexpected and all("rotary" in m or m == "lm_head.weight" for m in missing)
    if config.tie_word_embeddings:
        model.tie_weights()
    with torch.no_grad():
        return model(idx).logits


def test_transformers_on_our_export_gives_our_logits(sparse_llama, tmp_path):
    ct_library()
    out = save_compressed_tensors(sparse_llama.model, None, tmp_path / "ct")
    ours = load_model(str(out)).model
    with torch.no_grad():
        assert (ours(IDX) - _transformers_logits(out, IDX)).abs().max() <= 1e-3


def test_directory_written_by_the_library_loads_in_ipu_sparse(tmp_path):
    """The library's compressor API (ModelCompressor + BitmaskConfig) writes the directory."""
    ModelCompressor, BitmaskConfig = ct_library()
    from safetensors.torch import save_file

    from ipu_sparse.loading.hf import to_transformers

    lm = load_model("tiny-llama-4l")  # untied head: lm_head stays dense ("ignore")
    magnitude_prune_(lm.model, 0.7)
    hf_model = to_transformers(lm.model)
    compressor = ModelCompressor(sparsity_config=BitmaskConfig(global_sparsity=0.7, targets=["Linear"],
                                                                 ignore=["lm_head"]))
    tensors = compressor.compress(hf_model)
    out = tmp_path / "written-by-compressed-tensors"
    out.mkdir()
    hf_model.config.save_pretrained(str(out))
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(out / "model.safetensors"))
    compressor.update_config(str(out))
    assert "model.layers.0.mlp.up_proj.bitmask" in tensors
    got = load_model(str(out))
    sp = sparse_modules(got.model)
    assert len(sp) == 4 * 7 and all(m.values.dtype == torch.float32 for m in sp.values())
    for name, mod in lm.model.linear_layers():
        assert torch.equal(sp[name].weight, mod.weight), name
    assert not isinstance(got.model.lm_head, SparseLinear)
    with torch.no_grad():
        torch.testing.assert_close(got.model(IDX), lm.model(IDX), rtol=1e-5, atol=1e-5)
        assert (got.model(IDX) - hf_model(IDX).logits).abs().max() <= 1e-3


@pytest.mark.slow
def test_smollm2_80pct_export_transformers_logits_equal_ours(smollm2, tmp_path):
    ct_library()
    model = copy.deepcopy(smollm2.model)
    magnitude_prune_(model, 0.8)
    sparsify_(model, SparseConfig(format="bitmap", dtype="bf16"))
    out = save_compressed_tensors(model, smollm2.tokenizer, tmp_path / "ct")
    ours = load_model(str(out))
    idx = torch.tensor([ours.tokenizer.encode("The capital of France is")])
    with torch.no_grad():
        diff = (ours.model(idx) - _transformers_logits(out, idx)).abs().max()
    assert diff <= 1e-3
