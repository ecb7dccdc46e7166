"""Real processes: closed and invalid standard input, undecodable arguments, and kill -9 during a
save and during recovery. After a kill the output either does not exist or loads and verifies, and
the next run cleans what the killed one left."""
from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from .conftest import run_cli

# A save whose weights file takes a while to reach the disk (a slow or busy disk), so that a kill can
# land between the temporary directory's creation and its rename.
SLOW_SAVE = """
import sys, time
import safetensors.torch as stt
_save = stt.save_file
def slow(*a, **k):
    _save(*a, **k)
    time.sleep(float(sys.argv[1]))
stt.save_file = slow
from ipu_sparse.cli import main
sys.exit(main(sys.argv[2:]))
"""


def test_stdin_and_argv_problems_in_a_real_process(tmp_path):
    # closed standard input (<&-), invalid UTF-8 through a pipe, undecodable bytes in an argument
    pipe = dict(stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=tmp_path)
    closed = subprocess.Popen(f"'{sys.executable}' -m ipu_sparse.cli generate --model tiny-llama --prompt - <&-",
                              shell=True, executable="/bin/bash", **pipe)
    piped = subprocess.Popen([sys.executable, "-m", "ipu_sparse.cli", "generate", "--model", "tiny-llama",
                              "--prompt", "-"], stdin=subprocess.PIPE, **pipe)
    argv = subprocess.Popen([sys.executable.encode(), b"-m", b"ipu_sparse.cli", b"generate", b"--model", b"tiny-llama",
                             b"--prompt", b"hi \xff"], **pipe)
    runs = ((closed, None, b"standard input is closed"), (piped, b"caf\xe9\n", b"not valid UTF-8"),
            (argv, None, b"--prompt"))
    for proc, stdin, needle in runs:  # started together, checked in turn
        _, stderr = proc.communicate(stdin, timeout=120)
        err = stderr.strip().splitlines()
        assert proc.returncode == 2, stderr[-1500:]
        assert len(err) == 1 and needle in err[0] and b"Traceback" not in stderr, err
    assert list(tmp_path.iterdir()) == []


def _leftovers(parent: Path, name: str):
    return sorted(p.name for p in parent.iterdir() if p.name.startswith(f".{name}."))


def _wait_for(pred, timeout=60.0):
    t0 = time.time()
    while not pred():
        if time.time() - t0 > timeout:
            raise AssertionError("the process never reached the point to kill it at")
        time.sleep(0.01)


def _kill_in_save(proc, parent: Path, name: str, rng: random.Random, max_delay: float) -> None:
    """kill -9 ``proc`` a random time (up to ``max_delay`` s) after its first temporary ``.NAME.tmp-*``
    appears: inside the save or just after it."""
    _wait_for(lambda: any(p.name.startswith(f".{name}.tmp-") for p in parent.iterdir()) or proc.poll() is not None)
    time.sleep(rng.uniform(0.0, max_delay))
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def _verify(path: Path):
    res = run_cli(["inspect", "--verify", str(path)])
    assert res.rc == 0, res.err


@pytest.mark.parametrize("seed", [0, 1])
def test_kill_during_save_then_fresh_run(seed, tmp_path):
    rng = random.Random(seed)
    out = tmp_path / "ck"
    argv = ["sparsify", "--model", "tiny-llama", "--magnitude", "0.5", "--out", str(out), "--overwrite"]
    if seed:  # an older checkpoint is being replaced: it must survive the kill (or be the new one)
        assert run_cli(argv).rc == 0
    proc = subprocess.Popen([sys.executable, "-c", SLOW_SAVE, "0.5", *argv], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, cwd=tmp_path)
    _kill_in_save(proc, tmp_path, "ck", rng, 0.5)
    if out.exists():
        _verify(out)
    else:
        assert not seed, "the old checkpoint was lost"
    assert run_cli(argv).rc == 0  # a fresh run
    _verify(out)
    assert _leftovers(tmp_path, "ck") == []


def test_kill_during_recovery_then_resume(assets, tmp_path):
    rng = random.Random(7)
    out = tmp_path / "run"
    base = ["recover", "--teacher", "tiny-llama", "--student", str(assets["root"] / "dense"), "--text",
            f"{assets['A']}/text.txt", "--seq-len", "16", "--batch-size", "2", "--heldout-windows", "1", "--steps", "6",
            "--save-every-minutes", "0.0001", "--eval-every", "100", "--no-progress", "--out", str(out)]
    for kill in range(2):
        proc = subprocess.Popen([sys.executable, "-c", SLOW_SAVE, "0.2", *base, *(["--resume"] if out.exists() else [])],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=tmp_path)
        _kill_in_save(proc, tmp_path, "run", rng, 0.6)
        if out.exists():
            _verify(out)
    res = run_cli(base + (["--resume"] if out.exists() else []))
    assert res.rc == 0, res.err
    _verify(out)
    assert _leftovers(tmp_path, "run") == []
    assert '"finished": true' in res.out


def test_files_keep_the_umask_of_the_user_in_a_real_process(tmp_path):
    out = tmp_path / "ck"
    res = subprocess.run(f"umask 027; '{sys.executable}' -m ipu_sparse.cli sparsify --model tiny-llama --out '{out}'",
                         shell=True, executable="/bin/bash", capture_output=True, timeout=120)
    assert res.returncode == 0, res.stderr[-1500:]
    assert out.stat().st_mode & 0o777 == 0o750
    assert {p.stat().st_mode & 0o777 for p in out.iterdir()} == {0o640}
    assert os.listdir(tmp_path) == ["ck"]
