"""The launch budgets of the fused paths, from bench/model.py's counts (real calls, every Triton
launch stubbed, aten ops counted under a dispatch mode). Counts only: no time is asserted.

A budget below is the issue's target where it is met (DQN and sp: at most 2 launches forward; sp:
the kernel and the mean, now that the teacher's checks come from the kernel's per-row status; sp at
an RL shape, a few rows of one tile: 1 forward and 3 forward+backward, the mean taken in the
kernel) and today's count where it is not yet (fwd+bwd 4 against 3: for sp over many rows,
autograd's seed, the kernel, the mean and the backward launch, which reads the mean's upstream
scalar in place; for DQN, the seed, the walk, the fold and the backward: the fold is the
deterministic, stateless reduction that replaced the last-program ticket, whose counter was global
state), so that nothing grows unnoticed. The same holds for the SASS instructions per element of
each launch's sm_90 compile: issue 24's targets are 45 for kl-fwd and 100 for js,
summed over a row's passes; the budgets hold today's counts (Triton 3.9) until the kernels reach them."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from fusedloss.testing import ZERO_FILL_OPS as FILLS

ROOT = Path(__file__).resolve().parents[1]


def _bundled(name):
    try:
        import triton
    except ImportError:
        return False
    return (Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name).exists()


SASS = _bundled("ptxas") and _bundled("cuobjdump")
# case: {kernel: max SASS instructions per element over its passes} (today's counts, rounded up)
INSTR_BUDGETS = {
    # a tile of 32 columns for 18: padding and per-row work (the teacher's status store adds ~7 per element here);
    # the in-kernel mean's loop body over tiles of 128 rows
    "sp kl-fwd N=256 V=18": {"_sp_fwd_kernel": 193},
    "sp kl-fwd N=8192 V=32768": {"_sp_fwd_kernel": 50, "_sp_bwd_kernel": 6},
    "sp kl-fwd N=1024 V=131072": {"_sp_fwd_kernel": 50, "_sp_bwd_kernel": 6},
    "sp js N=2048 V=32768": {"_sp_fwd_kernel": 231, "_sp_bwd_kernel": 6},
    "sp_topk N=8192 V=32768 k=64": {"_sp_topk_fwd_kernel": 21, "_sp_bwd_kernel": 6},
    "dqn B=256 S=64 A=18": {"_dqn_bwd_kernel": 5},
}
# case: {kernel: top-level loops, each a pass over a row} (kl-fwd: statistics, then loss and gradient;
# js needs the row loss first; a row in one tile: none, but the in-kernel mean's one program walks
# the row tiles in one loop)
LOOPS = {"sp kl-fwd N=8192 V=32768": {"_sp_fwd_kernel": 2}, "sp kl-fwd N=1024 V=131072": {"_sp_fwd_kernel": 2},
          "sp js N=2048 V=32768": {"_sp_fwd_kernel": 3}, "sp kl-fwd N=256 V=18": {"_sp_fwd_kernel": 1}}
# case: (max launches forward, max launches forward+backward)
BUDGETS = {
    "dqn B=256 S=64 A=18": (2, 4),
    "dqn B=32 S=80 A=18": (2, 4),
    "dqn B=1024 S=32 A=1024": (2, 4),
    "dqn B=64 S=64 A=32768": (2, 4),
    "sp kl-fwd N=8192 V=32768": (2, 4),
    "sp kl-fwd N=1024 V=131072": (2, 4),
    "sp js N=2048 V=32768": (2, 4),
    "sp kl-fwd N=256 V=18": (1, 3),  # the mean taken in the kernel (a few rows of one tile)
    "sp_topk N=8192 V=32768 k=64": (2, 4),
    "vec_dqn B=64 S=32 A=18 D=16": (7, 9),
}


REFERENCE_OPS = 25  # dqn_loss(backend="torch") fwd+bwd at B=32 S=80 A=18, metrics included (86, then 52 before; a textbook loss: 19)


@pytest.fixture(scope="module")
def model_json(tmp_path_factory):
    pytest.importorskip("triton")
    out = tmp_path_factory.mktemp("model") / "model.json"
    res = subprocess.run([sys.executable, str(ROOT / "bench" / "model.py"), "--repeat", "0", "--json", str(out)]
                         + ([] if SASS else ["--no-sass"]),
                         capture_output=True, text=True, cwd=ROOT)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    assert "a model, not a GPU measurement" in res.stdout
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def rows(model_json):
    return {r["case"]: r for r in model_json["rows"]}


def test_reference_path_op_budget(model_json):
    """The PyTorch reference path's aten ops per fwd+bwd at an RL shape (counted, not timed)."""
    ref = model_json["reference"]
    assert ref["textbook"]["aten ops"] > 0
    assert ref["fusedloss reference"]["aten ops"] <= REFERENCE_OPS, ref


@pytest.mark.parametrize("case", sorted(BUDGETS))
def test_launch_budget(rows, case):
    r = rows[case]
    fwd, total = BUDGETS[case]
    assert r["fwd launches"] <= fwd and r["fwd+bwd launches"] <= total, r
    assert not FILLS & set(r["fwd+bwd aten launches"]), r["fwd+bwd aten launches"]
    kernels = r["fwd+bwd triton launches"]
    assert kernels and kernels[0].endswith("_fwd_kernel") and kernels[-1].endswith("_bwd_kernel"), kernels
    assert 0.99 <= r["bytes / model"] <= 1.3, r["bytes / model"]


needs_sass = pytest.mark.skipif(not SASS, reason="this Triton build bundles no NVIDIA ptxas/cuobjdump")


@needs_sass
@pytest.mark.parametrize("case", sorted(BUDGETS))
def test_no_launch_spills(rows, case):
    sass = rows[case]["sass"]
    assert len(sass) == len(rows[case]["fwd+bwd triton launches"])
    assert all(k["spill_stores"] == 0 and k["spill_loads"] == 0 for k in sass), sass
    assert all(0 < k["occupancy"] <= 1 and k["regs"] > 0 for k in sass), sass


@needs_sass
@pytest.mark.parametrize("case", sorted(INSTR_BUDGETS))
def test_instruction_budget(rows, case):
    by_kernel = {k["kernel"]: k for k in rows[case]["sass"]}
    for kernel, budget in INSTR_BUDGETS[case].items():
        assert 0 < by_kernel[kernel]["instr_per_element"] <= budget, (kernel, by_kernel[kernel])

@needs_sass
@pytest.mark.parametrize("case", sorted(LOOPS))
def test_passes_over_a_row(rows, case):
    by_kernel = {k["kernel"]: k for k in rows[case]["sass"]}
    for kernel, loops in LOOPS[case].items():
        assert by_kernel[kernel]["loops"] == loops, (kernel, by_kernel[kernel])


@needs_sass
@pytest.mark.parametrize("case", ["dqn B=1024 S=32 A=1024", "dqn B=64 S=64 A=32768"])
def test_dqn_wide_actions_fill_the_gpu(rows, case):
    """Wide action spaces: the walk's grid covers the 132 SMs of an H100/H200 several times over
    (64 sequences of 32768 actions ran on 64 programs before they were split over time chunks)."""
    walk = next(k for k in rows[case]["sass"] if k["kernel"] == "_dqn_fwd_kernel")
    assert walk["programs"] >= 4 * 132, walk


@needs_sass
def test_prediction_is_bounded_by_its_terms(rows):
    """The predicted time is at least the byte model over the copy bandwidth (no launch runs above
    copy) and at least one launch cost per launch."""
    for r in rows.values():
        for gpu in ("H100", "H200"):
            us = r[f"{gpu} predicted us"]
            assert us >= 3.0 * r["fwd+bwd launches"] - 1e-6, r
            assert 0 < r[f"{gpu} % of copy"] <= 100, r
            assert set(r[f"{gpu} bound"]) <= {"bytes", "instructions", "launch"}, r
