"""Bytes of each placeable unit of a model: sparse storage (CSR16 + PopSparse work lists),
dense parts, static KV cache and peak activations. Pure arithmetic over ``ModelConfig`` (projection
shapes from ``ModelConfig.layer_projections``, csr16 bytes from ``formats.CSR16``); used by
``planner`` (placement) and ``simulate`` (estimates).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

from ..config import ModelConfig
from ..sparse.formats import CSR16
from . import hardware as hw

VALUE_BYTES = {"fp16": 2, "fp32": 4}
MAX_UNIT_FRACTION = 0.5  # auto shard size: an embedding/head slice takes at most half an IPU


# ----- sparse storage bytes ------------------------------------------------------------------

STORAGE_FORMULA = ("ipu_sparse.sparse.formats.format_nbytes('csr16', ...) "
                   "(values + 2-byte column index + int32 row pointers)")  # recorded in the plan JSON


def csr16_nbytes(rows: int, cols: int, nnz: int, value_bytes: int) -> Dict[str, int]:
    """CSR16 storage (PopSparse's host format, 1x1 blocks), itemised: the csr16 format's own byte count
    (values, one 2-byte column index per non-zero -- 4 bytes beyond 65536 columns --, int32 row pointers)."""
    parts = CSR16.byte_parts(rows, cols, nnz, value_bytes)
    return {"values": parts["values"], "row_ptr": parts["row_ptr"], "indices": parts["col_idx"]}


def sparse_matrix_bytes(rows: int, cols: int, nnz: int, value_bytes: int) -> Dict[str, int]:
    """Storage of one sparse matrix on chip, itemised, plus PopSparse work-list overhead."""
    parts = csr16_nbytes(rows, cols, nnz, value_bytes)
    parts["worklists"] = int(parts["indices"] * hw.SPARSE_WORKLIST_OVERHEAD)
    parts["dense"] = 0
    return parts


# ----- units ---------------------------------------------------------------------------------

@dataclass
class Unit:
    """A placeable part of the model, in execution order."""

    name: str          # module path used by parallelize_: "embed", "embed.shards.0", "layers.3", "lm_head", ...
    kind: str          # "embed", "layer", "head"
    weights: Dict[str, int]
    kv_bytes: int = 0
    act_bytes: int = 0
    nnz: int = 0
    dense_params: int = 0      # parameters stored dense (embeddings, norms, biases, dense matrices)
    matrix_params: int = 0     # parameters of the prunable matrices (dense-equivalent)
    pinned_to: Optional[str] = None  # tied head shard: same IPU as this unit

    @property
    def weight_bytes(self) -> int:
        return sum(self.weights.values())

    @property
    def total_bytes(self) -> int:
        return self.weight_bytes + self.kv_bytes + self.act_bytes


def _layer_small_params(cfg: ModelConfig) -> int:
    """Norm weights and biases of one layer (kept dense)."""
    norm = cfg.d_model if cfg.norm == "rmsnorm" else 2 * cfg.d_model
    return 2 * norm + sum(rows for _, rows, _, bias in cfg.layer_projections() if bias)


def _layer_act_bytes(pc) -> int:
    """Peak live activations while one decoder layer runs (freed before the next layer)."""
    cfg, B, T, S = pc.model, pc.batch, pc.seq_len, pc.kv_len
    vb = VALUE_BYTES[pc.dtype]
    hd = cfg.head_dim
    resid = 2 * B * T * cfg.d_model * vb                                  # in + out
    qkv = B * T * (cfg.n_heads + 2 * cfg.n_kv_heads) * hd * vb
    scores = B * cfg.n_heads * T * S * 4                                  # softmax in fp32
    mlp = B * T * cfg.d_ff * vb * (2 if cfg.mlp == "swiglu" else 1)
    partials = B * T * max(cfg.d_ff, cfg.d_model) * hw.PARTIALS_BYTES
    return resid + qkv + scores + mlp + partials


def build_units(pc) -> List[Unit]:
    cfg = pc.model
    vb = VALUE_BYTES[pc.dtype]
    B, T = pc.batch, pc.seq_len
    usable = int(hw.get_ipu_type(pc.ipu_type).sram_bytes * (1 - pc.reserve_fraction))
    units: List[Unit] = []

    # Embedding (dense: rows are gathered), vocabulary-sharded when larger than half an IPU.
    embed_bytes = cfg.vocab_size * cfg.d_model * vb
    n_emb = pc.embed_shards or max(1, math.ceil(embed_bytes / (MAX_UNIT_FRACTION * usable)))
    for s, (a, b) in enumerate(shard_ranges(cfg.vocab_size, n_emb)):
        rows = b - a
        name = "embed" if n_emb == 1 else f"embed.shards.{s}"
        units.append(Unit(name, "embed", {"dense": rows * cfg.d_model * vb},
                          act_bytes=2 * B * T * cfg.d_model * 4, dense_params=rows * cfg.d_model))

    sparsity = pc.layer_sparsity()
    small = _layer_small_params(cfg)
    kv = 2 * B * pc.kv_len * cfg.n_kv_heads * cfg.head_dim * vb
    act = _layer_act_bytes(pc)
    for i in range(cfg.n_layers):
        parts = {"values": 0, "indices": 0, "row_ptr": 0, "worklists": 0, "dense": small * vb}
        nnz = mparams = 0
        for _, rows, cols, _ in cfg.layer_projections():
            mparams += rows * cols
            if pc.fmt == "dense":
                parts["dense"] += rows * cols * vb
                continue
            k = int(round(rows * cols * (1.0 - sparsity[i])))
            nnz += k
            for key, v in sparse_matrix_bytes(rows, cols, k, vb).items():
                parts[key] += v
        units.append(Unit(f"layers.{i}", "layer", parts, kv_bytes=kv, act_bytes=act, nnz=nnz,
                          dense_params=small + (mparams if pc.fmt == "dense" else 0), matrix_params=mparams))

    # Final norm + LM head.
    norm_params = cfg.d_model if cfg.norm == "rmsnorm" else 2 * cfg.d_model
    logit_tokens = 1 if pc.last_only else T
    sparse_head = pc.sparse_head and pc.fmt != "dense"
    head_sparsity = float(sum(sparsity) / len(sparsity)) if sparsity else 0.0
    if cfg.tie_embeddings:
        emb_units = [u for u in units if u.kind == "embed"]
        for s, ((a, b), eu) in enumerate(zip(shard_ranges(cfg.vocab_size, len(emb_units)), emb_units)):
            name = "lm_head" if len(emb_units) == 1 else f"lm_head.shards.{s}"
            w = {"dense": norm_params * vb} if s == 0 else {}
            units.append(Unit(name, "head", w, act_bytes=B * logit_tokens * (b - a) * 4,
                              dense_params=norm_params if s == 0 else 0, pinned_to=eu.name))
    else:
        head_bytes = cfg.vocab_size * cfg.d_model * vb
        if sparse_head:
            head_bytes = int(head_bytes * (1 - head_sparsity) * 2)  # values + 2-byte index (vb = 2)
        n_head = pc.head_shards or max(1, math.ceil(head_bytes / (MAX_UNIT_FRACTION * usable)))
        for s, (a, b) in enumerate(shard_ranges(cfg.vocab_size, n_head)):
            rows = b - a
            name = "lm_head" if n_head == 1 else f"lm_head.shards.{s}"
            if sparse_head:
                k = int(round(rows * cfg.d_model * (1 - head_sparsity)))
                parts = sparse_matrix_bytes(rows, cfg.d_model, k, vb)
                dense_p, nnz = 0, k
            else:
                parts = {"dense": rows * cfg.d_model * vb}
                dense_p, nnz = rows * cfg.d_model, 0
            if s == 0:
                parts["dense"] = parts.get("dense", 0) + norm_params * vb
                dense_p += norm_params
            units.append(Unit(name, "head", parts, act_bytes=B * logit_tokens * rows * 4 + B * T * cfg.d_model * 4,
                              nnz=nnz, dense_params=dense_p, matrix_params=rows * cfg.d_model if sparse_head else 0))
    return units


def shard_ranges(n: int, shards: int) -> List[Tuple[int, int]]:
    """Split range(n) into ``shards`` contiguous slices (earlier ones one longer when uneven)."""
    per, extra = divmod(n, shards)
    out, a = [], 0
    for s in range(shards):
        b = a + per + (1 if s < extra else 0)
        out.append((a, b))
        a = b
    return out
