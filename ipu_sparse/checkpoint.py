"""ipu-sparse checkpoint directories: ``ipu_sparse.json`` metadata + safetensors + tokenizer.

``format`` in the metadata says how the weights are stored. ``dense`` (this module):
one ``model.safetensors`` with every tensor, pruned weights as exact zeros. Sparse
formats are handled by ``ipu_sparse.sparse.checkpoint`` and dispatched from here.
Writes go to a temporary directory that is renamed into place, so a failed or
interrupted save never leaves a half-written checkpoint.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Dict, Iterator, Optional

import torch

from .config import ModelConfig
from .errors import UserError

META_FILE = "ipu_sparse.json"
DENSE_FORMAT = "dense"
DENSE_VERSION = 1


def sha256_file(path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


@contextmanager
def atomic_directory(out, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory next to ``out``; rename it to ``out`` only on success."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise UserError(f"{out}: already exists (pass --overwrite to replace it)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=str(out.parent)))
    try:
        yield tmp
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def atomic_write_text(path, text: str, overwrite: bool = True) -> Path:
    """Write ``text`` to ``path`` through a temporary file in the same directory and a rename,
    so readers never see a partial file; refuse an existing ``path`` unless ``overwrite``."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise UserError(f"{path}: already exists (pass --overwrite to replace it)")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=str(path.parent), prefix=f".{path.name}.tmp-")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def save_dense_checkpoint(model, tokenizer, out, extra_meta: Optional[Dict[str, Any]] = None,
                          overwrite: bool = False) -> Path:
    """Save ``model`` as a dense checkpoint (pruned weights stay as exact zeros)."""
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
    try:
        meta = json.loads(meta_path.read_text())
    except ValueError as exc:
        raise UserError(f"{meta_path}: invalid JSON ({exc})") from None
    if not isinstance(meta, dict) or "format" not in meta or "config" not in meta:
        raise UserError(f"{meta_path}: metadata lacks 'format' or 'config'")
    return meta


def load_tokenizer_for(path):
    from .loading.tokenizer import TOKENIZER_CONFIG, ByteTokenizer, Tokenizer

    path = Path(path)
    if (path / "tokenizer.json").is_file():
        return Tokenizer.load(path)
    cfg = path / TOKENIZER_CONFIG
    if cfg.is_file():
        meta = json.loads(cfg.read_text())
        if "byte_tokenizer" in meta:
            return ByteTokenizer(int(meta["byte_tokenizer"]))
    return None


def load_checkpoint(path, dtype: torch.dtype = torch.float32, device: str = "cpu"):
    """Load any ipu-sparse checkpoint directory as a ``LoadedModel``."""
    from .loading import LoadedModel, model_from_state_dict

    path = Path(path)
    meta = read_meta(path)
    fmt = meta["format"]
    if fmt != DENSE_FORMAT:
        try:
            from .sparse.checkpoint import load_sparse_checkpoint
        except ImportError:
            raise UserError(f"{path}: checkpoint format {fmt!r} is not supported by this version") from None
        return load_sparse_checkpoint(path, meta, dtype=dtype, device=device)
    if meta.get("version") != DENSE_VERSION:
        raise UserError(f"{path}: dense checkpoint version {meta.get('version')!r} is not supported (expected {DENSE_VERSION})")
    cfg = ModelConfig.from_dict(meta["config"])
    st = path / "model.safetensors"
    if not st.is_file():
        raise UserError(f"{path}: missing model.safetensors")
    want = meta.get("files", {}).get("model.safetensors")
    if want and sha256_file(st) != want:
        raise UserError(f"{st}: content hash does not match {META_FILE} (corrupt or modified file)")
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        sd = load_file(str(st))
    except (SafetensorError, OSError, ValueError) as exc:
        raise UserError(f"{st}: corrupt or truncated safetensors file ({exc})") from None
    model = model_from_state_dict(cfg, sd, str(st), dtype, device)
    return LoadedModel(model, load_tokenizer_for(path), str(path), meta)
