"""Correctness oracle: our model against transformers' LlamaForCausalLM on the same weights."""
import pytest
import torch

from ipu_sparse.config import get_preset
from ipu_sparse.generate import generate
from ipu_sparse.loading.hf import ours_to_hf
from ipu_sparse.model import build_model

transformers = pytest.importorskip("transformers", reason="transformers is the parity oracle")


def to_hf(model):
    cfg = model.config
    hf_cfg = transformers.LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, intermediate_size=cfg.d_ff,
        num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_kv_heads,
        max_position_embeddings=cfg.max_seq_len, rms_norm_eps=cfg.norm_eps, rope_theta=cfg.rope_theta,
        tie_word_embeddings=cfg.tie_embeddings, bos_token_id=cfg.bos_token_id, eos_token_id=cfg.eos_token_id,
    )
    hf = transformers.LlamaForCausalLM(hf_cfg).eval()
    sd = {ours_to_hf(k): v for k, v in model.state_dict().items()}
    missing, unexpected = hf.load_state_dict(sd, strict=False)
    assert not unexpected, unexpected
    assert all("rotary" in m or (cfg.tie_embeddings and m == "lm_head.weight") for m in missing), missing
    return hf


def hf_greedy(hf, ids, n):
    out = hf.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False, min_new_tokens=n,
                      pad_token_id=0, eos_token_id=None)
    return out[0, len(ids):].tolist()


@torch.no_grad()
def test_tiny_llama_logits_and_greedy_match():
    model = build_model(get_preset("tiny-llama-4l"), seed=2)
    hf = to_hf(model)
    ids = torch.randint(0, 256, (2, 17))
    assert (model(ids) - hf(ids).logits).abs().max() <= 1e-4
    prompt = ids[0].tolist()
    assert generate(model, prompt, 20) == hf_greedy(hf, prompt, 20)


@pytest.mark.slow
@torch.no_grad()
def test_smollm2_logits_and_32_greedy_tokens_match(smollm2):
    model, tok = smollm2.model, smollm2.tokenizer
    hf = to_hf(model)
    prompt = tok.encode(tok.apply_chat_template([{"role": "user", "content": "Write a haiku about sparse matrices."}]))
    ids = torch.tensor([prompt])
    diff = (model(ids) - hf(ids).logits).abs().max().item()
    assert diff <= 1e-3, diff
    assert generate(model, prompt, 32) == hf_greedy(hf, prompt, 32)
