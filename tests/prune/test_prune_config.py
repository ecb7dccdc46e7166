import pytest

from ipu_sparse.cli import main
from ipu_sparse.errors import UserError
from ipu_sparse.prune import METHODS, PruneConfig


def test_resolved_fields():
    c = PruneConfig(method="wanda", nm="2:4")
    assert (c.sparsity, c.prune_n, c.prune_m) == (0.5, 2, 4)
    c = PruneConfig(method="sparsegpt", sparsity="0.25", nm=(6, 8))
    assert (c.sparsity, c.prune_n, c.prune_m) == (0.25, 6, 8)
    c = PruneConfig(method="magnitude", sparsity=0.8)
    assert (c.sparsity, c.prune_n, c.prune_m) == (0.8, 0, 0)
    assert c.solver is METHODS["magnitude"]


@pytest.mark.parametrize("kwargs, needs", [
    (dict(method="magnitude"), False),
    (dict(method="magnitude-row"), False),
    (dict(method="magnitude", owl=True), True),
    (dict(method="magnitude", refit_iters=3), True),
    (dict(method="magnitude", alloc_step=0.05), True),
    (dict(method="magnitude", recon_steps=2), True),
    (dict(method="wanda"), True),
    (dict(method="sparsegpt"), True),
])
def test_needs_calibration(kwargs, needs):
    assert PruneConfig(sparsity=0.5, **kwargs).needs_calibration is needs


@pytest.mark.parametrize("kwargs, match", [
    (dict(method="nope", sparsity=0.5), "'nope'"),
    (dict(sparsity=1.0), "sparsity 1.0 is outside"),
    (dict(sparsity="x"), "'x' is not a number"),
    (dict(nm="2-4"), "'2-4'"),
    (dict(nm="2:4", sparsity=0.7), "sparsity 0.7 contradicts"),
    (dict(nm="2:4", owl=True), "OWL"),
    (dict(), "give a sparsity"),
    (dict(sparsity=0.5, owl_lambda=-0.1), "lambda -0.1"),
    (dict(sparsity=0.5, owl_m=0), "owl_m=0"),
    (dict(sparsity=0.5, owl_m="5"), "owl_m='5'"),
    (dict(sparsity=0.5, owl_nsamples=-1), "owl_nsamples=-1"),
    (dict(sparsity=0.5, nsamples=0), "nsamples=0"),
    (dict(sparsity=0.5, seq_len=1), "seq_len=1"),
    (dict(sparsity=0.5, sequential="block"), "'block'"),
    (dict(sparsity=0.5, batch_size=0), "batch_size=0"),
    (dict(sparsity=0.5, blocksize=0), "blocksize=0"),
    (dict(sparsity=0.5, percdamp=-1.0), "percdamp -1.0"),
    (dict(sparsity=0.5, refit_iters=-2), "refit_iters=-2"),
    (dict(sparsity=0.5, refit_iters=2.5), "refit_iters=2.5"),
    (dict(method="wanda", sparsity=0.5, dense_target=True), "sparsegpt only"),
    (dict(sparsity=0.5, dense_target=True, sequential="layer"), "sequential='group'"),
    (dict(sparsity=0.5, alloc_step=-0.05), "alloc_step=-0.05"),
    (dict(sparsity=0.5, alloc_step=0.6), "alloc_step=0.6"),
    (dict(sparsity=0.5, alloc_step=float("nan")), "alloc_step=nan"),
    (dict(sparsity=0.5, alloc_step="0.1"), "alloc_step='0.1'"),
    (dict(sparsity=0.5, alloc_step=0.05, alloc_nsamples=0), "alloc_nsamples=0"),
    (dict(sparsity=0.5, alloc_step=0.05, alloc_nsamples=1.5), "alloc_nsamples=1.5"),
    (dict(nm="2:4", alloc_step=0.05), "N:M pattern"),
    (dict(sparsity=0.5, recon_steps=-1), "recon_steps=-1"),
    (dict(sparsity=0.5, recon_steps=5, recon_lr=0.0), "recon_lr=0.0"),
    (dict(sparsity=0.5, recon_steps=5, recon_lr=float("inf")), "recon_lr=inf"),
    (dict(sparsity=0.5, recon_steps=5, recon_batch=0), "recon_batch=0"),
])
def test_bad_values_are_named(kwargs, match):
    with pytest.raises(UserError, match=match):
        PruneConfig(**kwargs)


def test_frozen_and_replace_revalidates():
    import dataclasses

    c = PruneConfig(method="wanda", sparsity=0.5)
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.sparsity = 2.0
    with pytest.raises(UserError, match="outside"):
        dataclasses.replace(c, sparsity=2.0)
    assert dataclasses.replace(c, nm="2:4", sparsity=None).prune_m == 4


def test_cli_reports_a_bad_setting_before_loading(tmp_path, capsys):
    out = tmp_path / "ckpt"
    rc = main(["prune", "--model", "tiny-llama", "--method", "wanda", "--sparsity", "0.5", "--owl", "--owl-lambda",
               "-0.5", "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 2 and "lambda -0.5" in err and "Traceback" not in err
    assert not out.exists()
    rc = main(["prune", "--model", "tiny-llama", "--sparsity", "0.5", "--alloc-step", "0.7", "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 2 and "alloc_step=0.7" in err and "Traceback" not in err
    assert not out.exists()
