"""Every fused kernel compiles for sm_90 (H100/H200) with no register spills, checked without a
GPU: the real Triton compiler and the ptxas bundled with Triton (tests/compile_check.py)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

triton = pytest.importorskip("triton")
ROOT = Path(__file__).resolve().parents[1]
BIN = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"


@pytest.mark.skipif(not (BIN / "ptxas").exists() and not (BIN / "ptxas-blackwell").exists(),
                    reason="this Triton build has no bundled NVIDIA ptxas")
def test_all_kernels_compile_for_sm90_without_spills():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    res = subprocess.run([sys.executable, str(ROOT / "tests" / "compile_check.py"), "--arch", "90"],
                         capture_output=True, text=True, env=env, timeout=1200)
    records = [json.loads(line) for line in res.stdout.splitlines() if line.startswith("{")]
    assert records, res.stderr[-2000:]
    errors = [r for r in records if "error" in r]
    assert not errors, errors
    spills = [r for r in records if r["spill_stores"] or r["spill_loads"]]
    assert not spills, spills
    assert res.returncode == 0
    kernels = {r["kernel"].split()[0] for r in records}
    assert kernels == {"sp", "dqn", "vec_dqn", "rope", "lm_head"}


def test_compile_check_specialises_as_the_runtime_does():
    """Pointers and the integer arguments that are multiples of 16 at the variant's shape get
    ``tt.divisibility`` 16, as the JIT gives a real launch, so the check compiles the code that runs."""
    code = ("import sys; sys.path.insert(0, 'tests'); import compile_check as c\n"
            "v = next(v for v in c.variants() if v.name == 'sp A=32768 bf16 ce-soft-fwd')\n"
            "attrs = c.runtime_attrs(v); names = v.kernel.arg_names\n"
            "print(sorted(names[i] for (i,) in attrs))\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=env)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.strip() == str(sorted(["q_ptr", "z_ptr", "loss_ptr", "grad_ptr", "status_ptr", "N", "A", "stride_q",
                                             "stride_z", "stride_g"]))


def test_host_tile_arithmetic_matches_triton():
    """The launchers' host-side cdiv and next_power_of_2 (plain ints, no constexpr-function wrapper)
    give Triton's values."""
    from fusedloss.kernels._common import cdiv, next_power_of_2

    for n in list(range(1, 4100)) + [2**20 - 1, 2**20, 2**20 + 1, 131072, 128256]:
        assert next_power_of_2(n) == triton.next_power_of_2(n), n
        for d in (1, 3, 16, 64, 1000):
            assert cdiv(n, d) == triton.cdiv(n, d), (n, d)
    assert cdiv(0, 7) == 0
