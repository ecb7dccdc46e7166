"""Serving backend over a compiled PopTorch decode step (``ipu_sparse.ipu.generate.compile_for_ipu``).

The prompt is fed through the static-shape step one position at a time, as ``ipu-generate``
does; sampling (greedy, temperature, top-p, seed) happens on the host with the same sampler as
the CPU path.
"""
from __future__ import annotations

from typing import Callable, List

import torch

from ..errors import UserError
from ..generate import SamplingConfig, sample_next


class IpuBackend:
    name = "ipu"

    def __init__(self, executor, kv_len: int, rows: int = 1):
        self.executor, self.kv_len, self.rows = executor, int(kv_len), int(rows)

    def step(self, token: int, pos: int) -> torch.Tensor:
        """Row 0's next-token logits (every row carries the same token and position, as in ``generate_ids``)."""
        from ..ipu.generate import step_inputs

        return self.executor(*step_inputs(token, pos, self.rows))[0].float()

    def run(self, prompt_ids: List[int], max_new_tokens: int, sampling: SamplingConfig, stop_ids,
            on_token: Callable[[int], None]) -> None:
        if len(prompt_ids) + max_new_tokens > self.kv_len:
            raise UserError(f"prompt ({len(prompt_ids)} tokens) + max_tokens {max_new_tokens} exceeds the static "
                            f"KV cache of {self.kv_len} (--kv-len)")
        generator = None
        if sampling.seed is not None:
            generator = torch.Generator().manual_seed(sampling.seed)
        logits = None
        for pos, tok in enumerate(prompt_ids):
            logits = self.step(tok, pos)
        pos = len(prompt_ids)
        for i in range(max_new_tokens):
            tok = sample_next(logits, sampling, generator)
            on_token(tok)
            if tok in stop_ids or i + 1 == max_new_tokens:
                break
            logits = self.step(tok, pos)
            pos += 1
