"""Perplexity: WikiText-2 by the field's protocol, and any text file.

WikiText-2 (as the SparseGPT/Wanda evaluation code does it): the test file's rows joined
with "\\n\\n", tokenized once without BOS, cut into non-overlapping windows of ``seq_len``
tokens (remainder dropped); each window is scored on its own from position 0 and
ppl = exp(mean NLL over every predicted token). ``max_windows`` keeps the first N windows.
"""
from __future__ import annotations

import math
import sys
import time
from dataclasses import asdict, dataclass
from typing import List, Optional

import torch
import torch.nn.functional as F

from ..errors import UserError
from .data import WIKITEXT2_TEST, data_path, read_rows


@dataclass
class PerplexityResult:
    ppl: float
    nll: float          # mean negative log-likelihood per predicted token (nats)
    tokens: int         # predicted tokens
    windows: int
    seq_len: int
    source: str
    seconds: float

    def __float__(self) -> float:
        return float(self.ppl)

    def to_dict(self) -> dict:
        return asdict(self)


def hidden_states(model, idx: torch.Tensor, positions: Optional[torch.Tensor] = None,
                  attn_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Final-norm hidden states (B, T, D) of a causal pass from position 0 (no KV cache).

    ``positions`` (B, T) and ``attn_mask`` (B, 1, T, T) bool (True = may attend) replace the
    positions 0..T-1 and the causal mask, e.g. for several sequences packed into one row."""
    T = idx.shape[1]
    if positions is None:
        cos, sin = model.rope(torch.arange(T, device=idx.device))  # (T, hd)
    else:
        cos, sin = model.rope(positions)
        cos, sin = cos[:, None], sin[:, None]  # (B, 1, T, hd): broadcast over heads
    x = model.embed(idx)  # (B, T, D)
    for layer in model.layers:
        x = layer(x, cos, sin, attn_mask=attn_mask) if attn_mask is not None else layer(x, cos, sin)
    return model.norm(x)


def token_logprobs(model, idx: torch.Tensor, head_chunk: int = 2048) -> torch.Tensor:
    """log p(idx[:, t+1] | idx[:, :t+1]) for every t: (B, T-1), fp32; the LM head runs in chunks."""
    h = hidden_states(model, idx[:, :-1])  # (B, T-1, D)
    B, T1, D = h.shape
    target = idx[:, 1:].reshape(-1)
    flat = h.reshape(-1, D)
    out = torch.empty(flat.shape[0], dtype=torch.float32, device=idx.device)
    for s in range(0, flat.shape[0], head_chunk):
        logits = model.lm_head(flat[s:s + head_chunk]).float()  # (chunk, vocab)
        out[s:s + head_chunk] = -F.cross_entropy(logits, target[s:s + head_chunk], reduction="none")
    return out.view(B, T1)


def windows_ppl(model, ids: List[int], seq_len: int = 512, max_windows: Optional[int] = None,
                batch_size: int = 4, source: str = "", progress: bool = True) -> PerplexityResult:
    """Perplexity of ``ids`` cut into non-overlapping ``seq_len`` windows (remainder dropped)."""
    from tqdm import tqdm

    if seq_len < 2:
        raise UserError(f"seq_len {seq_len} must be at least 2")
    if batch_size < 1:
        raise UserError(f"batch_size {batch_size} must be at least 1")
    n = len(ids) // seq_len
    if max_windows is not None:
        if max_windows < 1:
            raise UserError(f"max_windows {max_windows} must be at least 1")
        n = min(n, int(max_windows))
    if n == 0:
        raise UserError(f"{source or 'text'}: {len(ids)} tokens is shorter than one window of {seq_len}")
    t0 = time.time()
    device = model.embed.weight.device
    data = torch.tensor(ids[: n * seq_len], dtype=torch.long, device=device).view(n, seq_len)
    total = 0.0
    with torch.inference_mode():
        for s in tqdm(range(0, n, batch_size), desc="perplexity", unit="batch", file=sys.stderr, disable=not progress):
            total += float(-token_logprobs(model, data[s:s + batch_size]).double().sum())
    count = n * (seq_len - 1)
    nll = total / count
    return PerplexityResult(ppl=ppl_from_nll(nll), nll=nll, tokens=count, windows=n, seq_len=seq_len,
                            source=source, seconds=time.time() - t0)


def ppl_from_nll(nll: float) -> float:
    """exp(mean NLL); ``inf`` where that overflows a float (a broken model), never an exception."""
    try:
        return math.exp(nll)
    except OverflowError:
        return float("inf")


def wikitext2_ids(tokenizer, path: Optional[str] = None) -> List[int]:
    p = data_path(path, WIKITEXT2_TEST)
    return tokenizer.encode("\n\n".join(read_rows(p)))


def wikitext2_ppl(model, tokenizer, path: Optional[str] = None, seq_len: int = 512, max_windows: Optional[int] = None,
                  batch_size: int = 4, progress: bool = True) -> PerplexityResult:
    """WikiText-2 test perplexity (default file ``../shared/data/wikitext-2/wiki.test.raw``)."""
    p = data_path(path, WIKITEXT2_TEST)
    return windows_ppl(model, wikitext2_ids(tokenizer, str(p)), seq_len, max_windows, batch_size,
                       source=str(p), progress=progress)


def text_ppl(model, tokenizer, text_file, seq_len: int = 512, max_windows: Optional[int] = None,
             batch_size: int = 4, progress: bool = True) -> PerplexityResult:
    """Perplexity of a UTF-8 text file, tokenized once, same windowing as WikiText-2."""
    from pathlib import Path

    p = Path(text_file)
    if not p.is_file():
        raise UserError(f"{p}: text file not found")
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"{p}: cannot read text ({exc})") from None
    return windows_ppl(model, tokenizer.encode(text), seq_len, max_windows, batch_size, source=str(p), progress=progress)
