import copy

import pytest
import torch

import ipu_sparse.prune.driver as driver
from ipu_sparse.errors import UserError
from ipu_sparse.prune import PruneConfig, prune_
from ipu_sparse.prune.common import InputStats
from ipu_sparse.prune.driver import linear_groups


def _calib(n=6, L=24):
    g = torch.Generator().manual_seed(1)
    return torch.randint(3, 256, (n, L), generator=g)


class _Recorder(InputStats):
    seen = []

    def add(self, inp, dense_inp=None, chunk=16384):
        _Recorder.seen.append(inp.detach().clone())
        super().add(inp, dense_inp, chunk)


def _record(monkeypatch, model, **kw):
    _Recorder.seen = []
    monkeypatch.setattr(driver, "InputStats", _Recorder)
    prune_(model, PruneConfig(**kw), _calib(), progress=False)
    return _Recorder.seen


@pytest.mark.parametrize("family", ["tiny_llama", "tiny_luminous"])
def test_groups_found_by_shared_input(request, family):
    model = request.getfixturevalue(family)
    x = torch.randn(1, 4, model.config.d_model)
    cos, sin = model.rope(torch.arange(4))
    names = [[n for n, _ in g] for g in linear_groups(model.layers[0], x, cos, sin)]
    mlp_first = [["mlp.gate_proj", "mlp.up_proj"]] if model.config.mlp == "swiglu" else [["mlp.up_proj"]]
    assert names == [["attn.q_proj", "attn.k_proj", "attn.v_proj"], ["attn.o_proj"]] + mlp_first + [["mlp.down_proj"]]


@pytest.mark.parametrize("family", ["tiny_llama", "tiny_luminous"])
@pytest.mark.parametrize("sequential", ["group", "layer"])
def test_next_layer_sees_pruned_outputs(request, monkeypatch, family, sequential):
    """Layer 1's statistics must come from the *pruned* layer 0; fails if dense outputs were fed forward."""
    model = request.getfixturevalue(family)
    dense = copy.deepcopy(model)
    seen = _record(monkeypatch, model, method="wanda", sparsity=0.7, sequential=sequential)
    n_groups = 4
    assert len(seen) == n_groups * len(model.layers)
    tokens = _calib()
    L = tokens.shape[1]
    cos, sin = model.rope(torch.arange(L))
    with torch.no_grad():
        pruned_in = model.layers[1].attn_norm(model.layers[0](model.embed(tokens), cos, sin))
        dense_in = dense.layers[1].attn_norm(dense.layers[0](dense.embed(tokens), cos, sin))
    got = seen[n_groups]  # layer 1, group 0 (q/k/v input)
    assert torch.allclose(got, pruned_in, atol=1e-5)
    assert not torch.allclose(got, dense_in, atol=1e-2)


def test_group_sequential_within_layer(monkeypatch, tiny_llama):
    """With sequential='group', o_proj's statistics see the pruned q/k/v; with 'layer', the dense ones."""
    model = tiny_llama
    dense = copy.deepcopy(model)
    seen_group = _record(monkeypatch, model, method="wanda", sparsity=0.7, sequential="group")
    seen_layer = _record(monkeypatch, copy.deepcopy(dense), method="wanda", sparsity=0.7, sequential="layer")
    tokens = _calib()
    cos, sin = model.rope(torch.arange(tokens.shape[1]))
    captured = {}

    def grab(m, inp):
        captured["o"] = inp[0].detach().clone()

    for mdl, key in ((model, "pruned"), (dense, "dense")):
        h = mdl.layers[0].attn.o_proj.register_forward_pre_hook(grab)
        with torch.no_grad():
            mdl.layers[0](mdl.embed(tokens), cos, sin)
        h.remove()
        captured[key] = captured.pop("o")
    # the pruned model's o_proj input depends on pruned q/k/v only (o itself does not feed it)
    assert torch.allclose(seen_group[1], captured["pruned"], atol=1e-5)
    assert torch.allclose(seen_layer[1], captured["dense"], atol=1e-5)
    assert not torch.allclose(seen_group[1], captured["dense"], atol=1e-2)


@pytest.mark.parametrize("sequential", ["group", "layer"])
def test_chunked_matches_single_pass(tiny_luminous, sequential):
    a, b = tiny_luminous, copy.deepcopy(tiny_luminous)
    prune_(a, PruneConfig(method="wanda", sparsity=0.6, sequential=sequential), _calib(), progress=False)
    prune_(b, PruneConfig(method="wanda", sparsity=0.6, sequential=sequential, batch_size=4), _calib(), progress=False)
    agree = total = 0
    for (_, x), (_, y) in zip(a.linear_layers(), b.linear_layers()):
        agree += int(((x.weight == 0) == (y.weight == 0)).sum())
        total += x.weight.numel()
    assert agree / total > 0.999


def test_dense_target_needs_one_pass(tiny_llama):
    with pytest.raises(UserError, match="one pass"):
        prune_(tiny_llama, PruneConfig(method="sparsegpt", sparsity=0.5, dense_target=True, batch_size=2), _calib(),
               progress=False)


def test_dense_target_runs_and_is_exact(tiny_llama):
    out = prune_(tiny_llama, PruneConfig(method="sparsegpt", sparsity=0.8, dense_target=True, refit_iters=5), _calib(),
                 progress=False)
    assert out["report"]["linear"]["zeros"] == round(0.8 * out["report"]["linear"]["numel"])


@pytest.mark.parametrize("kwargs, match", [
    (dict(method="nope", sparsity=0.5), "unknown pruning method"),
    (dict(method="wanda", sparsity=1.0), "outside"),
    (dict(method="wanda", sparsity=-0.1), "outside"),
    (dict(method="wanda", nm="4:4"), "smaller"),
    (dict(method="wanda", nm="2:3"), "not divisible"),
    (dict(method="wanda", nm="2:4", sparsity=0.7), "contradicts"),
    (dict(method="wanda", nm="2:4", owl=True), "OWL"),
    (dict(method="wanda"), "give a sparsity"),
])
def test_bad_arguments_leave_model_untouched(tiny_llama, kwargs, match):
    before = {k: v.clone() for k, v in tiny_llama.state_dict().items()}
    with pytest.raises(UserError, match=match):
        prune_(tiny_llama, PruneConfig(**kwargs), _calib(), progress=False)
    for k, v in tiny_llama.state_dict().items():
        assert torch.equal(v, before[k])
