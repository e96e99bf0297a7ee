"""Fused Triton DQN kernel: TD target, CQL logsumexp, loss, gradient and metrics in one launch.

One program owns one sequence ``b`` (reward normalisation needs the sequence's statistics). It
reads the rewards (and mask) of the sequence for its mean and std, then walks the steps in chunks
of ``T_BLOCK`` and the actions in tiles of ``BLOCK_A``:

- pass 1 over the action tiles: ``q_sa = q[b, t, a]`` with ``a = action[b, t+1]``; the max of
  ``q_target[b, t+1, :]`` (or, with ``double_dqn``, ``q_target`` at the argmax of ``q[b, t+1, :]``);
  the online logsumexp of ``q[b, t, :]`` for CQL;
- the TD target, the per-transition loss, ``|TD error|``, and the per-sequence partial metrics;
- pass 2 over the action tiles: the gradient of the per-transition loss with respect to
  ``q[b, t, :]``: ``dl/dq_sa·onehot(a) + cql_weight·q_scale·softmax(q[b, t, :])`` times the
  importance weight, where ``dl/dq_sa`` is ``2d`` (l2) or ``clamp(d, ±delta)`` (huber) minus
  ``cql_weight·q_scale``. Row ``S-1`` and masked transitions get 0.

The partials of each sequence (count, Chan mean and M2 of ``q_sa``, min, max, sums of loss, target
and CQL penalty, bad-index counts) go to a ``[B, NP]`` buffer; the last program to finish (an
integer ticket counter, so the order of the float sums never depends on scheduling) reduces them
in a fixed order into the loss and the metrics. The gradient stays unscaled; backward multiplies it
by ``grad_output / count`` in one launch.

Actions outside ``[0, A)`` and ``done`` values outside ``{0, 1, 2}`` are clamped before any load and
counted in the metrics buffer, so they never read out of bounds; the caller raises on the count.

Byte model: read ``q`` once and the ``t+1`` rows of ``q_target`` once (``q[t+1]`` too with
``double_dqn``), write the gradient once: ``(2 + double)·B·S·A·b + small``; backward reads and
writes the gradient (``2·B·S·A·b``). Pass 2 re-reads ``q[b, t, :]``, normally from L1/L2.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["dqn_fused", "dqn_fwd", "METRIC_SLOTS"]

# Slots of the metrics buffer written by the finalize step.
METRIC_SLOTS = ("q_values_mean", "q_values_std", "q_values_min", "q_values_max", "q_values_target", "dqn_loss",
                "cql_penalty", "inv_count", "bad_action", "bad_done", "count", "no_valid")
_NP = 10  # partials per sequence: count, mean, m2, min, max, loss, target, cql, bad_a, bad_d
MAX_BLOCK_A = 1024
TILE_ELEMS = 1024
TILE_WARPS = 8
_COUNTERS: dict = {}


@triton.jit
def _transition(m_ptr, rew_ptr, step, t, tv, HAS_MASK: tl.constexpr):
    """Validity of transitions ``t -> t+1`` (both steps unmasked) and their raw rewards ``r[t+1]``."""
    valid = tv
    if HAS_MASK:
        valid = valid & (tl.load(m_ptr + step + t, mask=tv, other=0) != 0) & (tl.load(m_ptr + step + t + 1, mask=tv, other=0) != 0)
    r = tl.load(rew_ptr + step + t + 1, mask=tv, other=0.0).to(tl.float32)
    return valid, r


@triton.jit
def _dqn_fwd_kernel(
    q_ptr, qt_ptr, act_ptr, rew_ptr, done_ptr, w_ptr, m_ptr,
    grad_ptr, td_ptr, part_ptr, metrics_ptr, loss_ptr, counter_ptr,
    B, S, A,
    stride_qb, stride_qs, stride_tb, stride_ts, stride_gb, stride_gs,
    gamma, gamma_terminal, gamma_truncated, reward_scale, reward_shift, norm_eps, norm_target,
    cql_weight, cql_eps, huber_delta,
    HAS_WEIGHT: tl.constexpr, HAS_MASK: tl.constexpr, NORM_MEAN: tl.constexpr, NORM_STD: tl.constexpr,
    CQL: tl.constexpr, HUBER: tl.constexpr, DOUBLE: tl.constexpr,
    T_BLOCK: tl.constexpr, BLOCK_A: tl.constexpr, B_BLOCK: tl.constexpr,
):
    b = tl.program_id(0)
    b64 = b.to(tl.int64)
    n_tr = S - 1
    step = b64 * S
    offs_t = tl.arange(0, T_BLOCK)
    offs_a = tl.arange(0, BLOCK_A)

    # Sequence statistics of the (valid) rewards r[b, t+1], t < S-1: mean, then the unbiased std.
    r_sum = tl.zeros([T_BLOCK], tl.float32)
    n_sum = tl.zeros([T_BLOCK], tl.float32)
    for t0 in range(0, n_tr, T_BLOCK):
        t = t0 + offs_t
        valid, r = _transition(m_ptr, rew_ptr, step, t, t < n_tr, HAS_MASK)
        r_sum += tl.where(valid, r, 0.0)
        n_sum += valid.to(tl.float32)
    n_seq = tl.sum(n_sum, axis=0)
    r_mean = tl.sum(r_sum, axis=0) / tl.maximum(n_seq, 1.0)
    r_std = 0.0
    if NORM_STD:
        dev = tl.zeros([T_BLOCK], tl.float32)
        for t0 in range(0, n_tr, T_BLOCK):
            t = t0 + offs_t
            valid, r = _transition(m_ptr, rew_ptr, step, t, t < n_tr, HAS_MASK)
            dev += tl.where(valid, (r - r_mean) * (r - r_mean), 0.0)
        r_std = tl.sqrt(tl.sum(dev, axis=0) / tl.maximum(n_seq - 1.0, 1.0))

    # Per-sequence partials, accumulated per lane and combined at the end.
    c_n = tl.zeros([T_BLOCK], tl.float32)
    c_mean = tl.zeros([T_BLOCK], tl.float32)
    c_m2 = tl.zeros([T_BLOCK], tl.float32)
    c_min = tl.full([T_BLOCK], float("inf"), tl.float32)
    c_max = tl.full([T_BLOCK], float("-inf"), tl.float32)
    c_loss = tl.zeros([T_BLOCK], tl.float32)
    c_tgt = tl.zeros([T_BLOCK], tl.float32)
    c_cql = tl.zeros([T_BLOCK], tl.float32)
    c_bad_a = tl.zeros([T_BLOCK], tl.float32)
    c_bad_d = tl.zeros([T_BLOCK], tl.float32)
    for t0 in range(0, S, T_BLOCK):
        t = t0 + offs_t
        in_seq = t < S
        tv = t < n_tr  # rows with a transition t -> t+1
        t64 = t.to(tl.int64)
        a_raw = tl.load(act_ptr + step + t + 1, mask=tv, other=0).to(tl.int64)
        d_raw = tl.load(done_ptr + step + t + 1, mask=tv, other=0).to(tl.float32)  # int, bool or float done
        c_bad_a += (tv & ((a_raw < 0) | (a_raw >= A))).to(tl.float32)
        c_bad_d += (tv & (d_raw != 0.0) & (d_raw != 1.0) & (d_raw != 2.0)).to(tl.float32)
        a = tl.minimum(tl.maximum(a_raw, 0), A - 1)
        valid, r = _transition(m_ptr, rew_ptr, step, t, tv, HAS_MASK)
        if NORM_MEAN:
            r = r - r_mean
        if NORM_STD:
            r = r / (r_std + norm_eps) * norm_target
        r = r * reward_scale + reward_shift
        term = (d_raw == 1.0).to(tl.float32)
        trunc = (d_raw == 2.0).to(tl.float32)
        disc = gamma * (1.0 - term - trunc) + gamma_terminal * term + gamma_truncated * trunc

        q_row = q_ptr + b64 * stride_qb + t64[:, None] * stride_qs
        qn_row = q_ptr + b64 * stride_qb + (t64[:, None] + 1) * stride_qs
        qt_row = qt_ptr + b64 * stride_tb + (t64[:, None] + 1) * stride_ts
        q_sa = tl.zeros([T_BLOCK], tl.float32)
        next_v = tl.full([T_BLOCK], float("-inf"), tl.float32)
        best = tl.full([T_BLOCK], float("-inf"), tl.float32)
        lse_m = tl.full([T_BLOCK], -1e30, tl.float32)
        lse_s = tl.zeros([T_BLOCK], tl.float32)
        for a0 in range(0, A, BLOCK_A):
            cols = a0 + offs_a
            lm = tv[:, None] & (cols < A)[None, :]
            qv = tl.load(q_row + cols[None, :], mask=lm, other=float("-inf")).to(tl.float32)
            qtn = tl.load(qt_row + cols[None, :], mask=lm, other=float("-inf")).to(tl.float32)
            q_sa += tl.sum(tl.where(cols[None, :] == a[:, None], tl.where(lm, qv, 0.0), 0.0), axis=1)
            if DOUBLE:
                qn = tl.load(qn_row + cols[None, :], mask=lm, other=float("-inf")).to(tl.float32)
                tile_best = tl.max(qn, axis=1)
                tile_arg = tl.argmax(qn, axis=1) + a0
                at = tl.sum(tl.where(cols[None, :] == tile_arg[:, None], tl.where(lm, qtn, 0.0), 0.0), axis=1)
                better = tile_best > best  # strict: ties keep the lowest index, as torch.argmax
                next_v = tl.where(better, at, next_v)
                best = tl.maximum(best, tile_best)
            else:
                next_v = tl.maximum(next_v, tl.max(qtn, axis=1))
            if CQL:
                m_new = tl.maximum(lse_m, tl.max(qv, axis=1))
                lse_s = lse_s * tl.exp(lse_m - m_new) + tl.sum(tl.exp(qv - m_new[:, None]), axis=1)
                lse_m = m_new
        next_v = tl.where(tv, next_v, 0.0)
        target = r + disc * next_v
        d = q_sa - target
        if HUBER:
            ad = tl.abs(d)
            per = tl.where(ad <= huber_delta, 0.5 * d * d, huber_delta * (ad - 0.5 * huber_delta))
            dsa = tl.minimum(tl.maximum(d, -huber_delta), huber_delta)
        else:
            per = d * d
            dsa = 2.0 * d
        q_scale = tl.abs(target) + cql_eps
        lse = lse_m + tl.log(tl.maximum(lse_s, 1e-30))
        pen = lse - q_sa
        if CQL:
            per = per + cql_weight * q_scale * pen
            dsa = dsa - cql_weight * q_scale
        w = tl.full([T_BLOCK], 1.0, tl.float32)
        if HAS_WEIGHT:
            w = tl.load(w_ptr + step + t + 1, mask=tv, other=0.0).to(tl.float32)
        vf = valid.to(tl.float32)
        tl.store(td_ptr + b64 * n_tr + t, tl.abs(d) * vf, mask=tv)

        # Chan's update of (count, mean, M2) per lane, one observation at a time.
        n_new = c_n + vf
        delta = q_sa - c_mean
        c_mean = tl.where(valid, c_mean + delta / tl.maximum(n_new, 1.0), c_mean)
        c_m2 = tl.where(valid, c_m2 + delta * (q_sa - c_mean), c_m2)
        c_n = n_new
        c_min = tl.where(valid, tl.minimum(c_min, q_sa), c_min)
        c_max = tl.where(valid, tl.maximum(c_max, q_sa), c_max)
        c_loss += tl.where(valid, per * w, 0.0)
        c_tgt += tl.where(valid, target, 0.0)
        c_cql += tl.where(valid, pen, 0.0)

        # Pass 2: the gradient of this chunk's rows (zero for row S-1 and masked transitions).
        coef_sa = tl.where(valid, dsa * w, 0.0)
        coef_sm = tl.where(valid, cql_weight * q_scale * w / tl.maximum(lse_s, 1e-30), 0.0)
        g_row = grad_ptr + b64 * stride_gb + t64[:, None] * stride_gs
        for a0 in range(0, A, BLOCK_A):
            cols = a0 + offs_a
            sm = in_seq[:, None] & (cols < A)[None, :]
            g = tl.where(cols[None, :] == a[:, None], coef_sa[:, None], 0.0)
            if CQL:
                qv = tl.load(q_row + cols[None, :], mask=tv[:, None] & (cols < A)[None, :], other=float("-inf")).to(tl.float32)
                g += coef_sm[:, None] * tl.exp(qv - lse_m[:, None])
            tl.store(g_row + cols[None, :], g.to(grad_ptr.dtype.element_ty), mask=sm)

    # Combine the lanes (Chan) and write this sequence's partials.
    n = tl.sum(c_n, axis=0)
    mean = tl.sum(c_n * c_mean, axis=0) / tl.maximum(n, 1.0)
    m2 = tl.sum(c_m2 + c_n * (c_mean - mean) * (c_mean - mean), axis=0)
    pb = part_ptr + b64 * 10
    tl.store(pb + 0, n)
    tl.store(pb + 1, mean)
    tl.store(pb + 2, m2)
    tl.store(pb + 3, tl.min(c_min, axis=0))
    tl.store(pb + 4, tl.max(c_max, axis=0))
    tl.store(pb + 5, tl.sum(c_loss, axis=0))
    tl.store(pb + 6, tl.sum(c_tgt, axis=0))
    tl.store(pb + 7, tl.sum(c_cql, axis=0))
    tl.store(pb + 8, tl.sum(c_bad_a, axis=0))
    tl.store(pb + 9, tl.sum(c_bad_d, axis=0))

    # The last program to finish reduces all partials in a fixed order.
    ticket = tl.atomic_add(counter_ptr, 1, sem="acq_rel")
    if ticket == B - 1:
        offs_b = tl.arange(0, B_BLOCK)
        s_n = tl.zeros([B_BLOCK], tl.float32)
        s_nm = tl.zeros([B_BLOCK], tl.float32)
        s_min = tl.full([B_BLOCK], float("inf"), tl.float32)
        s_max = tl.full([B_BLOCK], float("-inf"), tl.float32)
        s_loss = tl.zeros([B_BLOCK], tl.float32)
        s_tgt = tl.zeros([B_BLOCK], tl.float32)
        s_cql = tl.zeros([B_BLOCK], tl.float32)
        s_ba = tl.zeros([B_BLOCK], tl.float32)
        s_bd = tl.zeros([B_BLOCK], tl.float32)
        for b0 in range(0, B, B_BLOCK):
            bb = (b0 + offs_b).to(tl.int64)
            bm = bb < B
            pn = tl.load(part_ptr + bb * 10 + 0, mask=bm, other=0.0)
            s_n += pn
            s_nm += pn * tl.load(part_ptr + bb * 10 + 1, mask=bm, other=0.0)
            s_min = tl.minimum(s_min, tl.load(part_ptr + bb * 10 + 3, mask=bm, other=float("inf")))
            s_max = tl.maximum(s_max, tl.load(part_ptr + bb * 10 + 4, mask=bm, other=float("-inf")))
            s_loss += tl.load(part_ptr + bb * 10 + 5, mask=bm, other=0.0)
            s_tgt += tl.load(part_ptr + bb * 10 + 6, mask=bm, other=0.0)
            s_cql += tl.load(part_ptr + bb * 10 + 7, mask=bm, other=0.0)
            s_ba += tl.load(part_ptr + bb * 10 + 8, mask=bm, other=0.0)
            s_bd += tl.load(part_ptr + bb * 10 + 9, mask=bm, other=0.0)
        total = tl.sum(s_n, axis=0)
        g_mean = tl.sum(s_nm, axis=0) / total
        s_m2 = tl.zeros([B_BLOCK], tl.float32)
        for b0 in range(0, B, B_BLOCK):
            bb = (b0 + offs_b).to(tl.int64)
            bm = bb < B
            pn = tl.load(part_ptr + bb * 10 + 0, mask=bm, other=0.0)
            dm = tl.load(part_ptr + bb * 10 + 1, mask=bm, other=0.0) - g_mean
            s_m2 += tl.load(part_ptr + bb * 10 + 2, mask=bm, other=0.0) + pn * dm * dm
        loss = tl.sum(s_loss, axis=0) / total
        tl.store(loss_ptr, loss)
        tl.store(metrics_ptr + 0, g_mean)
        tl.store(metrics_ptr + 1, tl.sqrt(tl.sum(s_m2, axis=0) / tl.maximum(total - 1.0, 1.0)))
        tl.store(metrics_ptr + 2, tl.min(s_min, axis=0))
        tl.store(metrics_ptr + 3, tl.max(s_max, axis=0))
        tl.store(metrics_ptr + 4, tl.sum(s_tgt, axis=0) / total)
        tl.store(metrics_ptr + 5, loss)
        tl.store(metrics_ptr + 6, tl.sum(s_cql, axis=0) / total)
        tl.store(metrics_ptr + 7, 1.0 / total)
        tl.store(metrics_ptr + 8, tl.sum(s_ba, axis=0))
        tl.store(metrics_ptr + 9, tl.sum(s_bd, axis=0))
        tl.store(metrics_ptr + 10, total)
        tl.store(metrics_ptr + 11, (total == 0.0).to(tl.float32))
        tl.atomic_xchg(counter_ptr, 0)  # ready for the next call (and for CUDA-graph replays)


@triton.jit
def _scale_by_kernel(g_ptr, out_ptr, gout_ptr, inv_ptr, numel, BLOCK: tl.constexpr):
    """``out = g * grad_output * inv_count`` with both scalars read on the device (no sync)."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    scale = tl.load(gout_ptr).to(tl.float32) * tl.load(inv_ptr)
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + offs, (g * scale).to(out_ptr.dtype.element_ty), mask=mask)


def _tiles(A: int, S: int, max_block_a: int = MAX_BLOCK_A):
    """(BLOCK_A, T_BLOCK, num_warps): a [T_BLOCK, BLOCK_A] tile of TILE_ELEMS elements over enough
    warps that the kernel's dozen live tiles stay in registers (checked by tests/compile_check.py)."""
    block_a = min(triton.next_power_of_2(A), max_block_a)
    t_block = max(1, min(64, TILE_ELEMS // block_a, triton.next_power_of_2(S)))
    return block_a, t_block, TILE_WARPS if t_block * block_a > 256 else 4


def _counter(device: torch.device) -> torch.Tensor:
    """A per-device int32 ticket counter, zero between calls (the last program resets it)."""
    key = (device.type, device.index)
    if key not in _COUNTERS:
        _COUNTERS[key] = torch.zeros(1, dtype=torch.int32, device=device)
    return _COUNTERS[key]


def _small(t: torch.Tensor) -> torch.Tensor:
    if t.dtype == torch.bool:
        t = t.view(torch.uint8)
    return t if t.is_contiguous() else t.contiguous()


def dqn_fwd(q, q_target, action, reward, done, weight, mask, cfg_values, max_block_a: int = MAX_BLOCK_A,
            grad_out=None, td_out=None):
    """Launch the fused forward. Returns ``(loss 0-dim fp32, metrics [11] fp32, grad [B,S,A] in
    q.dtype, |td| [B, S-1] fp32)``; ``grad_out``/``td_out`` let tests pass NaN-poisoned buffers."""
    (gamma, gamma_terminal, gamma_truncated, reward_scale, reward_shift, norm_eps, norm_target, cql_weight, cql_eps,
     huber_delta, flags) = cfg_values
    norm_mean, norm_std, cql, huber, double = flags
    if q.stride(-1) != 1:
        q = q.contiguous()
    if q_target.stride(-1) != 1:
        q_target = q_target.contiguous()
    B, S, A = q.shape
    dev = q.device
    grad = torch.empty(q.shape, dtype=q.dtype, device=dev) if grad_out is None else grad_out
    td = torch.empty((B, S - 1), dtype=torch.float32, device=dev) if td_out is None else td_out
    part = torch.empty((B, _NP), dtype=torch.float32, device=dev)
    metrics = torch.empty(len(METRIC_SLOTS), dtype=torch.float32, device=dev)
    loss = torch.empty((), dtype=torch.float32, device=dev)
    action, reward, done = _small(action), _small(reward), _small(done)
    w = _small(weight) if weight is not None else reward
    m = _small(mask) if mask is not None else done
    block_a, t_block, warps = _tiles(A, S, max_block_a)
    _dqn_fwd_kernel[(B,)](
        q, q_target, action, reward, done, w, m, grad, td, part, metrics, loss, _counter(dev),
        B, S, A, q.stride(0), q.stride(1), q_target.stride(0), q_target.stride(1), grad.stride(0), grad.stride(1),
        gamma, gamma_terminal, gamma_truncated, reward_scale, reward_shift, norm_eps, norm_target,
        cql_weight, cql_eps, huber_delta,
        HAS_WEIGHT=weight is not None, HAS_MASK=mask is not None, NORM_MEAN=norm_mean, NORM_STD=norm_std,
        CQL=cql, HUBER=huber, DOUBLE=double, T_BLOCK=t_block, BLOCK_A=block_a,
        B_BLOCK=min(triton.next_power_of_2(B), 1024), num_warps=warps,
    )
    return loss, metrics, grad, td


def _scale_by(g: torch.Tensor, grad_output: torch.Tensor, inv_count: torch.Tensor) -> torch.Tensor:
    out = torch.empty_like(g)
    numel = g.numel()
    BLOCK = 4096
    _scale_by_kernel[(triton.cdiv(numel, BLOCK),)](g, out, grad_output.reshape(1), inv_count, numel, BLOCK=BLOCK)
    return out


@torch.library.custom_op("fusedloss::dqn_fwd", mutates_args=())
def _dqn_fwd_op(q: torch.Tensor, q_target: torch.Tensor, action: torch.Tensor, reward: torch.Tensor,
                done: torch.Tensor, weight: torch.Tensor | None, mask: torch.Tensor | None, params: list[float],
                flags: list[bool], max_block_a: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return dqn_fwd(q, q_target, action, reward, done, weight, mask, (*params, tuple(flags)), max_block_a)


@_dqn_fwd_op.register_fake
def _(q, q_target, action, reward, done, weight, mask, params, flags, max_block_a):
    B, S, _ = q.shape
    f32 = dict(dtype=torch.float32, device=q.device)
    return (torch.empty((), **f32), torch.empty(len(METRIC_SLOTS), **f32), torch.empty_like(q),
            torch.empty((B, S - 1), **f32))


@torch.library.custom_op("fusedloss::dqn_scale", mutates_args=())
def _dqn_scale_op(g: torch.Tensor, grad_output: torch.Tensor, inv_count: torch.Tensor) -> torch.Tensor:
    return _scale_by(g, grad_output, inv_count)


@_dqn_scale_op.register_fake
def _(g, grad_output, inv_count):
    return torch.empty_like(g)


def _setup(ctx, inputs, output):
    _, metrics, grad, _ = output
    ctx.save_for_backward(grad, metrics)


def _backward(ctx, grad_loss, grad_metrics, grad_grad, grad_td):
    grad, metrics = ctx.saved_tensors
    return (_dqn_scale_op(grad, grad_loss, metrics[7:8]), None, None, None, None, None, None, None, None, None)


_dqn_fwd_op.register_autograd(_backward, setup_context=_setup)


def kernel_params(cfg):
    """The config as the kernel takes it: (float parameters, compile-time flags), in launch order."""
    params = [float(cfg.gamma), float(cfg.gamma_terminal), float(cfg.gamma_truncated), float(cfg.reward_scale),
              float(cfg.reward_shift), float(cfg.normalize_reward_eps), float(cfg.normalize_reward_std_target),
              float(cfg.cql_weight), float(cfg.cql_scale_q_eps), float(cfg.huber_delta)]
    flags = [bool(cfg.normalize_reward_mean), bool(cfg.normalize_reward_std), cfg.cql_weight > 0.0,
             cfg.td_loss == "huber", bool(cfg.double_dqn)]
    return params, flags


def dqn_fused(q, q_target, action, reward, done, cfg, weight=None, mask=None, max_block_a: int = MAX_BLOCK_A):
    """The fused path behind :func:`fusedloss.dqn_loss`. Returns ``(loss, named, td_abs, checks)``:
    the named metrics and the input checks are views of one device buffer (no extra launch)."""
    params, flags = kernel_params(cfg)
    loss, metrics, _, td = _dqn_fwd_op(q, q_target.detach(), action, reward, done, weight, mask, params, flags,
                                       max_block_a)
    names = METRIC_SLOTS[:7] if cfg.cql_weight > 0.0 else METRIC_SLOTS[:6]
    named = {k: metrics[METRIC_SLOTS.index(k)] for k in names}
    flags_out = {"bad_action": metrics[8], "bad_done": metrics[9], "no_valid": metrics[11]}
    return loss, named, td, flags_out
