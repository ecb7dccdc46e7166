"""Training text mixed from several sources by fraction (``--text-mix``), and answer-only KD masks.

Sources: text files or directories (the evaluation-set guard of ``data.py`` applies), and the
teacher-written data-free text: ``teacher`` (all of it), ``teacher-chat`` (the chat requests
and their answers, through the chat template) or ``teacher-plain`` (plain-text openings and
their continuations). ``SRC=F`` gives each source a fraction F of the training windows (the
fractions sum to 1). The first source is used once, whole, and its last windows are held out
(``--heldout-windows``: held-out text of the same kind as the main source); every other
source is drawn to ``F x total`` windows by a seeded permutation, repeated if it is shorter.

``answers_only`` (``--kd-answers-only``): in teacher-written chat samples the KD loss counts
only the positions that predict the answer (and its end-of-sequence token); the prompt and
its chat template are context, not targets. Other text counts everywhere.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch

from ..errors import UserError
from .data import (CHAT_PROMPTS, SelfDistillConfig, TokenWindows, read_cache_records, collect_text_files, prompt_ids_list,
                   self_distill_ids, tokenize_files, windows_from_ids)

TEACHER_SOURCES = ("teacher", "teacher-chat", "teacher-plain")


def parse_text_mix(items: Sequence[str]) -> List[Tuple[str, float]]:
    """``["wiki.valid.tokens=0.6", "teacher-chat=0.4"]`` -> [(source, fraction), ...]; fractions in (0, 1], sum 1."""
    out: List[Tuple[str, float]] = []
    for item in items:
        src, sep, frac = str(item).rpartition("=")
        try:
            f = float(frac) if sep and src else float("nan")
        except ValueError:
            f = float("nan")
        if not 0.0 < f <= 1.0:
            raise UserError(f"--text-mix: expected SOURCE=FRACTION with a fraction in (0, 1], got {item!r}")
        out.append((src, f))
    if not out:
        raise UserError("--text-mix: give at least one SOURCE=FRACTION")
    total = sum(f for _, f in out)
    if abs(total - 1.0) > 1e-3:
        raise UserError(f"--text-mix: fractions must sum to 1, got {total:g} ({' '.join(items)})")
    names = [s for s, _ in out]
    if len(set(names)) != len(names):
        raise UserError(f"--text-mix: a source is named twice ({' '.join(items)})")
    return out


def teacher_documents(teacher, tokenizer, cache_dir, selfdistill: Optional[SelfDistillConfig] = None,
                      progress: bool = False) -> Tuple[List[Tuple[List[int], List[int], bool]], str]:
    """The data-free source's samples as (prompt ids, sample ids, is_chat), in stream order, and its cache file."""
    _, cache = self_distill_ids(teacher, tokenizer, cache_dir, selfdistill, progress=progress)
    prompts = prompt_ids_list(tokenizer)
    records, _ = read_cache_records(cache)
    docs = [(list(prompts[r["p"]]), list(s), r["p"] < len(CHAT_PROMPTS)) for r in records for s in r["samples"]]
    return docs, str(cache)


def stream_of_documents(docs, eos: Optional[int], answers_only: bool) -> Tuple[List[int], List[bool]]:
    """One token stream of (prompt, sample, is_chat) documents, and per position whether the KD loss
    counts the distribution predicted there (with ``answers_only``: in chat documents only the
    positions whose next token is part of the answer)."""
    ids: List[int] = []
    target: List[bool] = []  # target[j]: token j is a training target
    for prompt, sample, is_chat in docs:
        body = list(sample)
        if eos is not None and (not body or body[-1] != eos):
            body.append(eos)
        ids.extend(prompt)
        target.extend([not (answers_only and is_chat)] * len(prompt))
        ids.extend(body)
        target.extend([True] * len(body))
    counts = target[1:] + target[-1:]  # position j predicts token j + 1
    return ids, counts


def _windows_and_mask(ids, counts, seq_len, heldout, min_train, source) -> Tuple[TokenWindows, torch.Tensor]:
    w = windows_from_ids(ids, seq_len, heldout, min_train, source)
    n = w.train.shape[0]
    mask = torch.tensor(counts[: n * seq_len], dtype=torch.bool).view(n, seq_len)  # (n, L), train windows come first
    return w, mask


def build_mixed_windows(tokenizer, seq_len: int, batch_size: int, heldout_windows: int,
                        mix: Sequence[Tuple[str, float]], teacher=None, cache_dir=None,
                        selfdistill: Optional[SelfDistillConfig] = None, progress: bool = False,
                        answers_only: bool = False, seed: int = 0) -> TokenWindows:
    """Training windows mixed from ``mix`` [(source, fraction)] (see the module docstring)."""
    eos = getattr(tokenizer, "eos_id", None)
    docs_cache = {}

    def teacher_docs():
        if "docs" not in docs_cache:
            if teacher is None or cache_dir is None:
                raise UserError("--text-mix: a teacher source needs the teacher and a --data-cache directory")
            docs_cache["docs"] = teacher_documents(teacher, tokenizer, cache_dir, selfdistill, progress)
        return docs_cache["docs"]

    parts = []  # (train windows, mask, description)
    heldout = None
    n_tokens = 0
    for i, (src, frac) in enumerate(mix):
        hold = heldout_windows if i == 0 else 0
        need = batch_size if i == 0 else 1
        if src in TEACHER_SOURCES:
            docs, cache = teacher_docs()
            chosen = [d for d in docs if src == "teacher" or (d[2] == (src == "teacher-chat"))]
            if not chosen:  # the prompts are visited in order, chat requests first
                raise UserError(f"--text-mix {src}: the data-free text ({cache}) holds no such samples yet; "
                                f"raise --selfdistill-tokens")
            ids, counts = stream_of_documents(chosen, eos, answers_only)
            w, mask = _windows_and_mask(ids, counts, seq_len, hold, need, f"{src} text ({cache})")
        else:
            files = collect_text_files([src])
            ids = tokenize_files(tokenizer, files)
            w = windows_from_ids(ids, seq_len, hold, need, src)
            mask = None
        n_tokens += len(ids)
        if i == 0:
            heldout = w.heldout
        parts.append((w.train, mask, src, frac))
    first_n, first_f = parts[0][0].shape[0], parts[0][3]
    total = max(1, round(first_n / first_f))
    trains, masks, desc = [], [], []
    for i, (train, mask, src, frac) in enumerate(parts):
        n = first_n if i == 0 else max(1, round(frac * total))
        if i == 0:
            rows = torch.arange(n)
        else:  # a seeded permutation of the source's windows, repeated as needed
            g = torch.Generator().manual_seed(seed * 1_000_003 + 7919 * (i + 1))
            reps = -(-n // train.shape[0])
            rows = torch.cat([torch.randperm(train.shape[0], generator=g) for _ in range(reps)])[:n]
        trains.append(train[rows])
        masks.append(mask[rows] if mask is not None else torch.ones(n, seq_len, dtype=torch.bool))
        desc.append(f"{src} {n}/{train.shape[0]} windows")
    loss_mask = torch.cat(masks) if answers_only else None
    if loss_mask is not None and bool(loss_mask.all()):
        raise UserError("--kd-answers-only: the training text has no chat samples (add teacher-chat or teacher "
                        "to --text-mix)")
    return TokenWindows(torch.cat(trains), heldout, "mix: " + ", ".join(desc), n_tokens, loss_mask=loss_mask)
