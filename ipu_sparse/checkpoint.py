"""ipu-sparse checkpoint directories: ``ipu_sparse.json`` metadata + safetensors + tokenizer.

``format`` in the metadata says how the weights are stored. ``dense`` (this module):
one ``model.safetensors`` with every tensor, pruned weights as exact zeros. ``sparse``:
``ipu_sparse.sparse.checkpoint``. ``ipu_sparse.loading.load_checkpoint`` picks the loader
from the format (and loads the tokenizer). Writes go to a temporary directory that is
renamed into place, so a failed or interrupted save never leaves a half-written checkpoint.

Also here, below every loader: the one strict state-dict copy (every name, shape and dtype
checked against the model's config).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Tuple

import torch

from .config import ModelConfig
from .errors import UserError
from .fileio import atomic_directory, read_json_object, read_safetensors, sha256_file
from .model import Transformer

META_FILE = "ipu_sparse.json"
DENSE_FORMAT = "dense"
DENSE_VERSION = 1


def load_state_dict_strict(model: Transformer, tensors: Mapping[str, torch.Tensor], source: str,
                           skip: Tuple[str, ...] = ()) -> None:
    """Copy ``tensors`` into ``model``, checking every name, shape and dtype kind against the config.

    ``tensors`` must hold exactly the model's state-dict entries, less a tied head's
    ``lm_head.weight`` and less every name under a prefix in ``skip`` (entries the caller
    loads itself, such as sparse layers). Nothing is copied unless every tensor passes.
    """
    expected = {k: v for k, v in model.state_dict().items() if not k.startswith(skip)}
    if model.config.tie_embeddings:
        expected.pop("lm_head.weight", None)
    missing = sorted(set(expected) - set(tensors))
    extra = sorted(set(tensors) - set(expected))
    if missing:
        raise UserError(f"{source}: checkpoint lacks {len(missing)} tensors the config needs, e.g. {missing[:3]}")
    if extra:
        raise UserError(f"{source}: checkpoint has {len(extra)} tensors the config does not know, e.g. {extra[:3]}")
    for name, p in expected.items():
        t = tensors[name]
        if tuple(t.shape) != tuple(p.shape):
            raise UserError(f"{source}: tensor {name} has shape {tuple(t.shape)}, config expects {tuple(p.shape)}")
        if not t.is_floating_point():
            raise UserError(f"{source}: tensor {name} has unsupported dtype {t.dtype}")
        check_finite(t, name, source)
    if model.embed.weight.is_meta:  # a skeleton: the caller only wanted the checks
        return
    with torch.no_grad():
        for name, p in expected.items():
            p.copy_(tensors[name])


def check_finite(t: torch.Tensor, name: str, source: str) -> None:
    """``UserError`` naming the tensor if it holds a NaN or an infinity (a broken file would
    otherwise load and give empty output or ``ppl nan``)."""
    if t.is_floating_point() and t.numel() and not bool(torch.isfinite(t).all()):
        bad = int((~torch.isfinite(t)).sum())
        raise UserError(f"{source}: tensor {name} holds {bad} NaN or infinite values")


def model_skeleton(cfg: ModelConfig, names=None, source: str = "checkpoint") -> Transformer:
    """The model of ``cfg`` on the meta device: names and shapes, no memory (to check a file's
    tensors against the sizes its header claims before anything is allocated). With ``names``
    (the file's tensor names), a layer count the file does not hold is refused before building."""
    if names is not None:
        held = {n.split(".")[1] for n in names if n.startswith("layers.") and n.count(".") >= 2}
        if len(held) != cfg.n_layers:
            raise UserError(f"{source}: config claims {cfg.n_layers} layers, the file holds tensors of {len(held)}")
    with torch.device("meta"):
        return Transformer(cfg)


def model_from_state_dict(cfg: ModelConfig, sd: Dict[str, torch.Tensor], source: str,
                          dtype: torch.dtype, device: str = "cpu") -> Transformer:
    load_state_dict_strict(model_skeleton(cfg, sd, source), sd, source)  # checks only: nothing allocated yet
    model = Transformer(cfg).to(dtype=dtype)
    load_state_dict_strict(model, sd, source)
    return model.to(device).eval()


def save_dense_checkpoint(model, tokenizer, out, extra_meta: Optional[Dict[str, Any]] = None,
                          overwrite: bool = False) -> Path:
    """Save ``model`` as a dense checkpoint (pruned weights stay as exact zeros). A model holding
    sparse layers is refused: their tensors are not the dense weights the metadata would promise
    (``ipu_sparse.loading.save_checkpoint`` writes the sparse formats)."""
    sparse = [name for name, m in model.named_modules() if getattr(m, "is_sparse_linear", False)]
    if sparse:
        raise UserError(f"{out}: cannot save a dense checkpoint of a model holding {len(sparse)} sparse layers "
                        f"(e.g. {sparse[0]}); densify it first or save it in its sparse format")
    from safetensors.torch import save_file

    sd = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    if model.config.tie_embeddings:
        sd.pop("lm_head.weight", None)
    with atomic_directory(out, overwrite) as tmp:
        save_file(sd, str(tmp / "model.safetensors"))
        if tokenizer is not None:
            tokenizer.save(tmp)
        meta = {
            "format": DENSE_FORMAT,
            "version": DENSE_VERSION,
            "config": model.config.to_dict(),
            "dtype": str(next(iter(sd.values())).dtype).replace("torch.", ""),
            "files": {"model.safetensors": sha256_file(tmp / "model.safetensors")},
        }
        meta.update(extra_meta or {})
        (tmp / META_FILE).write_text(json.dumps(meta, indent=1))
    return Path(out)


def read_meta(path) -> Dict[str, Any]:
    path = Path(path)
    meta_path = path / META_FILE
    if not meta_path.is_file():
        raise UserError(f"{path}: not an ipu-sparse checkpoint (no {META_FILE})")
    meta = read_json_object(meta_path, "checkpoint metadata")
    if "format" not in meta or "config" not in meta:
        raise UserError(f"{meta_path}: metadata lacks 'format' or 'config'")
    if not isinstance(meta["format"], str):
        raise UserError(f"{meta_path}: 'format' must be a string, got {meta['format']!r}")
    if not isinstance(meta["config"], dict):
        raise UserError(f"{meta_path}: 'config' must be an object, got {type(meta['config']).__name__}")
    try:
        ModelConfig.from_dict(meta["config"])
    except UserError as exc:
        raise UserError(f"{meta_path}: {exc}") from None
    files = meta.get("files", {})
    if not isinstance(files, dict) or not all(isinstance(v, str) for v in files.values()):
        raise UserError(f"{meta_path}: 'files' must be an object of file name -> sha256, got {files!r:.60}")
    return meta


def load_dense_model(path, meta: Dict[str, Any], dtype: torch.dtype = torch.float32,
                     device: str = "cpu") -> Transformer:
    """The model of a dense checkpoint directory (``meta`` from ``read_meta``), every tensor checked."""
    path = Path(path)
    if meta.get("version") != DENSE_VERSION:
        raise UserError(f"{path}: dense checkpoint version {meta.get('version')!r} is not supported (expected {DENSE_VERSION})")
    cfg = ModelConfig.from_dict(meta["config"])
    st = path / "model.safetensors"
    if not st.is_file():
        raise UserError(f"{path}: missing model.safetensors")
    want = meta.get("files", {}).get("model.safetensors")
    if want and sha256_file(st) != want:
        raise UserError(f"{st}: content hash does not match {META_FILE} (corrupt or modified file)")
    sd = read_safetensors(st)
    return model_from_state_dict(cfg, sd, str(st), dtype, device)
