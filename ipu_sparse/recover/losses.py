"""Distillation losses.

``kd_loss``: KL(teacher || student) on temperature-softened next-token distributions,
times T^2 so gradients keep their scale across temperatures (Hinton et al. 2015).
``hidden_loss``: SquareHead per-layer feature distillation (Kurtic et al. 2023, "Sparse
Fine-tuning for Inference Acceleration of Large Language Models", eq. 2): each decoder
block's output MSE divided by MSE(teacher output, 0), the teacher's second moment (not its
variance: the residual stream's per-channel offsets count), averaged over the blocks (the
paper sums; the mean keeps ``--hidden-weight`` independent of depth).
"""
from __future__ import annotations

from typing import List, Optional, Sequence

import torch
import torch.nn.functional as F


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0,
            mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Mean over tokens of T^2 * KL(softmax(t/T) || softmax(s/T)); logits (..., V). With ``mask``
    (the logits' leading shape, bool) only the positions where it is True count."""
    V = student_logits.shape[-1]
    s = F.log_softmax(student_logits.float().reshape(-1, V) / temperature, dim=-1)  # (N, V)
    t = F.log_softmax(teacher_logits.float().reshape(-1, V) / temperature, dim=-1)  # (N, V)
    if mask is None:
        kl = F.kl_div(s, t, log_target=True, reduction="sum") / s.shape[0]
    else:
        m = mask.reshape(-1).to(s.dtype)  # (N,)
        kl = (F.kl_div(s, t, log_target=True, reduction="none").sum(-1) * m).sum() / m.sum().clamp_min(1.0)
    return kl * temperature ** 2


def hidden_loss(student_hidden: Sequence[torch.Tensor], teacher_hidden: Sequence[torch.Tensor]) -> torch.Tensor:
    """Mean over layers of MSE(h_s, h_t) / MSE(h_t, 0) (SquareHead's normalised per-block MSE)."""
    losses: List[torch.Tensor] = []
    for hs, ht in zip(student_hidden, teacher_hidden):
        ht = ht.float()
        losses.append(F.mse_loss(hs.float(), ht) / (ht.pow(2).mean() + 1e-6))
    return torch.stack(losses).mean()


def next_token_nll(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Mean next-token negative log-likelihood of ``ids`` (B, L) under ``logits`` (B, L, V)."""
    V = logits.shape[-1]
    return F.cross_entropy(logits[:, :-1].float().reshape(-1, V), ids[:, 1:].reshape(-1))


class HiddenCapture:
    """Collects every decoder block's output during a forward pass (forward hooks)."""

    def __init__(self, model):
        self.outputs: List[torch.Tensor] = []
        self.handles = [layer.register_forward_hook(self._hook) for layer in model.layers]

    def _hook(self, module, inputs, output):
        self.outputs.append(output)

    def pop(self) -> List[torch.Tensor]:
        out, self.outputs = self.outputs, []
        return out

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
