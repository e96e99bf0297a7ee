#!/usr/bin/env bash
# The offline wheelhouse for the GPU run: downloads, into .whl/ at the repository root (git-ignored),
# the wheels that the GPU image (Python 3.12, x86-64, with torch, triton, pytest, pytest-benchmark,
# hypothesis, numpy, scipy and pybind11 already installed) lacks for the tests and benchmarks:
# geomloss, tensordict (and its pyvers), liger-kernel, cut-cross-entropy, and pykeops/keopscore (pure Python, source
# only upstream, so built into wheels here). Run it on a machine with registry access, then carry
# .whl/ to the GPU machine, where bench/gpu.sh installs it with no registry:
#   python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .whl geomloss==0.3.1 tensordict==0.15.3 "pyvers>=0.2,<0.3" liger-kernel==0.8.5 cut-cross-entropy==25.1.1
python3 -m pip wheel -q --no-deps -w .whl pykeops==2.3 keopscore==2.3
ls .whl
