"""Decoder-only transformer in plain PyTorch: the Llama family and the Luminous shape.

Llama: RMSNorm, SwiGLU MLP, rotary embeddings, grouped-query attention, tied or
untied LM head. Luminous (the seed's model): LayerNorm, GELU MLP with bias,
rotary embeddings. Every projection is an ordinary ``nn.Linear`` so pruning and
sparse conversion can find and replace it (see ``linear_layers``).

Shapes: B batch, T new tokens, S attended positions, nh heads, nkv key/value
heads, hd head dim, D d_model.
"""
from __future__ import annotations

import math
from typing import Dict, Iterator, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import ModelConfig


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32 whatever the storage dtype (as the reference implementations do).
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


def make_norm(cfg: ModelConfig) -> nn.Module:
    if cfg.norm == "rmsnorm":
        return RMSNorm(cfg.d_model, cfg.norm_eps)
    return nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps)


def rope_tables(cfg: ModelConfig, positions: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables for the given positions (T,) or (B, T): each (..., hd), "rotate half" layout."""
    hd = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.float32, device=positions.device) / hd))  # (hd/2,)
    angles = positions.to(torch.float32)[..., None] * inv_freq  # (..., T, hd/2)
    emb = torch.cat([angles, angles], dim=-1)  # (..., T, hd)
    return emb.cos(), emb.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x: (B, nh, T, hd); cos/sin: (T, hd), or (B, 1, T, hd) with per-row positions
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    if x.dtype == torch.float32:
        return x * cos + rotated * sin
    return (x.float() * cos + rotated.float() * sin).to(x.dtype)


class KVCache(nn.Module):
    """Key/value cache (B, nkv, max_len, hd), written at ``input_pos``.

    ``static``: every step attends over all ``max_len`` slots (masked), so shapes never change,
    as a compiled IPU graph needs; the write is then a one-hot blend + ``copy_`` (PopTorch 3.4
    has no handler for ``index_copy``; buffers are written with ``copy_``, as Graphcore's
    GPT-2 inference does). Otherwise steps attend over the filled prefix only.
    """

    def __init__(self, batch: int, n_kv_heads: int, max_len: int, head_dim: int, dtype: torch.dtype,
                 static: bool = False):
        super().__init__()
        self.static = static
        shape = (batch, n_kv_heads, max_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype), persistent=False)

    def update(self, input_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        # k, v: (B, nkv, T, hd) written at positions input_pos (T,)
        if not self.static:
            self.k.index_copy_(2, input_pos, k.to(self.k.dtype))
            self.v.index_copy_(2, input_pos, v.to(self.v.dtype))
            return self.k, self.v
        S = self.k.shape[2]
        onehot = input_pos[:, None] == torch.arange(S, device=input_pos.device)[None, :]  # (T, S)
        written = onehot.any(dim=0)[:, None]                                              # (S, 1)
        place = onehot.t().to(self.k.dtype)                                               # (S, T)
        # place @ k puts row t at slot input_pos[t] (exact: one 1 per written row, zeros elsewhere)
        self.k.copy_(torch.where(written, place @ k.to(self.k.dtype), self.k))             # (B, nkv, S, hd)
        self.v.copy_(torch.where(written, place @ v.to(self.v.dtype), self.v))
        return self.k, self.v


class Attention(nn.Module):
    """Multi-head attention with grouped-query heads, rotary positions and an optional KV cache.

    The cache mode is explicit (``KVCache.static``, chosen by ``Transformer.setup_cache``):

    * no cache / no ``input_pos``: causal attention over the ``T`` new tokens;
    * dynamic cache: attend over the ``filled`` cache positions (CPU generation);
    * static cache: attend over the whole cache, masked, with only ops PopTorch 3.4 lowers
      (matmul + masked softmax; no ``scaled_dot_product_attention`` or ``repeat_interleave``).
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        d, hd = cfg.d_model, cfg.head_dim
        self.q_proj = nn.Linear(d, cfg.n_heads * hd, bias=cfg.attn_bias)
        self.k_proj = nn.Linear(d, cfg.n_kv_heads * hd, bias=cfg.attn_bias)
        self.v_proj = nn.Linear(d, cfg.n_kv_heads * hd, bias=cfg.attn_bias)
        self.o_proj = nn.Linear(cfg.n_heads * hd, d, bias=cfg.attn_bias)
        self.kv_cache: Optional[KVCache] = None

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                input_pos: Optional[torch.Tensor] = None, filled: Optional[int] = None,
                left_pad: Optional[torch.Tensor] = None, attn_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``input_pos`` (T,): cache positions of the new tokens (uses the cache);
        ``filled``: number of valid cache positions (dynamic cache only);
        ``left_pad`` (B,): cache slots before each row's first real token, never attended to;
        ``attn_mask`` (B, 1, T, T) bool, True = may attend (no cache only): replaces the causal mask,
        e.g. for several continuations packed after one shared context."""
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, nh, T, hd)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, nkv, T, hd)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, nkv, T, hd)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)

        if self.kv_cache is None or input_pos is None:
            y = self._attend_causal(q, k, v, attn_mask)
        elif self.kv_cache.static:
            k_all, v_all = self.kv_cache.update(input_pos, k, v)
            y = self._attend_static(q, k_all, v_all, input_pos)
        else:
            if filled is None:
                raise ValueError("a dynamic KV cache needs `filled` (the number of valid positions)")
            k_all, v_all = self.kv_cache.update(input_pos, k, v)
            y = self._attend_prefix(q, k_all[:, :, :filled], v_all[:, :, :filled], input_pos, left_pad)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))  # (B, T, nh*hd)

    def _expand_kv(self, t: torch.Tensor) -> torch.Tensor:
        """Share each k/v head with its ``rep`` query heads: (B, nkv, S, hd) -> (B, nh, S, hd)."""
        rep = self.n_heads // self.n_kv_heads
        if rep == 1:
            return t
        B, nkv, S, hd = t.shape
        return t[:, :, None].expand(B, nkv, rep, S, hd).reshape(B, nkv * rep, S, hd)

    def _attend_causal(self, q, k, v, attn_mask=None) -> torch.Tensor:
        k, v = self._expand_kv(k.to(q.dtype)), self._expand_kv(v.to(q.dtype))
        if attn_mask is not None:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)  # (B, nh, T, hd)
        return F.scaled_dot_product_attention(q, k, v, is_causal=q.shape[2] > 1)  # (B, nh, T, hd)

    def _attend_prefix(self, q, k, v, input_pos, left_pad=None) -> torch.Tensor:
        B, nh, T, hd = q.shape
        slots = torch.arange(k.shape[2], device=q.device)  # (S,)
        if T == 1:
            # Decode step: every cached position is visible (but a row's left padding), so no causal
            # mask; the `rep` query heads sharing a k/v head become `rep` query rows of one matmul.
            mask = None if left_pad is None else (slots[None, :] >= left_pad[:, None])[:, None, None, :]  # (B, 1, 1, S)
            qg = q.reshape(B, self.n_kv_heads, nh // self.n_kv_heads, hd)  # (B, nkv, rep, hd)
            y = F.scaled_dot_product_attention(qg, k.to(q.dtype), v.to(q.dtype), attn_mask=mask)  # (B, nkv, rep, hd)
            return y.reshape(B, nh, 1, hd)
        # Query at position p sees cache positions <= p.
        mask = input_pos[:, None] >= slots[None, :]  # (T, S)
        if left_pad is not None:
            # ... and not the row's left padding; a padding query sees only itself (no empty softmax).
            real = (slots[None, None, :] >= left_pad[:, None, None]) | (input_pos[None, :, None] == slots[None, None, :])
            mask = (mask[None] & real)[:, None]  # (B, 1, T, S)
        k, v = self._expand_kv(k.to(q.dtype)), self._expand_kv(v.to(q.dtype))
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, nh, T, hd)

    def _attend_static(self, q, k, v, input_pos) -> torch.Tensor:
        """Explicit matmul + masked softmax over the whole static cache (IPU graph)."""
        B, nh, T, hd = q.shape
        nkv, S = self.n_kv_heads, k.shape[2]
        rep = nh // nkv
        # Fold the `rep` query heads sharing a k/v head into the query rows (no k/v copy).
        qg = q.reshape(B, nkv, rep * T, hd)                                           # (B, nkv, rep*T, hd)
        scores = qg.float() @ k.float().transpose(-1, -2) * (1.0 / math.sqrt(hd))     # (B, nkv, rep*T, S)
        # Query at position p sees cache positions <= p (later slots are empty or stale).
        visible = input_pos[:, None] >= torch.arange(S, device=q.device)[None, :]     # (T, S)
        scores = scores.view(B, nkv, rep, T, S).masked_fill(~visible, float("-inf"))  # (B, nkv, rep, T, S)
        probs = torch.softmax(scores, dim=-1).view(B, nkv, rep * T, S)
        y = probs.to(v.dtype) @ v                                                     # (B, nkv, rep*T, hd)
        return y.reshape(B, nh, T, hd).to(q.dtype)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.kind = cfg.mlp
        if cfg.mlp == "swiglu":
            self.gate_proj = nn.Linear(cfg.d_model, cfg.d_ff, bias=cfg.mlp_bias)
        self.up_proj = nn.Linear(cfg.d_model, cfg.d_ff, bias=cfg.mlp_bias)
        self.down_proj = nn.Linear(cfg.d_ff, cfg.d_model, bias=cfg.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "swiglu":
            return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
        return self.down_proj(F.gelu(self.up_proj(x)))


class Block(nn.Module):
    """Pre-norm decoder layer: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attn_norm = make_norm(cfg)
        self.attn = Attention(cfg)
        self.mlp_norm = make_norm(cfg)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                input_pos: Optional[torch.Tensor] = None, filled: Optional[int] = None,
                left_pad: Optional[torch.Tensor] = None, attn_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), cos, sin, input_pos, filled, left_pad, attn_mask)
        return x + self.mlp(self.mlp_norm(x))


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = make_norm(cfg)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        # True once untie_lm_head_ gave a tied head its own matrix: the dense source stored one
        # matrix for both (sparse checkpoints record it; the accounting's dense baseline counts it once).
        self.head_untied = False
        self.ipu_placement = None  # ipu.pipeline.IpuPlacement while parallelize_ has the model on IPUs
        self.cache_len = 0
        self.static_cache = False

    # ----- KV cache -------------------------------------------------------
    def setup_cache(self, batch: int, max_len: int, dtype: Optional[torch.dtype] = None, static: bool = False) -> None:
        """Allocate a (batch, max_len) KV cache. ``static``: attend over the whole cache
        every step (fixed shapes, as an IPU graph needs); otherwise only the filled prefix."""
        dtype = dtype or self.embed.weight.dtype
        device = self.embed.weight.device
        cfg = self.config
        for layer in self.layers:
            layer.attn.kv_cache = KVCache(batch, cfg.n_kv_heads, max_len, cfg.head_dim, dtype, static=static).to(device)
        self.cache_len, self.static_cache = max_len, static

    def keep_cache_rows_(self, rows: torch.Tensor) -> None:
        """Keep only the given batch rows (B',) of the KV cache (drop finished sequences)."""
        for layer in self.layers:
            c = layer.attn.kv_cache
            c.k, c.v = c.k.index_select(0, rows), c.v.index_select(0, rows)  # (B', nkv, max_len, hd)

    def clear_cache(self) -> None:
        for layer in self.layers:
            layer.attn.kv_cache = None
        self.cache_len = 0

    # ----- forward --------------------------------------------------------
    def rope(self, positions: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        return rope_tables(self.config, positions)

    def forward(self, idx: torch.Tensor, input_pos: Optional[torch.Tensor] = None,
                last_only: bool = False, left_pad: Optional[torch.Tensor] = None) -> torch.Tensor:
        """idx (B, T) token ids -> logits (B, T, vocab) in fp32 (or (B, 1, vocab) with ``last_only``).

        Without ``input_pos`` the sequence is processed causally from position 0 and no cache
        is used. With ``input_pos`` (T,) the tokens are written to the KV cache at those positions.
        ``left_pad`` (B,) (dynamic cache only): row b's first ``left_pad[b]`` cache slots are padding
        (prompts of different lengths in one batch); its tokens take positions ``input_pos - left_pad[b]``
        and attend to no padding slot.
        """
        B, T = idx.shape
        filled = None
        if input_pos is None:
            positions = torch.arange(T, device=idx.device)
        else:
            if self.cache_len == 0:
                raise RuntimeError("input_pos given but no KV cache: call setup_cache() first")
            positions = input_pos
            if not self.static_cache:  # a dynamic cache attends over the filled prefix only
                filled = int(input_pos[-1]) + 1
        if left_pad is not None:
            if input_pos is None or self.static_cache:
                raise RuntimeError("left_pad needs input_pos and a dynamic KV cache")
            positions = input_pos[None, :] - left_pad[:, None]  # (B, T)
        cos, sin = self.rope(positions)
        if left_pad is not None:
            cos, sin = cos[:, None], sin[:, None]  # (B, 1, T, hd): broadcast over heads
        x = self.embed(idx)  # (B, T, D)
        for layer in self.layers:
            x = layer(x, cos, sin, input_pos, filled, left_pad)
        x = self.norm(x)
        if last_only:
            x = x[:, -1:]
        return self.lm_head(x).float()

    # ----- introspection ----------------------------------------------------
    def linear_layers(self, include_head: bool = False) -> Iterator[Tuple[str, nn.Linear]]:
        """The decoder's projections (the ones pruning and sparse kernels act on), in execution order."""
        for i, layer in enumerate(self.layers):
            for name, mod in layer.named_modules():
                if isinstance(mod, nn.Linear) or getattr(mod, "is_sparse_linear", False):
                    yield f"layers.{i}.{name}", mod
        if include_head:
            yield "lm_head", self.lm_head

    def untie_lm_head_(self) -> "Transformer":
        """Give the LM head its own copy of the embedding matrix (so it can be pruned alone)."""
        if self.config.tie_embeddings:
            self.head_untied = True
        if self.lm_head.weight is self.embed.weight:
            self.lm_head.weight = nn.Parameter(self.embed.weight.detach().clone())
        self.config.tie_embeddings = False
        return self


def build_model(cfg: ModelConfig, dtype: torch.dtype = torch.float32, seed: Optional[int] = None,
                device: str = "cpu") -> Transformer:
    """A randomly initialised model (weights are normally loaded afterwards)."""
    if seed is not None:
        torch.manual_seed(seed)
    model = Transformer(cfg)
    std = 0.02
    for name, p in model.named_parameters():
        if p.dim() >= 2:
            nn.init.normal_(p, mean=0.0, std=std)
        elif name.endswith("bias"):
            nn.init.zeros_(p)
    return model.to(device=device, dtype=dtype).eval()


def param_names(cfg: ModelConfig) -> Dict[str, Tuple[int, ...]]:
    """Expected state-dict names and shapes for a config (tied head listed once, as ``embed.weight``)."""
    model = torch.device("meta")
    with model:
        m = Transformer(cfg)
    sd = {k: tuple(v.shape) for k, v in m.state_dict().items()}
    if cfg.tie_embeddings:
        sd.pop("lm_head.weight", None)
    return sd


def set_module(root: nn.Module, fqn: str, new: nn.Module) -> None:
    """Replace the submodule ``fqn`` (e.g. ``layers.0.attn.q_proj``) of ``root`` by ``new``."""
    parent_name, _, child = fqn.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)
