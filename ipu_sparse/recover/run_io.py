"""A recovery run directory: at every save a loadable checkpoint plus the training state, replaced atomically.

Files: the dense checkpoint (``ipu_sparse.json``, ``model.safetensors``, tokenizer), ``mask.safetensors``,
``train_state.json`` (position and counters, history, horizons, RNG states, the optimizer's settings,
what the run was made from), ``train_state.safetensors`` (the optimizer's tensors), ``history.json``
and, after the last save of a session, ``loss_curve.png``. Nothing is pickled: unpickling a file from
a run directory could run any code in it, so the ``train_state.pt`` of older versions is refused,
never read.
"""
from __future__ import annotations

import dataclasses
import json
import os
import random
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import torch
from safetensors.torch import save_file

from ..checkpoint import load_state_dict_strict
from ..loading import load_checkpoint, save_checkpoint
from ..sparse.linear import densify_
from ..errors import UserError
from ..fileio import atomic_directory, read_safetensors
from .masks import MASK_FILE, Masks, load_mask_file, save_masks
from .plot import plot_history
from .state import STAGES, TrainState

STATE_FILE = "train_state.json"
STATE_TENSORS_FILE = "train_state.safetensors"
LEGACY_STATE_FILE = "train_state.pt"  # pickle of versions before 2: never loaded
HISTORY_FILE = "history.json"
PLOT_FILE = "loss_curve.png"
STATE_VERSION = 2
_OPT_PREFIX = "optimizer.state."


def check_out(out: Path, resume: bool, overwrite: bool) -> None:
    """Refuse to resume a directory without a run, and to replace an existing one unless ``overwrite``."""
    if resume:
        if (out / STATE_FILE).is_file():
            return
        if (out / LEGACY_STATE_FILE).is_file():
            raise UserError(f"{out / LEGACY_STATE_FILE}: training state of an older version (a pickle, which is "
                            f"never loaded); start the run again with --overwrite")
        raise UserError(f"{out}: nothing to resume (no {STATE_FILE})")
    if out.exists() and not overwrite:
        what = "a recovery run" if any((out / f).is_file() for f in (STATE_FILE, LEGACY_STATE_FILE)) else "something"
        raise UserError(f"{out}: already holds {what}; pass --resume to continue it or --overwrite to replace it")


# ----- writing ------------------------------------------------------------------------------------

def _rng_state() -> Dict[str, Any]:
    version, internal, gauss = random.getstate()
    return {"torch": bytes(torch.get_rng_state().numpy()).hex(), "python": [version, list(internal), gauss]}


def _split_optimizer(sd: Optional[dict]) -> Tuple[Optional[dict], Dict[str, torch.Tensor]]:
    """An optimizer state_dict as JSON (settings, scalars) and tensors named ``optimizer.state.<i>.<key>``."""
    if sd is None:
        return None, {}
    tensors: Dict[str, torch.Tensor] = {}
    state: Dict[str, dict] = {}
    for idx, entries in sd["state"].items():
        scalars = {}
        for key, v in entries.items():
            if isinstance(v, torch.Tensor):
                tensors[f"{_OPT_PREFIX}{idx}.{key}"] = v.detach().cpu().contiguous()
            else:
                scalars[key] = v
        state[str(idx)] = scalars
    return {"state": state, "param_groups": sd["param_groups"]}, tensors


def write_train_state(directory: Path, state: TrainState, identity: Dict[str, Any]) -> None:
    """``train_state.json`` + ``train_state.safetensors`` of ``state`` into ``directory`` (with the RNG states)."""
    fields = {f.name: getattr(state, f.name) for f in dataclasses.fields(state) if f.name != "optimizer"}
    fields["horizons"] = {str(k): v for k, v in state.horizons.items()}
    optimizer, tensors = _split_optimizer(state.optimizer)
    fields["optimizer"] = optimizer
    save_file(tensors, str(directory / STATE_TENSORS_FILE))
    doc = {"version": STATE_VERSION, "identity": identity, "rng": _rng_state(), "state": fields}
    (directory / STATE_FILE).write_text(json.dumps(doc, indent=1))


def write_run(out: Path, student, tokenizer, masks: Optional[Masks], state: TrainState, identity: Dict[str, Any],
              meta: Dict[str, Any], history_doc: Dict[str, Any], plot_title: Optional[str] = None,
              fmt: str = "dense") -> None:
    """Replace the run directory ``out`` atomically: checkpoint of ``student`` (``meta`` in its metadata;
    ``fmt`` dense or a sparse format, values kept in fp32 so that a resume continues exactly), mask,
    training state, ``history_doc`` as ``history.json`` and, with ``plot_title``, the loss curve."""
    with atomic_directory(out, overwrite=True) as tmp:
        inner = tmp / "checkpoint"
        save_checkpoint(student, tokenizer, inner, fmt, "fp32", extra_meta=meta)
        for f in inner.iterdir():
            os.replace(f, tmp / f.name)
        inner.rmdir()
        if masks:
            save_masks(masks, tmp / MASK_FILE)
        write_train_state(tmp, state, identity)
        (tmp / HISTORY_FILE).write_text(json.dumps(history_doc, indent=0))
        if plot_title is not None:
            try:
                plot_history(state.history, tmp / PLOT_FILE, title=plot_title)
            except ImportError:  # matplotlib is optional: no plot without it
                pass


# ----- reading ------------------------------------------------------------------------------------

def _load_tensors(path: Path) -> Dict[str, torch.Tensor]:
    if not path.is_file():
        raise UserError(f"{path}: missing (incomplete run directory)")
    return read_safetensors(path)


def _join_optimizer(doc: Optional[dict], tensors: Dict[str, torch.Tensor]) -> Optional[dict]:
    if doc is None:
        return None
    state: Dict[int, dict] = {int(idx): dict(scalars) for idx, scalars in doc["state"].items()}
    for name, t in tensors.items():
        if not name.startswith(_OPT_PREFIX):
            raise ValueError(f"unexpected tensor {name}")
        idx, key = name[len(_OPT_PREFIX):].split(".", 1)
        state.setdefault(int(idx), {})[key] = t
    # JSON turned tuples (AdamW's betas) into lists
    groups = [{k: (tuple(v) if isinstance(v, list) and k != "params" else v) for k, v in g.items()}
              for g in doc["param_groups"]]
    return {"state": state, "param_groups": groups}


def read_train_state(out) -> Tuple[TrainState, Dict[str, Any], Dict[str, Any]]:
    """The training state saved in run directory ``out``, what the run was made from (its identity) and
    the RNG states. Any problem with the files is one ``UserError`` naming the file."""
    out = Path(out)
    path = out / STATE_FILE
    if not path.is_file():
        raise UserError(f"{out}: nothing to resume (no {STATE_FILE})")
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:  # unreadable, not UTF-8, not JSON
        raise UserError(f"{path}: unreadable training state ({exc})") from None
    if not isinstance(doc, dict) or doc.get("version") != STATE_VERSION:
        raise UserError(f"{path}: not a recovery state of version {STATE_VERSION}")
    tensors = _load_tensors(out / STATE_TENSORS_FILE)
    try:
        fields = dict(doc["state"])
        fields["horizons"] = {int(k): int(v) for k, v in fields["horizons"].items()}
        fields["optimizer"] = _join_optimizer(fields["optimizer"], tensors)
        state = TrainState(**fields)
        if state.stage not in STAGES:
            raise ValueError(f"unknown stage {state.stage!r}")
        identity, rng = doc["identity"], doc["rng"]
        if not isinstance(identity, dict) or not isinstance(rng, dict):
            raise ValueError("identity and rng must be objects")
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise UserError(f"{path}: malformed training state ({type(exc).__name__}: {exc})") from None
    return state, identity, rng


def _restore_rng(rng: Dict[str, Any], path: Path) -> None:
    try:
        torch_state = torch.tensor(list(bytes.fromhex(rng["torch"])), dtype=torch.uint8)
        version, internal, gauss = rng["python"]
        torch.set_rng_state(torch_state)
        random.setstate((version, tuple(internal), gauss))
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        raise UserError(f"{path}: malformed RNG state ({type(exc).__name__}: {exc})") from None


def _identity_diffs(saved: Dict[str, Any], now: Dict[str, Any]) -> list:
    diffs = []
    for key in sorted((set(saved) | set(now)) - {"config"}):  # teacher, student, data (and how it was trained)
        if saved.get(key) != now.get(key):
            diffs.append(f"{key} differs")
    sc, nc = saved.get("config", {}), now["config"]
    for k in sorted(set(sc) | set(nc)):
        if sc.get(k) != nc.get(k):
            diffs.append(f"{k}: run has {sc.get(k)!r}, now {nc.get(k)!r}")
    return diffs


def load_run(out, identity: Dict[str, Any], student) -> Tuple[TrainState, Optional[Masks]]:
    """Resume run directory ``out``: check it was made with the same ``identity`` (config, models, data),
    load its weights into ``student``, restore the RNG states; returns the state and the saved mask
    (None if the run has no mask file)."""
    out = Path(out)
    state, saved, rng = read_train_state(out)
    if saved != identity:
        raise UserError(f"{out}: cannot resume: this run was made with a different configuration ("
                        + "; ".join(_identity_diffs(saved, identity)[:6]) + ")")
    device = next(student.parameters()).device
    saved_model = densify_(load_checkpoint(out).model)  # any checkpoint kind, hash and every tensor checked
    sd = saved_model.state_dict()
    if student.config.tie_embeddings:
        sd.pop("lm_head.weight", None)
    load_state_dict_strict(student, {k: v.to(device) for k, v in sd.items()}, str(out))
    masks = load_mask_file(out / MASK_FILE, student) if (out / MASK_FILE).is_file() else None
    _restore_rng(rng, out / STATE_FILE)
    return state, masks
