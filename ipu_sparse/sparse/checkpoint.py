"""Sparse checkpoints: one safetensors file (no pickle) + ``ipu_sparse.json``.

Directory layout (written atomically with ``ipu_sparse.fileio.atomic_directory``)::

    ipu_sparse.json      {"format": "sparse", "version": 1, "config": {...}, "dtype": "bfloat16" (dense tensors),
                          "layers": {fqn: {"format", "shape", "nnz", "sparsity", "dtype", "bytes",
                                           "dense_fp16_bytes", "bias"}},
                          "head": {"kind": "tied" | "dense" | "sparse" | "low_precision" | "quantized", ...},
                          "totals": {...}, "files": {"model.safetensors": sha256}}
    model.safetensors    header metadata {"ipu_sparse": "sparse", "version": "1"}; dense tensors
                         under their state-dict names (in "dtype": 16-bit by default); a sparse layer ``fqn`` as ``fqn.mask`` /
                         ``fqn.col_idx``, ``fqn.row_ptr``, ``fqn.values`` (+ ``fqn.scales`` fp32 (rows,) for
                         int8 values, ``fqn.bias`` fp32); an int8 head as ``lm_head.qweight`` int8 (V, D) +
                         ``lm_head.scales`` fp32 (V, D / group_size) (head "group_size": 0 = one scale a row)
    tokenizer.json, tokenizer_config.json (when a tokenizer is given)

Loading checks the metadata fields, the content hash, the safetensors magic, every
tensor's name, shape and dtype, and every sparse index bound before building the model,
and reports the first problem as a ``UserError`` naming the tensor.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import torch
import torch.nn as nn

from ..checkpoint import META_FILE, check_finite, load_state_dict_strict, model_skeleton, read_meta
from ..config import ModelConfig
from ..errors import UserError
from ..fileio import atomic_directory, sha256_file
from ..model import Transformer, set_module
from .accounting import account, rows_from_meta
from .formats import DTYPE_NAMES, format_class, format_nbytes, from_dense, from_tensors, q8_group_count, value_dtype
from .linear import LowPrecisionLinear, QuantizedLinear, SparseConfig, SparseLinear

SPARSE_FORMAT = "sparse"
SPARSE_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
ST_MAGIC = {"ipu_sparse": SPARSE_FORMAT, "version": str(SPARSE_VERSION)}
HEAD_KINDS = ("tied", "dense", "sparse", "low_precision", "quantized")
OWN_HEAD_KINDS = ("low_precision", "quantized")  # dense heads stored in their own dtype, never cast
_RESERVED = {"format", "version", "config", "dtype", "layers", "head", "totals", "files"}


def _dtype_name(dt: torch.dtype) -> str:
    return str(dt).replace("torch.", "")


def _layer_meta(fmt: str, shape, nnz: int, dt: torch.dtype, has_bias: bool) -> Dict[str, Any]:
    rows, cols = int(shape[0]), int(shape[1])
    total = rows * cols
    return {
        "format": fmt, "shape": [rows, cols], "nnz": int(nnz),
        "sparsity": round(1.0 - nnz / total, 6) if total else 0.0,
        "dtype": DTYPE_NAMES[dt], "bytes": format_nbytes(fmt, rows, cols, nnz, dt),
        "dense_fp16_bytes": format_nbytes("dense", rows, cols, 0, "fp16"), "bias": bool(has_bias),
    }


def export_tensors(model, config: SparseConfig) -> Tuple[Dict[str, torch.Tensor], Dict[str, Any], dict, dict]:
    """(tensors, per-layer meta, model config dict, head meta) for ``model`` without modifying it.

    Layers that are already ``SparseLinear`` are stored as they are; the ``nn.Linear`` layers that
    ``sparsify_`` would select are converted with ``config``.
    """
    cfg = model.config.to_dict()
    tied = bool(model.config.tie_embeddings) and model.lm_head.weight is model.embed.weight \
        if isinstance(model.lm_head, nn.Linear) else False
    tied = tied or model.head_untied
    targets = dict(model.linear_layers(include_head=config.include_head))
    tensors: Dict[str, torch.Tensor] = {}
    layers: Dict[str, Any] = {}
    skip_prefixes = []
    for fqn, mod in targets.items():
        if isinstance(mod, SparseLinear):
            m, bias = mod.matrix, mod.bias
        elif isinstance(mod, nn.Linear):
            w = mod.weight.detach()
            if w.numel() and float((w == 0).sum()) / w.numel() < config.min_sparsity:
                continue
            m, bias = from_dense(w, config.format, config.dtype), mod.bias
        else:
            continue
        for key, t in m.tensors().items():
            tensors[f"{fqn}.{key}"] = t.detach().contiguous().cpu()
        if bias is not None:
            tensors[f"{fqn}.bias"] = bias.detach().float().contiguous().cpu()
        layers[fqn] = _layer_meta(m.name, m.shape, m.nnz, m.dtype, bias is not None)
        skip_prefixes.append(fqn + ".")
    head: Dict[str, Any]
    if "lm_head" in layers:
        head = {"kind": "sparse", "source_tied": tied}
        cfg["tie_embeddings"] = False
    elif isinstance(model.lm_head, QuantizedLinear) or (
            config.head_dtype is not None and value_dtype(config.head_dtype, int8=True) == torch.int8):
        head_mod = model.lm_head if isinstance(model.lm_head, QuantizedLinear) else \
            QuantizedLinear.from_linear(model.lm_head, config.head_group_size)
        tensors["lm_head.qweight"] = head_mod.qweight.detach().contiguous().cpu()
        tensors["lm_head.scales"] = head_mod.scales.detach().contiguous().cpu()
        head = {"kind": "quantized", "dtype": "int8", "group_size": head_mod.group_size, "source_tied": tied}
        cfg["tie_embeddings"] = False
        skip_prefixes.append("lm_head.")
    elif isinstance(model.lm_head, LowPrecisionLinear) or config.head_dtype is not None:
        dt = value_dtype(config.head_dtype) if config.head_dtype else model.lm_head.weight.dtype
        tensors["lm_head.weight"] = model.lm_head.weight.detach().to(dt).contiguous().cpu()
        head = {"kind": "low_precision", "dtype": DTYPE_NAMES[dt], "source_tied": tied}
        cfg["tie_embeddings"] = False
        skip_prefixes.append("lm_head.")
    else:
        head = {"kind": "tied" if tied else "dense", "source_tied": tied}
    for name, t in model.state_dict().items():
        if any(name.startswith(p) for p in skip_prefixes):
            continue
        if name == "lm_head.weight" and head["kind"] == "tied":
            continue
        tensors[name] = t.detach().contiguous().cpu()
    return tensors, layers, cfg, head


def _store_dense_as(tensors: Dict[str, torch.Tensor], layers: Dict[str, Any], head: dict,
                    dt: torch.dtype) -> None:
    """Cast the dense floating-point tensors (embedding, norms, dense layers) to ``dt`` in place;
    sparse layers' tensors and biases and a low-precision head keep their own dtypes."""
    own = tuple(f"{fqn}." for fqn in layers) + (("lm_head.",) if head["kind"] in OWN_HEAD_KINDS else ())
    for name, t in tensors.items():
        if t.is_floating_point() and not name.startswith(own):
            tensors[name] = t.to(dt)


def save_sparse_checkpoint(model, tokenizer, out, format: str = "bitmap", dtype: str = "bf16",
                           include_head: bool = False, head_dtype: Optional[str] = None, min_sparsity: float = 0.0,
                           extra_meta: Optional[Dict[str, Any]] = None, overwrite: bool = False,
                           dense_dtype: Optional[str] = None, head_group_size: int = 0) -> Path:
    """Save ``model`` (pruned dense weights with exact zeros, or already sparsified) as a sparse checkpoint.

    ``format``/``dtype``: storage of the decoder projections (and of the LM head with
    ``include_head``, which unties it from the embedding). ``head_dtype``: keep the head dense
    but store it in that dtype ("int8": int8 with fp32 scales per row, or per ``head_group_size``
    columns). ``dense_dtype``: storage of the dense tensors (embedding, norms);
    default ``dtype``, so a bf16/fp16 checkpoint is 16-bit throughout and its size on disk is
    what the accounting counts (``"fp32"`` keeps them exact). The model is not modified.
    """
    from safetensors.torch import save_file

    config = SparseConfig(format=format, dtype=dtype, include_head=include_head, min_sparsity=min_sparsity,
                          head_dtype=head_dtype, head_group_size=head_group_size)
    if dense_dtype is None and value_dtype(dtype, int8=True) == torch.int8:
        dense_dtype = "bf16"  # int8 is for sparse values; the embedding and norms stay 16-bit
    dense_dt = value_dtype(dense_dtype if dense_dtype is not None else dtype)
    clash = sorted(_RESERVED & set(extra_meta or {}))
    if clash:
        raise UserError(f"extra_meta may not set reserved checkpoint fields: {clash}")
    tensors, layers, cfg, head = export_tensors(model, config)
    _store_dense_as(tensors, layers, head, dense_dt)
    sparse_bytes = sum(v["bytes"] for v in layers.values())
    dense16 = sum(v["dense_fp16_bytes"] for v in layers.values())
    nnz = sum(v["nnz"] for v in layers.values())
    total = sum(v["shape"][0] * v["shape"][1] for v in layers.values())
    with atomic_directory(out, overwrite) as tmp:
        save_file(tensors, str(tmp / WEIGHTS_FILE), metadata=dict(ST_MAGIC))
        if tokenizer is not None:
            tokenizer.save(tmp)
        meta = {
            "format": SPARSE_FORMAT,
            "version": SPARSE_VERSION,
            "config": cfg,
            "dtype": _dtype_name(dense_dt),
            "layers": layers,
            "head": head,
            "totals": {
                "sparse_layers": len(layers), "nnz": nnz, "elements": total,
                "sparsity": round(1.0 - nnz / total, 6) if total else 0.0,
                "sparse_layer_bytes": sparse_bytes, "sparse_layer_dense_fp16_bytes": dense16,
                "file_bytes": (tmp / WEIGHTS_FILE).stat().st_size,
            },
            "files": {WEIGHTS_FILE: sha256_file(tmp / WEIGHTS_FILE)},
        }
        meta.update(extra_meta or {})
        (tmp / META_FILE).write_text(json.dumps(meta, indent=1))
    return Path(out)


# ----- loading ---------------------------------------------------------------------------------

def _check_layer_meta(fqn: str, lm: Any, where: str) -> None:
    if not isinstance(lm, dict):
        raise UserError(f"{where}: layer {fqn}: entry must be an object")
    for key, typ in (("format", str), ("shape", list), ("nnz", int), ("dtype", str), ("bias", bool)):
        if not isinstance(lm.get(key), typ):
            raise UserError(f"{where}: layer {fqn}: field {key!r} missing or not a {typ.__name__}")
    cls = format_class(lm["format"], where=f"{where}: layer {fqn}")
    if len(lm["shape"]) != 2 or not all(isinstance(s, int) and s >= 0 for s in lm["shape"]):
        raise UserError(f"{where}: layer {fqn}: bad shape {lm['shape']!r}")
    try:
        if value_dtype(lm["dtype"], int8=True) == torch.int8:
            cls._check_int8()
    except UserError as exc:
        raise UserError(f"{where}: layer {fqn}: {exc}") from None


def validate_meta(meta: Dict[str, Any], where: str) -> ModelConfig:
    if meta.get("format") != SPARSE_FORMAT:
        raise UserError(f"{where}: unknown checkpoint format {meta.get('format')!r} (expected 'dense' or 'sparse')")
    if meta.get("version") != SPARSE_VERSION:
        raise UserError(f"{where}: sparse checkpoint version {meta.get('version')!r} is not supported "
                        f"(expected {SPARSE_VERSION})")
    if not isinstance(meta.get("config"), dict):
        raise UserError(f"{where}: 'config' must be an object")
    try:
        cfg = ModelConfig.from_dict(meta["config"])
    except TypeError as exc:
        raise UserError(f"{where}: bad model config ({exc})") from None
    layers = meta.get("layers")
    if not isinstance(layers, dict):
        raise UserError(f"{where}: 'layers' must be an object")
    for fqn, lm in layers.items():
        _check_layer_meta(fqn, lm, where)
    head = meta.get("head")
    if not isinstance(head, dict) or head.get("kind") not in HEAD_KINDS:
        raise UserError(f"{where}: 'head' must be an object with kind in {HEAD_KINDS}")
    if head["kind"] == "low_precision":
        value_dtype(head.get("dtype", "?"))
    if head["kind"] == "quantized":
        gs = head.get("group_size")
        if head.get("dtype") != "int8" or not isinstance(gs, int) or isinstance(gs, bool) or gs < 0:
            raise UserError(f"{where}: quantized head must have dtype 'int8' and an integer group_size >= 0, "
                            f"got {head.get('dtype')!r}, {gs!r}")
        try:
            q8_group_count(cfg.d_model, gs)
        except UserError as exc:
            raise UserError(f"{where}: head: {exc}") from None
    if head["kind"] == "sparse" and "lm_head" not in layers:
        raise UserError(f"{where}: head kind 'sparse' but no 'lm_head' layer entry")
    files = meta.get("files")
    if not isinstance(files, dict) or not isinstance(files.get(WEIGHTS_FILE), str):
        raise UserError(f"{where}: 'files' must give the sha256 of {WEIGHTS_FILE}")
    if not isinstance(meta.get("dtype"), str):
        raise UserError(f"{where}: 'dtype' missing")
    return cfg


class _Reader:
    """Memory-mapped safetensors reader that names the tensor in every error."""

    def __init__(self, path: Path):
        from safetensors import safe_open

        self.path = path
        try:
            self.handle = safe_open(str(path), framework="pt", device="cpu")
            self.names = set(self.handle.keys())
            header = self.handle.metadata() or {}
        except Exception as exc:  # SafetensorError, OSError: corrupt/truncated header
            raise UserError(f"{path}: corrupt or truncated safetensors file ({exc})") from None
        if header.get("ipu_sparse") != ST_MAGIC["ipu_sparse"]:
            raise UserError(f"{path}: not an ipu-sparse sparse weights file (bad magic {header.get('ipu_sparse')!r})")
        if header.get("version") != ST_MAGIC["version"]:
            raise UserError(f"{path}: sparse weights file version {header.get('version')!r} is not supported "
                            f"(expected {ST_MAGIC['version']})")
        self.used = set()

    def get(self, name: str) -> torch.Tensor:
        if name not in self.names:
            raise UserError(f"{self.path}: missing tensor {name}")
        try:
            t = self.handle.get_tensor(name)
        except Exception as exc:
            raise UserError(f"{self.path}: tensor {name} cannot be read ({exc})") from None
        self.used.add(name)
        return t

    def shape(self, name: str) -> Tuple[int, ...]:
        """A tensor's shape from the file header (nothing read)."""
        if name not in self.names:
            raise UserError(f"{self.path}: missing tensor {name}")
        return tuple(int(d) for d in self.handle.get_slice(name).get_shape())


def load_sparse_model(path, meta: Optional[Dict[str, Any]] = None, dtype: torch.dtype = torch.float32,
                      device: str = "cpu") -> Transformer:
    """The model of a sparse checkpoint directory (metadata, hash, every tensor and index validated first)."""
    path = Path(path)
    meta = meta if meta is not None else read_meta(path)
    where = str(path / META_FILE)
    cfg = validate_meta(meta, where)
    st = path / WEIGHTS_FILE
    if not st.is_file():
        raise UserError(f"{path}: missing {WEIGHTS_FILE}")
    if sha256_file(st) != meta["files"][WEIGHTS_FILE]:
        raise UserError(f"{st}: content hash does not match {META_FILE} (corrupt or modified file)")
    reader = _Reader(st)

    # Skeleton without random initialisation: every tensor is overwritten from the file below.
    # The sizes the metadata claims are checked against the file's tensors before anything is allocated.
    model = model_skeleton(cfg, reader.names, str(st))
    head_skip = ("lm_head.",) if meta["head"]["kind"] in OWN_HEAD_KINDS else ()
    claimed = {k: tuple(v.shape) for k, v in model.state_dict().items()
               if not k.startswith(tuple(f"{fqn}." for fqn in meta["layers"]) + head_skip)}
    if cfg.tie_embeddings:
        claimed.pop("lm_head.weight", None)
    for name, shape in claimed.items():
        if reader.shape(name) != shape:
            raise UserError(f"{st}: tensor {name} has shape {reader.shape(name)}, config expects {shape}")
    model = model.to_empty(device="cpu").to(dtype=dtype)
    modules = dict(model.named_modules())
    for fqn, lm in meta["layers"].items():
        mod = modules.get(fqn)
        if not isinstance(mod, nn.Linear):
            raise UserError(f"{where}: layer {fqn} is not a linear layer of a {cfg.name} model")
        rows, cols = lm["shape"]
        if (rows, cols) != (mod.out_features, mod.in_features):
            raise UserError(f"{where}: layer {fqn} has shape {(rows, cols)}, the config expects "
                            f"{(mod.out_features, mod.in_features)}")
        cls = format_class(lm["format"])
        want_dt = value_dtype(lm["dtype"], int8=True)
        values = reader.get(f"{fqn}.values")  # its dtype decides the other tensors (int8: + scales)
        if values.dtype != want_dt:
            raise UserError(f"{st}: {fqn}.values has dtype {values.dtype}, metadata says {lm['dtype']}")
        stored = {k: values if k == "values" else reader.get(f"{fqn}.{k}") for k in cls.tensor_names_for(want_dt)}
        matrix = from_tensors(lm["format"], (rows, cols), stored, where=f"{st}: {fqn}")
        if matrix.dtype != want_dt:
            raise UserError(f"{st}: {fqn}.values has dtype {matrix.dtype}, metadata says {lm['dtype']}")
        if matrix.nnz != lm["nnz"]:
            raise UserError(f"{st}: {fqn} has {matrix.nnz} non-zeros, metadata says {lm['nnz']}")
        check_finite(stored["values"], f"{fqn}.values", str(st))
        bias = None
        if lm["bias"]:
            bias = reader.get(f"{fqn}.bias")
            if tuple(bias.shape) != (rows,) or bias.dtype != torch.float32:
                raise UserError(f"{st}: tensor {fqn}.bias must be float32 of shape ({rows},), "
                                f"got {bias.dtype} {tuple(bias.shape)}")
            check_finite(bias, f"{fqn}.bias", str(st))
        elif (mod.bias is not None):
            raise UserError(f"{where}: layer {fqn} needs a bias but the metadata says it has none")
        set_module(model, fqn, SparseLinear(matrix.to(device), None if bias is None else bias.to(device)))

    head = meta["head"]
    if head["kind"] == "low_precision":
        w = reader.get("lm_head.weight")
        if tuple(w.shape) != (cfg.vocab_size, cfg.d_model) or w.dtype != value_dtype(head["dtype"]):
            raise UserError(f"{st}: tensor lm_head.weight must be {head['dtype']} of shape "
                            f"{(cfg.vocab_size, cfg.d_model)}, got {w.dtype} {tuple(w.shape)}")
        check_finite(w, "lm_head.weight", str(st))
        model.lm_head = LowPrecisionLinear(w, None, w.dtype)
    elif head["kind"] == "quantized":
        q, s = reader.get("lm_head.qweight"), reader.get("lm_head.scales")
        groups = q8_group_count(cfg.d_model, head["group_size"])
        if tuple(q.shape) != (cfg.vocab_size, cfg.d_model) or q.dtype != torch.int8:
            raise UserError(f"{st}: tensor lm_head.qweight must be int8 of shape {(cfg.vocab_size, cfg.d_model)}, "
                            f"got {q.dtype} {tuple(q.shape)}")
        if tuple(s.shape) != (cfg.vocab_size, groups):
            raise UserError(f"{st}: tensor lm_head.scales must have shape {(cfg.vocab_size, groups)} "
                            f"(group_size {head['group_size']}), got {tuple(s.shape)}")
        model.lm_head = QuantizedLinear(q, s, where=f"{st}: lm_head")

    # Every remaining (dense) tensor: names and shapes must match the config exactly.
    sparse_prefixes = tuple(f"{fqn}." for fqn in meta["layers"]) + (("lm_head.",) if head["kind"] in OWN_HEAD_KINDS else ())
    dense = {name: reader.get(name) for name in sorted(reader.names - reader.used)}
    load_state_dict_strict(model, dense, str(st), skip=sparse_prefixes)
    if cfg.tie_embeddings and isinstance(model.lm_head, nn.Linear):
        model.lm_head.weight = model.embed.weight
    return model.to(device).eval()


def summarize(meta: Dict[str, Any], context: int = 512) -> Dict[str, Any]:
    """``accounting.account`` from the checkpoint metadata alone (no tensors read)."""
    cfg = ModelConfig.from_dict(meta["config"])
    head = meta["head"]
    return account(cfg, rows_from_meta(meta), context=context,
                   head_dtype=head.get("dtype") if head["kind"] in OWN_HEAD_KINDS else None,
                   tied_in_source=bool(head.get("source_tied", cfg.tie_embeddings)),
                   head_group_size=int(head.get("group_size", 0)))


def disk_bytes(path) -> int:
    """Bytes of the checkpoint's weights file on disk (what the accounting's whole-model bytes count)."""
    st = Path(path) / WEIGHTS_FILE
    if not st.is_file():
        raise UserError(f"{path}: missing {WEIGHTS_FILE}")
    return st.stat().st_size


def format_disk_line(path, result: Dict[str, Any]) -> str:
    """One line: the weights file's bytes on disk next to the accounting's bytes and the dense fp16 model."""
    on_disk = disk_bytes(path)
    w = result["whole_model"]
    return (f"  on disk: {WEIGHTS_FILE} {on_disk / 1e6:.2f} MB = {100 * on_disk / w['bytes']:.1f}% of the accounting's "
            f"{w['bytes'] / 1e6:.2f} MB = {100 * on_disk / w['dense_fp16_bytes']:.1f}% of dense fp16")
