"""Put a ``Transformer`` on IPUs as a plan says: ``parallelize_`` / ``deparallelize_``.

Every planned unit (embedding slice, decoder layer, final norm, LM-head slice) gets a
``poptorch.BeginBlock(module, user_id, ipu_id)`` in execution order, as graphcore/examples
and optimum-graphcore do. Vocabulary-sharded embeddings / heads (``planner`` decides when)
are swapped in as ``VocabShardedEmbedding`` / ``VocabShardedHead``, which compute exactly what
the plain modules compute; ``deparallelize_`` puts the originals back and removes the blocks.

poptorch is imported lazily (only when no test double is passed).
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .memory import shard_ranges
from .planner import Plan


def import_poptorch():
    """poptorch, or a clear error where the Poplar SDK is not installed."""
    try:
        import poptorch  # noqa: F401
    except ImportError as exc:  # pragma: no cover - depends on the host
        from ..errors import UserError

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
    from .ops import IpuSparseLinear

    dense = head.to_dense() if hasattr(head, "to_dense") else None
    if dense is None:
        raise TypeError(f"cannot shard LM head of type {type(head).__name__}")
    return [HeadShard(module=IpuSparseLinear.from_module(_linear_from(dense[a:b]))) for a, b in ranges]


def _linear_from(w: torch.Tensor) -> nn.Linear:
    lin = nn.Linear(w.shape[1], w.shape[0], bias=False)
    lin.weight = nn.Parameter(w, requires_grad=False)
    return lin


def shard_vocab_(model, plan: Plan) -> None:
    """Swap in sharded embedding / head modules when the plan shards them (remembering the originals)."""
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
    model.__dict__["_ipu_originals"] = originals


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
    if getattr(model, "_ipu_plan", None) is not None:
        raise RuntimeError("model is already parallelized; call deparallelize_ first")
    if plan.config.model.n_layers != len(model.layers) or plan.config.model.vocab_size != model.config.vocab_size:
        raise ValueError(f"plan is for {plan.config.model.name} ({plan.config.model.n_layers} layers), "
                         f"model has {len(model.layers)} layers")
    poptorch = poptorch or import_poptorch()
    shard_vocab_(model, plan)
    for name, module, ipu in unit_modules(model, plan):
        poptorch.BeginBlock(module, user_id=name, ipu_id=ipu)
    model.__dict__["_ipu_plan"] = plan
    return model


def deparallelize_(model, poptorch=None):
    """Undo ``parallelize_``: remove the blocks and restore the original embedding / head."""
    poptorch = poptorch or import_poptorch()
    poptorch.removeBlocks(model)
    for name, module in model.__dict__.pop("_ipu_originals", {}).items():
        setattr(model, name, module)
    model.__dict__.pop("_ipu_plan", None)
    return model
