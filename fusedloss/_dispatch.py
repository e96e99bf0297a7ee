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
import importlib.util
import logging
import os

import torch

__all__ = ["Backend", "resolve_backend", "triton_available", "use_interpreter_without_cuda", "kernel_families",
           "explain_backend"]

ENV_VAR = "FUSEDLOSS_BACKEND"
_LOG = logging.getLogger("fusedloss")


def kernel_families() -> frozenset[str]:
    """The dispatch families with a fused kernel (``fusedloss/kernels/<family>.py``), from the family
    table (``fusedloss.losses.FAMILIES``). A family absent here has no kernel, and
    ``backend="triton"`` raises ``NotImplementedError`` for it."""
    global _KERNEL_FAMILIES
    if _KERNEL_FAMILIES is None:
        from .losses import FAMILIES

        _KERNEL_FAMILIES = frozenset(f.kernel for f in FAMILIES if f.kernel is not None)
    return _KERNEL_FAMILIES


_KERNEL_FAMILIES: frozenset[str] | None = None

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


_TRITON_AVAILABLE: bool | None = None


def triton_available() -> bool:
    """Whether Triton can be imported (looked up once; a plain module flag rather than an
    ``lru_cache``, which ``torch.compile`` would trace through with a warning)."""
    global _TRITON_AVAILABLE
    if _TRITON_AVAILABLE is None:
        try:
            found = importlib.util.find_spec("triton") is not None
        except (ImportError, ValueError):  # a blocked or broken install
            found = False
        if torch.compiler.is_compiling():
            return found
        _TRITON_AVAILABLE = found
    return _TRITON_AVAILABLE


def interpreter_enabled() -> bool:
    """Whether Triton's interpreter is on (``TRITON_INTERPRET=1``, the variable Triton's own
    ``triton.knobs.runtime.interpret`` reads): the one place the package asks."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _interpreter_too_late() -> bool:
    """True when triton.language was imported before TRITON_INTERPRET=1 was set: its own jit
    helpers (``tl.zeros``, ...) were then built as GPU ``triton.JITFunction`` s rather than
    interpreted functions, and no kernel can run interpreted."""
    import sys

    tl = sys.modules.get("triton.language")
    if tl is None:
        return False
    import triton

    return isinstance(getattr(tl, "zeros", None), triton.JITFunction)


def use_interpreter_without_cuda(device: "str | torch.device | None" = None) -> None:
    """Switch on the Triton interpreter (``TRITON_INTERPRET=1``, unless the environment already
    says otherwise) when kernels will get CPU tensors: ``device`` is the CPU, or is None and there
    is no CUDA. The one place the CLI and the tests decide this; it must run before anything
    imports ``triton.language`` (``import fusedloss`` does not)."""
    cpu = torch.device(device).type == "cpu" if device is not None else not torch.cuda.is_available()
    if cpu:
        os.environ.setdefault("TRITON_INTERPRET", "1")


def why_not_kernel(family: str, tensors) -> str | None:
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


def _choose(backend: "str | Backend", family: str, tensors):
    """``(path, error, case)``: the path the rule picks, the exception class to raise when
    ``backend="triton"`` cannot run (else None), and what :func:`_why` needs to say why. The rule
    runs on every loss call, so no message is formatted here."""
    choice = Backend.parse(backend)
    override = ""
    if choice is Backend.AUTO:
        override = os.environ.get(ENV_VAR, "").strip().lower()
        if override:
            choice = Backend.parse(override, argname=f"the environment variable {ENV_VAR}")
    if choice is Backend.TORCH:
        return Backend.TORCH, None, ("torch", choice, override, family, None)
    if family not in kernel_families():
        if choice is Backend.TRITON:
            return Backend.TORCH, NotImplementedError, ("no kernel, triton", choice, override, family, None)
        return Backend.TORCH, None, ("no kernel", choice, override, family, None)
    if choice is Backend.AUTO and not (tensors and all(t.device.type == "cuda" for t in tensors)):
        return Backend.TORCH, None, ("off cuda", choice, override, family, tensors)
    reason = why_not_kernel(family, tensors)
    if reason is None:
        return Backend.TRITON, None, ("kernel", choice, override, family, None)
    if choice is Backend.TRITON:  # never a silent fallback
        return Backend.TORCH, RuntimeError, ("cannot, triton", choice, override, family, reason)
    return Backend.TORCH, None, ("cannot", choice, override, family, reason)


def _why(case) -> str:
    """The reason in words of a :func:`_choose` decision."""
    kind, choice, override, family, detail = case
    source = f"{ENV_VAR}={override!r} (over backend='auto')" if override else f"backend={choice.value!r}"
    if kind == "torch":
        return f"{source}: the PyTorch reference"
    if kind == "no kernel, triton":
        return f"backend='triton': the {family!r} loss has no fused kernel yet; use backend='torch' or 'auto'."
    if kind == "no kernel":
        return f"{source}: the PyTorch reference (the {family!r} loss has no fused kernel)"
    if kind == "off cuda":
        where = ", ".join(sorted({str(t.device) for t in detail})) or "no tensors"
        return f"{source}: the PyTorch reference (the tensors are on {where}; auto runs the kernel on CUDA tensors only)"
    if kind == "kernel":
        return f"{source}: the fused {family!r} kernel"
    if kind == "cannot, triton":
        return f"backend='triton' cannot run the {family!r} kernel: {detail}."
    return f"{source}: the PyTorch reference ({detail})"


def resolve_backend(backend: "str | Backend", family: str, *tensors: torch.Tensor) -> Backend:
    """Pick ``Backend.TRITON`` or ``Backend.TORCH`` for ``family`` on ``tensors``.

    ``tensors`` are the floating-point inputs the kernel would read. The choice and its reason are
    logged at DEBUG level on the ``fusedloss`` logger (not while ``torch.compile`` traces), and
    :func:`fusedloss.explain_backend` returns them.
    """
    path, error, case = _choose(backend, family, tensors)
    if error is not None:
        raise error(_why(case))
    if not torch.compiler.is_compiling() and _LOG.isEnabledFor(logging.DEBUG):
        _LOG.debug("%s: %s", family, _why(case))
    return path


def explain_backend(loss: "str | object", *tensors: torch.Tensor, backend: "str | Backend" = "auto") -> str:
    """Which path a call of ``loss`` on ``tensors`` takes, and why, in one line: ``"triton: ..."`` or
    ``"torch: ..."``. No host sync; the same rule the call itself applies.

    ``loss`` is a public loss function, module or config class (``fl.sp_linear_loss``,
    ``fl.DqnLoss``) or a family name (``"dqn"``); ``tensors`` are the floating-point inputs the
    kernel would read (``q`` and ``q_target`` for DQN, the logits and teacher for distillation).
    ``backend`` is the call's (``FUSEDLOSS_BACKEND`` applies to ``"auto"``, as in the call). Raises
    the error the call would raise where ``backend="triton"`` cannot run.

    >>> import torch, fusedloss as fl
    >>> fl.explain_backend(fl.dqn_loss, torch.zeros(2, 3, 4))
    "torch: backend='auto': the PyTorch reference (the tensors are on cpu; auto runs the kernel on CUDA tensors only)"
    """
    from .losses import FAMILIES

    family = None
    if isinstance(loss, str):
        family = next((f for f in FAMILIES if f.name == loss), None)
    else:
        module = getattr(loss, "__module__", "")
        family = next((f for f in FAMILIES if module == f"fusedloss.losses.{f.name}"), None)
    if family is None:
        names = ", ".join(f.name for f in FAMILIES)
        raise ValueError(f"loss must be a fusedloss loss function, module or config, or a family name ({names}), "
                         f"got {loss!r}.")
    path, error, case = _choose(backend, family.kernel or family.name, tensors)
    if error is not None:
        raise error(_why(case))
    return f"{path.value}: {_why(case)}"
