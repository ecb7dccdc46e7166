"""ipu-sparse: pruned (80%-sparse) LLMs held in on-chip memory; CPU reference path."""
from setuptools import find_packages, setup

setup(
    name="ipu-sparse",
    version="0.1.0",
    description="80%-sparse language models: pruning, compact sparse storage, fast CPU kernels, IPU port",
    long_description=open("README.md", encoding="utf-8").read() if __import__("os").path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.8",
    packages=find_packages(include=["ipu_sparse", "ipu_sparse.*"]),
    install_requires=[
        "torch>=2.0.1",
        "numpy",
        "gguf>=0.10",
        "tokenizers>=0.19",
        "safetensors>=0.4",
        "jinja2",
        "tqdm",
    ],
    extras_require={
        "test": ["pytest", "hypothesis"],
        "bench": ["transformers", "matplotlib"],
    },
    entry_points={"console_scripts": ["ipu-sparse=ipu_sparse.cli:main"]},
)
