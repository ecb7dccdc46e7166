"""Put a ``Transformer`` on IPUs as a plan says: ``parallelize_`` / ``deparallelize_``.

Every planned unit (embedding slice, decoder layer, final norm, LM-head slice) gets a
``poptorch.BeginBlock(module, user_id, ipu_id)`` in execution order, as graphcore/examples
and optimum-graphcore do. Vocabulary-sharded embeddings / heads (``planner`` decides when)
are swapped in as ``VocabShardedEmbedding`` / ``VocabShardedHead``, which compute exactly what
the plain modules compute; ``deparallelize_`` puts the originals back and removes the blocks.

poptorch is imported lazily (only when no test double is passed).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import UserError
from .memory import shard_ranges
from .ops import IpuSparseLinear
from .planner import Plan


def import_poptorch():
    """poptorch, or a clear error where the Poplar SDK is not installed."""
    try:
        import poptorch  # noqa: F401
    except ImportError as exc:  # pragma: no cover - depends on the host
        raise UserError("poptorch is not importable: the IPU path needs the Graphcore Poplar SDK "
                        "(PopTorch 3.3/3.4, Python 3.8, torch 2.0.1). Use `ipu-sparse simulate` on CPU.") from exc
    return poptorch


class VocabShardedEmbedding(nn.Module):
    """An embedding split along the vocabulary; each slice looks up the ids in its range and
    zeroes the others, and the slices' outputs are summed (exactly one is non-zero per id)."""

    def __init__(self, weight: torch.Tensor, ranges: Sequence[Tuple[int, int]]):
        super().__init__()
        self.ranges = [tuple(r) for r in ranges]
        self.shards = nn.ModuleList()
        for a, b in self.ranges:
            emb = nn.Embedding(b - a, weight.shape[1])
            emb.weight = nn.Parameter(weight.detach()[a:b], requires_grad=False)  # a view: no copy on CPU
            self.shards.append(emb)

    def shard_forward(self, s: int, idx: torch.Tensor) -> torch.Tensor:
        a, b = self.ranges[s]
        emb = self.shards[s]
        inside = (idx >= a) & (idx < b)                                   # (B, T)
        local = torch.where(inside, idx - a, torch.zeros_like(idx))
        return emb(local) * inside.unsqueeze(-1).to(emb.weight.dtype)     # (B, T, D)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        out = self.shard_forward(0, idx)
        for s in range(1, len(self.shards)):
            out = out + self.shard_forward(s, idx)
        return out


class HeadShard(nn.Module):
    """One vocabulary slice of the LM head (a dense slice, or any module mapping D -> rows)."""

    def __init__(self, weight: Optional[torch.Tensor] = None, module: Optional[nn.Module] = None):
        super().__init__()
        self.module = module
        if module is None:
            self.weight = nn.Parameter(weight, requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(x) if self.module is not None else F.linear(x, self.weight)


class VocabShardedHead(nn.Module):
    """LM head split along the vocabulary; logits are the concatenation of the slices'."""

    def __init__(self, shards: Sequence[nn.Module]):
        super().__init__()
        self.shards = nn.ModuleList(shards)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([s(x) for s in self.shards], dim=-1)  # (B, T, vocab)


def _head_shards(model, ranges, embed_module) -> List[nn.Module]:
    head = model.lm_head
    if isinstance(embed_module, VocabShardedEmbedding) and model.config.tie_embeddings:
        return [HeadShard(weight=e.weight) for e in embed_module.shards]  # share the embedding slices
    if hasattr(head, "weight") and isinstance(head, nn.Linear):
        return [HeadShard(weight=head.weight.detach()[a:b]) for a, b in ranges]
    # a sparse head: slice its dense equivalent's rows into sparse slices
    dense = head.to_dense() if hasattr(head, "to_dense") else None
    if dense is None:
        raise TypeError(f"cannot shard LM head of type {type(head).__name__}")
    return [HeadShard(module=IpuSparseLinear.from_module(_linear_from(dense[a:b]))) for a, b in ranges]


def _linear_from(w: torch.Tensor) -> nn.Linear:
    lin = nn.Linear(w.shape[1], w.shape[0], bias=False)
    lin.weight = nn.Parameter(w, requires_grad=False)
    return lin


@dataclass
class IpuPlacement:
    """What ``parallelize_`` did to a model (held as ``model.ipu_placement``), to check and undo it."""
    plan: Plan
    blocks: List[Tuple[str, nn.Module, int]]  # (block name, module, ipu) in BeginBlock order
    originals: Dict[str, nn.Module]           # embedding / head replaced by vocabulary shards


def shard_vocab_(model, plan: Plan) -> Dict[str, nn.Module]:
    """Swap in sharded embedding / head modules when the plan shards them; returns the originals
    they replaced (``restore_vocab_`` puts them back)."""
    n_emb = sum(1 for u in plan.units if u.kind == "embed")
    n_head = sum(1 for u in plan.units if u.kind == "head")
    originals = {}
    V = model.config.vocab_size
    if n_emb > 1:
        originals["embed"] = model.embed
        model.embed = VocabShardedEmbedding(model.embed.weight, shard_ranges(V, n_emb))
    if n_head > 1:
        originals["lm_head"] = model.lm_head
        model.lm_head = VocabShardedHead(_head_shards(model, shard_ranges(V, n_head), model.embed))
    return originals


def restore_vocab_(model, originals: Dict[str, nn.Module]) -> None:
    """Undo ``shard_vocab_``: put the original embedding / head back."""
    for name, module in originals.items():
        setattr(model, name, module)


def unit_modules(model, plan: Plan) -> List[Tuple[str, nn.Module, int]]:
    """(block name, module, ipu) in execution order, exactly the BeginBlock sequence."""
    out = []
    first_head = True
    for u in plan.units:
        ipu = plan.placement[u.name]
        if u.kind == "head" and first_head:
            out.append(("norm", model.norm, ipu))  # the final norm runs with the first head slice
            first_head = False
        out.append((u.name, model.get_submodule(u.name), ipu))
    return out


def parallelize_(model, plan: Plan, poptorch=None):
    """Annotate ``model`` in place with one BeginBlock per planned unit; returns the model."""
    if model.ipu_placement is not None:
        raise RuntimeError("model is already parallelized; call deparallelize_ first")
    if plan.config.model.n_layers != len(model.layers) or plan.config.model.vocab_size != model.config.vocab_size:
        raise ValueError(f"plan is for {plan.config.model.name} ({plan.config.model.n_layers} layers), "
                         f"model has {len(model.layers)} layers")
    poptorch = poptorch or import_poptorch()
    originals = shard_vocab_(model, plan)
    blocks = unit_modules(model, plan)
    for name, module, ipu in blocks:
        poptorch.BeginBlock(module, user_id=name, ipu_id=ipu)
    model.ipu_placement = IpuPlacement(plan, blocks, originals)
    return model


def planned_blocks(plan: Plan) -> List[Tuple[str, int]]:
    """(block name, ipu) the plan asks for, in execution order (the final norm opens the head's block)."""
    out: List[Tuple[str, int]] = []
    for u in plan.units:
        if u.kind == "head" and not any(n == "norm" for n, _ in out):
            out.append(("norm", plan.placement[u.name]))
        out.append((u.name, plan.placement[u.name]))
    return out


def built_vs_plan(model, plan: Plan, blocks: Sequence[Tuple[str, nn.Module, int]]) -> List[str]:
    """Where the built (parallelized) model differs from what the planner assumed: block names and
    IPUs, the module each block annotates, and per unit sparse vs dense matrices and non-zeros
    (a sparse unit may hold up to 2% more non-zeros than planned: sparsity is reached per matrix,
    so one vocabulary slice of a pruned head can hold a little more than its share)."""
    problems: List[str] = []
    got = [(name, ipu) for name, _, ipu in blocks]
    want = planned_blocks(plan)
    if got != want:
        problems.append(f"BeginBlocks {got} differ from the plan's {want}")
    units = {u.name: u for u in plan.units}
    for name, module, ipu in blocks:
        if module is not (model.norm if name == "norm" else model.get_submodule(name)):
            problems.append(f"block {name} annotates a module that is not the model's {name}")
        u = units.get(name)
        if u is None:
            continue
        sparse = [m for m in module.modules() if isinstance(m, IpuSparseLinear)]
        dense = [m for m in module.modules() if isinstance(m, (nn.Linear, HeadShard)) and not isinstance(m, IpuSparseLinear)
                 and getattr(m, "module", None) is None]
        nnz = sum(m.nnz for m in sparse)
        if u.nnz > 0:
            if dense:
                problems.append(f"{name} (IPU{ipu}) is planned sparse but holds {len(dense)} dense matrices")
            if not sparse:
                problems.append(f"{name} (IPU{ipu}) is planned sparse but has no sparse matrix")
            elif nnz > u.nnz * 1.02 + len(sparse):
                problems.append(f"{name} (IPU{ipu}) holds {nnz} non-zeros, the plan assumes {u.nnz} "
                                "(prune it to the planned sparsity)")
            unexported = [m for m in sparse if m.pattern_path is None]
            if unexported:
                problems.append(f"{name} (IPU{ipu}): {len(unexported)} sparse matrices have no pattern file")
        elif sparse:
            problems.append(f"{name} (IPU{ipu}) is planned dense but holds sparse matrices")
    return problems


def deparallelize_(model, poptorch=None):
    """Undo ``parallelize_``: remove the blocks and restore the original embedding / head."""
    poptorch = poptorch or import_poptorch()
    poptorch.removeBlocks(model)
    if model.ipu_placement is not None:
        restore_vocab_(model, model.ipu_placement.originals)
        model.ipu_placement = None
    return model
