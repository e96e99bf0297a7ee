"""Fused Triton kernels for the policy-distillation family (``ce``, ``ce-soft-fwd/bwd``,
``kl-fwd/bwd``, ``js``).

One program owns ``ROWS`` rows. It computes both log-softmaxes with online (max, sum), the per-row
loss and the gradient with respect to the student logits, all in the forward; backward only
scales that gradient by the per-row upstream gradient. A mean over a few short rows (at most
``MEAN_TILES`` tiles) is taken in the forward kernel by one program that walks the row tiles in
order: one launch forward, three forward+backward with autograd's seed and the backward.

Gradients (``s = softmax(z)``, ``p`` the smoothed teacher, ``L`` the row loss):
  ce, ce-soft-fwd, kl-fwd: ``s - p``;
  ce-soft-bwd (``L = -Σ s log p``): ``s (-L - log p)``;
  kl-bwd (``L = Σ s (log s - log p)``): ``s (log s - log p - L)``;
  js, generalized (``m = βp + (1-β)s``, ``L = β Σ p (log p - log m) + (1-β) Σ s (log s - log m)``,
  ``K = Σ s (log s - log m)``): ``(1-β) s (log s - log m - K)``; β = ½ is the symmetric JS. Both
  KL terms are summed as non-negative terms (:func:`_kl_to_mix`), exact as β -> 0 or 1.

Byte model (``b`` bytes per element, ``N·A`` elements):
  a row that fits one tile (``A <= max_block``): read teacher and student once, write the
  gradient once: ``3·N·A·b``; backward reads and writes the gradient: ``2·N·A·b``.
  a longer row: pass 1 (row statistics) reads both, pass 2 (loss) reads both again and, for
  ``ce``/``ce-soft-fwd``/``kl-fwd``, writes the gradient: ``5·N·A·b``; ``ce-soft-bwd``,
  ``kl-bwd`` and ``js`` need the row loss before the gradient, a third read: ``7·N·A·b``.
"""

from __future__ import annotations

import enum
import math

import torch
import triton
import triton.language as tl

from ._common import (AotVariant, Tuned, cdiv, constexpr_namespace, fast_exp, fast_log, fused_backward,
                      last_dim_contiguous, launcher, nanmax, nanmin, next_power_of_2, no_double_backward,
                      online_lse_update, reject_grad_transforms, signature, stored_grad_dtype,
                      tiles_narrower_than)

__all__ = ["SpLossType", "sp_fwd", "sp_bwd", "sp_fused", "sp_op", "sp_topk_fwd", "sp_topk_fused", "sp_topk_op",
           "compile_variants"]


class SpLossType(enum.IntEnum):
    """The loss codes the kernel is compiled for; a member's name is the loss type's, upper-cased
    with ``_`` for ``-`` (``SpLossType.of("kl-fwd") is SpLossType.KL_FWD``)."""

    CE = 0
    CE_SOFT_FWD = 1
    CE_SOFT_BWD = 2
    KL_FWD = 3
    KL_BWD = 4
    JS = 5

    @classmethod
    def of(cls, loss_type: str) -> "SpLossType":
        return cls[loss_type.upper().replace("-", "_")]

    @property
    def loss_type(self) -> str:
        return self.name.lower().replace("_", "-")


_L = constexpr_namespace(SpLossType)
# Their gradient needs the row's total loss first: a third pass over a row longer than one tile.
_GRAD_NEEDS_ROW_LOSS = frozenset({SpLossType.CE_SOFT_BWD, SpLossType.KL_BWD, SpLossType.JS})
# The widest tile a program holds per row: wider rows loop over tiles. About nine fp32 arrays of the
# tile are live at once; 8K elements over 16 warps is 16 per thread, which stays in registers.
# (Chosen without a GPU at hand: to be tuned by bench/bench_sp.py.)
MAX_BLOCK = 8192
# The elements one loop iteration (or the one tile) of each kernel covers, for the AOT instruction
# counts (fusedloss.kernels.aot): the product of these constexprs.
HOT_TILES = {"_sp_fwd_kernel": ("ROWS", "BLOCK_A"), "_sp_bwd_kernel": ("ROWS", "BLOCK_A"),
             "_sp_topk_fwd_kernel": ("BLOCK_V",)}


@triton.jit
def _wmul(w, x):
    """``w·x`` with ``0·x = 0`` for any ``x``: the ``0·log 0`` convention, also where a log
    overflowed to -inf. NaN weights stay NaN."""
    return tl.where(w == 0.0, 0.0, w * x)


@triton.jit
def _load_tile(q_ptr, z_ptr, rows64, rmask, cols, A, stride_q, stride_z):
    mask = rmask[:, None] & (cols < A)[None, :]
    q = tl.load(q_ptr + rows64[:, None] * stride_q + cols[None, :], mask=mask, other=float("-inf")).to(tl.float32)
    z = tl.load(z_ptr + rows64[:, None] * stride_z + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    valid = mask & (q != float("-inf"))
    z = tl.where(valid, z, float("-inf"))
    return q, z, valid, mask


@triton.jit
def _probs(q, z, valid, cols, mt, lse_t, mz, lse_z, n_valid, target, inv_t, eps,
           LOSS: tl.constexpr, HAS_SMOOTHING: tl.constexpr):
    """Teacher p, log p and student s, log s on a tile; 0 outside the valid entries."""
    ls = tl.where(valid, z - mz[:, None] - lse_z[:, None], 0.0)
    s = tl.where(valid, fast_exp(ls), 0.0)
    if LOSS == _L.CE:
        hit = cols[None, :] == target[:, None]
        p = tl.where(valid, eps / n_valid[:, None], 0.0) + tl.where(hit & valid, 1.0 - eps, 0.0)
        lp = ls  # unused by ce
    else:
        lp = tl.where(valid, (q - mt[:, None]) * inv_t - lse_t[:, None], 0.0)
        p = tl.where(valid, fast_exp(lp), 0.0)
        if HAS_SMOOTHING:
            p = tl.where(valid, (1.0 - eps) * p + eps / n_valid[:, None], 0.0)
            lp = tl.where(valid, fast_log(nanmax(p, 1e-37)), 0.0)
    return p, lp, s, ls


@triton.jit
def _log_m(lp, ls, log_b, log_1mb):
    """log(βp + (1-β)s) without underflow: logaddexp(log β + log p, log(1-β) + log s)."""
    a = lp + log_b
    b = ls + log_1mb
    hi = nanmax(a, b)
    return hi + fast_log(1.0 + fast_exp(nanmin(a, b) - hi))


@triton.jit
def _phi_series(u):
    """``u - log(1 + u)`` for ``|u| < 0.1``: its Taylor series to ``u^8`` (relative error below
    3e-8), free of the cancellation of the direct form."""
    return u * u * (0.5 + u * (-1.0 / 3.0 + u * (0.25 + u * (-0.2 + u * (1.0 / 6.0 + u * (-1.0 / 7.0 + u * 0.125))))))


@triton.jit
def _kl_to_mix(a, la, b, lm, c):
    """The term of ``KL(A‖M)`` at one entry, with ``m = a + c·(b - a)``, written as
    ``a·log(a/m) + c·(b - a)`` (the added terms sum to 0 over a row), which is ``a·φ(u) >= 0``
    with ``u = c·(b - a)/a`` and ``φ(u) = u - log(1 + u)``: ``_phi_series`` where ``|u| < 0.1``,
    the log-domain form elsewhere (``c·b`` where ``a = 0``). No term cancels another, so the
    row's sum keeps its relative precision as ``c -> 0`` (``β -> 0`` or ``1`` in the JSD).
    Also returns where the series applies and its ``u``."""
    diff = c * (b - a)
    small = tl.abs(diff) < 0.1 * a
    u = tl.where(small, diff / tl.where(small, a, 1.0), 0.0)
    return tl.where(small, a * _phi_series(u), _wmul(a, la - lm) + diff), small, u


@triton.jit
def _elem_loss(p, lp, s, ls, LOSS: tl.constexpr):
    """The row loss's term at one entry, for every type but js (:func:`_js_terms`)."""
    if LOSS == _L.CE or LOSS == _L.CE_SOFT_FWD:
        e = _wmul(p, -ls)
    elif LOSS == _L.CE_SOFT_BWD:
        e = _wmul(s, -lp)
    elif LOSS == _L.KL_FWD:
        e = _wmul(p, lp - ls)
    else:
        e = _wmul(s, ls - lp)
    return e


@triton.jit
def _js_terms(p, lp, s, ls, beta, log_b, log_1mb):
    """js at one entry, with log m computed once: the row loss's term ``β·KL(P‖M) + (1-β)·KL(Q‖M)``
    and the term of the row scalar its gradient needs, ``K = KL(Q‖M) = Σ s (log s - log m)``, both
    as :func:`_kl_to_mix`."""
    lm = _log_m(lp, ls, log_b, log_1mb)
    e_p, _, _ = _kl_to_mix(p, lp, s, lm, 1.0 - beta)
    e_s, _, _ = _kl_to_mix(s, ls, p, lm, beta)
    return beta * e_p + (1.0 - beta) * e_s, e_s


@triton.jit
def _row_terms(p, lp, s, ls, beta, log_b, log_1mb, LOSS: tl.constexpr):
    """A tile's contribution to the row loss and, for js, to ``K`` (0 otherwise)."""
    if LOSS == _L.JS:
        e, e_aux = _js_terms(p, lp, s, ls, beta, log_b, log_1mb)
        return tl.sum(e, axis=1), tl.sum(e_aux, axis=1)
    row = tl.sum(_elem_loss(p, lp, s, ls, LOSS), axis=1)
    return row, tl.zeros_like(row)


@triton.jit
def _elem_grad(p, lp, s, ls, valid, row_loss, row_aux, beta, log_b, log_1mb, LOSS: tl.constexpr):
    if LOSS == _L.CE or LOSS == _L.CE_SOFT_FWD or LOSS == _L.KL_FWD:
        g = s - p
    elif LOSS == _L.CE_SOFT_BWD:
        g = _wmul(s, -row_loss[:, None] - lp)
    elif LOSS == _L.KL_BWD:
        g = _wmul(s, ls - lp - row_loss[:, None])
    else:
        # log(s/m) = -log(1 + u) = φ(u) - u, exact where the series applies (u ~ β as β -> 0)
        lm = _log_m(lp, ls, log_b, log_1mb)
        _, small, u = _kl_to_mix(s, ls, p, lm, beta)
        log_sm = tl.where(small, _phi_series(u) - u, ls - lm)
        g = _wmul(s, (1.0 - beta) * (log_sm - row_aux[:, None]))
    if LOSS == _L.CE_SOFT_BWD or LOSS == _L.KL_BWD:
        # A row whose loss overflowed or is NaN has no gradient: NaN at its valid entries, as autograd gives.
        bad = (tl.abs(row_loss) < float("inf")) == 0  # NaN too
        g = tl.where(valid & bad[:, None], float("nan"), g)
    return g


@triton.jit
def _sp_rows(
    q_ptr, z_ptr, grad_ptr, status_ptr, rows,
    N, A, stride_q, stride_z, stride_g, inv_t, eps, beta, log_b, log_1mb,
    LOSS: tl.constexpr, GRAD_NEEDS_ROW_LOSS: tl.constexpr, HAS_SMOOTHING: tl.constexpr, ROWS: tl.constexpr,
    BLOCK_A: tl.constexpr, SINGLE_TILE: tl.constexpr,
):
    """The losses of the ``ROWS`` rows ``rows`` (returned), their gradients and the teacher's status
    codes (stored)."""
    rmask = rows < N
    rows64 = rows.to(tl.int64)
    cols0 = tl.arange(0, BLOCK_A)
    mt = tl.full([ROWS], float("-inf"), tl.float32)
    mz = tl.full([ROWS], float("-inf"), tl.float32)
    st = tl.zeros([ROWS], tl.float32)
    sz = tl.zeros([ROWS], tl.float32)
    n_valid = tl.zeros([ROWS], tl.float32)
    best = tl.full([ROWS], float("-inf"), tl.float32)
    target = tl.zeros([ROWS], tl.int32)
    row_loss = tl.zeros([ROWS], tl.float32)
    row_aux = tl.zeros([ROWS], tl.float32)
    g_row = grad_ptr + rows64[:, None] * stride_g
    if SINGLE_TILE:
        # The whole row is in registers: every input byte is read once.
        q, z, valid, mask = _load_tile(q_ptr, z_ptr, rows64, rmask, cols0, A, stride_q, stride_z)
        mt, st = online_lse_update(mt, st, q, inv_t, False)
        mz, sz = online_lse_update(mz, sz, z, 1.0, False)
        n_valid = tl.maximum(tl.sum(valid.to(tl.float32), axis=1), 1.0)  # >= 1 keeps rows past N finite
        if LOSS == _L.CE:
            target = tl.argmax(tl.where(q == q, q, float("-inf")), axis=1).to(tl.int32)  # a NaN teacher is an error
        p, lp, s, ls = _probs(q, z, valid, cols0, mt, fast_log(st), mz, fast_log(sz), n_valid, target, inv_t, eps,
                              LOSS, HAS_SMOOTHING)
        row_loss, row_aux = _row_terms(p, lp, s, ls, beta, log_b, log_1mb, LOSS)
        g = _elem_grad(p, lp, s, ls, valid, row_loss, row_aux, beta, log_b, log_1mb, LOSS)
        tl.store(g_row + cols0[None, :], g.to(grad_ptr.dtype.element_ty), mask=mask)
    else:
        for start in range(0, A, BLOCK_A):
            cols = start + cols0
            q, z, valid, mask = _load_tile(q_ptr, z_ptr, rows64, rmask, cols, A, stride_q, stride_z)
            mt, st = online_lse_update(mt, st, q, inv_t, False)
            mz, sz = online_lse_update(mz, sz, z, 1.0, False)
            n_valid += tl.sum(valid.to(tl.float32), axis=1)
            if LOSS == _L.CE:
                key = tl.where(q == q, q, float("-inf"))  # a NaN teacher is reported by the loss; no crash here
                tile_best = tl.max(key, axis=1)
                tile_arg = tl.argmax(key, axis=1).to(tl.int32) + start
                better = tile_best > best  # strict: ties keep the lowest index, as torch.argmax
                target = tl.where(better, tile_arg, target)
                best = tl.maximum(best, tile_best)
        n_valid = tl.maximum(n_valid, 1.0)
        lse_t = fast_log(st)
        lse_z = fast_log(sz)
        for start in range(0, A, BLOCK_A):
            cols = start + cols0
            q, z, valid, mask = _load_tile(q_ptr, z_ptr, rows64, rmask, cols, A, stride_q, stride_z)
            p, lp, s, ls = _probs(q, z, valid, cols, mt, lse_t, mz, lse_z, n_valid, target, inv_t, eps, LOSS,
                                  HAS_SMOOTHING)
            tile_loss, tile_aux = _row_terms(p, lp, s, ls, beta, log_b, log_1mb, LOSS)
            row_loss += tile_loss
            row_aux += tile_aux
            if not GRAD_NEEDS_ROW_LOSS:  # write the gradient in this pass
                g = _elem_grad(p, lp, s, ls, valid, row_loss, row_aux, beta, log_b, log_1mb, LOSS)
                tl.store(g_row + cols[None, :], g.to(grad_ptr.dtype.element_ty), mask=mask)
        if GRAD_NEEDS_ROW_LOSS:
            for start in range(0, A, BLOCK_A):
                cols = start + cols0
                q, z, valid, mask = _load_tile(q_ptr, z_ptr, rows64, rmask, cols, A, stride_q, stride_z)
                p, lp, s, ls = _probs(q, z, valid, cols, mt, lse_t, mz, lse_z, n_valid, target, inv_t, eps,
                                      LOSS, HAS_SMOOTHING)
                g = _elem_grad(p, lp, s, ls, valid, row_loss, row_aux, beta, log_b, log_1mb, LOSS)
                tl.store(g_row + cols[None, :], g.to(grad_ptr.dtype.element_ty), mask=mask)
    # The teacher's input checks, from the sum it had anyway: NaN or +inf anywhere in the row makes the
    # sum of exp((q - max)/T) NaN (exp(inf - inf) for +inf); a row of -inf only leaves it 0; otherwise
    # the max contributes exp(0) = 1, so the sum is >= 1. No per-element work, no second read of q.
    status = tl.where(st != st, 1, tl.where(st == 0.0, 2, 0))
    tl.store(status_ptr + rows, status.to(tl.int8), mask=rmask)
    return row_loss


@triton.jit
def _sp_fwd_kernel(
    q_ptr, z_ptr, loss_ptr, grad_ptr, status_ptr,
    N, A, stride_q, stride_z, stride_g, inv_t, eps, beta, log_b, log_1mb, mean_mult,
    LOSS: tl.constexpr, GRAD_NEEDS_ROW_LOSS: tl.constexpr, HAS_SMOOTHING: tl.constexpr, ROWS: tl.constexpr,
    BLOCK_A: tl.constexpr, SINGLE_TILE: tl.constexpr, MEAN: tl.constexpr,
):
    """Each program's ``ROWS`` rows; with ``MEAN``, one program walks every row tile in order and
    stores ``Σ row_loss · mean_mult`` (a mean times its factor) at ``loss_ptr``: a fixed order of
    sums, and no second launch for the mean."""
    if MEAN:
        acc = tl.zeros([ROWS], tl.float32)
        for r0 in range(0, N, ROWS):
            rows = r0 + tl.arange(0, ROWS)
            row_loss = _sp_rows(q_ptr, z_ptr, grad_ptr, status_ptr, rows, N, A, stride_q, stride_z, stride_g, inv_t,
                                eps, beta, log_b, log_1mb, LOSS, GRAD_NEEDS_ROW_LOSS, HAS_SMOOTHING, ROWS, BLOCK_A,
                                SINGLE_TILE)
            acc += tl.where(rows < N, row_loss, 0.0)
        tl.store(loss_ptr, tl.sum(acc, axis=0) * mean_mult)
    else:
        rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
        row_loss = _sp_rows(q_ptr, z_ptr, grad_ptr, status_ptr, rows, N, A, stride_q, stride_z, stride_g, inv_t, eps,
                            beta, log_b, log_1mb, LOSS, GRAD_NEEDS_ROW_LOSS, HAS_SMOOTHING, ROWS, BLOCK_A, SINGLE_TILE)
        tl.store(loss_ptr + rows, row_loss, mask=rows < N)


@triton.jit
def _sp_bwd_kernel(g_ptr, scale_ptr, out_ptr, N, A, stride_g, stride_o, stride_s, mult,
                   ROWS: tl.constexpr, BLOCK_A: tl.constexpr):
    """``out[r, :] = g[r, :] * scale[r] * mult`` in fp32, one read and one write of the gradient;
    ``stride_s = 0`` reads one upstream scalar for every row (a mean's, ``mult = 1/N``)."""
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    cols = tl.program_id(1) * BLOCK_A + tl.arange(0, BLOCK_A)
    rows64 = rows.to(tl.int64)
    mask = (rows < N)[:, None] & (cols < A)[None, :]
    scale = tl.load(scale_ptr + rows64 * stride_s, mask=rows < N, other=0.0).to(tl.float32) * mult
    g = tl.load(g_ptr + rows64[:, None] * stride_g + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + rows64[:, None] * stride_o + cols[None, :],
             (g * scale[:, None]).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _topk_teacher(idx_ptr, lp_ptr, row64, K, V, stride_i, stride_l, inv_t, BLOCK_K: tl.constexpr):
    """The teacher's used slots of one row (index in ``[0, V)``; ``-1`` marks an unused slot) and
    their ``p = softmax(logprob / T)`` and ``log p``, renormalised over the used slots; 0 elsewhere,
    and 0 everywhere in a row with no used slot or whose used slots are all ``-inf``. The row max
    is subtracted before the temperature scales the differences, so values near ``finfo.min``
    cannot overflow at ``T < 1``. A NaN or ``+inf`` at a used slot makes the row's ``p`` NaN."""
    offs_k = tl.arange(0, BLOCK_K)
    kmask = offs_k < K
    idx = tl.load(idx_ptr + row64 * stride_i + offs_k, mask=kmask, other=-1).to(tl.int64)
    used = kmask & (idx >= 0) & (idx < V)  # an index out of range is reported by the caller, never read
    v = tl.where(used, tl.load(lp_ptr + row64 * stride_l + offs_k, mask=used, other=0.0).to(tl.float32),
                 float("-inf"))
    nan_probe = tl.sum(tl.where(v != v, v, 0.0), axis=0)  # tl.max skips NaN on the GPU
    mx = tl.max(v, axis=0) + nan_probe
    mx = tl.where(mx == float("-inf"), 0.0, mx)  # no used slot, or all at -inf: no NaN from -inf - -inf
    x = (v - mx) * inv_t
    e = tl.where(used, fast_exp(x), 0.0)
    total = tl.sum(e, axis=0)
    # every used slot at -inf: no mass, p = 0 (no 0/0); a NaN total (NaN or +inf in) makes every p NaN
    p = tl.where(used, e / tl.where(total != 0.0, total, float("inf")), 0.0)
    lp = tl.where(used, x - fast_log(total), 0.0)
    return tl.where(used, idx, 0), used, p, lp


@triton.jit
def _slot_mass(idx, used, p, K, BLOCK_K: tl.constexpr):
    """The teacher mass at each slot's action, summed over the slots that name it: ``p`` itself,
    bit for bit, where an index is not repeated; the same sum at each of a repeated index's slots,
    so that their gradient stores agree (a repeat is an error only with ``check_inputs``)."""
    offs_k = tl.arange(0, BLOCK_K)
    mass = tl.zeros([BLOCK_K], tl.float32)
    for j in range(0, K):
        at_j = offs_k == j
        idx_j = tl.sum(tl.where(at_j, idx, 0), axis=0)
        p_j = tl.sum(tl.where(at_j, p, 0.0), axis=0)  # 0 at an unused slot: adding it changes nothing
        mass += tl.where(used & (idx == idx_j), p_j, 0.0)
    return mass


@triton.jit
def _sp_topk_fwd_kernel(
    idx_ptr, lp_ptr, z_ptr, loss_ptr, grad_ptr,
    V, K, stride_i, stride_l, stride_z, stride_g, inv_t,
    LOSS: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_V: tl.constexpr, SINGLE_TILE: tl.constexpr,
):
    """One row per program: the student's log-softmax over ``V`` (online max/sum over the tiles),
    ``kl-fwd`` (``Σ p (log p - log s[idx])``) or ``ce-soft-fwd`` (``-Σ p log s[idx]``) over the
    teacher's ``k`` slots, and the gradient ``s·Σp - scatter_add(p)``: ``s·Σp`` is written over the
    row, then, after a barrier, the ``k`` teacher slots are rewritten with ``s·Σp`` minus the mass
    of their action (:func:`_slot_mass`)."""
    row64 = tl.program_id(0).to(tl.int64)
    idx, used, p, lp = _topk_teacher(idx_ptr, lp_ptr, row64, K, V, stride_i, stride_l, inv_t, BLOCK_K)
    psum = tl.sum(p, axis=0)
    z_row = z_ptr + row64 * stride_z
    g_row = grad_ptr + row64 * stride_g
    cols0 = tl.arange(0, BLOCK_V)
    mz = tl.full([1], float("-inf"), tl.float32)
    sz = tl.zeros([1], tl.float32)
    if SINGLE_TILE:
        vm = cols0 < V
        z = tl.load(z_row + cols0, mask=vm, other=float("-inf")).to(tl.float32)
        mz, sz = online_lse_update(mz, sz, z[None, :], 1.0, False)
        s = fast_exp(z - mz - fast_log(sz))
        tl.store(g_row + cols0, (s * psum).to(grad_ptr.dtype.element_ty), mask=vm)
    else:
        for start in range(0, V, BLOCK_V):
            cols = start + cols0
            z = tl.load(z_row + cols, mask=cols < V, other=float("-inf")).to(tl.float32)
            mz, sz = online_lse_update(mz, sz, z[None, :], 1.0, False)
        for start in range(0, V, BLOCK_V):
            cols = start + cols0
            vm = cols < V
            z = tl.load(z_row + cols, mask=vm, other=float("-inf")).to(tl.float32)
            s = fast_exp(z - mz - fast_log(sz))
            tl.store(g_row + cols, (s * psum).to(grad_ptr.dtype.element_ty), mask=vm)
    lse_z = tl.sum(mz + fast_log(sz), axis=0)
    ls = tl.where(used, tl.load(z_row + idx, mask=used, other=0.0).to(tl.float32) - lse_z, 0.0)
    if LOSS == _L.KL_FWD:
        row_loss = tl.sum(_wmul(p, lp - ls), axis=0)
    else:
        row_loss = tl.sum(_wmul(p, -ls), axis=0)
    mass = _slot_mass(idx, used, p, K, BLOCK_K)
    tl.debug_barrier()  # the row's s·Σp stores land before the teacher slots are rewritten
    tl.store(g_row + idx, (fast_exp(ls) * psum - mass).to(grad_ptr.dtype.element_ty), mask=used)
    tl.store(loss_ptr + row64, row_loss)


_FP32_MAX = torch.finfo(torch.float32).max


def _inv_temperature(temperature: float) -> float:
    """``1/T`` as the kernels' fp32 scalar, at most ``finfo(float32).max``: below ``T ~ 3e-39`` it
    would overflow to inf and make ``0·inf = NaN`` at the row max; the largest finite factor still
    gives the one-hot teacher that the limit ``T -> 0`` is."""
    return min(1.0 / float(temperature), _FP32_MAX)


def _fwd_tiles(A: int, max_block: int = MAX_BLOCK):
    """(BLOCK_A, ROWS, num_warps). Short rows pack into tiles of about 1K elements; ptxas -v on
    sm_90 (tests/compile_check.py) shows no spills for these choices."""
    block = min(next_power_of_2(A), max_block)
    rows = max(1, min(64, 1024 // block)) if block >= A else 1
    warps = 8 if rows * block <= 4096 else 16
    return block, rows, warps


def _bwd_tiles(A: int):
    """(BLOCK_A, ROWS): tiles of at most 4K elements over 4 warps."""
    block = min(next_power_of_2(A), 4096)
    return block, max(1, min(64, 4096 // block))


def _warps_for_the_tile(configs, named_args, **kwargs):
    """Autotune pruning for a row in one tile: the warps that give each thread 1 to 16 of the
    tile's elements (more would spill; fewer would idle threads)."""
    tile = kwargs["ROWS"] * kwargs["BLOCK_A"]
    return [c for c in configs if 32 * c.num_warps <= tile <= 512 * c.num_warps] or configs[-1:]


# The autotune spaces (FUSEDLOSS_AUTOTUNE=1; fusedloss.kernels._common.Tuned), keyed on the row
# length, the loss and smoothing. A row in one tile tunes its warps; a longer row, its tile width
# (at 16 elements a thread: 4096 over 16 warps spilled 12 bytes in js on sm_90, Triton 3.9), and
# the pipeline stages.
_SP_FWD_TILE = Tuned(_sp_fwd_kernel, [triton.Config({}, num_warps=w) for w in (4, 8, 16)],
                     key=["A", "LOSS", "HAS_SMOOTHING"], prune=_warps_for_the_tile)
_SP_FWD_LONG = Tuned(_sp_fwd_kernel, [triton.Config({"ROWS": 1, "BLOCK_A": b, "SINGLE_TILE": False}, num_warps=w,
                                                    num_stages=s)
                                      for b, w in ((2048, 4), (4096, 8), (8192, 16)) for s in (2, 3)],
                     key=["A", "LOSS", "HAS_SMOOTHING"], prune=tiles_narrower_than("A", "BLOCK_A"))
_SP_BWD_WIDE = Tuned(_sp_bwd_kernel, [triton.Config({"ROWS": r, "BLOCK_A": b}, num_warps=w)
                                      for r, b, w in ((1, 4096, 4), (1, 4096, 8), (2, 2048, 4), (1, 8192, 8))],
                     key=["A"])
BWD_TUNED_FROM = 4096  # rows at least this wide tune the backward's tiles; narrower ones pack rows as _bwd_tiles does


# A mean over few short rows is taken inside the forward kernel: one program walks at most
# MEAN_TILES tiles of up to MEAN_TILE elements, or of one row where a row is wider (rows of one
# tile only, so at most 8192 wide), so the loss costs one launch instead of the kernel and a mean.
# Its loop is latency-bound; four tiles was chosen without a GPU, as about one launch's time, and
# waits for the GPU run to be calibrated.
MEAN_TILE = 4096
MEAN_TILES = 4


def _mean_rows(N: int, A: int, max_block: int = MAX_BLOCK) -> int:
    """The rows per tile of an in-kernel mean over ``N`` rows of ``A``, or 0 where the mean is
    not taken in the kernel (an empty batch, rows longer than one tile, more than MEAN_TILES tiles)."""
    block = min(next_power_of_2(A), max_block)
    rows = max(1, min(128, MEAN_TILE // block))
    return rows if N >= 1 and block >= A and N <= rows * MEAN_TILES else 0


def _fwd_constexprs(loss_type: str, label_smoothing: float, A: int, max_block: int = MAX_BLOCK, mean_rows: int = 0):
    block, rows, warps = _fwd_tiles(A, max_block)
    if mean_rows:
        rows, warps = mean_rows, 8 if mean_rows * block < MEAN_TILE else 16  # 4096 over 8 warps spilled in js
    code = SpLossType.of(loss_type)
    return dict(LOSS=int(code), GRAD_NEEDS_ROW_LOSS=code in _GRAD_NEEDS_ROW_LOSS, HAS_SMOOTHING=label_smoothing > 0.0,
                ROWS=rows, BLOCK_A=block, SINGLE_TILE=block >= A, MEAN=bool(mean_rows)), warps


@launcher
def sp_fwd(q: torch.Tensor, z: torch.Tensor, loss_type: str, temperature: float, label_smoothing: float,
           max_block: int = MAX_BLOCK, loss_out: torch.Tensor | None = None, grad_out: torch.Tensor | None = None,
           js_beta: float = 0.5, status_out: torch.Tensor | None = None, mean_scale: float | None = None):
    """Launch the forward kernel on ``[N, A]`` teacher values and student logits.

    ``js_beta`` is the β of ``"js"`` (strictly inside (0, 1)).
    Returns ``(row_loss fp32 [N], grad [N, A], status int8 [N])``: the gradient of each row's loss
    with respect to its logits, in ``z.dtype`` (fp32 for fp16 ``z``: :func:`stored_grad_dtype`),
    and the teacher's checks per row: 1 where the row holds NaN or ``+inf``, 2 where every entry is
    ``-inf``, 0 otherwise. ``loss_out``, ``grad_out`` and ``status_out`` let tests hand in poisoned
    buffers. With ``mean_scale``, where :func:`mean_in_kernel` holds, the first is instead the 0-d
    mean of the row losses times ``mean_scale``, taken in the kernel.
    """
    q, z = last_dim_contiguous(q), last_dim_contiguous(z)
    N, A = z.shape
    mean_rows = _mean_rows(N, A, max_block) if mean_scale is not None else 0
    if loss_out is None:
        loss = torch.empty(() if mean_rows else N, dtype=torch.float32, device=z.device)
    elif loss_out.shape != (() if mean_rows else (N,)):
        want = "() (the mean)" if mean_rows else (N,)
        raise ValueError(f"loss_out must have shape {want}, got {tuple(loss_out.shape)}")
    else:
        loss = loss_out
    grad = torch.empty(z.shape, dtype=stored_grad_dtype(z.dtype), device=z.device) if grad_out is None else grad_out
    status = torch.empty(N, dtype=torch.int8, device=z.device) if status_out is None else status_out
    constexprs, warps = _fwd_constexprs(loss_type, label_smoothing, A, max_block, mean_rows)
    args = (q, z, loss, grad, status, N, A, q.stride(0), z.stride(0), grad.stride(0), _inv_temperature(temperature),
            float(label_smoothing), float(js_beta), math.log(js_beta), math.log1p(-js_beta),
            float(mean_scale) / N if mean_rows else 0.0)
    if mean_rows:  # one program: nothing for the tuner to choose between
        _sp_fwd_kernel[(1,)](*args, num_warps=warps, **constexprs)
    else:
        space = _SP_FWD_TILE if constexprs["SINGLE_TILE"] else _SP_FWD_LONG
        space(lambda meta: (cdiv(N, meta["ROWS"]),), *args, num_warps=warps, **constexprs)
    return loss, grad, status


def mean_in_kernel(N: int, A: int, mean_scale: float | None, max_block: int = MAX_BLOCK) -> bool:
    """Whether :func:`sp_fwd` with ``mean_scale`` returns the mean (a few rows of one tile each)."""
    return mean_scale is not None and _mean_rows(N, A, max_block) > 0


TOPK_MAX_BLOCK = 8192
_TOPK_CODES = (SpLossType.KL_FWD, SpLossType.CE_SOFT_FWD)  # the codes the top-k kernel implements


def _topk_constexprs(loss_type: str, K: int, V: int, max_block: int = TOPK_MAX_BLOCK):
    block = min(next_power_of_2(V), max_block)
    # 16 warps at BLOCK_V = 8192 spilled 4 to 12 bytes on sm_90 with the runtime's divisibility
    # specialisation (Triton 3.9); 8 warps do not.
    warps = 4 if block <= 1024 else 8
    return dict(LOSS=int(SpLossType.of(loss_type)), BLOCK_K=next_power_of_2(K), BLOCK_V=block,
                SINGLE_TILE=block >= V), warps


# A row longer than one tile tunes its tile width and warps (FUSEDLOSS_AUTOTUNE=1); 16 warps at 8192
# spilled (above), so 8192 runs on 8.
_SP_TOPK_LONG = Tuned(_sp_topk_fwd_kernel, [triton.Config({"BLOCK_V": b, "SINGLE_TILE": False}, num_warps=w)
                                            for b, w in ((2048, 4), (4096, 4), (4096, 8), (8192, 8))],
                      key=["V", "K", "LOSS"], prune=tiles_narrower_than("V", "BLOCK_V"))


@launcher
def sp_topk_fwd(index: torch.Tensor, logprob: torch.Tensor, z: torch.Tensor, loss_type: str, temperature: float,
                max_block: int = TOPK_MAX_BLOCK, loss_out: torch.Tensor | None = None,
                grad_out: torch.Tensor | None = None):
    """Launch the top-k teacher forward: ``index`` int ``[N, k]`` (``-1`` unused), ``logprob``
    ``[N, k]`` and student logits ``z`` ``[N, V]``. Returns ``(row_loss fp32 [N], grad [N, V])``
    in ``z.dtype`` (fp32 for fp16). Byte model: read ``z`` once and write the gradient once when a
    row fits one tile (``V <= max_block``), read ``z`` twice otherwise, plus ``O(k)`` per row; the
    teacher is never densified."""
    if loss_type not in [c.loss_type for c in _TOPK_CODES]:
        raise ValueError(f"the top-k kernel implements loss_type in {[c.loss_type for c in _TOPK_CODES]}, "
                         f"got {loss_type!r}.")
    index, logprob, z = last_dim_contiguous(index), last_dim_contiguous(logprob), last_dim_contiguous(z)
    N, V = z.shape
    K = index.shape[1]
    loss = torch.empty(N, dtype=torch.float32, device=z.device) if loss_out is None else loss_out
    grad = torch.empty(z.shape, dtype=stored_grad_dtype(z.dtype), device=z.device) if grad_out is None else grad_out
    constexprs, warps = _topk_constexprs(loss_type, K, V, max_block)
    if N:
        args = (index, logprob, z, loss, grad, V, K, index.stride(0), logprob.stride(0), z.stride(0), grad.stride(0),
                _inv_temperature(temperature))
        if constexprs["SINGLE_TILE"]:
            _sp_topk_fwd_kernel[(N,)](*args, num_warps=warps, **constexprs)
        else:
            _SP_TOPK_LONG((N,), *args, num_warps=warps, **constexprs)
    return loss, grad


@launcher
def sp_bwd(g: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype, mult: float = 1.0) -> torch.Tensor:
    """``g`` ``[N, A]`` with row ``r`` scaled by ``scale[r] * mult`` (the upstream gradient of row
    ``r``; a 0-d ``scale`` is every row's, as a mean's with ``mult = 1/N``), in ``dtype``. ``scale``
    is read in place, at any stride."""
    N, A = g.shape
    out = torch.empty((N, A), dtype=dtype, device=g.device)
    block, rows = _bwd_tiles(A)
    args = (g, scale, out, N, A, g.stride(0), out.stride(0), scale.stride(0) if scale.dim() else 0, float(mult))
    meta = {"ROWS": rows, "BLOCK_A": block, "num_warps": 4}
    if A >= BWD_TUNED_FROM:
        _SP_BWD_WIDE(lambda m: (cdiv(N, m["ROWS"]), cdiv(A, m["BLOCK_A"])), *args, **meta)
    else:
        _sp_bwd_kernel[(cdiv(N, rows), cdiv(A, block))](*args, **meta)
    return out


# torch.library custom ops, so that torch.compile(fullgraph=True) traces calls without graph breaks. Their
# schemas hold what a call needs; the tile limits (max_block) are arguments of the launchers alone,
# where the tests set them.
@torch.library.custom_op("fusedloss::sp_fwd", mutates_args=())
def _sp_fwd_op(q: torch.Tensor, z: torch.Tensor, loss_type: str, temperature: float, label_smoothing: float,
               js_beta: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return sp_fwd(q, z, loss_type, temperature, label_smoothing, js_beta=js_beta)


@_sp_fwd_op.register_fake
def _(q, z, loss_type, temperature, label_smoothing, js_beta):
    return (z.new_empty(z.shape[0], dtype=torch.float32),
            torch.empty(z.shape, dtype=stored_grad_dtype(z.dtype), device=z.device),
            z.new_empty(z.shape[0], dtype=torch.int8))


@torch.library.custom_op("fusedloss::sp_bwd", mutates_args=())
def _sp_bwd_op(g: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return sp_bwd(g, scale, dtype)


@_sp_bwd_op.register_fake
def _(g, scale, dtype):
    return torch.empty(g.shape, dtype=dtype, device=g.device)


def _setup(ctx, inputs, output):
    ctx.dtype = inputs[1].dtype
    # The stored gradient stays differentiable, so a double backward reaches no_double_backward's clear error;
    # it gets no gradient of its own, and no zero-filled [N, A] for it in backward.
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(output[1])


def _backward(ctx, grad_rows, grad_grad, grad_status=None):
    (g,) = ctx.saved_tensors
    return None, None if grad_rows is None else _sp_bwd_op(g, grad_rows, ctx.dtype), None, None, None, None


_sp_fwd_op.register_autograd(_backward, setup_context=_setup)
no_double_backward(_sp_bwd_op, "sp")


@torch.library.custom_op("fusedloss::sp_topk_fwd", mutates_args=())
def _sp_topk_fwd_op(index: torch.Tensor, logprob: torch.Tensor, z: torch.Tensor, loss_type: str,
                    temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    return sp_topk_fwd(index, logprob, z, loss_type, temperature)


@_sp_topk_fwd_op.register_fake
def _(index, logprob, z, loss_type, temperature):
    return (z.new_empty(z.shape[0], dtype=torch.float32),
            torch.empty(z.shape, dtype=stored_grad_dtype(z.dtype), device=z.device))


def _topk_setup(ctx, inputs, output):
    ctx.dtype = inputs[2].dtype
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(output[1])


def _topk_backward(ctx, grad_rows, grad_grad):
    (g,) = ctx.saved_tensors
    return None, None, None if grad_rows is None else _sp_bwd_op(g, grad_rows, ctx.dtype), None, None


_sp_topk_fwd_op.register_autograd(_topk_backward, setup_context=_topk_setup)


# Eager calls skip the custom ops: their dispatch (schema checks, the autograd wrapper, Dynamo's disable guard)
# costs far more host time than these launches. The custom ops are what torch.compile traces.
class _RowsBackward:
    """The backward both eager forwards share: the stored gradient times each row's upstream gradient
    (times ``ctx.mult``; the one upstream scalar of a mean, read in place by the kernel)."""

    @staticmethod
    def backward(ctx, grad_rows, _grad_status=None):
        if grad_rows is None:
            return (None,) * ctx.n_inputs
        (g,) = ctx.saved_tensors
        dz = fused_backward("sp", sp_bwd, g, grad_rows, ctx.dtype, ctx.mult)
        return tuple(dz if i == ctx.z_index else None for i in range(ctx.n_inputs))


def _rows_or_mean(ctx, rows: torch.Tensor, mean_scale: float | None, N: int) -> torch.Tensor:
    """:func:`_mean_times` in an eager forward (unless the kernel took the mean: a 0-d ``rows``),
    with the backward kernel's factor in ``ctx.mult``: the mean is at most one aten op in the
    forward (two when the factor is not 1) and none in the backward."""
    ctx.mult = 1.0 if mean_scale is None else float(mean_scale) / N
    return rows if rows.dim() == 0 else _mean_times(rows, mean_scale)


class _SpFwdFunction(_RowsBackward, torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, z, loss_type, temperature, label_smoothing, js_beta, mean_scale):
        rows, grad, status = sp_fwd(q, z, loss_type, temperature, label_smoothing, js_beta=js_beta,
                                    mean_scale=mean_scale)
        ctx.dtype, ctx.z_index, ctx.n_inputs = z.dtype, 1, 7
        ctx.set_materialize_grads(False)
        ctx.mark_non_differentiable(status)
        ctx.save_for_backward(grad)
        return _rows_or_mean(ctx, rows, mean_scale, z.shape[0]), status


class _SpTopkFwdFunction(_RowsBackward, torch.autograd.Function):
    @staticmethod
    def forward(ctx, index, logprob, z, loss_type, temperature, mean_scale):
        rows, grad = sp_topk_fwd(index, logprob, z, loss_type, temperature)
        ctx.dtype, ctx.z_index, ctx.n_inputs = z.dtype, 2, 6
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(grad)
        return _rows_or_mean(ctx, rows, mean_scale, z.shape[0])


def _transformed(z: torch.Tensor) -> bool:
    """Whether ``z`` is a torch.func wrapper (``vmap``'s batched tensor and the like): then the
    custom op, which has their fallbacks, runs instead of the eager Function."""
    return torch._C._functorch.is_functorch_wrapped_tensor(z)


def _mean_times(rows: torch.Tensor, mean_scale: float | None) -> torch.Tensor:
    """The per-row losses, or with ``mean_scale`` their mean times it."""
    if mean_scale is None:
        return rows
    return rows.mean() * mean_scale if mean_scale != 1.0 else rows.mean()


def sp_fused(q: torch.Tensor, z: torch.Tensor, loss_type: str, temperature: float, label_smoothing: float,
             js_beta: float = 0.5, mean_scale: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row losses ``[N]`` (fp32) of ``[N, A]`` teacher values ``q`` and student logits ``z``
    through the kernel, and the teacher's per-row check codes (``status`` of :func:`sp_fwd`); the
    teacher gets no gradient. With ``mean_scale``, the rows' mean times it (0-d) instead of the rows:
    its backward is the one scaling launch, with no ``div`` of the mean's gradient before it."""
    if torch.compiler.is_compiling() or _transformed(z):
        reject_grad_transforms("sp", z)
        rows, _, status = _sp_fwd_op(q.detach(), z, loss_type, float(temperature), float(label_smoothing),
                                     float(js_beta))
        return _mean_times(rows, mean_scale), status
    return _SpFwdFunction.apply(q.detach(), z, loss_type, float(temperature), float(label_smoothing), float(js_beta),
                                mean_scale)


def sp_op(q: torch.Tensor, z: torch.Tensor, loss_type: str, temperature: float, label_smoothing: float,
          js_beta: float = 0.5):
    """``(row_loss fp32 [N], grad [N, A])`` of :func:`sp_fwd` through its custom op, for callers
    that use the gradient themselves (``sp_linear_loss``), so ``torch.compile`` traces the call."""
    rows, grad, _ = _sp_fwd_op(q, z, loss_type, float(temperature), float(label_smoothing), float(js_beta))
    return rows, grad


def sp_topk_op(index: torch.Tensor, logprob: torch.Tensor, z: torch.Tensor, loss_type: str, temperature: float):
    """``(row_loss fp32 [N], grad [N, V])`` of :func:`sp_topk_fwd` through its custom op."""
    return _sp_topk_fwd_op(index, logprob, z, loss_type, float(temperature))


def sp_topk_fused(index: torch.Tensor, logprob: torch.Tensor, z: torch.Tensor, loss_type: str,
                  temperature: float, mean_scale: float | None = None) -> torch.Tensor:
    """Per-row losses ``[N]`` (fp32) of a top-k teacher against student logits ``z`` ``[N, V]``
    through the kernel, or their mean times ``mean_scale`` (as :func:`sp_fused`); the teacher gets
    no gradient."""
    if torch.compiler.is_compiling() or _transformed(z):
        reject_grad_transforms("sp", z)
        rows, _ = _sp_topk_fwd_op(index, logprob.detach(), z, loss_type, float(temperature))
        return _mean_times(rows, mean_scale)
    return _SpTopkFwdFunction.apply(index, logprob.detach(), z, loss_type, float(temperature), mean_scale)


def _fwd_signature(dt: str):
    """The forward kernel's AOT signature, for constexprs ``c``, in dtype ``dt``."""
    t = {"inv_t": "fp32", "eps": "fp32", "beta": "fp32", "log_b": "fp32", "log_1mb": "fp32", "mean_mult": "fp32",
         "q_ptr": f"*{dt}", "z_ptr": f"*{dt}", "loss_ptr": "*fp32", "grad_ptr": f"*{dt}", "status_ptr": "*i8"}
    return lambda c: signature(_sp_fwd_kernel, t, c)


def _topk_signature(dt: str):
    t = {"idx_ptr": "*i64", "lp_ptr": f"*{dt}", "z_ptr": f"*{dt}", "loss_ptr": "*fp32", "grad_ptr": f"*{dt}",
         "inv_t": "fp32"}
    return lambda c: signature(_sp_topk_fwd_kernel, t, c)


def _bwd_signature(c):
    return signature(_sp_bwd_kernel, {"g_ptr": "*bf16", "scale_ptr": "*fp32", "out_ptr": "*bf16", "mult": "fp32"}, c)


def _fwd_ints(A: int) -> dict:
    return {"N": 8192, "A": A, "stride_q": A, "stride_z": A, "stride_g": A}


def _topk_ints(V: int) -> dict:
    return {"V": V, "K": 64, "stride_i": 64, "stride_l": 64, "stride_z": V, "stride_g": V}


def compile_variants():
    """Every tile shape the launcher picks for these row lengths, in bf16 and fp32, then every
    autotune config (:func:`tuned_variants`)."""
    for A in (18, 256, 4096, 32768, 131072):
        for dt in ("bf16", "fp32"):
            for code in (SpLossType.CE, SpLossType.CE_SOFT_FWD, SpLossType.JS):
                c, warps = _fwd_constexprs(code.loss_type, 0.1, A)
                yield AotVariant(f"sp A={A} {dt} {code.loss_type}", _sp_fwd_kernel, _fwd_signature(dt)(c), c, warps,
                                 _fwd_ints(A))
    for V in (256, 32768, 131072):
        for dt in ("bf16", "fp32"):
            c, warps = _topk_constexprs("kl-fwd", 64, V)
            yield AotVariant(f"sp top-k A={V} {dt} k=64", _sp_topk_fwd_kernel, _topk_signature(dt)(c), c, warps,
                             _topk_ints(V))
    for A in (2, 18, 256, 4096, 8192):  # the in-kernel mean's one program: its row tiles of up to MEAN_TILE elements
        for dt in ("bf16", "fp32"):
            for code in (SpLossType.CE, SpLossType.JS):
                c, warps = _fwd_constexprs(code.loss_type, 0.1, A, mean_rows=_mean_rows(1, A))
                yield AotVariant(f"sp A={A} {dt} {code.loss_type} mean", _sp_fwd_kernel, _fwd_signature(dt)(c), c,
                                 warps, {**_fwd_ints(A), "N": 64})
    block, rows = _bwd_tiles(131072)
    c = {"ROWS": rows, "BLOCK_A": block}
    yield AotVariant("sp backward", _sp_bwd_kernel, _bwd_signature(c), c, 4)
    yield from tuned_variants()


def tuned_variants():
    """Every autotune config, where it can run: js with smoothing (the most live values) in bf16
    and fp32 for the forward's spaces (the one-tile space at the row lengths whose pruning keeps
    more than the launcher's own warps), kl-fwd for the top-k kernel's, bf16 for the backward's.
    A config's constexprs override the launcher's."""
    for dt in ("bf16", "fp32"):
        for A in (18, 256, 1024, 4096):
            c, _ = _fwd_constexprs("js", 0.1, A)
            kept = _warps_for_the_tile(_SP_FWD_TILE.configs, {"A": A}, **c)
            yield from _SP_FWD_TILE.variants(c, _fwd_signature(dt), f"sp A={A} {dt} js tuned", _fwd_ints(A), kept)
        c, _ = _fwd_constexprs("js", 0.1, 131072)
        yield from _SP_FWD_LONG.variants(c, _fwd_signature(dt), f"sp A=131072 {dt} js tuned", _fwd_ints(131072))
        c, _ = _topk_constexprs("kl-fwd", 64, 131072)
        yield from _SP_TOPK_LONG.variants(c, _topk_signature(dt), f"sp top-k A=131072 {dt} k=64 tuned",
                                          _topk_ints(131072))
    ints = {"N": 8192, "A": 131072, "stride_g": 131072, "stride_o": 131072, "stride_s": 1}
    yield from _SP_BWD_WIDE.variants({}, _bwd_signature, "sp backward tuned", ints)
