"""Block-wise reconstruction: each decoder block's kept weights learn to reproduce the dense block.

For block i the target is the dense teacher's output ``Y_t = block_t(X_t)`` on the teacher's own
input stream; the student block is fed the *student's* stream ``X_s`` (the output of the already
reconstructed sparse blocks < i), so it also learns to correct the error that reaches it, as
BRECQ (Li et al. 2021) and OmniQuant (Shao et al. 2024) do for quantization. The loss is the
mean squared error normalised by the target's variance. Only one block is trained at a time,
with no LM head and no teacher recomputation, so a token costs far less than in end-to-end
distillation. The sparsity mask is held (masked gradients, re-masking after every step).
"""
from __future__ import annotations

import math
from typing import Callable, Dict, List, Optional

import torch
import torch.nn.functional as F

from .masks import Masks


def _run_block(block, x: torch.Tensor, cos, sin, chunk: int) -> torch.Tensor:
    return torch.cat([block(x[i:i + chunk], cos, sin) for i in range(0, x.shape[0], chunk)], dim=0)


def _block_masks(masks: Masks, i: int, block) -> List[tuple]:
    prefix = f"layers.{i}."
    mods = dict(block.named_modules())
    return [(mods[name[len(prefix):]].weight, m) for name, m in masks.items() if name.startswith(prefix)]


def reconstruct_blocks_(teacher, student, masks: Masks, ids: torch.Tensor, epochs: int, batch_size: int,
                        lr: float, seed: int, start_block: int = 0, bf16: bool = False,
                        should_stop: Optional[Callable[[], bool]] = None,
                        on_block_done: Optional[Callable[[int, Dict[str, float]], None]] = None,
                        progress: bool = False) -> int:
    """Reconstruct blocks ``start_block..n_layers-1`` of ``student`` in place; returns the next block to do.

    ``ids`` (N, L) are calibration windows. If ``should_stop()`` turns true mid-block, that block's
    weights are restored to what they were before it started (so a resume redoes it exactly) and
    its index is returned."""
    device = next(student.parameters()).device
    ids = ids.to(device)
    N, L = ids.shape
    cos, sin = teacher.rope(torch.arange(L))  # tables built on the CPU, then moved
    cos, sin = cos.to(device), sin.to(device)
    amp = torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=bf16)
    n_layers = len(student.layers)
    with torch.no_grad():
        x_t = teacher.embed(ids).float()  # (N, L, D)
        x_s = student.embed(ids).float()
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=n_layers, initial=start_block, desc="block reconstruction", unit="block", dynamic_ncols=True)
    try:
        for i in range(n_layers):
            t_block, s_block = teacher.layers[i], student.layers[i]
            with torch.no_grad(), amp:
                y_t = _run_block(t_block, x_t, cos, sin, batch_size).float()  # (N, L, D)
            if i < start_block:
                with torch.no_grad(), amp:
                    x_s = _run_block(s_block, x_s, cos, sin, batch_size).float()
                x_t = y_t
                continue
            backup = {k: v.detach().clone() for k, v in s_block.state_dict().items()}
            pairs = _block_masks(masks, i, s_block)
            params = list(s_block.parameters())
            for p in params:
                p.requires_grad_(True)
            denom = y_t.var().item() + 1e-6
            with torch.no_grad(), amp:
                before = F.mse_loss(_run_block(s_block, x_s, cos, sin, batch_size).float(), y_t).item() / denom
            opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
            per_epoch = math.ceil(N / batch_size)
            total = max(1, epochs * per_epoch)
            step, stopped = 0, False
            for epoch in range(epochs):
                g = torch.Generator().manual_seed((seed * 1_000_003 + i) * 1_000_003 + epoch)
                perm = torch.randperm(N, generator=g).to(device)
                for b in range(per_epoch):
                    idx = perm[b * batch_size:(b + 1) * batch_size]
                    for group in opt.param_groups:  # cosine from lr to lr/10
                        group["lr"] = lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / total)))
                    with amp:
                        out = s_block(x_s[idx], cos, sin)
                    loss = F.mse_loss(out.float(), y_t[idx]) / denom
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    with torch.no_grad():
                        for w, m in pairs:
                            w.grad.mul_(m.to(device=w.device, dtype=w.grad.dtype))
                    opt.step()
                    with torch.no_grad():
                        for w, m in pairs:
                            w.mul_(m.to(device=w.device, dtype=w.dtype))
                    step += 1
                    if should_stop is not None and should_stop():
                        stopped = True
                        break
                if stopped:
                    break
            for p in params:
                p.requires_grad_(False)
                p.grad = None
            if stopped:
                s_block.load_state_dict(backup)
                return i
            with torch.no_grad(), amp:
                x_s = _run_block(s_block, x_s, cos, sin, batch_size).float()
            after = F.mse_loss(x_s, y_t).item() / denom
            x_t = y_t
            if bar is not None:
                bar.update(1)
                bar.set_postfix(err=f"{before:.3g}->{after:.3g}")
            if on_block_done is not None:
                on_block_done(i, {"block": i, "rel_mse_before": before, "rel_mse_after": after, "steps": step,
                                  "tokens": step * batch_size * L})
    finally:
        if bar is not None:
            bar.close()
    return n_layers
