"""Fused Triton kernels for the LM-head losses (:func:`fusedloss.linear_logprob`,
:func:`fusedloss.linear_cross_entropy`): the per-row statistics of a chunk of fp32 logits, and
their gradient. The loss computes each chunk's logits by a matmul, runs these two kernels on them,
and turns the gradient into the gradients of ``hidden``, ``weight`` and ``bias`` by matmuls.

With ``u = softcap(z) / T`` (``softcap(z) = c·tanh(z/c)``, or ``z`` without a cap), ``s =
softmax(u)`` and ``y`` the row's label:

- :func:`_lm_head_stats_kernel`, one online pass over each row: ``lse = logsumexp(u)``, the
  entropy ``H = -Σ s log s = lse - Σ s·u`` (a running max ``m``, ``Σ e^(u-m)`` and ``Σ e^(u-m)(u-m)``,
  both rescaled when ``m`` grows), ``Σ u`` (label smoothing) and ``u[y]`` (NaN for a label outside
  ``[0, V)``, the ignored one included: the loss masks those rows).
- :func:`_lm_head_grad_kernel`, on a 2-D grid (rows × column blocks): the gradient of any
  per-row combination of log-prob, entropy, cross-entropy, smoothing and z-loss, written as four
  per-row coefficients ``(α, β, γ, δ)`` of ``dL/du_j = α·s_j + β·[j = y] + γ·s_j·(log s_j + H) + δ``,
  times ``du/dz = (1 - tanh²(z/c)) / T``. ``log p(y) = u_y - lse`` has ``α = -g, β = g``; the
  entropy ``γ = -g``; cross-entropy with smoothing ``ε`` and z-loss ``ζ``: ``α = g(1 + 2ζ·lse),
  β = -g(1 - ε), δ = -g·ε/V``.

Byte model, per chunk of ``n`` rows of ``V`` fp32 logits: statistics read them once (``4·n·V``);
the gradient reads them and writes the gradient (``8·n·V``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import (AotVariant, Tuned, cdiv, fast_exp, fast_log, launcher, next_power_of_2, signature,
                      tiles_narrower_than)

__all__ = ["lm_head_stats", "lm_head_grad", "stats_op", "grad_op", "compile_variants", "HOT_TILES"]

MAX_BLOCK = 4096
HOT_TILES = {"_lm_head_stats_kernel": ("BLOCK_V",), "_lm_head_grad_kernel": ("BLOCK_V",)}


@triton.jit
def _transform(z, inv_t, cap, HAS_SOFTCAP: tl.constexpr):
    """``u = softcap(z)/T`` and ``du/dz``; tanh as ``1 - 2/(e^(2x) + 1)``, exact at ±inf."""
    if HAS_SOFTCAP:
        t = 1.0 - 2.0 / (fast_exp(2.0 * z / cap) + 1.0)
        u = cap * t * inv_t
        du = (1.0 - t * t) * inv_t
    else:
        u = z * inv_t
        du = tl.zeros_like(z) + inv_t
    return u, du


@triton.jit
def _lm_head_stats_kernel(z_ptr, labels_ptr, out_ptr, V, stride_z, inv_t, cap,
                          HAS_SOFTCAP: tl.constexpr, BLOCK_V: tl.constexpr):
    """One row per program; writes ``(lse, H, Σu, u[y])`` to ``out[row, 0:4]``."""
    row = tl.program_id(0).to(tl.int64)
    z_row = z_ptr + row * stride_z
    cols0 = tl.arange(0, BLOCK_V)
    m = tl.full([BLOCK_V], float("-inf"), tl.float32)  # per-lane running statistics, folded at the end
    s = tl.zeros([BLOCK_V], tl.float32)
    e = tl.zeros([BLOCK_V], tl.float32)
    su = tl.zeros([BLOCK_V], tl.float32)
    for start in tl.range(0, V, BLOCK_V):
        cols = start + cols0
        inside = cols < V
        z = tl.load(z_row + cols, mask=inside, other=0.0).to(tl.float32)
        u, _ = _transform(z, inv_t, cap, HAS_SOFTCAP)
        su += tl.where(inside, u, 0.0)
        u = tl.where(inside, u, float("-inf"))  # padded columns never enter the lse
        m_new = tl.maximum(m, u)
        # 0 stands in for an infinite max: nothing finite seen yet, or a +inf logit, whose lse is
        # then +inf (as torch.logsumexp), not NaN from inf - inf
        m_safe = tl.where(tl.abs(m_new) == float("inf"), 0.0, m_new)
        alpha = tl.where(m == float("-inf"), 0.0, fast_exp(m - m_safe))
        shift = tl.where(m == float("-inf"), 0.0, m - m_safe)
        w = tl.where(inside, fast_exp(u - m_safe), 0.0)
        e = alpha * (e + shift * s) + w * tl.where(w > 0.0, u - m_safe, 0.0)
        s = alpha * s + w
        m = m_new
    # fold the lanes: the same rescaling, once, against the row max
    nan_probe = tl.sum(tl.where(s != s, s, 0.0), axis=0)  # tl.max skips NaN on the GPU
    mx = tl.max(m, axis=0)
    mx_safe = tl.where(tl.abs(mx) == float("inf"), 0.0, mx)
    alpha = tl.where(m == float("-inf"), 0.0, fast_exp(m - mx_safe))
    shift = tl.where(m == float("-inf"), 0.0, m - mx_safe)
    total = tl.sum(alpha * s, axis=0) + nan_probe
    ent_sum = tl.sum(alpha * (e + shift * s), axis=0)
    lse = mx_safe + fast_log(total)
    entropy = -ent_sum / total + fast_log(total)  # H = lse - Σ s u = log S - E/S in units of the max
    label = tl.load(labels_ptr + row).to(tl.int64)
    ok = (label >= 0) & (label < V)
    z_y = tl.load(z_row + tl.where(ok, label, 0)).to(tl.float32)
    u_y, _ = _transform(z_y, inv_t, cap, HAS_SOFTCAP)
    out = out_ptr + row * 4
    tl.store(out, lse)
    tl.store(out + 1, entropy)
    tl.store(out + 2, tl.sum(su, axis=0))
    tl.store(out + 3, tl.where(ok, u_y, float("nan")))


@triton.jit
def _lm_head_grad_kernel(z_ptr, labels_ptr, stats_ptr, coef_ptr, dz_ptr, V, stride_z, stride_dz, inv_t, cap,
                         HAS_SOFTCAP: tl.constexpr, BLOCK_V: tl.constexpr):
    """``dz[row, cols] = (α s + β [j = y] + γ s (log s + H) + δ)·du/dz`` for one row and one block of
    columns per program."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    inside = cols < V
    z = tl.load(z_ptr + row * stride_z + cols, mask=inside, other=0.0).to(tl.float32)
    u, du = _transform(z, inv_t, cap, HAS_SOFTCAP)
    lse = tl.load(stats_ptr + row * 4)
    entropy = tl.load(stats_ptr + row * 4 + 1)
    c = coef_ptr + row * 4
    a, b, g, d = tl.load(c), tl.load(c + 1), tl.load(c + 2), tl.load(c + 3)
    label = tl.load(labels_ptr + row).to(tl.int64)
    log_s = u - lse
    p = fast_exp(log_s)
    # γ = 0 (cross-entropy) skips the entropy term, so that 0·(log s + H) never meets an inf
    ent = tl.where(g == 0.0, 0.0, g * tl.where(p == 0.0, 0.0, p * (log_s + entropy)))  # NaN stays NaN
    grad = a * p + tl.where(cols == label, b, 0.0) + ent + d
    tl.store(dz_ptr + row * stride_dz + cols, grad * du, mask=inside)


def _tiles(V: int):
    block = min(next_power_of_2(V), MAX_BLOCK)
    return block, 4 if block <= 1024 else 8


# The autotune spaces (FUSEDLOSS_AUTOTUNE=1; fusedloss.kernels._common.Tuned), for rows longer than
# one tile (TUNED_FROM; a shorter row is one tile of its own width), keyed on the vocabulary and the
# softcap: the stats' tile over the row and its warps; the gradient's column block and warps. The
# gradient usually overwrites the logits it reads (grad_op), so its timed runs restore them.
TUNED_FROM = MAX_BLOCK + 1
_STATS_LONG = Tuned(_lm_head_stats_kernel, [triton.Config({"BLOCK_V": b}, num_warps=w)
                                            for b, w in ((1024, 4), (2048, 4), (2048, 8), (4096, 8))],
                    key=["V", "HAS_SOFTCAP"], prune=tiles_narrower_than("V", "BLOCK_V"))
_GRAD_LONG = Tuned(_lm_head_grad_kernel, [triton.Config({"BLOCK_V": b}, num_warps=w)
                                          for b, w in ((1024, 4), (2048, 4), (4096, 4), (4096, 8))],
                   key=["V", "HAS_SOFTCAP"], restore_value=["dz_ptr"])


@launcher
def lm_head_stats(z: torch.Tensor, labels: torch.Tensor, inv_t: float, softcap: float | None,
                  out: torch.Tensor | None = None) -> torch.Tensor:
    """``[n, 4]`` fp32 ``(lse, entropy, Σu, u[label])`` of fp32 logits ``z`` ``[n, V]`` (last dim
    contiguous) and int labels ``[n]``."""
    n, V = z.shape
    labels = labels.contiguous()  # read at labels_ptr + row
    if out is None:
        out = torch.empty(n, 4, dtype=torch.float32, device=z.device)
    block, warps = _tiles(V)
    args = (z, labels, out, V, z.stride(0), float(inv_t), float(softcap or 1.0))
    meta = {"HAS_SOFTCAP": softcap is not None, "BLOCK_V": block, "num_warps": warps}
    if V >= TUNED_FROM:
        _STATS_LONG((n,), *args, **meta)
    else:
        _lm_head_stats_kernel[(n,)](*args, **meta)
    return out


@launcher
def lm_head_grad(z: torch.Tensor, labels: torch.Tensor, stats: torch.Tensor, coef: torch.Tensor, inv_t: float,
                 softcap: float | None, out: torch.Tensor | None = None) -> torch.Tensor:
    """The fp32 gradient ``[n, V]`` with respect to ``z`` for per-row coefficients ``coef``
    ``[n, 4]`` (α, β, γ, δ) and the ``stats`` of :func:`lm_head_stats`. ``out`` may be ``z``
    itself: each element is read before it is written, by the same program."""
    n, V = z.shape
    labels = labels.contiguous()
    if out is None:
        out = torch.empty_like(z)
    block, warps = _tiles(V)
    args = (z, labels, stats, coef.contiguous(), out, V, z.stride(0), out.stride(0), float(inv_t),
            float(softcap or 1.0))
    meta = {"HAS_SOFTCAP": softcap is not None, "BLOCK_V": block, "num_warps": warps}
    if V >= TUNED_FROM:
        _GRAD_LONG(lambda m: (n, cdiv(V, m["BLOCK_V"])), *args, **meta)
    else:
        _lm_head_grad_kernel[(n, cdiv(V, block))](*args, **meta)
    return out


# torch.library custom ops, so that torch.compile(fullgraph=True) traces the chunk loop without graph
# breaks. The loss calls them only while compiling: eagerly it calls the launchers above, which skip
# the custom-op dispatch (tens of µs a call) and may write the gradient over the logits.
@torch.library.custom_op("fusedloss::lm_head_stats", mutates_args=())
def _lm_head_stats_op(z: torch.Tensor, labels: torch.Tensor, inv_t: float, softcap: float | None) -> torch.Tensor:
    return lm_head_stats(z, labels, inv_t, softcap)


@_lm_head_stats_op.register_fake
def _(z, labels, inv_t, softcap):
    return torch.empty(z.shape[0], 4, dtype=torch.float32, device=z.device)


@torch.library.custom_op("fusedloss::lm_head_grad", mutates_args=())
def _lm_head_grad_op(z: torch.Tensor, labels: torch.Tensor, stats: torch.Tensor, coef: torch.Tensor, inv_t: float,
                     softcap: float | None) -> torch.Tensor:
    return lm_head_grad(z, labels, stats, coef, inv_t, softcap)


@_lm_head_grad_op.register_fake
def _(z, labels, stats, coef, inv_t, softcap):
    return torch.empty_like(z)


def stats_op(z, labels, inv_t: float, softcap: float | None) -> torch.Tensor:
    """:func:`lm_head_stats`, through its custom op while ``torch.compile`` traces."""
    if torch.compiler.is_compiling():
        return _lm_head_stats_op(z, labels, inv_t, softcap)
    return lm_head_stats(z, labels, inv_t, softcap)


def grad_op(z, labels, stats, coef, inv_t: float, softcap: float | None) -> torch.Tensor:
    """:func:`lm_head_grad`, through its custom op while ``torch.compile`` traces; eagerly the
    gradient overwrites ``z`` (which the caller no longer needs)."""
    if torch.compiler.is_compiling():
        return _lm_head_grad_op(z, labels, stats, coef, inv_t, softcap)
    return lm_head_grad(z, labels, stats, coef, inv_t, softcap, out=z)


def compile_variants():
    """Both kernels at the bench vocabularies, with and without a softcap."""
    for V in (1000, 32000, 128256):
        block, warps = _tiles(V)
        for cap in (False, True):
            c = {"HAS_SOFTCAP": cap, "BLOCK_V": block}
            yield AotVariant(f"lm_head stats V={V} softcap={cap}", _lm_head_stats_kernel,
                             signature(_lm_head_stats_kernel, _STATS_TYPES, c), c, warps, {"V": V, "stride_z": V})
            yield AotVariant(f"lm_head grad V={V} softcap={cap}", _lm_head_grad_kernel,
                             signature(_lm_head_grad_kernel, _GRAD_TYPES, c), c, warps,
                             {"V": V, "stride_z": V, "stride_dz": V})
    yield from tuned_variants()


_STATS_TYPES = {"z_ptr": "*fp32", "labels_ptr": "*i64", "out_ptr": "*fp32", "inv_t": "fp32", "cap": "fp32"}
_GRAD_TYPES = {"z_ptr": "*fp32", "labels_ptr": "*i64", "stats_ptr": "*fp32", "coef_ptr": "*fp32", "dz_ptr": "*fp32",
               "inv_t": "fp32", "cap": "fp32"}


def tuned_variants():
    """Every autotune config, with the softcap (the more live values), at a long vocabulary."""
    V = 128256
    c = {"HAS_SOFTCAP": True}
    yield from _STATS_LONG.variants(c, lambda k: signature(_lm_head_stats_kernel, _STATS_TYPES, k),
                                    f"lm_head stats V={V} softcap tuned", {"V": V, "stride_z": V})
    yield from _GRAD_LONG.variants(c, lambda k: signature(_lm_head_grad_kernel, _GRAD_TYPES, k),
                                   f"lm_head grad V={V} softcap tuned", {"V": V, "stride_z": V, "stride_dz": V})
