"""Model definitions: config validation, KV cache equals full forward, both families, Linear discovery."""
import pytest
import torch
import torch.nn as nn

from ipu_sparse.config import PRESETS, ModelConfig, get_preset
from ipu_sparse.errors import UserError
from ipu_sparse.model import build_model


@pytest.mark.parametrize("preset", ["tiny-llama", "tiny-luminous", "tiny-llama-4l"])
@pytest.mark.parametrize("static", [False, True])
def test_kv_cache_decode_matches_full_forward(preset, static):
    model = build_model(get_preset(preset), seed=1)
    idx = torch.randint(0, model.config.vocab_size, (2, 12))
    full = model(idx)  # (B, T, V)
    model.setup_cache(2, 16, static=static)
    prefill = model(idx[:, :5], input_pos=torch.arange(5))
    steps = [model(idx[:, t:t + 1], input_pos=torch.tensor([t])) for t in range(5, 12)]
    model.clear_cache()
    cached = torch.cat([prefill] + steps, dim=1)
    torch.testing.assert_close(cached, full, rtol=1e-5, atol=1e-5)


def test_causality(tiny_llama):
    idx = torch.randint(0, 256, (1, 10))
    a = tiny_llama(idx)
    idx2 = idx.clone()
    idx2[0, 7:] = (idx2[0, 7:] + 1) % 256
    b = tiny_llama(idx2)
    torch.testing.assert_close(a[:, :7], b[:, :7])
    assert not torch.allclose(a[:, 7:], b[:, 7:])


def test_linear_layers_are_plain_linears(tiny_llama, tiny_luminous):
    names = [n for n, _ in tiny_llama.linear_layers()]
    assert names[:7] == [f"layers.0.attn.{p}_proj" for p in "qkvo"] + [f"layers.0.mlp.{p}_proj" for p in ("gate", "up", "down")]
    assert len(names) == 7 * tiny_llama.config.n_layers
    lum = [n for n, _ in tiny_luminous.linear_layers()]
    assert "layers.0.mlp.gate_proj" not in lum and len(lum) == 6 * tiny_luminous.config.n_layers
    assert all(type(m) is nn.Linear for _, m in tiny_luminous.linear_layers(include_head=True))
    assert tiny_luminous.layers[0].mlp.up_proj.bias is not None
    assert isinstance(tiny_luminous.norm, nn.LayerNorm)


def test_tied_head_and_untie(tiny_llama):
    assert tiny_llama.lm_head.weight is tiny_llama.embed.weight
    tiny_llama.untie_lm_head_()
    assert tiny_llama.lm_head.weight is not tiny_llama.embed.weight
    torch.testing.assert_close(tiny_llama.lm_head.weight, tiny_llama.embed.weight)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_num_params_matches_built_model(name):
    cfg = get_preset(name)
    if cfg.num_params() > 5e8:
        pytest.skip("too large to build here; counted analytically only")
    model = build_model(cfg)
    n = sum(p.numel() for p in model.parameters())
    assert n == cfg.num_params()


def test_presets():
    smol = get_preset("smollm2-135m")
    assert 134e6 < smol.num_params() < 135e6
    lum = get_preset("luminous-base-13b")
    assert lum.d_model == 5120 and 12e9 < lum.num_params() < 15e9
    assert {"n_layers", "n_heads", "vocab_size"} <= set(lum.assumed)


@pytest.mark.parametrize("bad", [dict(d_model=65), dict(n_kv_heads=3), dict(norm="batchnorm"), dict(mlp="relu"), dict(n_layers=0)])
def test_bad_config_values_are_named(bad):
    with pytest.raises(UserError) as exc:
        get_preset("tiny-llama").replace(**bad)
    assert any(k in str(exc.value) for k in list(bad) + ["head", "d_model"])


def test_unknown_preset_and_fields():
    with pytest.raises(UserError, match="unknown model preset 'gpt5'"):
        get_preset("gpt5")
    with pytest.raises(UserError, match="unknown fields: colour"):
        ModelConfig.from_dict({"colour": 1})


def test_bf16_forward_close_to_fp32(tiny_llama):
    idx = torch.randint(0, 256, (1, 8))
    ref = tiny_llama(idx)
    low = build_model(get_preset("tiny-llama"), seed=0, dtype=torch.bfloat16)(idx)
    assert (ref - low).abs().max() < 0.05
