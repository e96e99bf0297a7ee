"""Fused Triton kernels for vector DQN: pairwise-angle scores, the greedy target, RoPE rotation and
the cosine loss. (``rope_rotate`` alone is :mod:`fusedloss.kernels.rope`.)

Scores. ``score[a] = Σ_i atan2(<rot90(v_i), v_a>, <v_i, v_a>)``. With even/odd halves ``e, o`` of
each vector, ``<v_i, v_a> = Σ e_i e_a + o_i o_a`` and ``<rot90(v_i), v_a> = Σ e_i o_a − o_i e_a``.
atan2 is invariant to scaling both arguments by a positive factor, so the vectors need no
normalisation. Programs tile the actions (``BA``), the other actions (``BI``) and the pairs (``BD``);
the ``A×A`` angle matrix lives only in registers, one ``BI×BA`` tile at a time. atan2 is built from
``tl`` primitives (octant reduction, then an odd series on ``|t| ≤ tan(π/8)``, truncation error
below 2e-8), so the same code runs under the interpreter and on the GPU.

Loss. One program per transition ``(b, t < S-1)``: scores of ``target[b, t+1]``, the argmax (ties
to the lowest index), the greedy vector rotated by ``theta``, and ``1 − cos`` against
``online[b, t, a]``. The gradient ``−(ŵ − cos·û)/|u|`` (PyTorch's ``cosine_similarity`` with its
``eps`` clamp) is stored compactly, ``[N, D]`` fp32; backward expands it into the dense
``[B, S, A, D]`` gradient, each row scaled by its upstream gradient, in one launch. The loss
returns per-transition values; the mean is the caller's.

Byte model (loss, forward + backward): read the target vectors at ``t+1`` once per action tile
(``B·S·A·D·b`` when ``A <= BA``), the taken online vector, write ``[N, D]`` fp32, then backward writes
the dense gradient: about ``2·B·S·A·D·b``. Arithmetic is ``O(A²·D)`` per transition.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ._common import (AotVariant, Tuned, cdiv, fused_backward, last_dim_contiguous, launcher, nanmax, next_power_of_2,
                      no_double_backward, reject_grad_transforms, signature)

__all__ = ["vec_dqn_scores_fwd", "vec_dqn_scores_fused", "vec_dqn_fwd", "vec_dqn_bwd", "vec_dqn_fused",
           "compile_variants"]

COS_EPS = 1e-8  # F.cosine_similarity's default eps


@triton.jit
def _atan2(y, x):
    ax = tl.abs(x)
    ay = tl.abs(y)
    mx = tl.maximum(ax, ay)
    mn = tl.minimum(ax, ay)
    a = tl.where(mx > 0.0, mn / tl.where(mx > 0.0, mx, 1.0), 0.0)
    big = a > 0.41421356237309503  # tan(pi/8): reduce with atan(a) = pi/4 + atan((a-1)/(a+1))
    t = tl.where(big, (a - 1.0) / (a + 1.0), a)
    t2 = t * t
    p = -1.0 / 15.0
    p = p * t2 + 1.0 / 13.0
    p = p * t2 - 1.0 / 11.0
    p = p * t2 + 1.0 / 9.0
    p = p * t2 - 1.0 / 7.0
    p = p * t2 + 1.0 / 5.0
    p = p * t2 - 1.0 / 3.0
    p = (p * t2 + 1.0) * t
    r = tl.where(big, 0.7853981633974483 + p, p)
    r = tl.where(ay > ax, 1.5707963267948966 - r, r)
    r = tl.where(x < 0.0, 3.141592653589793 - r, r)
    r = tl.where(y < 0.0, -r, r)
    return tl.where((x != x) | (y != y), float("nan"), r)  # NaN in, NaN out (the max above may drop it)


@triton.jit
def _score_block(v_ptr, stride_a, a0, A, HALF, BA: tl.constexpr, BI: tl.constexpr, BD: tl.constexpr):
    """Scores of actions ``a0 .. a0+BA`` of the ``[A, D]`` vectors at ``v_ptr`` (int64 base), and
    how many of those actions' components are NaN or inf."""
    offs_a = a0 + tl.arange(0, BA)
    am = offs_a < A
    score = tl.zeros([BA], tl.float32)
    nonfinite = tl.zeros([BA], tl.int32)
    for i0 in range(0, A, BI):
        offs_i = i0 + tl.arange(0, BI)
        im = offs_i < A
        cos = tl.zeros([BI, BA], tl.float32)
        sin = tl.zeros([BI, BA], tl.float32)
        for j0 in range(0, HALF, BD):
            offs_j = j0 + tl.arange(0, BD)
            jm = offs_j < HALF
            pa = v_ptr + offs_a[:, None].to(tl.int64) * stride_a + 2 * offs_j[None, :]
            pi = v_ptr + offs_i[:, None].to(tl.int64) * stride_a + 2 * offs_j[None, :]
            ma = am[:, None] & jm[None, :]
            mi = im[:, None] & jm[None, :]
            ea = tl.load(pa, mask=ma, other=0.0).to(tl.float32)
            oa = tl.load(pa + 1, mask=ma, other=0.0).to(tl.float32)
            ei = tl.load(pi, mask=mi, other=0.0).to(tl.float32)
            oi = tl.load(pi + 1, mask=mi, other=0.0).to(tl.float32)
            nonfinite += tl.sum(((ea - ea) != 0.0).to(tl.int32) + ((oa - oa) != 0.0).to(tl.int32), axis=1)
            cos += tl.sum(ei[:, None, :] * ea[None, :, :] + oi[:, None, :] * oa[None, :, :], axis=2)
            sin += tl.sum(ei[:, None, :] * oa[None, :, :] - oi[:, None, :] * ea[None, :, :], axis=2)
        score += tl.sum(tl.where(im[:, None], _atan2(sin, cos), 0.0), axis=0)
    return score, am, nonfinite


@triton.jit
def _vec_dqn_scores_kernel(v_ptr, out_ptr, A, HALF, stride_m, stride_a,
                           BA: tl.constexpr, BI: tl.constexpr, BD: tl.constexpr):
    m = tl.program_id(0).to(tl.int64)
    a0 = tl.program_id(1) * BA
    score, am, _ = _score_block(v_ptr + m * stride_m, stride_a, a0, A, HALF, BA, BI, BD)
    tl.store(out_ptr + m * A + a0 + tl.arange(0, BA), score, mask=am)


@triton.jit
def _vec_dqn_fwd_kernel(on_ptr, tg_ptr, act_ptr, theta_ptr, loss_ptr, g_ptr, status_ptr,
                        S, A, HALF, stride_ob, stride_os, stride_oa, stride_tb, stride_ts, stride_ta,
                        stride_hb, stride_ht, cos_eps,
                        BA: tl.constexpr, BI: tl.constexpr, BD: tl.constexpr, BH: tl.constexpr):
    r = tl.program_id(0).to(tl.int64)  # transition index in [0, B*(S-1))
    b = r // (S - 1)
    t = r % (S - 1)
    tg = tg_ptr + b * stride_tb + (t + 1) * stride_ts
    best = tl.full([BA], float("-inf"), tl.float32).max(axis=0)
    greedy = tl.zeros([BA], tl.int32).max(axis=0)
    nonfinite = tl.zeros([BA], tl.int32)
    for a0 in range(0, A, BA):
        score, am, nf = _score_block(tg, stride_ta, a0, A, HALF, BA, BI, BD)
        nonfinite += nf
        score = tl.where(am & (score == score), score, float("-inf"))
        tile_best = tl.max(score, axis=0)
        tile_arg = tl.argmax(score, axis=0).to(tl.int32) + a0
        greedy = tl.where(tile_best > best, tile_arg, greedy)  # strict: ties keep the lowest index
        best = tl.maximum(best, tile_best)
    # A NaN or inf target vector at t+1 leaves no meaningful greedy action: the loss and the
    # gradient of the transition are NaN, as in the reference.
    bad = tl.sum(nonfinite, axis=0) > 0
    greedy = tl.minimum(tl.maximum(greedy, 0), A - 1)
    offs = tl.arange(0, BH)
    hm = offs < HALF
    wp = tg + greedy.to(tl.int64) * stride_ta + 2 * offs
    we = tl.load(wp, mask=hm, other=0.0).to(tl.float32)
    wo = tl.load(wp + 1, mask=hm, other=0.0).to(tl.float32)
    theta = tl.load(theta_ptr + b * stride_hb + t * stride_ht).to(tl.float32)
    c = tl.cos(theta)
    s = tl.sin(theta)
    re = we * c - wo * s
    ro = we * s + wo * c
    a = tl.load(act_ptr + b * S + t + 1).to(tl.int64)
    # an action outside [0, A) is reported from this code (the caller's check) and never read: clamped
    tl.store(status_ptr + r, ((a < 0) | (a >= A)).to(tl.int8))
    a = tl.minimum(tl.maximum(a, 0), A - 1)
    up = on_ptr + b * stride_ob + t * stride_os + a * stride_oa + 2 * offs
    ue = tl.load(up, mask=hm, other=0.0).to(tl.float32)
    uo = tl.load(up + 1, mask=hm, other=0.0).to(tl.float32)
    dot = tl.sum(ue * re + uo * ro, axis=0)
    nu_raw = tl.sqrt(tl.sum(ue * ue + uo * uo, axis=0))
    # F.cosine_similarity clamps each norm to eps; a NaN norm stays NaN
    nu = nanmax(nu_raw, cos_eps)
    nw = nanmax(tl.sqrt(tl.sum(re * re + ro * ro, axis=0)), cos_eps)
    nan = float("nan")
    tl.store(loss_ptr + r, tl.where(bad, nan, 1.0 - dot / (nu * nw)))
    # d(1 - cos)/du = -(w/(nu·nw) - dot·u/(nu²·|u|·nw)): PyTorch clamps the norm's value but
    # differentiates the norm unclamped (d|u|/du = u/|u|, 0 at u = 0).
    k = tl.where(nu_raw > 0.0, dot / (nu * nu * tl.where(nu_raw > 0.0, nu_raw, 1.0) * nw), 0.0)
    gp = g_ptr + r * (2 * HALF) + 2 * offs
    tl.store(gp, tl.where(bad, nan, -(re / (nu * nw) - k * ue)), mask=hm)
    tl.store(gp + 1, tl.where(bad, nan, -(ro / (nu * nw) - k * uo)), mask=hm)


@triton.jit
def _vec_dqn_bwd_kernel(g_ptr, act_ptr, grad_rows_ptr, out_ptr, S, A, HALF, stride_gr, mult,
                        BA: tl.constexpr, BH: tl.constexpr):
    """Dense ``[B, S, A, D]`` gradient: the compact row at the taken action times the row's upstream
    gradient and ``mult``, zeros elsewhere (``stride_gr = 0``: a mean's one upstream scalar, with
    ``mult = 1/N``)."""
    row = tl.program_id(0).to(tl.int64)  # b * S + t
    b = row // S
    t = row % S
    has = t < S - 1
    tt = tl.minimum(t, S - 2)  # row S-1 has no transition: read a valid row, then zero it
    r = b * (S - 1) + tt
    a = tl.where(has, tl.minimum(tl.maximum(tl.load(act_ptr + b * S + tt + 1).to(tl.int64), 0), A - 1), -1)
    scale = tl.load(grad_rows_ptr + r * stride_gr).to(tl.float32) * mult
    D = 2 * HALF
    offs_d = tl.arange(0, BH)
    dm = offs_d < D
    g = tl.load(g_ptr + r * D + offs_d, mask=dm, other=0.0) * scale
    for a0 in range(0, A, BA):
        offs_a = a0 + tl.arange(0, BA)
        am = offs_a < A
        val = tl.where((offs_a == a)[:, None], g[None, :], 0.0)
        tl.store(out_ptr + row * A * D + offs_a[:, None].to(tl.int64) * D + offs_d[None, :],
                 val.to(out_ptr.dtype.element_ty), mask=am[:, None] & dm[None, :])


# Tile choices, shared by the launchers and compile_variants (the AOT spill check).
SCORE_BD = 8
SCORE_WARPS = 4


def _score_tiles(A: int, half: int):
    """(BA, BI, BD, num_warps) of the pairwise-angle tiles: a [BI, BA, BD] product lives in registers."""
    ba = min(next_power_of_2(A), 16)
    bi = min(next_power_of_2(A), 16)
    bd = min(next_power_of_2(half), SCORE_BD)
    return ba, bi, bd, SCORE_WARPS


def _bwd_tiles(A: int, D: int):
    """(BA, BH) of the dense backward: at most 4096 elements per [BA, D] tile."""
    bh = next_power_of_2(D)
    return max(1, min(next_power_of_2(A), 4096 // bh)), bh


# The autotune spaces (FUSEDLOSS_AUTOTUNE=1; fusedloss.kernels._common.Tuned), keyed on the action
# count and the vector size. The pairwise-angle tiles ([BI, BA, BD] products in registers) tune where
# the launcher's tile is full (9 actions or more and vectors of 10 or more; smaller ones are one
# exact tile); the dense backward tunes the actions per tile and the warps.
_FULL_SCORE_TILE = (16, 16, SCORE_BD)
_SCORE_CONFIGS = [triton.Config({"BA": ba, "BI": bi, "BD": bd}, num_warps=w)
                  for ba, bi, bd, w in ((16, 16, 8, 4), (16, 16, 8, 8), (32, 16, 8, 8), (16, 32, 8, 8),
                                        (16, 16, 16, 8))]
_SCORES = Tuned(_vec_dqn_scores_kernel, _SCORE_CONFIGS, key=["A", "HALF"])
# The loss kernel holds the online row's vectors too: 32 rows of the pairwise tile spill there.
_FWD = Tuned(_vec_dqn_fwd_kernel, [c for c in _SCORE_CONFIGS if c.kwargs["BI"] == 16], key=["A", "HALF"])


def _fits_the_row(configs, named_args, **kwargs):
    """Backward tiles no wider than the actions and at most 8192 elements of ``[BA, D]``."""
    A, D = named_args["A"], 2 * named_args["HALF"]
    keep = [c for c in configs if c.kwargs["BA"] <= next_power_of_2(A) and c.kwargs["BA"] * next_power_of_2(D) <= 8192]
    return keep or [triton.Config({"BA": _bwd_tiles(A, D)[0]}, num_warps=4)]  # the launcher's own tile


_BWD = Tuned(_vec_dqn_bwd_kernel, [triton.Config({"BA": ba}, num_warps=w) for ba in (16, 64, 256) for w in (4, 8)],
             key=["A", "HALF"], prune=_fits_the_row)


@launcher
def vec_dqn_scores_fwd(v: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """Scores ``[M, A]`` fp32 of ``[M, A, D]`` vectors."""
    v = last_dim_contiguous(v)
    M, A, D = v.shape
    out = torch.empty((M, A), dtype=torch.float32, device=v.device) if out is None else out
    if M == 0 or A == 0:
        return out
    ba, bi, bd, warps = _score_tiles(A, D // 2)
    args, meta = (v, out, A, D // 2, v.stride(0), v.stride(1)), {"BA": ba, "BI": bi, "BD": bd, "num_warps": warps}
    if (ba, bi, bd) == _FULL_SCORE_TILE:
        _SCORES(lambda m: (M, cdiv(A, m["BA"])), *args, **meta)
    else:
        _vec_dqn_scores_kernel[(M, cdiv(A, ba))](*args, **meta)
    return out


@launcher
def vec_dqn_fwd(online, target, action, theta, loss_out=None, g_out=None, status_out=None):
    """Per-transition loss ``[N]``, compact gradient ``[N, D]`` (fp32), ``N = B·(S-1)``, and the
    action check per transition (int8 ``[N]``: 1 where ``action[b, t+1]`` is outside ``[0, A)``; the
    kernels clamp it). ``action``: integer ``[B, S]``; ``theta`` float ``[B, S-1]`` at any strides
    (the rewards' view, read in place)."""
    online, target = last_dim_contiguous(online), last_dim_contiguous(target)
    B, S, A, D = online.shape
    N = B * (S - 1)
    dev = online.device
    loss = torch.empty(N, dtype=torch.float32, device=dev) if loss_out is None else loss_out
    g = torch.empty((N, D), dtype=torch.float32, device=dev) if g_out is None else g_out
    status = torch.empty(N, dtype=torch.int8, device=dev) if status_out is None else status_out
    ba, bi, bd, warps = _score_tiles(A, D // 2)
    args = (online, target, action.contiguous(), theta, loss, g, status, S, A, D // 2,
            online.stride(0), online.stride(1), online.stride(2), target.stride(0), target.stride(1), target.stride(2),
            theta.stride(0), theta.stride(1), COS_EPS)
    meta = {"BA": ba, "BI": bi, "BD": bd, "BH": next_power_of_2(D // 2), "num_warps": warps}
    if (ba, bi, bd) == _FULL_SCORE_TILE:
        _FWD((N,), *args, **meta)
    else:
        _vec_dqn_fwd_kernel[(N,)](*args, **meta)
    return loss, g, status


@launcher
def vec_dqn_bwd(g: torch.Tensor, action: torch.Tensor, grad_rows: torch.Tensor, B: int, S: int, A: int,
                dtype: torch.dtype, mult: float = 1.0) -> torch.Tensor:
    """The dense ``[B, S, A, D]`` gradient from the compact ``g`` and the per-transition upstream
    gradient ``grad_rows`` ``[N]`` (any stride: the mean's expanded gradient is read in place; 0-d:
    one scalar for every transition), times ``mult``."""
    D = g.shape[1]
    out = torch.empty((B, S, A, D), dtype=dtype, device=g.device)
    ba, bh = _bwd_tiles(A, D)
    _BWD((B * S,), g, action.contiguous(), grad_rows, out, S, A, D // 2, grad_rows.stride(0) if grad_rows.dim() else 0,
         float(mult), BA=ba, BH=bh, num_warps=4)
    return out


@torch.library.custom_op("fusedloss::vec_dqn_scores", mutates_args=())
def _vec_dqn_scores_op(v: torch.Tensor) -> torch.Tensor:
    return vec_dqn_scores_fwd(v)


@_vec_dqn_scores_op.register_fake
def _(v):
    return v.new_empty(v.shape[:2], dtype=torch.float32)


@torch.library.custom_op("fusedloss::vec_dqn_fwd", mutates_args=())
def _vec_dqn_fwd_op(online: torch.Tensor, target: torch.Tensor, action: torch.Tensor,
                    theta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return vec_dqn_fwd(online, target, action, theta)


@_vec_dqn_fwd_op.register_fake
def _(online, target, action, theta):
    B, S, A, D = online.shape
    return (online.new_empty(B * (S - 1), dtype=torch.float32),
            online.new_empty((B * (S - 1), D), dtype=torch.float32), online.new_empty(B * (S - 1), dtype=torch.int8))


@torch.library.custom_op("fusedloss::vec_dqn_bwd", mutates_args=())
def _vec_dqn_bwd_op(g: torch.Tensor, action: torch.Tensor, grad_rows: torch.Tensor, B: int, S: int, A: int,
                    dtype: torch.dtype) -> torch.Tensor:
    return vec_dqn_bwd(g, action, grad_rows, B, S, A, dtype)


@_vec_dqn_bwd_op.register_fake
def _(g, action, grad_rows, B, S, A, dtype):
    return g.new_empty((B, S, A, g.shape[1]), dtype=dtype)


def _setup(ctx, inputs, output):
    online, _, action, _ = inputs
    ctx.shape = tuple(online.shape)
    ctx.dtype = online.dtype
    ctx.set_materialize_grads(False)  # the compact gradient output gets none: no zero-fill for it
    ctx.save_for_backward(output[1], action)


def _backward(ctx, grad_rows, grad_g, grad_status):
    g, action = ctx.saved_tensors
    if grad_rows is None:
        return None, None, None, None
    B, S, A, _ = ctx.shape
    return _vec_dqn_bwd_op(g, action, grad_rows, B, S, A, ctx.dtype), None, None, None


_vec_dqn_fwd_op.register_autograd(_backward, setup_context=_setup)
no_double_backward(_vec_dqn_bwd_op, "vec_dqn")


def vec_dqn_scores_fused(vecs: torch.Tensor) -> torch.Tensor:
    """Scores ``[..., A]`` of ``[..., A, D]`` vectors; they select actions and get no gradient."""
    lead, (A, D) = vecs.shape[:-2], vecs.shape[-2:]
    return _vec_dqn_scores_op(vecs.detach().reshape(math.prod(lead), A, D)).reshape(*lead, A)


# Eager calls skip the custom ops, whose dispatch costs far more host time than the launches at RL shapes; the
# custom ops are what torch.compile traces and what torch.func transforms fall back on.
class _VecDqnFwdFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, online, target, action, theta, mean):
        rows, g, status = vec_dqn_fwd(online, target, action, theta)
        ctx.shape, ctx.dtype = tuple(online.shape), online.dtype
        ctx.mult = 1.0 / rows.shape[0] if mean else 1.0
        ctx.set_materialize_grads(False)
        ctx.mark_non_differentiable(status)
        ctx.save_for_backward(g, action)
        return rows.mean() if mean else rows, status

    @staticmethod
    def backward(ctx, grad_rows, _grad_status):
        if grad_rows is None:
            return (None,) * 5
        g, action = ctx.saved_tensors
        B, S, A, _ = ctx.shape
        d = fused_backward("vec_dqn", vec_dqn_bwd, g, action, grad_rows, B, S, A, ctx.dtype, ctx.mult)
        return d, None, None, None, None


def vec_dqn_fused(online_vecs: torch.Tensor, target_vecs: torch.Tensor, action: torch.Tensor,
                  theta: torch.Tensor, mean: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-transition losses ``[B·(S-1)]`` (fp32) of ``[B, S, A, D]`` vectors, or with ``mean=True``
    their mean (its backward is the one dense launch, no ``div`` before it), and the per-transition
    action check of :func:`vec_dqn_fwd`; ``action`` integer ``[B, S]``, ``theta`` ``[B, S-1]``. The
    target vectors get no gradient."""
    if torch.compiler.is_compiling() or torch._C._functorch.is_functorch_wrapped_tensor(online_vecs):
        reject_grad_transforms("vec_dqn", online_vecs)
        rows, _, status = _vec_dqn_fwd_op(online_vecs, target_vecs.detach(), action, theta)
        return (rows.mean() if mean else rows), status
    return _VecDqnFwdFunction.apply(online_vecs, target_vecs.detach(), action, theta, mean)


# The AOT signatures' types and ints, shared by the fixed and the tuned variants.
_SCORES_TYPES = {"v_ptr": "*fp32", "out_ptr": "*fp32"}
_LOSS_TYPES = {"on_ptr": "*bf16", "tg_ptr": "*bf16", "act_ptr": "*i64", "theta_ptr": "*fp32", "loss_ptr": "*fp32",
               "g_ptr": "*fp32", "status_ptr": "*i8", "cos_eps": "fp32"}
_BWD_TYPES = {"g_ptr": "*fp32", "act_ptr": "*i64", "grad_rows_ptr": "*fp32", "out_ptr": "*bf16", "mult": "fp32"}


def _scores_ints(A: int, D: int) -> dict:
    return {"A": A, "HALF": D // 2, "stride_m": A * D, "stride_a": D}


def _loss_ints(A: int, D: int) -> dict:
    return {"S": 64, "A": A, "HALF": D // 2, "stride_ob": 64 * A * D, "stride_os": A * D, "stride_oa": D,
            "stride_tb": 64 * A * D, "stride_ts": A * D, "stride_ta": D, "stride_hb": 64, "stride_ht": 1}


def _bwd_ints(A: int, D: int) -> dict:
    return {"S": 64, "A": A, "HALF": D // 2, "stride_gr": D}


def compile_variants():
    """Scores, loss and dense backward for small and wide action spaces and vector sizes."""
    for A, D in ((18, 2), (18, 16), (128, 32), (512, 256)):
        ba, bi, bd, warps = _score_tiles(A, D // 2)
        c = {"BA": ba, "BI": bi, "BD": bd}
        yield AotVariant(f"vec_dqn scores A={A} D={D}", _vec_dqn_scores_kernel,
                         signature(_vec_dqn_scores_kernel, _SCORES_TYPES, c), c, warps, _scores_ints(A, D))
        c = {"BA": ba, "BI": bi, "BD": bd, "BH": next_power_of_2(D // 2)}
        yield AotVariant(f"vec_dqn loss A={A} D={D}", _vec_dqn_fwd_kernel,
                         signature(_vec_dqn_fwd_kernel, _LOSS_TYPES, c), c, warps, _loss_ints(A, D))
        ba, bh = _bwd_tiles(A, D)
        c = {"BA": ba, "BH": bh}
        yield AotVariant(f"vec_dqn backward A={A} D={D}", _vec_dqn_bwd_kernel,
                         signature(_vec_dqn_bwd_kernel, _BWD_TYPES, c), c, 4, _bwd_ints(A, D))
    yield from tuned_variants()


def tuned_variants():
    """Every autotune config at a wide action space (the backward's, as its pruning keeps them at
    two vector sizes)."""
    A, D = 512, 256
    yield from _SCORES.variants({}, lambda c: signature(_vec_dqn_scores_kernel, _SCORES_TYPES, c),
                                f"vec_dqn scores A={A} D={D} tuned", _scores_ints(A, D))
    yield from _FWD.variants({"BH": D // 2}, lambda c: signature(_vec_dqn_fwd_kernel, _LOSS_TYPES, c),
                             f"vec_dqn loss A={A} D={D} tuned", _loss_ints(A, D))
    for D in (16, 256):
        kept = _fits_the_row(_BWD.configs, {"A": A, "HALF": D // 2})
        yield from _BWD.variants({"BH": D}, lambda c: signature(_vec_dqn_bwd_kernel, _BWD_TYPES, c),
                                 f"vec_dqn backward A={A} D={D} tuned", _bwd_ints(A, D), kept)
