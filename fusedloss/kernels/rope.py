"""Fused Triton kernel for ``rope_rotate``: every pair ``(x[2i], x[2i+1])`` of a row rotated by the
row's angle.

One program rotates ``BM`` rows in tiles of ``BH`` pairs, in fp32, and stores in ``x``'s dtype.
Backward is the same kernel with the angle negated (the transpose of a rotation is its inverse).

Byte model: read ``x`` and write the output once, ``2·M·D·b`` (plus ``4·M`` bytes of angles);
backward the same.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import AotVariant, Tuned, cdiv, launcher, next_power_of_2, reject_grad_transforms, signature

__all__ = ["rope_fwd", "rope_fused", "compile_variants"]


@triton.jit
def _rope_fwd_kernel(x_ptr, th_ptr, out_ptr, M, HALF, sign, BM: tl.constexpr, BH: tl.constexpr):
    rows = tl.program_id(0) * BM + tl.arange(0, BM)
    rm = rows < M
    rows64 = rows.to(tl.int64)
    theta = tl.load(th_ptr + rows64, mask=rm, other=0.0).to(tl.float32) * sign
    c = tl.cos(theta)[:, None]
    s = tl.sin(theta)[:, None]
    for j0 in range(0, HALF, BH):
        offs = j0 + tl.arange(0, BH)
        mask = rm[:, None] & (offs < HALF)[None, :]
        p = rows64[:, None] * (2 * HALF) + 2 * offs[None, :]
        x0 = tl.load(x_ptr + p, mask=mask, other=0.0).to(tl.float32)
        x1 = tl.load(x_ptr + p + 1, mask=mask, other=0.0).to(tl.float32)
        tl.store(out_ptr + p, (x0 * c - x1 * s).to(out_ptr.dtype.element_ty), mask=mask)
        tl.store(out_ptr + p + 1, (x0 * s + x1 * c).to(out_ptr.dtype.element_ty), mask=mask)


def _tiles(D: int):
    """(BM, BH): about 1K pairs per program."""
    bh = min(next_power_of_2(D // 2), 64)
    return max(1, min(64, 1024 // bh)), bh


# The autotune space (FUSEDLOSS_AUTOTUNE=1; fusedloss.kernels._common.Tuned), for rows of at least
# TUNED_FROM pairs, keyed on the pairs per row: rows per program, pairs per tile, warps. Narrower rows
# keep the launcher's tile (a tile of 16 pairs or more would idle most of its lanes).
TUNED_FROM = 16


def _pairs_that_fit(configs, named_args, **kwargs):
    """Tiles no wider than the row's pairs (rounded up to a power of two)."""
    return [c for c in configs if c.kwargs["BH"] <= next_power_of_2(named_args["HALF"])] or configs[:1]


_ROPE = Tuned(_rope_fwd_kernel, [triton.Config({"BM": bm, "BH": bh}, num_warps=w)
                                 for bm, bh in ((16, 16), (16, 64), (32, 32), (32, 64)) for w in (4, 8)],
              key=["HALF"], prune=_pairs_that_fit)


@launcher
def rope_fwd(x: torch.Tensor, theta: torch.Tensor, sign: float = 1.0) -> torch.Tensor:
    """``x`` ``[..., D]`` rotated by ``sign · theta``, ``theta`` fp32 of ``x.shape[:-1]``."""
    x = x.contiguous()
    D = x.shape[-1]
    M = x.numel() // D
    out = torch.empty_like(x)
    bm, bh = _tiles(D)
    args = (x, theta.contiguous(), out, M, D // 2, sign)
    if D // 2 >= TUNED_FROM:
        _ROPE(lambda m: (cdiv(M, m["BM"]),), *args, BM=bm, BH=bh, num_warps=4)
    else:
        _rope_fwd_kernel[(cdiv(M, bm),)](*args, BM=bm, BH=bh)
    return out


@torch.library.custom_op("fusedloss::rope_fwd", mutates_args=())
def _rope_fwd_op(x: torch.Tensor, theta: torch.Tensor, sign: float) -> torch.Tensor:
    return rope_fwd(x, theta, sign)


@_rope_fwd_op.register_fake
def _(x, theta, sign):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _setup(ctx, inputs, output):
    _, theta, sign = inputs
    ctx.sign = sign
    ctx.save_for_backward(theta)


def _backward(ctx, grad):
    (theta,) = ctx.saved_tensors
    return _rope_fwd_op(grad, theta, -ctx.sign), None, None


_rope_fwd_op.register_autograd(_backward, setup_context=_setup)


def rope_fused(x: torch.Tensor, theta) -> torch.Tensor:
    """Kernel ``rope_rotate``. ``x`` gets its gradient from the kernel; a ``theta`` that requires
    grad gets it from the reference formula ``d out / d theta = rot90(out)``."""
    reject_grad_transforms("rope", x, theta)
    th = torch.as_tensor(theta, dtype=torch.float32, device=x.device)
    out = _rope_fwd_op(x, th.detach().expand(x.shape[:-1]).contiguous(), 1.0)
    if isinstance(theta, torch.Tensor) and theta.requires_grad:
        o = out.detach()
        rot90 = torch.stack((-o[..., 1::2], o[..., 0::2]), dim=-1).flatten(-2)
        out = out + (theta - theta.detach()).unsqueeze(-1).to(out.dtype) * rot90  # value unchanged, adds d/dtheta
    return out


_TYPES = {"x_ptr": "*bf16", "th_ptr": "*fp32", "out_ptr": "*bf16", "sign": "fp32"}


def compile_variants():
    """The launcher's tiles at three row widths, and every autotune config at a wide row."""
    for D in (2, 16, 256):
        bm, bh = _tiles(D)
        c = {"BM": bm, "BH": bh}
        yield AotVariant(f"rope D={D}", _rope_fwd_kernel, signature(_rope_fwd_kernel, _TYPES, c), c, 4,
                         {"M": 8192, "HALF": D // 2})
    yield from _ROPE.variants({}, lambda c: signature(_rope_fwd_kernel, _TYPES, c), "rope D=256 tuned",
                              {"M": 8192, "HALF": 128})
