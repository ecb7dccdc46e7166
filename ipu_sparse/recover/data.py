"""Training text for recovery: user files/directories, or text the dense teacher writes itself.

Evaluation sets are refused (WikiText-2 test, the zero-shot task files). Text becomes one
token stream (documents separated by EOS) cut into non-overlapping windows of ``seq_len``
tokens; the last windows are held out for periodic evaluation. The batch for a given
micro-step is a pure function of (seed, step), so a resumed run sees exactly the data the
uninterrupted one would have seen.

Data-free source (self-distillation data): the teacher samples continuations of a fixed
set of diverse prompts (chat requests and plain-text openings), several samples per
prompt, several prompts (left-padded) in one batch, in a fixed order of fixed groups so the
text is a function of the settings only. Samples are appended to a cache directory as they
are made; a later request for more tokens with the same settings extends the cache instead
of starting over.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import torch

from ..errors import UserError
from ..generate import SamplingConfig, encode_chat, generate_many

TEXT_SUFFIXES = (".txt", ".md", ".text", ".tokens", ".raw", ".rst", ".jsonl", ".json", ".py", ".html", ".csv")
# Evaluation data: training on it would make every published number meaningless.
EVAL_NAMES = ("wiki.test", "lambada", "hellaswag", "piqa", "arc_easy", "arc_challenge", "winogrande")


@dataclass
class TokenWindows:
    """``train`` (N, L) and ``heldout`` (M, L) token windows, plus where they came from. ``loss_mask``
    (N, L) bool, if set: the positions of each training window whose next-token distribution the KD
    loss counts (e.g. only those predicting the answer tokens of chat samples); None = all."""

    train: torch.Tensor
    heldout: torch.Tensor
    source: str
    n_tokens: int
    loss_mask: Optional[torch.Tensor] = None

    @property
    def seq_len(self) -> int:
        return int(self.train.shape[1])

    def batch(self, micro_step: int, batch_size: int, seed: int) -> torch.Tensor:
        """The (batch_size, L) windows of one micro-step: epoch-wise permutations seeded by (seed, epoch)."""
        return self.train[self.batch_rows(micro_step, batch_size, seed)]

    def batch_rows(self, micro_step: int, batch_size: int, seed: int) -> List[int]:
        """The training-window indices of ``batch(micro_step, batch_size, seed)``."""
        n = self.train.shape[0]
        rows = []
        perm_epoch, perm = -1, None
        for j in range(micro_step * batch_size, (micro_step + 1) * batch_size):
            epoch, pos = divmod(j, n)
            if epoch != perm_epoch:
                g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
                perm, perm_epoch = torch.randperm(n, generator=g), epoch
            rows.append(int(perm[pos]))
        return rows


def _check_not_eval(path: Path) -> None:
    low = path.name.lower()
    if any(low.startswith(n) for n in EVAL_NAMES) or "zeroshot" in {p.lower() for p in path.parts}:
        raise UserError(f"{path}: this is an evaluation set; recovery never trains on evaluation data")


def collect_text_files(paths: Sequence) -> List[Path]:
    """Files named directly, plus text files found under directories (sorted, recursive)."""
    files: List[Path] = []
    for p in paths:
        p = Path(p)
        if not p.exists():
            raise UserError(f"{p}: no such file or directory")
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in TEXT_SUFFIXES
                           and not any(part.startswith(".") for part in f.relative_to(p).parts))
            if not found:
                raise UserError(f"{p}: directory holds no text files ({', '.join(TEXT_SUFFIXES)})")
            files.extend(found)
        else:
            files.append(p)
    for f in files:
        _check_not_eval(f)
    return files


def tokenize_files(tokenizer, files: Sequence[Path]) -> List[int]:
    eos = getattr(tokenizer, "eos_id", None)
    ids: List[int] = []
    for f in files:
        try:
            text = f.read_text(encoding="utf-8", errors="replace")
        except OSError as exc:
            raise UserError(f"{f}: cannot read ({exc})") from None
        if not text.strip():
            continue
        ids.extend(tokenizer.encode(text))
        if eos is not None:
            ids.append(eos)
    return ids


def windows_from_ids(ids: Sequence[int], seq_len: int, heldout_windows: int, min_train_windows: int,
                     source: str) -> TokenWindows:
    """Cut a token stream into non-overlapping windows; the last ``heldout_windows`` are held out."""
    n = len(ids) // seq_len
    need = min_train_windows + heldout_windows
    if n < need:
        raise UserError(f"{source}: too little text: {len(ids)} tokens make {n} windows of {seq_len}, need at least "
                        f"{need} ({min_train_windows} for one training batch + {heldout_windows} held out); "
                        f"give more text or lower --seq-len/--batch-size/--heldout-windows")
    t = torch.tensor(list(ids[: n * seq_len]), dtype=torch.long).view(n, seq_len)  # (n, L)
    split = n - heldout_windows
    return TokenWindows(t[:split].clone(), t[split:].clone(), source, len(ids))


# ----- data-free source: the teacher writes its own training text ----------------------------

CHAT_PROMPTS = (
    "Explain how photosynthesis works in simple terms.",
    "Write a short story about a lighthouse keeper who finds a message in a bottle.",
    "What are the main causes of the French Revolution?",
    "Give me three tips for learning a new programming language.",
    "How does a vaccine train the immune system?",
    "Describe the water cycle step by step.",
    "Write a polite email asking a colleague to review a document.",
    "What is the difference between weather and climate?",
    "Summarize the plot of Romeo and Juliet.",
    "How do I make a simple tomato soup?",
    "Why is the sky blue?",
    "Write a Python function that checks whether a number is prime, and explain it.",
    "What should I consider when buying a used car?",
    "Explain what inflation is and why it matters.",
    "Describe the life cycle of a star.",
    "Write a poem about autumn in a small town.",
    "What are the benefits of regular exercise?",
    "How does the internet route a message from one computer to another?",
    "Compare cats and dogs as pets.",
    "What was the Industrial Revolution and how did it change daily life?",
    "Give advice to someone starting their first job.",
    "Explain the rules of chess briefly.",
    "How do plants and animals adapt to life in the desert?",
    "What is machine learning? Give an everyday example.",
    "Plan a three-day trip to Rome for a family.",
    "Explain the Pythagorean theorem with an example.",
    "Why do we have seasons on Earth?",
    "Write a dialogue between a customer and a baker.",
    "What are some good habits for better sleep?",
    "Describe how a bill becomes a law in a parliament.",
    "What is the role of enzymes in digestion?",
    "Tell me about the history of the printing press.",
)

TEXT_PROMPTS = (
    "The history of the Roman Empire begins",
    "In the early morning, the village market",
    "The theory of evolution by natural selection",
    "Football is one of the most popular sports in the world. It",
    "The river flows from the mountains to the sea, and along its banks",
    "The company reported its annual results on Tuesday,",
    "Mount Everest, the highest mountain on Earth,",
    "The album was released in 1998 and",
    "Early computers filled entire rooms and",
    "The novel follows a young woman who",
    "During the Second World War, the city",
    "The cathedral was built in the thirteenth century",
    "Honey bees live in colonies that",
    "The election campaign focused on",
    "The species is found in tropical forests of",
    "In mathematics, a prime number is",
)


@dataclass
class SelfDistillConfig:
    n_tokens: int = 100_000
    max_new_tokens: int = 256
    samples_per_prompt: int = 8
    prompts_per_batch: int = 4  # one batch: this many prompts x samples_per_prompt rows
    dtype: str = "bfloat16"  # the teacher's weights while writing (a copy; the teacher itself is untouched)
    temperature: float = 1.0
    top_p: float = 0.95
    seed: int = 0

    def key(self, teacher_fingerprint: str) -> str:
        d = {k: getattr(self, k) for k in ("max_new_tokens", "samples_per_prompt", "prompts_per_batch", "dtype",
                                           "temperature", "top_p", "seed")}
        d["teacher"] = teacher_fingerprint
        d["prompts"] = list(CHAT_PROMPTS) + list(TEXT_PROMPTS)
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


def model_fingerprint(model) -> str:
    """A short hash of the config and a strided sample of every weight (cheap, content-based)."""
    h = hashlib.sha256(json.dumps({k: v for k, v in model.config.to_dict().items() if k != "name"},
                                  sort_keys=True).encode())
    for name, p in model.state_dict().items():
        flat = p.detach().float().flatten()
        step = max(1, flat.numel() // 4096)
        h.update(name.encode())
        h.update(flat[::step].cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def windows_fingerprint(windows: TokenWindows) -> str:
    """A short hash of the training and held-out token windows."""
    h = hashlib.sha256(windows.train.numpy().astype("int64").tobytes())
    h.update(windows.heldout.numpy().astype("int64").tobytes())
    return h.hexdigest()[:16]


def prompt_ids_list(tokenizer) -> List[List[int]]:
    """Token ids of every prompt: chat requests through the chat template, then plain openings."""
    out = []
    for text in CHAT_PROMPTS:
        out.append(encode_chat(tokenizer, [{"role": "user", "content": text}]))
    for text in TEXT_PROMPTS:
        out.append(tokenizer.encode(text, add_bos=getattr(tokenizer, "bos_id", None) is not None))
    return out


def read_cache_records(path: Path) -> Tuple[List[dict], bool]:
    """Records of the cache file, and whether it ends in a torn line (an interrupted write)."""
    records, torn = [], False
    if path.is_file():
        with open(path, "r", encoding="utf-8") as fh:
            for line in fh:
                try:
                    if not line.endswith("\n"):
                        raise ValueError("incomplete line")
                    records.append(json.loads(line))
                except ValueError:
                    torn = True  # regenerate from here
                    break
    return records, torn


def self_distill_ids(teacher, tokenizer, cache_dir, cfg: Optional[SelfDistillConfig] = None,
                     progress: bool = False) -> Tuple[List[int], Path]:
    """At least ``cfg.n_tokens`` tokens of teacher-written text (documents joined by EOS), cached.

    Returns the token stream and the cache file. Record i is (prompt p, round r) of the usable
    prompts taken in turn; its samples use their own generator seeded from (seed, p, r), and
    records are written in fixed groups of ``cfg.prompts_per_batch`` (records k*g .. k*g+g-1 form
    one batch), so the stream is the same however often it is extended."""
    cfg = cfg or SelfDistillConfig()
    if cfg.samples_per_prompt < 1 or cfg.prompts_per_batch < 1:
        raise UserError(f"samples_per_prompt and prompts_per_batch must be >= 1, got {cfg.samples_per_prompt} "
                        f"and {cfg.prompts_per_batch}")
    gen_dtype = getattr(torch, cfg.dtype, None)
    if not isinstance(gen_dtype, torch.dtype):
        raise UserError(f"self-distillation dtype {cfg.dtype!r} is not a torch dtype (e.g. bfloat16, float32)")
    prompts = prompt_ids_list(tokenizer)
    limit = teacher.config.max_seq_len
    usable = [i for i, p in enumerate(prompts) if len(p) + 8 <= limit]  # room for at least 8 new tokens
    if not usable:
        raise UserError(f"the model's context ({limit}) is too short for the built-in prompts")
    key = cfg.key(model_fingerprint(teacher))
    cache_dir = Path(cache_dir) / f"selfdistill-{key}"
    cache_dir.mkdir(parents=True, exist_ok=True)
    cache = cache_dir / "samples.jsonl"
    meta = cache_dir / "meta.json"
    if not meta.is_file():
        tmp = meta.with_suffix(".tmp")
        tmp.write_text(json.dumps({"settings": cfg.__dict__, "teacher_fingerprint": key,
                                   "prompts": list(CHAT_PROMPTS) + list(TEXT_PROMPTS)}, indent=1))
        os.replace(tmp, meta)
    records, torn = read_cache_records(cache)
    whole = len(records) // cfg.prompts_per_batch * cfg.prompts_per_batch
    if torn or whole < len(records):
        # Rewrite the file without its torn tail (appends start on a clean line) and without an
        # unfinished batch: a batch is regenerated whole, so its samples do not depend on where
        # an earlier run stopped.
        records = records[:whole]
        tmp = cache.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in records))
        os.replace(tmp, cache)
    eos = getattr(tokenizer, "eos_id", None)
    stop_ids = set(getattr(tokenizer, "stop_ids", set()) or set()) | ({eos} if eos is not None else set())
    sampling = SamplingConfig(temperature=cfg.temperature, top_p=cfg.top_p)

    def stream_len(recs):
        return sum(len(prompts[r["p"]]) + len(s) + 1 for r in recs for s in r["samples"])

    have = stream_len(records)
    generated = have < cfg.n_tokens
    bar = None
    if have < cfg.n_tokens and progress:
        from tqdm import tqdm

        bar = tqdm(total=cfg.n_tokens, initial=min(have, cfg.n_tokens), desc="self-distillation text", unit="tok",
                   dynamic_ncols=True)
    writer = None
    was_training = teacher.training
    teacher.eval()
    try:
        with open(cache, "a", encoding="utf-8") as fh:
            while have < cfg.n_tokens:
                if writer is None:
                    writer = _writer_copy(teacher, gen_dtype)
                first = len(records)
                group = range(first, (first // cfg.prompts_per_batch + 1) * cfg.prompts_per_batch)
                pr = [(usable[i % len(usable)], i // len(usable)) for i in group]
                gens = [torch.Generator().manual_seed((cfg.seed * 1_000_003 + p) * 1_000_003 + r) for p, r in pr]
                max_new = [min(cfg.max_new_tokens, limit - len(prompts[p])) for p, _ in pr]
                out = generate_many(writer, [prompts[p] for p, _ in pr], max_new, sampling, stop_ids,
                                    samples_per_prompt=cfg.samples_per_prompt, generators=gens)
                for (p, r), samples in zip(pr, out):
                    rec = {"p": p, "r": r, "samples": samples}
                    fh.write(json.dumps(rec) + "\n")
                    records.append(rec)
                    added = stream_len([rec])
                    have += added
                    if bar is not None:
                        bar.update(added)
                fh.flush()
    finally:
        teacher.train(was_training)
        if bar is not None:
            bar.close()
    ids: List[int] = []
    for rec in records:
        for s in rec["samples"]:
            ids.extend(prompts[rec["p"]])
            ids.extend(s)
            if eos is not None and (not s or s[-1] != eos):
                ids.append(eos)
    if generated or not (cache_dir / "samples.txt").exists():
        _write_readable(cache_dir / "samples.txt", records, prompts, tokenizer)
    return ids, cache


def _writer_copy(teacher, dtype: torch.dtype):
    """The (eval-mode) teacher with ``dtype`` weights for writing text: itself, or a converted copy."""
    import copy

    if teacher.embed.weight.dtype == dtype:
        return teacher
    return copy.deepcopy(teacher).to(dtype)


def _write_readable(path: Path, records, prompts, tokenizer) -> None:
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        for rec in records:
            for s in rec["samples"]:
                fh.write(tokenizer.decode(list(prompts[rec["p"]]) + list(s), skip_special=False))
                fh.write("\n\n=====\n\n")
    os.replace(tmp, path)


def build_windows(tokenizer, seq_len: int, batch_size: int, heldout_windows: int, texts: Optional[Sequence] = None,
                  teacher=None, cache_dir=None, selfdistill: Optional[SelfDistillConfig] = None,
                  progress: bool = False, mix_selfdistill: float = 0.0) -> TokenWindows:
    """Training/held-out windows from user ``texts`` (files or directories), or else the data-free source.

    With ``texts`` and ``mix_selfdistill`` = f in (0, 1), the data-free (teacher-written, mostly chat)
    windows are added to the training windows, repeated as needed, so that they make up a fraction f
    of them (e.g. to keep the chat format while recovering on encyclopaedic text); the held-out
    windows stay the user text's."""
    if seq_len < 2:
        raise UserError(f"--seq-len must be >= 2, got {seq_len}")
    if not 0.0 <= mix_selfdistill < 1.0:
        raise UserError(f"--mix-selfdistill must be in [0, 1), got {mix_selfdistill}")
    if mix_selfdistill and not texts:
        raise UserError("--mix-selfdistill mixes the data-free text into --text; give --text too")
    if (not texts or mix_selfdistill) and (teacher is None or cache_dir is None):
        raise UserError("no training text given and no teacher/cache directory for the data-free source")
    if texts:
        files = collect_text_files(texts)
        ids = tokenize_files(tokenizer, files)
        source = ", ".join(str(f) for f in files[:3]) + (f" (+{len(files) - 3} files)" if len(files) > 3 else "")
        w = windows_from_ids(ids, seq_len, heldout_windows, batch_size, source)
        if not mix_selfdistill:
            return w
        sd_ids, cache = self_distill_ids(teacher, tokenizer, cache_dir, selfdistill, progress=progress)
        sd = windows_from_ids(sd_ids, seq_len, 0, 1, f"self-distillation text ({cache})").train
        n_sd = max(1, round(mix_selfdistill / (1 - mix_selfdistill) * w.train.shape[0]))
        rep = sd[torch.arange(n_sd) % sd.shape[0]]
        return TokenWindows(torch.cat([w.train, rep]), w.heldout,
                            f"{source} + self-distillation text ({cache}; {sd.shape[0]} windows, repeated to "
                            f"{n_sd} = {mix_selfdistill:.0%} of the training windows)", len(ids) + len(sd_ids))
    ids, cache = self_distill_ids(teacher, tokenizer, cache_dir, selfdistill, progress=progress)
    return windows_from_ids(ids, seq_len, heldout_windows, batch_size, f"self-distillation text ({cache})")
