"""Compile every fused kernel ahead of time for a GPU target, with no GPU present, and report
each variant's registers, spills, shared memory, occupancy and SASS instructions per element
(:mod:`fusedloss.kernels.aot`).

The Triton interpreter accepts code that the compiler rejects (a loop-carried value changing type,
a non-constexpr shape), and it says nothing about register pressure. This script runs the real
compiler for ``--arch`` (default sm_90, H100/H200) on the tile shapes the launchers pick, then the
bundled ptxas and cuobjdump, and prints one JSON line per variant.
It must run with TRITON_INTERPRET unset.

    python tests/compile_check.py [--arch 90]
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys

os.environ.pop("TRITON_INTERPRET", None)
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

from fusedloss.kernels.aot import analyse, runtime_attrs  # noqa: E402, F401  (runtime_attrs: for the tests)
from fusedloss.losses import FAMILIES  # noqa: E402

# The kernel modules of the family table, each once, in table order.
KERNEL_MODULES = tuple(importlib.import_module(f"fusedloss.kernels.{name}")
                       for name in dict.fromkeys(f.kernel for f in FAMILIES if f.kernel is not None))


def variants():
    """Each kernel module's own list (its ``compile_variants()``)."""
    for module in KERNEL_MODULES:
        yield from module.compile_variants()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", type=int, default=90)
    args = ap.parse_args()
    failures = 0
    for v in variants():
        try:
            record = analyse(v, args.arch)
        except Exception as exc:  # report every failing variant, not just the first
            failures += 1
            record = {"kernel": v.name, "arch": args.arch, "num_warps": v.num_warps,
                      "error": f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"}
        print(json.dumps(record), flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
