"""Perplexity on text recovery never trains on (LAMBADA passages)."""
import math

import pytest
import torch

from ipu_sparse.eval.perplexity import token_logprobs
from ipu_sparse.eval.unseen import fiction_passages, fiction_ppl
from ipu_sparse.loading import load_model


def test_fiction_ppl_is_the_mean_nll_of_each_passage_scored_alone(shared_data):
    lm = load_model("tiny-llama")
    path = str(shared_data / "zeroshot" / "lambada_openai.jsonl")
    passages = fiction_passages(lm.tokenizer, 5, 64, path)
    assert len(passages) == 5 and all(2 <= len(p) <= 64 for p in passages)
    assert len({len(p) for p in passages}) > 1 or all(len(p) == 64 for p in passages)
    total, count = 0.0, 0
    with torch.no_grad():
        for p in passages:
            lp = token_logprobs(lm.model, torch.tensor([p]))
            total += float(-lp.double().sum())
            count += len(p) - 1
    r = fiction_ppl(lm.model, lm.tokenizer, passages=passages, batch_size=3)  # padded batches
    assert r.tokens == count and r.windows == 5
    assert r.ppl == pytest.approx(math.exp(total / count), rel=1e-5)
    # short passages (a shorter cut) are padded next to longer ones and still scored alone
    mixed = [p[: 10 + 7 * i] for i, p in enumerate(passages)]
    alone = [fiction_ppl(lm.model, lm.tokenizer, passages=[p]) for p in mixed]
    together = fiction_ppl(lm.model, lm.tokenizer, passages=mixed, batch_size=5)
    want = sum(a.nll * a.tokens for a in alone) / sum(a.tokens for a in alone)
    assert together.nll == pytest.approx(want, rel=1e-5)
    assert fiction_ppl(lm.model, lm.tokenizer, 4, path).ppl > 1
