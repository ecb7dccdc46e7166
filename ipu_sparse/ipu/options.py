"""``poptorch.Options`` for a plan: execution strategy, memory proportions, caches, offline compile.

Sharded execution (one token at a time through the IPUs, what Graphcore's GPT-2 inference and
optimum-graphcore use for generation) or pipelined execution (throughput; needs
``deviceIterations >= number of stages``). Under ``poprun`` the options come from
``popdist.poptorch.Options(ipus_per_replica=...)`` so instance and replica settings are set
by the launcher.
"""
from __future__ import annotations

from typing import Optional

from ..errors import UserError
from .planner import Plan

MODES = ("sharded", "pipelined")


def ipu_options(plan: Plan, mode: str = "sharded", device_iterations: Optional[int] = None,
                executable_cache: Optional[str] = None, initializers_file: Optional[str] = None,
                compile_only: bool = False, ipu_model: bool = False, replication_factor: int = 1,
                half_partials: bool = True, poptorch=None, popdist=None):
    """Build ``poptorch.Options`` for ``plan``. ``poptorch`` / ``popdist`` may be passed in (tests
    pass a double); otherwise they are imported here, on the IPU path only."""
    if mode not in MODES:
        raise UserError(f"unknown execution mode {mode!r}; known: {', '.join(MODES)}")
    if poptorch is None:
        from .pipeline import import_poptorch

        poptorch = import_poptorch()
    n_stages = len(plan.stages)
    n_ipus = plan.config.n_ipus

    if popdist is None:
        try:
            import popdist
            import popdist.poptorch  # noqa: F401
        except ImportError:
            popdist = None
    if popdist is not None and popdist.isPopdistEnvSet():
        # Under poprun: instances, replicas and the process id come from the launcher.
        opts = popdist.poptorch.Options(ipus_per_replica=n_ipus)
    else:
        opts = poptorch.Options()
        if replication_factor > 1:
            opts.replicationFactor(replication_factor)

    if n_ipus & (n_ipus - 1):
        opts.autoRoundNumIPUs(True)  # PopTorch needs a power of two otherwise

    if mode == "sharded":
        opts.setExecutionStrategy(poptorch.ShardedExecution(poptorch.AutoStage.AutoIncrement))
        opts.deviceIterations(device_iterations or 1)
    else:
        iterations = device_iterations if device_iterations is not None else n_stages
        if iterations < n_stages:
            raise UserError(f"--device-iterations {iterations} is below the {n_stages} pipeline stages "
                            "(pipelined execution needs at least one micro-batch per stage)")
        opts.setExecutionStrategy(poptorch.PipelinedExecution(poptorch.AutoStage.AutoIncrement))
        opts.deviceIterations(iterations)

    opts.setAvailableMemoryProportion({f"IPU{a.ipu}": a.matmul_proportion for a in plan.ipus})
    if half_partials:
        import torch

        opts.Precision.setPartialsType(torch.half)
    opts.outputMode(poptorch.OutputMode.All)
    if executable_cache:
        opts.enableExecutableCaching(executable_cache)
    if initializers_file:
        # Keep the weights out of the ONNX protobuf (limited to 2 GB): IPU.md, PopTorch options.
        opts._Popart.set("saveInitializersToFile", initializers_file)
    if compile_only:
        opts.useOfflineIpuTarget(2)  # GC200 and Bow are both Mk2 targets
    if ipu_model:
        opts.useIpuModel(True)
    return opts
