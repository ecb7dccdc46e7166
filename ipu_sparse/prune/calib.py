"""Calibration windows: ``nsamples`` random windows of ``seq_len`` tokens from a text file.

As the SparseGPT/Wanda drivers do it: the file's rows joined with " ", tokenized once,
``random.seed(seed)``, then per sample ``random.randint(0, n_tokens - seq_len - 1)`` is the
window start (here from a ``random.Random(seed)`` of its own: the same numbers, no global state).
Results can be cached per (file content, tokenizer, nsamples, seq_len, seed) as safetensors
(no pickle: a cache file can never run code when it is read).
"""
from __future__ import annotations

import hashlib
import random
from pathlib import Path
from typing import Optional, Union

import torch
from safetensors.torch import save_file

from ..errors import UserError
from ..eval.data import WIKITEXT2_VALID, data_path, read_rows
from ..fileio import atomic_file, read_safetensors


CACHE_KEY = "tokens"


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
        name = f"calib-{key}-{_tokenizer_fingerprint(tokenizer)}-{nsamples}x{seq_len}-s{seed}.safetensors"
        cache_file = Path(cache_dir) / name
        if cache_file.is_file():
            return _read_cache(cache_file, nsamples, seq_len)
    ids = tokenizer.encode(" ".join(read_rows(p)))
    n = len(ids)
    if n - seq_len - 1 < 0:
        raise UserError(f"{p}: {n} tokens is too short for calibration windows of {seq_len} tokens")
    rng = random.Random(seed)
    data = torch.tensor(ids, dtype=torch.long)
    rows = []
    for _ in range(nsamples):
        i = rng.randint(0, n - seq_len - 1)
        rows.append(data[i:i + seq_len])
    out = torch.stack(rows)  # (nsamples, seq_len)
    if cache_file is not None:
        with atomic_file(cache_file) as tmp:
            save_file({CACHE_KEY: out}, str(tmp), metadata={"source": p.name, "seed": str(seed)})
    return out


def _read_cache(path: Path, nsamples: int, seq_len: int) -> torch.Tensor:
    """The cached windows; ``UserError`` for anything but a safetensors file holding them."""
    tokens = read_safetensors(path).get(CACHE_KEY)
    if tokens is None or tokens.dtype != torch.long or tuple(tokens.shape) != (nsamples, seq_len):
        raise UserError(f"{path}: calibration cache does not hold ({nsamples}, {seq_len}) int64 tokens; "
                        f"delete it to rebuild")
    return tokens


def calibration_tokens(calib: Union[None, str, torch.Tensor], tokenizer, nsamples: int, seq_len: int, seed: int,
                       cache_dir: Optional[str] = None) -> torch.Tensor:
    """(n, L) int64 calibration tokens: ``calib`` itself when it is a token tensor, else windows drawn from
    the text file ``calib`` (default WikiText-2 validation) with ``tokenizer``."""
    if isinstance(calib, torch.Tensor):
        return calib.long()
    if tokenizer is None:
        raise UserError("calibration from a text file needs the model's tokenizer")
    return calibration_windows(tokenizer, calib, nsamples, seq_len, seed, cache_dir=cache_dir)
