"""Text generation: prefill + KV-cached decode, greedy or sampled (top-k, top-p), streamed token by token;
one prompt, several samples of one prompt decoded as a batch (``generate_batch``), or several prompts
(of any lengths, each with its samples) decoded as one batch (``generate_many``)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, List, Optional, Sequence

import torch

from .errors import UserError
from .sparse.engine import DecodeEngine, engine_enabled


@dataclass
class SamplingConfig:
    """``temperature == 0`` is greedy; ``top_k == 0`` and ``top_p == 1`` disable those filters."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: Optional[int] = None

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise UserError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise UserError(f"top_k must be >= 0, got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise UserError(f"top_p must be in (0, 1], got {self.top_p}")


def sample_tokens(logits: torch.Tensor, cfg: SamplingConfig, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Pick one next token per row from logits (n, V); returns (n,) token ids."""
    if cfg.temperature == 0.0:
        return torch.argmax(logits, dim=-1)
    logits = logits.float() / cfg.temperature  # (n, V)
    if cfg.top_k > 0:
        k = min(cfg.top_k, logits.shape[-1])
        kth = torch.topk(logits, k, dim=-1).values[:, -1:]  # (n, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if cfg.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        probs = torch.softmax(sorted_logits, dim=-1)
        # drop tokens once the mass before them already reaches top_p (always keep the first)
        drop = (probs.cumsum(-1) - probs) >= cfg.top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


def sample_next(logits: torch.Tensor, cfg: SamplingConfig, generator: Optional[torch.Generator] = None) -> int:
    """Pick the next token from fp32 logits (vocab,)."""
    return int(sample_tokens(logits.reshape(1, -1), cfg, generator)[0])


@torch.inference_mode()
def generate_batch(model, prompt_ids: Sequence[int], num_samples: int, max_new_tokens: int,
                   sampling: Optional[SamplingConfig] = None, stop_ids: Iterable[int] = (),
                   generator: Optional[torch.Generator] = None,
                   on_step: Optional[Callable[[torch.Tensor], None]] = None,
                   engine: Optional[bool] = None) -> List[List[int]]:
    """``num_samples`` continuations of one prompt, decoded together in one batch with the KV cache.

    Each continuation has up to ``max_new_tokens`` tokens and ends after its first token in
    ``stop_ids`` (the stop token is returned too). Decoding goes on until every row has stopped,
    so each step draws from ``generator`` for all rows and a sample does not depend on when the
    others stop. ``on_step`` is called with each step's (num_samples,) new tokens.

    One sample on the CPU decodes through the C++ decode engine (``sparse.engine``) after the
    torch prefill, when the model is one it reads; ``engine=False`` (or ``IPU_SPARSE_ENGINE=0``)
    keeps every step in torch."""
    sampling = sampling or SamplingConfig()
    prompt_ids = list(prompt_ids)
    if not prompt_ids:
        raise UserError("empty prompt")
    if max_new_tokens < 0:
        raise UserError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    P = len(prompt_ids)
    limit = model.config.max_seq_len
    if P + max_new_tokens > limit:
        raise UserError(f"prompt ({P} tokens) + max_new_tokens ({max_new_tokens}) exceeds the model's context of {limit}")
    if max_new_tokens == 0:
        return [[] for _ in range(num_samples)]
    device = next(model.parameters()).device
    stop = set(stop_ids)
    stop_t = torch.tensor(sorted(stop) or [-1], dtype=torch.long)
    fast = None
    if num_samples == 1 and device.type == "cpu" and engine_enabled(engine):
        fast = DecodeEngine.from_model(model)
    model.setup_cache(num_samples, P + max_new_tokens)
    try:
        idx = torch.tensor([prompt_ids] * num_samples, dtype=torch.long, device=device)  # (n, P)
        logits = model(idx, input_pos=torch.arange(P, device=device), last_only=True)[:, -1]  # (n, V)
        if fast is not None:
            fast.attach_cache()  # decode on in the KV cache the prefill filled
        steps: List[torch.Tensor] = []
        done = torch.zeros(num_samples, dtype=torch.bool)
        for t in range(max_new_tokens):
            nxt = sample_tokens(logits.cpu(), sampling, generator)  # (n,)
            steps.append(nxt)
            if on_step is not None:
                on_step(nxt)
            done |= torch.isin(nxt, stop_t)
            if bool(done.all()) or t == max_new_tokens - 1:
                break
            if fast is not None:
                logits = fast.step(int(nxt[0]), P + t)[None]  # (1, V)
                continue
            logits = model(nxt[:, None].to(device), input_pos=torch.tensor([P + t], device=device),
                           last_only=True)[:, -1]  # (n, V)
    finally:
        model.clear_cache()
    samples = []
    for row in torch.stack(steps, dim=1).tolist():  # (n, T)
        cut = next((i + 1 for i, tok in enumerate(row) if tok in stop), len(row))
        samples.append(row[:cut])
    return samples


@torch.inference_mode()
def generate_many(model, prompts: Sequence[Sequence[int]], max_new_tokens, sampling: Optional[SamplingConfig] = None,
                  stop_ids: Iterable[int] = (), samples_per_prompt: int = 1,
                  generators: Optional[Sequence[Optional[torch.Generator]]] = None,
                  pad_id: int = 0) -> List[List[List[int]]]:
    """``samples_per_prompt`` continuations of each of several prompts, decoded together in one batch.

    Prompts of different lengths are left-padded (the model skips the padding: per-row positions
    and attention mask). ``max_new_tokens``: one limit, or one per prompt. Prompt i's samples draw
    from ``generators[i]`` (one draw per step for all of its rows, as ``generate_batch`` does), so
    they are the samples ``generate_batch`` makes for that prompt alone with the same generator, up
    to floating-point rounding of the padded batch (exact for greedy decoding in practice).
    A prompt leaves the batch once all its samples have stopped. Returns ``out[i][j]``: sample j of
    prompt i, each ending after its first token in ``stop_ids`` (kept)."""
    sampling = sampling or SamplingConfig()
    prompts = [list(p) for p in prompts]
    n, spp = len(prompts), samples_per_prompt
    if spp < 1:
        raise UserError(f"samples_per_prompt must be >= 1, got {spp}")
    limits = [int(max_new_tokens)] * n if isinstance(max_new_tokens, int) else [int(m) for m in max_new_tokens]
    if len(limits) != n or (generators is not None and len(generators) != n):
        raise ValueError("max_new_tokens / generators: one per prompt")
    limit = model.config.max_seq_len
    for p, m in zip(prompts, limits):
        if not p:
            raise UserError("empty prompt")
        if m < 0:
            raise UserError(f"max_new_tokens must be >= 0, got {m}")
        if len(p) + m > limit:
            raise UserError(f"prompt ({len(p)} tokens) + max_new_tokens ({m}) exceeds the model's context of {limit}")
    out: List[List[List[int]]] = [[[] for _ in range(spp)] for _ in range(n)]
    live = [i for i in range(n) if limits[i] > 0]  # prompts still in the batch, in row order
    if not live:
        return out
    device = next(model.parameters()).device
    stop = set(stop_ids)
    stop_t = torch.tensor(sorted(stop) or [-1], dtype=torch.long)
    P = max(len(prompts[i]) for i in live)
    T_max = max(limits[i] for i in live)
    pad = torch.tensor([P - len(prompts[i]) for i in live for _ in range(spp)], dtype=torch.long)  # (B,)
    idx = torch.tensor([[pad_id] * (P - len(prompts[i])) + prompts[i] for i in live for _ in range(spp)],
                       dtype=torch.long)  # (B, P)
    done = torch.zeros(len(live), spp, dtype=torch.bool)
    model.setup_cache(len(live) * spp, P + T_max)
    try:
        logits = model(idx.to(device), input_pos=torch.arange(P, device=device), last_only=True,
                       left_pad=pad.to(device))[:, -1].cpu()  # (B, V)
        for t in range(T_max):
            if sampling.temperature == 0.0:
                nxt = torch.argmax(logits, dim=-1)  # (B,)
            else:
                nxt = torch.cat([sample_tokens(logits[g * spp:(g + 1) * spp], sampling,
                                               None if generators is None else generators[i])
                                 for g, i in enumerate(live)])  # (B,)
            rows = nxt.view(len(live), spp).tolist()
            for g, i in enumerate(live):
                for j in range(spp):
                    if not done[g, j] and len(out[i][j]) < limits[i]:
                        out[i][j].append(rows[g][j])
            done |= torch.isin(nxt.view(len(live), spp), stop_t)
            keep = [g for g, i in enumerate(live) if not bool(done[g].all()) and t + 1 < limits[i]]
            if not keep:
                break
            if len(keep) < len(live):  # drop finished prompts from the batch
                sel = torch.tensor([g * spp + j for g in keep for j in range(spp)], dtype=torch.long)
                model.keep_cache_rows_(sel.to(device))
                live, done, pad, nxt = [live[g] for g in keep], done[keep], pad[sel], nxt[sel]
            logits = model(nxt[:, None].to(device), input_pos=torch.tensor([P + t], device=device), last_only=True,
                           left_pad=pad.to(device))[:, -1].cpu()  # (B, V)
    finally:
        model.clear_cache()
    return out


def generate(model, prompt_ids: Sequence[int], max_new_tokens: int, sampling: Optional[SamplingConfig] = None,
             stop_ids: Iterable[int] = (), on_token: Optional[Callable[[int], None]] = None,
             engine: Optional[bool] = None) -> List[int]:
    """Generate up to ``max_new_tokens`` after ``prompt_ids``; stop after a token in ``stop_ids``
    (the stop token is returned too). ``on_token`` is called with each new token as it is made.
    ``engine``: use the C++ decode engine (default: unless ``IPU_SPARSE_ENGINE=0``)."""
    sampling = sampling or SamplingConfig()
    generator = None
    if sampling.seed is not None:
        generator = torch.Generator(device="cpu")
        generator.manual_seed(sampling.seed)
    on_step = None if on_token is None else (lambda toks: on_token(int(toks[0])))
    return generate_batch(model, prompt_ids, 1, max_new_tokens, sampling, stop_ids, generator, on_step, engine)[0]


def encode_chat(tokenizer, messages: Sequence[dict]) -> List[int]:
    """Token ids of a conversation rendered through the model's chat template, ready for the
    assistant's answer (the generation prompt is appended)."""
    return tokenizer.encode(tokenizer.apply_chat_template(list(messages), add_generation_prompt=True))


class TextStreamer:
    """Turns a stream of token ids into text pieces, holding back incomplete UTF-8 sequences."""

    def __init__(self, tokenizer, write: Callable[[str], None], skip_ids: Iterable[int] = ()):
        self.tokenizer, self.write = tokenizer, write
        self.skip = set(skip_ids)
        self.ids: List[int] = []
        self.printed = 0

    def __call__(self, tok: int) -> None:
        if tok in self.skip:
            return
        self.ids.append(tok)
        text = self.tokenizer.decode(self.ids)
        if text.endswith("\ufffd"):
            return  # a multi-byte character is not finished yet
        self.write(text[self.printed:])
        self.printed = len(text)

    def text(self) -> str:
        return self.tokenizer.decode(self.ids)


class ChatSession:
    """A conversation with history, rendered through the model's chat template each turn."""

    def __init__(self, model, tokenizer, sampling: SamplingConfig, max_new_tokens: int = 256,
                 system: Optional[str] = None):
        self.model, self.tokenizer = model, tokenizer
        self.sampling, self.max_new_tokens = sampling, max_new_tokens
        self.messages: List[dict] = []
        if system:
            self.messages.append({"role": "system", "content": system})

    def ask(self, text: str, write: Optional[Callable[[str], None]] = None) -> str:
        self.messages.append({"role": "user", "content": text})
        ids = encode_chat(self.tokenizer, self.messages)
        room = self.model.config.max_seq_len - len(ids)
        if room <= 0:
            self.messages.pop()
            raise UserError("the conversation no longer fits the model's context; start a new one (/reset)")
        streamer = TextStreamer(self.tokenizer, write or (lambda s: None), skip_ids=self.tokenizer.stop_ids)
        generate(self.model, ids, min(self.max_new_tokens, room), self.sampling, self.tokenizer.stop_ids, streamer)
        answer = streamer.text().strip()
        self.messages.append({"role": "assistant", "content": answer})
        return answer

    def reset(self) -> None:
        self.messages = [m for m in self.messages if m["role"] == "system"]
