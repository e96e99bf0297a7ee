"""Fused Triton DQN kernels: TD target, CQL logsumexp, loss, gradient and metrics in two launches.

The walk: program ``(b, c)`` owns steps ``[c·t_chunk, (c+1)·t_chunk)`` of sequence ``b``
(:func:`time_chunks`: a one-step target splits each sequence until the grid has about
``TARGET_PROGRAMS`` programs, so a few sequences of wide action spaces still fill the GPU). Where
reward normalisation is on, it first reads the sequence's rewards (and mask) for their mean and std
(``S`` numbers, a small fraction of the ``t_chunk·A`` q values it then reads; skipped otherwise).
It walks its steps in tiles of ``T_BLOCK`` and the actions in tiles of ``BLOCK_A``:

- pass 1 over the action tiles: ``q_sa = q[b, t, a]`` with ``a = action[b, t+1]``; the max of
  ``q_target[b, t+1, :]`` (or, with ``double_dqn``, ``q_target`` at the argmax of ``q[b, t+1, :]``);
  the online logsumexp of ``q[b, t, :]`` for CQL;
- the TD target, the per-transition loss, ``|TD error|``, and the program's partial metrics;
- pass 2 over the action tiles: the gradient of the per-transition loss with respect to
  ``q[b, t, :]``: ``dl/dq_sa·onehot(a) + cql_weight·q_scale·softmax(q[b, t, :])`` times the
  importance weight, where ``dl/dq_sa`` is ``2d`` (l2) or ``clamp(d, ±delta)`` (huber) minus
  ``cql_weight·q_scale``. Row ``S-1`` and masked transitions get 0.

Each program stores its partials (count, Chan mean and M2 of ``q_sa``, min, max, sums of loss,
target and CQL penalty, bad-index counts) as one row of a ``[B·n_chunks, len(DqnPartial)]``
buffer. The fold, a second launch of one program, reduces the rows in row order into the loss and
the metrics. The split into programs depends on the shape alone and nothing outlives a call (no
counter, no global state), so the result is the same bit for bit on every call, thread and stream.
The gradient stays unscaled; backward multiplies it by ``grad_output / count`` in one launch.

Multi-step targets (``n_step > 1`` or ``td_lambda``) add a sweep before the walk, in the same
program (one per sequence) and so the same launch: it computes the bootstrap value ``V[t+1]`` of
every transition (through ``h^-1`` with value rescaling) into a ``[B, S-1]`` fp32 scratch row. For the n-step
return the walk then sums a window of at most ``n_step`` transformed rewards and one of those
values; for Peng's Q(lambda) the sweep itself runs the backward recurrence
``G[t] = a[t] + b[t]·G[t+1]`` from the sequence end, chunk by chunk, as a
``tl.associative_scan`` of the affine maps with the lanes reversed in time (a done, the last
transition or an invalid next transition cuts the chain), and stores ``G``. With value rescaling
the target is ``h(G)``. Nothing of shape ``[B, S, n]`` exists.

Actions outside ``[0, A)`` and ``done`` values outside ``{0, 1, 2}`` are clamped before any load and
counted in the metrics buffer, so they never read out of bounds; the caller raises on the count.

Byte model: read ``q`` and the ``t+1`` rows of ``q_target`` once (``q[t+1]`` too with
``double_dqn``) and write the gradient once: ``(3 + double)·B·S·A·b + small`` (the partials are
``44·B·n_chunks`` bytes); backward reads and
writes the gradient (``2·B·S·A·b``). With CQL, pass 2 re-reads ``q[b, t, :]``, normally from L1/L2.
A multi-step target moves the ``q_target`` (and double-DQN ``q``) reads into the sweep and adds
``8·B·S`` bytes of scratch traffic; the n-step window re-reads ``n_step`` step values per
transition from L1/L2.

The slots of the partials and metrics buffers are :class:`DqnPartial` and :class:`DqnMetric`;
the kernel reads them through their constexpr mirrors ``_P`` and ``_M``.
"""

from __future__ import annotations

import enum
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from ._common import (AotVariant, Tuned, as_loadable, cdiv, constexpr_namespace, fast_exp, fast_log,
                      fused_backward, last_dim_contiguous, launcher, nanmax, nanmin, next_power_of_2,
                      no_double_backward, online_lse_update, reject_grad_transforms, signature, stored_grad_dtype)

__all__ = ["DqnPartial", "DqnMetric", "TdScalars", "dqn_fwd", "dqn_bwd", "dqn_fused", "n_step_window", "time_chunks",
           "compile_variants"]


class DqnPartial(enum.IntEnum):
    """Per-program partials, ``[B·n_chunks, len(DqnPartial)]``: reduced by the fold."""

    COUNT = 0
    MEAN = 1  # Chan mean of q_sa over the valid transitions
    M2 = 2
    MIN = 3
    MAX = 4
    LOSS = 5  # sums over the valid transitions
    TARGET = 6
    CQL = 7
    BAD_ACTION = 8  # counts of clamped inputs
    BAD_DONE = 9
    SCALE = 10  # max |q_sa|: M2 is stored in units of SCALE², so squares of values near 1e20 cannot overflow


class DqnMetric(enum.IntEnum):
    """Slots of the metrics buffer the forward returns."""

    Q_MEAN = 0
    Q_STD = 1
    Q_MIN = 2
    Q_MAX = 3
    Q_TARGET = 4
    LOSS = 5
    CQL_PENALTY = 6
    INV_COUNT = 7  # 1 / count: backward's scale
    BAD_ACTION = 8  # input checks: non-zero fails
    BAD_DONE = 9
    COUNT = 10
    NO_VALID = 11


_P = constexpr_namespace(DqnPartial)
_M = constexpr_namespace(DqnMetric)
_NP = tl.constexpr(len(DqnPartial))



class TdScalars(NamedTuple):
    """The float scalars of the TD target and loss. The forward kernel takes them as one tuple
    argument and reads them by name (``sc.gamma``), so no call site matches them by position."""

    gamma: float
    gamma_terminal: float
    gamma_truncated: float
    reward_scale: float
    reward_shift: float
    norm_eps: float
    norm_target: float
    cql_weight: float
    cql_eps: float
    huber_delta: float
    td_lambda: float  # read only with a lambda-return (0 otherwise)
    rescale_eps: float


# :func:`dqn_fwd`'s float keywords (``td_lambda`` apart: None selects no lambda-return) and its flags.
PARAMS = tuple(f for f in TdScalars._fields if f != "td_lambda")
FLAGS = ("norm_mean", "norm_std", "huber", "double", "value_rescaling")
MAX_BLOCK_A = 1024
HOT_TILES = {"_dqn_bwd_kernel": ("BLOCK",)}  # elements per tile, for fusedloss.kernels.aot; the forward walks steps
MAX_UNROLL = 16  # longest n-step window unrolled at compile time; longer ones loop (one variant for every S)
TILE_ELEMS = 1024
TILE_WARPS = 8
TARGET_PROGRAMS = 1024  # programs a one-step launch aims for (about 8 per SM of an H100/H200's 132)


@triton.jit
def _valid(m_ptr, step, t, tv, HAS_MASK: tl.constexpr):
    """Validity of transitions ``t -> t+1``: in range (``tv``) and both steps unmasked."""
    valid = tv
    if HAS_MASK:
        valid = valid & (tl.load(m_ptr + step + t, mask=tv, other=0) != 0) & (tl.load(m_ptr + step + t + 1, mask=tv, other=0) != 0)
    return valid


@triton.jit
def _transition(m_ptr, rew_ptr, step, t, tv, HAS_MASK: tl.constexpr):
    """Validity of transitions ``t -> t+1`` and their raw rewards ``r[t+1]``."""
    r = tl.load(rew_ptr + step + t + 1, mask=tv, other=0.0).to(tl.float32)
    return _valid(m_ptr, step, t, tv, HAS_MASK), r


@triton.jit
def _safe_scale(x):
    """``x`` as a divisor: itself when finite and > 0, else 1 (``fusedloss.losses._common.safe_scale``)."""
    return tl.where(x > 0.0, tl.where(x < float("inf"), x, 1.0), 1.0)


@triton.jit
def _discounted(c, v):
    """``c·v``, and exactly 0 where the coefficient ``c`` is 0: a zero discount never reads its
    bootstrap value, even a -inf (every action illegal after a terminal) or a NaN."""
    return tl.where(c == 0.0, 0.0, c * v)


@triton.jit
def _reward_stats(m_ptr, rew_ptr, step, n_tr, HAS_MASK: tl.constexpr, NORM_STD: tl.constexpr,
                  T_BLOCK: tl.constexpr):
    """Mean and unbiased std of the sequence's valid rewards ``r[t+1]``, ``t < S-1`` (std 0
    unless ``NORM_STD``)."""
    offs_t = tl.arange(0, T_BLOCK)
    r_sum = tl.zeros([T_BLOCK], tl.float32)
    n_sum = tl.zeros([T_BLOCK], tl.float32)
    r_amax = tl.zeros([T_BLOCK], tl.float32)
    for t0 in range(0, n_tr, T_BLOCK):
        t = t0 + offs_t
        valid, r = _transition(m_ptr, rew_ptr, step, t, t < n_tr, HAS_MASK)
        r_sum += tl.where(valid, r, 0.0)
        n_sum += valid.to(tl.float32)
        if NORM_STD:
            r_amax = tl.where(valid, tl.maximum(r_amax, tl.abs(r)), r_amax)
    n_seq = tl.sum(n_sum, axis=0)
    r_mean = tl.sum(r_sum, axis=0) / tl.maximum(n_seq, 1.0)
    r_std = 0.0
    if NORM_STD:
        # deviations in units of max|r| (the reference's scaling): no square overflows for |r| up to fp32's max
        scale = _safe_scale(tl.max(r_amax, axis=0))
        dev = tl.zeros([T_BLOCK], tl.float32)
        for t0 in range(0, n_tr, T_BLOCK):
            t = t0 + offs_t
            valid, r = _transition(m_ptr, rew_ptr, step, t, t < n_tr, HAS_MASK)
            d = r / scale - r_mean / scale
            dev += tl.where(valid, d * d, 0.0)
        r_std = tl.sqrt(tl.sum(dev, axis=0) / tl.maximum(n_seq - 1.0, 1.0)) * scale
    return r_mean, r_std


@triton.jit
def _transform_reward(r, r_mean, r_std, sc, NORM_MEAN: tl.constexpr, NORM_STD: tl.constexpr):
    """The reward transform: per-sequence normalisation, then ``r·reward_scale + reward_shift``."""
    if NORM_MEAN:
        r = r - r_mean
    if NORM_STD:
        r = r / (r_std + sc.norm_eps) * sc.norm_target
    return r * sc.reward_scale + sc.reward_shift


@triton.jit
def _discount(d_raw, sc):
    """``gamma``, ``gamma_terminal`` or ``gamma_truncated`` by ``done`` (compared in its own dtype,
    as the reference does)."""
    term = (d_raw == 1).to(tl.float32)
    trunc = (d_raw == 2).to(tl.float32)
    return sc.gamma * (1.0 - term - trunc) + sc.gamma_terminal * term + sc.gamma_truncated * trunc


@triton.jit
def _reward_discount(done_ptr, rew_ptr, m_ptr, step, t, tv, r_mean, r_std, sc, HAS_MASK: tl.constexpr,
                     NORM_MEAN: tl.constexpr, NORM_STD: tl.constexpr):
    """Per transition: validity, transformed reward ``r'``, discount and the raw ``done[t+1]``."""
    d_raw = tl.load(done_ptr + step + t + 1, mask=tv, other=0)
    valid, r = _transition(m_ptr, rew_ptr, step, t, tv, HAS_MASK)
    r = _transform_reward(r, r_mean, r_std, sc, NORM_MEAN, NORM_STD)
    return valid, r, _discount(d_raw, sc), d_raw


@triton.jit
def _step_inputs(act_ptr, done_ptr, rew_ptr, m_ptr, step, t, tv, A, r_mean, r_std, sc, HAS_MASK: tl.constexpr,
                 NORM_MEAN: tl.constexpr, NORM_STD: tl.constexpr):
    """Per transition: the clamped action, validity, transformed reward and discount, and flags
    for an action outside ``[0, A)`` or a ``done`` outside ``{0, 1, 2}``."""
    a_raw = tl.load(act_ptr + step + t + 1, mask=tv, other=0).to(tl.int64)
    valid, r, disc, d_raw = _reward_discount(done_ptr, rew_ptr, m_ptr, step, t, tv, r_mean, r_std, sc, HAS_MASK,
                                             NORM_MEAN, NORM_STD)
    bad_a = (tv & ((a_raw < 0) | (a_raw >= A))).to(tl.float32)
    bad_d = (tv & (d_raw != 0) & (d_raw != 1) & (d_raw != 2)).to(tl.float32)
    a = tl.minimum(tl.maximum(a_raw, 0), A - 1)
    return a, valid, r, disc, bad_a, bad_d


@triton.jit
def _bootstrap_tile(qn_row, qt_row, cols, lm, a0, A, next_v, best, nan_next, DOUBLE: tl.constexpr):
    """One action tile of the bootstrap value ``V[t+1]``: the running max of ``q_target[t+1]``, or
    with ``DOUBLE`` ``q_target[t+1]`` at the running argmax of ``q[t+1]`` (``best``, ``nan_next``).

    NaN is never dropped (GPU max/argmax would skip it): a NaN in ``q_target[t+1]`` makes the max
    NaN, and the double-DQN argmax takes the first NaN as torch.argmax does."""
    qtn = tl.load(qt_row + cols[None, :], mask=lm, other=float("-inf")).to(tl.float32)
    if DOUBLE:
        qn = tl.load(qn_row + cols[None, :], mask=lm, other=float("-inf")).to(tl.float32)
        isnan = qn != qn
        tile_nan = tl.max(isnan.to(tl.int32), axis=1) > 0
        first_nan = tl.min(tl.where(isnan, cols[None, :], A), axis=1)
        key = tl.where(isnan, float("-inf"), qn)
        tile_best = tl.max(key, axis=1)
        # strict: ties keep the lowest index, as torch.argmax (the first tile always counts, so a
        # row of -inf picks 0 as torch does); a first NaN wins over any number
        better = ((tile_best > best) | (a0 == 0)) & ~nan_next
        new_nan = tile_nan & ~nan_next
        pick = tl.where(new_nan, first_nan, tl.argmax(key, axis=1) + a0)
        at = tl.sum(tl.where(cols[None, :] == pick[:, None], tl.where(lm, qtn, 0.0), 0.0), axis=1)
        next_v = tl.where(better | new_nan, at, next_v)
        best = tl.maximum(best, tile_best)
        nan_next = nan_next | tile_nan
    else:
        # tl.max skips NaN on the GPU; adding the row's sum of its NaNs (0 when there are none) restores it
        nan_probe = tl.sum(tl.where(qtn != qtn, qtn, 0.0), axis=1)
        next_v = nanmax(next_v, tl.max(qtn, axis=1) + nan_probe)
    return next_v, best, nan_next


@triton.jit
def _action_pass(q_row, qn_row, qt_row, a, tv, A, Q: tl.constexpr, BOOTSTRAP: tl.constexpr, CQL: tl.constexpr,
                 DOUBLE: tl.constexpr, T_BLOCK: tl.constexpr, BLOCK_A: tl.constexpr):
    """Pass 1 over the action tiles: with ``Q``, ``q[t, a]`` and the online (max, sum) of
    ``exp q[t]`` for CQL; with ``BOOTSTRAP``, the bootstrap value ``V[t+1]`` (0 outside ``tv``), in
    the same loop. The one-step walk asks for both, the multi-step sweep for ``V`` alone.

    A NaN anywhere in ``q[t]`` makes the CQL sum of exponentials, and so the logsumexp, NaN. The
    running max starts at -inf (0 stands in for it in the exponents until a finite value arrives),
    so huge negative values keep their own max."""
    offs_a = tl.arange(0, BLOCK_A)
    q_sa = tl.zeros([T_BLOCK], tl.float32)
    lse_m = tl.full([T_BLOCK], float("-inf"), tl.float32)
    lse_s = tl.zeros([T_BLOCK], tl.float32)
    next_v = tl.full([T_BLOCK], float("-inf"), tl.float32)
    best = tl.full([T_BLOCK], float("-inf"), tl.float32)
    nan_next = tl.zeros([T_BLOCK], tl.int32) != 0
    for a0 in range(0, A, BLOCK_A):
        cols = a0 + offs_a
        lm = tv[:, None] & (cols < A)[None, :]
        if Q:
            qv = tl.load(q_row + cols[None, :], mask=lm, other=float("-inf")).to(tl.float32)
            q_sa += tl.sum(tl.where(cols[None, :] == a[:, None], tl.where(lm, qv, 0.0), 0.0), axis=1)
        if BOOTSTRAP:
            next_v, best, nan_next = _bootstrap_tile(qn_row, qt_row, cols, lm, a0, A, next_v, best, nan_next, DOUBLE)
        if Q and CQL:
            lse_m, lse_s = online_lse_update(lse_m, lse_s, qv, 1.0, True)
    return q_sa, lse_m, lse_s, tl.where(tv, next_v, 0.0)


@triton.jit
def _h(x, eps):
    """Value rescaling ``h(x) = sign(x)(sqrt(|x| + 1) - 1) + eps·x`` (the reference's
    ``value_rescale``: ``sqrt(u + 1) - 1`` as ``u / (sqrt(u + 1) + 1)``)."""
    u = tl.abs(x)
    y = u / (tl.sqrt(u + 1.0) + 1.0) + eps * u
    return tl.where(x < 0, -y, y)


@triton.jit
def _h_inv(x, eps):
    """``h^-1`` in the reference's cancellation-free form (``value_rescale_inverse``): the root
    ``z = sqrt(y + 1) - 1`` of ``eps z^2 + (1 + 2 eps) z = |x|``, then ``y = z (z + 2)``."""
    u = tl.abs(x)
    c = 1.0 + 2.0 * eps
    z = 2.0 * u / (c + tl.sqrt(c * c + 4.0 * eps * u))
    y = z * (z + 2.0)
    return tl.where(x < 0, -y, y)


@triton.jit
def _times_positive(b, x):
    """``b·x`` for a product ``b`` of positive coefficients, which may have underflowed to 0: an
    infinite ``x`` stays infinite (``0·inf`` would be NaN, and the true product is not 0)."""
    return tl.where((b == 0.0) & (tl.abs(x) == float("inf")), x, b * x)


@triton.jit
def _compose(a_acc, b_acc, c_acc, a_y, b_y, c_y):
    """Scan operator of the lambda-return: lanes run backwards in time, so ``acc`` is the map
    ``G -> a + b·G`` of the later steps and ``y`` the earlier one; the result is ``y ∘ acc``. A
    cut (``c = 0``: a done, an invalid step, or a zero coefficient, flagged per step before the
    scan) keeps ``a_y`` alone, so nothing behind it (not even a NaN or a -inf times 0) gets through;
    an uncut ``b`` is a product of positive coefficients, however small it has become."""
    return tl.where(c_y != 0, a_y + _times_positive(b_y, a_acc), a_y), b_y * b_acc, c_y * c_acc


@triton.jit
def _td_loss(q_sa, target, lse_m, lse_s, sc, CQL: tl.constexpr, HUBER: tl.constexpr):
    """Per-transition loss, its derivative with respect to ``q[t, a]``, the CQL penalty
    ``logsumexp q[t] - q[t, a]`` and the CQL scale ``|target| + cql_eps``."""
    d = q_sa - target
    if HUBER:
        ad = tl.abs(d)
        per = tl.where(ad <= sc.huber_delta, 0.5 * d * d, sc.huber_delta * (ad - 0.5 * sc.huber_delta))
        # GPU min/max would return the number where d is NaN; the reference's gradient is NaN there.
        dsa = nanmin(nanmax(d, -sc.huber_delta), sc.huber_delta)
    else:
        per = d * d
        dsa = 2.0 * d
    q_scale = tl.abs(target) + sc.cql_eps
    pen = lse_m + fast_log(nanmax(lse_s, 1e-30)) - q_sa
    if CQL:
        per = per + sc.cql_weight * q_scale * pen
        dsa = dsa - sc.cql_weight * q_scale
    return d, per, dsa, pen, q_scale


@triton.jit
def _grad_pass(g_row, q_row, a, tv, valid, in_seq, coef_sa, coef_sm, lse_m, A, CQL: tl.constexpr,
               BLOCK_A: tl.constexpr):
    """Pass 2: ``coef_sa·onehot(a) + coef_sm·exp(q[t] - lse_m)`` for every action; rows without a
    valid transition get exactly 0 (whatever their q), a valid row of all -inf gets NaN, as
    torch's softmax does."""
    offs_a = tl.arange(0, BLOCK_A)
    for a0 in range(0, A, BLOCK_A):
        cols = a0 + offs_a
        sm = in_seq[:, None] & (cols < A)[None, :]
        g = tl.where(cols[None, :] == a[:, None], coef_sa[:, None], 0.0)
        if CQL:
            lm = tv[:, None] & (cols < A)[None, :]
            qv = tl.load(q_row + cols[None, :], mask=lm, other=float("-inf")).to(tl.float32)
            g += tl.where(valid[:, None], coef_sm[:, None] * fast_exp(qv - lse_m[:, None]), 0.0)
        tl.store(g_row + cols[None, :], g.to(g_row.dtype.element_ty), mask=sm)


@triton.jit
def _bootstrap_sweep(q_ptr, qt_ptr, done_ptr, rew_ptr, m_ptr, boot_ptr, b64, step, n_tr, A,
                     stride_qb, stride_qs, stride_tb, stride_ts, r_mean, r_std, sc, HAS_MASK: tl.constexpr, NORM_MEAN: tl.constexpr, NORM_STD: tl.constexpr,
                     DOUBLE: tl.constexpr, LAMBDA: tl.constexpr, RESCALE: tl.constexpr,
                     T_BLOCK: tl.constexpr, BLOCK_A: tl.constexpr):
    """Sweep 1 of a multi-step target: ``boot[b, t] = V[t+1]`` (through ``h^-1`` with ``RESCALE``)
    for every transition, or with ``LAMBDA`` the lambda-return ``G[t]`` itself.

    The chunks run from the sequence end with the lanes reversed in time, so the backward
    recurrence ``G[t] = a[t] + b[t]·G[t+1]`` is a forward ``tl.associative_scan`` of the maps
    (:func:`_compose`) applied to the carry ``G`` of the chunk after."""
    offs_t = tl.arange(0, T_BLOCK)
    carry = tl.zeros([T_BLOCK], tl.float32)  # G at the step after the chunk, in every lane
    for k in range(0, tl.cdiv(n_tr, T_BLOCK)):
        t = n_tr - 1 - k * T_BLOCK - offs_t
        tv = t >= 0
        t_next = t.to(tl.int64) + 1
        qn_row = q_ptr + b64 * stride_qb + t_next[:, None] * stride_qs
        # V alone (Q=False): the q row and action arguments are unused, qn_row and t_next fill them
        _, _, _, v = _action_pass(qn_row, qn_row, qt_ptr + b64 * stride_tb + t_next[:, None] * stride_ts, t_next, tv,
                                  A, False, True, False, DOUBLE, T_BLOCK, BLOCK_A)
        if RESCALE:
            v = _h_inv(v, sc.rescale_eps)
        if LAMBDA:
            valid, r, disc, d_raw = _reward_discount(done_ptr, rew_ptr, m_ptr, step, t, tv, r_mean, r_std, sc,
                                                     HAS_MASK, NORM_MEAN, NORM_STD)
            cont = (d_raw == 0) & _valid(m_ptr, step, t + 1, tv & (t + 1 < n_tr), HAS_MASK)
            a = tl.where(valid, r + tl.where(cont, _discounted(disc * (1.0 - sc.td_lambda), v), _discounted(disc, v)),
                         0.0)
            b = sc.td_lambda * disc
            ga, gb, gc = tl.associative_scan((a, b, (cont & (b != 0.0)).to(tl.int32)), 0, _compose)
            v = tl.where(gc != 0, ga + _times_positive(gb, carry), ga)
            carry = tl.zeros([T_BLOCK], tl.float32) + tl.sum(tl.where(offs_t == T_BLOCK - 1, v, 0.0), axis=0)
        tl.store(boot_ptr + b64 * n_tr + t, v, mask=tv)


@triton.jit
def _window_step(boot_row, done_ptr, rew_ptr, m_ptr, step, t, j, n_tr, acc, boot, alive, gpow, r_mean, r_std, sc,
                 HAS_MASK: tl.constexpr, NORM_MEAN: tl.constexpr, NORM_STD: tl.constexpr):
    """Term ``j`` of the n-step window: ``gamma^j r'[t+j]`` into ``acc``, the bootstrap candidate
    ``gamma^j disc[t+j] V[t+j+1]`` into ``boot``, and whether the window goes on past ``t+j``."""
    tj = t + j
    alive, r, disc, d_raw = _reward_discount(done_ptr, rew_ptr, m_ptr, step, tj, alive & (tj < n_tr), r_mean,
                                             r_std, sc, HAS_MASK, NORM_MEAN, NORM_STD)
    acc += tl.where(alive, gpow * r, 0.0)
    boot = tl.where(alive, _discounted(gpow * disc, tl.load(boot_row + tj, mask=alive, other=0.0)), boot)
    return acc, boot, alive & (d_raw == 0), gpow * sc.gamma


@triton.jit
def _n_step_target(boot_row, done_ptr, rew_ptr, m_ptr, step, t, valid, n_tr, n_window, r_mean, r_std, sc,
                   HAS_MASK: tl.constexpr, NORM_MEAN: tl.constexpr, NORM_STD: tl.constexpr, N_STEP: tl.constexpr):
    """``sum_{j<m} gamma^j r'[t+j] + gamma^(m-1) disc[t+m-1] V[t+m]``: a window over the step inputs
    and the bootstrap values of sweep 1 (``boot_row[t] = V[t+1]``), summed in the reference's order;
    it stops before an invalid transition and after the first done. ``N_STEP > 1`` unrolls a
    window of that length (steps past the sequence end are masked); ``N_STEP == 0`` loops over a
    window of the runtime length ``n_window``, so long windows compile once, whatever ``S``."""
    acc = tl.zeros(t.shape, tl.float32)
    boot = tl.zeros(t.shape, tl.float32)
    alive = valid
    gpow = tl.full([], 1.0, tl.float32)
    if N_STEP > 0:
        for j in tl.static_range(N_STEP):
            acc, boot, alive, gpow = _window_step(boot_row, done_ptr, rew_ptr, m_ptr, step, t, j, n_tr, acc, boot,
                                                  alive, gpow, r_mean, r_std, sc, HAS_MASK, NORM_MEAN, NORM_STD)
    else:
        for j in range(0, n_window):
            acc, boot, alive, gpow = _window_step(boot_row, done_ptr, rew_ptr, m_ptr, step, t, j, n_tr, acc, boot,
                                                  alive, gpow, r_mean, r_std, sc, HAS_MASK, NORM_MEAN, NORM_STD)
    return acc + boot


@triton.jit
def _chan_update(c_n, c_mean, c_m2, c_sc, x, valid):
    """Chan's update of per-lane (count, mean, M2) with one observation ``x`` where ``valid``.
    ``c_sc`` is the lane's running max ``|x|`` and ``M2`` is kept in units of ``c_sc²`` (rescaled
    when the max grows), so deviations near 1e20 are never squared in fp32."""
    n_new = c_n + valid.to(tl.float32)
    sc_new = tl.where(valid, nanmax(c_sc, tl.abs(x)), c_sc)
    unit = _safe_scale(sc_new)
    ratio = c_sc / unit
    d_old = x / unit - c_mean / unit  # x - mean overflows where they are near +-3e38 apart
    c_mean = tl.where(valid, c_mean + d_old / tl.maximum(n_new, 1.0) * unit, c_mean)
    c_m2 = tl.where(valid, c_m2 * ratio * ratio + d_old * (x / unit - c_mean / unit), c_m2)
    return n_new, c_mean, c_m2, sc_new


@triton.jit
def _write_partials(pb, c_n, c_mean, c_m2, c_sc, c_min, c_max, c_loss, c_tgt, c_cql, c_bad_a, c_bad_d):
    """Combine the lanes (Chan, in units of the sequence's max ``|q_sa|``) and store one
    sequence's partials at ``pb``."""
    n = tl.sum(c_n, axis=0)
    sc = tl.max(c_sc, axis=0)
    unit = _safe_scale(sc)
    mean = tl.sum(c_n * (c_mean / unit), axis=0) / tl.maximum(n, 1.0) * unit
    ratio = c_sc / unit
    dm = c_mean / unit - mean / unit
    tl.store(pb + _P.COUNT, n)
    tl.store(pb + _P.MEAN, mean)
    tl.store(pb + _P.SCALE, sc)
    tl.store(pb + _P.M2, tl.sum(c_m2 * ratio * ratio + c_n * dm * dm, axis=0))
    tl.store(pb + _P.MIN, tl.min(c_min, axis=0))
    tl.store(pb + _P.MAX, tl.max(c_max, axis=0))
    tl.store(pb + _P.LOSS, tl.sum(c_loss, axis=0))
    tl.store(pb + _P.TARGET, tl.sum(c_tgt, axis=0))
    tl.store(pb + _P.CQL, tl.sum(c_cql, axis=0))
    tl.store(pb + _P.BAD_ACTION, tl.sum(c_bad_a, axis=0))
    tl.store(pb + _P.BAD_DONE, tl.sum(c_bad_d, axis=0))


@triton.jit
def _load_partial(part_ptr, bb, bm, SLOT: tl.constexpr, other):
    return tl.load(part_ptr + bb * _NP + SLOT, mask=bm, other=other)


@triton.jit
def _finalize(part_ptr, metrics_ptr, loss_ptr, P, P_BLOCK: tl.constexpr):
    """Fold the ``P`` rows of partials (one per program of the walk), in row order, into the loss and the metrics. The q
    moments are combined in units of the largest sequence scale, found first, so neither the
    count-weighted means nor the squared deviations overflow."""
    offs_b = tl.arange(0, P_BLOCK)
    s_sc = tl.zeros([P_BLOCK], tl.float32)
    for b0 in range(0, P, P_BLOCK):
        bb = (b0 + offs_b).to(tl.int64)
        s_sc = nanmax(s_sc, _load_partial(part_ptr, bb, bb < P, _P.SCALE, 0.0))
    g_unit = _safe_scale(tl.max(s_sc, axis=0))
    s_n = tl.zeros([P_BLOCK], tl.float32)
    s_nm = tl.zeros([P_BLOCK], tl.float32)
    s_min = tl.full([P_BLOCK], float("inf"), tl.float32)
    s_max = tl.full([P_BLOCK], float("-inf"), tl.float32)
    s_loss = tl.zeros([P_BLOCK], tl.float32)
    s_tgt = tl.zeros([P_BLOCK], tl.float32)
    s_cql = tl.zeros([P_BLOCK], tl.float32)
    s_ba = tl.zeros([P_BLOCK], tl.float32)
    s_bd = tl.zeros([P_BLOCK], tl.float32)
    for b0 in range(0, P, P_BLOCK):
        bb = (b0 + offs_b).to(tl.int64)
        bm = bb < P
        pn = _load_partial(part_ptr, bb, bm, _P.COUNT, 0.0)
        s_n += pn
        s_nm += pn * (_load_partial(part_ptr, bb, bm, _P.MEAN, 0.0) / g_unit)
        s_min = nanmin(s_min, _load_partial(part_ptr, bb, bm, _P.MIN, float("inf")))
        s_max = nanmax(s_max, _load_partial(part_ptr, bb, bm, _P.MAX, float("-inf")))
        s_loss += _load_partial(part_ptr, bb, bm, _P.LOSS, 0.0)
        s_tgt += _load_partial(part_ptr, bb, bm, _P.TARGET, 0.0)
        s_cql += _load_partial(part_ptr, bb, bm, _P.CQL, 0.0)
        s_ba += _load_partial(part_ptr, bb, bm, _P.BAD_ACTION, 0.0)
        s_bd += _load_partial(part_ptr, bb, bm, _P.BAD_DONE, 0.0)
    total = tl.sum(s_n, axis=0)
    g_mean = tl.sum(s_nm, axis=0) / total * g_unit
    s_m2 = tl.zeros([P_BLOCK], tl.float32)
    for b0 in range(0, P, P_BLOCK):
        bb = (b0 + offs_b).to(tl.int64)
        bm = bb < P
        dm = _load_partial(part_ptr, bb, bm, _P.MEAN, 0.0) / g_unit - g_mean / g_unit
        ratio = _load_partial(part_ptr, bb, bm, _P.SCALE, 0.0) / g_unit
        s_m2 += (_load_partial(part_ptr, bb, bm, _P.M2, 0.0) * ratio * ratio
                 + _load_partial(part_ptr, bb, bm, _P.COUNT, 0.0) * dm * dm)
    loss = tl.sum(s_loss, axis=0) / total
    tl.store(loss_ptr, loss)
    tl.store(metrics_ptr + _M.Q_MEAN, g_mean)
    tl.store(metrics_ptr + _M.Q_STD, tl.sqrt(tl.sum(s_m2, axis=0) / tl.maximum(total - 1.0, 1.0)) * g_unit)
    # GPU min/max skip NaN; a NaN q[t, a] has already made the mean NaN, and must show here too.
    tl.store(metrics_ptr + _M.Q_MIN, tl.where(g_mean != g_mean, g_mean, tl.min(s_min, axis=0)))
    tl.store(metrics_ptr + _M.Q_MAX, tl.where(g_mean != g_mean, g_mean, tl.max(s_max, axis=0)))
    tl.store(metrics_ptr + _M.Q_TARGET, tl.sum(s_tgt, axis=0) / total)
    tl.store(metrics_ptr + _M.LOSS, loss)
    tl.store(metrics_ptr + _M.CQL_PENALTY, tl.sum(s_cql, axis=0) / total)
    # backward's scale: 1 with no valid transition, whose gradient is then 0 (every stored entry is), not 0·inf
    tl.store(metrics_ptr + _M.INV_COUNT, 1.0 / tl.maximum(total, 1.0))
    tl.store(metrics_ptr + _M.BAD_ACTION, tl.sum(s_ba, axis=0))
    tl.store(metrics_ptr + _M.BAD_DONE, tl.sum(s_bd, axis=0))
    tl.store(metrics_ptr + _M.COUNT, total)
    tl.store(metrics_ptr + _M.NO_VALID, (total == 0.0).to(tl.float32))


@triton.jit
def _dqn_fwd_kernel(
    q_ptr, qt_ptr, act_ptr, rew_ptr, done_ptr, w_ptr, m_ptr, grad_ptr, td_ptr, boot_ptr, part_ptr,
    S, A, n_window, t_chunk, stride_qb, stride_qs, stride_tb, stride_ts, sc,
    HAS_WEIGHT: tl.constexpr, HAS_MASK: tl.constexpr, NORM_MEAN: tl.constexpr, NORM_STD: tl.constexpr,
    CQL: tl.constexpr, HUBER: tl.constexpr, DOUBLE: tl.constexpr,
    N_STEP: tl.constexpr, LAMBDA: tl.constexpr, RESCALE: tl.constexpr,
    T_BLOCK: tl.constexpr, BLOCK_A: tl.constexpr,
):
    """Program ``(b, c)``: steps ``[c·t_chunk, (c+1)·t_chunk)`` of sequence ``b`` (``t_chunk`` a
    multiple of ``T_BLOCK``; a multi-step target runs one chunk per sequence). ``sc`` is a
    :class:`TdScalars`. Writes the gradient and ``|td|`` rows of its steps and one row of partials."""
    b64 = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1)
    n_tr = S - 1
    step = b64 * S
    offs_t = tl.arange(0, T_BLOCK)
    if NORM_MEAN or NORM_STD:
        r_mean, r_std = _reward_stats(m_ptr, rew_ptr, step, n_tr, HAS_MASK, NORM_STD, T_BLOCK)
    else:
        r_mean = 0.0
        r_std = 0.0
    if N_STEP != 1 or LAMBDA:
        _bootstrap_sweep(q_ptr, qt_ptr, done_ptr, rew_ptr, m_ptr, boot_ptr, b64, step, n_tr, A,
                         stride_qb, stride_qs, stride_tb, stride_ts, r_mean, r_std, sc,
                         HAS_MASK, NORM_MEAN, NORM_STD, DOUBLE, LAMBDA, RESCALE, T_BLOCK, BLOCK_A)
        tl.debug_barrier()  # sweep 2 reads values other threads of this program stored

    # This program's partials, accumulated per lane and combined at the end.
    c_n = tl.zeros([T_BLOCK], tl.float32)
    c_mean = tl.zeros([T_BLOCK], tl.float32)
    c_m2 = tl.zeros([T_BLOCK], tl.float32)
    c_sc = tl.zeros([T_BLOCK], tl.float32)
    c_min = tl.full([T_BLOCK], float("inf"), tl.float32)
    c_max = tl.full([T_BLOCK], float("-inf"), tl.float32)
    c_loss = tl.zeros([T_BLOCK], tl.float32)
    c_tgt = tl.zeros([T_BLOCK], tl.float32)
    c_cql = tl.zeros([T_BLOCK], tl.float32)
    c_bad_a = tl.zeros([T_BLOCK], tl.float32)
    c_bad_d = tl.zeros([T_BLOCK], tl.float32)
    t_lo = chunk * t_chunk
    for t0 in range(t_lo, tl.minimum(t_lo + t_chunk, S), T_BLOCK):
        t = t0 + offs_t
        tv = t < n_tr  # rows with a transition t -> t+1
        t64 = t.to(tl.int64)
        a, valid, r, disc, bad_a, bad_d = _step_inputs(act_ptr, done_ptr, rew_ptr, m_ptr, step, t, tv, A, r_mean,
                                                       r_std, sc, HAS_MASK, NORM_MEAN, NORM_STD)
        c_bad_a += bad_a
        c_bad_d += bad_d
        q_row = q_ptr + b64 * stride_qb + t64[:, None] * stride_qs
        q_sa, lse_m, lse_s, next_v = _action_pass(
            q_row, q_row + stride_qs, qt_ptr + b64 * stride_tb + (t64[:, None] + 1) * stride_ts, a, tv, A,
            True, not (N_STEP != 1 or LAMBDA), CQL, DOUBLE, T_BLOCK, BLOCK_A)
        if LAMBDA:
            target = tl.load(boot_ptr + b64 * n_tr + t, mask=tv, other=0.0)
        elif N_STEP != 1:
            target = _n_step_target(boot_ptr + b64 * n_tr, done_ptr, rew_ptr, m_ptr, step, t, valid, n_tr, n_window,
                                    r_mean, r_std, sc, HAS_MASK, NORM_MEAN, NORM_STD, N_STEP)
        else:
            if RESCALE:
                next_v = _h_inv(next_v, sc.rescale_eps)
            target = r + _discounted(disc, next_v)
        if RESCALE:
            target = _h(target, sc.rescale_eps)
        d, per, dsa, pen, q_scale = _td_loss(q_sa, target, lse_m, lse_s, sc, CQL, HUBER)
        w = tl.full([T_BLOCK], 1.0, tl.float32)
        if HAS_WEIGHT:
            w = tl.load(w_ptr + step + t + 1, mask=tv, other=0.0).to(tl.float32)
        tl.store(td_ptr + b64 * n_tr + t, tl.where(valid, tl.abs(d), 0.0), mask=tv)  # not 0·NaN

        c_n, c_mean, c_m2, c_sc = _chan_update(c_n, c_mean, c_m2, c_sc, q_sa, valid)
        c_min = tl.where(valid, nanmin(c_min, q_sa), c_min)
        c_max = tl.where(valid, nanmax(c_max, q_sa), c_max)
        c_loss += tl.where(valid, per * w, 0.0)
        c_tgt += tl.where(valid, target, 0.0)
        c_cql += tl.where(valid, pen, 0.0)

        coef_sa = tl.where(valid, dsa * w, 0.0)
        coef_sm = tl.where(valid, sc.cql_weight * q_scale * w / nanmax(lse_s, 1e-30), 0.0)
        # the gradient is contiguous [B, S, A] (the launcher allocates it)
        _grad_pass(grad_ptr + (step + t64[:, None]) * A, q_row, a, tv, valid, t < S, coef_sa, coef_sm, lse_m, A, CQL,
                   BLOCK_A)

    _write_partials(part_ptr + (b64 * tl.num_programs(1) + chunk) * _NP, c_n, c_mean, c_m2, c_sc, c_min, c_max,
                    c_loss, c_tgt, c_cql, c_bad_a, c_bad_d)


@triton.jit
def _dqn_fold_kernel(part_ptr, metrics_ptr, loss_ptr, P, P_BLOCK: tl.constexpr):
    """One program folds the ``P`` rows of partials, in row order, into the loss and the metrics."""
    _finalize(part_ptr, metrics_ptr, loss_ptr, P, P_BLOCK)


@triton.jit
def _dqn_bwd_kernel(g_ptr, out_ptr, gout_ptr, inv_ptr, numel, BLOCK: tl.constexpr):
    """``out = g * grad_output * inv_count`` with both scalars read on the device (no sync)."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    scale = tl.load(gout_ptr).to(tl.float32) * tl.load(inv_ptr)
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + offs, (g * scale).to(out_ptr.dtype.element_ty), mask=mask)


_BWD_BLOCK = 4096
# The backward's autotune space (FUSEDLOSS_AUTOTUNE=1), keyed on its size. The forward's tiles are
# not tuned: T_BLOCK fixes the time chunks, so the grid and the order of the partials' sums.
_DQN_BWD = Tuned(_dqn_bwd_kernel, [triton.Config({"BLOCK": b}, num_warps=w)
                                   for b, w in ((1024, 4), (2048, 4), (4096, 4), (4096, 8), (8192, 8))], key=["numel"])


def _tiles(A: int, S: int, max_block_a: int = MAX_BLOCK_A, n_step: int = 1, lam: bool = False):
    """(BLOCK_A, T_BLOCK, num_warps): a [T_BLOCK, BLOCK_A] tile of TILE_ELEMS elements over enough
    warps that the kernel's dozen live tiles stay in registers (checked by tests/compile_check.py).
    The unrolled n-step window takes at most 32 transitions a chunk (Triton 3.6 spilled 8 bytes at
    A = 4 with 64), and so does the lambda-return's scan (Triton 3.9 spilled 4 bytes at A = 4 with
    64 on 4 warps). An n-step window over rows of 1024 or more actions runs on 4 warps: with the
    runtime's divisibility specialisation, 8 warps spilled 20 bytes on sm_90 (Triton 3.9)."""
    block_a = min(next_power_of_2(A), max_block_a)
    t_block = max(1, min(64 if n_step == 1 and not lam else 32, TILE_ELEMS // block_a, next_power_of_2(S)))
    if n_step > 1 and block_a >= 1024:
        return block_a, t_block, 4
    return block_a, t_block, TILE_WARPS if t_block * block_a > 256 else 4


def n_step_window(n_step: int, S: int) -> tuple[int, int]:
    """``(window, N_STEP)``: the longest window a sequence of ``S`` steps holds, ``min(n_step,
    S-1)``, and the kernel's compile-time window: 1 for a one-step target, ``n_step`` itself
    (unrolled, the steps past the end masked) up to ``MAX_UNROLL``, else 0 (a loop over the
    runtime window). It depends on ``n_step`` alone, so a new ``S`` never compiles a new kernel."""
    window = min(n_step, S - 1)
    return window, 1 if window == 1 else (n_step if n_step <= MAX_UNROLL else 0)


def time_chunks(B: int, S: int, t_block: int, multi: bool) -> tuple[int, int]:
    """``(t_chunk, n_chunks)``: the steps each program walks (whole ``t_block`` tiles) and the
    programs per sequence. A one-step target splits each sequence into about ``TARGET_PROGRAMS / B``
    chunks (at most one per tile), so a few wide sequences still fill the GPU; a multi-step target
    keeps one program per sequence, whose sweep runs the whole sequence. It depends on the shape
    alone, so the order of every float sum, and the result, is the same on every call."""
    blocks = cdiv(S, t_block)
    want = 1 if multi else min(blocks, max(1, cdiv(TARGET_PROGRAMS, B)))
    t_chunk = cdiv(blocks, want) * t_block
    return t_chunk, cdiv(S, t_chunk)


@launcher
def dqn_fwd(q, q_target, action, reward, done, weight, mask, *, gamma: float, gamma_terminal: float,
            gamma_truncated: float, reward_scale: float, reward_shift: float, norm_mean: bool, norm_std: bool,
            norm_eps: float, norm_target: float, cql_weight: float, cql_eps: float, huber: bool, huber_delta: float,
            double: bool, n_step: int = 1, td_lambda: float | None = None, value_rescaling: bool = False,
            rescale_eps: float = 1e-3, max_block_a: int = MAX_BLOCK_A, grad_out=None, td_out=None):
    """Launch the fused forward on ``q``, ``q_target`` ``[B, S, A]`` and ``[B, S]`` step tensors
    (``weight``, ``mask`` optional). CQL runs when ``cql_weight > 0``; ``n_step > 1`` or a
    ``td_lambda`` (not both) selects a multi-step target, which adds a ``[B, S-1]`` fp32 scratch of
    bootstrap values or returns, written and read back by the same program (still one launch).

    Returns ``(loss 0-dim fp32, metrics [len(DqnMetric)] fp32, grad [B, S, A], |td| [B, S-1] fp32)``;
    the gradient is that of the sum of per-transition losses (backward divides by the count), in
    ``q.dtype`` (fp32 for fp16 ``q``: :func:`stored_grad_dtype`). ``grad_out``/``td_out`` let tests pass NaN-poisoned buffers.
    """
    q, q_target = last_dim_contiguous(q), last_dim_contiguous(q_target)
    B, S, A = q.shape
    dev = q.device
    if n_step < 1 or (td_lambda is not None and n_step > 1):
        raise ValueError(f"n_step must be >= 1, and td_lambda needs n_step == 1; got n_step={n_step}, "
                         f"td_lambda={td_lambda}.")
    grad = torch.empty(q.shape, dtype=stored_grad_dtype(q.dtype), device=dev) if grad_out is None else grad_out
    if not grad.is_contiguous():
        raise ValueError("grad_out must be a contiguous [B, S, A] tensor.")
    td = torch.empty((B, S - 1), dtype=torch.float32, device=dev) if td_out is None else td_out
    window, unroll = n_step_window(n_step, S)
    multi = window > 1 or td_lambda is not None
    block_a, t_block, warps = _tiles(A, S, max_block_a, window, td_lambda is not None)
    t_chunk, n_chunks = time_chunks(B, S, t_block, multi)
    n_part = B * n_chunks
    part = torch.empty((n_part, len(DqnPartial)), dtype=torch.float32, device=dev)
    metrics = torch.empty(len(DqnMetric), dtype=torch.float32, device=dev)
    loss = torch.empty((), dtype=torch.float32, device=dev)
    action, reward, done = as_loadable(action), as_loadable(reward), as_loadable(done)
    w = as_loadable(weight) if weight is not None else reward
    m = as_loadable(mask) if mask is not None else done
    boot = torch.empty((B, S - 1), dtype=torch.float32, device=dev) if multi else td
    sc = TdScalars(gamma, gamma_terminal, gamma_truncated, reward_scale, reward_shift, norm_eps, norm_target,
                   cql_weight, cql_eps, huber_delta, 0.0 if td_lambda is None else td_lambda, rescale_eps)
    _dqn_fwd_kernel[(B, n_chunks)](
        q, q_target, action, reward, done, w, m, grad, td, boot, part,
        S, A, window, t_chunk, q.stride(0), q.stride(1), q_target.stride(0), q_target.stride(1), sc,
        HAS_WEIGHT=weight is not None, HAS_MASK=mask is not None, NORM_MEAN=norm_mean, NORM_STD=norm_std,
        CQL=cql_weight > 0.0, HUBER=huber, DOUBLE=double, N_STEP=unroll, LAMBDA=td_lambda is not None,
        RESCALE=value_rescaling, T_BLOCK=t_block, BLOCK_A=block_a, num_warps=warps,
    )
    _dqn_fold_kernel[(1,)](part, metrics, loss, n_part, P_BLOCK=min(next_power_of_2(n_part), 1024), num_warps=4)
    return loss, metrics, grad, td


@launcher
def dqn_bwd(g: torch.Tensor, grad_output: torch.Tensor, inv_count: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``g · grad_output · inv_count`` (two 0-dim device scalars) in ``dtype``: one launch."""
    out = torch.empty(g.shape, dtype=dtype, device=g.device)
    numel = g.numel()
    _DQN_BWD(lambda meta: (cdiv(numel, meta["BLOCK"]),), g, out, grad_output.reshape(1), inv_count, numel,
             BLOCK=_BWD_BLOCK, num_warps=4)
    return out


@torch.library.custom_op("fusedloss::dqn_fwd", mutates_args=())
def _dqn_fwd_op(q: torch.Tensor, q_target: torch.Tensor, action: torch.Tensor, reward: torch.Tensor,
                done: torch.Tensor, weight: torch.Tensor | None, mask: torch.Tensor | None, gamma: float,
                gamma_terminal: float, gamma_truncated: float, reward_scale: float, reward_shift: float,
                norm_eps: float, norm_target: float, cql_weight: float, cql_eps: float, huber_delta: float,
                rescale_eps: float, norm_mean: bool, norm_std: bool, huber: bool, double: bool, value_rescaling: bool,
                n_step: int, td_lambda: float | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return dqn_fwd(q, q_target, action, reward, done, weight, mask, gamma=gamma, gamma_terminal=gamma_terminal,
                   gamma_truncated=gamma_truncated, reward_scale=reward_scale, reward_shift=reward_shift,
                   norm_eps=norm_eps, norm_target=norm_target, cql_weight=cql_weight, cql_eps=cql_eps,
                   huber_delta=huber_delta, rescale_eps=rescale_eps, norm_mean=norm_mean, norm_std=norm_std,
                   huber=huber, double=double, value_rescaling=value_rescaling, n_step=n_step, td_lambda=td_lambda)


_OP_INPUTS = 7 + len(PARAMS) + len(FLAGS) + 2  # the tensors, then the named scalars, n_step and td_lambda


@_dqn_fwd_op.register_fake
def _(q, q_target, *_args, **_kwargs):
    B, S, _ = q.shape
    f32 = dict(dtype=torch.float32, device=q.device)
    return (torch.empty((), **f32), torch.empty(len(DqnMetric), **f32),
            torch.empty(q.shape, dtype=stored_grad_dtype(q.dtype), device=q.device), torch.empty((B, S - 1), **f32))


@torch.library.custom_op("fusedloss::dqn_bwd", mutates_args=())
def _dqn_bwd_op(g: torch.Tensor, grad_output: torch.Tensor, inv_count: torch.Tensor,
                dtype: torch.dtype) -> torch.Tensor:
    return dqn_bwd(g, grad_output, inv_count, dtype)


@_dqn_bwd_op.register_fake
def _(g, grad_output, inv_count, dtype):
    return torch.empty(g.shape, dtype=dtype, device=g.device)


def _setup(ctx, inputs, output):
    _, metrics, grad, td = output
    ctx.mark_non_differentiable(metrics, td)  # metrics and |td| carry no gradient (and keep no graph alive)
    ctx.set_materialize_grads(False)  # nor the stored gradient: no zero-filled B·S·A (or metrics, td) tensor
    ctx.dtype = inputs[0].dtype
    ctx.save_for_backward(grad, metrics)


def _backward(ctx, grad_loss, grad_metrics, grad_grad, grad_td):
    grad, metrics = ctx.saved_tensors
    if grad_loss is None:
        return (None,) * _OP_INPUTS
    inv_count = metrics[DqnMetric.INV_COUNT:DqnMetric.INV_COUNT + 1]
    return (_dqn_bwd_op(grad, grad_loss, inv_count, ctx.dtype),) + (None,) * (_OP_INPUTS - 1)


_dqn_fwd_op.register_autograd(_backward, setup_context=_setup)
no_double_backward(_dqn_bwd_op, "dqn")


# Eager calls skip the custom ops, whose dispatch costs far more host time than the launches at RL shapes; the
# custom ops are what torch.compile traces and what torch.func transforms fall back on.
class _DqnFwdFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, q_target, action, reward, done, weight, mask, scalars):
        loss, metrics, grad, td = dqn_fwd(q, q_target, action, reward, done, weight, mask, **scalars)
        ctx.mark_non_differentiable(metrics, td)
        ctx.set_materialize_grads(False)
        ctx.dtype = q.dtype
        ctx.save_for_backward(grad, metrics)
        return loss, metrics, td

    @staticmethod
    def backward(ctx, grad_loss, _grad_metrics, _grad_td):
        if grad_loss is None:
            return (None,) * 8
        grad, metrics = ctx.saved_tensors
        inv_count = metrics[DqnMetric.INV_COUNT:DqnMetric.INV_COUNT + 1]
        return (fused_backward("dqn", dqn_bwd, grad, grad_loss, inv_count, ctx.dtype),) + (None,) * 7


def dqn_fused(q, q_target, action, reward, done, weight=None, mask=None, **scalars):
    """The fused path behind :func:`fusedloss.dqn_loss`; ``scalars`` are :func:`dqn_fwd`'s keyword
    scalars. Returns ``(loss, metrics, td_abs)``: ``metrics`` is the ``[len(DqnMetric)]`` device
    buffer, metric values and input-check flags alike (no extra launch)."""
    n_step = min(int(scalars["n_step"]), 2**31 - 1)  # any longer window is the whole sequence
    td_lambda = scalars["td_lambda"]
    td_lambda = None if td_lambda is None else float(td_lambda)
    kw = {k: float(scalars[k]) for k in PARAMS}
    kw.update({k: bool(scalars[k]) for k in FLAGS}, n_step=n_step, td_lambda=td_lambda)
    if torch.compiler.is_compiling() or torch._C._functorch.is_functorch_wrapped_tensor(q):
        reject_grad_transforms("dqn", q)
        loss, metrics, _, td = _dqn_fwd_op(q, q_target.detach(), action, reward, done, weight, mask, **kw)
        return loss, metrics, td
    return _DqnFwdFunction.apply(q, q_target.detach(), action, reward, done, weight, mask, kw)


def compile_variants():
    """The tiles the launcher picks for small and wide action spaces, with CQL alone, with every
    one-step option on (the most live registers), and with each multi-step target (n-step and
    lambda, both with value rescaling and every option); the fold and the backward."""
    types = {"q_ptr": "*bf16", "qt_ptr": "*bf16", "act_ptr": "*i64", "rew_ptr": "*fp32", "done_ptr": "*i64",
             "w_ptr": "*fp32", "m_ptr": "*u8", "grad_ptr": "*bf16", "td_ptr": "*fp32", "boot_ptr": "*fp32",
             "part_ptr": "*fp32", "sc": TdScalars(*["fp32"] * len(TdScalars._fields))}
    kinds = {"cql": (False, None), "all options": (True, None), "all options n-step": (True, "N_STEP"),
             "all options lambda": (True, "LAMBDA")}
    for A, S in ((4, 512), (18, 64), (18, 80), (1024, 32), (32768, 64)):
        for kind, (every, multi) in kinds.items():
            block_a, t_block, warps = _tiles(A, S, n_step=5 if multi == "N_STEP" else 1, lam=multi == "LAMBDA")
            if S == 80 and multi is None:
                continue  # the R2D2 shape is there for the multi-step targets
            c = {"HAS_WEIGHT": every, "HAS_MASK": every, "NORM_MEAN": every, "NORM_STD": every, "CQL": True,
                 "HUBER": every, "DOUBLE": every, "N_STEP": 5 if multi == "N_STEP" else 1, "LAMBDA": multi == "LAMBDA",
                 "RESCALE": multi is not None, "T_BLOCK": t_block, "BLOCK_A": block_a}
            ints = {"S": S, "A": A, "n_window": 5, "t_chunk": time_chunks(256, S, t_block, multi is not None)[0],
                    "stride_qb": S * A, "stride_qs": A, "stride_tb": S * A, "stride_ts": A}
            yield AotVariant(f"dqn A={A} S={S} {kind}", _dqn_fwd_kernel, signature(_dqn_fwd_kernel, types, c), c,
                             warps, ints)
    c = {"P_BLOCK": 1024}
    t = {"part_ptr": "*fp32", "metrics_ptr": "*fp32", "loss_ptr": "*fp32"}
    yield AotVariant("dqn fold", _dqn_fold_kernel, signature(_dqn_fold_kernel, t, c), c, 4, {"P": 4096})
    c = {"BLOCK": _BWD_BLOCK}
    t = {"g_ptr": "*bf16", "out_ptr": "*bf16", "gout_ptr": "*fp32", "inv_ptr": "*fp32"}
    yield AotVariant("dqn backward", _dqn_bwd_kernel, signature(_dqn_bwd_kernel, t, c), c, 4)
    yield from _DQN_BWD.variants({}, lambda c: signature(_dqn_bwd_kernel, t, c), "dqn backward tuned")
