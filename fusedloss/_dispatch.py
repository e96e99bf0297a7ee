"""The one dispatch rule shared by every loss family.

``backend="torch"`` always runs the PyTorch reference. ``backend="triton"`` runs the fused kernel
or raises with the reason it cannot (never a silent fallback). ``backend="auto"`` runs the kernel
where it applies (CUDA tensors, Triton importable, a supported dtype) and the reference otherwise.
The environment variable ``FUSEDLOSS_BACKEND`` overrides ``"auto"`` globally.

A loss imports its family's kernel module (``fusedloss.kernels.<family>``) inside the branch that
runs it, so ``import fusedloss`` never imports Triton.
"""

from __future__ import annotations

import enum
import functools
import importlib.util
import os

import torch

__all__ = ["Backend", "resolve_backend", "triton_available", "use_interpreter_without_cuda", "KERNEL_FAMILIES"]

ENV_VAR = "FUSEDLOSS_BACKEND"

# Families with a fused kernel, each in fusedloss/kernels/<family>.py. A family absent here has no
# kernel yet, and ``backend="triton"`` raises NotImplementedError for it.
KERNEL_FAMILIES = frozenset({"sp", "dqn", "vec_dqn", "rope"})

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


class Backend(str, enum.Enum):
    """The ``backend`` of every loss: ``"auto"`` runs the fused kernel on CUDA tensors where the
    family has one (and the reference otherwise), ``"triton"`` runs the kernel or raises with the
    reason it cannot, ``"torch"`` always runs the PyTorch reference."""

    AUTO = "auto"
    TRITON = "triton"
    TORCH = "torch"

    @classmethod
    def parse(cls, value: "str | Backend", argname: str = "backend") -> "Backend":
        try:
            return cls(value)
        except ValueError:
            valid = ", ".join(repr(b.value) for b in cls)
            raise ValueError(f"{argname} must be one of {valid}, got {value!r}.") from None


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    try:
        return importlib.util.find_spec("triton") is not None
    except (ImportError, ValueError):  # a blocked or broken install
        return False


def interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _interpreter_too_late() -> bool:
    """True when triton.language was imported before TRITON_INTERPRET=1 was set: its own jit
    helpers (tl.zeros, ...) were then compiled for the GPU, and no kernel can run interpreted."""
    import sys

    tl = sys.modules.get("triton.language")
    return tl is not None and type(getattr(tl, "zeros", None)).__name__ == "JITFunction"


def use_interpreter_without_cuda(device: "str | torch.device | None" = None) -> None:
    """Switch on the Triton interpreter (``TRITON_INTERPRET=1``, unless the environment already
    says otherwise) when kernels will get CPU tensors: ``device`` is the CPU, or is None and there
    is no CUDA. The one place the CLI and the tests decide this; it must run before anything
    imports ``triton.language`` (``import fusedloss`` does not)."""
    cpu = torch.device(device).type == "cpu" if device is not None else not torch.cuda.is_available()
    if cpu:
        os.environ.setdefault("TRITON_INTERPRET", "1")


def _why_not_kernel(family: str, tensors) -> str | None:
    """The reason the kernel cannot run on these tensors, or None when it can."""
    if not triton_available():
        return "Triton is not installed (pip install triton)"
    for t in tensors:
        if t.dtype not in SUPPORTED_DTYPES:
            return f"the {family} kernel supports float32, bfloat16 and float16, got {t.dtype}"
        if t.device.type == "cuda":
            continue
        if t.device.type == "cpu":
            if not interpreter_enabled():
                return (
                    "the tensors are on the CPU and Triton runs CPU tensors only under its "
                    "interpreter; set TRITON_INTERPRET=1 before importing fusedloss, move the "
                    "tensors to CUDA, or use backend='torch'"
                )
            if _interpreter_too_late():
                return (
                    "TRITON_INTERPRET=1 was set after triton.language had been imported (importing "
                    "torch._dynamo does that); set it in the environment before starting Python"
                )
            continue
        return f"the {family} kernel runs on CUDA (or CPU under TRITON_INTERPRET=1), got {t.device}"
    return None


def resolve_backend(backend: "str | Backend", family: str, *tensors: torch.Tensor) -> Backend:
    """Pick ``Backend.TRITON`` or ``Backend.TORCH`` for ``family`` on ``tensors``.

    ``tensors`` are the floating-point inputs the kernel would read.
    """
    choice = Backend.parse(backend)
    if choice is Backend.AUTO:
        override = os.environ.get(ENV_VAR, "").strip().lower()
        if override:
            choice = Backend.parse(override, argname=f"the environment variable {ENV_VAR}")
    if choice is Backend.TORCH:
        return Backend.TORCH
    if choice is Backend.TRITON:
        if family not in KERNEL_FAMILIES:
            raise NotImplementedError(
                f"backend='triton': the {family!r} loss has no fused kernel yet; "
                "use backend='torch' or 'auto'."
            )
        reason = _why_not_kernel(family, tensors)
        if reason is not None:
            raise RuntimeError(f"backend='triton' cannot run the {family!r} kernel: {reason}.")
        return Backend.TRITON
    # auto: the kernel on CUDA only; CPU tensors always take the reference.
    if (
        family in KERNEL_FAMILIES
        and tensors
        and all(t.device.type == "cuda" for t in tensors)
        and _why_not_kernel(family, tensors) is None
    ):
        return Backend.TRITON
    return Backend.TORCH
