"""Model configuration: one dataclass, named presets.

The presets hold the real model (SmolLM2-135M), the seed's model shape
(Luminous Base 13B, partly assumed) and tiny configs for tests, side by side.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

from .errors import UserError


SIZE_LIMIT = 1 << 24  # upper bound of every size field of a config (vocabulary, widths, layers, context)


@dataclass
class ModelConfig:
    """Shape of a decoder-only transformer (Llama family or Luminous shape).

    ``norm``: "rmsnorm" (Llama) or "layernorm" (Luminous).
    ``mlp``: "swiglu" (gate/up/down, Llama) or "gelu" (up/down with bias, Luminous).
    """

    name: str = "custom"
    vocab_size: int = 32000
    d_model: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: Optional[int] = None  # grouped-query attention; None = n_heads
    d_ff: int = 11008
    max_seq_len: int = 2048
    norm: str = "rmsnorm"
    norm_eps: float = 1e-5
    mlp: str = "swiglu"
    attn_bias: bool = False
    mlp_bias: bool = False
    rope_theta: float = 10000.0
    tie_embeddings: bool = False
    bos_token_id: Optional[int] = None
    eos_token_id: Optional[int] = None
    # Fields that are guesses, not published facts (shown in --help and reports).
    assumed: Dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        self.validate()

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    def validate(self) -> None:
        for key in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "d_ff", "max_seq_len"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise UserError(f"model config {self.name!r}: {key} must be a positive integer, got {value!r}")
            if value > SIZE_LIMIT:  # a sane bound: products of sizes stay far inside int64 byte counts
                raise UserError(f"model config {self.name!r}: {key} {value} is beyond any model (limit {SIZE_LIMIT})")
        for key in ("norm_eps", "rope_theta"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < float("inf"):
                raise UserError(f"model config {self.name!r}: {key} must be a positive finite number, got {value!r}")
        for key in ("bos_token_id", "eos_token_id"):
            value = getattr(self, key)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
                raise UserError(f"model config {self.name!r}: {key} must be a token id or null, got {value!r}")
        for key in ("attn_bias", "mlp_bias", "tie_embeddings"):
            if not isinstance(getattr(self, key), bool):
                raise UserError(f"model config {self.name!r}: {key} must be true or false, got {getattr(self, key)!r}")
        if self.d_model % self.n_heads:
            raise UserError(f"model config {self.name!r}: d_model {self.d_model} is not divisible by n_heads {self.n_heads}")
        if self.n_heads % self.n_kv_heads:
            raise UserError(f"model config {self.name!r}: n_heads {self.n_heads} is not divisible by n_kv_heads {self.n_kv_heads}")
        if self.head_dim % 2:
            raise UserError(f"model config {self.name!r}: head_dim {self.head_dim} must be even for rotary embeddings")
        if self.norm not in ("rmsnorm", "layernorm"):
            raise UserError(f"model config {self.name!r}: unknown norm {self.norm!r} (rmsnorm, layernorm)")
        if self.mlp not in ("swiglu", "gelu"):
            raise UserError(f"model config {self.name!r}: unknown mlp {self.mlp!r} (swiglu, gelu)")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        if not isinstance(d, dict):
            raise UserError(f"model config must be an object, got {type(d).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(str(k) for k in set(d) - known)
        if unknown:
            raise UserError(f"model config has unknown fields: {', '.join(unknown)}")
        return cls(**d)

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    def check_context(self, tokens: int, what: str) -> None:
        """``UserError`` naming ``what`` if ``tokens`` do not fit the model's context."""
        if tokens > self.max_seq_len:
            raise UserError(f"{what} {tokens} exceeds the context of model {self.name!r} ({self.max_seq_len} tokens)")

    def layer_projections(self) -> List[Tuple[str, int, int, bool]]:
        """(name inside a decoder layer, out_features, in_features, has bias) of each projection of one
        decoder layer, in the model's order: the one table of projection shapes (``model.Transformer``
        builds exactly these, see tests/core/test_config.py; accounting and the IPU planner read it)."""
        d, q, kv, f = self.d_model, self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim, self.d_ff
        out = [("attn.q_proj", q, d, self.attn_bias), ("attn.k_proj", kv, d, self.attn_bias),
               ("attn.v_proj", kv, d, self.attn_bias), ("attn.o_proj", d, q, self.attn_bias)]
        if self.mlp == "swiglu":
            out.append(("mlp.gate_proj", f, d, self.mlp_bias))
        out += [("mlp.up_proj", f, d, self.mlp_bias), ("mlp.down_proj", d, f, self.mlp_bias)]
        return out

    def num_params(self, include_embeddings: bool = True) -> int:
        """Parameter count from the shape alone (no model needs to be built)."""
        d = self.d_model
        layer = sum(rows * cols + (rows if bias else 0) for _, rows, cols, bias in self.layer_projections())
        norm_params = d if self.norm == "rmsnorm" else 2 * d
        total = self.n_layers * (layer + 2 * norm_params) + norm_params
        if include_embeddings:
            total += self.vocab_size * d * (1 if self.tie_embeddings else 2)
        return total


_LUMINOUS_ASSUMED = {
    "n_layers": "40 (assumed: GPT-3-13B-like shape; not published)",
    "n_heads": "40 heads of 128 (assumed; not published)",
    "d_ff": "4 x d_model = 20480 (assumed; not published)",
    "vocab_size": "128000 (assumed; not published)",
    "norm": "layernorm (assumed; not published)",
    "mlp": "GELU with bias (assumed; not published)",
    "tie_embeddings": "untied (assumed; not published)",
}

PRESETS: Dict[str, ModelConfig] = {
    # HuggingFaceTB/SmolLM2-135M-Instruct (config.json of the release).
    "smollm2-135m": ModelConfig(
        name="smollm2-135m", vocab_size=49152, d_model=576, n_layers=30, n_heads=9, n_kv_heads=3,
        d_ff=1536, max_seq_len=8192, norm="rmsnorm", norm_eps=1e-5, mlp="swiglu",
        rope_theta=100000.0, tie_embeddings=True, bos_token_id=1, eos_token_id=2,
    ),
    # Aleph Alpha Luminous Base: public facts are decoder-only, rotary, ~13B, d_model 5120.
    "luminous-base-13b": ModelConfig(
        name="luminous-base-13b", vocab_size=128000, d_model=5120, n_layers=40, n_heads=40, n_kv_heads=40,
        d_ff=20480, max_seq_len=2048, norm="layernorm", norm_eps=1e-5, mlp="gelu",
        attn_bias=True, mlp_bias=True, rope_theta=10000.0, tie_embeddings=False,
        assumed=dict(_LUMINOUS_ASSUMED),
    ),
    # Tiny configs for tests: same code paths, seconds to run.
    "tiny-llama": ModelConfig(
        name="tiny-llama", vocab_size=256, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2,
        d_ff=128, max_seq_len=128, norm="rmsnorm", mlp="swiglu", tie_embeddings=True,
        bos_token_id=1, eos_token_id=2,
    ),
    "tiny-luminous": ModelConfig(
        name="tiny-luminous", vocab_size=256, d_model=64, n_layers=2, n_heads=4,
        d_ff=256, max_seq_len=128, norm="layernorm", mlp="gelu", attn_bias=True, mlp_bias=True,
        tie_embeddings=False,
    ),
    "tiny-llama-4l": ModelConfig(
        name="tiny-llama-4l", vocab_size=256, d_model=64, n_layers=4, n_heads=4, n_kv_heads=2,
        d_ff=128, max_seq_len=128, norm="rmsnorm", mlp="swiglu", tie_embeddings=False,
        bos_token_id=1, eos_token_id=2,
    ),
}

DEFAULT_MODEL = "smollm2-135m"


def get_preset(name: str) -> ModelConfig:
    """A fresh copy of a named preset (callers may modify it)."""
    if name not in PRESETS:
        raise UserError(f"unknown model preset {name!r}; known presets: {', '.join(sorted(PRESETS))}")
    return dataclasses.replace(PRESETS[name], assumed=dict(PRESETS[name].assumed))


def describe_presets() -> str:
    """One line per preset for --help, with the assumed fields marked."""
    lines = []
    for name, cfg in PRESETS.items():
        n = cfg.num_params()
        line = f"  {name:<18} {n / 1e6:9.1f}M params, d_model {cfg.d_model}, {cfg.n_layers} layers"
        if cfg.assumed:
            line += "; ASSUMED: " + ", ".join(sorted(cfg.assumed))
        lines.append(line)
    return "\n".join(lines)
