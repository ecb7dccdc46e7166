"""Correctness oracle: our model against transformers' LlamaForCausalLM on the same weights."""
import pytest
import torch

from ipu_sparse.config import get_preset
from ipu_sparse.generate import generate
from ipu_sparse.loading.hf import to_transformers
from ipu_sparse.model import build_model

transformers = pytest.importorskip("transformers", reason="transformers is the parity oracle")


def hf_greedy(hf, ids, n):
    out = hf.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False, min_new_tokens=n,
                      pad_token_id=0, eos_token_id=None)
    return out[0, len(ids):].tolist()


@torch.no_grad()
def test_tiny_llama_logits_and_greedy_match():
    model = build_model(get_preset("tiny-llama-4l"), seed=2)
    hf = to_transformers(model)
    ids = torch.randint(0, 256, (2, 17))
    assert (model(ids) - hf(ids).logits).abs().max() <= 1e-4
    prompt = ids[0].tolist()
    assert generate(model, prompt, 20) == hf_greedy(hf, prompt, 20)


@pytest.mark.slow
@torch.no_grad()
def test_smollm2_logits_and_32_greedy_tokens_match(smollm2):
    model, tok = smollm2.model, smollm2.tokenizer
    hf = to_transformers(model)
    prompt = tok.encode(tok.apply_chat_template([{"role": "user", "content": "Write a haiku about sparse matrices."}]))
    ids = torch.tensor([prompt])
    diff = (model(ids) - hf(ids).logits).abs().max().item()
    assert diff <= 1e-3, diff
    assert generate(model, prompt, 32) == hf_greedy(hf, prompt, 32)
