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

import importlib  # noqa: E402

from fusedloss.losses import FAMILIES  # noqa: E402

# The kernel modules of the family table, each once, in table order.
KERNEL_MODULES = tuple(importlib.import_module(f"fusedloss.kernels.{name}")
                       for name in dict.fromkeys(f.kernel for f in FAMILIES if f.kernel is not None))


def variants():
    """Each kernel module's own list (its ``compile_variants()``)."""
    for module in KERNEL_MODULES:
        yield from module.compile_variants()


def runtime_attrs(v) -> dict:
    """The specialisation the runtime JIT gives a launch: ``tt.divisibility`` 16 on every pointer
    (torch's allocations are aligned far beyond 16 bytes) and on every integer argument whose value
    at the variant's shape (``v.ints``) is a multiple of 16, so the check compiles the vectorised
    loads that really run, not scalar ones."""
    attrs = {}
    for i, name in enumerate(v.kernel.arg_names):
        kind = v.signature[name]
        if kind.startswith("*") or (kind == "i32" and name in v.ints and v.ints[name] % 16 == 0):
            attrs[(i,)] = [["tt.divisibility", 16]]
    return attrs


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
    for v in variants():
        record = {"kernel": v.name, "arch": args.arch, "num_warps": v.num_warps}
        try:
            src = ASTSource(fn=v.kernel, signature=v.signature, constexprs=v.constexprs, attrs=runtime_attrs(v))
            compiled = triton.compile(src, target=GPUTarget("cuda", args.arch, 32), options={"num_warps": v.num_warps})
            record.update(resource_usage(compiled.asm["ptx"], args.arch))
        except Exception as exc:  # report every failing variant, not just the first
            failures += 1
            record["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        print(json.dumps(record), flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
