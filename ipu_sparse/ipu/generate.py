"""Generation on IPUs: ``poptorch.inferenceModel`` over a static-shape decode step.

One compiled graph: ``DecodeStep(token (B, 1), position (1,)) -> next-token logits (B, vocab)``
with the model's static KV cache (``setup_cache(..., static=True)``: every step attends over
the whole ``kv_len`` cache, masked, so shapes never change). The prompt is fed through the same
graph one position at a time, so there is a single compilation; greedy or sampled decoding
happens on the host. ``compile_only`` builds and exports the executable for an offline Mk2
target (no IPU attached), which is how a POD's executable cache is filled in advance.
"""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import torch
import torch.nn as nn

from .ops import IpuSparseLinear, export_patterns_, load_custom_op
from .options import ipu_options
from .pipeline import deparallelize_, import_poptorch, parallelize_
from .planner import Plan


class DecodeStep(nn.Module):
    """Static-shape wrapper: one token per sequence at ``position`` -> its logits (B, vocab)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, token: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
        return self.model(token, input_pos=position, last_only=True)[:, -1]  # (B, vocab)


def prepare_for_ipu(model, plan: Plan, work_dir, dtype: torch.dtype = torch.float16, poptorch=None) -> DecodeStep:
    """Static KV cache, half precision, exported sparse patterns, BeginBlocks per the plan."""
    pc = plan.config
    model = model.to(dtype).eval()
    model.setup_cache(pc.batch, pc.kv_len, dtype=dtype, static=True)
    export_patterns_(model, Path(work_dir) / "patterns")
    parallelize_(model, plan, poptorch=poptorch)
    return DecodeStep(model)


def compile_for_ipu(model, plan: Plan, work_dir, mode: str = "sharded", compile_only: bool = False,
                    executable_cache: Optional[str] = None, dtype: torch.dtype = torch.float16,
                    load_op: bool = True, poptorch=None, popdist=None):
    """Build the PopTorch executor; with ``compile_only`` export it to ``work_dir/decode.popef``."""
    poptorch = poptorch or import_poptorch()
    if load_op and any(isinstance(m, IpuSparseLinear) for m in model.modules()):
        load_custom_op()
    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    step = prepare_for_ipu(model, plan, work_dir, dtype=dtype, poptorch=poptorch)
    opts = ipu_options(plan, mode=mode, executable_cache=executable_cache,
                       initializers_file=str(work_dir / "initializers.onnx"), compile_only=compile_only,
                       poptorch=poptorch, popdist=popdist)
    executor = poptorch.inferenceModel(step, opts)
    token = torch.zeros(plan.config.batch, 1, dtype=torch.long)
    position = torch.zeros(1, dtype=torch.long)
    if compile_only:
        executor.compileAndExport(str(work_dir / "decode.popef"), token, position)
    else:
        executor.compile(token, position)
    return executor, step


def generate_ids(executor, prompt_ids: List[int], max_new_tokens: int, kv_len: int, batch: int = 1,
                 eos_id: Optional[int] = None) -> List[int]:
    """Greedy decoding through a compiled ``DecodeStep`` executor (prompt fed token by token)."""
    if len(prompt_ids) + max_new_tokens > kv_len:
        from ..errors import UserError

        raise UserError(f"prompt ({len(prompt_ids)} tokens) + --max-new-tokens {max_new_tokens} exceeds "
                        f"the static KV cache of {kv_len} (--kv-len)")
    out = list(prompt_ids)
    logits = None
    for pos, tok in enumerate(prompt_ids):
        logits = executor(torch.full((batch, 1), tok, dtype=torch.long), torch.tensor([pos]))
    for _ in range(max_new_tokens):
        nxt = int(logits[0].float().argmax())
        out.append(nxt)
        if eos_id is not None and nxt == eos_id:
            break
        logits = executor(torch.full((batch, 1), nxt, dtype=torch.long), torch.tensor([len(out) - 1]))
    return out


def release(executor, model, poptorch=None) -> None:
    """Detach from the device and undo the BeginBlocks (the model runs on CPU again)."""
    try:
        executor.detachFromDevice()
    finally:
        deparallelize_(model, poptorch=poptorch)
        model.clear_cache()
