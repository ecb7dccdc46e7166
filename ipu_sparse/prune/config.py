"""``PruneConfig``: every setting of one pruning run, validated once when it is built.

The CLI, the benchmark script and gradual recovery build one and hand it to ``prune_``;
nothing downstream re-validates it. A bad value raises ``UserError`` naming it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Optional, Tuple, Type, Union

from ..errors import UserError
from .common import check_sparsity, parse_nm
from .magnitude import Magnitude, MagnitudeRow
from .solver import PruneSolver
from .sparsegpt import SparseGPT
from .wanda import Wanda

METHODS: Dict[str, Type[PruneSolver]] = {
    "magnitude": Magnitude,        # per matrix
    "magnitude-row": MagnitudeRow,  # per output row
    "wanda": Wanda,
    "sparsegpt": SparseGPT,
}
SEQUENTIAL = ("group", "layer")


@dataclass(frozen=True)
class PruneConfig:
    """``method``: magnitude | magnitude-row | wanda | sparsegpt.  ``sparsity`` in [0, 1), exact over the
    decoder Linears; ``nm="2:4"`` (or ``(2, 4)``) semi-structured instead: keep N of every M inputs,
    sparsity then 1 - N/M.  ``owl``: per-layer ratios (OWL, spread ``owl_lambda``, outliers above
    ``owl_m`` x mean, from the first ``owl_nsamples`` windows; 0/None = all) with the same average.
    ``nsamples`` windows of ``seq_len`` tokens drawn with ``seed`` when calibration comes from a text.
    ``sequential``: "group" (each group's statistics from the already-pruned groups before it) or
    "layer" (all from the dense layer, as the reference drivers); ``batch_size`` windows per forward
    chunk (None = all at once).  ``blocksize``/``percdamp``: SparseGPT's column block and damping.
    ``refit_iters``: masked least-squares refit steps of the kept weights (0 = off);
    ``dense_target``: fit each layer to the dense model's outputs (SparseGPT).
    ``alloc_step`` > 0: per-projection-type sparsity within each block, chosen by a coordinate search over
    ratio offsets of +-``alloc_step`` (attention vs MLP, q/k vs v/o, gate/up vs down; each block keeps its
    exact weight budget) that keeps the candidate with the least block-output error, the candidates pruned
    on ``alloc_nsamples`` windows and scored on the next ``alloc_nsamples`` (see ``driver.search_allocation``).
    ``recon_steps`` > 0: joint reconstruction of each pruned layer: that many Adam steps (``recon_lr``,
    ``recon_batch`` windows each) on the kept weights of all its Linears together, masks held, towards the
    dense layer's outputs; kept only if the layer's output error on the whole batch went down.

    After construction ``sparsity`` is the resolved float and ``prune_n, prune_m`` the pattern
    (0, 0 when unstructured). Frozen: a built config stays valid (``dataclasses.replace`` re-validates)."""

    method: str = "sparsegpt"
    sparsity: Optional[float] = None
    nm: Union[None, str, Tuple[int, int]] = None
    owl: bool = False
    owl_lambda: float = 0.08
    owl_m: float = 5.0
    owl_nsamples: Optional[int] = 32
    nsamples: int = 128
    seq_len: int = 512
    seed: int = 0
    sequential: str = "group"
    batch_size: Optional[int] = None
    blocksize: int = 128
    percdamp: float = 0.01
    refit_iters: int = 0
    dense_target: bool = False
    alloc_step: float = 0.0
    alloc_nsamples: int = 8
    recon_steps: int = 0
    recon_lr: float = 2e-4
    recon_batch: int = 4
    prune_n: int = field(default=0, init=False)
    prune_m: int = field(default=0, init=False)

    def __post_init__(self):
        set_ = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731 (frozen dataclass)
        if self.method not in METHODS:
            raise UserError(f"unknown pruning method {self.method!r} (choose from {', '.join(METHODS)})")
        if self.nm is not None:
            n, m = parse_nm(self.nm)
            set_("prune_n", n)
            set_("prune_m", m)
            implied = 1.0 - n / m
            if self.sparsity is not None and abs(float(self.sparsity) - implied) > 1e-9:
                raise UserError(f"sparsity {self.sparsity} contradicts the N:M pattern {self.prune_n}:{self.prune_m} "
                                f"(implies {implied})")
            if self.owl:
                raise UserError("OWL layer ratios apply to unstructured sparsity, not to an N:M pattern")
            set_("sparsity", implied)
        if self.sparsity is None:
            raise UserError("give a sparsity (0 <= s < 1) or an N:M pattern")
        set_("sparsity", check_sparsity(self.sparsity))
        if _number("owl_lambda", self.owl_lambda) < 0:
            raise UserError(f"OWL lambda {self.owl_lambda} must be >= 0")
        if not _number("owl_m", self.owl_m) > 0:
            raise UserError(f"OWL outlier threshold owl_m={self.owl_m} must be > 0")
        _at_least("owl_nsamples", self.owl_nsamples, 0, optional=True)
        _at_least("nsamples", self.nsamples, 1)
        _at_least("seq_len", self.seq_len, 2)
        if self.sequential not in SEQUENTIAL:
            raise UserError(f"sequential={self.sequential!r}: expected 'group' or 'layer'")
        _at_least("batch_size", self.batch_size, 1, optional=True)
        _at_least("blocksize", self.blocksize, 1)
        if not _number("percdamp", self.percdamp) >= 0:
            raise UserError(f"percdamp {self.percdamp} must be >= 0")
        _at_least("refit_iters", self.refit_iters, 0)
        if not 0.0 <= _number("alloc_step", self.alloc_step) <= 0.5:
            raise UserError(f"alloc_step={self.alloc_step}: expected a sparsity offset in [0, 0.5] (0 = off)")
        _at_least("alloc_nsamples", self.alloc_nsamples, 1)
        if self.alloc_step and self.prune_m:
            raise UserError("the per-projection sparsity search applies to unstructured sparsity, not to an N:M pattern")
        _at_least("recon_steps", self.recon_steps, 0)
        if not 0.0 < _number("recon_lr", self.recon_lr) < 1.0:
            raise UserError(f"recon_lr={self.recon_lr}: expected a learning rate in (0, 1)")
        _at_least("recon_batch", self.recon_batch, 1)
        if self.dense_target and self.method != "sparsegpt":
            raise UserError("the dense-target correction is implemented for sparsegpt only")
        if self.dense_target and self.sequential != "group":
            raise UserError("the dense-target correction needs sequential='group' "
                            "(the whole calibration batch in one pass)")

    @property
    def solver(self) -> Type[PruneSolver]:
        return METHODS[self.method]

    @property
    def needs_calibration(self) -> bool:
        """Whether any calibration data is used (magnitude without OWL or refit: none)."""
        return (self.solver.needs_stats or self.owl or self.refit_iters > 0 or self.alloc_step > 0
                or self.recon_steps > 0)


def _number(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise UserError(f"{name}={value!r}: expected a number")
    return float(value)


def _at_least(name: str, value, low: int, optional: bool = False) -> None:
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise UserError(f"{name}={value!r}: expected an integer >= {low}")
