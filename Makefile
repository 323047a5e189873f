# shardtrain: the two commands of the README.
#   make demo   tiny Llama, 2 processes on CPU (gloo) or GPUs, ~100 steps: plan, progress, loss falling
#   make test   the test suite (builds DeepSpeed's C++ ops once first)
# `make venv` creates .venv if missing: torch==2.13.0 FIRST (the CPU wheel where there is no GPU),
# then `pip install -e .[dev]`; it is a no-op (< 1 s) when nothing changed.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
TORCH_VERSION := 2.13.0
# Optional: where torch comes from, e.g. TORCH_INDEX=https://download.pytorch.org/whl/cpu for the small
# CPU-only wheel (default: pip's configured index).
TORCH_INDEX ?=
STAMP  := $(VENV)/.shardtrain-installed
# DeepSpeed JIT-builds its C++ ops here. One directory per environment: ops built against another
# checkout's DeepSpeed sources have different build.ninja paths, and two environments sharing
# ~/.cache/torch_extensions would rebuild each other's ops on every use.
export TORCH_EXTENSIONS_DIR ?= $(abspath $(VENV))/torch_extensions

.PHONY: venv demo test clean-runs

venv: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@$(PY) -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '$(TORCH_VERSION)')" 2>/dev/null || \
	  $(PY) -m pip install $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)) \
	    torch==$(TORCH_VERSION)
	$(PY) -m pip install -e '.[dev]'
	@touch $(STAMP)

demo: venv
	$(VENV)/bin/shardtrain launch configs/examples/tiny-cpu.yaml --no-resume

test: venv
	DS_ACCELERATOR=cpu timeout 1800 $(PY) .ci/build_ds_ops.py
	DS_ACCELERATOR=cpu $(PY) -m pytest

clean-runs:
	rm -rf runs/tiny-cpu
