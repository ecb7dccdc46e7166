"""``ipu-sparse ipu-check``: build the IPU graph exactly as ``ipu-generate`` does and trace it
on CPU with ``opcheck.OpTracer`` (which ops PopTorch 3.4 could lower), checking the input split
and that the built modules are the planned ones on the planned IPUs.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from .generate import build_ipu_graph, host_rows, step_inputs
from .opcheck import TraceReport, trace_ops
from .options import execution_shape
from .pipeline import built_vs_plan, deparallelize_


class BlockRecorder:
    """Stands in for ``poptorch`` where only the BeginBlock calls matter (a CPU trace): records
    (module, user_id, ipu_id) in call order; ``removeBlocks`` forgets them. Not PopTorch."""

    def __init__(self):
        self.blocks: List[Tuple[nn.Module, Optional[str], Optional[int]]] = []

    def BeginBlock(self, layer_to_call, user_id=None, ipu_id=None):
        self.blocks.append((layer_to_call, user_id, ipu_id))
        return layer_to_call

    def removeBlocks(self, module):
        self.blocks = []


@dataclass
class IpuCheck:
    report: TraceReport
    rows: int                  # dimension 0 of every host input
    device_iterations: int
    replicas: int
    plan_problems: List[str]
    step_positions: List[int]

    @property
    def ok(self) -> bool:
        return self.report.ok and not self.plan_problems


def check_ipu_graph(model, plan, work_dir, strategy: str = "sharded", replication_factor: int = 1,
                    dtype: torch.dtype = torch.float32, positions: Sequence[int] = (0, 1)) -> IpuCheck:
    """Build the graph exactly as ``ipu-generate`` does (``generate.build_ipu_graph``: sparse
    linears and head, static cache, BeginBlocks, patterns) and trace its steps on CPU.

    ``positions``: the decode-step positions run (0 = the first prompt token, then decode steps;
    ``ipu-generate`` feeds the prompt through the same one-token graph). ``dtype``: float32 by
    default because torch 2.0.1 has no half-precision CPU matmul; the ops are the same apart
    from casts (``_to_copy``, lowerable)."""
    blocks = BlockRecorder()
    step = build_ipu_graph(model, plan, work_dir, dtype=dtype, poptorch=blocks)
    try:
        shape = execution_shape(plan, strategy, replication_factor=replication_factor)
        rows = host_rows(plan, shape.replicas, shape.device_iterations)
        problems = built_vs_plan(model, plan, model.ipu_placement.blocks)
        split = shape.device_iterations * shape.replicas
        calls = []
        for pos in positions:
            token, position = step_inputs(min(pos, model.config.vocab_size - 1), pos, rows)
            for name, t in (("token", token), ("position", position)):
                if t.shape[0] % split:
                    problems.append(f"input {name} has {t.shape[0]} rows, not a multiple of deviceIterations "
                                    f"x replicas = {split}")
            per = rows // split  # what one replica sees per device iteration
            calls.append(((token[:per], position[:per]), {}))
        module_ipus = {m: ipu for m, _, ipu in blocks.blocks}
        report = trace_ops(step, calls, module_ipus=module_ipus)
    finally:
        deparallelize_(model, poptorch=blocks)
        model.clear_cache()
    return IpuCheck(report, rows, shape.device_iterations, shape.replicas, problems, list(positions))
