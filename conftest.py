import os

import pytest
import torch

from fusedloss._dispatch import use_interpreter_without_cuda

# Kernel tests and benchmarks run on CUDA when present, else on CPU under the Triton interpreter, which must be
# switched on before any @triton.jit function is defined (fusedloss imports kernels lazily).
use_interpreter_without_cuda()
os.environ.pop("FUSEDLOSS_BACKEND", None)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def pytest_addoption(parser):
    parser.addoption("--fuzz-long", action="store_true",
                     help="run tests/test_fuzz.py with twenty times more examples, drawn at random")


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: needs a CUDA GPU")
    if config.getoption("--fuzz-long"):
        os.environ["FUSEDLOSS_FUZZ_LONG"] = "1"


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def device():
    return DEVICE
