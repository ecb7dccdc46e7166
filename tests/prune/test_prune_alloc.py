"""Per-projection sparsity allocation (``PruneConfig.alloc_step``, ``driver.search_allocation``)."""
import copy

import pytest
import torch

from ipu_sparse.prune import PruneConfig, prune_
from ipu_sparse.prune.api import exact_counts
from ipu_sparse.prune.driver import ALLOC_AXES, offset_counts
from ipu_sparse.prune.owl import layer_outlier_ratios, owl_sparsities

LLAMA = ["attn.q_proj", "attn.k_proj", "attn.v_proj", "attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]


def _calib(n=8, L=24, seed=1):
    return torch.randint(3, 256, (n, L), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("offsets", [
    {"attn vs mlp": 0.05}, {"qk vs vo": -0.1}, {"gate/up vs down": 0.1},
    {"attn vs mlp": -0.05, "qk vs vo": 0.05, "gate/up vs down": -0.05}, {"attn vs mlp": 0.1, "qk vs vo": 0.05},
])
def test_offsets_keep_the_exact_layer_total(offsets):
    sizes = [4096, 1024, 1024, 4096, 11008, 11008, 11008]
    base = [3277, 819, 820, 3276, 8806, 8807, 8806]
    got = offset_counts(LLAMA, sizes, base, offsets)
    assert sum(got) == sum(base)
    assert all(0 <= c <= s for c, s in zip(got, sizes))
    sp = [c / s for c, s in zip(got, sizes)]
    d = offsets.get("attn vs mlp", 0.0)
    if d and "qk vs vo" not in offsets:  # attention as a whole moves by d
        attn = sum(got[:4]) / sum(sizes[:4]) - sum(base[:4]) / sum(sizes[:4])
        assert attn == pytest.approx(d, abs=1e-3)
    d = offsets.get("gate/up vs down", 0.0)
    if d:
        assert sp[4] - sp[6] == pytest.approx(d * (1 + 2), abs=1e-3)  # +d on gate/up, -2d on down (sizes 2:1)
    assert offset_counts(LLAMA, sizes, base, {}) == base
    assert offset_counts(LLAMA, sizes, base, {"attn vs mlp": 0.2}) is None  # attention past MAX_ALLOC_SPARSITY
    assert offset_counts(LLAMA, sizes, base, {"gate/up vs down": -0.5}) is None  # negative gate/up sparsity


def test_offsets_skip_a_missing_side():
    names = ["attn.q_proj", "attn.k_proj", "attn.v_proj", "attn.o_proj", "mlp.up_proj", "mlp.down_proj"]
    sizes, base = [64] * 4 + [256, 256], [51] * 4 + [205, 205]
    got = offset_counts(names, sizes, base, {"gate/up vs down": 0.1})  # Luminous: up vs down
    assert sum(got) == sum(base) and got[4] > base[4] and got[5] < base[5]
    assert [a[0] for a in ALLOC_AXES] == ["attn vs mlp", "qk vs vo", "gate/up vs down"]


@pytest.mark.parametrize("family, extra", [
    ("tiny_llama", dict(method="sparsegpt", owl=True, owl_nsamples=None)),
    ("tiny_luminous", dict(method="sparsegpt", dense_target=True, refit_iters=3)),
    ("tiny_llama", dict(method="wanda", owl=True, owl_nsamples=None)),
    ("tiny_luminous", dict(method="wanda")),
])
def test_allocation_keeps_each_layers_exact_budget(request, family, extra):
    model = request.getfixturevalue(family)
    probe = copy.deepcopy(model)
    config = PruneConfig(sparsity=0.8, alloc_step=0.1, alloc_nsamples=3, **extra)
    tokens = _calib()
    layer_sp = [0.8] * len(model.layers)
    if config.owl:
        layer_sp = owl_sparsities(layer_outlier_ratios(probe, tokens, config.owl_m), 0.8, config.owl_lambda)
    want = exact_counts(list(probe.linear_layers()), layer_sp, 0.8)
    out = prune_(model, config, tokens, progress=False)
    per_linear = out["report"]["per_linear"]
    moved = False
    for i in range(len(model.layers)):
        names = [n for n in want if n.startswith(f"layers.{i}.")]
        assert sum(per_linear[n]["zeros"] for n in names) == sum(want[n] for n in names)
        moved |= any(per_linear[n]["zeros"] != want[n] for n in names)
    assert moved, "the search never left the uniform split, so this test checks nothing"
    assert out["report"]["linear"]["zeros"] == round(0.8 * out["report"]["linear"]["numel"])
    assert len(out["alloc_offsets"]) == len(model.layers) and out["alloc_step"] == 0.1


def _layer0_error(model, dense, tokens):
    cos, sin = model.rope(torch.arange(tokens.shape[1]))
    with torch.no_grad():
        x = model.embed(tokens)
        return float((model.layers[0](x, cos, sin) - dense.layers[0](x, cos, sin)).pow(2).sum())


@pytest.mark.parametrize("method", ["sparsegpt", "wanda"])
def test_search_lowers_the_layer_output_error(tiny_llama, method):
    """Layer 0 sees the same inputs either way; with every window used to prune and to score and the
    statistics of the unpruned layer (``sequential="layer"``, as the candidates use), layer 0 is pruned
    exactly as the chosen candidate was, so its output error is below the uniform split's."""
    tokens = _calib(n=4)
    dense = copy.deepcopy(tiny_llama)
    uniform = copy.deepcopy(tiny_llama)
    prune_(uniform, PruneConfig(method=method, sparsity=0.8, sequential="layer"), tokens, progress=False)
    out = prune_(tiny_llama, PruneConfig(method=method, sparsity=0.8, sequential="layer", alloc_step=0.1,
                                         alloc_nsamples=4), tokens, progress=False)
    e_uniform, e_alloc = _layer0_error(uniform, dense, tokens), _layer0_error(tiny_llama, dense, tokens)
    assert any(out["alloc_offsets"][0].values())
    assert e_alloc < e_uniform


# ----- joint reconstruction (PruneConfig.recon_steps, driver.reconstruct_layer_) -----------------------------
@pytest.mark.parametrize("family, extra", [
    ("tiny_luminous", dict(method="sparsegpt", dense_target=True, refit_iters=2)),
    ("tiny_llama", dict(method="wanda", alloc_step=0.1, alloc_nsamples=2)),
])
def test_reconstruction_keeps_masks_and_lowers_the_layer_error(request, monkeypatch, family, extra):
    import ipu_sparse.prune.driver as driver

    model = request.getfixturevalue(family)
    dense = copy.deepcopy(model)
    plain = copy.deepcopy(model)
    tokens = _calib(n=4)
    seen = []
    original = driver.reconstruct_layer_

    def spy(layer, masks, *args, **kwargs):
        zeros = {name: (dict(layer.named_modules())[name].weight == 0).clone() for name in masks}
        assert all(torch.equal(z, ~masks[name]) for name, z in zeros.items())  # the masks are the pruned zeros
        out = original(layer, masks, *args, **kwargs)
        seen.append(out[1:])
        for name, z in zeros.items():  # no pruned weight came back, and the count is unchanged
            w = dict(layer.named_modules())[name].weight
            assert bool((w[z] == 0).all()) and int((w == 0).sum()) == int(z.sum())
        return out

    monkeypatch.setattr(driver, "reconstruct_layer_", spy)
    prune_(plain, PruneConfig(sparsity=0.8, **extra), tokens, progress=False)
    out = prune_(model, PruneConfig(sparsity=0.8, recon_steps=6, recon_lr=3e-3, recon_batch=2, **extra), tokens,
                 progress=False)
    assert len(seen) == len(model.layers)
    assert all(after <= before for before, after in seen), seen  # never up (steps that do not help are undone)
    assert seen[0][1] < seen[0][0], seen  # and down where they help
    assert out["report"]["linear"]["zeros"] == round(0.8 * out["report"]["linear"]["numel"])
    for (name, a), (_, b) in zip(model.linear_layers(), plain.linear_layers()):
        if name.startswith("layers.0."):  # layer 0 is pruned from the same inputs: same mask as without the steps
            assert torch.equal(a.weight == 0, b.weight == 0), name
    e_plain, e_recon = _layer0_error(plain, dense, tokens), _layer0_error(model, dense, tokens)
    assert e_recon < e_plain


def test_reconstruction_is_undone_when_it_does_not_help(tiny_llama):
    """A learning rate far too large makes the steps worse; the layer then keeps its pruned weights."""
    import ipu_sparse.prune.driver as driver

    plain = copy.deepcopy(tiny_llama)
    tokens = _calib(n=4)
    prune_(plain, PruneConfig(method="wanda", sparsity=0.8), tokens, progress=False)
    config = PruneConfig(method="wanda", sparsity=0.8, recon_steps=3, recon_lr=0.9)
    layer = copy.deepcopy(plain.layers[0])
    cos, sin = plain.rope(torch.arange(tokens.shape[1]))
    masks = {name: mod.weight != 0 for name, mod in layer.named_modules() if isinstance(mod, torch.nn.Linear)}
    with torch.inference_mode():
        x = plain.embed(tokens)
        out = layer(x, cos, sin)
        target = out + 0.01 * torch.randn_like(out)
        new, before, after = driver.reconstruct_layer_(layer, masks, x, out, target, cos, sin, config, 4)
    assert after == before and new is out
    for (_, a), (_, b) in zip(layer.named_parameters(), plain.layers[0].named_parameters()):
        assert torch.equal(a, b)


def test_cli_flags_reach_the_run(tmp_path, capsys):
    import json

    from ipu_sparse.cli import main

    calib = tmp_path / "calib.txt"
    calib.write_text("the quick brown fox jumps over the lazy dog " * 100 + "\n")
    out = tmp_path / "ckpt"
    rc = main(["prune", "--model", "tiny-llama", "--nsamples", "4", "--seq-len", "16", "--method", "wanda",
               "--sparsity", "0.8", "--calib", str(calib), "--alloc-step", "0.1", "--alloc-nsamples", "2",
               "--recon-steps", "2", "--recon-batch", "2", "--out", str(out)])
    assert rc == 0
    settings = json.loads((out / "pruning_report.json").read_text())["settings"]
    assert (settings["alloc_step"], settings["alloc_nsamples"], settings["recon_steps"], settings["recon_batch"]) == \
        (0.1, 2, 2, 2)
    assert len(settings["alloc_offsets"]) == 2
    for bad, match in ((["--recon-lr", "0"], "recon_lr=0.0"), (["--alloc-nsamples", "0"], "--alloc-nsamples 0")):
        rc = main(["prune", "--model", "tiny-llama", "--sparsity", "0.5", "--alloc-step", "0.1", "--recon-steps", "1"]
                  + bad + ["--out", str(tmp_path / "bad")])
        err = capsys.readouterr().err
        assert rc == 2 and match in err and "Traceback" not in err and not (tmp_path / "bad").exists()
