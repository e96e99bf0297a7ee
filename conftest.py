import os
import signal
import threading
import time
from pathlib import Path

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
    json_path = config.getoption("benchmark_json", default=None)
    if json_path is not None:
        # pytest-benchmark before 4 opened the file when it parsed the options: rewriting it under that open
        # file would lose the final JSON, so only the SIGTERM handling applies there.
        path = None if hasattr(json_path, "write") else Path(json_path)
        config.pluginmanager.register(FailSoftBenchmarks(config, path), "fusedloss-failsoft-benchmarks")


class FailSoftBenchmarks:
    """Benchmark runs that fail soft (issue 20: a GPU lease is short, and a stage that runs out of
    time must still return its figures). Registered with ``--benchmark-json=PATH``:

    - after each test's teardown the JSON of the benchmarks finished so far is written to ``PATH``
      (summary statistics, atomically through a temporary file), so even ``SIGKILL`` leaves the
      figures of every finished benchmark;
    - ``SIGTERM`` (what ``timeout`` sends first) becomes ``KeyboardInterrupt``: pytest ends the
      session and pytest-benchmark writes its full JSON, raw timings included; a benchmark cut in
      the middle is marked as an error there, so its few rounds never pass for a figure, and the
      handler is back to the default while that file is written;
    - ``FUSEDLOSS_BENCH_DEADLINE`` (seconds since the epoch) ends the session before the next test
      once that time has passed, so a stage stops by itself inside its limit.
    """

    def __init__(self, config, path: Path | None):
        self.config, self.path, self.session, self.info = config, path, None, None
        self.finished: set[str] = set()
        self.main = threading.current_thread() is threading.main_thread()
        if self.main:
            signal.signal(signal.SIGTERM, self._interrupt)

    @staticmethod
    def _interrupt(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}: the benchmark session ends; finished benchmarks are in the JSON")

    def pytest_sessionstart(self, session):
        self.session = session

    def pytest_runtest_logreport(self, report):
        if report.when == "call":
            self.finished.add(report.nodeid)
        elif report.when == "teardown":
            self.write()

    def pytest_runtest_logfinish(self, nodeid, location):
        deadline = os.environ.get("FUSEDLOSS_BENCH_DEADLINE")
        if deadline and self.session is not None and time.time() > float(deadline):
            self.session.shouldstop = f"FUSEDLOSS_BENCH_DEADLINE passed after {nodeid}: the stage's time is up"

    @pytest.hookimpl(tryfirst=True)
    def pytest_sessionfinish(self, session, exitstatus):
        if self.main:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
        for bench in self._benchmarks():
            if bench.fullname not in self.finished:
                bench.fixture.has_error = True  # interrupted: pytest-benchmark leaves errored ones out

    def _benchmarks(self):
        bs = getattr(self.config, "_benchmarksession", None)
        return [] if bs is None else list(bs.benchmarks)

    def write(self) -> None:
        bs = getattr(self.config, "_benchmarksession", None)
        done = [b for b in self._benchmarks() if b.fullname in self.finished and not b.has_error]
        if self.path is None or not done:
            return
        hook = self.config.hook
        if self.info is None:  # gathered once: py-cpuinfo takes about a second
            self.info = (bs.get_machine_info(), hook.pytest_benchmark_generate_commit_info(config=self.config))
        output = hook.pytest_benchmark_generate_json(config=self.config, benchmarks=done, include_data=False,
                                                     machine_info=self.info[0], commit_info=self.info[1])
        from pytest_benchmark.utils import safe_dumps

        tmp = self.path.with_name(self.path.name + ".partial")
        try:
            tmp.write_text(safe_dumps(output, ensure_ascii=True, indent=4))
            os.replace(tmp, self.path)
        finally:
            tmp.unlink(missing_ok=True)


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
