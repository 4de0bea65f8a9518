# Two commands on a fresh machine: `make demo` and `make test`. Both create .venv when missing and
# install what they need first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch is installed only when the venv has none. The pinned release is the CPU build on this
# project's machines; elsewhere add the CPU wheel index to avoid a multi-GB CUDA download:
#   make test TORCH_PIP_FLAGS="--index-url https://download.pytorch.org/whl/cpu"
TORCH_SPEC ?= torch==2.13.0
TORCH_PIP_FLAGS ?=
STAMP := $(BIN)/.dynlens-installed

.PHONY: install test lint typecheck demo screenshot screenshot-warning clean

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -c "import torch" 2>/dev/null || \
		$(BIN)/python -m pip install -q $(TORCH_PIP_FLAGS) "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $@

install: $(STAMP)

lint: $(STAMP)
	$(BIN)/ruff check dynlens tests examples benchmarks scripts
	$(BIN)/ruff format --check dynlens tests examples benchmarks scripts

typecheck: $(STAMP)
	$(BIN)/mypy

test: lint typecheck
	$(BIN)/python -m pytest

demo: $(STAMP)
	$(BIN)/dynlens demo

# A picture of the live panels of runs/demo (run `make demo` first; needs Debian's chromium)
screenshot: $(STAMP)
	$(BIN)/python scripts/screenshot.py runs/demo --out docs/tensorboard_panels.png

# The dynlens/warning panels of examples/early_warning.py (run first when runs/examples lacks it)
screenshot-warning: $(STAMP)
	test -d runs/examples/early_warning || $(BIN)/python examples/early_warning.py
	$(BIN)/python scripts/screenshot.py runs/examples --run early_warning --category warning \
		--width 1100 --height 540 --scale 2 --out docs/early_warning.png

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache .mypy_cache
