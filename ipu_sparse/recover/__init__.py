"""Sparse recovery: retrain a pruned model with its mask held fixed, distilling from the dense teacher.

``Recovery(teacher, student, tokenizer, windows, RecoverConfig(...), out, masks=...).run()``;
CLI: ``ipu-sparse recover``. See ``train.py`` for the run, ``step.py`` for one distillation step,
``schedule.py`` for the learning rate, its horizon and the time budget, ``state.py`` and ``run_io.py``
for the training state and the run directory, ``blockwise.py`` for block-wise reconstruction,
``data.py`` for training text (incl. the data-free self-distillation source), ``distributed.py`` for
runs on several processes (torchrun: DistributedDataParallel / FullyShardedDataParallel).
"""
from __future__ import annotations

from .data import SelfDistillConfig, TokenWindows, build_windows, self_distill_ids
from .masks import (apply_masks_, check_teacher_student, count_mask_violations, mask_gradients_, mask_sparsity,
                    masks_from_zeros, masks_of_loaded)
from .schedule import lr_at
from .train import RecoverConfig, Recovery

__all__ = [
    "RecoverConfig", "Recovery", "lr_at", "SelfDistillConfig", "TokenWindows", "build_windows", "self_distill_ids",
    "apply_masks_", "check_teacher_student", "count_mask_violations", "mask_gradients_",
    "mask_sparsity", "masks_from_zeros", "masks_of_loaded",
]
