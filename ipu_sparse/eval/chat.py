"""Does the model still chat? A probe of short factual questions asked through the chat template.

Each question of the probe file (``chat_probe.json`` next to this module: capitals, arithmetic,
units, science, animals, colours, opposites, ...) is answered with greedy decoding (a short answer, stopping at the
end of the turn); the answer counts as right when it contains one of the question's key words
(case-insensitive, whole words; a number may be written in digits or in words). The shipped
questions are all answered right by the dense SmolLM2-135M-Instruct (a slow test checks it).
With a reference model the score is relative: of the questions the reference gets right, how many
the model gets right too. Three longer requests (explain, list, story) can be put side by side.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from ..errors import UserError
from ..fileio import read_json_object
from ..generate import encode_chat, generate_many

PROBE_FILE = Path(__file__).resolve().parent / "chat_probe.json"
ANSWER_TOKENS = 24  # enough for a one-line answer; the key word comes first in a direct answer
LONG_PROMPTS = (
    "Explain in a few sentences why the Moon has phases.",
    "List five fruits that are rich in vitamin C.",
    "Write a short story of about one hundred words about a robot who learns to paint.",
)

_SMALL = ("zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
          "seventeen eighteen nineteen").split()
_TENS = {20: "twenty", 30: "thirty", 40: "forty", 50: "fifty", 60: "sixty", 70: "seventy", 80: "eighty", 90: "ninety"}


def number_words(n: int) -> List[str]:
    """English spellings of 0 <= n <= 1000 ("42" -> ["forty-two", "forty two"]); [] outside that range."""
    if 0 <= n < 20:
        return [_SMALL[n]]
    if 20 <= n < 100:
        tens, ones = divmod(n, 10)
        if not ones:
            return [_TENS[n]]
        return [f"{_TENS[tens * 10]}-{_SMALL[ones]}", f"{_TENS[tens * 10]} {_SMALL[ones]}"]
    if 100 <= n < 1000:
        h, rest = divmod(n, 100)
        head = f"{_SMALL[h]} hundred"
        if not rest:
            return [head, "a hundred"] if h == 1 else [head]
        return [f"{head} and {w}" for w in number_words(rest)] + [f"{head} {w}" for w in number_words(rest)]
    if n == 1000:
        return ["one thousand", "a thousand"]
    return []


_WORD_NUMBERS: Dict[str, int] = {}


def _words_to_number() -> Dict[str, int]:
    if not _WORD_NUMBERS:
        for n in range(1001):
            for w in number_words(n):
                _WORD_NUMBERS.setdefault(w, n)
    return _WORD_NUMBERS


def key_variants(key: str) -> List[str]:
    """A key and its accepted alternative spellings (numbers: digits and words)."""
    k = key.strip()
    out = [k]
    digits = k.replace(",", "")
    if digits.isdigit():
        out += [digits] + number_words(int(digits))
    else:
        n = _words_to_number().get(k.lower())
        if n is not None:
            out.append(str(n))
    seen: List[str] = []
    for v in out:
        if v.lower() not in [s.lower() for s in seen]:
            seen.append(v)
    return seen


def answer_matches(answer: str, keys: Sequence[str]) -> bool:
    """True when ``answer`` holds one of ``keys`` (or an accepted spelling) as whole word(s), ignoring
    case: "4" matches "2 + 2 = 4." and "four", not "14" or "4.5"; "cat" does not match "category"."""
    text = re.sub(r"(?<=\d),(?=\d{3}\b)", "", answer)  # 1,000 -> 1000
    for key in keys:
        for v in key_variants(key):
            body = r"[\s-]+".join(re.escape(part) for part in re.split(r"[\s-]+", v))
            if v.replace(",", "").isdigit():
                pattern = r"(?<![\w.,])" + body + r"(?![\w]|[.,]\d)"  # not part of a longer number
            else:
                pattern = r"(?<!\w)" + body + r"(?!\w)"
            if re.search(pattern, text, flags=re.IGNORECASE):
                return True
    return False


@dataclass
class ProbeItem:
    question: str
    keys: List[str]


def load_probe(path=None) -> List[ProbeItem]:
    """The probe's questions: ``{"questions": [{"q": "...", "keys": ["..."]}, ...]}`` (UserError on a bad file)."""
    path = Path(path) if path is not None else PROBE_FILE
    if not path.is_file():
        raise UserError(f"{path}: chat probe file not found")
    doc = read_json_object(path, "chat probe file")
    rows = doc.get("questions")
    if not isinstance(rows, list) or not rows:
        raise UserError(f"{path}: chat probe file needs a non-empty list \"questions\"")
    items = []
    for i, row in enumerate(rows):
        q = row.get("q") if isinstance(row, dict) else None
        keys = row.get("keys") if isinstance(row, dict) else None
        if not isinstance(q, str) or not q.strip() or not isinstance(keys, list) or not keys \
                or not all(isinstance(k, str) and k.strip() for k in keys):
            raise UserError(f"{path}: question {i} needs a text \"q\" and a non-empty list of text \"keys\"")
        items.append(ProbeItem(q, list(keys)))
    return items


def chat_answers(model, tokenizer, requests: Sequence[str], max_new_tokens: int = ANSWER_TOKENS,
                 batch_size: int = 16, skip_too_long: bool = False) -> List[Optional[str]]:
    """Greedy answers to single-turn chat requests, several requests decoded as one batch.
    A request that leaves no room in the model's context is refused, or answered ``None``
    with ``skip_too_long``."""
    if batch_size < 1:
        raise UserError(f"batch size must be >= 1, got {batch_size}")
    prompts = [encode_chat(tokenizer, [{"role": "user", "content": r}]) for r in requests]
    limit = model.config.max_seq_len
    fits = [len(p) < limit for p in prompts]
    if not all(fits) and not skip_too_long:
        first = requests[fits.index(False)]
        raise UserError(f"chat request does not fit the model's context of {limit} tokens: {first[:60]!r}")
    todo = [i for i, ok in enumerate(fits) if ok]
    stop = set(tokenizer.stop_ids)
    out: List[Optional[str]] = [None] * len(prompts)
    for b in range(0, len(todo), batch_size):
        rows = todo[b:b + batch_size]
        chunk = [prompts[i] for i in rows]
        limits = [min(max_new_tokens, limit - len(p)) for p in chunk]
        for i, (ids,) in zip(rows, generate_many(model, chunk, limits, stop_ids=stop)):
            out[i] = tokenizer.decode([t for t in ids if t not in stop]).strip()
    return out


def run_probe(model, tokenizer, items: Sequence[ProbeItem], reference_answers: Optional[Sequence[str]] = None,
              max_new_tokens: int = ANSWER_TOKENS) -> dict:
    """Answer every question; ``k``/``n`` = questions right / asked, or with ``reference_answers``
    (the reference's answers to the same questions) = right for both / right for the reference."""
    answers = chat_answers(model, tokenizer, [it.question for it in items], max_new_tokens)
    rows = []
    for i, (it, a) in enumerate(zip(items, answers)):
        row = {"q": it.question, "keys": it.keys, "answer": a, "ok": answer_matches(a, it.keys)}
        if reference_answers is not None:
            ra = reference_answers[i]
            row.update(reference_answer=ra, reference_ok=answer_matches(ra, it.keys))
        rows.append(row)
    if reference_answers is None:
        n, k = len(rows), sum(r["ok"] for r in rows)
    else:
        n = sum(r["reference_ok"] for r in rows)
        k = sum(r["ok"] and r["reference_ok"] for r in rows)
    return {"k": k, "n": n, "questions": len(rows), "relative_to_reference": reference_answers is not None,
            "max_new_tokens": max_new_tokens, "rows": rows}


def probe_table(result: dict) -> str:
    """One line per question: mark, question, the model's answer (and the reference's)."""
    lines = []
    for r in result["rows"]:
        mark = "ok " if r["ok"] else "-- "
        line = f"{mark} {r['q']}  ->  {r['answer']!r}"
        if "reference_answer" in r:
            line += f"   [reference {'ok' if r['reference_ok'] else '--'}: {r['reference_answer']!r}]"
        lines.append(line)
    return "\n".join(lines)


def side_by_side_markdown(reference_name: str, model_name: str, prompts: Sequence[str],
                          reference_answers: Sequence[Optional[str]], model_answers: Sequence[Optional[str]],
                          max_new_tokens: int) -> str:
    """A markdown page: each request, then the reference's and the model's greedy answers."""
    out = [f"# Chat side by side: {reference_name} vs {model_name}", "",
           f"Greedy decoding through the chat template, up to {max_new_tokens} new tokens per answer.", ""]
    for p, ra, ma in zip(prompts, reference_answers, model_answers):
        out += [f"## {p}", "", f"**{reference_name}** (reference)", "", _quote(ra), "",
                f"**{model_name}**", "", _quote(ma), ""]
    return "\n".join(out)


def _quote(text: Optional[str]) -> str:
    if text is None:
        text = "(the request does not fit the model's context)"
    return "\n".join("> " + line for line in (text or "(empty answer)").splitlines()) or "> "
