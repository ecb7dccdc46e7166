"""How the compiled sparse kernel is built: by ``setup.py`` and, just in time, on first use.

No torch or package import at module level: ``setup.py`` imports this file by path before
deciding whether torch is there to build against, and the JIT build runs it as a script.

One extension, ``ipu_sparse.sparse._kernels``, compiled from every ``csrc/*.cpp`` (sorted) with
the ``csrc/*.h`` headers; the sources ship in the wheel as package data. Two ways to get it:

* ``python setup.py build_ext --inplace`` / ``pip install --no-build-isolation -e .`` (torch
  importable at build time) builds it next to this file;
* otherwise (``pip install .`` builds in an isolated environment without torch) the first process
  that needs it compiles it once (:func:`jit_load`, about a minute), into
  ``$IPU_SPARSE_CACHE`` (default ``$XDG_CACHE_HOME/ipu_sparse`` or ``~/.cache/ipu_sparse``)
  ``/kernels/py<X.Y>-torch<version>-<hash of the sources and flags>/``, under a file lock so two
  processes never compile at once; later processes load the cached module directly.

The kernel links against the OpenMP runtime that torch itself loaded (torch wheels
ship a renamed ``libgomp-<hash>.so.1``), so ``at::parallel_for`` in the extension
shares torch's thread pool and ``torch.set_num_threads`` instead of starting a second
OpenMP runtime that would fight torch's for the cores.
"""
from __future__ import annotations

import glob
import hashlib
import os
import platform
import sys
from typing import List, Tuple

EXT_NAME = "ipu_sparse.sparse._kernels"
CSRC = os.path.join("ipu_sparse", "sparse", "csrc")
# No -march: the AVX2 / AVX-512 code paths carry their own target attributes and are
# chosen at run time, so one build runs on any x86-64 CPU.
CXX_FLAGS = ["-O3", "-fopenmp", "-fno-math-errno", "-Wno-unused-function", "-Wno-maybe-uninitialized"]
HERE = os.path.dirname(os.path.abspath(__file__))
PACKAGE_ROOT = os.path.dirname(os.path.dirname(HERE))  # the directory that holds ipu_sparse/


def sources(root: str = "") -> List[str]:
    """Every ``csrc/*.cpp``, sorted, as ``root``-relative paths (``root`` = the directory holding ipu_sparse/)."""
    found = sorted(glob.glob(os.path.join(root or ".", CSRC, "*.cpp")))
    return [os.path.relpath(p, root or ".") for p in found]


def depends(root: str = "") -> List[str]:
    found = sorted(glob.glob(os.path.join(root or ".", CSRC, "*.h")))
    return [os.path.relpath(p, root or ".") for p in found]


def openmp_link_args(torch_lib_dir: str) -> Tuple[List[str], List[str]]:
    """(extra_link_args, runtime_library_dirs) that bind the extension to torch's libgomp."""
    bundled = sorted(glob.glob(os.path.join(torch_lib_dir, "libgomp*.so*")))
    if bundled:
        return ["-L" + torch_lib_dir, "-l:" + os.path.basename(bundled[0])], [torch_lib_dir]
    return ["-fopenmp"], []


def make_extension(cpp_extension, root: str = ""):
    """The ``CppExtension`` (paths relative to ``root``), the same for setup.py and the JIT build."""
    torch_lib = os.path.normpath(os.path.join(os.path.dirname(cpp_extension.__file__), "..", "lib"))
    link_args, rpath = openmp_link_args(torch_lib)
    return cpp_extension.CppExtension(
        EXT_NAME, sources(root), depends=depends(root), extra_compile_args=list(CXX_FLAGS),
        extra_link_args=link_args, runtime_library_dirs=rpath)


# --- just-in-time build ---------------------------------------------------------------------------
JIT_MESSAGE = "ipu-sparse: compiling the sparse kernel once (~1 min)..."


def cache_root() -> str:
    """``$IPU_SPARSE_CACHE``, else ``$XDG_CACHE_HOME/ipu_sparse``, else ``~/.cache/ipu_sparse``."""
    env = os.environ.get("IPU_SPARSE_CACHE")
    if env:
        return os.path.abspath(os.path.expanduser(env))
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "ipu_sparse")


def source_hash(root: str = PACKAGE_ROOT) -> str:
    """sha256 over the sources' and headers' names and bytes and the compiler flags."""
    h = hashlib.sha256()
    for rel in sources(root) + depends(root):
        h.update(os.path.basename(rel).encode() + b"\0")
        with open(os.path.join(root, rel), "rb") as fh:
            h.update(fh.read())
        h.update(b"\0")
    h.update(" ".join(CXX_FLAGS).encode())
    return h.hexdigest()


def jit_dir(torch_version: str, root: str = PACKAGE_ROOT) -> str:
    """Where the JIT-built module for these sources, this torch and this Python lives."""
    py = "py%d.%d" % sys.version_info[:2]
    key = f"{py}-torch{torch_version}-{platform.machine()}-{source_hash(root)[:16]}"
    return os.path.join(cache_root(), "kernels", key)


def _module_file(directory: str) -> str:
    import importlib.machinery

    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        path = os.path.join(directory, "_kernels" + suffix)
        if os.path.exists(path):
            return path
    return ""


def _import(path: str):
    """Import the built module as ``ipu_sparse.sparse._kernels`` (so a later ``from . import _kernels`` finds it)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(EXT_NAME, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    sys.modules[EXT_NAME] = module
    return module


class _FileLock:
    """An exclusive ``flock`` on ``path`` (held by one process at a time; released if the process dies)."""

    def __init__(self, path: str):
        self.path, self.fh = path, None

    def __enter__(self):
        self.fh = open(self.path, "a")
        try:
            import fcntl

            fcntl.flock(self.fh, fcntl.LOCK_EX)
        except ImportError:  # no fcntl (Windows): no lock
            pass
        return self

    def __exit__(self, *exc):
        self.fh.close()  # closing releases the lock


def newer_sources(module_file: str, root: str = PACKAGE_ROOT) -> List[str]:
    """The sources and headers changed after ``module_file`` was built (an in-place build gone stale)."""
    try:
        built = os.path.getmtime(module_file)
    except OSError:
        return []
    return [rel for rel in sources(root) + depends(root) if os.path.getmtime(os.path.join(root, rel)) > built]


def jit_load(root: str = PACKAGE_ROOT):
    """The compiled module, compiling it into the cache first if this version is not there yet.

    ``root``: the directory holding ``ipu_sparse/sparse/csrc``. Raises ``RuntimeError`` (naming the
    build log) when the compiler fails.
    """
    import subprocess
    import tempfile
    import time

    import torch

    if not sources(root):
        raise RuntimeError(f"no C++ sources in {os.path.join(root, CSRC)}")
    out = jit_dir(torch.__version__, root)
    found = _module_file(out)
    if found:
        return _import(found)
    os.makedirs(out, exist_ok=True)
    with _FileLock(os.path.join(out, "lock")):
        found = _module_file(out)  # another process may have built it while we waited
        if found:
            return _import(found)
        print(JIT_MESSAGE, file=sys.stderr, flush=True)
        t0 = time.time()
        build_log = os.path.join(out, "build.log")
        tmp = tempfile.mkdtemp(prefix=".build-", dir=out)
        with open(build_log, "w") as fh:
            rc = subprocess.call([sys.executable, os.path.abspath(__file__), tmp], cwd=root, stdout=fh,
                                 stderr=subprocess.STDOUT)
        built = _module_file(tmp)
        if rc != 0 or not built:
            with open(build_log, errors="replace") as fh:
                tail = [ln.strip() for ln in fh.read().splitlines() if ln.strip()][-3:]
            raise RuntimeError(f"compiling the sparse kernel failed (log: {build_log}): " + " | ".join(tail))
        final = os.path.join(out, os.path.basename(built))
        os.replace(built, final)
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
        print(f"ipu-sparse: sparse kernel compiled in {time.time() - t0:.0f} s, cached in {out}", file=sys.stderr,
              flush=True)
    return _import(final)


def _build_into(build_lib: str) -> int:
    """Compile the extension with setuptools + torch's BuildExtension (no ninja needed) into ``build_lib``."""
    from setuptools import Distribution
    from torch.utils import cpp_extension

    ext = make_extension(cpp_extension, "")
    dist = Distribution({"name": "ipu-sparse-kernels", "ext_modules": [ext],
                         "cmdclass": {"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=False)}})
    cmd = dist.get_command_obj("build_ext")
    cmd.build_lib = build_lib
    cmd.build_temp = os.path.join(build_lib, "temp")
    cmd.inplace = False
    dist.run_command("build_ext")
    # setuptools writes ipu_sparse/sparse/_kernels<suffix> under build_lib: move it up
    for suffix in __import__("importlib.machinery").machinery.EXTENSION_SUFFIXES:
        path = os.path.join(build_lib, "ipu_sparse", "sparse", "_kernels" + suffix)
        if os.path.exists(path):
            os.replace(path, os.path.join(build_lib, "_kernels" + suffix))
            return 0
    print("build_ext produced no module", file=sys.stderr)
    return 1


if __name__ == "__main__":  # the JIT build's compiler process: python build.py BUILD_DIR (cwd = package root)
    if sys.path and os.path.abspath(sys.path[0]) == HERE:
        sys.path.pop(0)  # this package's modules must not shadow top-level ones
    sys.exit(_build_into(sys.argv[1]))
