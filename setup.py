"""ipu-sparse: pruned (80%-sparse) LLMs held in on-chip memory; CPU reference path."""
import os
import sys

from setuptools import find_packages, setup

# --- compiled sparse CPU kernel (ipu_sparse.sparse._kernels) ----------------------------------
# Built from every ipu_sparse/sparse/csrc/*.cpp (ipu_sparse/sparse/build.py holds the source list and
# flags) by `python setup.py build_ext --inplace` or any install where torch is importable at build
# time (`pip install --no-build-isolation -e .`). Where it is not (plain `pip install .` builds in an
# isolated environment without torch), with IPU_SPARSE_NO_EXT=1, or when the compiler fails, the
# package installs without it; the sources ship as package data and ipu_sparse.sparse.kernels
# compiles them once on first use, into ~/.cache/ipu_sparse (build.jit_load).
def _sparse_build_module():
    import importlib.util

    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "ipu_sparse", "sparse", "build.py")
    spec = importlib.util.spec_from_file_location("_ipu_sparse_build", path)  # no package import needed
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _sparse_kernel_build():
    if os.environ.get("IPU_SPARSE_NO_EXT"):
        return {}
    try:
        from torch.utils import cpp_extension
    except ImportError:
        print("ipu-sparse: torch not importable at build time; the sparse kernel will be compiled on first use",
              file=sys.stderr)
        return {}
    ext = _sparse_build_module().make_extension(cpp_extension)

    class OptionalBuildExt(cpp_extension.BuildExtension):
        def build_extension(self, extension):
            try:
                super().build_extension(extension)
            except Exception as exc:  # a missing compiler must not break the install
                print(f"ipu-sparse: building {extension.name} failed ({exc}); "
                      "it will be compiled on first use, or the pure-torch kernel used", file=sys.stderr)

    return {"ext_modules": [ext], "cmdclass": {"build_ext": OptionalBuildExt}}
# --- end compiled sparse CPU kernel --------------------------------------------------------------

# --- PopART sparse-matmul custom op (popart_ops/, IPU hosts only) ------------------------------
# Built with CMake (find_package(popart COMPONENTS popart-only)) only where the Graphcore Poplar SDK is enabled
# (`source poplar-*/enable.sh` sets POPLAR_SDK_ENABLED; or IPU_SPARSE_POPART_OPS=1 forces it).
# Elsewhere it prints that it is skipped; a failed build never breaks the install.
def _popart_ops_step():
    import subprocess

    if not any(c in sys.argv for c in ("build", "build_ext", "install", "develop", "bdist_wheel", "editable_wheel")):
        return
    here = os.path.dirname(os.path.abspath(__file__))
    src, out = os.path.join(here, "popart_ops"), os.path.join(here, "popart_ops", "build")
    if not (os.environ.get("POPLAR_SDK_ENABLED") or os.environ.get("IPU_SPARSE_POPART_OPS")):
        print("ipu-sparse: Poplar SDK not enabled (POPLAR_SDK_ENABLED unset); skipping popart_ops/ "
              "(see popart_ops/README.md)", file=sys.stderr)
        return
    try:
        subprocess.check_call(["cmake", "-S", src, "-B", out, "-DCMAKE_BUILD_TYPE=Release"])
        subprocess.check_call(["cmake", "--build", out, "-j"])
        print(f"ipu-sparse: built {os.path.join(out, 'libsparse_matmul.so')}", file=sys.stderr)
    except (OSError, subprocess.CalledProcessError) as exc:
        print(f"ipu-sparse: building popart_ops/ failed ({exc}); the IPU custom op is unavailable", file=sys.stderr)


_popart_ops_step()
# --- end PopART sparse-matmul custom op ---------------------------------------------------------

setup(
    name="ipu-sparse",
    version="0.1.0",
    description="80%-sparse language models: pruning, compact sparse storage, fast CPU kernels, IPU port",
    long_description=open("README.md", encoding="utf-8").read() if __import__("os").path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.8",
    packages=find_packages(include=["ipu_sparse", "ipu_sparse.*"]),
    package_data={"ipu_sparse.ipu": ["data/*.json"],  # PopTorch 3.4 op table for ipu-check
                  "ipu_sparse.eval": ["chat_probe.json"],  # the chat probe's questions
                  "ipu_sparse.serve": ["static/*.html", "static/*.js", "static/*.css"],  # the Lumi chat page
                  "ipu_sparse.sparse": ["csrc/*.cpp", "csrc/*.h"]},  # compiled on first use (sparse/build.py)
    install_requires=[
        "torch>=2.0.1",
        "numpy",
        "gguf>=0.10",
        "tokenizers>=0.19",
        "safetensors>=0.4",
        "jinja2",
        "tqdm",
        "starlette>=0.37",  # `ipu-sparse serve` (0.44 / uvicorn 0.33 are the last for Python 3.8)
        "uvicorn>=0.29",
    ],
    extras_require={
        "test": ["pytest", "hypothesis", "openai"],
        "bench": ["transformers", "matplotlib"],
        # the sparse-bitmask compressor is in compressed-tensors <= 0.14 (torch >= 2.1); our export and
        # import do not need it, the interoperability tests use it when it is installed
        "compressed-tensors": ["compressed-tensors>=0.10,<0.15"],
    },
    entry_points={"console_scripts": ["ipu-sparse=ipu_sparse.cli:main"]},
    **_sparse_kernel_build(),
)
