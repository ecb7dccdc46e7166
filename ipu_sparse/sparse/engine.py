"""Batch-1 decode of a whole model in C++: ``DecodeEngine`` (over ``_kernels.DecodeEngine``,
``csrc/decode_engine.cpp``).

Why a C++ step for the whole model rather than faster kernels: a torch decode step of SmolLM2-135M
makes ~210 projection calls and ~20 other ops per layer (~800 calls), each ~15 us of Python and
dispatcher overhead even for a 576x192 matrix: ~12 ms of per-call overhead in a ~15 ms token
(67 tok/s at 80% sparsity, bf16 values, fp16 head), when the weights read are only ~110 MB. The
engine makes one call per token and runs it (embedding lookup, 30 layers, LM head) in one OpenMP
parallel region with spin barriers (< 1 us) between the ops: the overhead left is ~180 barriers.

The engine reads the model's own tensors in place (no copies): dense ``nn.Linear`` /
``LowPrecisionLinear`` weights (fp32, bf16, fp16), bitmap ``SparseLinear`` values (fp32, bf16, fp16,
or int8 with per-row ``scales``), an int8 head with ``qweight`` / ``scales``, the tied embedding,
the norms (RMSNorm or LayerNorm), biases, SwiGLU or GELU MLPs. It shares the model's KV cache:
the torch path does the prefill (batched GEMMs), the engine continues decoding in the same
buffers. Anything else (csr16 layers, tensors off the CPU, an unknown module) makes
``DecodeEngine.from_model`` return None, logging at debug level which module made it fall back;
``generate`` then decodes through torch.

Usage (``generate.generate_batch`` does this for one sample on the CPU)::

    engine = DecodeEngine.from_model(model)          # or None
    model.setup_cache(1, max_len); model(prompt, input_pos=...)  # prefill through torch
    engine.attach_cache()                             # the model's KV cache and rope tables
    logits = engine.step(token_id, pos)               # (vocab,) fp32

``IPU_SPARSE_ENGINE=0`` (or ``generate(..., engine=False)``) turns it off.
"""
from __future__ import annotations

import logging
import os
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn as nn

from ..model import RMSNorm, Transformer
from . import kernels
from .linear import LowPrecisionLinear, SparseLinear

log = logging.getLogger(__name__)

ENV_SWITCH = "IPU_SPARSE_ENGINE"
_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def engine_enabled(flag: Optional[bool] = None) -> bool:
    """``flag`` when given, else the environment (``IPU_SPARSE_ENGINE=0`` turns the engine off)."""
    if flag is not None:
        return bool(flag)
    return os.environ.get(ENV_SWITCH, "1").strip().lower() not in ("0", "false", "no", "off")


class Unsupported(Exception):
    """The model has something the engine cannot read (the message names the module)."""


def _tensor(t: Optional[torch.Tensor], where: str, dtypes=_FLOAT_DTYPES) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise Unsupported(f"{where}: missing tensor")
    if t.device.type != "cpu":
        raise Unsupported(f"{where}: on {t.device}, the engine runs on the CPU")
    if t.dtype not in dtypes:
        raise Unsupported(f"{where}: dtype {t.dtype} not supported")
    if not t.is_contiguous():
        raise Unsupported(f"{where}: not contiguous")
    return t.detach()


def _bias(mod: nn.Module, where: str) -> Optional[torch.Tensor]:
    b = getattr(mod, "bias", None)
    return None if b is None else _tensor(b, f"{where}.bias")


def _matrix(mod: nn.Module, where: str, rows: int, cols: int):
    """(kind, rows, cols, tensors, bias) of one projection, as ``_kernels.DecodeEngine`` takes it."""
    if isinstance(mod, SparseLinear):
        if mod.format != "bitmap":
            raise Unsupported(f"{where}: {mod.format} layers are not read by the engine (bitmap only)")
        names = tuple(mod.tensor_names)
        dtypes = {"mask": (torch.uint8,), "row_ptr": (torch.int32,), "values": _FLOAT_DTYPES + (torch.int8,),
                  "scales": (torch.float32,)}
        if names not in (("mask", "row_ptr", "values"), ("mask", "row_ptr", "values", "scales")):
            raise Unsupported(f"{where}: bitmap tensors {names} not understood")
        tensors = [_tensor(getattr(mod, k), f"{where}.{k}", dtypes[k]) for k in names]
        if tensors[2].dtype == torch.int8 and len(tensors) != 4:
            raise Unsupported(f"{where}: int8 values without scales")
        kind = "bitmap"
    elif isinstance(mod, (nn.Linear, LowPrecisionLinear)):
        tensors, kind = [_tensor(mod.weight, f"{where}.weight")], "dense"
    elif isinstance(getattr(mod, "qweight", None), torch.Tensor) and isinstance(getattr(mod, "scales", None),
                                                                               torch.Tensor):
        tensors = [_tensor(mod.qweight, f"{where}.qweight", (torch.int8,)),
                   _tensor(mod.scales, f"{where}.scales", (torch.float32,))]
        groups = tensors[1].shape[-1] if tensors[1].dim() == 2 else 0
        if groups < 1 or cols % groups or (groups > 1 and (cols // groups) % 16):
            raise Unsupported(f"{where}: int8 group size {cols // max(groups, 1)} not supported (multiple of 16)")
        kind = "qdense"
    else:
        raise Unsupported(f"{where}: {type(mod).__name__} is not read by the engine")
    if (getattr(mod, "out_features", rows), getattr(mod, "in_features", cols)) != (rows, cols):
        raise Unsupported(f"{where}: shape ({mod.out_features}, {mod.in_features}), expected ({rows}, {cols})")
    return kind, rows, cols, tensors, _bias(mod, where)


def _norm(mod: nn.Module, where: str, kind: str, eps: float) -> List[Optional[torch.Tensor]]:
    if kind == "rmsnorm" and isinstance(mod, RMSNorm):
        got = mod.eps
        out = [_tensor(mod.weight, f"{where}.weight"), None]
    elif kind == "layernorm" and isinstance(mod, nn.LayerNorm) and mod.elementwise_affine:
        got = mod.eps
        out = [_tensor(mod.weight, f"{where}.weight"), _bias(mod, where)]
    else:
        raise Unsupported(f"{where}: {type(mod).__name__} is not the config's {kind}")
    if got != eps:
        raise Unsupported(f"{where}: eps {got} differs from the config's {eps}")
    return out


def engine_spec(model: nn.Module) -> Dict[str, object]:
    """The arguments of ``_kernels.DecodeEngine`` for ``model`` (views of its tensors); ``Unsupported``
    names the first module the engine cannot read."""
    if not isinstance(model, Transformer):
        raise Unsupported(f"model: {type(model).__name__} is not a Transformer")
    if getattr(model, "ipu_placement", None) is not None:
        raise Unsupported("model: placed on IPUs")
    cfg = model.config
    hd, d, f = cfg.head_dim, cfg.d_model, cfg.d_ff
    norms: List[Optional[torch.Tensor]] = []
    mats = []
    for i, layer in enumerate(model.layers):
        norms += _norm(layer.attn_norm, f"layers.{i}.attn_norm", cfg.norm, cfg.norm_eps)
        norms += _norm(layer.mlp_norm, f"layers.{i}.mlp_norm", cfg.norm, cfg.norm_eps)
        for name, rows, cols, _ in cfg.layer_projections():
            mats.append(_matrix(layer.get_submodule(name), f"layers.{i}.{name}", rows, cols))
    norms += _norm(model.norm, "norm", cfg.norm, cfg.norm_eps)
    mats.append(_matrix(model.lm_head, "lm_head", cfg.vocab_size, d))
    embed = _tensor(model.embed.weight, "embed.weight")
    config = [cfg.n_layers, d, cfg.n_heads, cfg.n_kv_heads, hd, f, cfg.vocab_size,
              0 if cfg.norm == "rmsnorm" else 1, 0 if cfg.mlp == "swiglu" else 1]
    return {"config": config, "eps": float(cfg.norm_eps), "embed": embed, "norms": norms, "mats": mats}


def unsupported_reason(model: nn.Module) -> Optional[str]:
    """Why the engine cannot run ``model`` (one line), or None when it can."""
    ext = kernels.load_extension()
    if ext is None:
        return f"no compiled extension ({kernels.BINDING.reason})"
    if not hasattr(ext, "DecodeEngine"):
        return "the compiled extension predates the decode engine; rebuild it"
    if kernels.get_backend() == "reference":
        return "sparse backend 'reference' selected"
    try:
        engine_spec(model)
    except Unsupported as exc:
        return str(exc)
    return None


class DecodeEngine:
    """One model's C++ decode step. Build it per generation (``from_model``): it holds views of the
    model's tensors as they are now."""

    def __init__(self, model: Transformer, core):
        self.model = model
        self.core = core

    @classmethod
    def from_model(cls, model: nn.Module, isa: str = "auto", bf16_dot: bool = False,
                   min_thread_bytes: int = 1 << 20, int8_dot: bool = True) -> Optional["DecodeEngine"]:
        """The engine for ``model``, or None (the reason logged at debug level; ``unsupported_reason``).

        ``isa``: "auto", "avx512" or "scalar" (the portable path). ``bf16_dot``: bitmap bf16 layers
        multiply bf16-rounded activations with AVX512-BF16 dot products instead of widening their
        values to fp32 (as dense bf16 weights always do). ``min_thread_bytes``: a model with fewer
        weight bytes per thread than this decodes on fewer of ``torch.get_num_threads()`` threads
        (a tiny model is faster on one; 0: always all of them). ``int8_dot``: int8 weights (bitmap
        values, a per-row int8 head) multiply activations quantized to 8 bits per op (one scale per
        vector) with VNNI dot products, 64 products per instruction; off: int8 widened to fp32
        against fp32 activations (slower; the perplexity cost of each is in docs/sparse.md)."""
        ext = kernels.load_extension()
        reason = None
        if ext is None or not hasattr(ext, "DecodeEngine") or kernels.get_backend() == "reference":
            reason = unsupported_reason(model)
        else:
            try:
                spec = engine_spec(model)
            except Unsupported as exc:
                reason = str(exc)
        if reason is not None:
            log.debug("decode engine not used: %s", reason)
            return None
        core = ext.DecodeEngine(isa=isa, bf16_dot=bool(bf16_dot), **spec)
        core.set_min_thread_bytes(int(min_thread_bytes))
        core.set_int8_dot(bool(int8_dot))
        return cls(model, core)

    def attach_cache(self) -> None:
        """Decode into the model's KV cache (``model.setup_cache(1, ...)`` first), with rope tables
        for every cache position from the model's own rope code."""
        model = self.model
        caches = [layer.attn.kv_cache for layer in model.layers]
        if model.cache_len <= 0 or any(c is None for c in caches):
            raise RuntimeError("DecodeEngine.attach_cache: no KV cache; call model.setup_cache(1, max_len) first")
        cos, sin = model.rope(torch.arange(model.cache_len))
        self.core.bind_cache([c.k for c in caches], [c.v for c in caches], cos.float().contiguous(),
                             sin.float().contiguous())

    def step(self, token_id: int, pos: int) -> torch.Tensor:
        """Feed ``token_id`` at cache position ``pos`` (positions < pos are filled): logits (vocab,) fp32."""
        return self.core.step(int(token_id), int(pos))

    def set_profile(self, on: bool = True) -> None:
        """Time each op kind (thread 0's view, barrier waits included) from now on."""
        self.core.set_profile(bool(on))

    def profile(self) -> List[Tuple[str, float]]:
        """(op kind, mean ms per step) since ``set_profile(True)``."""
        return [(name, float(ms)) for name, ms in self.core.profile()]

    @property
    def isa(self) -> str:
        return self.core.isa()
