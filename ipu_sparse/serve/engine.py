"""One served model: its generation thread, its admission queue and its bytes/FLOPs figures.

Each ``Engine`` owns one worker thread, so its model (and the KV cache inside it) is only
ever used by one request at a time: a request first takes the engine's slot (``acquire``,
FIFO; at most ``max_queue`` requests wait, more get ``Busy`` -> HTTP 503), then its
generation runs on the worker thread and the slot is given back when that thread has
finished (completed, failed, or stopped because the client went away).
"""
from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence

from ..errors import UserError
from ..generate import SamplingConfig, TextStreamer, encode_chat


class Busy(Exception):
    """Every slot of the engine's queue is taken."""


class _Stop(Exception):
    """Raised from the token callback to end generation early (stop string or cancellation)."""


@dataclass
class GenerationResult:
    text: str
    finish_reason: str  # "stop" (end token or stop string), "length" (max_tokens), "cancelled"
    prompt_tokens: int
    completion_tokens: int
    prompt_seconds: float = 0.0
    decode_seconds: float = 0.0

    @property
    def tokens_per_second(self) -> float:
        # decode speed: tokens after the first over the time spent making them
        n = self.completion_tokens - 1
        return n / self.decode_seconds if n > 0 and self.decode_seconds > 0 else 0.0

    def timings(self) -> Dict[str, float]:
        return {"prompt_ms": round(1000 * self.prompt_seconds, 2), "decode_ms": round(1000 * self.decode_seconds, 2),
                "predicted_per_second": round(self.tokens_per_second, 2)}


class StopMatcher:
    """Emits generated text, holding back any tail that could still become a stop string."""

    def __init__(self, stops: Sequence[str]):
        self.stops = [s for s in stops if s]
        self.text = ""
        self.sent = 0
        self.hit = False

    def feed(self, piece: str) -> str:
        """Add ``piece``; return the text that is now safe to send ('' while a stop string may be forming)."""
        self.text += piece
        for s in self.stops:
            at = self.text.find(s, max(0, self.sent - len(s)))
            if at >= 0:
                self.text, self.hit = self.text[:at], True
        if self.hit:
            return self.flush()
        hold = 0
        for s in self.stops:
            for k in range(min(len(s) - 1, len(self.text)), 0, -1):
                if self.text.endswith(s[:k]):
                    hold = max(hold, k)
                    break
        safe = len(self.text) - hold
        out = self.text[self.sent:safe] if safe > self.sent else ""
        self.sent = max(self.sent, safe)
        return out

    def flush(self) -> str:
        out = self.text[self.sent:]
        self.sent = len(self.text)
        return out


def model_figures(model, context: int = 512) -> Dict[str, Any]:
    """Bytes of weights and FLOPs per token of ``model`` as it runs (``sparse.accounting``)."""
    from ..sparse.accounting import account, head_storage, rows_from_model

    rows = rows_from_model(model)
    sparse = any(getattr(m, "is_sparse_linear", False) for _, m in model.linear_layers(include_head=True))
    head_dtype, group = head_storage(model)  # a 16-bit or int8 head counts its own bytes
    tied = bool(model.config.tie_embeddings or model.head_untied)  # the source stored one matrix
    res = account(model.config, rows, context=context, head_dtype=head_dtype, tied_in_source=tied,
                  head_group_size=group)
    w = res["whole_model"]
    return {
        "sparse": sparse,
        "sparsity": round(res["sparse_layers"]["sparsity"], 4) if sparse else 0.0,
        "weight_bytes": w["bytes"] if sparse else w["dense_fp16_bytes"],
        "dense_fp16_bytes": w["dense_fp16_bytes"],
        "flops_per_token": w["flops_per_token"] if sparse else w["dense_flops_per_token"],
        "dense_flops_per_token": w["dense_flops_per_token"],
        "context": context,
    }


class CpuBackend:
    """Runs ``ipu_sparse.generate.generate`` on the model (dense or sparse CPU path)."""

    name = "cpu"

    def __init__(self, model):
        self.model = model

    def run(self, prompt_ids: List[int], max_new_tokens: int, sampling: SamplingConfig, stop_ids,
            on_token: Callable[[int], None]) -> None:
        from ..generate import generate

        generate(self.model, prompt_ids, max_new_tokens, sampling, stop_ids, on_token)


class Engine:
    """A model served under ``model_id``: tokenizer, backend, figures, one worker thread, a bounded queue."""

    def __init__(self, model_id: str, lm, role: str = "model", max_queue: int = 8, backend=None,
                 source: Optional[str] = None, figures: Optional[Dict[str, Any]] = None):
        """``figures``: ``model_figures`` of the model as loaded (give them when ``backend`` has
        already converted its layers, e.g. for the IPU)."""
        if max_queue < 0:
            raise UserError(f"--max-queue must be >= 0, got {max_queue}")
        self.id, self.lm, self.role = model_id, lm, role
        self.tokenizer = lm.tokenizer
        self.backend = backend or CpuBackend(lm.model)
        self.context = int(getattr(self.backend, "kv_len", None) or lm.model.config.max_seq_len)
        self.max_queue = max_queue
        self.source = source or getattr(lm, "source", model_id)
        self.figures = figures if figures is not None else model_figures(lm.model)
        self.created = int(time.time())
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"ipu-sparse-{role}")
        self._lock: Optional[asyncio.Lock] = None
        self.pending = 0  # requests holding or waiting for the slot
        self.active = 0
        self.served = 0

    # ----- admission (event-loop thread only) --------------------------------------------------
    async def acquire(self) -> None:
        if self._lock is None:
            self._lock = asyncio.Lock()
        if self.pending >= 1 + self.max_queue:
            raise Busy(f"model {self.id} is busy: 1 request generating and {self.max_queue} queued "
                       f"(the most this server queues); retry later")
        self.pending += 1
        try:
            await self._lock.acquire()
        except BaseException:
            self.pending -= 1
            raise
        self.active = 1

    def release(self) -> None:
        self.active = 0
        self.pending -= 1
        self.served += 1
        self._lock.release()

    @property
    def queued(self) -> int:
        return self.pending - self.active

    # ----- generation --------------------------------------------------------------------------
    def encode_chat(self, messages: List[Dict[str, str]]) -> List[int]:
        return encode_chat(self.tokenizer, messages)

    def encode(self, text: str) -> List[int]:
        return self.tokenizer.encode(text)

    def start(self, prompt_ids: List[int], max_tokens: int, sampling: SamplingConfig, stops: Sequence[str],
              emit: Callable[[str], None], cancel: threading.Event) -> "asyncio.Future":
        """Run one generation on the worker thread (the caller holds the slot); the returned future
        gives the ``GenerationResult`` (or the error) and the slot is released when it completes."""
        loop = asyncio.get_running_loop()
        fut = loop.run_in_executor(self._executor, self._generate, prompt_ids, max_tokens, sampling, stops, emit, cancel)
        fut.add_done_callback(lambda _f: self.release())
        return fut

    def _generate(self, prompt_ids, max_tokens, sampling, stops, emit, cancel) -> GenerationResult:
        matcher = StopMatcher(stops)
        stop_ids = set(getattr(self.tokenizer, "stop_ids", ()))
        state = {"n": 0, "first": None, "finish": "length"}

        def write(piece: str) -> None:
            out = matcher.feed(piece)
            if out:
                emit(out)
            if matcher.hit:
                state["finish"] = "stop"
                raise _Stop()

        streamer = TextStreamer(self.tokenizer, write, skip_ids=stop_ids)

        def on_token(tok: int) -> None:
            if state["first"] is None:
                state["first"] = time.perf_counter()
            state["n"] += 1
            if cancel.is_set():
                state["finish"] = "cancelled"
                raise _Stop()
            if tok in stop_ids:
                state["finish"] = "stop"
            streamer(tok)

        t0 = time.perf_counter()
        try:
            self.backend.run(list(prompt_ids), max_tokens, sampling, stop_ids, on_token)
        except _Stop:
            pass
        tail = matcher.flush()
        if tail and state["finish"] != "cancelled":
            emit(tail)
        t1 = time.perf_counter()
        first = state["first"] or t1
        return GenerationResult(matcher.text, state["finish"], len(prompt_ids), state["n"],
                                prompt_seconds=first - t0, decode_seconds=t1 - first)

    def describe(self) -> Dict[str, Any]:
        return {"id": self.id, "object": "model", "created": self.created, "owned_by": "ipu-sparse",
                "ipu_sparse": dict(self.figures, role=self.role, backend=self.backend.name, source=str(self.source),
                                   context_length=self.context)}

    def status(self) -> Dict[str, Any]:
        return {"id": self.id, "role": self.role, "generating": self.active, "queued": self.queued,
                "max_queue": self.max_queue, "served": self.served}

    def shutdown(self) -> None:
        self._executor.shutdown(wait=True)


@dataclass
class Registry:
    """The engines a server serves, by model id (the first one is the default for the page)."""

    engines: List[Engine] = field(default_factory=list)

    def get(self, model_id: str) -> Optional[Engine]:
        return next((e for e in self.engines if e.id == model_id), None)

    def ids(self) -> List[str]:
        return [e.id for e in self.engines]
