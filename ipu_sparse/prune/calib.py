"""Calibration windows: ``nsamples`` random windows of ``seq_len`` tokens from a text file.

As the SparseGPT/Wanda drivers do it: the file's rows joined with " ", tokenized once,
``random.seed(seed)``, then per sample ``random.randint(0, n_tokens - seq_len - 1)`` is the
window start. Results can be cached per (file content, tokenizer, nsamples, seq_len, seed).
"""
from __future__ import annotations

import hashlib
import os
import random
from pathlib import Path
from typing import Optional

import torch

from ..errors import UserError
from ..eval.data import WIKITEXT2_VALID, data_path, read_rows


def _tokenizer_fingerprint(tokenizer) -> str:
    probe = "The quick brown fox, 12345 <unk> @-@ \u00e9t\u00e9.\n\n"
    return hashlib.sha256(repr((type(tokenizer).__name__, getattr(tokenizer, "vocab_size", None),
                                tokenizer.encode(probe))).encode()).hexdigest()[:16]


def calibration_windows(tokenizer, path: Optional[str] = None, nsamples: int = 128, seq_len: int = 512,
                        seed: int = 0, cache_dir: Optional[str] = None) -> torch.Tensor:
    """(nsamples, seq_len) int64 token windows (default file: WikiText-2 validation, tokenized release)."""
    if nsamples <= 0 or seq_len <= 1:
        raise UserError(f"calibration needs nsamples >= 1 and seq_len >= 2 (got {nsamples}, {seq_len})")
    p = data_path(path, WIKITEXT2_VALID)
    cache_file = None
    if cache_dir:
        key = hashlib.sha256(p.read_bytes()).hexdigest()[:16]
        cache_file = Path(cache_dir) / f"calib-{key}-{_tokenizer_fingerprint(tokenizer)}-{nsamples}x{seq_len}-s{seed}.pt"
        if cache_file.is_file():
            return torch.load(str(cache_file))
    ids = tokenizer.encode(" ".join(read_rows(p)))
    n = len(ids)
    if n - seq_len - 1 < 0:
        raise UserError(f"{p}: {n} tokens is too short for calibration windows of {seq_len} tokens")
    random.seed(seed)
    data = torch.tensor(ids, dtype=torch.long)
    rows = []
    for _ in range(nsamples):
        i = random.randint(0, n - seq_len - 1)
        rows.append(data[i:i + seq_len])
    out = torch.stack(rows)  # (nsamples, seq_len)
    if cache_file is not None:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache_file.with_name(cache_file.name + f".tmp{os.getpid()}")
        torch.save(out, str(tmp))
        os.replace(tmp, cache_file)
    return out
