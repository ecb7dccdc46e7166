"""How the compiled kernel is built: one source list for setup.py and the JIT build, the cache key,
failures reported, and (slow) a plain `pip install .` whose first use compiles the kernel."""
import logging
import os
import shutil
import subprocess
import sys
import sysconfig
import textwrap
from pathlib import Path

import pytest
import torch

from ipu_sparse.sparse import build, kernels

ROOT = Path(__file__).resolve().parents[2]


def copy_csrc(dst: Path) -> Path:
    shutil.copytree(ROOT / build.CSRC, dst / build.CSRC)
    return dst


def test_sources_are_every_cpp_sorted_and_setup_uses_them(tmp_path):
    expected = sorted(p.name for p in (ROOT / build.CSRC).glob("*.cpp"))
    assert [os.path.basename(s) for s in build.sources(str(ROOT))] == expected
    assert "sparse_kernels.cpp" in expected
    root = copy_csrc(tmp_path)
    (root / build.CSRC / "aaa_extra.cpp").write_text("// another translation unit\n")
    assert [os.path.basename(s) for s in build.sources(str(root))] == ["aaa_extra.cpp"] + expected
    from torch.utils import cpp_extension

    ext = build.make_extension(cpp_extension, str(ROOT))
    assert ext.name == build.EXT_NAME and ext.sources == build.sources(str(ROOT))
    assert all(not os.path.isabs(s) for s in ext.sources)  # setup.py wants paths relative to its directory
    setup_py = (ROOT / "setup.py").read_text()
    assert "make_extension(cpp_extension)" in setup_py
    assert '"ipu_sparse.sparse": ["csrc/*.cpp", "csrc/*.h"]' in setup_py  # the sources ship in the wheel


def test_cache_key_follows_sources_torch_and_python(tmp_path, monkeypatch):
    monkeypatch.setenv("IPU_SPARSE_CACHE", str(tmp_path / "cache"))
    root = copy_csrc(tmp_path / "src")
    d = build.jit_dir(torch.__version__, str(root))
    assert d.startswith(str(tmp_path / "cache" / "kernels"))
    name = os.path.basename(d)
    assert name.startswith("py%d.%d-torch%s-" % (sys.version_info[0], sys.version_info[1], torch.__version__))
    assert build.jit_dir("0.0.1", str(root)) != d
    header = root / build.CSRC / "generic_loops.h"
    header.write_text(header.read_text() + "\n// changed\n")
    assert build.jit_dir(torch.__version__, str(root)) != d
    monkeypatch.delenv("IPU_SPARSE_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert build.cache_root() == str(tmp_path / "xdg" / "ipu_sparse")


def test_failed_jit_build_names_its_log(tmp_path, monkeypatch):
    monkeypatch.setenv("IPU_SPARSE_CACHE", str(tmp_path / "cache"))
    root = tmp_path / "src"
    (root / build.CSRC).mkdir(parents=True)
    (root / build.CSRC / "broken.cpp").write_text("#error this does not compile\n")
    with pytest.raises(RuntimeError, match=r"compiling the sparse kernel failed \(log: .*build\.log\)"):
        build.jit_load(str(root))
    logs = list((tmp_path / "cache" / "kernels").glob("*/build.log"))
    assert len(logs) == 1 and "this does not compile" in logs[0].read_text()
    assert not list((tmp_path / "cache" / "kernels").glob("*/_kernels*"))  # nothing half-built left as the module


def test_binding_falls_back_with_one_warning_when_the_jit_build_fails(monkeypatch, caplog):
    def fail(*_):
        raise RuntimeError("compiling the sparse kernel failed (log: /x/build.log): error: boom")

    monkeypatch.setenv("IPU_SPARSE_JIT", "1")  # skip the in-place module
    monkeypatch.setattr(build, "jit_load", fail)
    binding = kernels.KernelBinding("auto")
    with caplog.at_level(logging.WARNING):
        assert binding.load_extension() is None
    assert "JIT build failed" in binding.extension_status() and "/x/build.log" in binding.extension_status()
    assert any("pure-torch sparse kernel" in r.getMessage() for r in caplog.records)
    monkeypatch.setenv("IPU_SPARSE_NO_EXT", "1")
    off = kernels.KernelBinding("auto")
    assert off.load_extension() is None and "IPU_SPARSE_NO_EXT" in off.reason


CHECK = textwrap.dedent("""
    import sys, torch
    import ipu_sparse
    from ipu_sparse.sparse import kernels
    from ipu_sparse.sparse.formats import from_dense
    assert "site-packages" in ipu_sparse.__file__, ipu_sparse.__file__
    ext = kernels.load_extension()
    status = kernels.extension_status()
    print(status)
    assert ext is not None and "JIT-built" in status, status
    g = torch.Generator().manual_seed(0)
    w = torch.randn(96, 200, generator=g) * (torch.rand(96, 200, generator=g) < 0.2)
    x = torch.randn(3, 200, generator=g)
    m = from_dense(w, "bitmap", torch.float32)
    y = kernels.sparse_matmul(x, m, backend="compiled")
    ref = kernels.reference_matmul(x, m)
    assert torch.allclose(y, ref, atol=1e-4, rtol=1e-4), (y - ref).abs().max()
    print("ok")
""")


@pytest.mark.slow
def test_plain_pip_install_compiles_the_kernel_on_first_use(tmp_path):
    """`pip install .` with build isolation (no torch at build time), then the first use JIT-builds the kernel."""
    src = tmp_path / "src"  # the working tree's package, without anything built in place
    shutil.copytree(ROOT / "ipu_sparse", src / "ipu_sparse", ignore=shutil.ignore_patterns("__pycache__", "*.so"))
    for name in ("setup.py", "README.md"):
        shutil.copy(ROOT / name, src / name)
    # the dev environment's packages, visible to the new venv (and to pip's resolver) without reinstalling torch
    deps = tmp_path / "deps"
    deps.mkdir()
    site = Path(sysconfig.get_paths()["purelib"])
    for entry in site.iterdir():
        if entry.name.startswith(("ipu_sparse", "ipu-sparse", "__editable__", "_ipu_sparse")) or entry.suffix == ".pth":
            continue
        (deps / entry.name).symlink_to(entry)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    py = venv / "bin" / "python"
    vsite = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                           check=True, capture_output=True, text=True).stdout.strip()
    Path(vsite, "dev_deps.pth").write_text(str(deps) + "\n")
    env = dict(os.environ, IPU_SPARSE_CACHE=str(tmp_path / "cache"), PIP_NO_INPUT="1")
    for key in ("IPU_SPARSE_JIT", "IPU_SPARSE_NO_EXT", "PYTHONPATH"):
        env.pop(key, None)
    inst = subprocess.run([str(py), "-m", "pip", "install", "-q", "."], cwd=src, env=env,
                          capture_output=True, text=True)
    assert inst.returncode == 0, inst.stdout + inst.stderr
    installed = Path(vsite, "ipu_sparse", "sparse")
    assert sorted(p.name for p in (installed / "csrc").iterdir()) == sorted(
        p.name for p in (ROOT / build.CSRC).iterdir() if p.suffix in (".cpp", ".h"))
    built = list(installed.glob("_kernels*"))
    if sys.version_info >= (3, 9):
        assert not built  # torch was not importable at build time: nothing compiled
    else:
        # the pip of the Python 3.8 environment processes the venv's .pth inside its isolated build, so
        # torch (made visible by dev_deps.pth) can compile the kernel at install time; drop that build
        # so the first-use compile below is what gets tested
        for p in built:
            p.unlink()
    first = subprocess.run([str(py), "-c", CHECK], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert first.returncode == 0, first.stdout + first.stderr
    assert build.JIT_MESSAGE in first.stderr and "ok" in first.stdout
    assert list((tmp_path / "cache" / "kernels").glob("py*-torch*/_kernels*"))
    again = subprocess.run([str(py), "-c", CHECK], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert again.returncode == 0 and build.JIT_MESSAGE not in again.stderr, again.stderr  # cached
