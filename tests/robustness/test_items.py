"""One test per finding that is not a plain bad-input line: sparse students in recovery, lying and
NaN-holding GGUF headers, verification of every checkpoint kind, leftovers, umask, overflow."""
from __future__ import annotations

import json
import os
import resource
import time

import pytest
import torch

from ipu_sparse.errors import UserError

from .conftest import byte_bpe_tokenizer, run_cli

REC = ["recover", "--teacher", "tiny-llama", "--text", "{A}/text.txt", "--seq-len", "16", "--batch-size", "2",
       "--heldout-windows", "1", "--lr", "1e-2", "--no-progress"]


def _fmt(argv, **subs):
    return [a.format(**subs) for a in argv]


# ----- item 1: recovery accepts every checkpoint kind prune writes --------------------------------

@pytest.mark.parametrize("fmt", ["bitmap", "csr16"])
def test_recover_trains_a_sparse_student_and_writes_its_format_back(fmt, assets, tmp_path):
    from ipu_sparse.loading import load_model
    from ipu_sparse.recover.masks import masks_from_zeros

    student = assets["root"] / fmt
    before = load_model(str(student)).model
    argv = _fmt(REC, A=assets["A"]) + ["--student", str(student), "--steps", "3", "--stop-after", "2",
                                       "--out", str(tmp_path / "run")]
    res = run_cli(argv)
    assert res.rc == 0, res.err
    meta = json.loads((tmp_path / "run" / "ipu_sparse.json").read_text())
    assert meta["format"] == "sparse" and {v["format"] for v in meta["layers"].values()} == {fmt}
    after = load_model(str(tmp_path / "run"))  # loads: tensors match the metadata
    # trained: the kept values moved; the mask held: every pruned weight is still zero
    name, mod = next(iter(after.model.linear_layers()))
    ref = dict(before.linear_layers())[name]
    assert not torch.equal(mod.weight.float(), ref.weight.float())
    masks_before = masks_from_zeros(before)
    for n, m in after.model.linear_layers():
        assert not bool(((m.weight != 0) & ~masks_before[n]).any()), n
    # a sparse run directory resumes and finishes; generate runs on it
    res = run_cli(_fmt(REC, A=assets["A"]) + ["--student", str(student), "--steps", "3", "--resume",
                                              "--out", str(tmp_path / "run")])
    assert res.rc == 0, res.err
    assert json.loads(res.out)["finished"]
    res = run_cli(["generate", "--model", str(tmp_path / "run"), "--prompt", "hi", "--max-new-tokens", "3"])
    assert res.rc == 0, res.err


def test_dense_save_refuses_a_model_holding_sparse_layers(assets, tmp_path):
    from ipu_sparse.checkpoint import save_dense_checkpoint
    from ipu_sparse.loading import load_model

    lm = load_model(str(assets["root"] / "bitmap"))
    with pytest.raises(UserError, match="sparse layers"):
        save_dense_checkpoint(lm.model, lm.tokenizer, tmp_path / "out")
    assert not (tmp_path / "out").exists()


# ----- item 2: one bad line does not end a chat; a broken model's perplexity is inf, not a crash ------

def test_chat_refuses_an_invalid_line_and_goes_on(assets):
    res = run_cli(["chat", "--model", "tiny-llama", "--max-new-tokens", "2"], stdin=b"\xff\xfe\nhello\n/quit\n")
    assert res.rc == 0, res.err
    errors = [ln for ln in res.err.splitlines() if "error" in ln]
    assert len(errors) == 1 and "UTF-8" in errors[0]
    assert res.out  # the second line was answered (a tiny random model's text may be only whitespace)


def test_perplexity_of_a_broken_model_is_inf_not_a_traceback(assets, tmp_path):
    out = tmp_path / "r.json"
    res = run_cli(["eval", "--model", str(assets["root"] / "broken"), "--text", f"{assets['A']}/text.txt",
                   "--seq-len", "64", "--max-windows", "2", "--json", str(out)])
    assert res.rc == 0, res.err
    assert "ppl inf" in res.out
    assert json.loads(out.read_text())["text"]["ppl"] == float("inf")


# ----- items 3 and 7: a GGUF header's claims are checked before anything is built; NaN and bad eps ----

def _gguf(tmp_path, name="x.gguf", edit=None, config=None):
    from ipu_sparse.config import get_preset
    from ipu_sparse.loading.gguf_export import save_gguf
    from ipu_sparse.model import build_model

    tok, n_vocab = byte_bpe_tokenizer()
    model = build_model(get_preset("tiny-llama").replace(vocab_size=n_vocab), seed=2)
    if edit:
        edit(model)
    if config:
        for k, v in config.items():
            object.__setattr__(model.config, k, v)  # a lie the writer copies into the header
    return save_gguf(model, tok, tmp_path / name)


def _max_rss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@pytest.mark.parametrize("lie", [{"d_model": 4_000_000, "n_layers": 4000}, {"n_layers": 4000},
                                 {"d_model": 4_000_000}, {"vocab_size": 10 ** 9}, {"d_ff": 10 ** 8}])
def test_gguf_header_claims_are_checked_before_allocating(lie, tmp_path):
    from ipu_sparse.loading import load_model

    path = _gguf(tmp_path, config=lie)
    rss0, t0 = _max_rss_mb(), time.perf_counter()
    with pytest.raises(UserError, match="x.gguf"):
        load_model(str(path))
    assert time.perf_counter() - t0 < 20
    assert _max_rss_mb() - rss0 < 200  # MB: nothing of the claimed size was allocated


def test_gguf_with_nan_weights_is_refused_naming_the_tensor(tmp_path):
    from ipu_sparse.loading import load_model

    def poison(model):
        with torch.no_grad():
            model.layers[1].mlp.up_proj.weight[3, 4] = float("nan")

    with pytest.raises(UserError, match="layers.1.mlp.up_proj.weight"):
        load_model(str(_gguf(tmp_path, edit=poison)))


@pytest.mark.parametrize("eps", [-1e-5, 0.0, float("nan")])
def test_gguf_with_a_bad_norm_epsilon_is_refused(eps, tmp_path):
    from ipu_sparse.loading import load_model

    with pytest.raises(UserError, match="norm_eps"):
        load_model(str(_gguf(tmp_path, config={"norm_eps": eps})))


# ----- item 4: verification covers every checkpoint kind ------------------------------------------

@pytest.mark.parametrize("kind", ["dense", "bitmap", "csr16"])
def test_inspect_verify_checks_every_kind(kind, assets):
    res = run_cli(["inspect", "--verify", str(assets["root"] / kind)])
    assert res.rc == 0, res.err
    assert "verified" in res.out


# ----- item 8: leftovers, umask, refusals before the work -----------------------------------------

def test_stale_temporaries_of_a_killed_writer_are_removed_by_the_next_write(assets, tmp_path):
    import subprocess
    import sys

    from ipu_sparse.checkpoint import save_dense_checkpoint
    from ipu_sparse.loading import load_model

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # a PID that no longer runs
    stale = tmp_path / f".out.tmp-{dead.pid}-abc123"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"x" * 1000)
    legacy = tmp_path / ".out.tmp-k2j4h5g6"  # the naming of older versions (no PID)
    legacy.mkdir()
    live = tmp_path / f".out.tmp-{os.getppid()}-zzz"  # a writer that still runs
    live.mkdir()
    other = tmp_path / ".other.tmp-1-x"  # another output's temporary
    other.mkdir()
    lm = load_model("tiny-llama")
    save_dense_checkpoint(lm.model, lm.tokenizer, tmp_path / "out")
    assert not stale.exists() and not legacy.exists()
    assert live.exists() and other.exists()


def test_overwrite_onto_a_file_leaves_nothing_behind(tmp_path):
    from ipu_sparse.checkpoint import save_dense_checkpoint
    from ipu_sparse.loading import load_model

    (tmp_path / "out").write_text("old file\n")
    lm = load_model("tiny-llama")
    save_dense_checkpoint(lm.model, lm.tokenizer, tmp_path / "out", overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert (tmp_path / "out" / "ipu_sparse.json").is_file()


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_outputs_get_the_users_umask(umask, tmp_path):
    from ipu_sparse.fileio import atomic_write_text
    from ipu_sparse.loading import load_model
    from ipu_sparse.sparse.checkpoint import save_sparse_checkpoint

    old = os.umask(umask)
    try:
        lm = load_model("tiny-llama")
        save_sparse_checkpoint(lm.model, lm.tokenizer, tmp_path / "ck")
        atomic_write_text(tmp_path / "r.json", "{}")
    finally:
        os.umask(old)
    assert (tmp_path / "ck").stat().st_mode & 0o777 == 0o777 & ~umask
    for f in list((tmp_path / "ck").iterdir()) + [tmp_path / "r.json"]:
        assert f.stat().st_mode & 0o777 == 0o666 & ~umask, f


def test_account_json_refuses_an_existing_file_and_replaces_it_with_overwrite(tmp_path):
    out = tmp_path / "a.json"
    out.write_text("{}")
    argv = ["account", "--model", "tiny-llama", "--sparsity", "0.5", "--json", str(out)]
    assert run_cli(argv).rc == 2 and out.read_text() == "{}"
    assert run_cli(argv + ["--overwrite"]).rc == 0 and "whole_model" in out.read_text()


@pytest.mark.parametrize("extra,needle", [
    (["--out", "{A}/afile/out"], "afile"),
    (["--format", "bitmap", "--sparse-dtype", "int4", "--out", "{T}/out"], "int4"),
    (["--format", "csr16", "--sparse-dtype", "int8", "--out", "{T}/out"], "csr16"),
    (["--format", "dense", "--sparse-dtype", "bf16", "--out", "{T}/out"], "--sparse-dtype"),
])
def test_prune_refuses_before_the_work(extra, needle, assets, tmp_path, monkeypatch):
    """An unwritable --out or a bad --sparse-dtype fails before pruning starts (the pruner is never called)."""
    import ipu_sparse.prune.api as api

    def boom(*a, **k):
        raise AssertionError("pruning ran before the arguments were checked")

    monkeypatch.setattr(api, "prune_", boom)
    res = run_cli(["prune", "--model", "tiny-llama", "--method", "magnitude", "--sparsity", "0.5"]
                  + _fmt(extra, A=assets["A"], T=str(tmp_path)))
    assert res.rc == 2 and needle in res.err, res.err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("key,value", [("eos_token_id", []), ("hidden_size", "abc"), ("vocab_size", None),
                                       ("num_hidden_layers", 4000), ("rms_norm_eps", -1)])
def test_hf_config_of_the_wrong_type_is_one_error(key, value, assets, tmp_path):
    import shutil

    from ipu_sparse.loading import load_model

    d = tmp_path / "hf"
    shutil.copytree(assets["root"] / "hf", d)
    cfg = json.loads((d / "config.json").read_text())
    cfg[key] = value
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UserError, match="hf"):
        load_model(str(d))
