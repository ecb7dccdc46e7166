"""Read a llama.cpp GGUF file into our model: config, dequantized weights, tokenizer.

Supports the ``llama`` architecture (SmolLM2, Llama, Mistral-shaped models) with
F32/F16/BF16/Q8_0/Q4_0/Q4_1/K-quant tensors (whatever ``gguf.quants`` dequantizes).
llama.cpp's converter stores attn_q/attn_k rows permuted for its rotary kernel;
we undo that so the weights match the Hugging Face layout our model uses.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Dict, Optional, Tuple

import numpy as np
import torch

from ..checkpoint import model_skeleton
from ..config import ModelConfig
from ..errors import UserError

SUPPORTED_ARCHS = ("llama",)

# GGUF tensor name (per block) -> our state-dict name
_BLOCK_MAP = {
    "attn_norm.weight": "attn_norm.weight",
    "attn_q.weight": "attn.q_proj.weight",
    "attn_k.weight": "attn.k_proj.weight",
    "attn_v.weight": "attn.v_proj.weight",
    "attn_output.weight": "attn.o_proj.weight",
    "ffn_norm.weight": "mlp_norm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_TOP_MAP = {
    "token_embd.weight": "embed.weight",
    "output_norm.weight": "norm.weight",
    "output.weight": "lm_head.weight",
}


def open_gguf(path) -> "gguf.GGUFReader":  # noqa: F821
    import gguf

    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: GGUF file not found")
    with open(path, "rb") as fh:
        magic = fh.read(4)
    if magic != b"GGUF":
        raise UserError(f"{path}: not a GGUF file (magic {magic!r}, expected b'GGUF')")
    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as exc:  # the reader raises assorted errors on truncated or corrupt files
        raise UserError(f"{path}: corrupt or truncated GGUF file ({type(exc).__name__}: {exc})") from None
    size = os.path.getsize(path)
    for t in reader.tensors:
        end = int(t.data_offset) + int(t.n_bytes)
        if end > size:
            raise UserError(f"{path}: truncated GGUF file: tensor {t.name} ends at byte {end}, file has {size}")
    return reader


def field_value(reader, key: str, default=None):
    """A metadata value as a Python object (str, int, float, list)."""
    field = reader.fields.get(key)
    if field is None:
        return default
    try:
        return field.contents()
    except (UnicodeDecodeError, ValueError, TypeError, IndexError) as exc:  # a corrupt string or array
        raise UserError(f"GGUF metadata {key}: unreadable value ({type(exc).__name__}: {exc})") from None


def config_from_gguf(reader, path) -> ModelConfig:
    arch = field_value(reader, "general.architecture")
    if arch not in SUPPORTED_ARCHS:
        raise UserError(f"{path}: unsupported GGUF architecture {arch!r} (supported: {', '.join(SUPPORTED_ARCHS)})")

    def need(key):
        v = field_value(reader, f"{arch}.{key}")
        if v is None:
            raise UserError(f"{path}: GGUF metadata lacks {arch}.{key}")
        return v

    names = {t.name for t in reader.tensors}
    tokens = field_value(reader, "tokenizer.ggml.tokens")
    vocab = field_value(reader, f"{arch}.vocab_size") or (len(tokens) if tokens else None)
    if vocab is None:
        raise UserError(f"{path}: GGUF metadata gives no vocabulary size")
    try:
        return _config(reader, path, arch, need, vocab, names)
    except UserError as exc:  # the config's own checks: name the file
        raise UserError(exc if str(exc).startswith(str(path)) else f"{path}: {exc}") from None
    except (TypeError, ValueError, OverflowError) as exc:  # a number field holding a string, a list, ...
        raise UserError(f"{path}: GGUF metadata value of the wrong type ({type(exc).__name__}: {exc})") from None


def _config(reader, path, arch, need, vocab, names) -> ModelConfig:
    n_heads = int(need("attention.head_count"))
    return ModelConfig(
        name=str(field_value(reader, "general.name", Path(path).stem)),
        vocab_size=int(vocab),
        d_model=int(need("embedding_length")),
        n_layers=int(need("block_count")),
        n_heads=n_heads,
        n_kv_heads=int(field_value(reader, f"{arch}.attention.head_count_kv", n_heads)),
        d_ff=int(need("feed_forward_length")),
        max_seq_len=int(field_value(reader, f"{arch}.context_length", 2048)),
        norm="rmsnorm",
        norm_eps=float(field_value(reader, f"{arch}.attention.layer_norm_rms_epsilon", 1e-5)),
        mlp="swiglu",
        rope_theta=float(field_value(reader, f"{arch}.rope.freq_base", 10000.0)),
        tie_embeddings="output.weight" not in names,
        bos_token_id=field_value(reader, "tokenizer.ggml.bos_token_id"),
        eos_token_id=field_value(reader, "tokenizer.ggml.eos_token_id"),
    )


def unpermute_rope(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Inverse of llama.cpp's ``permute``: (nh, 2, hd/2, in) interleaving back to halves."""
    out_dim = w.shape[0]
    return w.reshape(n_heads, out_dim // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def dequantize(tensor) -> np.ndarray:
    import gguf

    try:
        arr = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
    except NotImplementedError:
        raise UserError(f"GGUF tensor {tensor.name}: quantization type {tensor.tensor_type.name} is not supported") from None
    except (ValueError, TypeError, AssertionError) as exc:
        raise UserError(f"GGUF tensor {tensor.name}: data does not decode ({type(exc).__name__}: {exc})") from None
    shape = tuple(int(s) for s in reversed(tensor.shape.tolist()))  # GGUF lists ne0 (columns) first
    try:
        return np.asarray(arr, dtype=np.float32).reshape(shape)
    except ValueError:
        raise UserError(f"GGUF tensor {tensor.name}: {np.asarray(arr).size} values do not fill shape {shape}") from None


def load_gguf(path, dtype: torch.dtype = torch.float32, progress: bool = False) -> Tuple[ModelConfig, Dict[str, torch.Tensor]]:
    """Config and dequantized state dict (our names) from a GGUF file.

    The sizes the header claims (block count, widths, vocabulary) are checked against every
    tensor's real shape before anything is dequantized or built, so a lying header costs nothing."""
    reader = open_gguf(path)
    cfg = config_from_gguf(reader, path)
    named = [(t, n) for t, n in ((t, _our_name(t.name, path)) for t in reader.tensors) if n is not None]
    _check_claimed_shapes(named, cfg, path)
    sd: Dict[str, torch.Tensor] = {}
    if progress:
        from tqdm import tqdm

        named = tqdm(named, desc="dequantize", unit="tensor", leave=False)
    for t, ours in named:
        name = t.name
        w = dequantize(t)
        if rest_is(name, "attn_q.weight"):
            w = unpermute_rope(w, cfg.n_heads)
        elif rest_is(name, "attn_k.weight"):
            w = unpermute_rope(w, cfg.n_kv_heads)
        sd[ours] = torch.from_numpy(np.array(w, dtype=np.float32, copy=True)).to(dtype)
    return cfg, sd


def _our_name(name: str, path) -> Optional[str]:
    """Our state-dict name of GGUF tensor ``name`` (None for tensors we recompute, such as rope_freqs)."""
    if name.startswith("rope_freqs"):
        return None
    if name in _TOP_MAP:
        return _TOP_MAP[name]
    parts = name.split(".", 2)
    if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit():
        if parts[2].startswith("rope_freqs"):
            return None
        if parts[2] in _BLOCK_MAP:
            return f"layers.{int(parts[1])}.{_BLOCK_MAP[parts[2]]}"
    raise UserError(f"{path}: unexpected GGUF tensor {name}")


def _check_claimed_shapes(named, cfg: ModelConfig, path) -> None:
    """``UserError`` unless the tensors are exactly those of the header's config, shape for shape."""
    blocks = {ours.split(".")[1] for _, ours in named if ours.startswith("layers.")}
    if len(blocks) != cfg.n_layers:
        raise UserError(f"{path}: header claims {cfg.n_layers} blocks (block_count), the file holds tensors "
                        f"of {len(blocks)}")
    expected = {k: tuple(v.shape) for k, v in model_skeleton(cfg).state_dict().items()}
    if cfg.tie_embeddings:
        expected.pop("lm_head.weight", None)
    seen = set()
    for t, ours in named:
        shape = tuple(int(s) for s in reversed(t.shape.tolist()))  # GGUF lists ne0 (columns) first
        if ours not in expected:
            raise UserError(f"{path}: tensor {t.name} does not belong to the header's config")
        if shape != expected[ours]:
            raise UserError(f"{path}: tensor {t.name} has shape {shape}, the header's config implies {expected[ours]}")
        if ours in seen:
            raise UserError(f"{path}: tensor {t.name} appears twice")
        seen.add(ours)
    missing = sorted(set(expected) - seen)
    if missing:
        raise UserError(f"{path}: lacks {len(missing)} tensors the header's config needs, e.g. {missing[:3]}")


def rest_is(name: str, suffix: str) -> bool:
    return name.startswith("blk.") and name.endswith("." + suffix)
