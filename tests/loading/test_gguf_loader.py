"""GGUF loading: round trip through a GGUF we write (q/k permutation undone), bad files."""
import json

import numpy as np
import pytest
import torch

from ipu_sparse.config import get_preset
from ipu_sparse.errors import UserError
from ipu_sparse.loading import load_model
from ipu_sparse.loading.gguf_export import permute_rope, save_gguf
from ipu_sparse.loading.gguf_loader import unpermute_rope
from ipu_sparse.model import build_model


def byte_bpe_tokenizer():
    """A byte-level BPE tokenizer with the 256 byte symbols, a few merges and ChatML specials."""
    from tokenizers import AddedToken, Tokenizer as HFTokenizer, decoders, models, pre_tokenizers
    from tokenizers.pre_tokenizers import ByteLevel

    from ipu_sparse.loading.tokenizer import DEFAULT_CHAT_TEMPLATE, Tokenizer

    alphabet = sorted(ByteLevel.alphabet())
    vocab = {"<|endoftext|>": 0, "<|im_start|>": 1, "<|im_end|>": 2}
    for ch in alphabet:
        vocab[ch] = len(vocab)
    merges = [("h", "e"), ("l", "l"), ("he", "ll")]
    for a, b in merges:
        vocab[a + b] = len(vocab)
    backend = HFTokenizer(models.BPE(vocab=vocab, merges=merges))
    backend.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                     pre_tokenizers.ByteLevel(add_prefix_space=False)])
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in ("<|endoftext|>", "<|im_start|>", "<|im_end|>")])
    return Tokenizer(backend, 1, 2, DEFAULT_CHAT_TEMPLATE), len(vocab)


@pytest.fixture
def tiny_gguf(tmp_path):
    tok, n_vocab = byte_bpe_tokenizer()
    cfg = get_preset("tiny-llama").replace(vocab_size=n_vocab, name="tiny-gguf")
    model = build_model(cfg, seed=3)
    path = save_gguf(model, tok, tmp_path / "tiny.gguf")
    return model, tok, path


def test_rope_permutation_is_inverted():
    w = np.arange(8 * 3 * 5, dtype=np.float32).reshape(8 * 3, 5)
    assert np.array_equal(unpermute_rope(permute_rope(w, 3), 3), w)
    assert not np.array_equal(permute_rope(w, 3), w)


def test_gguf_round_trip_weights_logits_tokenizer(tiny_gguf):
    model, tok, path = tiny_gguf
    loaded = load_model(str(path))
    ref_sd, got_sd = model.state_dict(), loaded.model.state_dict()
    assert set(ref_sd) == set(got_sd)
    for k in ref_sd:
        assert torch.equal(ref_sd[k], got_sd[k]), k
    idx = torch.randint(0, model.config.vocab_size, (2, 9))
    torch.testing.assert_close(loaded.model(idx), model(idx), rtol=0, atol=1e-6)
    text = "hello <|im_end|> 2024"
    assert loaded.tokenizer.encode(text) == tok.encode(text)
    assert loaded.tokenizer.decode(loaded.tokenizer.encode("hello world")) == "hello world"


def test_missing_file(tmp_path):
    with pytest.raises(UserError, match="GGUF file not found|no such file"):
        load_model(str(tmp_path / "absent.gguf"))


def test_wrong_magic(tmp_path):
    p = tmp_path / "bad.gguf"
    p.write_bytes(b"NOPE" + b"\0" * 100)
    with pytest.raises(UserError, match="not a GGUF file"):
        load_model(str(p))


def test_truncated_file(tiny_gguf, tmp_path):
    _, _, path = tiny_gguf
    data = path.read_bytes()
    for cut in (len(data) // 2, len(data) - 16, 40):
        p = tmp_path / f"cut{cut}.gguf"
        p.write_bytes(data[:cut])
        with pytest.raises(UserError, match="truncated|corrupt"):
            load_model(str(p))


def test_unsupported_architecture(tmp_path):
    import gguf

    p = tmp_path / "other.gguf"
    w = gguf.GGUFWriter(str(p), "bert")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(UserError, match="unsupported GGUF architecture 'bert'"):
        load_model(str(p))


def test_unknown_preset():
    with pytest.raises(UserError, match="not a preset"):
        load_model("no-such-model")


def test_hf_directory_round_trip(tmp_path):
    """A Hugging Face style directory (config.json + safetensors) loads into the same weights."""
    from safetensors.torch import save_file

    from ipu_sparse.loading.hf import ours_to_hf

    cfg = get_preset("tiny-llama-4l")
    model = build_model(cfg, seed=5)
    sd = {ours_to_hf(k): v.contiguous() for k, v in model.state_dict().items()}
    save_file(sd, str(tmp_path / "model.safetensors"))
    hf_cfg = {"model_type": "llama", "vocab_size": cfg.vocab_size, "hidden_size": cfg.d_model,
              "num_hidden_layers": cfg.n_layers, "num_attention_heads": cfg.n_heads,
              "num_key_value_heads": cfg.n_kv_heads, "intermediate_size": cfg.d_ff,
              "max_position_embeddings": cfg.max_seq_len, "rms_norm_eps": cfg.norm_eps,
              "rope_theta": cfg.rope_theta, "tie_word_embeddings": False}
    (tmp_path / "config.json").write_text(json.dumps(hf_cfg))
    loaded = load_model(str(tmp_path))
    idx = torch.randint(0, cfg.vocab_size, (1, 7))
    torch.testing.assert_close(loaded.model(idx), model(idx), rtol=0, atol=0)
    # a shape that does not match the config is named
    sd["model.layers.1.mlp.up_proj.weight"] = torch.zeros(3, 3)
    save_file(sd, str(tmp_path / "model.safetensors"))
    with pytest.raises(UserError, match="layers.1.mlp.up_proj.weight has shape"):
        load_model(str(tmp_path))
    (tmp_path / "model.safetensors").write_bytes(b"\x10\x00")
    with pytest.raises(UserError, match="corrupt or truncated"):
        load_model(str(tmp_path))


def test_cli_export_gguf_and_hf_round_trip(tiny_gguf, tmp_path):
    from ipu_sparse.cli import main

    model, _, path = tiny_gguf
    out = tmp_path / "again.gguf"
    assert main(["export", "--model", str(path), "--gguf", str(out)]) == 0
    assert main(["export", "--model", str(path), "--gguf", str(out)]) == 2  # refuses to overwrite
    hf_dir = tmp_path / "hf"
    assert main(["export", "--model", str(out), "--hf", str(hf_dir)]) == 0
    idx = torch.randint(0, model.config.vocab_size, (1, 6))
    for src in (out, hf_dir):
        torch.testing.assert_close(load_model(str(src)).model(idx), model(idx), rtol=0, atol=1e-6)
