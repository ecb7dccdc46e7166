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

With ``config.alloc_step`` > 0 the split of each layer's weight budget over its projection types
is searched first (``search_allocation``): candidate splits are pruned on copies of the layer
from a few windows and the one whose layer output is closest to the dense layer's wins. With
``config.recon_steps`` > 0 each pruned layer's kept weights are then trained jointly, masks held,
towards the dense layer's outputs (``reconstruct_layer_``) before the next layer sees its outputs.
"""
from __future__ import annotations

import copy
import dataclasses
import sys
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
from tqdm import tqdm

from ..errors import UserError
from .common import InputStats, allocate_counts
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
        self.masks: Dict[str, torch.Tensor] = {}  # name in the layer -> keep mask, filled as groups are pruned

    def stats(self, g: int) -> InputStats:
        return InputStats(self.groups[g][0][1].weight.shape[1], hessian=self.hessian, cross=self.config.dense_target,
                          device=self.device)

    def prune(self, g: int, stats: Optional[InputStats]) -> None:
        cfg, cls = self.config, self.config.solver
        group = self.groups[g]
        solvers = [cls(mod, stats) for _, mod in group]
        masks = cls.prune_group(solvers, [self.counts[self.prefix + name] for name, _ in group], cfg.prune_n,
                                cfg.prune_m, **cls.options(cfg))
        self.masks.update((name, keep) for (name, _), keep in zip(group, masks))
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
                  progress: bool = True) -> Optional[List[Dict[str, float]]]:
    """Prune every decoder Linear of ``model`` in place, layer by layer, to ``counts[name]`` removed weights.

    ``tokens`` (n, L): calibration windows; None runs no forward pass (methods without statistics).
    With ``config.alloc_step`` the counts of each layer are redistributed over its projection types
    (same layer total; ``search_allocation``); returns the chosen offsets per layer, else None."""
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
        offsets: List[Dict[str, float]] = []
        for i in bar:
            layer = model.layers[i]
            prefix = f"layers.{i}."
            groups = linear_groups(layer, x[:1, : min(L, 8)], cos[: min(L, 8)], sin[: min(L, 8)])
            dense_inputs = xd_next = dense_layer = None
            if config.dense_target or config.alloc_step or config.recon_steps:
                dense_layer = copy.deepcopy(layer)
            if config.dense_target:
                xd_next, dense_inputs = capture_group_inputs(dense_layer, xd, cos, sin, groups_for(dense_layer, groups))
            layer_counts = counts
            if config.alloc_step:
                layer_counts, chosen = search_allocation(layer, dense_layer, groups, prefix, counts, config, x, cos, sin,
                                                         batch, target=xd_next, dense_inputs=dense_inputs)
                offsets.append(chosen)
                bar.set_postfix({k.split(" ")[0]: f"{v:+.2f}" for k, v in chosen.items()})
            if not config.recon_steps:
                dense_layer = None
            pruner = _LayerPruner(config, layer_counts, prefix, groups, tokens.device)
            x_in = x
            x = prune_layer(layer, x, cos, sin, pruner, batch, dense_inputs=dense_inputs)
            if config.recon_steps:
                target = xd_next if xd_next is not None else _run(dense_layer, x_in, cos, sin, batch)
                x, before, after = reconstruct_layer_(layer, pruner.masks, x_in, x, target, cos, sin, config, batch,
                                                      seed=i)
                bar.set_postfix(recon=f"{before:.3g}->{after:.3g}")
                del dense_layer, target
            del x_in
            if config.dense_target:
                xd = xd_next
                del dense_inputs
    return offsets or None


# Offsets searched by ``search_allocation``: (name, projection types that gain sparsity, types that lose it).
ALLOC_AXES: Tuple[Tuple[str, Tuple[str, ...], Tuple[str, ...]], ...] = (
    ("attn vs mlp", ("q_proj", "k_proj", "v_proj", "o_proj"), ("gate_proj", "up_proj", "down_proj")),
    ("qk vs vo", ("q_proj", "k_proj"), ("v_proj", "o_proj")),
    ("gate/up vs down", ("gate_proj", "up_proj"), ("down_proj",)),
)


MAX_ALLOC_SPARSITY = 0.98  # no candidate split prunes a projection further (an empty one kills the next)


def offset_counts(names: Sequence[str], sizes: Sequence[int], base: Sequence[int],
                  offsets: Dict[str, float]) -> Optional[List[int]]:
    """Per-Linear counts of one layer after moving sparsity along ``ALLOC_AXES``: axis offset d adds d to
    the sparsity of its first side and removes d * size(first) / size(second) from the second, so the
    layer's total is unchanged; exactly ``sum(base)`` weights are removed in all. None when a projection
    would leave [0, ``MAX_ALLOC_SPARSITY``] (that candidate is not tried)."""
    kind = [n.rsplit(".", 1)[-1] for n in names]
    sp = [b / s for b, s in zip(base, sizes)]
    for axis, up, down in ALLOC_AXES:
        d = offsets.get(axis, 0.0)
        a = [j for j, k in enumerate(kind) if k in up]
        b = [j for j, k in enumerate(kind) if k in down]
        if not d or not a or not b:
            continue
        ratio = sum(sizes[j] for j in a) / sum(sizes[j] for j in b)
        for j in a:
            sp[j] += d
        for j in b:
            sp[j] -= d * ratio
    if any(abs(v - b / z) > 1e-12 and not 0.0 <= v <= MAX_ALLOC_SPARSITY for v, b, z in zip(sp, base, sizes)):
        return None
    total = sum(base)
    return allocate_counts(sizes, sp, total / sum(sizes)) if total else [0] * len(names)


def search_allocation(layer: nn.Module, dense_layer: nn.Module, groups: List[Group], prefix: str,
                      counts: Dict[str, int], config: PruneConfig, x: torch.Tensor, cos: torch.Tensor,
                      sin: torch.Tensor, batch: int, target: Optional[torch.Tensor] = None,
                      dense_inputs: Optional[List[torch.Tensor]] = None) -> Tuple[Dict[str, int], Dict[str, float]]:
    """Split of this layer's budget over its projection types with the least layer-output error.

    Coordinate search over ``ALLOC_AXES`` (each axis tries +-``config.alloc_step`` around the best so
    far, 1 + 2 x axes candidates). Every candidate is pruned with ``config``'s method on a copy of ``layer``
    from statistics of the first ``alloc_nsamples`` windows of ``x`` taken once, in one pass over the
    unpruned layer (as ``sequential="layer"``; shared by the candidates, with SparseGPT's factor of H
    computed once; no refit), and scored by the squared error of its output on the next ``alloc_nsamples``
    windows (the same ones when there are too few) against ``target`` (the dense model's outputs for those
    windows) or, without one, ``dense_layer`` on ``x``. Returns the counts (``counts`` with this layer's
    entries replaced) and the chosen offsets."""
    n = x.shape[0]
    k = min(n, config.alloc_nsamples)
    ev = slice(k, min(n, 2 * k)) if n >= 2 * k else slice(0, k)
    x_eval = x[ev]
    y_eval = target[ev] if target is not None else _run(dense_layer, x_eval, cos, sin, min(batch, k))
    cls = config.solver
    options = cls.options(dataclasses.replace(config, refit_iters=0) if config.refit_iters else config)
    probe = _LayerPruner(config, counts, prefix, groups_for(dense_layer, groups), x.device)
    shared = [probe.stats(g) for g in range(len(groups))]
    for st in shared:
        st.cache = {}
    leaders = {id(g[0][1]): gi for gi, g in enumerate(probe.groups)}
    for sl in _chunks(k, min(batch, k)):
        hooked_pass(dense_layer, x[sl], cos, sin, leaders,
                    lambda gi, inp: shared[gi].add(inp, dense_inputs[gi][sl] if dense_inputs is not None else None),
                    stop_after=len(groups) - 1)
    names = [name for g in groups for name, _ in g]
    sizes = [mod.weight.numel() for g in groups for _, mod in g]
    base = [counts[prefix + name] for name in names]

    def with_offsets(offsets: Dict[str, float]) -> Dict[str, int]:
        return dict(counts, **{prefix + nm: c for nm, c in zip(names, offset_counts(names, sizes, base, offsets))})

    def error(offsets: Dict[str, float]) -> float:
        trial = copy.deepcopy(layer)
        trial_counts = with_offsets(offsets)
        for g, group in enumerate(groups_for(trial, groups)):
            cls.prune_group([cls(mod, shared[g]) for _, mod in group],
                            [trial_counts[prefix + name] for name, _ in group], 0, 0, **options)
        return _sq_error(_run(trial, x_eval, cos, sin, min(batch, k)), y_eval)

    best: Dict[str, float] = {}
    best_err = error(best)
    step = float(config.alloc_step)
    for axis, _, _ in ALLOC_AXES:
        centre = dict(best)
        for sign in (1.0, -1.0):
            cand = dict(centre, **{axis: centre.get(axis, 0.0) + sign * step})
            cand_counts = offset_counts(names, sizes, base, cand)
            if cand_counts is None or cand_counts == offset_counts(names, sizes, base, centre):
                continue  # out of range, or the axis does not apply to this layer (e.g. no gate projection)
            err = error(cand)
            if err < best_err:
                best, best_err = cand, err
    for st in shared:
        st.free()
    return with_offsets(best), {axis: best.get(axis, 0.0) for axis, _, _ in ALLOC_AXES}


def reconstruct_layer_(layer: nn.Module, masks: Dict[str, torch.Tensor], x: torch.Tensor, out: torch.Tensor,
                       target: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, config: PruneConfig, batch: int,
                       seed: int = 0) -> Tuple[torch.Tensor, float, float]:
    """Joint reconstruction of a pruned layer: ``config.recon_steps`` Adam steps (lr ``recon_lr``, ``recon_batch``
    random windows of ``x`` each) on the weights of all the Linears in ``masks`` (names in ``layer`` -> keep
    masks) at once, minimising the squared error of the layer's output against ``target``; gradients and
    weights are masked after every step, so no pruned weight comes back.

    ``out`` is the layer's output on ``x`` before the steps. Returns (output, error before, error after),
    errors relative to ``target``'s total energy on the whole batch; if the steps did not lower the error
    the weights are put back and ``out`` is returned."""
    energy = float(target.double().pow(2).sum()) or 1.0
    before = _sq_error(out, target) / energy
    mods = dict(layer.named_modules())
    with torch.inference_mode(False), torch.enable_grad():
        pairs = [(mods[name].weight, keep.clone()) for name, keep in masks.items()]
        backup = [w.detach().clone() for w, _ in pairs]
        grad_flags = [(p, p.requires_grad) for p in layer.parameters()]
        for p, _ in grad_flags:
            p.requires_grad_(False)
        for w, _ in pairs:
            w.requires_grad_(True)
        opt = torch.optim.Adam([w for w, _ in pairs], lr=config.recon_lr)
        gen = torch.Generator().manual_seed(config.seed * 1_000_003 + seed)
        n = x.shape[0]
        scale = n / max(1, min(n, config.recon_batch))
        try:
            for _ in range(config.recon_steps):
                idx = torch.randperm(n, generator=gen)[: config.recon_batch].to(x.device)
                xb, yb = x[idx].clone(), target[idx].clone()
                loss = (layer(xb, cos, sin) - yb).pow(2).sum() * (scale / energy)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                with torch.no_grad():
                    for w, keep in pairs:
                        w.grad.masked_fill_(~keep, 0.0)
                opt.step()
                with torch.no_grad():
                    for w, keep in pairs:
                        w.masked_fill_(~keep, 0.0)
        finally:
            for p, flag in grad_flags:
                p.requires_grad_(flag)
                p.grad = None
    new = _run(layer, x, cos, sin, batch)
    after = _sq_error(new, target) / energy
    if not after < before:
        with torch.no_grad():
            for (w, _), w0 in zip(pairs, backup):
                w.copy_(w0)
        return out, before, before
    return new, before, after


def _sq_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).pow(2).sum())


def groups_for(copy_layer: nn.Module, groups: List[Group]) -> List[Group]:
    """The same groups, addressed in a deep copy of ``layer`` (by module name)."""
    mods = dict(copy_layer.named_modules())
    return [[(name, mods[name]) for name, _ in g] for g in groups]
