"""The poprun launchers (--dry-run prints the command): the compile-only step and the run use the same
launcher options; multi-host runs forward the environment; V-IPU partition/allocation flags."""
import shlex
import subprocess
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"


def dry(script, *args):
    r = subprocess.run(["bash", str(SCRIPTS / script), "--dry-run", *args], capture_output=True, text=True,
                       env={"PATH": "/usr/bin:/bin", "POPTORCH_CACHE_DIR": "/tmp/exe"})
    assert r.returncode == 0, r.stderr
    return shlex.split(r.stdout)


def test_pod64_run_and_compile_only_share_the_launcher_options():
    run = dry("poprun_pod64.sh", "--hosts", "h1,h2,h3,h4", "--partition", "P")
    comp = dry("poprun_pod64.sh", "--hosts", "h1,h2,h3,h4", "--partition", "P", "--compile-only")
    assert comp == run + ["--compile-only"]  # same poprun flags: the executable cache is hit
    assert run[0] == "poprun" and "--update-partition=yes" in run and run[run.index("--vipu-partition") + 1] == "P"
    local = next(a for a in run if a.startswith("--mpi-local-args="))
    for var in ("PATH", "LD_LIBRARY_PATH", "PYTHONPATH"):
        assert f"-x {var}" in local
    assert run[run.index("--num-replicas") + 1] == "4" and run[run.index("--num-instances") + 1] == "4"
    assert run[run.index("--executable-cache-path") + 1] == "/tmp/exe"


def test_allocation_and_single_pipeline():
    run = dry("poprun_ipu.sh", "--pod", "64", "--ipus-per-replica", "16", "--replicas", "4", "--allocation", "A",
              "--", "--model", "m")
    assert run[run.index("--vipu-allocation") + 1] == "A"
    one = dry("poprun_pod16.sh")
    assert one[:3] == ["python", "-m", "ipu_sparse"]  # one pipeline on one host: no poprun, both steps alike
    assert dry("poprun_pod16.sh", "--compile-only") == one + ["--compile-only"]


@pytest.mark.parametrize("args,msg", [(["--pod", "32"], "--pod must be 16 or 64"),
                                      (["--partition", "P", "--allocation", "A"], "not both")])
def test_bad_launcher_options(args, msg):
    r = subprocess.run(["bash", str(SCRIPTS / "poprun_ipu.sh"), *args, "--dry-run"], capture_output=True, text=True)
    assert r.returncode == 2 and msg in r.stderr
