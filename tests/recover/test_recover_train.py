"""Recovery training on tiny presets: mask held, exact resume, budgets, outputs."""
import random

import pytest
import torch

from ipu_sparse.checkpoint import save_dense_checkpoint
from ipu_sparse.errors import UserError
from ipu_sparse.loading import load_model
from ipu_sparse.prune import magnitude_masks
from ipu_sparse.recover import (RecoverConfig, Recovery, apply_masks_, count_mask_violations, lr_at, mask_gradients_,
                                mask_sparsity, masks_from_zeros)
from ipu_sparse.recover.data import windows_from_ids
from ipu_sparse.recover.losses import kd_loss
from ipu_sparse.recover.run_io import STATE_FILE, read_train_state
from ipu_sparse.recover.schedule import fit_horizon


def pruned(preset="tiny-llama", sparsity=0.8):
    """A magnitude-pruned copy of a tiny preset and its masks."""
    lm = load_model(preset)
    masks = magnitude_masks(lm.model, sparsity)
    apply_masks_(lm.model, masks)
    return lm, masks


def toy_windows(seq_len=32, n_tokens=4000, heldout=2, batch=2, seed=0):
    rng = random.Random(seed)
    words = ["the", "cat", "sat", "on", "a", "mat", "and", "dog", "ran", "far", "away", "from", "home", "."]
    text = " ".join(rng.choice(words) for _ in range(n_tokens // 3))
    ids = [3 + b for b in text.encode()][:n_tokens]
    return windows_from_ids(ids, seq_len, heldout, batch, "toy text")


def make_run(tmp_path, name="run", masks=None, student=None, **kw):
    teacher = load_model("tiny-llama")
    if student is None:
        student, masks = pruned()
    resume, overwrite = kw.pop("resume", False), kw.pop("overwrite", False)
    base = dict(seq_len=32, batch_size=2, lr=1e-2, warmup_steps=2, steps=6, eval_every=3, heldout_windows=2)
    base.update(kw)
    cfg = RecoverConfig(**base)
    return Recovery(teacher.model, student.model, teacher.tokenizer, toy_windows(), cfg, tmp_path / name,
                    masks=masks, progress=False, log=lambda m: None, resume=resume, overwrite=overwrite)


def test_masked_gradients_alone_keep_zeros_and_unmasked_training_would_not():
    lm, masks = pruned()
    model = lm.model
    params = [p for p in model.parameters()]
    opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1)
    ids = torch.randint(3, 200, (2, 16))
    for _ in range(3):
        opt.zero_grad()
        model(ids).logsumexp(-1).mean().backward()
        mask_gradients_(model, masks)
        opt.step()
    assert count_mask_violations(model, masks) == 0
    # the same training without the gradient mask revives pruned weights (so the check above can fail)
    opt.zero_grad()
    model(ids).logsumexp(-1).mean().backward()
    opt.step()
    assert count_mask_violations(model, masks) > 0


def test_recovery_holds_mask_changes_kept_weights_and_reduces_kl(tmp_path):
    run = make_run(tmp_path, steps=12, block_epochs=1, block_windows=8, hidden_weight=0.5, ce_weight=0.1,
                   grad_accum=2, weight_decay=0.1)
    before = {n: m.weight.detach().clone() for n, m in run.student.linear_layers()}
    kl0 = run.evaluate(run.student)["heldout_kl"]
    summary = run.run()
    assert summary["finished"] and summary["steps"] == 12
    assert count_mask_violations(run.student, run.masks) == 0
    changed = sum(int(((m.weight != before[n]) & run.masks[n]).sum()) for n, m in run.student.linear_layers())
    assert changed > 0.5 * sum(int(m.sum()) for m in run.masks.values())
    assert run.evaluate(run.student)["heldout_kl"] < kl0
    # the saved run directory is a loadable checkpoint with the same mask and its zeros
    back = load_model(str(tmp_path / "run"))
    for name, mod in back.model.linear_layers():
        assert not bool(((mod.weight != 0) & ~run.masks[name]).any()), name
    assert abs(mask_sparsity(masks_from_zeros(back.model)) - 0.8) < 0.01
    assert (tmp_path / "run" / "loss_curve.png").stat().st_size > 1000


def _final_state(path):
    lm = load_model(str(path))
    st = read_train_state(path)[0]
    return lm.model.state_dict(), st


def _assert_same_run(a, b):
    sda, sta = _final_state(a)
    sdb, stb = _final_state(b)
    for k in sda:
        assert torch.equal(sda[k], sdb[k]), k
    assert sta.micro_step == stb.micro_step and sta.tokens == stb.tokens
    assert sta.global_step == stb.global_step
    losses_a = [h["loss"] for h in sta.history if "loss" in h]
    losses_b = [h["loss"] for h in stb.history if "loss" in h]
    assert losses_a == losses_b


@pytest.mark.parametrize("gradual", [False, True])
def test_resume_is_exact(tmp_path, gradual):
    kw = dict(steps=6, grad_accum=2, block_epochs=1, block_windows=8)
    if gradual:
        kw.update(gradual=(0.5,), target_sparsity=0.8)
    teacher = load_model("tiny-llama")

    def run(name, resume=False, **extra):
        student = load_model("tiny-llama") if gradual else pruned()[0]
        masks = None if gradual else masks_from_zeros(student.model)
        cfg = RecoverConfig(seq_len=32, batch_size=2, lr=1e-2, warmup_steps=2, eval_every=2, heldout_windows=2,
                            **dict(kw, **extra))
        r = Recovery(teacher.model, student.model, teacher.tokenizer, toy_windows(), cfg, tmp_path / name,
                     masks=masks, progress=False, log=lambda m: None, resume=resume)
        return r.run()

    assert run("straight")["finished"]
    paused = run("split", stop_after=4 if gradual else 2)
    assert not paused["finished"] and paused["steps"] == (4 if gradual else 2)
    assert run("split", resume=True)["finished"]
    _assert_same_run(tmp_path / "straight", tmp_path / "split")
    if gradual:
        assert abs(mask_sparsity(masks_from_zeros(load_model(str(tmp_path / "split")).model)) - 0.8) < 0.01


def test_interrupt_inside_block_phase_resumes_exactly(tmp_path, monkeypatch):
    teacher = load_model("tiny-llama")

    def run(name, resume=False, stop_at=None):
        student, masks = pruned()
        cfg = RecoverConfig(seq_len=32, batch_size=2, lr=1e-2, warmup_steps=1, steps=3, block_epochs=2,
                            block_windows=8, block_batch=4, heldout_windows=2)
        r = Recovery(teacher.model, student.model, teacher.tokenizer, toy_windows(), cfg, tmp_path / name,
                     masks=masks, progress=False, log=lambda m: None, resume=resume)
        if stop_at is not None:  # Ctrl-C arrives during the 2nd block (4 steps per block)
            calls = {"n": 0}
            orig = r._should_stop

            def should_stop():
                calls["n"] += 1
                if calls["n"] == stop_at:
                    r.stop_flag.requested = True
                return orig()
            r._should_stop = should_stop
        return r.run()

    run("straight")
    s = run("split", stop_at=7)
    assert s["stop_reason"] == "interrupted" and not s["finished"]
    st = read_train_state(tmp_path / "split")[0]
    assert st.stage == "block" and st.block == 1
    run("split", resume=True)
    _assert_same_run(tmp_path / "straight", tmp_path / "split")


def test_time_budget_fits_horizon_and_stops(tmp_path):
    run = make_run(tmp_path, steps=None, max_minutes=0.1, eval_every=1000)
    s = run.run()
    step_s = [h["step_s"] for h in run.state.history if "step_s" in h]
    assert s["steps"] >= 1
    # stopped by the horizon fitted to the budget, or by the budget itself (at most one step late)
    assert s["finished"] or s["stop_reason"] == "time budget reached"
    # training time when the final save began (the save and its plot are not training)
    assert run.state.elapsed_s <= 6 + max(step_s) + 1
    if s["steps"] >= 3:  # the horizon is fitted after 3 measured steps
        assert run.state.horizons[0] >= 3


def test_budget_horizon_gives_each_gradual_phase_an_equal_share():
    def horizon(phase_step, elapsed, ph, n_phases):  # a 30-minute budget, steps of 10 s
        return fit_horizon([10.0] * 21, phase_step, 30 * 60 - elapsed, ph, n_phases)[0]

    # 600 s of the 1800 s used, 20 steps of 10 s into phase 0 of 3: the phase's share of the 1400 s that
    # are its and the later phases' is 466 s = 46 steps in all (not 20 more + a third of what is left)
    assert horizon(20, 600.0, 0, 3) == 46
    assert horizon(20, 600.0, 0, 1) == 20 + 120  # a single phase gets all the remaining time
    assert horizon(3, 1790.0, 2, 3) == 4  # out of time: at least one more step, never fewer than done


def test_bad_inputs(tmp_path):
    run = make_run(tmp_path, steps=2)
    run.run()
    with pytest.raises(UserError, match="already holds a recovery run"):
        make_run(tmp_path, steps=2)
    with pytest.raises(UserError, match="different configuration.*lr"):
        make_run(tmp_path, steps=2, lr=1e-3, resume=True)
    with pytest.raises(UserError, match="nothing to resume"):
        make_run(tmp_path, name="fresh", steps=2, resume=True)
    (tmp_path / "other").mkdir()
    with pytest.raises(UserError, match="already holds"):
        make_run(tmp_path, name="other", steps=2)
    with pytest.raises(UserError, match="budget"):
        make_run(tmp_path, name="x", steps=None)
    with pytest.raises(UserError, match="gradual sparsities"):
        make_run(tmp_path, name="x", gradual=(0.9,), target_sparsity=0.8)


def test_overwrite_replaces(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "junk.txt").write_text("x")
    teacher = load_model("tiny-llama")
    student, masks = pruned()
    cfg = RecoverConfig(seq_len=32, batch_size=2, steps=1, heldout_windows=2)
    Recovery(teacher.model, student.model, teacher.tokenizer, toy_windows(), cfg, tmp_path / "run", masks=masks,
             overwrite=True, progress=False, log=lambda m: None).run()
    assert not (tmp_path / "run" / "junk.txt").exists() and (tmp_path / "run" / STATE_FILE).is_file()


def test_kd_loss_and_schedule():
    x = torch.randn(2, 5, 11)
    assert kd_loss(x, x, 2.0).item() == pytest.approx(0.0, abs=1e-6)
    assert kd_loss(x, torch.randn(2, 5, 11), 2.0).item() > 0
    lrs = [lr_at(s, 1.0, 4, 20, 0.1) for s in range(21)]
    assert lrs[0] == 0.25 and lrs[3] == 1.0 and lrs[20] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(lrs[3:], lrs[4:]))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_runs_on_cuda(tmp_path):
    teacher = load_model("tiny-llama", device="cuda")
    student = load_model("tiny-llama", device="cuda")
    masks = magnitude_masks(student.model, 0.8)
    apply_masks_(student.model, masks)
    cfg = RecoverConfig(seq_len=32, batch_size=2, steps=3, block_epochs=1, block_windows=4, heldout_windows=2, bf16=True)
    s = Recovery(teacher.model, student.model, teacher.tokenizer, toy_windows(), cfg, tmp_path / "run", masks=masks,
                 progress=False, log=lambda m: None).run()
    assert s["finished"] and count_mask_violations(student.model, masks) == 0


def test_gradual_with_project_pruning_method(tmp_path):
    teacher = load_model("tiny-llama")
    student = load_model("tiny-llama")
    cfg = RecoverConfig(seq_len=32, batch_size=2, steps=2, heldout_windows=2, block_windows=4,
                        gradual=(0.5,), target_sparsity=0.8, prune_method="sparsegpt")
    run = Recovery(teacher.model, student.model, teacher.tokenizer, toy_windows(), cfg, tmp_path / "g",
                   progress=False, log=lambda m: None)
    s = run.run()
    assert s["finished"] and abs(s["sparsity"] - 0.8) < 0.01
    assert count_mask_violations(student.model, run.masks) == 0
    starts = [h for h in run.state.history if str(h.get("eval", "")).endswith("start")]
    assert len(starts) == 2


def test_snapshots_keep_the_student_at_given_minutes(tmp_path, monkeypatch):
    import ipu_sparse.recover.train as train_mod

    clock = {"t": 1000.0}
    monkeypatch.setattr(train_mod.time, "time", lambda: clock["t"])
    run = make_run(tmp_path, steps=6, snapshot_minutes=(1.0, 2.0, 60.0))
    orig_save = run._maybe_save

    def ticking():  # every step's save check advances the fake clock by 30 s
        clock["t"] += 30.0
        orig_save()

    monkeypatch.setattr(run, "_maybe_save", ticking)
    run.run()
    taken = run.state.snapshots
    assert sorted(taken) == ["1.0", "2.0"]  # 60 min never reached
    assert taken["1.0"]["steps"] < taken["2.0"]["steps"] <= 6
    for m in (1.0, 2.0):
        snap = load_model(str(run.snapshot_dir(m)))
        for name, mod in snap.model.linear_layers():
            assert not bool(((mod.weight != 0) & ~run.masks[name]).any()), name
    assert not run.snapshot_dir(60.0).exists()
    # the 1-minute snapshot differs from the final student (training went on after it)
    a = load_model(str(run.snapshot_dir(1.0))).model.state_dict()
    b = run.student.state_dict()
    assert any(not torch.equal(a[k], b[k]) for k in a if k in b)
