"""The learning-rate schedule of a recovery run and its horizon: fixed by a step or token budget, or
fitted to a time budget from measured step times."""
from __future__ import annotations

import math
import time
from typing import Callable, List, Optional, Sequence, Tuple

from .state import TrainState


def lr_at(step: int, base: float, warmup: int, horizon: Optional[int], min_ratio: float) -> float:
    """Linear warm-up over ``warmup`` steps (at most a fifth of a known horizon), then cosine from ``base``
    to ``min_ratio * base`` at ``horizon``."""
    if horizon is not None:
        warmup = min(warmup, max(1, horizon // 5))
    if step < warmup:
        return base * (step + 1) / warmup
    if horizon is None or horizon <= warmup:
        return base
    frac = min(1.0, (step - warmup) / max(1, horizon - warmup))
    return base * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * frac)))


def fixed_horizons(total_steps: Optional[int], n_phases: int) -> Optional[List[int]]:
    """A step budget split over the phases as evenly as possible (the first phases take the remainder);
    None without one."""
    if total_steps is None:
        return None
    return [total_steps // n_phases + (1 if i < total_steps % n_phases else 0) for i in range(n_phases)]


def fit_horizon(step_times: Sequence[float], phase_step: int, remaining_s: float, phase: int,
                n_phases: int) -> Tuple[int, float]:
    """Steps phase ``phase`` of ``n_phases`` can take in its equal share of the remaining time.

    The share counts the distillation time the phase has already had (``phase_step`` steps), so that
    fitting again later does not hand the current phase a share of the later phases' time. Returns the
    horizon (at least one step more than done) and the time per step it assumed: the median of
    ``step_times`` without the first one listed."""
    rest = sorted(step_times[1:])
    per_step = rest[len(rest) // 2]
    share = (remaining_s + phase_step * per_step) / (n_phases - phase)
    return max(phase_step + 1, int(share / per_step)), per_step


class TimeBudget:
    """Training time of a run against its ``--max-minutes``: it adds up over the sessions of a run
    (``spent_s`` from before a resume) and leaves out the time given to ``exclude`` (evaluation)."""

    def __init__(self, max_minutes: Optional[float], spent_s: float = 0.0):
        self.max_minutes = max_minutes
        self._spent = spent_s
        self._start = time.time()
        self._excluded = 0.0

    def elapsed(self) -> float:
        return self._spent + (time.time() - self._start) - self._excluded

    def exclude(self, seconds: float) -> None:
        self._excluded += seconds

    def exhausted(self) -> bool:
        return self.max_minutes is not None and self.elapsed() >= self.max_minutes * 60

    def remaining_s(self) -> float:
        return self.max_minutes * 60 - self.elapsed()


class PhaseHorizon:
    """The schedule horizon (optimizer steps) of one distillation phase, kept in ``state.horizons``.

    With a step or token budget it is fixed. With only a time budget it is fitted to the phase's share
    of the remaining time after ``FIT_AFTER`` measured steps, and once more after ``REFIT_AFTER`` steps
    of a session, leaving out the first ``REFIT_SKIP``: the first steps are often slower (caches,
    warm-up), and a horizon fitted to them would end the schedule well before the budget."""

    FIT_AFTER, REFIT_AFTER, REFIT_SKIP = 3, 20, 5

    def __init__(self, state: TrainState, phase: int, n_phases: int, fixed: Optional[int], budget: TimeBudget,
                 tokens_per_step: int, log: Callable[[str], None]):
        self.state, self.phase, self.n_phases = state, phase, n_phases
        self.fixed = fixed is not None
        self.budget, self.tokens_per_step, self.log = budget, tokens_per_step, log
        if fixed is not None:
            state.horizons[phase] = fixed
        self.step_times: List[float] = []  # this session's

    @property
    def steps(self) -> Optional[int]:
        return self.state.horizons.get(self.phase)

    def reached(self) -> bool:
        return self.steps is not None and self.state.phase_step >= self.steps

    def observe(self, step_s: float) -> bool:
        """Record the time of the step just taken; True if the horizon changed."""
        self.step_times.append(step_s)
        st = self.state
        if self.steps is None and len(self.step_times) >= self.FIT_AFTER:
            self._fit(self.step_times)
            return True
        if (not self.fixed and len(self.step_times) == self.REFIT_AFTER and self.phase not in st.horizon_refit
                and st.phase_step < self.steps):
            self._fit(self.step_times[self.REFIT_SKIP:])
            st.horizon_refit.append(self.phase)
            return True
        return False

    def _fit(self, step_times: Sequence[float]) -> None:
        horizon, per_step = fit_horizon(step_times, self.state.phase_step, self.budget.remaining_s(), self.phase,
                                        self.n_phases)
        self.state.horizons[self.phase] = horizon
        self.log(f"phase {self.phase}: {per_step:.2f} s/step measured -> schedule horizon {horizon} steps "
                 f"(~{horizon * self.tokens_per_step:,} tokens)")
