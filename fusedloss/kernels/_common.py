"""Helpers shared by the kernel modules: NaN-propagating jit arithmetic, named constexpr slots,
input layout, launch serialization under the interpreter, autograd guards, AOT variants, and the
opt-in ``triton.autotune`` of a kernel's tiles (:class:`Tuned`)."""

from __future__ import annotations

import enum
import functools
import os
import threading
import time
import types
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from .._dispatch import interpreter_enabled

__all__ = ["constexpr_namespace", "AotVariant", "signature", "last_dim_contiguous", "as_loadable", "stored_grad_dtype",
           "no_double_backward", "double_backward_error", "fused_backward", "reject_grad_transforms", "launcher",
           "nanmax", "nanmin", "online_lse_update", "fast_exp", "fast_log", "cdiv", "next_power_of_2", "Tuned",
           "autotune_enabled", "AUTOTUNE_ENV"]

_INTERPRETER_LOCK = threading.RLock()
AUTOTUNE_ENV = "FUSEDLOSS_AUTOTUNE"


def autotune_enabled() -> bool:
    """``FUSEDLOSS_AUTOTUNE=1``: the kernels with a :class:`Tuned` space pick their tiles with
    ``triton.autotune``. Off by default: every launch then runs the launcher's one fixed config, on
    the GPU and under the interpreter, so results are bitwise repeatable from run to run (a tuned
    tile width can change the order of a row's sums) and no first call benchmarks."""
    return os.environ.get(AUTOTUNE_ENV, "0") == "1"


def _wall_clock_bench(kernel_call, quantiles=None):
    """The interpreter's stand-in for Triton's GPU benchmarker (CUDA events): one timed call. It
    lets the tests run the autotuned path on the CPU; the timings mean nothing there."""
    start = time.perf_counter()
    kernel_call()
    ms = (time.perf_counter() - start) * 1e3
    return [ms, ms, ms] if quantiles else ms


class Tuned:
    """A kernel and its ``triton.autotune`` space: ``configs`` over the constexprs a launch may
    tune (tile widths) and ``num_warps``/``num_stages``, keyed on ``key`` (argument names; Triton
    adds the tensors' dtypes), and ``prune(configs, named_args, **kwargs)`` to keep those that fit
    the shape, and ``restore_value``: the arguments the kernel writes over its own inputs (restored
    between the timed runs). Called as ``tuned(grid, *args, **kwargs)`` with the launcher's own config in
    ``kwargs`` (every constexpr and ``num_warps``): launched as it is unless :func:`autotune_enabled`,
    which drops the tuned names from it and lets the configs supply them. ``grid`` may be a function
    of the meta-parameters. Every config is compiled ahead of time by ``tests/compile_check.py`` (no
    spills) through the kernel module's ``compile_variants``."""

    def __init__(self, kernel, configs: list, key: list[str], prune=None, restore_value: list[str] = ()):
        self.kernel, self.configs, self.key, self.prune = kernel, list(configs), list(key), prune
        self.restore_value = list(restore_value)
        self.tuned_names = {"num_warps", "num_stages"}.union(*(c.kwargs for c in self.configs))
        self._tuner = None

    def tuner(self):
        if self._tuner is None:
            extra = {"do_bench": _wall_clock_bench} if interpreter_enabled() else {}
            prune = {"early_config_prune": self.prune} if self.prune is not None else None
            self._tuner = triton.autotune(configs=self.configs, key=self.key, prune_configs_by=prune,
                                          restore_value=self.restore_value, **extra)(self.kernel)
        return self._tuner

    def __call__(self, grid, *args, **kwargs):
        if autotune_enabled():
            return self.tuner()[grid](*args, **{k: v for k, v in kwargs.items() if k not in self.tuned_names})
        return self.kernel[grid(kwargs) if callable(grid) else grid](*args, **kwargs)

    def variants(self, constexprs: dict, signature_of, name: str, ints: dict | None = None, configs=None):
        """An :class:`AotVariant` of every config (or of ``configs``, the ones the pruning keeps at
        a shape), the other constexprs from ``constexprs``: ``signature_of(constexprs)`` gives each
        one's signature."""
        for cfg in self.configs if configs is None else configs:
            c = {**constexprs, **cfg.kwargs}
            tile = " ".join(f"{k}={v}" for k, v in cfg.kwargs.items())
            yield AotVariant(f"{name} [{tile} warps={cfg.num_warps} stages={cfg.num_stages}]", self.kernel,
                             signature_of(c), c, cfg.num_warps, ints or {}, cfg.num_stages)


def tiles_narrower_than(length: str, width: str):
    """Autotune pruning for a row longer than one tile: tiles (``width``) narrower than the row
    (``length``); the launcher's ``max_block`` can force the loop on a short row in the tests,
    which then takes the first config."""
    def prune(configs, named_args, **kwargs):
        return [c for c in configs if c.kwargs[width] < named_args[length]] or configs[:1]

    return prune


# The launchers' grid and tile arithmetic on host ints. triton.cdiv and triton.next_power_of_2 are
# constexpr functions since Triton 3.5, and their wrapper costs about 1 µs a call on the host.
def cdiv(a: int, b: int) -> int:
    """``ceil(a / b)`` of non-negative ints, as ``triton.cdiv``."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The smallest power of two ``>= n`` (``n >= 1``), as ``triton.next_power_of_2``."""
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


@triton.jit
def nanmax(a, b):
    """max that returns NaN when either side is NaN (GPU max skips NaN by default; the
    interpreter's numpy does not, so without this the two would differ)."""
    return tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def nanmin(a, b):
    """min that returns NaN when either side is NaN."""
    return tl.minimum(a, b, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def fast_exp(x):
    """``e^x`` as ``exp2(x·log2 e)``: one multiply and one MUFU.EX2 on sm_90. ``tl.exp`` lowers to
    the same approximation without flushing denormals, which adds a range test, two multiplies and
    a select per element; here a result below ``2^-126`` (``x < -87.3``) is 0, as in any softmax
    that flushes, and infinities and NaN are as ``tl.exp``'s."""
    return tl.exp2(x * 1.4426950408889634)


@triton.jit
def fast_log(x):
    """``log x`` as ``log2(x)·ln 2``, for ``x`` that is 0, normal or larger (a denormal ``x`` counts
    as 0: ``-inf``). ``tl.log2`` lowers to an accurate polynomial on sm_90 (about 18 instructions:
    exponent split, a 10-term FFMA chain, range fix-ups), not to the approximate MUFU.LG2, so a log
    per element costs far more than an exp; the row statistics' logs are per row."""
    return tl.log2(x) * 0.6931471805599453


@triton.jit
def online_lse_update(m, s, x, scale, INF_GIVES_INF: tl.constexpr):
    """Fold a tile ``x`` ([ROWS, BLOCK], -inf where masked) into the running max ``m`` of ``x`` and
    the sum ``s`` of ``exp((x - m)·scale)``. Differences are scaled, never ``x`` itself, so a
    temperature below 1 cannot overflow ``finfo.min`` values to -inf. The max starts at -inf; while
    nothing finite has been seen, 0 stands in for it in the exponents. A +inf entry follows the
    caller's reference: ``INF_GIVES_INF`` as ``torch.logsumexp`` (the sum becomes +inf), otherwise
    as ``log_softmax`` (exp(inf - inf): NaN)."""
    m_new = tl.maximum(m, tl.max(x, axis=1))
    infinite = m_new == float("-inf")
    if INF_GIVES_INF:
        infinite = infinite | (m_new == float("inf"))
    m_safe = tl.where(infinite, 0.0, m_new)
    scale2 = scale * 1.4426950408889634  # log2(e) folded into the one scalar: exp(d·scale) = exp2(d·scale2)
    s = s * tl.exp2((m - m_safe) * scale2) + tl.sum(tl.exp2((x - m_safe[:, None]) * scale2), axis=1)
    return m_new, s


def launcher(fn):
    """Mark a launcher. Under ``TRITON_INTERPRET=1`` its launches are serialized: the interpreter
    patches ``triton.language`` while a kernel runs, so two threads interpreting at once would
    break each other. On the GPU it adds nothing."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if not interpreter_enabled():
            return fn(*args, **kwargs)
        with _INTERPRETER_LOCK:
            return fn(*args, **kwargs)

    return wrapper


def constexpr_namespace(table: type[enum.IntEnum]) -> types.ModuleType:
    """The members of ``table`` as ``tl.constexpr`` attributes of a module object.

    A ``@triton.jit`` function may read attributes of a module but no other non-constexpr global,
    so ``_M = constexpr_namespace(DqnMetric)`` lets a kernel write ``metrics_ptr + _M.LOSS`` while
    the host and the tests index the same buffer with ``DqnMetric.LOSS``.
    """
    ns = types.ModuleType(table.__name__, f"constexpr mirror of {table.__qualname__}")
    for member in table:
        setattr(ns, member.name, tl.constexpr(int(member)))
    return ns


def double_backward_error(family: str) -> RuntimeError:
    return RuntimeError(f"double backward through the fused {family} kernel is not supported; use "
                        "backend='torch' for higher-order gradients.")


def no_double_backward(op, family: str) -> None:
    """Give the backward custom op ``op`` an autograd formula that raises a clear error: the fused
    backward is not itself differentiable (double backward needs the reference)."""

    def backward(ctx, *grads):
        raise double_backward_error(family)

    op.register_autograd(backward)


class _NoDoubleBackward(torch.autograd.Function):
    """A fused backward run under ``create_graph=True``: its result joins the graph through an
    empty anchor that requires a gradient, and a second backward through it raises the clear error."""

    @staticmethod
    def forward(ctx, family, fn, anchor, *args):
        ctx.family = family
        return fn(*args)

    @staticmethod
    def backward(ctx, grad):
        raise double_backward_error(ctx.family)


def fused_backward(family: str, fn, *args):
    """``fn(*args)``, the eager backward of a fused loss; under ``create_graph=True`` (grad mode on
    inside a backward) through :class:`_NoDoubleBackward`, so that a double backward raises
    :func:`double_backward_error` instead of silently returning nothing."""
    if not torch.is_grad_enabled():
        return fn(*args)
    device = next(a.device for a in args if isinstance(a, torch.Tensor))
    return _NoDoubleBackward.apply(family, fn, torch.empty(0, device=device, requires_grad=True), *args)


def reject_grad_transforms(family: str, *tensors: torch.Tensor) -> None:
    """Raise a clear error under ``torch.func.grad`` / ``vjp`` / ``jacrev`` (and friends), which
    the fused kernels do not support; ``vmap`` alone works. Skipped while ``torch.compile``
    traces (Dynamo cannot trace the functorch query; a compiled graph sees plain tensors)."""
    if torch.compiler.is_compiling():
        return
    if any(isinstance(t, torch.Tensor) and torch._C._functorch.is_gradtrackingtensor(t) for t in tensors):
        raise RuntimeError(f"torch.func gradient transforms (grad, vjp, jacrev, ...) are not supported by the fused "
                           f"{family} kernel; use backend='torch' inside them.")


def stored_grad_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of a gradient a forward stores for its backward to scale: the input's, except
    fp16, whose range (65504) an unscaled gradient can overflow and whose subnormals a small one
    can lose; fp16 inputs store it in fp32, and backward casts once, after scaling."""
    return torch.float32 if dtype == torch.float16 else dtype


def last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself when its last dimension has stride 1 (kernels take the other strides), else a
    contiguous copy."""
    return t if t.stride(-1) == 1 else t.contiguous()


def as_loadable(t: torch.Tensor) -> torch.Tensor:
    """A small per-step tensor as a kernel loads it: contiguous, bool viewed as uint8."""
    if t.dtype == torch.bool:
        t = t.view(torch.uint8)
    return t if t.is_contiguous() else t.contiguous()


class AotVariant(NamedTuple):
    """One compile of a kernel for the ahead-of-time check: ``signature`` maps every argument of
    ``kernel`` to a Triton type or ``"constexpr"``; ``ints`` holds the integer arguments' values at
    the shape the variant stands for, so the check can specialise them as the runtime does (a
    multiple of 16 is marked divisible by 16)."""

    name: str
    kernel: object
    signature: dict
    constexprs: dict
    num_warps: int
    ints: dict = {}
    num_stages: int | None = None  # None: the compiler's default


def signature(kernel, types_: dict[str, str], constexprs: dict) -> dict:
    """The AOT signature of ``kernel``: ``constexpr`` for the constants, the type ``types_`` gives
    (pointers such as ``*bf16``, float scalars ``fp32``), and ``i32`` for the rest (sizes, strides)."""
    return {name: "constexpr" if name in constexprs else types_.get(name, "i32") for name in kernel.arg_names}
