"""Load a Hugging Face Llama-family checkpoint directory (config.json + *.safetensors)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, Tuple

import torch

from ..config import ModelConfig
from ..errors import UserError
from ..fileio import atomic_directory, read_json_object, read_safetensors

SUPPORTED_MODEL_TYPES = ("llama", "mistral")


def config_from_hf(hf: dict, path) -> ModelConfig:
    mt = hf.get("model_type")
    if mt not in SUPPORTED_MODEL_TYPES:
        raise UserError(f"{path}: unsupported model_type {mt!r} in config.json (supported: {', '.join(SUPPORTED_MODEL_TYPES)})")
    try:
        n_heads = int(hf["num_attention_heads"])
        eos = hf.get("eos_token_id")
        return ModelConfig(
            name=str(hf.get("_name_or_path") or Path(path).name),
            vocab_size=int(hf["vocab_size"]),
            d_model=int(hf["hidden_size"]),
            n_layers=int(hf["num_hidden_layers"]),
            n_heads=n_heads,
            n_kv_heads=int(hf.get("num_key_value_heads") or n_heads),
            d_ff=int(hf["intermediate_size"]),
            max_seq_len=int(hf.get("max_position_embeddings", 2048)),
            norm="rmsnorm",
            norm_eps=float(hf.get("rms_norm_eps", 1e-5)),
            mlp="swiglu",
            attn_bias=bool(hf.get("attention_bias", False)),
            mlp_bias=bool(hf.get("mlp_bias", False)),
            # transformers 5 writes rope_theta inside rope_parameters
            rope_theta=float(hf.get("rope_theta") or (hf.get("rope_parameters") or {}).get("rope_theta", 10000.0)),
            tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
            bos_token_id=hf.get("bos_token_id"),
            eos_token_id=eos[0] if isinstance(eos, list) else eos,
        )
    except KeyError as exc:
        raise UserError(f"{path}: config.json lacks {exc.args[0]}") from None
    except UserError as exc:  # the config's own checks: name the file
        raise UserError(f"{path}/config.json: {exc}") from None
    except (TypeError, ValueError, OverflowError, AttributeError, IndexError) as exc:  # a string, a list, null, []
        raise UserError(f"{path}: config.json has a value of the wrong type ({type(exc).__name__}: {exc})") from None


def hf_to_ours(name: str) -> str:
    if name.startswith("model."):
        name = name[len("model."):]
    name = name.replace("embed_tokens.", "embed.")
    name = name.replace(".self_attn.", ".attn.")
    name = name.replace(".input_layernorm.", ".attn_norm.")
    name = name.replace(".post_attention_layernorm.", ".mlp_norm.")
    return name


def ours_to_hf(name: str) -> str:
    if name == "lm_head.weight":
        return name
    name = name.replace("embed.", "embed_tokens.")
    name = name.replace(".attn.", ".self_attn.")
    name = name.replace(".attn_norm.", ".input_layernorm.")
    name = name.replace(".mlp_norm.", ".post_attention_layernorm.")
    return "model." + name


def read_shards(path: Path) -> Dict[str, torch.Tensor]:
    """Every tensor of a Hugging Face directory's ``*.safetensors`` shards, under its stored name
    (rotary ``inv_freq`` buffers, which some exporters save, are dropped: they are recomputed)."""
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise UserError(f"{path}: no *.safetensors files")
    tensors: Dict[str, torch.Tensor] = {}
    for f in files:
        tensors.update((k, v) for k, v in read_safetensors(f).items() if not k.endswith("rotary_emb.inv_freq"))
    return tensors


def load_hf_dir(path, dtype: torch.dtype = torch.float32) -> Tuple[ModelConfig, Dict[str, torch.Tensor]]:
    path = Path(path)
    cfg_path = path / "config.json"
    if not cfg_path.is_file():
        raise UserError(f"{path}: no config.json (expected a Hugging Face model directory)")
    hf = read_json_object(cfg_path, "model configuration")
    cfg = config_from_hf(hf, path)
    sd = {hf_to_ours(k): v.to(dtype) for k, v in read_shards(path).items()}
    if cfg.tie_embeddings:
        sd.pop("lm_head.weight", None)
    return cfg, sd


def to_transformers(model):
    """The same weights as a ``transformers.LlamaForCausalLM`` (Llama family only)."""
    import transformers

    cfg = model.config
    if cfg.norm != "rmsnorm" or cfg.mlp != "swiglu" or cfg.mlp_bias:
        raise UserError("only Llama-family configs convert to transformers' LlamaForCausalLM")
    hf_cfg = transformers.LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, intermediate_size=cfg.d_ff,
        num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_kv_heads,
        max_position_embeddings=cfg.max_seq_len, rms_norm_eps=cfg.norm_eps, rope_theta=cfg.rope_theta,
        attention_bias=cfg.attn_bias, tie_word_embeddings=cfg.tie_embeddings,
        bos_token_id=cfg.bos_token_id, eos_token_id=cfg.eos_token_id,
    )
    hf = transformers.LlamaForCausalLM(hf_cfg).eval()
    sd = {ours_to_hf(k): v for k, v in model.state_dict().items()}
    missing, unexpected = hf.load_state_dict(sd, strict=False)
    missing = [m for m in missing if "rotary" not in m and not (cfg.tie_embeddings and m == "lm_head.weight")]
    if missing or unexpected:
        raise RuntimeError(f"transformers conversion: missing {missing[:3]}, unexpected {unexpected[:3]}")
    return hf.to(next(model.parameters()).dtype)


def hf_config(cfg: ModelConfig, dtype: torch.dtype) -> dict:
    """config.json of a transformers ``LlamaForCausalLM`` with ``cfg`` and weights in ``dtype``."""
    if cfg.norm != "rmsnorm" or cfg.mlp != "swiglu" or cfg.mlp_bias:
        raise UserError("only Llama-family configs export to a Hugging Face Llama directory")
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model, "intermediate_size": cfg.d_ff, "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads, "num_key_value_heads": cfg.n_kv_heads,
        "max_position_embeddings": cfg.max_seq_len, "rms_norm_eps": cfg.norm_eps, "rope_theta": cfg.rope_theta,
        "attention_bias": cfg.attn_bias, "tie_word_embeddings": cfg.tie_embeddings, "hidden_act": "silu",
        "bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id,
        "torch_dtype": str(dtype).replace("torch.", ""),
    }


def save_hf_dir(model, tokenizer, out, overwrite: bool = False):
    """Write config.json + model.safetensors (+ tokenizer) that transformers loads as LlamaForCausalLM."""
    from safetensors.torch import save_file

    cfg = model.config
    sd = {ours_to_hf(k): v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    if cfg.tie_embeddings:
        sd.pop("lm_head.weight", None)
    hf_cfg = hf_config(cfg, next(iter(sd.values())).dtype)
    with atomic_directory(out, overwrite) as tmp:
        save_file(sd, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(hf_cfg, indent=1))
        if tokenizer is not None and hasattr(tokenizer, "backend"):
            tokenizer.save(tmp)
    return out
