"""Where a recovery run stands: its position (phase, stage, counters), what it has recorded, and the
distillation optimizer's state. ``run_io.py`` saves it with every checkpoint of the run; a resumed run
continues from it bit for bit."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional

STAGES = ("prune", "block", "kd")  # the stages of each phase, in order


@dataclass
class TrainState:
    phase: int = 0
    stage: str = "prune"          # one of STAGES
    block: int = 0                # next decoder block of the block-wise reconstruction
    phase_step: int = 0           # distillation optimizer steps in this phase
    global_step: int = 0          # distillation optimizer steps in all phases
    micro_step: int = 0           # batches drawn so far: the data position
    tokens: int = 0               # end-to-end distillation tokens
    block_tokens: int = 0         # block-wise reconstruction token passes
    elapsed_s: float = 0.0        # training seconds over all sessions, evaluation excluded
    horizons: Dict[int, int] = field(default_factory=dict)  # phase -> schedule horizon (optimizer steps)
    horizon_refit: List[int] = field(default_factory=list)  # phases whose time-fitted horizon was fitted again
    history: List[dict] = field(default_factory=list)       # one record per step, block and evaluation
    snapshots: Dict[str, dict] = field(default_factory=dict)  # str(minutes) -> what the snapshot holds
    finished: bool = False
    optimizer: Optional[dict] = None  # the distillation optimizer's state_dict; None between phases

    def next_phase(self) -> None:
        """Move to the next phase's first stage (a new optimizer)."""
        self.phase += 1
        self.stage, self.block, self.phase_step, self.optimizer = "prune", 0, 0, None
