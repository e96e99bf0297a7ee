# Two entry points, each doing its own set-up in .venv (Python >= 3.10; no torch needed beforehand).
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin

.PHONY: verify test bench clean

$(BIN)/.installed: setup.py
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e ".[test,bench]"
	touch $@

verify: $(BIN)/.installed
	$(BIN)/python -m fusedloss verify

# Kernel tests run on CUDA when present, else on CPU under TRITON_INTERPRET=1 (tests/conftest.py).
# The benchmark suite runs once as a smoke test (--benchmark-disable), with tiny shapes on CPU.
test: $(BIN)/.installed
	$(BIN)/python -m pytest tests bench --benchmark-disable -q

bench: $(BIN)/.installed
	$(BIN)/python -m pytest bench --benchmark-only --benchmark-json=bench/results.json

clean:
	rm -rf $(VENV) .pytest_cache .benchmarks
