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
