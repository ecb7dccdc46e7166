"""How the compiled sparse kernel is built (used by ``setup.py`` and by the JIT fallback).

No torch import at module level: ``setup.py`` imports this file before deciding
whether torch is there to build against.

The kernel links against the OpenMP runtime that torch itself loaded (torch wheels
ship a renamed ``libgomp-<hash>.so.1``), so ``at::parallel_for`` in the extension
shares torch's thread pool and ``torch.set_num_threads`` instead of starting a second
OpenMP runtime that would fight torch's for the cores.
"""
from __future__ import annotations

import glob
import os
from typing import List, Tuple

EXT_NAME = "ipu_sparse.sparse._kernels"
SOURCE = os.path.join("ipu_sparse", "sparse", "csrc", "sparse_kernels.cpp")
DEPENDS = (os.path.join("ipu_sparse", "sparse", "csrc", "generic_loops.h"),)
# No -march: the AVX2 / AVX-512 code paths carry their own target attributes and are
# chosen at run time, so one build runs on any x86-64 CPU.
CXX_FLAGS = ["-O3", "-fopenmp", "-fno-math-errno", "-Wno-unused-function", "-Wno-maybe-uninitialized"]


def openmp_link_args(torch_lib_dir: str) -> Tuple[List[str], List[str]]:
    """(extra_link_args, runtime_library_dirs) that bind the extension to torch's libgomp."""
    bundled = sorted(glob.glob(os.path.join(torch_lib_dir, "libgomp*.so*")))
    if bundled:
        return ["-L" + torch_lib_dir, "-l:" + os.path.basename(bundled[0])], [torch_lib_dir]
    return ["-fopenmp"], []


def source_path(root: str) -> str:
    return os.path.join(root, SOURCE)
