# Two entry points, each doing its own set-up in .venv (Python >= 3.10; no torch needed beforehand).
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin

.PHONY: verify test bench model clean gpu gpu-extra gpu-report docs docs-serve examples

$(BIN)/.installed: setup.py
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e ".[test,bench,examples]"
	touch $@

verify: $(BIN)/.installed
	$(BIN)/python -m fusedloss verify

# Kernel tests run on CUDA when present, else on CPU under TRITON_INTERPRET=1 (tests/conftest.py).
# The benchmark suite runs once as a smoke test (--benchmark-disable), with tiny shapes on CPU.
test: $(BIN)/.installed
	$(BIN)/python -m pytest tests bench --benchmark-disable -q

# The performance model without a GPU: launches, bytes and host µs, with every Triton launch stubbed.
model: $(BIN)/.installed
	$(BIN)/python bench/model.py --repeat 1000

bench: $(BIN)/.installed
	$(BIN)/python -m pytest bench --benchmark-only --benchmark-json=bench/results.json

# The GPU run (bench/gpu.sh): the GPU image's own python3, no .venv (that machine reaches no registry).
# On a machine without CUDA it says so in one line and exits non-zero.
GPU_PYTHON ?= python3
GPU_JSON ?= $(wildcard bench/data/*.json)
gpu:
	PYTHON=$(GPU_PYTHON) bash bench/gpu.sh

gpu-extra:
	PYTHON=$(GPU_PYTHON) STAGES=extra bash bench/gpu.sh

# Back on any machine: the committed JSON of a GPU run (bench/data/) into BENCHMARKS.md and bench/plots.
gpu-report: $(BIN)/.installed
	$(BIN)/python bench/report.py $(GPU_JSON) --out BENCHMARKS.md --plots bench/plots

# The documentation site (mkdocs-material + mkdocstrings), built offline and strict: a broken link,
# a missing docstring or an undocumented config field fails the build (docs/hooks.py).
$(BIN)/.docs: $(BIN)/.installed
	$(BIN)/python -m pip install -q -e ".[docs]"
	touch $@

docs: $(BIN)/.docs
	NO_MKDOCS_2_WARNING=1 $(BIN)/python -m mkdocs build --strict --site-dir site

docs-serve: $(BIN)/.docs
	NO_MKDOCS_2_WARNING=1 $(BIN)/python -m mkdocs serve

examples: $(BIN)/.installed

clean:
	rm -rf $(VENV) .pytest_cache .benchmarks site
