# Two commands on a fresh machine (Python >= 3.11):
#   make demo   -> creates .venv if missing, runs `alignti demo` (whole pipeline, CPU)
#   make test   -> creates .venv if missing, runs the test suite
#
# TORCH picks the torch requirement installed first. The default is the CPU build
# (pip install torch==2.13.0). GPU users: `make demo TORCH=` keeps whatever torch is already
# in the venv (install your CUDA build there first), or `make demo TORCH="torch==2.x.y"`.
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin

.PHONY: setup demo test clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	@if [ -n "$(TORCH)" ]; then $(BIN)/python -m pip install --quiet "$(TORCH)"; fi
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(BIN)/alignti demo $(DEMO_ARGS)

test: setup
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) demo-out
