"""Zero-shot tasks scored as lm-evaluation-harness does it.

Every task reduces to log p(continuation | context) requests:
* the context's trailing spaces move to the continuation; context and context+continuation
  are tokenized separately and the continuation is the whole encoding minus the context's
  tokens (lm-eval ``_encode_pair``); no BOS is added;
* LAMBADA (OpenAI): acc = every token of " " + last word is the argmax (``is_greedy``);
* multiple choice: acc = argmax of the summed log-likelihood of " " + choice, acc_norm divides
  it by len(choice) in characters; HellaSwag query = activity_label + ": " + ctx_a + " " +
  ctx_b.capitalize() with lm-eval's ``preprocess`` (the data file stores ctx_a + " " + ctx_b with
  ctx_b as in the source: the text after the last sentence end); PIQA/ARC query =
  "Question: ...\\nAnswer:"; WinoGrande scores the shared continuation after each filled-in option (acc).
Speed without changing a score: requests with the same context tokens share one row (the context
runs once, each continuation attends to it and to itself at the positions it would have alone),
rows are sorted by length and scored in padded batches, and the LM head runs only on the
positions that predict a continuation token.
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


HEAD_CHUNK = 512  # rows of the LM head at a time (512 x vocab fp32 logits)


def loglikelihood(model, tokenizer, requests: Sequence[Tuple[str, str]], batch_size: int = 16,
                  progress: bool = True, desc: str = "scoring",
                  stats: Optional[Dict[str, int]] = None) -> List[Tuple[float, bool]]:
    """(sum log p(continuation | context), continuation is the greedy output) per request.

    Requests whose contexts encode to the same tokens share one row: the context once, then each
    continuation (but its last token) at the positions it would have after the context, seeing only
    the context and itself. Rows are sorted by length and scored ``batch_size`` rows per forward; the
    LM head runs only on the predicting positions. ``stats`` (a dict) receives the token counts.
    """
    from tqdm import tqdm

    rows = _pack_rows(tokenizer, requests, int(model.config.max_seq_len))
    rows.sort(key=lambda r: -r.length)
    device = model.embed.weight.device
    ll = torch.zeros(len(requests), dtype=torch.float64)
    missed = torch.zeros(len(requests), dtype=torch.long)  # continuation tokens that are not the argmax
    forward_tokens = 0
    with torch.inference_mode():
        for s in tqdm(range(0, len(rows), batch_size), desc=desc, unit="batch", file=sys.stderr, disable=not progress):
            batch = rows[s:s + batch_size]
            T = batch[0].length
            forward_tokens += len(batch) * T
            idx = torch.zeros(len(batch), T, dtype=torch.long)  # right padding: never attended to by real tokens
            pos = torch.zeros(len(batch), T, dtype=torch.long)
            seg = torch.full((len(batch), T), -1, dtype=torch.long)
            sel_b, sel_t, target, owner = [], [], [], []
            for b, row in enumerate(batch):
                n = row.length
                idx[b, :n] = torch.tensor(row.tokens, dtype=torch.long)
                pos[b, :n] = torch.tensor(row.positions, dtype=torch.long)
                seg[b, :n] = torch.tensor(row.segments, dtype=torch.long)
                for req, where, cont in row.scored:
                    sel_b += [b] * len(cont)
                    sel_t += where
                    target += cont
                    owner += [req] * len(cont)
            if all(len(row.scored) == 1 for row in batch):  # plain causal rows: positions 0..T-1
                h = hidden_states(model, idx.to(device))
            else:
                causal = torch.ones(T, T, dtype=torch.bool).tril()
                sees = (seg[:, :, None] == seg[:, None, :]) | (seg == 0)[:, None, :]  # own segment or the context
                h = hidden_states(model, idx.to(device), pos.to(device), (causal & sees)[:, None].to(device))
            flat = h[torch.tensor(sel_b, device=device), torch.tensor(sel_t, device=device)]  # (N, D)
            tgt = torch.tensor(target, dtype=torch.long, device=device)
            own = torch.tensor(owner, dtype=torch.long)
            for c in range(0, flat.shape[0], HEAD_CHUNK):
                logits = model.lm_head(flat[c:c + HEAD_CHUNK]).float()  # (chunk, vocab)
                t = tgt[c:c + HEAD_CHUNK]
                logp = logits.log_softmax(-1).gather(1, t[:, None])[:, 0]
                ll.index_add_(0, own[c:c + HEAD_CHUNK], logp.double().cpu())
                missed.index_add_(0, own[c:c + HEAD_CHUNK], (logits.argmax(-1) != t).long().cpu())
    if stats is not None:
        stats.update({"requests": len(requests), "rows": len(rows), "forwards": -(-len(rows) // batch_size),
                      "request_tokens": sum(r.request_tokens for r in rows),
                      "row_tokens": sum(r.length for r in rows), "forward_tokens": forward_tokens})
    return [(float(ll[i]), bool(missed[i] == 0)) for i in range(len(requests))]


class _Row:
    """One context's tokens followed by continuations packed after it (see ``loglikelihood``)."""

    def __init__(self, context: List[int]):
        self.tokens = list(context)
        self.positions = list(range(len(context)))
        self.segments = [0] * len(context)
        self.scored: List[Tuple[int, List[int], List[int]]] = []  # (request, row indices predicting it, its tokens)
        self.request_tokens = 0  # what one row per request would feed: len(context) + len(continuation) - 1 each
        self.n_context = len(context)

    @property
    def length(self) -> int:
        return len(self.tokens)

    def add(self, req: int, cont: List[int]) -> None:
        c = self.n_context
        start = len(self.tokens)
        body = cont[:-1]  # the last token is only predicted, never an input
        self.tokens += body
        self.positions += range(c, c + len(body))
        self.segments += [len(self.scored) + 1] * len(body)
        self.scored.append((req, [c - 1] + list(range(start, start + len(body))), list(cont)))
        self.request_tokens += c + len(body)


def _pack_rows(tokenizer, requests: Sequence[Tuple[str, str]], max_len: int) -> List[_Row]:
    """Encode the requests (lm-eval's ``_encode_pair``, input = (context + continuation)[-(max_len + 1):][:-1])
    and pack those with the same (kept) context tokens into rows of at most ``max_len`` tokens."""
    open_rows: Dict[Tuple[int, ...], _Row] = {}
    rows: List[_Row] = []
    for i, (ctx, cont) in enumerate(requests):
        c, k = encode_pair(tokenizer, ctx, cont)
        if not k:
            raise UserError(f"continuation {cont!r} encodes to no tokens")
        if not c:
            c = [tokenizer.eos_id if getattr(tokenizer, "eos_id", None) is not None else 0]
        window = (c + k)[-(max_len + 1):]  # the last max_len input tokens (and the last target)
        k = k[-max_len:]  # a continuation longer than the model's context: its first tokens have no predictor
        c = window[:-len(k)]
        key = tuple(c)
        row = open_rows.get(key)
        if row is None or row.length + len(k) - 1 > max_len:
            row = open_rows[key] = _Row(c)
            rows.append(row)
        row.add(i, k)
    return rows


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


_SENTENCE_END = re.compile(r"[.!?]\s+")


def _hellaswag_query(line: str) -> str:
    """lm-eval's query ``activity_label + ": " + ctx_a + " " + ctx_b.capitalize()`` (then ``preprocess``)
    from a stored ``activity_label: ctx_a ctx_b`` line whose ctx_b is in its source (lower-case) form.

    ctx_b is what follows the line's last sentence end; a line that ends a sentence has an empty ctx_b.
    """
    ends = list(_SENTENCE_END.finditer(line))
    if ends and not line.rstrip().endswith((".", "!", "?")):
        cut = ends[-1].end()
        line = line[:cut] + line[cut:].capitalize()
    return _hellaswag_preprocess(line)


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
        items.append({"query": _hellaswag_query(rec[0]), "choices": [_hellaswag_preprocess(e) for e in rec[2:6]],
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
def task_requests(task: str, items: Sequence[dict]) -> Tuple[List[Tuple[str, str]], List[Tuple[int, int]]]:
    """The (context, continuation) requests lm-eval scores for ``items`` of ``task`` (as ``load_task``
    returns them), and each item's (first request, number of requests)."""
    reqs: List[Tuple[str, str]] = []
    spans = []
    for it in items:
        if task == "lambada":
            pairs = [(it["context"], it["continuation"])]
        elif task == "winogrande":
            pairs = [(c, it["continuation"]) for c in it["contexts"]]
        else:  # multiple choice: target delimiter " " before each choice
            pairs = [(it["query"], " " + c) for c in it["choices"]]
        spans.append((len(reqs), len(pairs)))
        reqs += pairs
    return reqs, spans


def evaluate_task(model, tokenizer, task: str, limit: Optional[int] = None, batch_size: int = 16,
                  path: Optional[str] = None, progress: bool = True) -> Dict[str, object]:
    """Accuracy (and acc_norm for multiple choice) on the first ``limit`` items; ``tokens``: what the
    scoring fed the model (see ``loglikelihood``)."""
    t0 = time.time()
    items = load_task(task, limit, path)
    if not items:
        raise UserError(f"task {task}: no items")
    out: Dict[str, object] = {"task": task, "n": len(items), "limit": limit}
    reqs, spans = task_requests(task, items)
    stats: Dict[str, int] = {}
    res = loglikelihood(model, tokenizer, reqs, batch_size, progress, desc=task, stats=stats)
    if task == "lambada":
        out["acc"] = sum(g for _, g in res) / len(res)
        out["ppl"] = ppl_from_nll(-sum(ll for ll, _ in res) / len(res))
    else:
        acc = acc_norm = 0
        for it, (s, k) in zip(items, spans):
            lls = [res[s + j][0] for j in range(k)]
            acc += int(max(range(k), key=lambda j: lls[j]) == it["gold"])
            if task != "winogrande":
                norm = [lls[j] / max(1, len(it["choices"][j])) for j in range(k)]
                acc_norm += int(max(range(k), key=lambda j: norm[j]) == it["gold"])
        out["acc"] = acc / len(items)
        if task != "winogrande":
            out["acc_norm"] = acc_norm / len(items)
    out["tokens"] = stats
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
