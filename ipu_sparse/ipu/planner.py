"""On-chip memory planner: which IPU holds which part of a (sparse) model, and does it fit.

Pure Python over ``ModelConfig`` (no poptorch); unit sizes come from ``memory.py``. The model is cut into *units* in
execution order -- embedding shards, decoder layers, LM-head shards (the final norm rides with
the first head shard) -- and every IPU receives a contiguous run of units, so the PopTorch
``BeginBlock`` sequence (``pipeline.parallelize_``) and the CPU simulation
(``simulate.run_stages``) follow the same boundaries.

Memory per IPU = weights (non-zero values + column indices + row pointers + PopSparse work
lists for sparse matrices, or dense bytes) + static KV cache + peak activations + stage
buffers + a stated reserve (code, exchange buffers, stacks; see ``hardware.py``).

Placement of large vocabularies (stated choice): an embedding (or untied LM head) larger than
half an IPU's usable memory is split along the vocabulary into ``embed_shards`` /
``head_shards`` slices, each a unit of its own placed on consecutive IPUs. A sharded embedding
sums masked look-ups (exact); a sharded head concatenates its logit slices (exact). A tied head
shares the embedding's weights and is pinned to the embedding's IPU(s).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple, Union

from ..config import ModelConfig
from ..errors import UserError
from . import hardware as hw
from .memory import STORAGE_FORMULA, VALUE_BYTES, Unit, build_units

FORMATS = ("csr16", "dense")


class PlanError(UserError):
    """The model does not fit; the message names the IPU, the bytes over and what would fit."""

    def __init__(self, message: str, plan: "Plan"):
        super().__init__(message)
        self.plan = plan


# ----- inputs --------------------------------------------------------------------------------

@dataclass
class PlanConfig:
    model: ModelConfig
    n_ipus: int = 16
    sparsity: Union[float, Sequence[float]] = 0.8   # uniform, or one value per decoder layer
    fmt: str = "csr16"                               # "csr16" (sparse) or "dense"
    dtype: str = "fp16"
    ipu_type: str = "gc200"
    batch: int = 1
    seq_len: int = 128           # tokens per forward call (prefill chunk); decode uses 1
    kv_len: Optional[int] = None  # static KV cache length; default model.max_seq_len
    last_only: bool = True        # generation: logits of the last position only
    layers_per_ipu: Optional[Sequence[int]] = None  # optimum-graphcore style, -1 = wildcard
    matmul_proportion: Union[None, float, Sequence[float]] = None  # None = derived per IPU
    sparse_head: bool = False     # prune the LM head too (untied heads only)
    embed_shards: Optional[int] = None
    head_shards: Optional[int] = None
    reserve_fraction: float = hw.RESERVE_FRACTION

    def __post_init__(self):
        self.validate()

    # -- validation (every message names the bad value) --
    def validate(self) -> None:
        cfg = self.model
        if not isinstance(self.n_ipus, int) or isinstance(self.n_ipus, bool) or not 1 <= self.n_ipus <= 64:
            raise UserError(f"--ipus must be an integer from 1 to 64, got {self.n_ipus!r}")
        if self.fmt not in FORMATS:
            raise UserError(f"unknown storage format {self.fmt!r}; known: {', '.join(FORMATS)}")
        if self.dtype not in VALUE_BYTES:
            raise UserError(f"unknown dtype {self.dtype!r}; known: {', '.join(VALUE_BYTES)}")
        hw.get_ipu_type(self.ipu_type)
        for key in ("batch", "seq_len"):
            v = getattr(self, key)
            if not isinstance(v, int) or v <= 0:
                raise UserError(f"--{key.replace('_', '-')} must be a positive integer, got {v!r}")
        if self.kv_len is None:
            self.kv_len = cfg.max_seq_len
        if not isinstance(self.kv_len, int) or self.kv_len <= 0:
            raise UserError(f"--kv-len must be a positive integer, got {self.kv_len!r}")
        if self.kv_len < self.seq_len:
            raise UserError(f"--kv-len {self.kv_len} is shorter than --seq-len {self.seq_len}")
        self.layer_sparsity()  # validates sparsity
        if not 0.0 <= self.reserve_fraction < 1.0:
            raise UserError(f"--reserve must be in [0, 1), got {self.reserve_fraction!r}")
        if self.sparse_head and cfg.tie_embeddings:
            raise UserError("--sparse-head needs an untied LM head; this model ties it to the embedding")
        for key in ("embed_shards", "head_shards"):
            v = getattr(self, key)
            if v is not None and (not isinstance(v, int) or v <= 0 or v > cfg.vocab_size):
                raise UserError(f"--{key.replace('_', '-')} must be a positive integer <= vocab {cfg.vocab_size}, got {v!r}")
        if self.layers_per_ipu is not None:
            expand_layers_per_ipu(self.layers_per_ipu, cfg.n_layers, self.n_ipus)
        if self.matmul_proportion is not None:
            amps = self.matmul_proportion
            amps = [amps] * self.n_ipus if isinstance(amps, (int, float)) else list(amps)
            if len(amps) != self.n_ipus:
                raise UserError(f"--matmul-proportion has {len(amps)} values for {self.n_ipus} IPUs (give 1 or {self.n_ipus})")
            for i, a in enumerate(amps):
                if not isinstance(a, (int, float)) or not 0.0 < a <= 1.0:
                    raise UserError(f"--matmul-proportion for IPU{i} must be in (0, 1], got {a!r}")

    def layer_sparsity(self) -> List[float]:
        n = self.model.n_layers
        if isinstance(self.sparsity, (int, float)) and not isinstance(self.sparsity, bool):
            values = [float(self.sparsity)] * n
        else:
            values = [float(s) for s in self.sparsity]
            if len(values) != n:
                raise UserError(f"per-layer sparsity has {len(values)} values for {n} layers")
        for i, s in enumerate(values):
            if not 0.0 <= s < 1.0:
                raise UserError(f"sparsity of layer {i} must be in [0, 1), got {s!r}")
        return values


def expand_layers_per_ipu(layers_per_ipu: Sequence[int], n_layers: int, n_ipus: int) -> List[int]:
    """optimum-graphcore semantics: one entry per IPU; ``-1`` entries share the layers the
    explicit entries leave, evenly (earlier wildcard IPUs take one extra when uneven)."""
    lst = list(layers_per_ipu)
    if len(lst) != n_ipus:
        raise UserError(f"layers_per_ipu has {len(lst)} entries for {n_ipus} IPUs: {lst}")
    for i, v in enumerate(lst):
        if not isinstance(v, int) or isinstance(v, bool) or v < -1:
            raise UserError(f"layers_per_ipu[{i}] = {v!r}: entries must be integers >= 0, or -1 (wildcard)")
    fixed = sum(v for v in lst if v >= 0)
    wild = [i for i, v in enumerate(lst) if v == -1]
    if fixed > n_layers:
        raise UserError(f"layers_per_ipu {lst} places {fixed} layers but the model has {n_layers}")
    if not wild:
        if fixed != n_layers:
            raise UserError(f"layers_per_ipu {lst} places {fixed} layers but the model has {n_layers} "
                            "(use -1 for IPUs that should share the rest)")
        return lst
    rest = n_layers - fixed
    per, extra = divmod(rest, len(wild))
    for j, i in enumerate(wild):
        lst[i] = per + (1 if j < extra else 0)
    return lst


# ----- placement -----------------------------------------------------------------------------

def _balanced_partition(weights: List[int], k: int) -> List[int]:
    """Split a sequence into k contiguous non-empty groups: first minimise the largest group sum
    (what decides whether the model fits; the classic linear-partition DP), then, among splits
    that achieve it, minimise the sum of squared group sums (spreads the rest evenly).
    Returns the group index per item."""
    n = len(weights)
    if n == 0:
        return []
    prefix = [0]
    for w in weights:
        prefix.append(prefix[-1] + w)
    INF = float("inf")

    def solve(cost_of, combine, cap):
        best = [[INF] * (n + 1) for _ in range(k + 1)]
        cut = [[0] * (n + 1) for _ in range(k + 1)]
        best[0][0] = 0
        for j in range(1, k + 1):
            for i in range(j, n - (k - j) + 1):
                for p in range(j - 1, i):
                    load = prefix[i] - prefix[p]
                    if load > cap or best[j - 1][p] == INF:
                        continue
                    c = combine(best[j - 1][p], cost_of(load))
                    if c < best[j][i]:
                        best[j][i], cut[j][i] = c, p
        return best[k][n], cut

    minimax, _ = solve(lambda load: load, max, INF)
    _, cut = solve(lambda load: load * load, lambda a, b: a + b, minimax)
    groups = [0] * n
    i = n
    for j in range(k, 0, -1):
        p = cut[j][i]
        for t in range(p, i):
            groups[t] = j - 1
        i = p
    return groups


def place_units(pc: PlanConfig, units: List[Unit]) -> Dict[str, int]:
    """IPU index for every unit (contiguous runs in execution order)."""
    n = pc.n_ipus
    free = [u for u in units if u.pinned_to is None]
    placement: Dict[str, int] = {}
    if pc.layers_per_ipu is not None:
        counts = expand_layers_per_ipu(pc.layers_per_ipu, pc.model.n_layers, n)
        layer_ipus = [ipu for ipu, c in enumerate(counts) for _ in range(c)]
        embeds = [u for u in free if u.kind == "embed"]
        heads = [u for u in free if u.kind == "head"]
        for s, u in enumerate(embeds):   # embedding slices on the first IPUs
            placement[u.name] = min(s, n - 1)
        for s, u in enumerate(heads):    # untied head slices on the last IPUs
            placement[u.name] = max(0, n - len(heads) + s)
        for i, ipu in enumerate(layer_ipus):
            placement[f"layers.{i}"] = ipu
    else:
        if len(free) < n:
            raise UserError(
                f"{pc.model.name} has {len(free)} placeable units ({', '.join(u.name for u in free)}) "
                f"but {n} IPUs were requested; use at most {len(free)} IPUs")
        # activations are freed between units (max, not sum): balance the additive bytes
        groups = _balanced_partition([u.weight_bytes + u.kv_bytes for u in free], n)
        for u, g in zip(free, groups):
            placement[u.name] = g
    for u in units:
        if u.pinned_to is not None:
            placement[u.name] = placement[u.pinned_to]
    return placement


# ----- the plan ------------------------------------------------------------------------------

@dataclass
class IpuAlloc:
    ipu: int
    units: List[str]
    layers: List[int]
    weights: Dict[str, int]
    kv_bytes: int
    act_bytes: int
    stage_buffer_bytes: int
    reserve_bytes: int
    capacity: int
    matmul_proportion: float = 0.0
    nnz: int = 0

    @property
    def weight_bytes(self) -> int:
        return sum(self.weights.values())

    @property
    def total(self) -> int:
        return self.weight_bytes + self.kv_bytes + self.act_bytes + self.stage_buffer_bytes + self.reserve_bytes

    @property
    def free(self) -> int:
        return self.capacity - self.total

    @property
    def fits(self) -> bool:
        return self.free >= 0


@dataclass
class Plan:
    config: PlanConfig
    units: List[Unit]
    placement: Dict[str, int]
    ipus: List[IpuAlloc]
    notes: List[str] = field(default_factory=list)

    @property
    def fits(self) -> bool:
        return all(a.fits for a in self.ipus)

    @property
    def layers_per_ipu(self) -> List[int]:
        return [len(a.layers) for a in self.ipus]

    @property
    def model_bytes(self) -> int:
        """Weights only (what 'memory relative to dense' compares)."""
        return sum(u.weight_bytes for u in self.units)

    @property
    def total_bytes(self) -> int:
        return sum(a.total for a in self.ipus)

    @property
    def capacity_bytes(self) -> int:
        return sum(a.capacity for a in self.ipus)

    @property
    def stages(self) -> List[Tuple[int, List[str]]]:
        """(ipu, [unit names]) in execution order; a new stage starts whenever the IPU changes.
        These are exactly the BeginBlock boundaries of ``pipeline.parallelize_``."""
        out: List[Tuple[int, List[str]]] = []
        for u in self.units:
            ipu = self.placement[u.name]
            if out and out[-1][0] == ipu:
                out[-1][1].append(u.name)
            else:
                out.append((ipu, [u.name]))
        return out

    def overflow(self) -> List[IpuAlloc]:
        return [a for a in self.ipus if not a.fits]

    def to_dict(self) -> dict:
        pc = self.config
        return {
            "model": pc.model.name, "model_assumed_fields": dict(pc.model.assumed),
            "n_ipus": pc.n_ipus, "ipu_type": pc.ipu_type, "format": pc.fmt, "dtype": pc.dtype,
            "sparsity": pc.sparsity if isinstance(pc.sparsity, (int, float)) else list(pc.sparsity),
            "sparse_head": pc.sparse_head, "batch": pc.batch, "seq_len": pc.seq_len, "kv_len": pc.kv_len,
            "reserve_fraction": pc.reserve_fraction, "storage_formula": STORAGE_FORMULA,
            "fits": self.fits, "model_weight_bytes": self.model_bytes, "planned_total_bytes": self.total_bytes,
            "capacity_bytes": self.capacity_bytes, "layers_per_ipu": self.layers_per_ipu,
            "matmul_proportion": [a.matmul_proportion for a in self.ipus],
            "stages": [{"ipu": ipu, "units": names} for ipu, names in self.stages],
            "ipus": [dict(asdict(a), weight_bytes=a.weight_bytes, total=a.total, free=a.free, fits=a.fits)
                     for a in self.ipus],
            "units": [dict(asdict(u), weight_bytes=u.weight_bytes, ipu=self.placement[u.name]) for u in self.units],
            "notes": list(self.notes),
            "constants": hw.constants_table(),
        }


def make_plan(pc: PlanConfig) -> Plan:
    """Place the model and account every IPU's memory. Never raises for "does not fit"; see
    ``check_fits`` / ``plan_or_raise``."""
    ipu = hw.get_ipu_type(pc.ipu_type)
    units = build_units(pc)
    placement = place_units(pc, units)
    cfg, vb = pc.model, VALUE_BYTES[pc.dtype]
    stage_buf = 2 * pc.batch * pc.seq_len * cfg.d_model * vb   # receive + send of the hidden state
    allocs = []
    for i in range(pc.n_ipus):
        mine = [u for u in units if placement[u.name] == i]
        weights: Dict[str, int] = {}
        for u in mine:
            for key, v in u.weights.items():
                weights[key] = weights.get(key, 0) + v
        allocs.append(IpuAlloc(
            ipu=i, units=[u.name for u in mine],
            layers=[int(u.name.split(".")[1]) for u in mine if u.kind == "layer"],
            weights=weights, kv_bytes=sum(u.kv_bytes for u in mine),
            act_bytes=max([u.act_bytes for u in mine] or [0]),
            stage_buffer_bytes=stage_buf if mine else 0,
            reserve_bytes=int(ipu.sram_bytes * pc.reserve_fraction), capacity=ipu.sram_bytes,
            nnz=sum(u.nnz for u in mine)))
    plan = Plan(pc, units, placement, allocs)
    _set_matmul_proportions(plan)
    n_emb = sum(1 for u in units if u.kind == "embed")
    if n_emb > 1:
        ipus = sorted({placement[u.name] for u in units if u.kind == "embed"})
        plan.notes.append(f"embedding ({cfg.vocab_size}x{cfg.d_model}, {fmt_bytes(cfg.vocab_size * cfg.d_model * vb)}) "
                          f"vocabulary-sharded into {n_emb} slices on IPU{', IPU'.join(map(str, ipus))}")
    heads = [u for u in units if u.kind == "head" and u.pinned_to is None]
    if len(heads) > 1:
        ipus = sorted({placement[u.name] for u in heads})
        plan.notes.append(f"LM head vocabulary-sharded into {len(heads)} slices on IPU{', IPU'.join(map(str, ipus))}"
                          + (" (sparse)" if pc.sparse_head else " (dense)"))
    if cfg.tie_embeddings:
        plan.notes.append("LM head tied to the embedding: placed on the embedding's IPU, no extra weight bytes")
    return plan


def _set_matmul_proportions(plan: Plan) -> None:
    """Per-IPU available memory proportion for matmul temporaries: user values, or the free
    fraction of the IPU rounded down to 0.01 and clamped to [0.05, 0.6]."""
    pc = plan.config
    user = pc.matmul_proportion
    tight: List[int] = []
    for a in plan.ipus:
        if user is None:
            frac = max(a.free, 0) / a.capacity
            a.matmul_proportion = round(min(0.6, max(0.05, math.floor(frac * 100) / 100)), 2)
            if a.fits and frac < 0.05:
                tight.append(a.ipu)
        else:
            a.matmul_proportion = float(user if isinstance(user, (int, float)) else user[a.ipu])
            if a.matmul_proportion * a.capacity > max(a.free, 0):
                plan.notes.append(f"IPU{a.ipu}: matmul_proportion {a.matmul_proportion} exceeds the free "
                                  f"{max(a.free, 0) / a.capacity:.2f} of the IPU; the compiler may run out of memory")
    if tight:
        plan.notes.append(f"IPU{', IPU'.join(map(str, tight))}: under 5 % free; matmul temporaries get the 0.05 "
                          "floor, more than is free (the first thing to check in the PopVision memory report)")


def fmt_bytes(n: float) -> str:
    return f"{n / hw.MB:,.1f} MB" if abs(n) < hw.GB else f"{n / hw.GB:,.2f} GB"


def _fits_with(pc: PlanConfig, **changes) -> bool:
    d = {k: getattr(pc, k) for k in pc.__dataclass_fields__}
    d.update(changes)
    try:
        return make_plan(PlanConfig(**d)).fits
    except UserError:
        return False


def suggestions(plan: Plan) -> List[str]:
    """What would fit: more IPUs, higher sparsity, a smaller context (searched, not guessed)."""
    pc = plan.config
    out = []
    for n in (2, 4, 8, 16, 32, 64):
        if n > pc.n_ipus and _fits_with(pc, n_ipus=n, layers_per_ipu=None, matmul_proportion=None):
            out.append(f"--ipus {n}")
            break
    if pc.fmt == "dense":
        if _fits_with(pc, fmt="csr16", sparsity=0.8):
            out.append("--format csr16 --sparsity 0.8")
        return out  # a smaller context does not rescue dense weights that alone overflow
    else:
        cur = max(pc.layer_sparsity())
        for s in (0.5, 0.6, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95):
            if s > cur and _fits_with(pc, sparsity=s):
                out.append(f"--sparsity {s}")
                break
    if pc.fmt != "dense" and not pc.sparse_head and not pc.model.tie_embeddings and _fits_with(pc, sparse_head=True):
        out.append("--sparse-head")
    lo, hi = 0, pc.kv_len // 64
    while lo < hi:  # largest kv_len (a multiple of 64) that fits, by bisection
        mid = (lo + hi + 1) // 2
        if mid * 64 >= pc.seq_len and _fits_with(pc, kv_len=mid * 64):
            lo = mid
        else:
            hi = mid - 1
    if lo * 64 >= pc.seq_len and lo > 0:
        out.append(f"--kv-len {lo * 64}")
    if pc.layers_per_ipu is not None and _fits_with(pc, layers_per_ipu=None):
        out.append("automatic layers_per_ipu (omit --layers-per-ipu)")
    return out


def check_fits(plan: Plan) -> None:
    """Raise PlanError naming the first IPU that overflows, by how much, and what would fit."""
    over = plan.overflow()
    if not over:
        return
    pc = plan.config
    ipu_sram = over[0].capacity
    for u in plan.units:  # a single unit larger than a whole IPU: more IPUs cannot help
        if u.total_bytes > ipu_sram * (1 - pc.reserve_fraction):
            raise PlanError(
                f"{u.name} alone needs {fmt_bytes(u.total_bytes)} but one {pc.ipu_type} IPU has "
                f"{fmt_bytes(ipu_sram * (1 - pc.reserve_fraction))} after the reserve; it cannot be placed on any IPU "
                f"(try: {', '.join(suggestions(plan)) or 'a higher sparsity or a smaller context'})", plan)
    a = over[0]
    others = ", ".join(f"IPU{b.ipu} (+{fmt_bytes(-b.free)})" for b in over[1:4])
    msg = (f"{pc.model.name} ({pc.fmt}, sparsity {pc.sparsity if isinstance(pc.sparsity, (int, float)) else 'per-layer'}) "
           f"does not fit {pc.n_ipus} x {pc.ipu_type}: IPU{a.ipu} ({', '.join(a.units) or 'empty'}) needs "
           f"{fmt_bytes(a.total)} of {fmt_bytes(a.capacity)}, {fmt_bytes(-a.free)} over")
    if others:
        msg += f"; also {others}" + (" ..." if len(over) > 4 else "")
    msg += f"; whole model {fmt_bytes(plan.total_bytes)} planned vs {fmt_bytes(plan.capacity_bytes)} on chip"
    sug = suggestions(plan)
    msg += f". Would fit: {' or '.join(sug)}" if sug else ". Nothing tried fits (more IPUs, sparsity <= 0.95, smaller context)"
    raise PlanError(msg, plan)


def plan_or_raise(pc: PlanConfig) -> Plan:
    plan = make_plan(pc)
    check_fits(plan)
    return plan
