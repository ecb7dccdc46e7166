"""Memory and compute accounting: bytes per layer (dense fp16 vs sparse, every index byte
counted) and FLOPs per token (dense vs sparse, attention included).

Sources of the per-layer non-zero counts: a model (``SparseLinear`` layers, or ``nn.Linear``
layers' exact zeros), a sparse checkpoint's metadata, or a config plus an assumed uniform
sparsity (for presets without weights, e.g. ``luminous-base-13b``).

Counted per token: 2 FLOPs per multiply-add of every projection (2 rows cols dense,
2 nnz sparse), the LM head, and attention at context length ``context``
(QK^T and AV: 4 n_heads head_dim context per layer). Not counted (each well under 1%):
norms, rotary embeddings, softmax, SwiGLU/GELU, residual adds. Bytes: the embedding, the
LM head (unless tied), norms and biases are dense fp16 in both columns; sparse layers are
``format_nbytes`` of their format with fp32 biases (as ``SparseLinear`` stores them; int8 values
include their fp32 per-row scales). A dense head in another dtype counts that dtype (int8: one
byte a weight + an fp32 scale per row or per group, ``q8_nbytes``).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Dict, List, Optional, Tuple

from ..config import ModelConfig
from .formats import DTYPE_NAMES, format_nbytes, q8_nbytes

# The seed's published whole-model figures (CSR at 80% sparsity), shown next to ours.
SEED_MEMORY_RATIO = 0.44
SEED_COMPUTE_RATIO = 0.20


@dataclass
class LayerRow:
    name: str
    rows: int
    cols: int
    nnz: int
    format: str  # "dense" or a sparse format name
    value_dtype: str  # "fp32", "bf16", "fp16", "int8" (+ per-row scales)
    bias: bool = False

    @property
    def dense_fp16_bytes(self) -> int:
        return 2 * self.rows * self.cols + (2 * self.rows if self.bias else 0)

    @property
    def bytes(self) -> int:
        if self.format == "dense":
            return self.dense_fp16_bytes
        return format_nbytes(self.format, self.rows, self.cols, self.nnz, self.value_dtype) + \
            (4 * self.rows if self.bias else 0)

    @property
    def flops_dense(self) -> int:
        return 2 * self.rows * self.cols

    @property
    def flops(self) -> int:
        return self.flops_dense if self.format == "dense" else 2 * self.nnz

    def as_dict(self) -> Dict[str, Any]:
        d = asdict(self)
        d.update(dense_fp16_bytes=self.dense_fp16_bytes, bytes=self.bytes, flops_dense=self.flops_dense,
                 flops=self.flops, sparsity=1.0 - self.nnz / (self.rows * self.cols) if self.rows * self.cols else 0.0)
        return d


def rows_from_config(cfg: ModelConfig, sparsity: float, fmt: str = "bitmap", value_dtype: str = "fp16",
                     include_head: bool = False) -> List[LayerRow]:
    """Every projection at a uniform ``sparsity`` (nnz rounded to the nearest integer)."""
    out = [LayerRow(f"layers.{i}.{n}", r, c, int(round((1.0 - sparsity) * r * c)), fmt, value_dtype, b)
           for i in range(cfg.n_layers) for n, r, c, b in cfg.layer_projections()]
    if include_head:
        r, c = cfg.vocab_size, cfg.d_model
        out.append(LayerRow("lm_head", r, c, int(round((1.0 - sparsity) * r * c)), fmt, value_dtype, False))
    return out


def rows_from_model(model, fmt: str = "bitmap", value_dtype: str = "fp16", include_head: bool = False) -> List[LayerRow]:
    """Sparse layers as stored; dense ``nn.Linear`` layers as if stored in ``fmt`` with their exact zeros."""
    import torch.nn as nn

    out = []
    for name, mod in model.linear_layers(include_head=True):
        if name == "lm_head" and not include_head and not getattr(mod, "is_sparse_linear", False):
            continue
        if getattr(mod, "is_sparse_linear", False) and hasattr(mod, "values"):
            out.append(LayerRow(name, mod.out_features, mod.in_features, mod.nnz, mod.format,
                                DTYPE_NAMES[mod.values.dtype], mod.bias is not None))
        elif isinstance(mod, nn.Linear):
            w = mod.weight
            out.append(LayerRow(name, w.shape[0], w.shape[1], int((w != 0).sum()), fmt, value_dtype,
                                mod.bias is not None))
    return out


def head_storage(model) -> Tuple[Optional[str], int]:
    """(dtype name, group size) of a dense LM head stored in its own dtype (``LowPrecisionLinear``,
    ``QuantizedLinear``), else (None, 0): the ``head_dtype`` / ``head_group_size`` of ``account``."""
    head = getattr(model, "lm_head", None)
    if getattr(head, "qweight", None) is not None:
        return "int8", int(head.group_size)
    if type(head).__name__ == "LowPrecisionLinear":
        return DTYPE_NAMES[head.weight.dtype], 0
    return None, 0


def rows_from_meta(meta: Dict[str, Any]) -> List[LayerRow]:
    return [LayerRow(n, v["shape"][0], v["shape"][1], v["nnz"], v["format"], v["dtype"], v["bias"])
            for n, v in meta["layers"].items()]


def head_nbytes(rows: int, cols: int, dtype: str, group_size: int = 0) -> int:
    """Bytes of a dense LM head stored in ``dtype`` (int8: with its fp32 scales)."""
    if dtype == "int8":
        return q8_nbytes(rows, cols, group_size)
    return format_nbytes("dense", rows, cols, 0, dtype)


def account(cfg: ModelConfig, rows: List[LayerRow], context: int = 512, head_dtype: Optional[str] = None,
            tied_in_source: Optional[bool] = None, head_group_size: int = 0) -> Dict[str, Any]:
    """Per-layer and whole-model bytes and FLOPs per token (see the module docstring).
    ``head_group_size``: columns per scale of an int8 head (0: one scale a row)."""
    d, V = cfg.d_model, cfg.vocab_size
    norm_params = d if cfg.norm == "rmsnorm" else 2 * d
    names = {r.name for r in rows}
    head_sparse = "lm_head" in names
    tied = cfg.tie_embeddings if tied_in_source is None else tied_in_source
    proj = [r for r in rows if r.name != "lm_head"]
    sparse_layers = [r for r in rows if r.format != "dense"]

    embed_bytes = 2 * V * d
    if head_sparse:
        head_row = next(r for r in rows if r.name == "lm_head")
        head_bytes, head_dense16 = head_row.bytes, head_row.dense_fp16_bytes
        head_flops = head_row.flops
        head_kind = "sparse (untied copy)"
    else:
        hdt = head_dtype or "fp16"
        head_dense16 = 0 if tied else 2 * V * d
        head_bytes = 0 if (tied and head_dtype is None) else head_nbytes(V, d, hdt, head_group_size)
        head_flops = 2 * V * d
        if hdt == "int8":
            hdt = f"int8 ({'groups of ' + str(head_group_size) if head_group_size else 'one scale a row'})"
        head_kind = ("tied to the embedding" if tied and head_dtype is None else f"dense {hdt}" +
                     (" (untied copy)" if tied else ""))
    norms_bytes = 2 * norm_params * (2 * cfg.n_layers + 1)
    attn_flops = cfg.n_layers * 4 * cfg.n_heads * cfg.head_dim * context

    dense_proj_bytes = sum(r.dense_fp16_bytes for r in proj)
    sparse_proj_bytes = sum(r.bytes for r in proj)
    dense_total = embed_bytes + (0 if tied else 2 * V * d) + dense_proj_bytes + norms_bytes
    sparse_total = embed_bytes + head_bytes + sparse_proj_bytes + norms_bytes
    dense_flops = sum(r.flops_dense for r in proj) + 2 * V * d + attn_flops
    sparse_flops = sum(r.flops for r in proj) + head_flops + attn_flops
    sl_dense = sum(r.dense_fp16_bytes for r in sparse_layers)
    sl_bytes = sum(r.bytes for r in sparse_layers)
    nnz = sum(r.nnz for r in sparse_layers)
    elems = sum(r.rows * r.cols for r in sparse_layers)
    return {
        "model": cfg.name,
        "context": context,
        "layers": [r.as_dict() for r in rows],
        "sparse_layers": {
            "count": len(sparse_layers), "nnz": nnz, "elements": elems,
            "sparsity": 1.0 - nnz / elems if elems else 0.0,
            "dense_fp16_bytes": sl_dense, "bytes": sl_bytes, "ratio": sl_bytes / sl_dense if sl_dense else 0.0,
        },
        "embedding": {"bytes_fp16": embed_bytes, "share_of_dense_model": embed_bytes / dense_total},
        "lm_head": {"kind": head_kind, "bytes": head_bytes, "flops_per_token": head_flops,
                    "dense_flops_share": 2 * V * d / dense_flops},
        "whole_model": {
            "dense_fp16_bytes": dense_total, "bytes": sparse_total, "memory_ratio": sparse_total / dense_total,
            "dense_flops_per_token": dense_flops, "flops_per_token": sparse_flops,
            "compute_ratio": sparse_flops / dense_flops, "attention_flops_per_token": attn_flops,
        },
        "seed": {"memory_ratio": SEED_MEMORY_RATIO, "compute_ratio": SEED_COMPUTE_RATIO},
    }


def decode_weight_bytes(model) -> Dict[str, int]:
    """Weight bytes one batch-1 decode step streams, from the tensors the model holds as they are stored.

    Every decoder projection and the LM head with all their tensors (values, mask, row pointers,
    scales, biases; whatever class: dense ``nn.Linear`` in its dtype, ``SparseLinear``, a
    low-precision or quantized head), the norms, and one embedding row (the whole embedding when
    the head is tied to it: it is then the head). The KV cache and activations are not counted.
    """
    seen = set()

    def tensor_bytes(module) -> int:
        total = 0
        for t in list(module.parameters()) + list(module.buffers()):
            key = (t.data_ptr(), t.numel(), t.dtype)
            if key in seen:
                continue
            seen.add(key)
            total += t.numel() * t.element_size()
        return total

    head = tensor_bytes(model.lm_head)
    projections = sum(tensor_bytes(m) for _, m in model.linear_layers(include_head=False))
    norms = sum(tensor_bytes(m) for m in model.modules() if "norm" in type(m).__name__.lower())
    emb = model.embed.weight
    embed_row = 0 if (emb.data_ptr(), emb.numel(), emb.dtype) in seen else emb.shape[1] * emb.element_size()
    return {"projections": projections, "lm_head": head, "norms": norms, "embedding_row": embed_row,
            "total": projections + head + norms + embed_row}


def _mb(n: float) -> str:
    return f"{n / 1e6:9.2f}"


def format_table(result: Dict[str, Any], per_layer: bool = True) -> str:
    """A human-readable table of ``account``'s result."""
    lines = []
    if per_layer:
        lines.append(f"{'layer':<28} {'shape':>12} {'format':>7} {'dtype':>5} {'sparsity':>8} "
                     f"{'fp16 MB':>9} {'sparse MB':>9} {'ratio':>6} {'MFLOP/tok':>10}")
        for r in result["layers"]:
            lines.append(f"{r['name']:<28} {str(r['rows']) + 'x' + str(r['cols']):>12} {r['format']:>7} "
                         f"{r['value_dtype']:>5} {r['sparsity']:8.3f} {_mb(r['dense_fp16_bytes'])} {_mb(r['bytes'])} "
                         f"{r['bytes'] / r['dense_fp16_bytes']:6.3f} {r['flops'] / 1e6:10.2f}")
        lines.append("")
    s, w = result["sparse_layers"], result["whole_model"]
    lines.append(f"model {result['model']}: {s['count']} sparse layers, sparsity {s['sparsity']:.3f}")
    lines.append(f"  sparse layers: {_mb(s['dense_fp16_bytes']).strip()} MB dense fp16 -> {_mb(s['bytes']).strip()} MB "
                 f"({100 * s['ratio']:.1f}% of dense fp16, all index bytes included)")
    lines.append(f"  embedding (dense fp16): {_mb(result['embedding']['bytes_fp16']).strip()} MB "
                 f"({100 * result['embedding']['share_of_dense_model']:.1f}% of the dense model)")
    lines.append(f"  LM head: {result['lm_head']['kind']}, {_mb(result['lm_head']['bytes']).strip()} MB, "
                 f"{result['lm_head']['flops_per_token'] / 1e6:.1f} MFLOP/token "
                 f"(dense head = {100 * result['lm_head']['dense_flops_share']:.1f}% of dense FLOPs)")
    lines.append(f"  whole model memory: {_mb(w['dense_fp16_bytes']).strip()} MB dense fp16 -> {_mb(w['bytes']).strip()} MB "
                 f"= {100 * w['memory_ratio']:.1f}%   (seed: {100 * result['seed']['memory_ratio']:.0f}%)")
    lines.append(f"  whole model compute at context {result['context']}: {w['dense_flops_per_token'] / 1e6:.1f} -> "
                 f"{w['flops_per_token'] / 1e6:.1f} MFLOP/token = {100 * w['compute_ratio']:.1f}%   "
                 f"(seed: {100 * result['seed']['compute_ratio']:.0f}%; attention "
                 f"{w['attention_flops_per_token'] / 1e6:.1f} MFLOP/token)")
    return "\n".join(lines)
