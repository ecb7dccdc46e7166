"""Zero-shot tasks scored as lm-evaluation-harness does it.

Every task reduces to log p(continuation | context) requests:
* the context's trailing spaces move to the continuation; context and context+continuation
  are tokenized separately and the continuation is the whole encoding minus the context's
  tokens (lm-eval ``_encode_pair``); no BOS is added;
* LAMBADA (OpenAI): acc = every token of " " + last word is the argmax (``is_greedy``);
* multiple choice: acc = argmax of the summed log-likelihood of " " + choice, acc_norm divides
  it by len(choice) in characters; HellaSwag query = activity_label + ": " + ctx_a + " " +
  ctx_b.capitalize() with lm-eval's ``preprocess``; PIQA/ARC query = "Question: ...\\nAnswer:";
  WinoGrande scores the shared continuation after each filled-in option (acc).
Requests are sorted by length and scored in padded batches; the LM head runs only on the
continuation positions.
"""
from __future__ import annotations

import bz2
import json
import re
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from ..errors import UserError
from .data import data_path
from .perplexity import hidden_states, ppl_from_nll

TASKS = ("lambada", "hellaswag", "piqa", "arc_easy", "winogrande")
TASK_FILES = {
    "lambada": "zeroshot/lambada_openai.jsonl",
    "hellaswag": "zeroshot/hellaswag_val.txt.bz2",
    "piqa": "zeroshot/piqa.jsonl",
    "arc_easy": "zeroshot/arc_easy.jsonl",
    "winogrande": "zeroshot/winogrande.jsonl",
}


# ----- scoring --------------------------------------------------------------------------
def encode_pair(tokenizer, context: str, continuation: str) -> Tuple[List[int], List[int]]:
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces > 0:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    whole = tokenizer.encode(context + continuation)
    ctx = tokenizer.encode(context)
    return ctx, whole[len(ctx):]


def loglikelihood(model, tokenizer, requests: Sequence[Tuple[str, str]], batch_size: int = 16,
                  progress: bool = True, desc: str = "scoring") -> List[Tuple[float, bool]]:
    """(sum log p(continuation | context), continuation is the greedy output) per request."""
    from tqdm import tqdm

    max_len = int(model.config.max_seq_len)
    device = model.embed.weight.device
    encoded = []
    for ctx, cont in requests:
        c, k = encode_pair(tokenizer, ctx, cont)
        if not k:
            raise UserError(f"continuation {cont!r} encodes to no tokens")
        if not c:
            c = [tokenizer.eos_id if getattr(tokenizer, "eos_id", None) is not None else 0]
        whole = (c + k)[-(max_len + 1):]
        encoded.append((whole[:-1], k))
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i][0]))
    results: List[Optional[Tuple[float, bool]]] = [None] * len(encoded)
    with torch.inference_mode():
        for s in tqdm(range(0, len(order), batch_size), desc=desc, unit="batch", file=sys.stderr, disable=not progress):
            batch = order[s:s + batch_size]
            T = max(len(encoded[i][0]) for i in batch)
            idx = torch.zeros(len(batch), T, dtype=torch.long, device=device)  # right padding: causal, harmless
            for b, i in enumerate(batch):
                inp = encoded[i][0]
                idx[b, : len(inp)] = torch.tensor(inp, dtype=torch.long)
            h = hidden_states(model, idx)  # (B, T, D)
            for b, i in enumerate(batch):
                inp, cont = encoded[i]
                n = len(cont)
                pos = torch.arange(len(inp) - n, len(inp), device=device)
                logp = F.log_softmax(model.lm_head(h[b, pos]).float(), dim=-1)  # (n, vocab)
                target = torch.tensor(cont, dtype=torch.long, device=device)
                ll = float(logp.gather(1, target.view(-1, 1)).sum())
                greedy = bool((logp.argmax(-1) == target).all())
                results[i] = (ll, greedy)
    return results  # type: ignore[return-value]


# ----- task data ----------------------------------------------------------------------------
def _read_jsonl(path: Path, limit: Optional[int]) -> List[dict]:
    out = []
    try:
        with open(path, encoding="utf-8") as fh:
            for line in fh:
                if line.strip():
                    out.append(json.loads(line))
                if limit is not None and len(out) >= limit:
                    break
    except (OSError, ValueError) as exc:
        raise UserError(f"{path}: cannot read JSON lines ({exc})") from None
    return out


def _hellaswag_preprocess(text: str) -> str:
    text = text.strip()
    text = text.replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    return text.replace("  ", " ")


def _read_hellaswag(path: Path, limit: Optional[int]) -> List[dict]:
    try:
        lines = bz2.open(path, "rt", encoding="utf-8").read().split("\n")
    except (OSError, EOFError, ValueError) as exc:
        raise UserError(f"{path}: cannot read bz2 text ({exc})") from None
    items = []
    for s in range(0, len(lines) - 5, 6):
        rec = lines[s:s + 6]
        try:
            gold = int(rec[1])
        except ValueError:
            raise UserError(f"{path}: line {s + 2}: expected the gold index, got {rec[1][:40]!r}") from None
        items.append({"query": _hellaswag_preprocess(rec[0]), "choices": [_hellaswag_preprocess(e) for e in rec[2:6]],
                      "gold": gold})
        if limit is not None and len(items) >= limit:
            break
    return items


def _question(query: str) -> str:
    q = query.strip()
    return q if q.endswith("Answer:") else q + "\nAnswer:"


def load_task(task: str, limit: Optional[int] = None, path: Optional[str] = None) -> List[dict]:
    """Items of ``task`` as {"query"/"contexts", "choices"/"continuation", "gold"} dicts (first ``limit``)."""
    if task not in TASK_FILES:
        raise UserError(f"unknown task {task!r} (choose from {', '.join(TASKS)})")
    p = data_path(path, TASK_FILES[task])
    if task == "hellaswag":
        return _read_hellaswag(p, limit)
    rows = _read_jsonl(p, limit)
    try:
        if task == "lambada":
            return [{"context": r["context"], "continuation": " " + r["continuation"].strip()} for r in rows]
        if task in ("piqa", "arc_easy"):
            return [{"query": _question(r["query"]), "choices": list(r["choices"]), "gold": int(r["gold"])} for r in rows]
        return [{"contexts": list(r["context_options"]), "continuation": " " + r["continuation"].strip(),
                 "gold": int(r["gold"])} for r in rows]
    except (KeyError, TypeError, ValueError) as exc:
        raise UserError(f"{p}: unexpected record layout ({exc!r})") from None


# ----- evaluation -----------------------------------------------------------------------------
def evaluate_task(model, tokenizer, task: str, limit: Optional[int] = None, batch_size: int = 16,
                  path: Optional[str] = None, progress: bool = True) -> Dict[str, object]:
    t0 = time.time()
    items = load_task(task, limit, path)
    if not items:
        raise UserError(f"task {task}: no items")
    out: Dict[str, object] = {"task": task, "n": len(items), "limit": limit}
    if task == "lambada":
        res = loglikelihood(model, tokenizer, [(it["context"], it["continuation"]) for it in items], batch_size,
                            progress, desc=task)
        out["acc"] = sum(g for _, g in res) / len(res)
        out["ppl"] = ppl_from_nll(-sum(ll for ll, _ in res) / len(res))
    elif task == "winogrande":
        reqs, spans = [], []
        for it in items:
            spans.append((len(reqs), len(it["contexts"])))
            reqs += [(c, it["continuation"]) for c in it["contexts"]]
        res = loglikelihood(model, tokenizer, reqs, batch_size, progress, desc=task)
        correct = 0
        for it, (s, k) in zip(items, spans):
            lls = [res[s + j][0] for j in range(k)]
            correct += int(max(range(k), key=lambda j: lls[j]) == it["gold"])
        out["acc"] = correct / len(items)
    else:
        reqs, spans = [], []
        for it in items:
            spans.append((len(reqs), len(it["choices"])))
            reqs += [(it["query"], " " + c) for c in it["choices"]]
        res = loglikelihood(model, tokenizer, reqs, batch_size, progress, desc=task)
        acc = acc_norm = 0
        for it, (s, k) in zip(items, spans):
            lls = [res[s + j][0] for j in range(k)]
            norm = [lls[j] / max(1, len(it["choices"][j])) for j in range(k)]
            acc += int(max(range(k), key=lambda j: lls[j]) == it["gold"])
            acc_norm += int(max(range(k), key=lambda j: norm[j]) == it["gold"])
        out["acc"] = acc / len(items)
        out["acc_norm"] = acc_norm / len(items)
    out["seconds"] = time.time() - t0
    return out


def evaluate_tasks(model, tokenizer, tasks: Sequence[str], limit: Optional[int] = None, batch_size: int = 16,
                   progress: bool = True) -> Dict[str, Dict[str, object]]:
    for t in tasks:
        if t not in TASK_FILES:
            raise UserError(f"unknown task {t!r} (choose from {', '.join(TASKS)})")
    if limit is not None and limit < 1:
        raise UserError(f"--limit {limit} must be at least 1")
    return {t: evaluate_task(model, tokenizer, t, limit, batch_size, progress=progress) for t in tasks}
