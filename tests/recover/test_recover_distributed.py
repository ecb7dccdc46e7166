"""Recovery on 2 CPU processes (gloo), as torchrun starts it: same loss curve as one process with the same
global batch, exact resume, the mask held and the weights identical on every process."""
import json
import os
import socket
import subprocess
import sys
import time

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file

from ipu_sparse.checkpoint import save_dense_checkpoint
from ipu_sparse.errors import UserError
from ipu_sparse.loading import load_model
from ipu_sparse.recover import RecoverConfig, Recovery, count_mask_violations, masks_from_zeros
from ipu_sparse.recover.distributed import Distributed, fsdp_supported, from_environment, shutdown
from ipu_sparse.recover.run_io import read_train_state
from test_recover_train import pruned, toy_windows

WORLD = 2
TIMEOUT_S = 240  # a hang fails the test instead of blocking CI
# batch 2 x accumulation 3 = 6 windows per step: 3 per process, in micro-batches of gcd(3, 2) = 1
SETTINGS = dict(seq_len=32, batch_size=2, grad_accum=3, lr=1e-2, warmup_steps=2, steps=5, eval_every=2,
                heldout_windows=2, block_epochs=1, block_windows=4, weight_decay=0.1)
REL_TOL = 1e-5  # fp32: the processes' mean gradient differs from one process's by rounding only


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_recovery(out, dist=None, resume=False, **extra):
    teacher = load_model("tiny-llama")
    student, masks = pruned()
    cfg = RecoverConfig(**dict(SETTINGS, **extra))
    return Recovery(teacher.model, student.model, teacher.tokenizer, toy_windows(), cfg, out, masks=masks,
                    progress=False, log=lambda m: None, resume=resume, dist=dist)


def _record(run, path) -> None:
    """What one process ends with: its student's weights and its count of non-zero pruned weights."""
    save_file({k: v.detach().clone() for k, v in run.student.state_dict().items()}, str(path) + ".safetensors")
    with open(str(path) + ".json", "w") as f:
        json.dump({"violations": count_mask_violations(run.student, run.masks)}, f)


def _worker(rank, tmp, port, jobs):
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(WORLD),
                      LOCAL_RANK=str(rank))
    for name, fsdp, kw in jobs:
        dist, device = from_environment("cpu", fsdp=fsdp)
        assert device == "cpu" and dist.rank == rank and dist.world_size == WORLD
        out = os.path.join(tmp, name)
        try:
            if kw.get("resume"):  # a run one process paused
                run = make_recovery(out, dist, resume=True)
            elif kw.get("stop_after"):  # pause, then resume in a fresh Recovery (state read back from disk)
                make_recovery(out, dist, **kw).run()
                kw = {}
                run = make_recovery(out, dist, resume=True)
            else:
                run = make_recovery(out, dist, **kw)
            run.run()
        except UserError as exc:
            with open(os.path.join(tmp, f"{name}-error-{rank}.txt"), "w") as f:
                f.write(str(exc))
        else:
            _record(run, os.path.join(tmp, f"{name}-rank{rank}"))
    shutdown()


def run_processes(tmp, jobs):
    ctx = mp.start_processes(_worker, args=(str(tmp), free_port(), jobs), nprocs=WORLD, join=False,
                             start_method="spawn")
    deadline = time.time() + TIMEOUT_S
    try:
        while not ctx.join(timeout=max(1.0, deadline - time.time())):
            if time.time() > deadline:
                pytest.fail(f"distributed recovery did not finish within {TIMEOUT_S} s")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.terminate()


def losses(path):
    return [h["loss"] for h in read_train_state(path)[0].history if "loss" in h]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One process (no process group), and in one start of 2 processes: a straight run, a run paused after
    2 steps and resumed, and (where this PyTorch supports it on CPU) a sharded run."""
    tmp = tmp_path_factory.mktemp("ddp")
    for name, kw in (("single", {}), ("single-noblock", {"block_epochs": 0}), ("mixed", {"stop_after": 2})):
        single = make_recovery(tmp / name, **kw)
        single.run()
        _record(single, tmp / f"{name}-rank0")
    jobs = [("straight", False, {}), ("split", False, {"stop_after": 2}), ("mixed", False, {"resume": True}),
            ("fsdp", True, {"block_epochs": 0})]
    t0 = time.time()
    run_processes(tmp, jobs)
    print(f"2 processes, 3 runs: {time.time() - t0:.1f} s")
    return tmp


def _weights(tmp, name, rank):
    return load_file(str(tmp / f"{name}-rank{rank}.safetensors"))


def test_two_processes_follow_the_one_process_loss_curve(runs):
    one, two = losses(runs / "single"), losses(runs / "straight")
    assert len(one) == len(two) == SETTINGS["steps"]
    for a, b in zip(one, two):
        assert abs(a - b) <= REL_TOL * abs(a), (one, two)
    print("largest relative loss difference, 2 processes vs 1:", max(abs(a - b) / abs(a) for a, b in zip(one, two)))
    w1, w2 = _weights(runs, "single", 0), _weights(runs, "straight", 0)
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], rtol=1e-4, atol=1e-5, msg=k)
    # the run directory of process 0 is the same kind of run: held-out evaluations logged, loadable
    evals = [h for h in read_train_state(runs / "straight")[0].history if "eval" in h]
    assert [h["eval"] for h in evals][:2] == ["teacher", "phase 0 start"] and len(evals) >= 4
    assert load_model(str(runs / "straight")).model is not None


def test_resume_under_two_processes_is_exact(runs):
    assert losses(runs / "split") == losses(runs / "straight")
    a, b = _weights(runs, "split", 0), _weights(runs, "straight", 0)
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_a_one_process_run_resumes_under_two_processes(runs):
    one, mixed = losses(runs / "single"), losses(runs / "mixed")
    assert len(mixed) == len(one) and mixed[:2] == one[:2]  # 2 steps by one process, the rest by two
    for a, b in zip(one, mixed):
        assert abs(a - b) <= REL_TOL * abs(a), (one, mixed)


@pytest.mark.parametrize("name", ["straight", "split", "mixed"])
def test_every_process_holds_the_mask_and_the_same_weights(runs, name):
    w0, w1 = _weights(runs, name, 0), _weights(runs, name, 1)
    for k in w0:
        assert torch.equal(w0[k], w1[k]), k
    masks = pruned()[1]
    for rank in range(WORLD):
        assert json.loads((runs / f"{name}-rank{rank}.json").read_text())["violations"] == 0
    # the weights saved by process 0 keep exactly the mask (pruned weights zero, kept ones trained)
    saved = load_model(str(runs / name)).model
    assert masks_from_zeros(saved).keys() == masks.keys()
    for k, m in masks_from_zeros(saved).items():
        assert torch.equal(m, masks[k]), k


def test_sharded_training_runs_or_is_refused_clearly(runs):
    if not fsdp_supported(torch.device("cpu")):
        msg = (runs / "fsdp-error-0.txt").read_text()
        assert "--fsdp" in msg and torch.__version__.split("+")[0] in msg
        return
    assert not (runs / "fsdp-error-0.txt").exists()
    w0, w1 = _weights(runs, "fsdp", 0), _weights(runs, "fsdp", 1)
    for k in w0:
        assert torch.equal(w0[k], w1[k]), k
    for rank in range(WORLD):
        assert json.loads((runs / f"fsdp-rank{rank}.json").read_text())["violations"] == 0
    one, sharded = losses(runs / "single-noblock"), losses(runs / "fsdp")
    assert len(one) == len(sharded) == SETTINGS["steps"]
    for a, b in zip(one, sharded):
        assert abs(a - b) <= REL_TOL * abs(a), (one, sharded)
    w1 = _weights(runs, "single-noblock", 0)
    for k in w1:
        torch.testing.assert_close(w0[k], w1[k], rtol=1e-4, atol=1e-5, msg=k)
    # its optimizer state was not saved: the run directory is a checkpoint, never resumed
    with pytest.raises(UserError, match="fsdp_without_optimizer_state differs"):
        make_recovery(runs / "fsdp", resume=True, block_epochs=0)


# ----- no processes needed ---------------------------------------------------------------------------

def test_each_process_takes_its_slice_of_the_same_global_batch():
    global_rows = [[5, 1], [7, 2], [0, 9]]  # batch 2 x accumulation 3
    parts = [Distributed(r, 2, r, torch.device("cpu")).local_rows(global_rows, 2) for r in range(2)]
    assert parts == [[[5], [1], [7]], [[2], [0], [9]]]
    parts = [Distributed(r, 4, r, torch.device("cpu")).local_rows([[0, 1, 2, 3], [4, 5, 6, 7]], 4) for r in range(4)]
    assert parts == [[[0, 1]], [[2, 3]], [[4, 5]], [[6, 7]]]


def test_bad_distributed_settings_are_refused(monkeypatch):
    d = Distributed(0, 4, 0, torch.device("cpu"))
    with pytest.raises(UserError, match="do not split over 4 processes"):
        d.check_config(RecoverConfig(batch_size=3, grad_accum=2, steps=1))
    d.check_config(RecoverConfig(batch_size=2, grad_accum=2, steps=1))
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)
    assert from_environment("cpu") == (None, "cpu")  # not under torchrun: the one-process path
    with pytest.raises(UserError, match="--fsdp"):
        from_environment("cpu", fsdp=True)
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(UserError, match="RANK is not set"):
        from_environment("cpu")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    with pytest.raises(UserError, match="cuda:LOCAL_RANK"):
        from_environment("cuda:1")


def test_torchrun_cli_runs_on_two_processes(tmp_path):
    """``torchrun --nproc-per-node 2 -m ipu_sparse recover``: one summary (process 0), a run directory
    with the mask held."""
    student, masks = pruned()
    save_dense_checkpoint(student.model, student.tokenizer, tmp_path / "student")
    (tmp_path / "train.txt").write_text("The quick brown fox jumps over the lazy dog. " * 120)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "ipu_sparse",
           "recover", "--teacher", "tiny-llama", "--student", str(tmp_path / "student"), "--out", str(tmp_path / "run"),
           "--text", str(tmp_path / "train.txt"), "--seq-len", "32", "--batch-size", "2", "--heldout-windows", "2",
           "--steps", "2", "--lr", "1e-2", "--no-progress"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT_S, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout[proc.stdout.index("{"):])  # printed once, by process 0
    assert summary["finished"] and summary["steps"] == 2 and summary["tokens"] == 2 * 2 * 32
    assert proc.stderr.count("distributed: 2 processes (DistributedDataParallel, gloo)") == 1
    saved = load_model(str(tmp_path / "run")).model
    for k, m in masks_from_zeros(saved).items():
        assert torch.equal(m, masks[k]), k


def test_cli_refuses_fsdp_without_torchrun(tmp_path, capsys, monkeypatch):
    from ipu_sparse.cli import main

    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)
    assert main(["recover", "--teacher", "tiny-llama", "--student", "tiny-llama", "--out", str(tmp_path / "run"),
                 "--steps", "1", "--fsdp"]) == 2
    err = capsys.readouterr().err
    assert "--fsdp" in err and "torchrun" in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()
