"""The run directory's training state: JSON + safetensors round trip, never a pickle, clear errors."""
import json
import pickle
import random

import pytest
import torch

from ipu_sparse.cli import main
from ipu_sparse.errors import UserError
from ipu_sparse.loading import load_model
from ipu_sparse.prune import magnitude_masks
from ipu_sparse.recover import RecoverConfig, Recovery, apply_masks_
from ipu_sparse.recover.data import windows_from_ids
from ipu_sparse.recover.run_io import (LEGACY_STATE_FILE, STATE_FILE, STATE_TENSORS_FILE, read_train_state,
                                       write_train_state)
from ipu_sparse.recover.state import TrainState


class _OpensFile:
    """Unpickling this creates the file ``path``: the mark of a pickle that was loaded."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def _windows():
    text = "the cat sat on a mat and the dog ran far away from home . " * 60
    return windows_from_ids([3 + b for b in text.encode()], 32, 2, 2, "toy text")


def _run(tmp_path, name="run", resume=False, **kw):
    teacher = load_model("tiny-llama")
    student = load_model("tiny-llama")
    masks = magnitude_masks(student.model, 0.8)
    apply_masks_(student.model, masks)
    cfg = RecoverConfig(**dict(dict(seq_len=32, batch_size=2, lr=1e-2, warmup_steps=1, steps=4, eval_every=2,
                                    heldout_windows=2), **kw))
    return Recovery(teacher.model, student.model, teacher.tokenizer, _windows(), cfg, tmp_path / name, masks=masks,
                    progress=False, log=lambda m: None, resume=resume)


def test_state_round_trip_is_exact(tmp_path):
    model = torch.nn.Linear(4, 3)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)
    for _ in range(3):
        opt.zero_grad()
        model(torch.randn(5, 4)).square().sum().backward()
        opt.step()
    st = TrainState(phase=1, stage="kd", phase_step=3, global_step=7, micro_step=14, tokens=896, elapsed_s=12.5,
                    horizons={0: 4, 1: 6}, horizon_refit=[0], history=[{"step": 1, "loss": 0.1 + 0.2}],
                    snapshots={"1.0": {"steps": 2}}, optimizer=opt.state_dict())
    torch.manual_seed(123)
    random.seed(7)
    write_train_state(tmp_path, st, {"config": {"lr": 0.01, "gradual": [0.5]}, "teacher": "t"})
    back, identity, rng = read_train_state(tmp_path)
    assert identity == {"config": {"lr": 0.01, "gradual": [0.5]}, "teacher": "t"}
    assert bytes.fromhex(rng["torch"]) == bytes(torch.get_rng_state().numpy())
    sd, sd2 = opt.state_dict(), back.optimizer
    assert sd2["param_groups"] == sd["param_groups"]  # betas back as a tuple
    for i, entries in sd["state"].items():
        for key, v in entries.items():
            assert torch.equal(sd2["state"][i][key], v) and sd2["state"][i][key].dtype == v.dtype, (i, key)
    back.optimizer = st.optimizer = None
    assert back == st  # every other field, history floats included, exactly
    fresh = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)
    fresh.load_state_dict(sd2)


def test_a_crafted_pickle_is_never_loaded(tmp_path):
    control = tmp_path / "control-mark"
    pickle.loads(pickle.dumps(_OpensFile(control)))  # the payload works when a pickle is loaded...
    assert control.exists()
    mark = tmp_path / "mark"
    payload = pickle.dumps(_OpensFile(mark))
    _run(tmp_path, steps=4, stop_after=2).run()
    run_dir = tmp_path / "run"
    good = {f: (run_dir / f).read_bytes() for f in (STATE_FILE, STATE_TENSORS_FILE)}
    # ...but an older version's pickled state is refused unread, even next to a valid state
    (run_dir / LEGACY_STATE_FILE).write_bytes(payload)
    assert _run(tmp_path, resume=True, steps=4).run()["finished"]
    for name in (STATE_FILE, STATE_TENSORS_FILE):  # a pickle in place of either state file: one clear error
        for f, data in good.items():
            (run_dir / f).write_bytes(data)
        (run_dir / name).write_bytes(payload)
        with pytest.raises(UserError, match=name.replace(".", r"\.") + ": (unreadable|not a recovery state|corrupt)"):
            _run(tmp_path, resume=True, steps=4)
    (run_dir / STATE_FILE).unlink()
    (run_dir / STATE_TENSORS_FILE).unlink()
    (run_dir / LEGACY_STATE_FILE).write_bytes(payload)  # (the finished run's save replaced the directory)
    with pytest.raises(UserError, match="older version.*never loaded"):
        _run(tmp_path, resume=True, steps=4)
    with pytest.raises(UserError, match="already holds a recovery run"):
        _run(tmp_path, steps=4)
    assert not mark.exists()


def test_missing_or_corrupt_state_on_resume(tmp_path):
    _run(tmp_path, steps=4, stop_after=2).run()
    run_dir = tmp_path / "run"
    doc = json.loads((run_dir / STATE_FILE).read_text())
    tensors = (run_dir / STATE_TENSORS_FILE).read_bytes()
    (run_dir / STATE_FILE).write_text(json.dumps(doc)[:-20])  # truncated
    with pytest.raises(UserError, match="unreadable training state"):
        _run(tmp_path, resume=True, steps=4)
    (run_dir / STATE_FILE).write_text(json.dumps(dict(doc, state=dict(doc["state"], stage="nowhere"))))
    with pytest.raises(UserError, match="malformed training state"):
        _run(tmp_path, resume=True, steps=4)
    (run_dir / STATE_FILE).write_text(json.dumps(doc))
    (run_dir / STATE_TENSORS_FILE).write_bytes(tensors[: len(tensors) // 2])
    with pytest.raises(UserError, match="train_state.safetensors: corrupt or truncated"):
        _run(tmp_path, resume=True, steps=4)
    (run_dir / STATE_TENSORS_FILE).unlink()
    with pytest.raises(UserError, match="train_state.safetensors: missing"):
        _run(tmp_path, resume=True, steps=4)
    (run_dir / STATE_TENSORS_FILE).write_bytes(tensors)
    assert _run(tmp_path, resume=True, steps=4).run()["finished"]


def test_cli_resume_errors_are_one_line(tmp_path, capsys):
    lm = load_model("tiny-llama")
    apply_masks_(lm.model, magnitude_masks(lm.model, 0.8))
    from ipu_sparse.checkpoint import save_dense_checkpoint

    save_dense_checkpoint(lm.model, lm.tokenizer, tmp_path / "student")
    (tmp_path / "train.txt").write_text("The quick brown fox jumps over the lazy dog. " * 120)

    def recover(*extra):
        return main(["recover", "--teacher", "tiny-llama", "--student", str(tmp_path / "student"), "--out",
                     str(tmp_path / "run"), "--text", str(tmp_path / "train.txt"), "--seq-len", "32", "--batch-size",
                     "2", "--heldout-windows", "2", "--no-progress", "--steps", "2", *extra])

    assert recover("--resume") == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if ": error: " in line]  # (progress lines come before)
    assert len(errors) == 1 and "nothing to resume" in errors[0] and "Traceback" not in err
    assert recover("--stop-after", "1") == 0
    capsys.readouterr()
    (tmp_path / "run" / STATE_FILE).write_bytes(b"\x80\x04garbage")
    assert recover("--resume") == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if ": error: " in line]
    assert len(errors) == 1 and f"{STATE_FILE}: unreadable training state" in errors[0] and "Traceback" not in err
