"""Ahead-of-time compiles of the fused kernels for a GPU target, with no GPU present: registers,
spills, shared memory, occupancy and SASS instructions per element, from the real Triton compiler
and the ptxas and cuobjdump bundled with Triton. Shared by ``tests/compile_check.py`` (every
variant a launcher can pick) and ``bench/model.py`` (the exact launches of a loss call).

Nothing here runs a kernel. It needs a Triton with the NVIDIA backend and ``TRITON_INTERPRET``
unset (the interpreter has no compiler).

**Instructions per element** are static counts: the SASS instructions of the kernel's loops over
tiles (every top-level loop, summed: one pass over a row each; for sp's in-kernel mean, the one
loop over row tiles), or of the whole kernel when it has no loop or its row fits one tile, divided
by the elements one thread handles per iteration (``tile / (32·num_warps)``). A kernel module
names each kernel's tile in ``HOT_TILES``: the constexprs whose product is the elements one
iteration (or the one tile) covers. A branch taken rarely inside a loop is counted as if always
taken, so the figure is an upper bound of what issues, per pass over a row.
"""

from __future__ import annotations

import importlib
import math
import os
import re
import subprocess
import tempfile

import torch
import triton

from ._common import AotVariant

__all__ = ["runtime_attrs", "compile_variant", "resource_usage", "sass_stats", "occupancy", "tile_elements",
           "analyse", "launch_variant", "tool"]

# sm_90 (H100/H200) per-SM limits, from the CUDA occupancy calculator's tables.
SM90 = {"regs": 65536, "warps": 64, "blocks": 32, "smem": 233472, "smem_reserved": 1024, "reg_unit": 256}

_TORCH_TYPES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32", torch.float64: "fp64",
                torch.int64: "i64", torch.int32: "i32", torch.int16: "i16", torch.int8: "i8", torch.uint8: "u8",
                torch.bool: "i1"}


def tool(name: str) -> str | None:
    """The path of a binary bundled with Triton's NVIDIA backend (``ptxas``, ``cuobjdump``), or None."""
    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)
    return path if os.path.exists(path) else None


def runtime_attrs(v: AotVariant) -> dict:
    """The specialisation the runtime JIT gives a launch: ``tt.divisibility`` 16 on every pointer
    (torch's allocations are aligned far beyond 16 bytes) and on every integer argument whose value
    at the variant's shape (``v.ints``) is a multiple of 16, so the check compiles the vectorised
    loads that really run, not scalar ones."""
    attrs = {}
    for i, name in enumerate(v.kernel.arg_names):
        kind = v.signature[name]
        if not isinstance(kind, str):
            continue  # a tuple of float scalars: nothing to specialise
        if kind.startswith("*") or (kind in ("i32", "i64") and name in v.ints and v.ints[name] % 16 == 0):
            attrs[(i,)] = [["tt.divisibility", 16]]
    return attrs


def compile_variant(v: AotVariant, arch: int = 90):
    """``triton.compile`` of one variant for ``sm_<arch>``, specialised as the runtime would."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    src = ASTSource(fn=v.kernel, signature=v.signature, constexprs=v.constexprs, attrs=runtime_attrs(v))
    options = {"num_warps": v.num_warps}
    if v.num_stages is not None:
        options["num_stages"] = v.num_stages
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)


def resource_usage(ptx: str, arch: int) -> dict:
    """Registers, stack frame and spill bytes, as ptxas -v reports them. A stack frame without
    spills is benign (libdevice's sin/cos keep a small local array for huge arguments)."""
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(ptx)
    try:
        for name in ("ptxas-blackwell", "ptxas"):  # the first whose PTX ISA is new enough
            path = tool(name)
            if path is None:
                continue
            res = subprocess.run([path, "-v", f"-arch=sm_{arch}a", f.name, "-o", os.devnull], capture_output=True,
                                 text=True)
            if res.returncode == 0:
                text = res.stdout + res.stderr
                m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", text)
                r = re.search(r"Used (\d+) registers", text)
                return {"regs": int(r.group(1)), "stack": int(m.group(1)), "spill_stores": int(m.group(2)),
                        "spill_loads": int(m.group(3))}
        raise RuntimeError("no bundled ptxas accepted the PTX")
    finally:
        os.unlink(f.name)


_SASS_LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")


def sass_stats(cubin: bytes) -> dict:
    """The kernel's SASS instruction count and its top-level loops, from ``cuobjdump -sass``.

    A loop is a backward branch (its target below it; the trap ``BRA`` to itself at the end is
    not one); a loop inside another is part of it. Returns ``instructions`` (all of them, NOPs
    excluded), ``loops`` (the number of top-level loops) and ``loop_instructions`` (their bodies,
    summed)."""
    path = tool("cuobjdump")
    if path is None:
        raise RuntimeError("this Triton build bundles no cuobjdump")
    with tempfile.NamedTemporaryFile("wb", suffix=".cubin", delete=False) as f:
        f.write(cubin)
    try:
        text = subprocess.run([path, "-sass", f.name], capture_output=True, text=True, check=True).stdout
    finally:
        os.unlink(f.name)
    code = [(int(addr, 16), ins) for addr, ins in _SASS_LINE.findall(text)]
    addrs = [a for a, ins in code if not ins.startswith("NOP")]
    loops = []
    for addr, ins in code:
        m = re.search(r"\bBRA(?:\.\w+)* (?:`?\()?0x([0-9a-f]+)", ins)
        if m and int(m.group(1), 16) < addr:
            loops.append((int(m.group(1), 16), addr))
    top = [lp for lp in loops if not any(o != lp and o[0] <= lp[0] and lp[1] <= o[1] for o in loops)]
    body = sum(sum(1 for a in addrs if lo <= a <= hi) for lo, hi in top)
    return {"instructions": len(addrs), "loops": len(top), "loop_instructions": body}


def occupancy(regs: int, num_warps: int, shared: int, limits: dict = SM90) -> dict:
    """Resident blocks per SM and the fraction of the SM's warp slots they fill, from the
    registers per thread (allocated per warp in units of 256), the block's shared memory and the
    warp and block limits."""
    per_warp = math.ceil(regs * 32 / limits["reg_unit"]) * limits["reg_unit"]
    blocks = min(limits["blocks"], limits["warps"] // num_warps, limits["regs"] // (per_warp * num_warps))
    if shared:
        blocks = min(blocks, limits["smem"] // (shared + limits["smem_reserved"]))
    return {"blocks_per_sm": blocks, "occupancy": blocks * num_warps / limits["warps"]}


def tile_elements(v: AotVariant) -> int | None:
    """The elements one loop iteration (or the kernel's one tile) covers, from the kernel
    module's ``HOT_TILES``; None for a kernel that names none (its work is not per element)."""
    module = importlib.import_module(v.kernel.fn.__module__)
    names = getattr(module, "HOT_TILES", {}).get(v.kernel.fn.__name__)
    return None if names is None else math.prod(int(v.constexprs[n]) for n in names)


def analyse(v: AotVariant, arch: int = 90) -> dict:
    """One JSON-able record: registers, spills, shared memory, occupancy, SASS counts and, where
    the kernel names its tile, instructions per element."""
    compiled = compile_variant(v, arch)
    record = {"kernel": v.name, "arch": arch, "num_warps": v.num_warps, "shared": int(compiled.metadata.shared)}
    record.update(resource_usage(compiled.asm["ptx"], arch))
    record.update(occupancy(record["regs"], v.num_warps, record["shared"]))
    record.update(sass_stats(compiled.asm["cubin"]))
    tile = tile_elements(v)
    if tile:
        # a row in one tile has no loop over it, unless one program walks the row tiles (sp's in-kernel mean)
        looped = record["loops"] and (not v.constexprs.get("SINGLE_TILE", False) or v.constexprs.get("MEAN", False))
        hot = record["loop_instructions"] if looped else record["instructions"]
        record["instr_per_element"] = hot * 32 * v.num_warps / tile
    return record


def launch_variant(fn, args: tuple, kwargs: dict, name: str | None = None) -> AotVariant:
    """The variant a real launch ``fn[grid](*args, **kwargs)`` compiles: tensors become pointers
    of their dtype, floats ``fp32``, integers ``i32`` (``i64`` past 2^31, and 1 a constant, as the
    runtime specialises them), a tuple of floats a tuple of ``fp32``, and ``num_warps`` comes from
    the launch."""
    values = dict(zip(fn.arg_names, args))
    values.update({k: v for k, v in kwargs.items() if k in fn.arg_names})
    sig, constexprs, ints = {}, {}, {}
    for p in fn.params:
        val = values.get(p.name, p.default)
        if p.is_constexpr:
            constexprs[p.name] = val
            sig[p.name] = "constexpr"
        elif isinstance(val, torch.Tensor):
            sig[p.name] = "*" + _TORCH_TYPES[val.dtype]
        elif isinstance(val, bool):
            sig[p.name] = "i1"
        elif isinstance(val, int):
            if val == 1:
                constexprs[p.name] = 1
                sig[p.name] = "constexpr"
            else:
                sig[p.name] = "i64" if abs(val) >= 2**31 else "i32"
                ints[p.name] = val
        elif isinstance(val, float):
            sig[p.name] = "fp32"
        elif isinstance(val, tuple) and all(isinstance(x, float) for x in val):
            fp32 = ["fp32"] * len(val)
            sig[p.name] = type(val)(*fp32) if hasattr(val, "_fields") else tuple(fp32)  # a NamedTuple keeps its names
        elif val is None:
            constexprs[p.name] = None
            sig[p.name] = "constexpr"
        else:
            raise TypeError(f"launch_variant: argument {p.name!r} of {fn.fn.__name__} has type {type(val).__name__}")
    return AotVariant(name or fn.fn.__name__, fn, sig, constexprs, int(kwargs.get("num_warps", 4)), ints,
                      kwargs.get("num_stages"))
