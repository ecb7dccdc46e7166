"""One optimizer step of end-to-end distillation with the sparsity mask held."""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import torch

from .losses import HiddenCapture, hidden_loss, kd_loss, next_token_nll
from .masks import Masks, apply_masks_, mask_gradients_
from .teacher_cache import TeacherTargets, teacher_targets, topk_kd_loss


def set_trainable_(student, train_embeddings: bool) -> List[torch.nn.Parameter]:
    """Make only the distilled parameters require gradients (the embeddings and LM head too only if
    ``train_embeddings``); returns them, each once (a tied head is the embedding)."""
    params, seen = [], set()
    frozen = set() if train_embeddings else {id(student.embed.weight), id(student.lm_head.weight)}
    for p in student.parameters():
        p.requires_grad_(False)
        if id(p) in seen or id(p) in frozen:
            continue
        seen.add(id(p))
        params.append(p)
    for p in params:
        p.requires_grad_(True)
    return params


def kd_step(student, teacher, optimizer: torch.optim.Optimizer, params: Sequence[torch.nn.Parameter],
            batches: Sequence[torch.Tensor], lr: float, masks: Masks, cfg,
            captures: Optional[Tuple[Optional[HiddenCapture], HiddenCapture]] = None,
            teacher_targets: Optional[Sequence[TeacherTargets]] = None,
            loss_masks: Optional[Sequence[torch.Tensor]] = None, parallel=None) -> Dict[str, float]:
    """One step over ``batches`` (B, L) of token ids, their gradients accumulated.

    The loss of each batch is ``cfg.kd_weight`` x KL to the teacher at ``cfg.temperature`` +
    ``cfg.hidden_weight`` x hidden-state matching (``captures``: the teacher's and the student's,
    needed then) + ``cfg.ce_weight`` x next-token cross-entropy. With ``cfg.teacher_topk`` the KD term
    is the top-k + tail-bucket KL (``teacher_cache.py``), on ``teacher_targets`` (one per batch, read
    from the teacher-output cache: no teacher forward; their block outputs replace the teacher
    capture) or on the live teacher's logits. ``loss_masks`` (B, L) bool per batch: the positions
    the KD term counts. Pruned weights get no gradient and
    are zeroed again after the step (weight decay would move them); gradients are clipped to
    ``cfg.grad_clip`` (0: not), with bf16 autocast if ``cfg.bf16``. Returns the loss and its parts,
    averaged over the batches. ``parallel``: the student wrapped for several processes
    (``distributed.py``); ``batches`` are then this process's share of the step and the gradients are
    averaged over processes before they are masked."""
    n = len(batches)
    for group in optimizer.param_groups:
        group["lr"] = lr
    optimizer.zero_grad(set_to_none=True)
    device = batches[0].device
    amp = torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=cfg.bf16)
    cap_t, cap_s = captures if captures is not None else (None, None)
    parts = {"kd": 0.0, "hidden": 0.0, "ce": 0.0, "loss": 0.0}
    topk = getattr(cfg, "teacher_topk", 0)
    for cap in (cap_t, cap_s):  # drop what an evaluation pass in between may have captured
        if cap is not None:
            cap.pop()
    forward = student if parallel is None else parallel.model
    for b, ids in enumerate(batches):
        if parallel is not None:
            parallel.sync_gradients(b == n - 1)
        mask = loss_masks[b] if loss_masks is not None else None
        if teacher_targets is not None:
            target, t_logits = teacher_targets[b], None
            t_hidden = target.hidden
        else:
            with torch.no_grad(), amp:
                t_logits = teacher(ids)
            t_hidden = cap_t.pop() if cap_t else None
            target = _live_targets(t_logits, topk, cfg.temperature) if topk else None
        with amp:
            s_logits = forward(ids)
        s_hidden = cap_s.pop() if cap_s else None
        loss = torch.zeros((), device=device)
        if cfg.kd_weight:
            if target is not None:
                kd = topk_kd_loss(s_logits, target, cfg.temperature, mask)
            else:
                kd = kd_loss(s_logits, t_logits, cfg.temperature, mask)
            loss = loss + cfg.kd_weight * kd
            parts["kd"] += kd.item() / n
        if cfg.hidden_weight:
            hl = hidden_loss(s_hidden, t_hidden)
            loss = loss + cfg.hidden_weight * hl
            parts["hidden"] += hl.item() / n
        if cfg.ce_weight:
            ce = next_token_nll(s_logits, ids)
            loss = loss + cfg.ce_weight * ce
            parts["ce"] += ce.item() / n
        parts["loss"] += loss.item() / n
        (loss / n).backward()
        del t_logits, s_logits, loss, target
    if parallel is not None and parallel.sharded:
        parallel.step_(optimizer, masks, cfg.grad_clip)
        return parts
    mask_gradients_(student, masks)
    if cfg.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
    optimizer.step()
    apply_masks_(student, masks)
    return parts


def _live_targets(t_logits: torch.Tensor, k: int, temperature: float) -> TeacherTargets:
    """The live teacher's top-k targets, as the teacher-output cache would hold them."""
    return teacher_targets(t_logits, k, temperature)
