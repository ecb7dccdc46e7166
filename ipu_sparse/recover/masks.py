"""Sparsity masks held fixed during recovery.

A mask is a dict ``{linear name: bool tensor}`` over the decoder Linears
(``model.linear_layers()``), ``True`` where a weight is kept (the package's one mask
convention, ``ipu_sparse.prune.common``). The mask of a
checkpoint is an explicit mask file named in its metadata (``mask_file``), or
else the exact zeros of its weights.

Holding the mask: gradients of pruned weights are zeroed before each optimizer
step and the weights are re-masked after it (with masked gradients AdamW's
moments stay zero there, so the re-mask is a guard, not a correction).
"""
from __future__ import annotations

from pathlib import Path

import torch

from ..errors import UserError
from ..prune.common import Masks

MASK_FILE = "mask.safetensors"


def masks_from_zeros(model) -> Masks:
    """``weight != 0`` for every decoder Linear."""
    return {name: (mod.weight.detach() != 0).cpu() for name, mod in model.linear_layers()}


def mask_sparsity(masks: Masks) -> float:
    total = sum(m.numel() for m in masks.values())
    kept = sum(int(m.sum()) for m in masks.values())
    return 1.0 - kept / max(total, 1)


def save_masks(masks: Masks, path) -> None:
    from safetensors.torch import save_file

    save_file({k: v.to(torch.uint8).contiguous() for k, v in masks.items()}, str(path))


def load_mask_file(path, model) -> Masks:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        raw = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise UserError(f"{path}: unreadable mask file ({exc})") from None
    masks = {}
    for name, mod in model.linear_layers():
        if name not in raw:
            raise UserError(f"{path}: mask for {name} is missing")
        m = raw[name].bool()
        if tuple(m.shape) != tuple(mod.weight.shape):
            raise UserError(f"{path}: mask {name} has shape {tuple(m.shape)}, weight has {tuple(mod.weight.shape)}")
        masks[name] = m
    return masks


def masks_of_loaded(loaded) -> Masks:
    """The sparsity mask of a loaded checkpoint (``LoadedModel``); ``UserError`` if it has none."""
    meta = loaded.meta or {}
    mask_file = meta.get("mask_file")
    if mask_file:
        path = Path(loaded.source) / mask_file
        if not path.is_file():
            raise UserError(f"{loaded.source}: metadata names mask file {mask_file!r}, which does not exist")
        masks = load_mask_file(path, loaded.model)
    else:
        masks = masks_from_zeros(loaded.model)
    if mask_sparsity(masks) == 0.0:
        raise UserError(f"{loaded.source}: no sparsity mask (no weight of the decoder Linears is zero and no mask "
                        f"file is named in its metadata); prune it first (`ipu-sparse prune`) or pass --gradual")
    return masks


def masks_to(masks: Masks, device) -> Masks:
    return {k: v.to(device) for k, v in masks.items()}


def _masked_modules(model, masks: Masks):
    mods = dict(model.linear_layers())
    for name, m in masks.items():
        if name not in mods:
            raise UserError(f"mask names {name}, which is not a decoder Linear of this model")
        yield mods[name].weight, m


@torch.no_grad()
def apply_masks_(model, masks: Masks) -> None:
    """Zero every pruned weight (in place)."""
    for w, m in _masked_modules(model, masks):
        w.mul_(m.to(device=w.device, dtype=w.dtype))


@torch.no_grad()
def mask_gradients_(model, masks: Masks) -> None:
    """Zero the gradients of pruned weights (in place)."""
    for w, m in _masked_modules(model, masks):
        if w.grad is not None:
            w.grad.mul_(m.to(device=w.device, dtype=w.grad.dtype))


def count_mask_violations(model, masks: Masks) -> int:
    """Number of pruned positions whose weight is not exactly zero."""
    return sum(int(((w.detach() != 0) & ~m.to(w.device)).sum()) for w, m in _masked_modules(model, masks))


def same_architecture(a_cfg, b_cfg) -> bool:
    da, db = a_cfg.to_dict(), b_cfg.to_dict()
    for key in ("name", "assumed", "max_seq_len"):
        da.pop(key, None)
        db.pop(key, None)
    return da == db


def check_teacher_student(teacher, student, teacher_src: str = "teacher", student_src: str = "student") -> None:
    """``UserError`` unless both models have the same architecture (shapes, norms, heads)."""
    if not same_architecture(teacher.config, student.config):
        da, db = teacher.config.to_dict(), student.config.to_dict()
        diff = [k for k in da if k not in ("name", "assumed", "max_seq_len") and da[k] != db.get(k)]
        shown = ", ".join(f"{k}: {da[k]!r} vs {db.get(k)!r}" for k in diff[:4])
        raise UserError(f"{student_src} is not a pruned copy of {teacher_src}: configs differ ({shown})")
