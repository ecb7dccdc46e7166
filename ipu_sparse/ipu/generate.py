"""Generation on IPUs: ``poptorch.inferenceModel`` over a static-shape decode step.

One compiled graph: ``DecodeStep(token (B, 1), position (B, 1)) -> next-token logits (B, vocab)``
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

from ..errors import UserError
from .ops import export_patterns_, load_custom_op, to_ipu_sparse_
from .options import execution_shape, ipu_options
from .pipeline import deparallelize_, import_poptorch, parallelize_
from .planner import Plan


class DecodeStep(nn.Module):
    """Static-shape wrapper: one token per sequence at ``position`` -> its logits (B, vocab).

    Both inputs have one row per sample (token (B, 1), position (B, 1)): PopTorch splits
    dimension 0 of every input by deviceIterations x replicas, so a per-step input shaped (1,)
    would break pipelined and replicated runs. The samples decode in lockstep, so row 0's
    position is the cache slot."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, token: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
        return self.model(token, input_pos=position[0], last_only=True)[:, -1]  # (B, vocab)


def build_ipu_graph(model, plan: Plan, work_dir, dtype: torch.dtype = torch.float16, poptorch=None) -> DecodeStep:
    """The graph ``ipu-generate`` compiles (and ``ipu-check`` traces): sparse linears (and the
    sparse head) as the plan says, half precision, static KV cache, BeginBlocks per the plan,
    then every sparse pattern exported (after vocabulary sharding, so head slices have theirs)."""
    pc = plan.config
    if pc.fmt != "dense":
        to_ipu_sparse_(model, include_head=pc.sparse_head)  # weights must hold exact zeros (a pruned model)
    model = model.to(dtype).eval()
    model.setup_cache(pc.batch, pc.kv_len, dtype=dtype, static=True)
    parallelize_(model, plan, poptorch=poptorch)
    export_patterns_(model, Path(work_dir) / "patterns")
    return DecodeStep(model)


def host_rows(plan: Plan, replicas: int = 1, device_iterations: int = 1) -> int:
    """Rows of every host input per call: batch x deviceIterations x (local) replicas."""
    return plan.config.batch * device_iterations * replicas


def step_inputs(token: int, position: int, rows: int):
    """(token (rows, 1), position (rows, 1)) for one decode step, one row per sample."""
    return (torch.full((rows, 1), token, dtype=torch.long), torch.full((rows, 1), position, dtype=torch.long))


def compile_for_ipu(model, plan: Plan, work_dir, mode: str = "sharded", compile_only: bool = False,
                    executable_cache: Optional[str] = None, dtype: torch.dtype = torch.float16,
                    load_op: bool = True, poptorch=None, popdist=None):
    """Build the PopTorch executor; with ``compile_only`` export it to ``work_dir/decode.popef``.
    Returns (executor, step, rows): ``rows`` is the dimension 0 of every host input."""
    poptorch = poptorch or import_poptorch()
    if load_op and plan.config.fmt != "dense":
        load_custom_op()
    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    step = build_ipu_graph(model, plan, work_dir, dtype=dtype, poptorch=poptorch)
    shape = execution_shape(plan, mode=mode, popdist=popdist)
    opts = ipu_options(plan, mode=mode, device_iterations=shape.device_iterations, executable_cache=executable_cache,
                       initializers_file=str(work_dir / "initializers.onnx"), compile_only=compile_only,
                       poptorch=poptorch, popdist=popdist)
    executor = poptorch.inferenceModel(step, opts)
    rows = host_rows(plan, shape.replicas, shape.device_iterations)
    token, position = step_inputs(0, 0, rows)
    if compile_only:
        executor.compileAndExport(str(work_dir / "decode.popef"), token, position)
    else:
        executor.compile(token, position)
    return executor, step, rows


def generate_ids(executor, prompt_ids: List[int], max_new_tokens: int, kv_len: int, rows: int = 1,
                 eos_id: Optional[int] = None) -> List[int]:
    """Greedy decoding through a compiled ``DecodeStep`` executor (prompt fed token by token).
    Every row of a call carries the same token and position (lockstep; the cache write is
    idempotent across device iterations), and row 0's logits pick the next token."""
    if len(prompt_ids) + max_new_tokens > kv_len:
        raise UserError(f"prompt ({len(prompt_ids)} tokens) + --max-new-tokens {max_new_tokens} exceeds "
                        f"the static KV cache of {kv_len} (--kv-len)")
    out = list(prompt_ids)
    logits = None
    for pos, tok in enumerate(prompt_ids):
        logits = executor(*step_inputs(tok, pos, rows))
    for _ in range(max_new_tokens):
        nxt = int(logits[0].float().argmax())
        out.append(nxt)
        if eos_id is not None and nxt == eos_id:
            break
        logits = executor(*step_inputs(nxt, len(out) - 1, rows))
    return out


def release(executor, model, poptorch=None) -> None:
    """Detach from the device and undo the BeginBlocks (the model runs on CPU again)."""
    try:
        executor.detachFromDevice()
    finally:
        deparallelize_(model, poptorch=poptorch)
        model.clear_cache()
