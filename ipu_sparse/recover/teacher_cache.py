"""Teacher-output cache: the dense teacher's outputs on a fixed training text, computed once.

End-to-end distillation runs the frozen teacher forward on every batch; for a fixed set of
training windows its outputs never change, so they can be computed once and read back. The
cache stores, for every training window and position:

- the teacher's top-k logits (values fp16, vocabulary indices int32), k = ``--teacher-topk``;
- the log-sum-exp of its logits over the whole vocabulary at the KD temperature (fp32), so that
  the teacher's probabilities of its top-k tokens, and hence the mass of all other tokens, are
  exact;
- optionally every decoder block's output (fp16) for SquareHead feature distillation.

With top-k targets the KD loss is the KL divergence between the teacher's and the student's
distributions over k + 1 outcomes: the teacher's k most likely tokens and one *tail bucket*
holding all the others (``topk_kd_loss``). Merging outcomes can only lower a KL divergence, so
this is a lower bound of the full KL, equal to it when the student spreads its tail mass over
the tail tokens as the teacher does; gradients reach every student logit (through the tail
bucket's log-sum-exp). docs/recovery.md gives the measured gap to the full KL on SmolLM2.

Files, in ``ROOT/teacher-<key>/`` where key hashes the teacher's and the windows' fingerprints
and every setting that changes the outputs: ``meta.json`` (shapes, dtypes, settings),
``topk_values.f16`` (N, L, k), ``topk_indices.i32`` (N, L, k), ``lse.f32`` (N, L) and with hidden
states ``hidden.f16`` (N, n_layers, L, D), raw little-endian arrays read memory-mapped. The
directory is filled in a temporary directory renamed into place when complete; reading checks
every file's size against the shapes in ``meta.json`` (a truncated or foreign file is one
``UserError`` naming it).
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import UserError
from ..fileio import atomic_directory, read_json_object
from .data import TokenWindows, model_fingerprint, windows_fingerprint
from .losses import HiddenCapture

CACHE_VERSION = 1
META_FILE = "meta.json"
# name -> (numpy dtype, shape key in meta["shapes"])
ARRAYS = {
    "topk_values.f16": ("<f2", "topk"),
    "topk_indices.i32": ("<i4", "topk"),
    "lse.f32": ("<f4", "lse"),
    "hidden.f16": ("<f2", "hidden"),
}


@dataclass
class TeacherTargets:
    """The teacher's outputs for one batch: top-k logits ``values`` (B, L, k) fp32 (fp16-rounded),
    their vocabulary ``indices`` (B, L, k) int64, ``lse`` (B, L) = logsumexp(logits / T) over the
    whole vocabulary, and optionally every block's output ``hidden`` (one (B, L, D) per layer)."""

    values: torch.Tensor
    indices: torch.Tensor
    lse: torch.Tensor
    hidden: Optional[List[torch.Tensor]] = None


def teacher_targets(logits: torch.Tensor, k: int, temperature: float,
                    hidden: Optional[Sequence[torch.Tensor]] = None) -> TeacherTargets:
    """Top-k targets of teacher ``logits`` (B, L, V), rounded as the cache stores them (values and
    hidden states fp16), so that live and cached targets give the same loss."""
    logits = logits.float()
    values, indices = logits.topk(min(k, logits.shape[-1]), dim=-1)  # (B, L, k)
    values = values.half().float()
    # the normaliser of the logits as stored (top-k rounded to fp16), so that the teacher's top-k
    # probabilities and its tail mass add up to 1 exactly
    lse = torch.logsumexp(logits.scatter(-1, indices, values) / temperature, dim=-1)  # (B, L)
    hid = None if hidden is None else [h.detach().half().float() for h in hidden]
    return TeacherTargets(values, indices, lse, hid)


def topk_kd_loss(student_logits: torch.Tensor, targets: TeacherTargets, temperature: float = 1.0,
                 mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """T^2 x KL(teacher || student) over the teacher's top-k tokens plus one tail bucket (all other
    tokens), averaged over positions (those where ``mask`` (B, L) is True, if given)."""
    s = student_logits.float() / temperature  # (B, L, V)
    s_lse = torch.logsumexp(s, dim=-1, keepdim=True)  # (B, L, 1)
    s_top = s.gather(-1, targets.indices) - s_lse  # (B, L, k) student log-probs of the teacher's top-k
    # student log-mass of every token outside the teacher's top-k (exact, no 1 - sum cancellation); the
    # top-k are pushed to -1e30, not -inf, and the result floored at -80 (mass 2e-35), so that an empty
    # tail (k = V) gives a finite value and gradient, times a teacher tail mass of ~0
    s_tail = (torch.logsumexp(s.scatter(-1, targets.indices, -1e30), dim=-1) - s_lse[..., 0]).clamp_min(-80.0)
    t_top = targets.values / temperature - targets.lse.unsqueeze(-1)  # (B, L, k) teacher log-probs
    p_top = t_top.exp()
    p_tail = (1.0 - p_top.sum(-1)).clamp_min(0.0)  # fp16 rounding can push the sum a hair above 1
    kl = (p_top * (t_top - s_top)).sum(-1) + torch.xlogy(p_tail, p_tail) - p_tail * s_tail  # (B, L)
    return _masked_mean(kl, mask) * temperature ** 2


def _masked_mean(per_token: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
    if mask is None:
        return per_token.mean()
    m = mask.to(per_token.dtype)
    return (per_token * m).sum() / m.sum().clamp_min(1.0)


# ----- the cache on disk ---------------------------------------------------------------------------

def cache_settings(topk: int, temperature: float, bf16: bool, hidden: bool) -> Dict[str, object]:
    """Every setting that changes the cached outputs (with the teacher and the windows)."""
    return {"topk": int(topk), "temperature": float(temperature), "bf16": bool(bf16), "hidden": bool(hidden)}


def cache_key(teacher_fp: str, windows_fp: str, settings: Dict[str, object]) -> str:
    d = {"version": CACHE_VERSION, "teacher": teacher_fp, "windows": windows_fp, "settings": settings}
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


class TeacherCache:
    """A filled cache directory, memory-mapped; ``targets(rows)`` gives the outputs of those training windows."""

    def __init__(self, directory: Path, meta: dict, arrays: Dict[str, np.memmap]):
        self.directory, self.meta, self.arrays = directory, meta, arrays

    @property
    def has_hidden(self) -> bool:
        return "hidden.f16" in self.arrays

    @property
    def n_windows(self) -> int:
        return int(self.meta["shapes"]["lse"][0])

    @classmethod
    def open(cls, directory, expect: Optional[dict] = None) -> "TeacherCache":
        """Open and validate ``directory``; ``expect`` (key, shapes, settings) must match its meta."""
        directory = Path(directory)
        meta_path = directory / META_FILE
        if not meta_path.is_file():
            raise UserError(f"{meta_path}: missing (not a complete teacher-output cache)")
        meta = read_json_object(meta_path, "teacher-output cache metadata")
        try:
            if meta.get("version") != CACHE_VERSION:
                raise ValueError(f"version {meta.get('version')!r}, expected {CACHE_VERSION}")
            shapes = {k: tuple(int(x) for x in v) for k, v in meta["shapes"].items()}
            files = list(meta["files"])
        except (KeyError, TypeError, ValueError) as exc:
            raise UserError(f"{meta_path}: malformed teacher-output cache metadata ({exc})") from None
        for key, want in (expect or {}).items():
            have = shapes if key == "shapes" else meta.get(key)
            if have != want:
                raise UserError(f"{meta_path}: cache made for {key} {have!r}, expected {want!r}")
        arrays = {}
        for name in files:
            if name not in ARRAYS:
                raise UserError(f"{meta_path}: unknown cache file {name!r}")
            dtype, shape_key = ARRAYS[name]
            shape = shapes[shape_key]
            path = directory / name
            want_bytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
            size = path.stat().st_size if path.is_file() else -1
            if size != want_bytes:
                what = "missing" if size < 0 else f"{size} bytes, expected {want_bytes} for {dtype} {shape}"
                raise UserError(f"{path}: truncated or wrong teacher-output cache file ({what})")
            arrays[name] = np.memmap(str(path), dtype=dtype, mode="r", shape=shape)
        for name in ("topk_values.f16", "topk_indices.i32", "lse.f32"):
            if name not in arrays:
                raise UserError(f"{meta_path}: cache lists no {name}")
        return cls(directory, meta, arrays)

    def targets(self, rows: Sequence[int], device=None) -> TeacherTargets:
        """The cached outputs of training windows ``rows`` (a batch), as tensors on ``device``."""
        idx = np.asarray(list(rows), dtype=np.int64)

        def get(name, dtype):
            return torch.from_numpy(np.ascontiguousarray(self.arrays[name][idx])).to(device=device, dtype=dtype)

        hidden = None
        if self.has_hidden:
            h = get("hidden.f16", torch.float32)  # (B, n_layers, L, D)
            hidden = list(h.unbind(1))
        return TeacherTargets(get("topk_values.f16", torch.float32), get("topk_indices.i32", torch.long),
                              get("lse.f32", torch.float32), hidden)


def prepare_teacher_cache(root, teacher, windows: TokenWindows, topk: int, temperature: float, bf16: bool = False,
                          hidden: bool = False, batch_size: int = 4, progress: bool = False,
                          log=None) -> TeacherCache:
    """The teacher-output cache of ``windows.train`` under ``root``: opened if a complete one with
    the same key exists, otherwise filled now (teacher forward over every training window)."""
    if topk < 1:
        raise UserError(f"--teacher-topk must be >= 1, got {topk}")
    settings = cache_settings(topk, temperature, bf16, hidden)
    key = cache_key(model_fingerprint(teacher), windows_fingerprint(windows), settings)
    directory = Path(root) / f"teacher-{key}"
    cfg = teacher.config
    N, L = int(windows.train.shape[0]), int(windows.train.shape[1])
    k = min(topk, cfg.vocab_size)
    shapes = {"topk": (N, L, k), "lse": (N, L), "hidden": (N, cfg.n_layers, L, cfg.d_model)}
    files = [n for n in ARRAYS if n != "hidden.f16" or hidden]
    expect = {"key": key, "shapes": {s: shapes[s] for s in {ARRAYS[f][1] for f in files}}}
    if (directory / META_FILE).is_file():
        return TeacherCache.open(directory, expect)
    if log is not None:
        gib = sum(int(np.prod(shapes[ARRAYS[f][1]])) * np.dtype(ARRAYS[f][0]).itemsize for f in files) / 2 ** 30
        log(f"teacher-output cache: filling {directory} ({N} windows of {L}, top-{k}"
            f"{', block outputs' if hidden else ''}; {gib:.2f} GiB)")
    device = next(teacher.parameters()).device
    amp = torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=bf16)
    was_training = teacher.training
    teacher.eval()
    capture = HiddenCapture(teacher) if hidden else None
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=N, desc="teacher-output cache", unit="win", dynamic_ncols=True)
    try:
        with atomic_directory(directory, overwrite=False) as tmp:
            mm = {name: np.memmap(str(tmp / name), dtype=ARRAYS[name][0], mode="w+", shape=shapes[ARRAYS[name][1]])
                  for name in files}
            for s in range(0, N, batch_size):
                ids = windows.train[s:s + batch_size].to(device)
                with torch.no_grad(), amp:
                    logits = teacher(ids)
                hid = capture.pop() if capture is not None else None
                t = teacher_targets(logits, k, temperature, hid)
                e = s + ids.shape[0]
                mm["topk_values.f16"][s:e] = t.values.cpu().numpy().astype("<f2")
                mm["topk_indices.i32"][s:e] = t.indices.cpu().numpy().astype("<i4")
                mm["lse.f32"][s:e] = t.lse.cpu().numpy().astype("<f4")
                if hid is not None:
                    mm["hidden.f16"][s:e] = torch.stack(t.hidden, 1).cpu().numpy().astype("<f2")  # (B, n_layers, L, D)
                if bar is not None:
                    bar.update(ids.shape[0])
            for m in mm.values():
                m.flush()
            del mm
            meta = {"version": CACHE_VERSION, "key": key, "settings": settings, "files": files,
                    "shapes": {s: list(shapes[s]) for s in {ARRAYS[f][1] for f in files}},
                    "dtypes": {f: ARRAYS[f][0] for f in files}, "teacher": model_fingerprint(teacher),
                    "windows": windows_fingerprint(windows), "source": windows.source}
            (tmp / META_FILE).write_text(json.dumps(meta, indent=1))
    finally:
        if capture is not None:
            capture.remove()
        if bar is not None:
            bar.close()
        teacher.train(was_training)
    return TeacherCache.open(directory, expect)


def kd_topk_vs_full(student_logits: torch.Tensor, teacher_logits: torch.Tensor, k: int,
                    temperature: float = 1.0) -> Dict[str, float]:
    """The top-k + tail KD loss next to the full KD loss on the same logits (how good the approximation is)."""
    from .losses import kd_loss

    full = float(kd_loss(student_logits, teacher_logits, temperature))
    approx = float(topk_kd_loss(student_logits, teacher_targets(teacher_logits, k, temperature), temperature))
    t = F.softmax(teacher_logits.float() / temperature, dim=-1)
    tail = 1.0 - float(t.topk(min(k, t.shape[-1]), dim=-1).values.sum(-1).mean())
    return {"full_kd": full, "topk_kd": approx, "ratio": approx / full if full else float("nan"), "teacher_tail_mass": tail}
