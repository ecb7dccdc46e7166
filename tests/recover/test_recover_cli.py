"""``ipu-sparse recover`` end to end on tiny presets, and its input errors."""
import json

import pytest

from ipu_sparse.checkpoint import save_dense_checkpoint
from ipu_sparse.cli import main
from ipu_sparse.loading import load_model
from ipu_sparse.prune import magnitude_masks
from ipu_sparse.recover import apply_masks_, mask_sparsity, masks_from_zeros


@pytest.fixture
def setup(tmp_path):
    lm = load_model("tiny-llama")
    apply_masks_(lm.model, magnitude_masks(lm.model, 0.8))
    save_dense_checkpoint(lm.model, lm.tokenizer, tmp_path / "student")
    dense = load_model("tiny-llama")
    save_dense_checkpoint(dense.model, dense.tokenizer, tmp_path / "dense")
    other = load_model("tiny-luminous")
    apply_masks_(other.model, magnitude_masks(other.model, 0.8))
    save_dense_checkpoint(other.model, other.tokenizer, tmp_path / "other")
    text = tmp_path / "train.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 120)
    return tmp_path


def args(tmp, *extra, out="run", student="student"):
    return ["recover", "--teacher", "tiny-llama", "--student", str(tmp / student), "--out", str(tmp / out),
            "--text", str(tmp / "train.txt"), "--seq-len", "32", "--batch-size", "2", "--heldout-windows", "2",
            "--no-progress", *extra]


def test_cli_recovers_resumes_and_writes_outputs(setup, capsys):
    tmp = setup
    assert main(args(tmp, "--steps", "4", "--lr", "1e-2", "--block-epochs", "1", "--block-windows", "4",
                     "--stop-after", "2")) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["steps"] == 2 and not out["finished"]
    assert main(args(tmp, "--steps", "4", "--lr", "1e-2", "--block-epochs", "1", "--block-windows", "4",
                     "--resume")) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["steps"] == 4 and out["finished"] and out["tokens"] == 4 * 2 * 32
    lm = load_model(str(tmp / "run"))
    assert lm.meta["mask_file"] == "mask.safetensors" and lm.meta["recovery"]["finished"]
    assert abs(mask_sparsity(masks_from_zeros(lm.model)) - 0.8) < 0.01
    assert (tmp / "run" / "loss_curve.png").is_file() and (tmp / "run" / "history.json").is_file()
    # the recovered checkpoint can itself be a student (mask from its mask file)
    assert main(args(tmp, "--steps", "1", student="run", out="run2")) == 0


def test_cli_gradual_from_dense(setup, capsys):
    tmp = setup
    assert main(args(tmp, "--steps", "2", "--gradual", "0.5,0.65", "--sparsity", "0.8", student="dense")) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["finished"] and abs(out["sparsity"] - 0.8) < 0.01


def test_cli_bad_inputs(setup, capsys):
    tmp = setup
    assert main(args(tmp, "--steps", "1", student="dense")) == 2
    assert "no sparsity mask" in capsys.readouterr().err
    assert main(args(tmp, "--steps", "1", student="other")) == 2
    assert "not a pruned copy" in capsys.readouterr().err
    (tmp / "tiny.txt").write_text("short")
    a = args(tmp, "--steps", "1")
    a[a.index("--text") + 1] = str(tmp / "tiny.txt")
    assert main(a) == 2
    assert "too little text" in capsys.readouterr().err
    assert main(args(tmp, "--steps", "1")) == 0
    capsys.readouterr()
    assert main(args(tmp, "--steps", "1")) == 2
    assert "already holds a recovery run" in capsys.readouterr().err
    assert main(args(tmp, "--steps", "2", "--resume")) == 2
    assert "different configuration" in capsys.readouterr().err
    assert main(args(tmp, "--steps", "1", "--overwrite")) == 0
    capsys.readouterr()
    assert main(args(tmp, "--steps", "1", "--device", "cuda:0", out="c")) == 2 or __import__("torch").cuda.is_available()


def test_cli_snapshot_minutes(setup, capsys):
    tmp = setup
    with pytest.raises(SystemExit) as e:
        main(args(tmp, "--steps", "1", "--snapshot-minutes", "0"))
    assert e.value.code == 2 and "positive minutes" in capsys.readouterr().err
    # a snapshot time that is never reached is simply not taken; the run is unaffected
    assert main(args(tmp, "--steps", "2", "--snapshot-minutes", "30,60", "--stop-after", "1")) == 0
    capsys.readouterr()
    assert not list(tmp.glob("run.snapshot-*"))
    assert main(args(tmp, "--steps", "2", "--resume", "--snapshot-minutes", "1e-6")) == 0  # runtime setting
    assert (tmp / "run.snapshot-1e-06min" / "model.safetensors").is_file()


def test_training_options_are_one_parser_for_command_and_benchmark():
    import argparse

    from ipu_sparse.cli import build_parser
    from ipu_sparse.recover.commands import add_training_arguments, config_from_args

    opts = ["--lr", "3e-4", "--block-epochs", "2", "--gradual", "0.5,0.65", "--sparsity", "0.8",
            "--snapshot-minutes", "15,30", "--hidden-weight", "0.5", "--bf16"]
    cmd = build_parser().parse_args(["recover", "--teacher", "t", "--student", "s", "--out", "o", "--steps", "7", *opts])
    bench = argparse.ArgumentParser()
    add_training_arguments(bench)  # what scripts/bench_recover.py builds on (no budget options there)
    b = bench.parse_args(opts)
    cfg = config_from_args(cmd)
    assert cfg.lr == 3e-4 and cfg.block_epochs == 2 and cfg.gradual == (0.5, 0.65) and cfg.target_sparsity == 0.8
    assert cfg.snapshot_minutes == (15.0, 30.0) and cfg.steps == 7 and cfg.bf16 and cfg.hidden_weight == 0.5
    assert config_from_args(b, steps=7) == cfg
    assert config_from_args(b, max_minutes=12.0, gradual=(), target_sparsity=None).max_minutes == 12.0
