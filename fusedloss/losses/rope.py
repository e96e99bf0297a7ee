"""Rotary rotation of pairs: ``rope_rotate`` rotates each pair ``(x[2i], x[2i+1])`` of the last
dimension by an angle, its reference, and the family's declaration. Vector DQN's scores use the
rotation by ``π/2``; the fused kernel is :mod:`fusedloss.kernels.rope`."""

from __future__ import annotations

import torch

from .._dispatch import Backend, resolve_backend
from .._families import Family, VerifyCase
from ._common import compute_dtype, require_float, require_same_device

__all__ = ["rope_rotate", "rope_rotate_reference", "check_even_d"]


def check_even_d(x: torch.Tensor, name: str) -> None:
    if x.dim() < 1 or x.shape[-1] % 2 != 0 or x.shape[-1] == 0:
        raise ValueError(
            f"{name} must have an even, non-zero last dimension D (pairs (x[2i], x[2i+1]) are "
            f"rotated), got shape {tuple(x.shape)}."
        )


def rope_rotate_reference(x: torch.Tensor, theta: torch.Tensor | float) -> torch.Tensor:
    """Rotate every pair ``(x[..., 2i], x[..., 2i+1])`` by the one angle ``theta[...]``."""
    cd = compute_dtype(x)
    xp = x.to(cd).unflatten(-1, (-1, 2))
    theta = torch.as_tensor(theta, dtype=cd, device=x.device)
    c = torch.cos(theta).unsqueeze(-1)
    s = torch.sin(theta).unsqueeze(-1)
    x0, x1 = xp[..., 0], xp[..., 1]
    return torch.stack((x0 * c - x1 * s, x0 * s + x1 * c), dim=-1).flatten(-2).to(x.dtype)


def rope_rotate(x: torch.Tensor, theta: torch.Tensor | float, *, backend: str = "auto") -> torch.Tensor:
    """Rotate each consecutive pair ``(x[2i], x[2i+1])`` of the last dimension by ``theta``.

    ``x``: ``[..., D]`` with ``D`` even; ``theta``: a float or a tensor broadcastable to
    ``x.shape[:-1]``. Returns a tensor of ``x``'s shape and dtype.
    """
    require_float(x, "x")
    check_even_d(x, "x")
    if isinstance(theta, torch.Tensor):
        require_float(theta, "theta")
        require_same_device({"x": x, "theta": theta})
        try:
            fits = torch.broadcast_shapes(theta.shape, x.shape[:-1]) == x.shape[:-1]
        except RuntimeError:
            fits = False
        if not fits:
            raise ValueError(
                f"theta must broadcast to x.shape[:-1] = {tuple(x.shape[:-1])}, got {tuple(theta.shape)}."
            )
    if resolve_backend(backend, "rope", x) is Backend.TRITON:
        from ..kernels import rope as kernels

        return kernels.rope_fused(x, theta)
    return rope_rotate_reference(x, theta)


def _verify_cases(small: bool) -> list[VerifyCase]:
    shape = (6, 5, 14) if small else (64, 128, 128)

    def make(dtype, device):
        g = torch.Generator(device=device).manual_seed(8)
        x = torch.randn(shape, generator=g, device=device).to(dtype).requires_grad_(True)
        theta = torch.randn(shape[:-1], generator=g, device=device).to(dtype)
        return x, theta

    def call(args, backend):
        return (rope_rotate(args[0], args[1], backend=backend) * torch.linspace(-1, 1, shape[-1], device=args[0].device)).sum()

    return [VerifyCase("theta per row", "x".join(map(str, shape)), make, call)]


FAMILY = Family(
    name="rope",
    section="Vector DQN",
    exports=("rope_rotate", "rope_rotate_reference"),
    kernel="rope",
    verify_cases=_verify_cases,
)
