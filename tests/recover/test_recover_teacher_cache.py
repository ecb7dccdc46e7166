"""Teacher-output cache and top-k KD: the loss, the files, validation, training from the cache, resume."""
import json

import numpy as np
import pytest
import torch

from ipu_sparse.cli import main
from ipu_sparse.errors import UserError
from ipu_sparse.loading import load_model
from ipu_sparse.recover import RecoverConfig, Recovery, masks_from_zeros
from ipu_sparse.recover.losses import HiddenCapture, hidden_loss, kd_loss
from ipu_sparse.recover.run_io import read_train_state
from ipu_sparse.recover.teacher_cache import (TeacherCache, kd_topk_vs_full, prepare_teacher_cache, teacher_targets,
                                              topk_kd_loss)

from test_recover_cli import args as cli_args
from test_recover_cli import setup  # noqa: F401  (fixture)
from test_recover_train import _assert_same_run, pruned, toy_windows


def test_topk_kd_is_the_full_kd_at_k_equal_vocab_and_a_lower_bound_below():
    g = torch.Generator().manual_seed(0)
    s = torch.randn(2, 6, 40, generator=g) * 3
    t = torch.randn(2, 6, 40, generator=g) * 3
    for T in (1.0, 2.0):
        full = kd_loss(s, t, T).item()
        # k = V: no tail; only the fp16 rounding of the teacher's logits differs
        assert topk_kd_loss(s, teacher_targets(t, 40, T), T).item() == pytest.approx(full, rel=2e-3)
        approx = [topk_kd_loss(s, teacher_targets(t, k, T), T).item() for k in (1, 4, 16, 39)]
        assert all(0 <= a <= full + 1e-5 for a in approx)  # merging outcomes never raises a KL
        assert approx[-1] > approx[0]
    # gradients reach every student logit (the tail bucket's log-sum-exp), not just the top-k
    s_req = s.clone().requires_grad_(True)
    topk_kd_loss(s_req, teacher_targets(t, 4, 1.0), 1.0).backward()
    assert bool((s_req.grad != 0).all())
    # equal distributions: zero loss; a mask averages over the counted positions only
    assert topk_kd_loss(t, teacher_targets(t, 8, 1.0), 1.0).item() == pytest.approx(0.0, abs=1e-3)
    mask = torch.zeros(2, 6, dtype=torch.bool)
    mask[0, 2] = True
    one = topk_kd_loss(s[:1, 2:3], teacher_targets(t[:1, 2:3], 8, 1.0), 1.0).item()
    assert topk_kd_loss(s, teacher_targets(t, 8, 1.0), 1.0, mask).item() == pytest.approx(one, rel=1e-5)
    assert kd_loss(s, t, 1.0, mask).item() == pytest.approx(kd_loss(s[:1, 2:3], t[:1, 2:3], 1.0).item(), rel=1e-5)
    r = kd_topk_vs_full(s, t, 16)
    assert 0 < r["ratio"] <= 1 and 0 < r["teacher_tail_mass"] < 1


def test_squarehead_loss_is_mse_over_the_teachers_second_moment():
    g = torch.Generator().manual_seed(1)
    ht = [torch.randn(2, 5, 8, generator=g) + 4.0 for _ in range(3)]  # a large mean: variance != second moment
    hs = [h + 0.3 * torch.randn(2, 5, 8, generator=g) for h in ht]
    want = sum(((a - b) ** 2).mean() / (b ** 2).mean() for a, b in zip(hs, ht)) / 3
    assert hidden_loss(hs, ht).item() == pytest.approx(want.item(), rel=1e-4)
    by_var = sum(((a - b) ** 2).mean() / b.var() for a, b in zip(hs, ht)) / 3
    assert abs(hidden_loss(hs, ht).item() - by_var.item()) > 0.1 * by_var.item()
    # scale-free: scaling both sides leaves it unchanged
    assert hidden_loss([3 * h for h in hs], [3 * h for h in ht]).item() == pytest.approx(want.item(), rel=1e-4)


def test_cache_is_filled_once_and_holds_the_teachers_outputs(tmp_path):
    teacher = load_model("tiny-llama").model
    w = toy_windows(n_tokens=800)
    c = prepare_teacher_cache(tmp_path, teacher, w, topk=16, temperature=2.0, hidden=True, batch_size=3)
    files = {p.name for p in c.directory.iterdir()}
    assert files == {"meta.json", "topk_values.f16", "topk_indices.i32", "lse.f32", "hidden.f16"}
    n, L = w.train.shape
    assert c.n_windows == n and c.arrays["topk_values.f16"].shape == (n, L, 16)
    mtime = (c.directory / "lse.f32").stat().st_mtime_ns
    again = prepare_teacher_cache(tmp_path, teacher, w, topk=16, temperature=2.0, hidden=True)
    assert again.directory == c.directory and (c.directory / "lse.f32").stat().st_mtime_ns == mtime
    # other settings: another cache directory
    other = prepare_teacher_cache(tmp_path, teacher, w, topk=8, temperature=2.0)
    assert other.directory != c.directory and not other.has_hidden
    # the cached targets of some windows are the teacher's, as computed live
    rows = [5, 0, n - 1]
    cap = HiddenCapture(teacher)
    with torch.no_grad():
        logits = teacher(w.train[rows])
    live = teacher_targets(logits, 16, 2.0, cap.pop())
    cap.remove()
    got = c.targets(rows)
    assert torch.allclose(got.values, live.values, atol=1e-2) and torch.allclose(got.lse, live.lse, atol=1e-4)
    assert (got.indices == live.indices).float().mean() > 0.99  # ties at fp32 rounding may swap
    assert len(got.hidden) == len(teacher.layers)
    assert all(torch.allclose(a, b, atol=1e-2) for a, b in zip(got.hidden, live.hidden))


def test_truncated_or_foreign_cache_files_are_refused_by_name(tmp_path):
    teacher = load_model("tiny-llama").model
    w = toy_windows(n_tokens=800)
    c = prepare_teacher_cache(tmp_path, teacher, w, topk=8, temperature=1.0)
    f = c.directory / "topk_indices.i32"
    f.write_bytes(f.read_bytes()[:-4])
    with pytest.raises(UserError, match="topk_indices.i32: truncated"):
        prepare_teacher_cache(tmp_path, teacher, w, topk=8, temperature=1.0)
    meta = json.loads((c.directory / "meta.json").read_text())
    meta["shapes"]["lse"] = [1, 1]
    (c.directory / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(UserError, match="meta.json: cache made for shapes"):
        prepare_teacher_cache(tmp_path, teacher, w, topk=8, temperature=1.0)
    (c.directory / "meta.json").write_text("{not json")
    with pytest.raises(UserError, match="meta.json"):
        TeacherCache.open(c.directory)
    with pytest.raises(UserError, match="--teacher-topk"):
        prepare_teacher_cache(tmp_path, teacher, w, topk=0, temperature=1.0)


def _run(tmp_path, name, cache=None, resume=False, **kw):
    teacher = load_model("tiny-llama")
    student, _ = pruned()
    base = dict(seq_len=32, batch_size=2, lr=1e-2, warmup_steps=2, steps=4, eval_every=3, heldout_windows=2,
                teacher_topk=16, hidden_weight=0.5, grad_accum=2)
    base.update(kw)
    cfg = RecoverConfig(**base)
    w = toy_windows(n_tokens=800)
    tc = None
    if cache is not None:
        tc = prepare_teacher_cache(cache, teacher.model, w, 16, cfg.temperature, hidden=True)
    r = Recovery(teacher.model, student.model, teacher.tokenizer, w, cfg, tmp_path / name,
                 masks=masks_from_zeros(student.model), progress=False, log=lambda m: None, resume=resume,
                 teacher_cache=tc)
    return r.run()


def test_training_from_the_cache_equals_the_live_topk_teacher_and_resumes_exactly(tmp_path, monkeypatch):
    _run(tmp_path, "live")
    # from the cache the teacher never runs during distillation steps
    calls = []
    from ipu_sparse.recover import step

    real = step.kd_step

    def spy(student, teacher, *a, **k):
        calls.append(k.get("teacher_targets") is not None)
        return real(student, teacher, *a, **k)

    monkeypatch.setattr("ipu_sparse.recover.train.kd_step", spy)
    assert _run(tmp_path, "cached", cache=tmp_path / "tc")["finished"]
    assert calls and all(calls)
    live = [h for h in read_train_state(tmp_path / "live")[0].history if "loss" in h]
    cached = [h for h in read_train_state(tmp_path / "cached")[0].history if "loss" in h]
    assert len(live) == len(cached) == 4
    for a, b in zip(live, cached):
        assert a["kd"] == pytest.approx(b["kd"], rel=2e-2, abs=1e-4)
        assert a["hidden"] == pytest.approx(b["hidden"], rel=2e-2, abs=1e-4)
    # pause + resume from the cache continues bit for bit
    assert not _run(tmp_path, "split", cache=tmp_path / "tc", stop_after=2)["finished"]
    assert _run(tmp_path, "split", cache=tmp_path / "tc", resume=True)["finished"]
    _assert_same_run(tmp_path / "cached", tmp_path / "split")
    # a cache made with other settings is refused
    with pytest.raises(UserError, match="teacher-output cache made with other settings: topk 16"):
        _run(tmp_path, "bad", cache=tmp_path / "tc", teacher_topk=8)


def test_cli_teacher_cache(setup, capsys):  # noqa: F811
    tmp = setup
    assert main(cli_args(tmp, "--steps", "3", "--teacher-cache", str(tmp / "tc"), "--unseen-passages", "4",
                         "--stop-after", "2")) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["steps"] == 2 and out["final_unseen_ppl"] > 1
    (d,) = list((tmp / "tc").iterdir())
    meta = json.loads((d / "meta.json").read_text())
    assert meta["settings"]["topk"] == 64 and not meta["settings"]["hidden"]
    # resume with the cache continues; the top-k setting is part of the run's identity
    assert main(cli_args(tmp, "--steps", "3", "--teacher-cache", str(tmp / "tc"), "--resume")) == 0
    capsys.readouterr()
    assert main(cli_args(tmp, "--steps", "3", "--resume")) == 2
    assert "teacher_topk" in capsys.readouterr().err
    assert main(cli_args(tmp, "--steps", "3", "--teacher-topk", "0", out="r0")) == 2
    assert "--teacher-topk must be >= 1" in capsys.readouterr().err
    f = d / "lse.f32"
    f.write_bytes(f.read_bytes()[:10])
    assert main(cli_args(tmp, "--steps", "2", "--teacher-cache", str(tmp / "tc"), out="r1")) == 2
    err = capsys.readouterr().err
    assert "lse.f32: truncated" in err and "Traceback" not in err and not (tmp / "r1").exists()
    assert np.dtype("<f2").itemsize == 2
