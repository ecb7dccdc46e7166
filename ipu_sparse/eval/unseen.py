"""Perplexity on a kind of text a recovery run never trains on: fiction (LAMBADA passages).

Recovery trains on encyclopaedic or teacher-written text and evaluates on held-out windows of
the same kind; this measures what happens to text of another kind. Passages are the first
``n_passages`` LAMBADA (OpenAI) items, context + " " + target word joined (the whole passage,
not the last-word task), each scored on its own from position 0 without BOS, cut to the model's
context; ppl = exp(mean NLL over every predicted token of all passages). The file is an
evaluation set, which recovery's training-text guard refuses by name, so a run never trains
on it. Recovery reports it with every evaluation (``unseen_ppl``); ``scripts/bench_recover.py``
and the report read the same number.
"""
from __future__ import annotations

import time
from typing import List, Optional

import torch

from .perplexity import PerplexityResult, ppl_from_nll, token_logprobs
from .zeroshot import load_task

UNSEEN_KIND = "LAMBADA passages (fiction)"


def fiction_passages(tokenizer, n_passages: int, max_len: int, path: Optional[str] = None) -> List[List[int]]:
    """Token ids of the first ``n_passages`` LAMBADA passages (context + target word), each cut to ``max_len``."""
    items = load_task("lambada", limit=n_passages, path=path)
    out = []
    for it in items:
        ids = tokenizer.encode(it["context"] + it["continuation"])[:max_len]
        if len(ids) >= 2:
            out.append(ids)
    return out


@torch.no_grad()
def fiction_ppl(model, tokenizer, n_passages: int = 64, path: Optional[str] = None, batch_size: int = 8,
                passages: Optional[List[List[int]]] = None) -> PerplexityResult:
    """Perplexity of ``model`` on the first ``n_passages`` LAMBADA passages (see the module docstring).

    ``passages`` (from ``fiction_passages``) skips reading and tokenizing the file again. Batches
    are right-padded; padded positions come after every real one (causal attention), and are not
    counted."""
    t0 = time.time()
    if passages is None:
        passages = fiction_passages(tokenizer, n_passages, model.config.max_seq_len, path)
    device = model.embed.weight.device
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        for s in range(0, len(passages), batch_size):
            group = passages[s:s + batch_size]
            T = max(len(p) for p in group)
            ids = torch.zeros(len(group), T, dtype=torch.long, device=device)  # (B, T), pad id 0 never scored
            valid = torch.zeros(len(group), T - 1, dtype=torch.bool, device=device)  # (B, T-1) predicted tokens
            for i, p in enumerate(group):
                ids[i, :len(p)] = torch.tensor(p, dtype=torch.long)
                valid[i, :len(p) - 1] = True
            lp = token_logprobs(model, ids)  # (B, T-1)
            total += float(-(lp.double() * valid).sum())
            count += int(valid.sum())
    finally:
        model.train(was_training)
    nll = total / max(count, 1)
    return PerplexityResult(ppl=ppl_from_nll(nll), nll=nll, tokens=count, windows=len(passages),
                            seq_len=max((len(p) for p in passages), default=0), source=UNSEEN_KIND,
                            seconds=time.time() - t0)
