"""The one magnitude pruner (``prune_`` methods, ``magnitude_prune_``, ``magnitude_masks``) and the
keep-mask convention (True = kept) of every solver."""
import copy

import pytest
import torch

import ipu_sparse.prune.driver as driver
from ipu_sparse.prune import PruneConfig, magnitude_masks, magnitude_prune_, prune_
from ipu_sparse.prune.common import InputStats
from ipu_sparse.prune.magnitude import Magnitude
from ipu_sparse.prune.sparsegpt import SparseGPT
from ipu_sparse.prune.wanda import Wanda


def _zeros(w):
    return int((w == 0).sum())


def test_magnitude_runs_through_the_driver_without_a_forward_pass(monkeypatch, tiny_llama):
    def no_forward(*a, **k):
        raise AssertionError("magnitude pruning ran a calibration forward pass")

    monkeypatch.setattr(driver, "linear_groups", no_forward)
    monkeypatch.setattr(driver, "hooked_pass", no_forward)
    built = []
    real_init = Magnitude.__init__

    def init(self, layer, stats=None, scope="matrix"):
        built.append(layer)
        real_init(self, layer, stats, scope)

    monkeypatch.setattr(Magnitude, "__init__", init)
    out = prune_(tiny_llama, PruneConfig(method="magnitude", sparsity=0.6), progress=False)
    linears = [m for _, m in tiny_llama.linear_layers()]
    assert built == linears  # one solver per Linear, built by the driver, in execution order
    assert out["report"]["linear"]["zeros"] == round(0.6 * sum(m.weight.numel() for m in linears))
    assert out["nsamples"] is None


def test_magnitude_prune_exact_per_matrix_and_ties_by_position():
    lin = torch.nn.Linear(4, 2, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[1.0, -0.5, 0.5, 2.0], [0.5, 3.0, -0.5, 1.0]]))

    class M:
        def linear_layers(self, include_head=False):
            yield "layers.0.x", lin

    magnitude_prune_(M(), 0.625)  # 5 of 8: the four |w| = 0.5, then the first of the two |w| = 1.0
    assert lin.weight.tolist() == [[0.0, 0.0, 0.0, 2.0], [0.0, 3.0, 0.0, 1.0]]


@pytest.mark.parametrize("scope", ["matrix", "row"])
def test_magnitude_prune_exact_counts(tiny_luminous, scope):
    magnitude_prune_(tiny_luminous, 0.7, scope=scope)
    for _, m in tiny_luminous.linear_layers():
        w = m.weight
        if scope == "row":
            assert ((w == 0).sum(1) == round(0.7 * w.shape[1])).all()
        else:
            assert _zeros(w) == round(0.7 * w.numel())


def test_magnitude_prune_head_is_an_untied_copy(tiny_llama):
    emb = tiny_llama.embed.weight.detach().clone()
    magnitude_prune_(tiny_llama, 0.5, include_head=True)
    assert tiny_llama.lm_head.weight is not tiny_llama.embed.weight
    assert torch.equal(tiny_llama.embed.weight, emb)
    assert _zeros(tiny_llama.lm_head.weight) == round(0.5 * emb.numel())


def test_magnitude_masks_are_keep_masks_and_only_shrink(tiny_llama):
    before = copy.deepcopy(tiny_llama.state_dict())
    masks = magnitude_masks(tiny_llama, 0.5)
    for k, v in tiny_llama.state_dict().items():
        assert torch.equal(v, before[k])  # masks only: weights untouched
    pruned = copy.deepcopy(tiny_llama)
    magnitude_prune_(pruned, 0.5)
    for name, m in pruned.linear_layers():
        assert masks[name].dtype == torch.bool and masks[name].device.type == "cpu"
        assert torch.equal(masks[name], m.weight != 0)  # True = kept
    higher = magnitude_masks(pruned, 0.8, names=["layers.0.attn.q_proj"])
    assert list(higher) == ["layers.0.attn.q_proj"]
    assert not (higher["layers.0.attn.q_proj"] & ~masks["layers.0.attn.q_proj"]).any()


@pytest.mark.parametrize("cls, opts", [(Magnitude, {}), (Wanda, {}), (SparseGPT, {}), (SparseGPT, dict(refit_iters=5))])
def test_every_solver_returns_a_keep_mask(cls, opts):
    torch.manual_seed(0)
    X = torch.randn(128, 32)
    lin = torch.nn.Linear(32, 12, bias=False)
    s = cls(lin, InputStats(32, hessian=True))
    s.add_batch(X)
    keep = s.prune(0.75, **opts)
    assert keep.dtype == torch.bool and keep.shape == lin.weight.shape
    assert int(keep.sum()) == lin.weight.numel() - round(0.75 * lin.weight.numel())
    assert torch.equal(keep, lin.weight != 0)
