"""The sequential calibration driver: one code path for every model family and every method.

``prune_layers_(model, config, counts, tokens)`` builds the solvers of each group itself
(``config.solver``, one per Linear, sharing the group's input statistics) and prunes each
Linear to its exact ``counts[name]``. Without calibration data (magnitude without OWL or
refit) it runs no forward pass: every Linear is pruned from its weights alone.

With data: layer 0's inputs are captured once from the embedding; then for each ``model.layers[i]``:
the projections of the layer are hooked, the calibration batch is run through
``layer(x, cos, sin)`` with ``cos, sin = model.rope(arange(L))``, each Linear is pruned
from statistics of the inputs the *already pruned* model produces, and the layer is run
again (or finished in the same pass) so its pruned outputs become layer i+1's inputs.
Only one layer's activations are held at a time.

Within a layer the Linears fall into groups fed by the same tensor (q/k/v, o, gate/up,
down in the Llama block), found by a probe forward. ``sequential="group"`` (default)
prunes group by group, so o_proj's statistics see pruned q/k/v and the MLP's see the
pruned attention output (the reference repositories' ``--true-sequential``);
``sequential="layer"`` takes every statistic from one pass over the dense layer, as the
reference SparseGPT/Wanda drivers do.
"""
from __future__ import annotations

import copy
import sys
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn as nn
from tqdm import tqdm

from ..errors import UserError
from .common import InputStats
from .config import PruneConfig

Group = List[Tuple[str, nn.Module]]  # Linears of one layer fed the same input, (name in the layer, module)


class _Stop(Exception):
    """Raised from a hook to end a forward pass once the needed input was seen."""


def _is_linear(mod: nn.Module) -> bool:
    return isinstance(mod, nn.Linear) or getattr(mod, "is_sparse_linear", False)


def linear_groups(layer: nn.Module, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> List[Group]:
    """Linears of ``layer`` in call order, grouped by identical input tensor (probe on ``x``)."""
    calls: List[Tuple[str, nn.Module, torch.Tensor]] = []
    handles = []
    for name, mod in layer.named_modules():
        if _is_linear(mod):
            handles.append(mod.register_forward_pre_hook(
                lambda m, inp, _n=name: calls.append((_n, m, inp[0]))))
    try:
        with torch.inference_mode():
            layer(x, cos, sin)
    finally:
        for h in handles:
            h.remove()
    groups: List[Group] = []
    last = None
    seen = set()
    for name, mod, inp in calls:
        if id(mod) in seen:
            continue
        seen.add(id(mod))
        if last is not None and inp is last:
            groups[-1].append((name, mod))
        else:
            groups.append([(name, mod)])
        last = inp
    return groups


def _chunks(n: int, size: int):
    for s in range(0, n, size):
        yield slice(s, min(n, s + size))


def _run(layer, x, cos, sin, batch: int) -> torch.Tensor:
    out = torch.empty_like(x)
    for sl in _chunks(x.shape[0], batch):
        out[sl] = layer(x[sl], cos, sin)
    return out


def hooked_pass(layer, x, cos, sin, leaders: Dict[int, int], on_input: Callable[[int, torch.Tensor], None],
                 stop_after: Optional[int] = None) -> Optional[torch.Tensor]:
    """Run ``layer`` on ``x`` with ``on_input(group, tensor)`` called before each group leader;
    raise/catch _Stop after the group ``stop_after`` was seen (partial pass, no output)."""
    def hook(mod, inp):
        g = leaders[id(mod)]
        on_input(g, inp[0])
        if stop_after is not None and g >= stop_after:
            raise _Stop

    handles = [m.register_forward_pre_hook(hook) for m in _leader_modules(layer, leaders)]
    try:
        return layer(x, cos, sin)
    except _Stop:
        return None
    finally:
        for h in handles:
            h.remove()


def _leader_modules(layer, leaders):
    return [m for m in layer.modules() if id(m) in leaders]


class _LayerPruner:
    """Solvers for the groups of one layer: ``prune(g, stats)`` prunes group ``g`` to its counts."""

    def __init__(self, config: PruneConfig, counts: Dict[str, int], prefix: str, groups: List[Group], device):
        self.config, self.counts, self.prefix, self.groups, self.device = config, counts, prefix, groups, device
        self.hessian = config.solver.needs_hessian or config.refit_iters > 0

    def stats(self, g: int) -> InputStats:
        return InputStats(self.groups[g][0][1].weight.shape[1], hessian=self.hessian, cross=self.config.dense_target,
                          device=self.device)

    def prune(self, g: int, stats: Optional[InputStats]) -> None:
        cfg, cls = self.config, self.config.solver
        group = self.groups[g]
        solvers = [cls(mod, stats) for _, mod in group]
        cls.prune_group(solvers, [self.counts[self.prefix + name] for name, _ in group], cfg.prune_n, cfg.prune_m,
                        **cls.options(cfg))
        if stats is not None:
            stats.free()


def prune_layer(layer: nn.Module, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, pruner: _LayerPruner,
                batch: int, dense_inputs: Optional[List[torch.Tensor]] = None) -> torch.Tensor:
    """Prune one layer from calibration inputs ``x`` (n, L, D) in chunks of ``batch``; return its pruned outputs.

    With the whole batch in one chunk and ``sequential="group"``, everything happens in a single forward
    pass: the hook of a group's first Linear accumulates the statistics and prunes the group before it runs."""
    n = x.shape[0]
    groups = pruner.groups
    leaders = {id(g[0][1]): gi for gi, g in enumerate(groups)}
    if pruner.config.sequential == "group" and batch >= n:
        def inline(g, inp):
            stats = pruner.stats(g)
            stats.add(inp, dense_inputs[g] if dense_inputs is not None else None)
            pruner.prune(g, stats)
        return hooked_pass(layer, x, cos, sin, leaders, inline)
    if pruner.config.sequential == "group":
        for g in range(len(groups)):  # partial passes up to group g's input, over the chunks
            stats = pruner.stats(g)
            for sl in _chunks(n, batch):
                hooked_pass(layer, x[sl], cos, sin, leaders,
                            lambda gi, inp: stats.add(inp) if gi == g else None, stop_after=g)
            pruner.prune(g, stats)
    else:  # "layer"
        all_stats = [pruner.stats(g) for g in range(len(groups))]
        for sl in _chunks(n, batch):
            hooked_pass(layer, x[sl], cos, sin, leaders, lambda gi, inp: all_stats[gi].add(inp),
                        stop_after=len(groups) - 1)
        for g in range(len(groups)):
            pruner.prune(g, all_stats[g])
    return _run(layer, x, cos, sin, batch)


def capture_group_inputs(layer, x, cos, sin, groups) -> Tuple[torch.Tensor, List[torch.Tensor]]:
    """Run ``layer`` once; return its output and each group's input (for dense targets)."""
    leaders = {id(g[0][1]): gi for gi, g in enumerate(groups)}
    store: List[Optional[torch.Tensor]] = [None] * len(groups)

    def keep(g, inp):
        store[g] = inp

    out = hooked_pass(layer, x, cos, sin, leaders, keep)
    return out, store  # type: ignore[return-value]


def prune_layers_(model, config: PruneConfig, counts: Dict[str, int], tokens: Optional[torch.Tensor] = None,
                  progress: bool = True) -> None:
    """Prune every decoder Linear of ``model`` in place, layer by layer, to ``counts[name]`` removed weights.

    ``tokens`` (n, L): calibration windows; None runs no forward pass (methods without statistics)."""
    if tokens is None:
        with torch.no_grad():
            for i, layer in enumerate(model.layers):
                groups = [[(name, mod)] for name, mod in layer.named_modules() if _is_linear(mod)]
                pruner = _LayerPruner(config, counts, f"layers.{i}.", groups, None)
                for g in range(len(groups)):
                    pruner.prune(g, None)
        return
    n, L = tokens.shape
    batch = n if not config.batch_size else min(n, config.batch_size)
    if config.dense_target and batch < n:
        raise UserError("the dense-target correction needs the whole calibration batch in one pass (batch_size=None)")
    cos, sin = model.rope(torch.arange(L, device=tokens.device))
    with torch.inference_mode():
        x = model.embed(tokens)  # (n, L, D) inputs of layer 0
        xd = x if config.dense_target else None
        bar = tqdm(range(len(model.layers)), desc="pruning layers", unit="layer", file=sys.stderr, disable=not progress)
        for i in bar:
            layer = model.layers[i]
            groups = linear_groups(layer, x[:1, : min(L, 8)], cos[: min(L, 8)], sin[: min(L, 8)])
            dense_inputs = None
            if config.dense_target:
                dense_layer = copy.deepcopy(layer)
                xd_next, dense_inputs = capture_group_inputs(dense_layer, xd, cos, sin, groups_for(dense_layer, groups))
                del dense_layer
            pruner = _LayerPruner(config, counts, f"layers.{i}.", groups, tokens.device)
            x = prune_layer(layer, x, cos, sin, pruner, batch, dense_inputs=dense_inputs)
            if config.dense_target:
                xd = xd_next
                del dense_inputs


def groups_for(copy_layer: nn.Module, groups: List[Group]) -> List[Group]:
    """The same groups, addressed in a deep copy of ``layer`` (by module name)."""
    mods = dict(copy_layer.named_modules())
    return [[(name, mods[name]) for name, _ in g] for g in groups]
