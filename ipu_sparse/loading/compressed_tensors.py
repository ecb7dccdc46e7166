"""compressed-tensors directories (llm-compressor's format, loaded by vLLM): export and import.

A sparse model in that format is a Hugging Face Llama directory whose ``config.json`` has
``quantization_config = {"quant_method": "compressed-tensors", "sparsity_config": {"format":
"sparse-bitmask", "targets": ["Linear"], "ignore": ["lm_head"], ...}}`` and whose safetensors
store each sparse ``nn.Linear`` weight ``P.weight`` as four tensors:

    P.bitmask      uint8 (rows, ceil(cols/8)), bit j of byte b = column 8b+j (little-endian)
    P.row_offsets  int64 (rows,), index of each row's first value
    P.compressed   (nnz,) the non-zero values in row-major order
    P.shape        int64 (2,) = (rows, cols)

That is our ``bitmap`` format (``ipu_sparse.sparse.formats.Bitmap``) with ``row_ptr[:-1]`` as
``row_offsets``, so export and import convert only the index dtype: no value is changed,
and an imported model runs on the sparse CPU kernel as it was stored. Nothing here needs the
``compressed-tensors`` package; the tests check both directions against it.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import torch
import torch.nn as nn

from ..checkpoint import model_from_state_dict
from ..errors import UserError
from ..fileio import atomic_directory, read_json_object
from ..sparse.formats import DTYPE_NAMES, Bitmap, from_tensors, value_dtype
from ..sparse.linear import SparseConfig, SparseLinear, sparsify_
from .hf import config_from_hf, hf_config, hf_to_ours, ours_to_hf, read_shards

QUANT_METHOD = "compressed-tensors"
SPARSE_BITMASK = "sparse-bitmask"
# The compressed-tensors release whose sparse-bitmask layout this writes (recorded as "version").
FORMAT_VERSION = "0.14.0.1"
PARTS = ("bitmask", "row_offsets", "compressed", "shape")
WEIGHTS_FILE = "model.safetensors"


def _quant_config(hf: Dict[str, Any]) -> Optional[Dict[str, Any]]:
    q = hf.get("quantization_config")
    return q if isinstance(q, dict) and q.get("quant_method") == QUANT_METHOD else None


def is_compressed_tensors_dir(path) -> bool:
    """A directory whose config.json carries a compressed-tensors ``quantization_config``."""
    cfg = Path(path) / "config.json"
    if not cfg.is_file():
        return False
    try:
        hf = json.loads(cfg.read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError):
        return False  # the plain Hugging Face loader reports the problem
    return isinstance(hf, dict) and _quant_config(hf) is not None


# ----- export ------------------------------------------------------------------------------------

def to_sparse_bitmask(matrix: Bitmap) -> Dict[str, torch.Tensor]:
    """Our bitmap matrix as compressed-tensors' sparse-bitmask tensors (values and mask shared)."""
    t = matrix.tensors()
    return {"bitmask": t["mask"], "row_offsets": t["row_ptr"][:-1].to(torch.int64), "compressed": t["values"],
            "shape": torch.tensor(list(matrix.shape), dtype=torch.int64)}


def from_sparse_bitmask(parts: Dict[str, torch.Tensor], where: str) -> Bitmap:
    """compressed-tensors' sparse-bitmask tensors as our (validated) bitmap matrix."""
    shape, offsets, values = parts["shape"], parts["row_offsets"], parts["compressed"]
    if shape.dim() != 1 or shape.numel() != 2 or shape.is_floating_point():
        raise UserError(f"{where}.shape must be 2 integers, got {shape.dtype} {tuple(shape.shape)}")
    rows, cols = (int(v) for v in shape.tolist())
    if offsets.dim() != 1 or offsets.numel() != rows or offsets.is_floating_point():
        raise UserError(f"{where}.row_offsets must be {rows} integers, got {offsets.dtype} {tuple(offsets.shape)}")
    if values.dim() != 1:
        raise UserError(f"{where}.compressed must be 1-D, got shape {tuple(values.shape)}")
    row_ptr = torch.cat([offsets.to(torch.int64), torch.tensor([values.numel()])])
    if int(row_ptr.max()) >= 2 ** 31:
        raise UserError(f"{where}: more than 2^31 values")
    return from_tensors("bitmap", (rows, cols), {"mask": parts["bitmask"], "row_ptr": row_ptr.to(torch.int32),
                                                 "values": values}, where=where)


def _bitmap_of(mod: nn.Module, dtype: torch.dtype) -> Bitmap:
    if isinstance(mod, SparseLinear):
        m = mod.matrix
        return m if isinstance(m, Bitmap) else Bitmap.from_dense(m.to_dense(), m.dtype)
    return Bitmap.from_dense(mod.weight.detach(), dtype)


def export_tensors(model, dtype: Optional[str] = None) -> Tuple[Dict[str, torch.Tensor], Dict[str, Any], torch.dtype]:
    """(tensors under Hugging Face names, sparsity_config, dense dtype) of ``model`` (not modified).

    Every decoder projection is stored as sparse-bitmask (an ``nn.Linear`` with exact zeros is
    converted; a ``SparseLinear`` keeps its values); the embedding, norms and a dense LM head
    are stored dense. Value and dense dtype: ``dtype``, else the sparse layers' value dtype,
    else bf16.
    """
    projections = dict(model.linear_layers())
    if dtype is not None:
        dt = value_dtype(dtype)
    else:
        stored = [m.values.dtype for m in projections.values() if isinstance(m, SparseLinear)]
        # int8 values (per-row scales) have no sparse-bitmask form: stored dequantized, bf16
        dt = stored[0] if stored and stored[0] != torch.int8 else torch.bfloat16
    tensors: Dict[str, torch.Tensor] = {}
    nnz = total = 0
    for fqn, mod in projections.items():
        matrix = _bitmap_of(mod, dt)
        if matrix.dtype != dt:
            matrix = matrix.to(dtype=dt)
        prefix = ours_to_hf(fqn + ".weight")[: -len(".weight")]
        for key, t in to_sparse_bitmask(matrix).items():
            tensors[f"{prefix}.{key}"] = t.contiguous().cpu()
        if mod.bias is not None:
            tensors[f"{prefix}.bias"] = mod.bias.detach().to(dt).contiguous().cpu()
        nnz, total = nnz + matrix.nnz, total + matrix.rows * matrix.cols
    skip = tuple(f"{fqn}." for fqn in projections)
    head = model.lm_head
    for name, t in model.state_dict().items():
        if name.startswith(skip) or name.startswith("lm_head."):
            continue
        tensors[ours_to_hf(name)] = t.detach().to(dt).contiguous().cpu()
    if not model.config.tie_embeddings:
        w = head.weight.detach()  # dense, low-precision or sparse head: stored dense
        tensors["lm_head.weight"] = w.to(dt).contiguous().cpu()
        if getattr(head, "bias", None) is not None:
            tensors["lm_head.bias"] = head.bias.detach().to(dt).contiguous().cpu()
    sparsity_config = {"format": SPARSE_BITMASK, "global_sparsity": round(1.0 - nnz / total, 6) if total else 0.0,
                       "sparsity_structure": "unstructured", "targets": ["Linear"], "ignore": ["lm_head"],
                       "registry_requires_subclass": False}
    return tensors, sparsity_config, dt


def save_compressed_tensors(model, tokenizer, out, dtype: Optional[str] = None, overwrite: bool = False) -> Path:
    """Write ``model`` as a compressed-tensors sparse-bitmask directory (config.json, model.safetensors,
    tokenizer files), atomically."""
    from safetensors.torch import save_file

    tensors, sparsity_config, dt = export_tensors(model, dtype)
    hf = hf_config(model.config, dt)
    hf["quantization_config"] = {"quant_method": QUANT_METHOD, "version": FORMAT_VERSION,
                                 "sparsity_config": sparsity_config, "transform_config": {}}
    with atomic_directory(out, overwrite) as tmp:
        save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(hf, indent=1))
        if tokenizer is not None:
            tokenizer.save(tmp)
    return Path(out)


# ----- import ------------------------------------------------------------------------------------

def load_compressed_tensors(path, dtype: torch.dtype = torch.float32, device: str = "cpu"):
    """(model, meta) from a compressed-tensors directory: sparse-bitmask layers become bitmap
    ``SparseLinear`` layers with the stored values; dense tensors are copied."""
    path = Path(path)
    hf = read_json_object(path / "config.json", "config.json")
    q = _quant_config(hf)
    if q is None:
        raise UserError(f"{path / 'config.json'}: no compressed-tensors quantization_config")
    if q.get("config_groups"):
        raise UserError(f"{path / 'config.json'}: quantized compressed-tensors models are not supported "
                        f"(only the {SPARSE_BITMASK!r} sparsity format)")
    sc = q.get("sparsity_config") or {}
    fmt = sc.get("format", "dense") if isinstance(sc, dict) else None
    if fmt not in (SPARSE_BITMASK, "dense"):
        raise UserError(f"{path / 'config.json'}: sparsity format {fmt!r} is not supported "
                        f"(supported: {SPARSE_BITMASK!r}, 'dense')")
    cfg = config_from_hf(hf, path)
    raw = read_shards(path)
    # a weight stored as sparse-bitmask: its prefix has a ``bitmask`` or ``compressed`` tensor
    prefixes = {k.rpartition(".")[0] for k in raw if k.rpartition(".")[2] in ("bitmask", "compressed")}
    groups = {p: {part: raw.pop(f"{p}.{part}") for part in PARTS if f"{p}.{part}" in raw} for p in sorted(prefixes)}
    sd: Dict[str, torch.Tensor] = {}
    sparse: Dict[str, torch.dtype] = {}
    for prefix, parts in groups.items():
        missing = [p for p in PARTS if p not in parts]
        if missing:
            raise UserError(f"{path}: sparse-bitmask weight {prefix} lacks {missing}")
        matrix = from_sparse_bitmask(parts, f"{path}: {prefix}")
        name = hf_to_ours(prefix + ".weight")
        sd[name] = matrix.to_dense(torch.float32)
        sparse[name[: -len(".weight")]] = matrix.dtype
    for k, t in raw.items():
        if k.endswith("rotary_emb.inv_freq"):
            continue
        if not t.is_floating_point():
            raise UserError(f"{path}: tensor {k} has unsupported dtype {t.dtype}")
        sd[hf_to_ours(k)] = t.float()
    if cfg.tie_embeddings:
        sd.pop("lm_head.weight", None)
    model = model_from_state_dict(cfg, sd, str(path), dtype, device)
    for dt in sorted(set(sparse.values()), key=str):
        sparsify_(model, SparseConfig(format="bitmap", dtype=DTYPE_NAMES[dt]),
                  filter_fn=lambda _m, fqn, dt=dt: sparse.get(fqn) == dt)
    meta = {"format": QUANT_METHOD, "sparsity_config": sc, "sparse_layers": len(sparse),
            "compressed_tensors_version": q.get("version")}
    return model.to(device).eval(), meta
