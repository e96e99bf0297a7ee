"""LM-head losses for reinforcement learning and fine-tuning of language models, fused with the
head: the ``[N, V]`` logits are never held whole.

:func:`linear_logprob` gives the log-probability of each chosen token (and optionally the entropy
of each row) of ``softmax(softcap(hidden @ weight.T + bias) / T)``; its backward is exact for any
upstream gradient on both outputs. :func:`linear_cross_entropy` is cross-entropy on hard labels,
with label smoothing, z-loss and the next-token shift. Both work a chunk of rows at a time: the
chunk's logits are computed in fp32 (from bf16/fp16 inputs too), its per-row statistics and its
gradient come from two Triton kernels (:mod:`fusedloss.kernels.lm_head`) on CUDA or from the same
formulas in PyTorch elsewhere, and the chunk's share of the gradients of ``hidden``, ``weight``
(accumulated in fp32) and ``bias`` comes from matmuls. Peak extra memory is ``O(chunk · V)`` plus
the fp32 weight-gradient accumulator, not ``O(N · V)``.

Semantics (shared by both paths):

- softcap comes before temperature: ``u = c·tanh(z/c) / T``;
- a token whose label is ``ignore_index`` gives log-prob 0, entropy 0 and cross-entropy 0, and no
  gradient; its hidden row never reaches a product, so a NaN there changes nothing;
- a ``mean`` over no valid token is 0 with zero gradients (``F.cross_entropy`` gives NaN);
- losses are fp32 (fp64 for fp64 inputs); gradients come back in each input's dtype.
"""

from __future__ import annotations

import dataclasses
import sys

import torch

from .._dispatch import Backend, resolve_backend
from .._families import Family, VerifyCase
from ._common import LossConfig, VocabParallelLoss, check_config_common, require_float, require_same_device
from ._data_parallel import check_dp, check_grad_reduction, global_counts, scale_grad
from ._vocab_parallel import _check_replicated, resolve_vocab_shard
from .sp import check_reduction
from .sp_linear import default_chunk_rows

__all__ = ["linear_logprob", "linear_cross_entropy", "LinearCrossEntropyConfig", "LinearCrossEntropyLoss"]


# --- the chunk's statistics and gradient, in PyTorch (the kernels compute the same) ---------------

def _transform(z: torch.Tensor, inv_t: float, softcap: float | None):
    """``u = softcap(z)/T`` and ``du/dz``."""
    if softcap is None:
        return z * inv_t, inv_t
    t = torch.tanh(z / softcap)
    return softcap * inv_t * t, (1.0 - t * t) * inv_t


def lm_head_stats_reference(z: torch.Tensor, labels: torch.Tensor, inv_t: float, softcap: float | None):
    """``[n, 4]`` ``(lse, entropy, Σu, u[label])`` of logits ``z`` ``[n, V]``; ``u[label]`` is NaN
    for a label outside ``[0, V)``."""
    V = z.shape[1]
    u, _ = _transform(z, inv_t, softcap)
    lse = torch.logsumexp(u, dim=1)
    log_s = u - lse[:, None]
    s = log_s.exp()
    zero = torch.zeros((), dtype=u.dtype, device=u.device)
    entropy = -torch.where(s == 0, zero, s * log_s).sum(dim=1)  # 0·log 0 = 0; NaN stays NaN
    ok = (labels >= 0) & (labels < V)
    u_y = u.gather(1, labels.clamp(0, V - 1)[:, None].long())[:, 0]
    return torch.stack([lse, entropy, u.sum(dim=1), torch.where(ok, u_y, torch.full_like(u_y, float("nan")))], 1)


def lm_head_grad_reference(z, labels, stats, coef, inv_t: float, softcap: float | None):
    """``dL/dz`` for per-row coefficients ``coef`` ``[n, 4]`` = (α, β, γ, δ):
    ``dL/du_j = α s_j + β [j = y] + γ s_j (log s_j + H) + δ`` (see :mod:`fusedloss.kernels.lm_head`)."""
    u, du = _transform(z, inv_t, softcap)
    lse, entropy = stats[:, 0:1], stats[:, 1:2]
    a, b, g, d = (coef[:, i:i + 1] for i in range(4))
    log_s = u - lse
    s = log_s.exp()
    zero = torch.zeros((), dtype=u.dtype, device=u.device)
    ent = torch.where(g == 0, zero, g * torch.where(s == 0, zero, s * (log_s + entropy)))
    hit = torch.arange(z.shape[1], device=z.device)[None, :] == labels[:, None]
    return (a * s + torch.where(hit, b, zero) + ent + d) * du


# --- the chunk loop ------------------------------------------------------------------------------

def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _logits(h: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    """fp32 logits (fp64 for fp64) of a chunk: CUDA's ``mm`` writes fp32 straight from bf16/fp16
    operands; elsewhere the operands are upcast (``w`` already is: see :func:`_pass`)."""
    acc = _acc_dtype(h.dtype)
    if h.dtype != acc and h.is_cuda:
        z = torch.mm(h, w.T, out_dtype=acc)
    else:
        z = h.to(w.dtype) @ w.T
        z = z if z.dtype == acc else z.to(acc)
    return z if b is None else z + b.to(acc)


def _pass(hidden, weight, bias, labels, valid, opts, chunk: int, triton_path: bool, coef_of=None, stats=None,
          want=(False, False, False)):
    """One sweep over the chunks. Returns the per-row statistics ``[N, 4]`` and, where ``coef_of``
    (``(stats_chunk, r0, r1) -> coef [n, 4]``) is given, the gradients ``want`` asks for, of
    ``hidden`` (its dtype), ``weight`` and ``bias`` (fp32, fp64 for fp64). ``stats`` given: reused,
    not recomputed."""
    inv_t, softcap, shard = opts
    N = hidden.shape[0]
    acc = _acc_dtype(hidden.dtype)
    w = weight.detach()
    w_mm = w if (hidden.is_cuda or w.dtype == acc) else w.to(acc)  # upcast once, not once per chunk
    b = None if bias is None else bias.detach()
    out_stats = torch.empty(N, 4, dtype=acc, device=hidden.device) if stats is None else stats
    # a vocabulary shard's partial gradients of hidden are summed over the group: in fp32, once, at the end
    g_hidden = (torch.empty(N, hidden.shape[1], dtype=acc, device=hidden.device) if shard is not None
                else torch.empty_like(hidden)) if want[0] else None
    if shard is not None:  # this shard's columns of each label, -1 (no column) elsewhere
        in_shard = (labels >= shard.offset) & (labels < shard.offset + w.shape[0])
        labels = torch.where(in_shard, labels - shard.offset, torch.full_like(labels, -1))
    g_weight = torch.zeros(w.shape, dtype=acc, device=w.device) if want[1] else None
    g_bias = torch.zeros(w.shape[0], dtype=acc, device=w.device) if want[2] else None
    if triton_path:
        from ..kernels import lm_head as kernels
    zero = torch.zeros((), dtype=hidden.dtype, device=hidden.device)
    for r0 in range(0, N, chunk):
        r1 = min(r0 + chunk, N)
        v = valid[r0:r1]
        h = torch.where(v[:, None], hidden[r0:r1].detach(), zero)  # an ignored row never reaches a product
        y = labels[r0:r1]
        z = _logits(h, w_mm, b)
        if stats is None:
            st = (kernels.stats_op(z, y, inv_t, softcap) if triton_path
                  else lm_head_stats_reference(z, y, inv_t, softcap))
            if shard is not None:
                st = shard.combine(st, in_shard[r0:r1])
            out_stats[r0:r1] = st
        else:
            st = stats[r0:r1]
        if coef_of is None:
            continue
        coef = coef_of(st, r0, r1).to(z.dtype)
        dz = (kernels.grad_op(z, y, st, coef, inv_t, softcap) if triton_path
              else lm_head_grad_reference(z, y, st, coef, inv_t, softcap))
        del z
        if g_hidden is not None:
            if shard is not None:
                g_hidden[r0:r1] = dz @ w_mm.to(acc)
            else:
                g_hidden[r0:r1] = (dz.to(hidden.dtype) @ w) if hidden.dtype != acc else (dz @ w_mm).to(hidden.dtype)
        if g_weight is not None:
            g_weight.addmm_(dz.T, h.to(acc))
        if g_bias is not None:
            g_bias += dz.sum(dim=0)
        del dz
    if shard is not None and g_hidden is not None:
        g_hidden = shard.all_reduce(g_hidden).to(hidden.dtype)
    return out_stats, g_hidden, g_weight, g_bias


def _grads_out(grads, dtypes, scale=None):
    out = []
    for g, dtype in zip(grads, dtypes):
        if g is None:
            out.append(None)
        else:
            out.append((g if scale is None else g * scale.to(g.dtype)).to(dtype))
    return out


def _no_double_backward(name: str):
    if torch.is_grad_enabled():
        raise RuntimeError(f"{name} does not support double backward (create_graph=True): its gradients are "
                           "computed chunk by chunk without a graph. Materialise the logits for higher-order "
                           "derivatives.")


class _LogprobFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, valid, opts, chunk, triton_path):
        stats, *_ = _pass(hidden, weight, bias, labels, valid, opts, chunk, triton_path)
        zero = torch.zeros((), dtype=stats.dtype, device=stats.device)
        logprob = torch.where(valid, stats[:, 3] - stats[:, 0], zero)
        entropy = torch.where(valid, stats[:, 1], zero)
        ctx.save_for_backward(hidden, weight, bias, labels, valid, stats)
        ctx.args = (opts, chunk, triton_path)
        ctx.dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
        return logprob, entropy

    @staticmethod
    def backward(ctx, g_lp, g_ent):
        _no_double_backward("linear_logprob")
        hidden, weight, bias, labels, valid, stats = ctx.saved_tensors
        opts, chunk, triton_path = ctx.args
        want = tuple(ctx.needs_input_grad[:3])
        if not any(want) or (g_lp is None and g_ent is None):
            return (None,) * 8
        zero = torch.zeros((), dtype=stats.dtype, device=stats.device)
        g_lp = torch.zeros_like(stats[:, 0]) if g_lp is None else torch.where(valid, g_lp.to(stats.dtype), zero)
        g_ent = torch.zeros_like(stats[:, 0]) if g_ent is None else torch.where(valid, g_ent.to(stats.dtype), zero)
        coef = torch.stack([-g_lp, g_lp, -g_ent, torch.zeros_like(g_lp)], dim=1)
        _, gh, gw, gb = _pass(hidden, weight, bias, labels, valid, opts, chunk, triton_path,
                              coef_of=lambda st, r0, r1: coef[r0:r1], stats=stats, want=want)
        return (*_grads_out((gh, gw, gb), ctx.dtypes), None, None, None, None, None)


def _ce_coef(stats, g, eps: float, z_loss: float, V: int):
    """(α, β, γ, δ) of cross-entropy with smoothing ``eps`` and z-loss, for per-row upstream ``g``."""
    a = g * (1.0 + 2.0 * z_loss * stats[:, 0]) if z_loss else g
    return torch.stack([a, -g * (1.0 - eps), torch.zeros_like(g), -g * (eps / V)], dim=1)


def _ce_rows(stats, valid, eps: float, z_loss: float, V: int):
    lse = stats[:, 0]
    rows = (1.0 - eps) * (lse - stats[:, 3])
    if eps:
        rows = rows + eps * (lse - stats[:, 2] / V)
    if z_loss:
        rows = rows + z_loss * lse * lse
    return torch.where(valid, rows, torch.zeros((), dtype=rows.dtype, device=rows.device))


class _CrossEntropyFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, valid, opts, ce_opts, reduction, chunk, triton_path, grad_mode):
        eps, z_loss = ce_opts
        V = opts[2].vocab if opts[2] is not None else weight.shape[0]
        ctx.dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
        ctx.reduction = reduction
        want = tuple(bool(n) and grad_mode for n in ctx.needs_input_grad[:3])
        if reduction == "none":  # per-token upstream gradients: backward recomputes the chunks
            stats, *_ = _pass(hidden, weight, bias, labels, valid, opts, chunk, triton_path)
            ctx.save_for_backward(hidden, weight, bias, labels, valid, stats)
            ctx.args = (opts, ce_opts, chunk, triton_path, want)
            lse = torch.where(valid, stats[:, 0], torch.zeros((), dtype=stats.dtype, device=stats.device))
            ctx.mark_non_differentiable(lse)
            return _ce_rows(stats, valid, eps, z_loss, V), lse
        ones = valid.to(_acc_dtype(hidden.dtype))  # gradient of the sum, computed in this pass
        coef_of = (lambda st, r0, r1: _ce_coef(st, ones[r0:r1], eps, z_loss, V)) if any(want) else None
        stats, gh, gw, gb = _pass(hidden, weight, bias, labels, valid, opts, chunk, triton_path, coef_of=coef_of,
                                  want=want)
        total = _ce_rows(stats, valid, eps, z_loss, V).sum()
        inv = 1.0 / valid.sum().clamp_min(1).to(total.dtype) if reduction == "mean" else torch.ones_like(total)
        ctx.save_for_backward(gh, gw, gb, inv)
        lse = torch.where(valid, stats[:, 0], torch.zeros((), dtype=stats.dtype, device=stats.device))
        ctx.mark_non_differentiable(lse)
        return total * inv, lse

    @staticmethod
    def backward(ctx, grad_out, _g_lse):
        _no_double_backward("linear_cross_entropy")
        if ctx.reduction == "none":
            hidden, weight, bias, labels, valid, stats = ctx.saved_tensors
            opts, (eps, z_loss), chunk, triton_path, want = ctx.args
            g = torch.where(valid, grad_out.to(stats.dtype), torch.zeros((), dtype=stats.dtype, device=stats.device))
            V = opts[2].vocab if opts[2] is not None else weight.shape[0]
            _, gh, gw, gb = _pass(hidden, weight, bias, labels, valid, opts, chunk, triton_path,
                                  coef_of=lambda st, r0, r1: _ce_coef(st, g[r0:r1], eps, z_loss, V), stats=stats,
                                  want=want)
            grads = _grads_out((gh, gw, gb), ctx.dtypes)
        else:
            gh, gw, gb, inv = ctx.saved_tensors
            grads = _grads_out((gh, gw, gb), ctx.dtypes, grad_out * inv)  # 0-dim device tensors: no sync
        return (*grads,) + (None,) * 8


# --- the public functions ------------------------------------------------------------------------

def _check_head(hidden, weight, bias, labels, ignore_index, chunk_size, name_h="hidden"):
    require_float(hidden, name_h)
    require_float(weight, "weight")
    if hidden.dim() < 2 or hidden.shape[-1] == 0:
        raise ValueError(f"{name_h} must have shape [..., H] with at least 2 dimensions, got {tuple(hidden.shape)}.")
    H = hidden.shape[-1]
    if weight.dim() != 2 or weight.shape[1] != H or weight.shape[0] == 0:
        raise ValueError(f"weight must have shape [V, H] = [V, {H}] with V >= 1, got {tuple(weight.shape)}.")
    if weight.dtype != hidden.dtype:
        raise TypeError(f"{name_h} and weight must share a dtype, got {hidden.dtype} and {weight.dtype}.")
    V = weight.shape[0]
    if bias is not None:
        require_float(bias, "bias")
        if tuple(bias.shape) != (V,):
            raise ValueError(f"bias must have shape [V] = ({V},), got {tuple(bias.shape)}.")
    if not isinstance(labels, torch.Tensor) or labels.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"labels must be an int64 or int32 tensor, got "
                        f"{labels.dtype if isinstance(labels, torch.Tensor) else type(labels).__name__}.")
    if tuple(labels.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(f"labels must have shape {name_h}.shape[:-1] = {tuple(hidden.shape[:-1])}, got "
                         f"{tuple(labels.shape)}.")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {ignore_index!r}.")
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be None or an integer >= 1, got {chunk_size!r}.")
    require_same_device({name_h: hidden, "weight": weight, "bias": bias, "labels": labels})
    return V


def _check_softcap_temperature(softcap, temperature):
    if softcap is not None and (isinstance(softcap, bool) or not isinstance(softcap, (int, float)) or not softcap > 0):
        raise ValueError(f"softcap must be None or a number > 0, got {softcap!r}.")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature > 0:
        raise ValueError(f"temperature must be a number > 0, got {temperature!r}.")


_COMPILE_HINT = ("check_inputs=True checks the labels' range on the host (one sync), which torch.compile(fullgraph=True) "
                 "cannot trace: pass check_inputs=False inside a compiled region (an out-of-range label then gives NaN, "
                 "never an out-of-bounds read).")


def _check_labels(labels, valid, V: int, sharded: bool = False):
    """One host sync: every label that is not ignored lies in ``[0, V)``. A compiled region breaks
    its graph here, and with ``fullgraph=True`` the error says to pass ``check_inputs=False``."""
    if torch.compiler.is_compiling():  # torch._dynamo is loaded whenever something compiles
        sys.modules["torch._dynamo"].graph_break(msg=_COMPILE_HINT)
    bad = valid & ((labels < 0) | (labels >= V))
    if bool(bad.any()):
        first = labels[bad][0].item()
        hint = "" if sharded else " (a vocabulary-sharded head needs group=: then V is the whole vocabulary)"
        raise ValueError(f"labels must lie in [0, V) = [0, {V}) or equal ignore_index, got {first}{hint}. "
                         "Pass check_inputs=False to skip this check (and its host sync).")


def _check_ce_options(reduction, label_smoothing, z_loss, softcap, shift) -> None:
    check_reduction(reduction)
    _check_softcap_temperature(softcap, 1.0)
    for name, value, hi in (("label_smoothing", label_smoothing, 1.0), ("z_loss", z_loss, None)):
        if (isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < float("inf")
                or (hi and value > hi)):
            raise ValueError(f"{name} must be a number in [0, {hi if hi else 'inf'}{']' if hi else ')'}, got {value!r}.")
    if not isinstance(shift, bool):
        raise TypeError(f"shift must be a bool, got {shift!r}.")


def _flat_rows(hidden, weight, labels, shard, ignore_index: int, chunk_size, backend, check_inputs: bool):
    """What both LM-head losses run on: ``hidden`` as rows ``[N, H]``, the labels ``[N]``, which
    rows are not ignored (their range checked against the whole vocabulary where ``check_inputs``),
    the rows per chunk and whether the kernels run (no dispatch for zero rows: the callers return
    zeros)."""
    h = hidden.reshape(-1, hidden.shape[-1])
    y = labels.reshape(-1).contiguous()  # the kernels read label r at labels_ptr + r
    valid = y != ignore_index
    if check_inputs:
        _check_labels(y, valid, weight.shape[0] if shard is None else shard.vocab, shard is not None)
        if shard is not None:
            _check_replicated(h, shard, "hidden")
    chunk = chunk_size or default_chunk_rows(h.shape[0], weight.shape[0], h.shape[1], h.device, shard)
    triton_path = h.shape[0] > 0 and resolve_backend(backend, "lm_head", hidden, weight) is Backend.TRITON
    return h, y, valid, chunk, triton_path


def linear_logprob(hidden, weight, labels, *, bias=None, temperature: float = 1.0, softcap: float | None = None,
                   ignore_index: int = -100, return_entropy: bool = False, chunk_size: int | None = None,
                   backend: str = "auto", check_inputs: bool = True, group=None, vocab_offset: int | None = None):
    """The log-probability of each chosen token under the LM head, without the ``[N, V]`` logits.

    ``hidden`` ``[..., H]``, ``weight`` ``[V, H]``, ``labels`` int ``[...]`` (the chosen tokens),
    ``bias`` ``[V]`` or None. Returns ``logprob`` fp32 ``[...]`` of ``log softmax(u)[label]`` with
    ``u = softcap·tanh(z/softcap) / temperature`` and ``z = hidden @ weight.T + bias``, and with
    ``return_entropy=True`` also ``entropy`` ``[...]`` (``-Σ s log s`` of the same softmax). A token
    whose label is ``ignore_index`` gives 0 for both and no gradient. Backward is exact for any
    upstream gradients on both outputs (``dz = g_lp·(onehot - s) - g_H·s·(log s + H)``, times the
    softcap and temperature factors) and recomputes each chunk's logits rather than saving them.
    Works under ``torch.no_grad()`` (rollouts). ``chunk_size``: rows per chunk (default
    :func:`fusedloss.losses.sp_linear.default_chunk_rows`). ``check_inputs`` checks the labels' range with one host
    sync; ``False`` skips it (an out-of-range label then gives NaN, never an out-of-bounds read).

    **Vocabulary parallel.** With ``group=`` (a ``torch.distributed`` process group), ``weight``
    ``[V_r, H]`` and ``bias`` ``[V_r]`` are this rank's contiguous rows of the head, in rank order
    (uneven shards allowed; ``vocab_offset=`` states this rank's first row, checked against the
    sizes all-gathered once per group); ``hidden`` and the (global) ``labels`` are the same on
    every rank. A ``Shard(0)`` DTensor ``weight`` on a 1-D mesh is used so without ``group=``.
    Every rank returns the same global values and the full gradient of ``hidden``; the weight's
    gradient is its rows of the full one. Per chunk the ranks all-gather 5 numbers per row, and the
    gradient of ``hidden`` is all-reduced once. ``check_inputs`` also checks that ``hidden`` is the
    same on every rank; ``chunk_size``, if given, must be too. See the Distributed guide.
    """
    weight, bias, shard = resolve_vocab_shard(weight, bias, group, vocab_offset)
    _check_head(hidden, weight, bias, labels, ignore_index, chunk_size)
    _check_softcap_temperature(softcap, temperature)
    shape = labels.shape
    h, y, valid, chunk, triton_path = _flat_rows(hidden, weight, labels, shard, ignore_index, chunk_size, backend,
                                                 check_inputs)
    if h.shape[0] == 0:
        empty = torch.zeros(shape, dtype=_acc_dtype(hidden.dtype), device=hidden.device)
        return (empty, empty.clone()) if return_entropy else empty
    opts = (1.0 / float(temperature), None if softcap is None else float(softcap), shard)
    logprob, entropy = _LogprobFunction.apply(h, weight, bias, y, valid, opts, chunk, triton_path)
    logprob = logprob.reshape(shape)
    return (logprob, entropy.reshape(shape)) if return_entropy else logprob


def linear_cross_entropy(hidden, weight, labels, *, bias=None, reduction: str = "mean", label_smoothing: float = 0.0,
                         z_loss: float = 0.0, ignore_index: int = -100, softcap: float | None = None,
                         shift: bool = False, return_lse: bool = False, chunk_size: int | None = None,
                         backend: str = "auto", check_inputs: bool = True, group=None, vocab_offset: int | None = None,
                         dp_group=None, grad_reduction: str = "sum"):
    """Cross-entropy of the LM head ``z = hidden @ weight.T + bias`` on hard ``labels``, without the
    ``[N, V]`` logits.

    ``hidden`` ``[..., H]``, ``labels`` int ``[...]``. Per token: ``(1 - ε)(lse - u_y) + ε(lse -
    mean_j u_j) + z_loss·lse²`` with ``u = softcap·tanh(z/softcap)`` and ``ε = label_smoothing``
    (PyTorch's convention: ``ε/V`` of the mass on every class); ``z_loss`` adds only when non-zero,
    with the ``lse`` of what the cross-entropy sees (after the softcap). ``reduction``: ``"mean"``
    over the tokens that are not ignored (0, with zero gradients, when there are none; PyTorch
    gives NaN), ``"sum"``, or ``"none"`` (per token, 0 where ignored). ``shift=True`` (``hidden``
    ``[B, T, H]``, ``labels`` ``[B, T]``) pairs ``hidden[:, t]`` with ``labels[:, t+1]``: per-token
    outputs are ``[B, T-1]``, ``hidden[:, -1]`` gets a zero gradient, and ``hidden`` is not copied.
    ``return_lse=True`` returns ``(loss, lse)``, ``lse`` per token (0 where ignored; no gradient).
    For ``mean`` and ``sum`` the gradients are computed in the forward and only scaled in
    backward; for ``none`` backward recomputes the chunks. ``check_inputs``, ``group=`` and
    ``vocab_offset=`` (a vocabulary-parallel head: label smoothing and z-loss keep their global
    meaning) as in :func:`linear_logprob`.

    ``dp_group``: the *data-parallel* process group (``group`` is the vocabulary one): ``"mean"``
    then returns this rank's share, its tokens' sum over the whole group's count of tokens that are
    not ignored, so the ranks' losses and gradients sum to the whole batch's; ``grad_reduction="mean"``
    scales the gradient by the group's size for DDP/FSDP's averaging. See the Distributed guide.
    """
    weight, bias, shard = resolve_vocab_shard(weight, bias, group, vocab_offset)
    _check_head(hidden, weight, bias, labels, ignore_index, chunk_size)
    _check_ce_options(reduction, label_smoothing, z_loss, softcap, shift)
    check_dp(dp_group, grad_reduction)
    if dp_group is not None and reduction == "mean":
        out = linear_cross_entropy(hidden, weight, labels, bias=bias, reduction="sum", label_smoothing=label_smoothing,
                                   z_loss=z_loss, ignore_index=ignore_index, softcap=softcap, shift=shift,
                                   return_lse=return_lse, chunk_size=chunk_size, backend=backend,
                                   check_inputs=check_inputs, group=group, vocab_offset=vocab_offset)
        total, lse = out if return_lse else (out, None)
        scored = labels[..., 1:] if shift else labels
        n = global_counts([(scored != ignore_index).sum()], dp_group, total.device)[0]
        loss = scale_grad(total / n.clamp(min=1).to(total.dtype), dp_group, grad_reduction)
        return (loss, lse) if return_lse else loss
    if dp_group is not None:
        out = linear_cross_entropy(hidden, weight, labels, bias=bias, reduction=reduction,
                                   label_smoothing=label_smoothing, z_loss=z_loss, ignore_index=ignore_index,
                                   softcap=softcap, shift=shift, return_lse=return_lse, chunk_size=chunk_size,
                                   backend=backend, check_inputs=check_inputs, group=group, vocab_offset=vocab_offset)
        if return_lse:
            return scale_grad(out[0], dp_group, grad_reduction), out[1]
        return scale_grad(out, dp_group, grad_reduction)
    out_shape = labels.shape
    if shift:
        if hidden.dim() != 3:
            raise ValueError(f"shift=True needs hidden [B, T, H] and labels [B, T], got hidden {tuple(hidden.shape)}.")
        B, T = labels.shape
        # the labels move, not hidden: row (b, t) of the flat view is scored against labels[b, t+1]
        labels = torch.cat([labels[:, 1:], labels.new_full((B, 1), ignore_index)], dim=1)
        out_shape = (B, max(T - 1, 0))
    h, y, valid, chunk, triton_path = _flat_rows(hidden, weight, labels, shard, ignore_index, chunk_size, backend,
                                                 check_inputs)
    acc = _acc_dtype(hidden.dtype)
    if h.shape[0] == 0:
        lse = torch.zeros(out_shape, dtype=acc, device=hidden.device)
        loss = lse.clone() if reduction == "none" else (hidden.sum() * 0).to(acc) + (weight.sum() * 0).to(acc)
        return (loss, lse) if return_lse else loss
    opts = (1.0, None if softcap is None else float(softcap), shard)
    loss, lse = _CrossEntropyFunction.apply(h, weight, bias, y, valid, opts, (float(label_smoothing), float(z_loss)),
                                            reduction, chunk, triton_path, torch.is_grad_enabled())
    if shift:
        B, T = labels.shape
        lse = lse.reshape(B, T)[:, :-1]
        if reduction == "none":
            loss = loss.reshape(B, T)[:, :-1]
    else:
        lse = lse.reshape(out_shape)
        if reduction == "none":
            loss = loss.reshape(out_shape)
    return (loss, lse) if return_lse else loss


@dataclasses.dataclass
class LinearCrossEntropyConfig(LossConfig):
    """Configuration of :class:`LinearCrossEntropyLoss` (the options of :func:`linear_cross_entropy`)."""

    reduction: str = "mean"
    """``"mean"`` over the tokens that are not ignored (0 when there are none), ``"sum"`` or ``"none"``."""
    label_smoothing: float = 0.0
    """``ε`` in ``[0, 1]``: ``ε/V`` of the target mass on every class, as PyTorch's ``cross_entropy``."""
    z_loss: float = 0.0
    """The weight (>= 0) of ``lse²`` per token; 0 adds nothing."""
    ignore_index: int = -100
    """The label of a token that adds nothing and gets no gradient."""
    softcap: float | None = None
    """None, or ``c > 0``: the logits become ``c·tanh(z/c)`` before the softmax."""
    shift: bool = False
    """Pair ``hidden[:, t]`` with ``labels[:, t+1]`` (``[B, T, H]`` and ``[B, T]`` inputs)."""
    chunk_size: int | None = None
    """Rows per chunk, or None for :func:`fusedloss.losses.sp_linear.default_chunk_rows`."""
    backend: str = "auto"
    """``"auto"`` (the fused kernels on CUDA, else the reference), ``"triton"`` (the kernels or a clear error) or ``"torch"`` (the reference)."""
    check_inputs: bool = True
    """Check the labels' range with one host sync (False: no sync; pass False under ``torch.compile(fullgraph=True)``)."""
    grad_reduction: str = "sum"
    """With a data-parallel group (the module's ``group``, or ``dp_group`` at the call): ``"sum"`` or ``"mean"`` (scaled by the group's size, for DDP/FSDP's averaging)."""

    def check_values(self) -> None:
        _check_ce_options(self.reduction, self.label_smoothing, self.z_loss, self.softcap, self.shift)
        check_grad_reduction(self.grad_reduction)
        if self.chunk_size is not None and self.chunk_size < 1:
            raise ValueError(f"chunk_size must be None or an integer >= 1, got {self.chunk_size!r}.")
        check_config_common(self.backend)

    def build(self) -> LinearCrossEntropyLoss:
        """The :class:`LinearCrossEntropyLoss` of this config (the registry's factory interface)."""
        return LinearCrossEntropyLoss(self)


class LinearCrossEntropyLoss(VocabParallelLoss):
    """``nn.Module`` form of :func:`linear_cross_entropy`: ``forward(hidden, weight, labels,
    bias=None, dp_group=None, vocab_group=None, vocab_offset=None)``; pass the LM head's ``weight``
    (and ``bias``) so that their gradients flow. The module's :attr:`group` is its data-parallel
    group (``dp_group``), as for every loss module; :attr:`vocab_group` (the function's ``group``)
    is the group its head is split over, for a vocabulary-sharded ``weight``."""

    config_cls = LinearCrossEntropyConfig

    def forward(self, hidden, weight, labels, bias=None, dp_group=None, vocab_group=None, vocab_offset=None):
        c = self.cfg
        return linear_cross_entropy(hidden, weight, labels, bias=bias, reduction=c.reduction,
                                    label_smoothing=c.label_smoothing, z_loss=c.z_loss, ignore_index=c.ignore_index,
                                    softcap=c.softcap, shift=c.shift, chunk_size=c.chunk_size, backend=c.backend,
                                    check_inputs=c.check_inputs, grad_reduction=c.grad_reduction,
                                    **self._groups(dp_group, vocab_group, vocab_offset))


def _verify_cases(small: bool) -> list[VerifyCase]:
    N, H, V = (9, 8, 300) if small else (2048, 64, 5000)

    def make(dtype, device):
        g = torch.Generator().manual_seed(11)
        hidden = torch.randn(N, H, generator=g).to(dtype).to(device).requires_grad_()
        weight = (torch.randn(V, H, generator=g) / H ** 0.5).to(dtype).to(device).requires_grad_()
        labels = torch.randint(0, V, (N,), generator=g)
        labels[::4] = -100
        return hidden, weight, labels.to(device)

    def logprob_call(args, backend):
        lp, ent = linear_logprob(args[0], args[1], args[2], temperature=0.7, softcap=20.0, return_entropy=True,
                                 chunk_size=max(1, N // 3), backend=backend)
        w = torch.linspace(-1, 1, N, device=lp.device)
        return (lp * w).sum() + (ent * w.flip(0)).sum()

    def ce_call(args, backend):
        return linear_cross_entropy(args[0], args[1], args[2], label_smoothing=0.1, z_loss=1e-3,
                                    chunk_size=max(1, N // 3), backend=backend)

    shape = f"N={N} H={H} V={V}"
    return [VerifyCase("logprob+entropy,T=0.7,softcap=20", shape, make, logprob_call, name="linear_logprob"),
            VerifyCase("ce,ls=0.1,z_loss=1e-3,ignore", shape, make, ce_call, name="linear_cross_entropy")]


FAMILY = Family(
    name="lm_head",
    section="LM-head losses for RL on language models",
    exports=("linear_logprob", "linear_cross_entropy", "LinearCrossEntropyConfig", "LinearCrossEntropyLoss"),
    kernel="lm_head",
    factories={"linear_cross_entropy": LinearCrossEntropyConfig},
    verify_cases=_verify_cases,
)
