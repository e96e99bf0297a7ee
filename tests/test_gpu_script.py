"""``make gpu`` (bench/gpu.sh) refuses a machine without CUDA: one line, a non-zero exit, and
nothing written, so no figure ever comes from the interpreter."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_gpu_script_refuses_without_cuda(tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "PYTHON": sys.executable, "OUT": str(out)}
    res = subprocess.run(["bash", str(ROOT / "bench" / "gpu.sh")], capture_output=True, text=True, env=env,
                         timeout=120)
    assert res.returncode == 2
    lines = [line for line in (res.stdout + res.stderr).splitlines() if line.strip()]
    assert len(lines) == 1 and "no CUDA device" in lines[0], lines
    assert not out.exists()


def test_gpu_script_parses():
    res = subprocess.run(["bash", "-n", str(ROOT / "bench" / "gpu.sh")], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr


# --- fail soft: the dry run of the whole script, and a bench session cut short ------------------------------------

STEPS = ["setup", "verify --device cpu", "bench sp", "bench sp_linear", "bench dqn", "bench lm_head", "bench compile",
         "pytest -m cuda"]
FAMILIES = {"sp", "sp_topk", "sp_linear", "dqn", "vec_dqn", "vec_dqn_scores", "lm_head"}


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if k not in ("FUSEDLOSS_BENCH_DEADLINE", "TRITON_INTERPRET")}
    env.update(PYTHONUNBUFFERED="1", **extra)
    return env


def _benchmarks(path):
    import json

    return json.loads(Path(path).read_text())["benchmarks"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="the dry run is the CPU stand-in for the GPU run")
def test_dry_run_runs_every_step_in_order_within_its_budget(tmp_path):
    """GPU_DRY_RUN=1 runs the GPU script's steps on the CPU with short limits: the steps come in
    priority order, the run ends inside its budget, at most 8 plain files come back, each results
    JSON holds figures, and the report renders them."""
    import time

    out = tmp_path / "out"
    budget = 150
    env = _env(GPU_DRY_RUN="1", PYTHON=sys.executable, OUT=str(out), BUDGET=str(budget), LIMIT_SCALE="0.2",
               DRY_K="fused", BENCH_MAX_TIME="0.02", TRITON_CACHE_DIR=str(tmp_path / "triton"),
               TORCHINDUCTOR_CACHE_DIR=str(tmp_path / "inductor"))
    start = time.monotonic()
    res = subprocess.run(["bash", str(ROOT / "bench" / "gpu.sh")], capture_output=True, text=True, env=env,
                         timeout=budget + 120)
    wall = time.monotonic() - start
    log = (out / "gpu.log").read_text()
    headers = [line[4:].split(" (limit")[0].split(":")[0] for line in log.splitlines() if line.startswith("=== ")]
    seen = list(dict.fromkeys(h.replace(" (the wheelhouse, env.json)", "") for h in headers))
    assert seen == STEPS, (seen, res.stdout[-2000:])
    assert "skipped, the" not in log  # the limits fit the budget: every step ran
    assert wall < budget + 45
    files = sorted(p.name for p in out.iterdir())
    assert len(files) <= 8 and all((out / f).is_file() for f in files), files
    assert "env.json" in files and "gpu.log" in files
    results = [out / f for f in files if f.startswith("results-")]
    counts = {p.name: len(_benchmarks(p)) for p in results}
    assert sum(counts.values()) > 0, counts
    for p in results:
        assert {b["extra_info"]["family"] for b in _benchmarks(p)} <= FAMILIES
    report = subprocess.run([sys.executable, str(ROOT / "bench" / "report.py"), *map(str, sorted(out.glob("*.json"))),
                             "--allow-cpu", "--out", str(tmp_path / "B.md"), "--plots", str(tmp_path / "plots")],
                            capture_output=True, text=True, timeout=120)
    assert report.returncode == 0, report.stderr
    text = (tmp_path / "B.md").read_text()
    assert "CPU run" in text and "### sp" in text


def _bench_session(json_path, **env):
    cmd = [sys.executable, "-m", "pytest", "bench/bench_sp.py", "bench/bench_dqn.py", "bench/bench_vec_dqn.py",
           "--benchmark-only", f"--benchmark-json={json_path}", "--benchmark-max-time=0.02", "--benchmark-min-rounds=5",
           "-q",
           "-p", "no:cacheprovider", "-k", "fused or eager"]
    return subprocess.Popen(cmd, cwd=ROOT, env=_env(TRITON_INTERPRET="1", **env), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGKILL"])
def test_a_killed_bench_keeps_the_figures_it_finished(tmp_path, sig):
    """The JSON is written after every benchmark: a session killed (SIGTERM, as timeout sends, or
    SIGKILL) after its first benchmark still leaves valid JSON with that benchmark's figures."""
    import signal
    import time

    path = tmp_path / "r.json"
    proc = _bench_session(path)
    start = time.monotonic()
    while not path.exists() and proc.poll() is None and time.monotonic() - start < 240:
        time.sleep(0.05)
    assert path.exists(), proc.communicate()[0][-2000:]
    proc.send_signal(getattr(signal, sig))
    output = proc.communicate(timeout=120)[0]
    assert proc.returncode != 0, output[-2000:]  # it was cut, not finished
    done = _benchmarks(path)
    # only finished benchmarks: the one cut in the middle, with its few rounds, is left out
    assert len(done) >= 1 and all(b["stats"]["median"] > 0 and b["stats"]["rounds"] >= 5 for b in done), done
    assert not list(tmp_path.glob("*.partial"))


def test_the_deadline_ends_a_bench_session_after_the_running_test(tmp_path):
    """FUSEDLOSS_BENCH_DEADLINE already passed: the session stops after its first test and writes
    that test's figures (pytest-benchmark's full JSON, raw timings included)."""
    import time

    path = tmp_path / "r.json"
    proc = _bench_session(path, FUSEDLOSS_BENCH_DEADLINE=str(time.time()))
    output = proc.communicate(timeout=240)[0]
    assert "FUSEDLOSS_BENCH_DEADLINE passed" in output, output[-2000:]
    done = _benchmarks(path)
    assert len(done) == 1 and "data" in done[0]["stats"]
