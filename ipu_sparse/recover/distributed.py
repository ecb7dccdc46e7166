"""Recovery on several processes with PyTorch's own engine: ``torchrun --nproc-per-node N -m ipu_sparse recover``.

``torchrun`` starts N processes and sets ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK``; ``from_environment``
joins them into one process group (gloo on CPU, nccl on CUDA, each process on ``cuda:LOCAL_RANK``).
Without those variables (or with ``WORLD_SIZE=1``) nothing here runs and recovery is the one-process path.

The global batch of optimizer step k is the one a one-process run with the same settings draws:
``batch_size x grad_accum`` windows, a function of (seed, k) only (``TokenWindows.batch``). Process r
takes the r-th of N equal, contiguous slices of it, in micro-batches of gcd(slice, batch_size)
windows (never more than ``batch_size`` per forward). Every loss is a mean over windows of equal
length, so the gradient averaged over processes (DistributedDataParallel, or FullyShardedDataParallel
with ``--fsdp``) is the one-process gradient up to float rounding: more processes make a step faster,
not bigger (raise ``--batch-size`` or ``--grad-accum`` for that). A run can therefore be resumed with
another number of processes.

Every process holds the whole mask; masks and weights are broadcast from process 0 after each
(re-)pruning and block-wise reconstruction, gradients of pruned weights are zeroed after the
averaging and the weights re-masked after the step, so all processes hold the same weights. Decisions
that steer the loop (interrupt, time budget, the measured step time a time-fitted schedule uses)
are agreed on (an interrupt on any process, the budget and clock of process 0). Process 0 alone
evaluates, logs, shows progress and writes the run directory; the others wait for it at the next
collective operation.
"""
from __future__ import annotations

import copy
import datetime
import math
import os
from types import SimpleNamespace
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

from ..errors import UserError
from .masks import Masks, apply_masks_, mask_gradients_

ENV_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK")
# how long a process waits for the others at a collective operation: covers process 0 evaluating,
# saving, and writing the shared caches while the others wait (a hang fails after it)
TIMEOUT_MIN = 60


def _env_int(name: str) -> int:
    value = os.environ.get(name)
    if value is None:
        raise UserError(f"{name} is not set: start distributed recovery with torchrun (it sets {', '.join(ENV_VARS)})")
    try:
        return int(value)
    except ValueError:
        raise UserError(f"{name}={value!r} is not an integer") from None


def from_environment(device: str, fsdp: bool = False) -> Tuple[Optional["Distributed"], str]:
    """The process group torchrun asks for (None when not started by it, or alone) and this process's device.

    ``device`` is the ``--device`` option: ``cpu`` (gloo) or ``cuda`` (nccl; process r uses
    ``cuda:LOCAL_RANK``, so an explicit index is refused)."""
    world = _env_int("WORLD_SIZE") if "WORLD_SIZE" in os.environ else 1
    if world <= 1:
        if fsdp:
            raise UserError("--fsdp shards the model over several processes: start with "
                            "torchrun --nproc-per-node N -m ipu_sparse recover ... (N >= 2)")
        return None, device
    rank, local_rank = _env_int("RANK"), _env_int("LOCAL_RANK")
    if device.startswith("cuda"):
        if device != "cuda":
            raise UserError(f"--device {device}: under torchrun give --device cuda (process r uses cuda:LOCAL_RANK)")
        if not torch.cuda.is_available():
            raise UserError(f"--device {device}: CUDA is not available on this machine")
        if local_rank >= torch.cuda.device_count():
            raise UserError(f"LOCAL_RANK {local_rank}: this machine has {torch.cuda.device_count()} CUDA devices")
        device = f"cuda:{local_rank}"
        torch.cuda.set_device(local_rank)
        backend = "nccl"
    elif device == "cpu":
        backend = "gloo"
    else:
        raise UserError(f"--device {device}: distributed recovery runs on cpu (gloo) or cuda (nccl)")
    if not dist.is_available():
        raise UserError("this PyTorch build has no torch.distributed")
    if not dist.is_initialized():  # (a process that runs several recoveries joins once)
        try:
            dist.init_process_group(backend=backend, rank=rank, world_size=world,
                                    timeout=datetime.timedelta(minutes=TIMEOUT_MIN))
        except ValueError as exc:  # MASTER_ADDR / MASTER_PORT missing or malformed
            raise UserError(f"cannot join the process group: {exc}") from None
    return Distributed(rank, world, local_rank, torch.device(device), fsdp), device


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


class Distributed:
    """This process's place in a process group and the collective steps recovery takes."""

    def __init__(self, rank: int, world_size: int, local_rank: int, device: torch.device, fsdp: bool = False):
        self.rank, self.world_size, self.local_rank = rank, world_size, local_rank
        self.device, self.fsdp = device, fsdp

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def describe(self) -> str:
        engine = "FullyShardedDataParallel" if self.fsdp else "DistributedDataParallel"
        return f"{self.world_size} processes ({engine}, {dist.get_backend()})"

    def check_config(self, cfg, resume: bool = False) -> None:
        """Refuse settings this process count cannot split, or that sharded training does not support."""
        total = cfg.batch_size * cfg.grad_accum
        if total % self.world_size:
            raise UserError(f"--batch-size {cfg.batch_size} x --grad-accum {cfg.grad_accum} = {total} windows per step "
                            f"do not split over {self.world_size} processes; make it a multiple of {self.world_size}")
        if self.fsdp:
            if not fsdp_supported(self.device):
                raise UserError(f"--fsdp: PyTorch {torch.__version__} cannot run FullyShardedDataParallel on "
                                f"{self.device.type}; use DistributedDataParallel (leave out --fsdp) or a newer PyTorch")
            # a sharded run is one distillation stage saved at its end (the optimizer state stays sharded)
            for bad, what in ((cfg.block_epochs > 0, "--block-epochs"), (bool(cfg.gradual), "--gradual"),
                              (bool(cfg.snapshot_minutes), "--snapshot-minutes"), (resume, "--resume"),
                              (cfg.stop_after is not None, "--stop-after"),
                              (cfg.hidden_weight > 0, "--hidden-weight")):
                if bad:
                    raise UserError(f"--fsdp: {what} is not supported with sharded training")

    # ----- collectives ------------------------------------------------------------------------
    def barrier(self) -> None:
        dist.barrier()

    def _all_reduce(self, values: Sequence[float], op) -> List[float]:
        t = torch.tensor(list(values), dtype=torch.float64, device=self.device)
        dist.all_reduce(t, op=op)
        return t.tolist()

    def agree_stop(self, interrupted: bool, budget_exhausted: bool) -> Tuple[bool, bool]:
        """(an interrupt on any process, process 0's time budget exhausted): the same on every process."""
        a, b = self._all_reduce([float(interrupted), float(budget_exhausted and self.is_main)], dist.ReduceOp.MAX)
        return a > 0, b > 0

    def step_report(self, parts: Dict[str, float], step_s: float) -> Tuple[Dict[str, float], float]:
        """The loss parts averaged over processes (each had an equal share of the global batch) and process 0's
        step time (a time-fitted schedule horizon must be the same everywhere)."""
        keys = sorted(parts)
        sums = self._all_reduce([parts[k] for k in keys] + [step_s if self.is_main else 0.0], dist.ReduceOp.SUM)
        return {k: v / self.world_size for k, v in zip(keys, sums)}, sums[-1]

    @torch.no_grad()
    def broadcast_module_(self, module: torch.nn.Module) -> None:
        """Process 0's parameters and buffers into every process's ``module``."""
        for t in list(module.parameters()) + list(module.buffers()):
            dist.broadcast(t.data, src=0)

    def broadcast_masks(self, masks: Masks) -> Masks:
        out = {}
        for name in sorted(masks):
            t = masks[name].to(device=self.device, dtype=torch.uint8).contiguous()
            dist.broadcast(t, src=0)
            out[name] = t.bool().to(masks[name].device)
        return out

    # ----- the data -----------------------------------------------------------------------------
    def local_rows(self, rows: Sequence[Sequence[int]], batch_size: int) -> List[List[int]]:
        """This process's micro-batches of one optimizer step, as training-window indices: its contiguous
        slice of the global batch (``rows``: the one-process micro-batches), cut into equal micro-batches
        of at most ``batch_size`` windows."""
        flat = [r for micro in rows for r in micro]
        share = len(flat) // self.world_size
        mine = flat[self.rank * share:(self.rank + 1) * share]
        size = math.gcd(share, batch_size)
        return [mine[i:i + size] for i in range(0, share, size)]

    # ----- the model ----------------------------------------------------------------------------
    def wrap(self, student):
        """The student for one distillation stage: ``ReplicatedStudent`` (DDP) or ``ShardedStudent`` (FSDP)."""
        return ShardedStudent(self, student) if self.fsdp else ReplicatedStudent(self, student)


class ReplicatedStudent:
    """The student under DistributedDataParallel: a full replica per process, gradients averaged in the last
    backward of a step (``sync_gradients``); masking, clipping and the step are the one-process ones."""

    sharded = False

    def __init__(self, d: Distributed, student):
        from torch.nn.parallel import DistributedDataParallel as DDP

        ids = [d.device.index] if d.device.type == "cuda" else None
        # the constructor broadcasts process 0's parameters and buffers
        self.model = DDP(student, device_ids=ids)

    def sync_gradients(self, sync: bool) -> None:
        """Average gradients over processes in the next backward only if ``sync`` (what ``no_sync()`` toggles;
        a step's earlier micro-batches just accumulate)."""
        self.model.require_backward_grad_sync = sync

    def optimizer_params(self, params: Sequence[torch.nn.Parameter]) -> List[torch.nn.Parameter]:
        return list(params)

    def close(self, gather: bool = True) -> None:
        self.model = None  # drops DDP's gradient hooks


def fsdp_supported(device: torch.device) -> bool:
    """FullyShardedDataParallel runs on CUDA; on CPU (gloo) only from PyTorch 2.1 on (2.0 needs a GPU)."""
    if device.type == "cuda":
        return True
    major, minor = (int(x) for x in torch.__version__.split(".")[:2])
    return (major, minor) >= (2, 1)


def _fsdp_name(name: str) -> str:
    return name.replace("_fsdp_wrapped_module.", "")


class ShardedStudent:
    """The student under FullyShardedDataParallel: parameters, gradients and optimizer state sharded over
    processes, one FSDP unit per decoder block. A copy of the student is sharded; ``close`` gathers the
    trained weights back into the student (on every process)."""

    sharded = True

    def __init__(self, d: Distributed, student):
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
        from torch.distributed.fsdp.wrap import ModuleWrapPolicy

        self.d, self.student = d, student
        self._copy = copy.deepcopy(student)
        self.model = FSDP(self._copy, auto_wrap_policy=ModuleWrapPolicy({type(student.layers[0])}),
                          device_id=d.device, use_orig_params=True,
                          # (the students are equal already, broadcast after pruning; CPU FSDP cannot sync)
                          sync_module_states=d.device.type == "cuda")

    def sync_gradients(self, sync: bool) -> None:
        pass  # FSDP reduce-scatters every backward (its no_sync would keep whole unsharded gradients)

    def optimizer_params(self, params) -> List[torch.nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def _full_view(self):
        """The sharded copy as ``masks.py`` sees a model (decoder Linears by their unwrapped names); valid
        inside ``summon_full_params``."""
        return SimpleNamespace(linear_layers=lambda: ((_fsdp_name(n), m) for n, m in self._copy.linear_layers()))

    def step_(self, optimizer, masks: Masks, grad_clip: float) -> None:
        """Mask the (sharded) gradients, clip by the global norm, step, re-mask the weights."""
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        with FSDP.summon_full_params(self.model, writeback=True, with_grads=True):
            mask_gradients_(self._full_view(), masks)
        if grad_clip > 0:
            self.model.clip_grad_norm_(grad_clip)
        optimizer.step()
        with FSDP.summon_full_params(self.model, writeback=True):
            apply_masks_(self._full_view(), masks)

    def gather_(self) -> None:
        """The sharded weights into the (full) student, on every process."""
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        with FSDP.summon_full_params(self.model, writeback=False):
            trained = {_fsdp_name(n): q for n, q in self._copy.named_parameters()}
            with torch.no_grad():
                for n, p in self.student.named_parameters():
                    p.copy_(trained[n])

    def close(self, gather: bool = True) -> None:
        if gather:
            self.gather_()
        self.model = self._copy = None

