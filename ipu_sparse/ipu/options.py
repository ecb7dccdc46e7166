"""``poptorch.Options`` for a plan: execution strategy, memory proportions, caches, offline compile.

Sharded execution (one token at a time through the IPUs, what Graphcore's GPT-2 inference and
optimum-graphcore use for generation) or pipelined execution (throughput; needs
``deviceIterations >= number of stages``). Under ``poprun`` the options come from
``popdist.poptorch.Options(ipus_per_replica=...)`` so instance and replica settings are set
by the launcher.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

from ..errors import UserError
from .pipeline import import_poptorch
from .planner import Plan

MODES = ("sharded", "pipelined")


class ExecutionShape(NamedTuple):
    """How PopTorch splits dimension 0 of every host input: batch x device_iterations x replicas."""

    device_iterations: int
    replicas: int  # replicas driven by this process (popdist: the local replicas)


def import_popdist():
    """popdist (with popdist.poptorch) when installed, else None; never on a plain CPU path."""
    try:
        import popdist
        import popdist.poptorch  # noqa: F401
    except ImportError:
        return None
    return popdist


def init_popdist(popdist=None):
    """Under poprun: ``popdist.init()`` (as Graphcore's examples do) and return popdist; else None."""
    popdist = popdist if popdist is not None else import_popdist()
    if popdist is None or not popdist.isPopdistEnvSet():
        return None
    popdist.init()
    return popdist


def execution_shape(plan: Plan, mode: str = "sharded", device_iterations: Optional[int] = None,
                    replication_factor: int = 1, popdist=None) -> ExecutionShape:
    """Device iterations (1 sharded; >= stages pipelined) and the replicas this process feeds."""
    if mode not in MODES:
        raise UserError(f"unknown execution mode {mode!r}; known: {', '.join(MODES)}")
    n_stages = len(plan.stages)
    if mode == "sharded":
        iterations = device_iterations or 1
    else:
        iterations = device_iterations if device_iterations is not None else n_stages
        if iterations < n_stages:
            raise UserError(f"--device-iterations {iterations} is below the {n_stages} pipeline stages "
                            "(pipelined execution needs at least one micro-batch per stage)")
    replicas = replication_factor
    if popdist is not None and popdist.isPopdistEnvSet():
        replicas = int(popdist.getNumLocalReplicas())
    return ExecutionShape(iterations, replicas)


def ipu_options(plan: Plan, mode: str = "sharded", device_iterations: Optional[int] = None,
                executable_cache: Optional[str] = None, initializers_file: Optional[str] = None,
                compile_only: bool = False, ipu_model: bool = False, replication_factor: int = 1,
                half_partials: bool = True, poptorch=None, popdist=None):
    """Build ``poptorch.Options`` for ``plan``. ``poptorch`` / ``popdist`` may be passed in (tests
    pass a double); otherwise they are imported here, on the IPU path only."""
    shape = execution_shape(plan, mode, device_iterations, replication_factor)  # validates mode and iterations
    if poptorch is None:
        poptorch = import_poptorch()
    n_ipus = plan.config.n_ipus

    if popdist is None:
        popdist = import_popdist()
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
    else:
        opts.setExecutionStrategy(poptorch.PipelinedExecution(poptorch.AutoStage.AutoIncrement))
    opts.deviceIterations(shape.device_iterations)
    # The decode graph writes its KV-cache buffers in place; under replication PopTorch refuses
    # to broadcast written buffers ("does not support broadcasting buffers"): each replica keeps its own.
    opts.broadcastBuffers(False)

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
    if compile_only and not poptorch.ipuHardwareIsAvailable(n_ipus):
        # No IPU attached: compile for an offline Mk2 target (GC200 and Bow). On a POD the
        # compile-only run attaches like the run itself, with the same (popdist) options, so the
        # executable cache entry it writes is the one the run looks up.
        opts.useOfflineIpuTarget(2)
    if ipu_model:
        opts.useIpuModel(True)
    return opts
