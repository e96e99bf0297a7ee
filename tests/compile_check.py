"""Compile every fused kernel ahead of time for a GPU target, with no GPU present, and report
each variant's registers and stack (spills) from the cubin.

The Triton interpreter accepts code that the compiler rejects (a loop-carried value changing type,
a non-constexpr shape), and it says nothing about register pressure. This script runs the real
compiler for ``--arch`` (default sm_90, H100/H200) on the tile shapes the launchers pick, then the
bundled ptxas with ``-v``, and prints one JSON line per variant (registers, stack, spill bytes).
It must run with TRITON_INTERPRET unset.

    python tests/compile_check.py [--arch 90]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile

os.environ.pop("TRITON_INTERPRET", None)
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from fusedloss.kernels import dqn as KD  # noqa: E402
from fusedloss.kernels import sp as KS  # noqa: E402
from fusedloss.kernels import vec_dqn as KV  # noqa: E402


def _sig(fn, types: dict[str, str], constexprs: dict) -> dict:
    """Signature for ``fn``: given types, ``constexpr`` for the constants, ``i32`` otherwise."""
    return {name: "constexpr" if name in constexprs else types.get(name, "i32") for name in fn.arg_names}


def variants():
    fp = {"inv_t": "fp32", "eps": "fp32", "sign": "fp32", "inv_n": "fp32", "cos_eps": "fp32"}
    for A in (18, 256, 4096, 32768, 131072):
        block, rows, warps = KS._tiling(A, KS.MAX_BLOCK)
        for dt in ("bf16", "fp32"):
            for loss in (0, 1, 5):
                c = {"LOSS": loss, "HAS_SMOOTHING": True, "ROWS": rows, "BLOCK_A": block, "SINGLE_TILE": block >= A}
                t = {**fp, "q_ptr": f"*{dt}", "z_ptr": f"*{dt}", "loss_ptr": "*fp32", "grad_ptr": f"*{dt}"}
                yield f"sp A={A} {dt} loss={loss}", KS._sp_fwd_kernel, _sig(KS._sp_fwd_kernel, t, c), c, warps
    c = {"ROWS": 1, "BLOCK_A": 4096}
    yield "sp scale_rows", KS._scale_rows_kernel, _sig(KS._scale_rows_kernel, {
        "g_ptr": "*bf16", "scale_ptr": "*fp32", "out_ptr": "*bf16"}, c), c, 4

    dqn_fp = {k: "fp32" for k in ("gamma", "gamma_terminal", "gamma_truncated", "reward_scale", "reward_shift",
                                  "norm_eps", "norm_target", "cql_weight", "cql_eps", "huber_delta")}
    ptrs = {"q_ptr": "*bf16", "qt_ptr": "*bf16", "act_ptr": "*i64", "rew_ptr": "*fp32", "done_ptr": "*i64",
            "w_ptr": "*fp32", "m_ptr": "*u8", "grad_ptr": "*bf16", "td_ptr": "*fp32", "part_ptr": "*fp32",
            "metrics_ptr": "*fp32", "loss_ptr": "*fp32", "counter_ptr": "*i32"}
    for A, S in ((4, 512), (18, 64), (1024, 32), (32768, 64)):
        block_a, t_block, warps = KD._tiles(A, S)
        for every in (False, True):
            c = {"HAS_WEIGHT": every, "HAS_MASK": every, "NORM_MEAN": every, "NORM_STD": every, "CQL": True,
                 "HUBER": every, "DOUBLE": every, "T_BLOCK": t_block, "BLOCK_A": block_a, "B_BLOCK": 256}
            yield (f"dqn A={A} S={S} {'all options' if every else 'cql'}", KD._dqn_fwd_kernel,
                   _sig(KD._dqn_fwd_kernel, {**dqn_fp, **ptrs}, c), c, warps)
    c = {"BLOCK": 4096}
    yield "dqn scale", KD._scale_by_kernel, _sig(KD._scale_by_kernel, {
        "g_ptr": "*bf16", "out_ptr": "*bf16", "gout_ptr": "*fp32", "inv_ptr": "*fp32"}, c), c, 4

    for A, D in ((18, 2), (18, 16), (128, 32), (512, 256)):
        ba, bi, bd, warps = KV._score_tiles(A, D // 2)
        c = {"BA": ba, "BI": bi, "BD": bd}
        yield f"vec_dqn scores A={A} D={D}", KV._scores_kernel, _sig(KV._scores_kernel, {
            "v_ptr": "*fp32", "out_ptr": "*fp32"}, c), c, warps
        c = {"BA": ba, "BI": bi, "BD": bd, "BH": triton.next_power_of_2(D // 2)}
        yield f"vec_dqn loss A={A} D={D}", KV._vec_dqn_fwd_kernel, _sig(KV._vec_dqn_fwd_kernel, {
            **fp, "on_ptr": "*bf16", "tg_ptr": "*bf16", "act_ptr": "*i64", "theta_ptr": "*fp32", "loss_ptr": "*fp32",
            "g_ptr": "*fp32"}, c), c, warps
        ba, bh = KV._bwd_tiles(A, D)
        c = {"BA": ba, "BH": bh}
        yield f"vec_dqn backward A={A} D={D}", KV._vec_dqn_bwd_kernel, _sig(KV._vec_dqn_bwd_kernel, {
            **fp, "g_ptr": "*fp32", "act_ptr": "*i64", "gout_ptr": "*fp32", "out_ptr": "*bf16"}, c), c, 4
    for D in (2, 16, 256):
        bm, bh = KV._rope_tiles(D)
        c = {"BM": bm, "BH": bh}
        yield f"rope D={D}", KV._rope_kernel, _sig(KV._rope_kernel, {**fp, "x_ptr": "*bf16", "th_ptr": "*fp32",
                                                                   "out_ptr": "*bf16"}, c), c, 4


def _ptxas_candidates():
    bindir = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    return [os.path.join(bindir, name) for name in ("ptxas-blackwell", "ptxas") if os.path.exists(os.path.join(bindir, name))]


def resource_usage(ptx: str, arch: int) -> dict:
    """Registers, stack frame and spill bytes, as ptxas -v reports them. A stack frame without
    spills is benign (libdevice's sin/cos keep a small local array for huge arguments)."""
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(ptx)
    try:
        for tool in _ptxas_candidates():  # the first whose PTX ISA is new enough
            res = subprocess.run([tool, "-v", f"-arch=sm_{arch}a", f.name, "-o", os.devnull], capture_output=True, text=True)
            if res.returncode == 0:
                text = res.stdout + res.stderr
                m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", text)
                r = re.search(r"Used (\d+) registers", text)
                return {"regs": int(r.group(1)), "stack": int(m.group(1)), "spill_stores": int(m.group(2)),
                        "spill_loads": int(m.group(3))}
        raise RuntimeError("no bundled ptxas accepted the PTX")
    finally:
        os.unlink(f.name)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", type=int, default=90)
    args = ap.parse_args()
    failures = 0
    for name, fn, sig, constexprs, warps in variants():
        record = {"kernel": name, "arch": args.arch, "num_warps": warps}
        try:
            src = ASTSource(fn=fn, signature=sig, constexprs=constexprs)
            compiled = triton.compile(src, target=GPUTarget("cuda", args.arch, 32), options={"num_warps": warps})
            record.update(resource_usage(compiled.asm["ptx"], args.arch))
        except Exception as exc:  # report every failing variant, not just the first
            failures += 1
            record["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        print(json.dumps(record), flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
