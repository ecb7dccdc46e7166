"""Write a model to GGUF (llama architecture, F32/F16 tensors) so llama.cpp can run it.

The inverse of ``gguf_loader``: attn_q/attn_k rows are permuted the way llama.cpp's
converter does, and the tokenizer (byte-level BPE) is stored as ``tokenizer.ggml.*``.
Pruned weights stay exact zeros (GGUF has no sparse tensor type).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..errors import UserError
from ..fileio import atomic_file


def permute_rope(w: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's ``permute``: rotate-half layout -> interleaved pairs per head."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


_OURS_TO_GGUF = {
    "attn_norm.weight": "attn_norm.weight",
    "attn.q_proj.weight": "attn_q.weight",
    "attn.k_proj.weight": "attn_k.weight",
    "attn.v_proj.weight": "attn_v.weight",
    "attn.o_proj.weight": "attn_output.weight",
    "mlp_norm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}


def save_gguf(model, tokenizer, path, f16: bool = False) -> Path:
    import gguf

    cfg = model.config
    if cfg.norm != "rmsnorm" or cfg.mlp != "swiglu" or cfg.attn_bias or cfg.mlp_bias:
        raise UserError("GGUF export supports the Llama family only (RMSNorm, SwiGLU, no biases)")
    backend = getattr(tokenizer, "backend", None)
    if backend is None:
        raise UserError("GGUF export needs a byte-level BPE tokenizer")
    tok_json = json.loads(backend.to_str())
    vocab = tok_json["model"]["vocab"]
    merges = tok_json["model"].get("merges", [])
    merges = [m if isinstance(m, str) else " ".join(m) for m in merges]
    tokens = [None] * tokenizer.vocab_size
    for t, i in vocab.items():
        tokens[i] = t
    types = [1] * len(tokens)
    for added in tok_json.get("added_tokens", []):
        tokens[added["id"]] = added["content"]
        types[added["id"]] = 3 if added.get("special") else 4
    if any(t is None for t in tokens):
        raise UserError("tokenizer vocabulary has gaps; cannot export to GGUF")

    path = Path(path)
    with atomic_file(path) as tmp:
        w = gguf.GGUFWriter(str(tmp), "llama")
        w.add_name(cfg.name)
        w.add_block_count(cfg.n_layers)
        w.add_context_length(cfg.max_seq_len)
        w.add_embedding_length(cfg.d_model)
        w.add_feed_forward_length(cfg.d_ff)
        w.add_head_count(cfg.n_heads)
        w.add_head_count_kv(cfg.n_kv_heads)
        w.add_rope_freq_base(cfg.rope_theta)
        w.add_layer_norm_rms_eps(cfg.norm_eps)
        w.add_rope_dimension_count(cfg.head_dim)
        w.add_vocab_size(cfg.vocab_size)
        w.add_file_type(1 if f16 else 0)
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre("smollm" if any(p.get("type") == "Digits" for p in
                                           (tok_json.get("pre_tokenizer") or {}).get("pretokenizers", [])) else "gpt2")
        w.add_token_list(tokens)
        w.add_token_types(types)
        w.add_token_merges(merges)
        if tokenizer.bos_id is not None:
            w.add_bos_token_id(tokenizer.bos_id)
        if tokenizer.eos_id is not None:
            w.add_eos_token_id(tokenizer.eos_id)
        w.add_add_bos_token(False)
        if tokenizer.chat_template:
            w.add_chat_template(tokenizer.chat_template)
        sd = {k: v.detach().float().cpu().numpy() for k, v in model.state_dict().items()}
        for name, arr in sd.items():
            if name == "embed.weight":
                gname = "token_embd.weight"
            elif name == "norm.weight":
                gname = "output_norm.weight"
            elif name == "lm_head.weight":
                if cfg.tie_embeddings:
                    continue
                gname = "output.weight"
            else:
                _, i, rest = name.split(".", 2)
                gname = f"blk.{i}.{_OURS_TO_GGUF[rest]}"
                if rest == "attn.q_proj.weight":
                    arr = permute_rope(arr, cfg.n_heads)
                elif rest == "attn.k_proj.weight":
                    arr = permute_rope(arr, cfg.n_kv_heads)
            arr = np.ascontiguousarray(arr.astype(np.float16 if (f16 and arr.ndim == 2) else np.float32))
            w.add_tensor(gname, arr)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
    return path
