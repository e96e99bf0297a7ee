"""Distillation fused with the student's LM head: the ``[N, V]`` logits are never materialised.

:func:`sp_linear_loss` computes ``logits = hidden @ weight.T + bias`` a chunk of rows at a time,
the sp loss of the chunk and its gradient with respect to the chunk's logits (in one pass, on the
sp kernel on CUDA or the reference elsewhere), then the chunk's share of the gradients of
``hidden``, ``weight`` and ``bias`` by matmuls, and frees the chunk. Peak extra memory is
``O(chunk · V)`` plus the fp32 accumulators of the weight and bias gradients (``V·H + V``), not
``O(N · V)``. For ``reduction="mean"`` or ``"sum"`` the gradients are computed in the forward and
only scaled in backward; for ``"none"`` (a per-row upstream gradient) backward recomputes the
chunks.

The teacher is one of: a dense ``[N, V]`` tensor of teacher values (``-inf`` pads an action, as
``q_targets`` in the sp losses), :class:`TopKTeacher` (``index``, ``logprob`` ``[N, k]``) or
:class:`LinearTeacher` (``hidden``, ``weight``, ``bias``: its logits are computed chunk by chunk
too). The teacher gets no gradient.
"""

from __future__ import annotations

import dataclasses
import math

import torch

from .._dispatch import Backend, resolve_backend
from .._families import Family, VerifyCase
from ..metrics import finalize_metrics
from ._common import LossConfig, VocabParallelLoss, check_config_common, require_float, require_same_device
from ._data_parallel import check_dp, check_grad_reduction, global_counts, scale_grad
from ._vocab_parallel import _check_replicated, resolve_vocab_shard, sharded_q_star_checks, sp_sharded_rows_grad
from .sp import (
    align_teacher,
    align_topk_index,
    check_reduction,
    check_row_weight,
    check_sp_options,
    check_teacher_vocab,
    check_topk_loss_type,
    check_temperature_mode,
    check_topk_teacher,
    inverse_temperature,
    q_star_checks,
    rows_at_temperature,
    sp_reference,
    sp_topk_reference,
    student_at_temperature,
    topk_checks,
    vocab_mismatch_hint,
)

__all__ = ["TopKTeacher", "LinearTeacher", "sp_linear_loss", "default_chunk_size", "default_chunk_rows",
           "free_device_memory", "SpLinearLossConfig", "SpLinearLoss"]


@dataclasses.dataclass(frozen=True)
class TopKTeacher:
    """A teacher stored as its top-k log-probabilities: ``index`` int ``[N, k]`` (``-1`` for an
    unused slot) and ``logprob`` float ``[N, k]``."""

    index: torch.Tensor
    """int ``[N, k]``: the teacher's actions, ``-1`` for an unused slot."""
    logprob: torch.Tensor
    """float ``[N, k]``: the teacher's log-probabilities at ``index``."""


@dataclasses.dataclass(frozen=True)
class LinearTeacher:
    """A teacher given by its last hidden states and LM head: logits ``hidden @ weight.T + bias``
    (``hidden`` ``[N, H_t]``, ``weight`` ``[V, H_t]``, ``bias`` ``[V]`` or None), computed a chunk
    at a time and never as a whole."""

    hidden: torch.Tensor
    """``[N, H_t]``: the teacher's last hidden states."""
    weight: torch.Tensor
    """``[V, H_t]``: the teacher's LM head."""
    bias: torch.Tensor | None = None
    """``[V]`` or None: the teacher head's bias."""


CHUNK_MEMORY_FRACTION = 0.25  # of the device's free memory, at most, for one chunk's fp32 working set
CHUNK_BYTES_PER_LOGIT = 16  # fp32 logits, their gradient, a teacher's logits, and slack for the row statistics


def default_chunk_size(N: int, V: int, H: int, free_bytes: int | None = None) -> int:
    """Rows per chunk: a power of two near ``N·H / V``, so a chunk's logits take about as much memory
    as ``hidden`` itself (the rule of thumb of Liger-Kernel's fused-linear losses); at least 1, at
    most ``N``. With ``free_bytes`` (:func:`free_device_memory`), also at most the power of two of
    rows whose working set, ``CHUNK_BYTES_PER_LOGIT·V`` bytes a row, fits in
    ``CHUNK_MEMORY_FRACTION`` of it, so a nearly full device takes smaller chunks instead of failing."""
    per = max(1, math.ceil(V / max(H, 1)))
    rows = 1 << (max(1, math.ceil(N / per)) - 1).bit_length()
    if free_bytes is not None:
        fit = max(1, int(free_bytes * CHUNK_MEMORY_FRACTION) // (CHUNK_BYTES_PER_LOGIT * max(V, 1)))
        rows = min(rows, 1 << (fit.bit_length() - 1))
    return min(N, rows)


def free_device_memory(device: torch.device) -> int | None:
    """Free bytes on a CUDA device, counting the caching allocator's reserved but unused blocks
    (a driver query, no device sync); None on other devices and while ``torch.compile`` traces, where
    the chunk size comes from the shape alone."""
    if device.type != "cuda" or torch.compiler.is_compiling():
        return None
    free, _ = torch.cuda.mem_get_info(device)
    return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)


def default_chunk_rows(N: int, V: int, H: int, device: torch.device, shard=None) -> int:
    """The chunk a fused-linear loss takes when none is given: :func:`default_chunk_size` of the
    head's ``V`` rows and the free device memory, or, on a vocabulary shard, of the group's largest
    shard and the shape alone (free memory differs between ranks; every rank must run the same
    chunks, and so the same collectives)."""
    if shard is not None:
        return default_chunk_size(N, shard.max_rows, H)
    return default_chunk_size(N, V, H, free_device_memory(device))


_SHARD_HINT = ("If weight is this rank's shard of a vocabulary-parallel head, pass group= (a dense or linear "
               "teacher then comes sharded the same way; top-k ids stay global).")


def _wider_teacher(teacher, V: int) -> bool:
    """Whether ``teacher`` reaches past the student's ``V`` actions: a whole-vocabulary teacher
    against a head that may be one rank's shard."""
    if isinstance(teacher, TopKTeacher):
        index = teacher.index
        if not isinstance(index, torch.Tensor) or index.numel() == 0:
            return False
        return index.shape[-1] > V or bool((index >= V).any())  # a sync, on the way to an error only
    if isinstance(teacher, LinearTeacher):
        return isinstance(teacher.weight, torch.Tensor) and teacher.weight.dim() == 2 and teacher.weight.shape[0] > V
    return isinstance(teacher, torch.Tensor) and teacher.dim() == 2 and teacher.shape[-1] > V


def _check_teacher(teacher, hidden: torch.Tensor, V: int, loss_type: str, label_smoothing: float = 0.0,
                   V_ids: int | None = None) -> str:
    """The teacher's kind (``dense``, ``topk``, ``linear``) after its shape, dtype and device checks
    against the student's ``hidden`` ``[N, H]`` and ``V`` actions."""
    N = hidden.shape[0]
    if isinstance(teacher, TopKTeacher):
        check_topk_loss_type(loss_type, "loss_type with a TopKTeacher")
        check_topk_teacher(teacher.index, teacher.logprob, V if V_ids is None else V_ids, hidden, "hidden")
        if label_smoothing != 0.0:
            raise ValueError(f"label_smoothing must be 0 with a TopKTeacher, got {label_smoothing!r}: a teacher "
                             "that kept k of V log-probabilities does not say where the smoothing mass of the "
                             "other V - k actions would go. Smooth the teacher before taking its top k, or use a "
                             "dense or linear teacher.")
        return "topk"
    if isinstance(teacher, LinearTeacher):
        require_float(teacher.hidden, "teacher.hidden")
        require_float(teacher.weight, "teacher.weight")
        if teacher.hidden.dim() != 2 or teacher.hidden.shape[0] != N:
            raise ValueError(f"teacher.hidden must have shape [N, H_t] = [{N}, H_t], got {tuple(teacher.hidden.shape)}.")
        if teacher.weight.dim() != 2 or tuple(teacher.weight.shape) != (V, teacher.hidden.shape[1]):
            raise ValueError(f"teacher.weight must have shape [V, H_t] = [{V}, {teacher.hidden.shape[1]}], got "
                             f"{tuple(teacher.weight.shape)}."
                             + vocab_mismatch_hint(teacher.weight.shape[::-1], (teacher.hidden.shape[1], V)))
        if teacher.bias is not None:
            require_float(teacher.bias, "teacher.bias")
            if tuple(teacher.bias.shape) != (V,):
                raise ValueError(f"teacher.bias must have shape [V] = ({V},), got {tuple(teacher.bias.shape)}.")
        dtypes = {"teacher.hidden": teacher.hidden.dtype, "teacher.weight": teacher.weight.dtype}
        if teacher.bias is not None:
            dtypes["teacher.bias"] = teacher.bias.dtype
        if len(set(dtypes.values())) > 1:
            raise TypeError("a LinearTeacher's hidden, weight and bias must share a dtype, got "
                            + ", ".join(f"{k} {v}" for k, v in dtypes.items()) + ".")
        require_same_device({"hidden": hidden, "teacher.hidden": teacher.hidden,
                             "teacher.weight": teacher.weight, "teacher.bias": teacher.bias})
        return "linear"
    if isinstance(teacher, torch.Tensor):
        require_float(teacher, "teacher")
        if tuple(teacher.shape) != (N, V):
            raise ValueError(f"a dense teacher must have shape [N, V] = [{N}, {V}], got {tuple(teacher.shape)}."
                             + vocab_mismatch_hint(teacher.shape, (N, V)))
        require_same_device({"hidden": hidden, "teacher": teacher})
        return "dense"
    raise TypeError("teacher must be a dense [N, V] tensor, a fusedloss.TopKTeacher or a fusedloss.LinearTeacher, "
                    f"got {type(teacher).__name__}.")


def _align_teacher(teacher, V: int, mode: str):
    """``teacher`` over the student's ``V`` actions under ``teacher_vocab=mode``: a dense teacher as
    :func:`fusedloss.losses.sp.align_teacher`, a top-k one as :func:`fusedloss.losses.sp.align_topk_index`,
    and a linear one by its head: the first ``V`` rows of a wider ``weight`` and ``bias`` (views),
    or a narrower head padded with zero rows and a ``-inf`` bias (one copy of the head), so that
    the student's extra actions are padded actions."""
    check_teacher_vocab(mode)
    if mode == "strict":
        return teacher
    if isinstance(teacher, TopKTeacher):
        return TopKTeacher(align_topk_index(teacher.index, V, mode), teacher.logprob)
    if isinstance(teacher, LinearTeacher) and isinstance(teacher.weight, torch.Tensor) and teacher.weight.dim() == 2:
        w, b = teacher.weight, teacher.bias
        Vt = w.shape[0]
        if b is not None and (not isinstance(b, torch.Tensor) or tuple(b.shape) != (Vt,)):
            got = tuple(b.shape) if isinstance(b, torch.Tensor) else type(b).__name__
            raise ValueError(f"teacher.bias must have shape [V_t] = ({Vt},), the rows of teacher.weight "
                             f"{tuple(w.shape)}, got {got}.")
        if Vt > V:
            return LinearTeacher(teacher.hidden, w[:V], None if b is None else b[:V])
        if Vt < V:
            b = torch.zeros(Vt, dtype=w.dtype, device=w.device) if b is None else b
            pad = torch.nn.functional.pad
            return LinearTeacher(teacher.hidden, pad(w, (0, 0, 0, V - Vt)), pad(b, (0, V - Vt), value=float("-inf")))
        return teacher
    return align_teacher(teacher, V, mode)


def _teacher_tensors(kind: str, teacher) -> tuple:
    """The teacher as three tensors (None where absent), so that autograd saves them for backward
    and checks their version counters, and ``torch.compile`` sees plain arguments."""
    if kind == "dense":
        return teacher, None, None
    if kind == "topk":
        return teacher.index, teacher.logprob, None
    return teacher.hidden, teacher.weight, teacher.bias


def _teacher_chunk(kind: str, t: tuple, r0: int, r1: int):
    t0, t1, t2 = t
    if kind == "dense":
        return t0[r0:r1].detach()
    if kind == "topk":
        return t0[r0:r1], t1[r0:r1].detach()
    logits = t0[r0:r1].detach() @ t1.detach().T
    return logits if t2 is None else logits + t2.detach()


def _chunk_loss_grad(kind, t_chunk, z, opts, triton_path: bool, need_grad: bool = True):
    """Per-row losses (fp32) of one chunk of student logits ``z`` and their gradient ``d(Σ rows)/dz``
    (None on the reference path when ``need_grad`` is False; the kernel writes it in its one pass).
    The kernel runs through its custom ops, so ``torch.compile`` traces it."""
    loss_type, temperature, eps, beta, mode, shard = opts
    if mode != "teacher":  # the student at temperature too: L(z/T) (·T²), so d/dz = (1/T)(·T²)·L'(z/T)
        z = student_at_temperature(z, temperature, mode)
        rows, g = _chunk_loss_grad(kind, t_chunk, z, (loss_type, temperature, eps, beta, "teacher", shard),
                                   triton_path, need_grad)
        factor = inverse_temperature(temperature, z.dtype) * (temperature ** 2 if mode == "both_t2" else 1.0)
        return rows_at_temperature(rows, temperature, mode), None if g is None else g * factor
    if shard is not None:  # a vocabulary shard: the whole-row formulas with global statistics, in PyTorch
        return sp_sharded_rows_grad(kind, t_chunk, z, loss_type, temperature, eps, beta, shard, need_grad)
    if triton_path:
        from ..kernels import sp as kernels

        if kind == "topk":
            return kernels.sp_topk_op(t_chunk[0], t_chunk[1], z, loss_type, temperature)
        return kernels.sp_op(t_chunk, z, loss_type, temperature, eps, beta)

    def rows_of(zz):
        if kind == "topk":
            return sp_topk_reference(t_chunk[0], t_chunk[1], zz, loss_type, temperature)
        return sp_reference(t_chunk, zz, loss_type, temperature, eps, beta)

    if not need_grad:
        return rows_of(z.detach()), None
    # torch.func.vjp rather than autograd.grad: Dynamo traces it, so fullgraph compile works on this path too
    rows, vjp = torch.func.vjp(rows_of, z.detach())
    return rows.detach(), vjp(torch.ones_like(rows))[0]


def _chunks(N: int, chunk: int):
    return [(r0, min(r0 + chunk, N)) for r0 in range(0, N, chunk)]


def _pass(hidden, weight, bias, kind, teacher, row_weight, opts, chunk, triton_path, row_scale=None,
          want=(True, True, True)):
    """One sweep over the chunks: per-row weighted losses and, where ``want`` asks, the gradients of
    ``Σ_r row_scale[r]·w[r]·L[r]`` with respect to ``hidden``, ``weight`` and ``bias``. A row whose
    weight is 0 adds exactly 0 to all of them (even where its loss is NaN). The weight and bias
    gradients are products and sums in fp32 (fp64 for fp64 inputs), whatever the input dtype: a
    sum over ``N`` rows of fp16 products overflows long before the ``1/N`` of the mean."""
    N = hidden.shape[0]
    acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    shard = opts[5]
    rows = torch.empty(N, dtype=acc, device=hidden.device)
    # a vocabulary shard's partial gradients of hidden are summed over the group: in fp32, once, at the end
    g_hidden = (torch.empty(N, hidden.shape[1], dtype=acc, device=hidden.device) if shard is not None
                else torch.empty_like(hidden)) if want[0] else None
    g_weight = torch.zeros(weight.shape, dtype=acc, device=weight.device) if want[1] else None
    g_bias = torch.zeros(weight.shape[0], dtype=acc, device=weight.device) if want[2] else None
    w_det, b_det = weight.detach(), None if bias is None else bias.detach()
    for r0, r1 in _chunks(N, chunk):
        h = hidden[r0:r1].detach()
        if row_weight is not None:  # a masked row's hidden state never reaches a product, even as NaN
            h = torch.where((row_weight[r0:r1] == 0)[:, None], torch.zeros((), dtype=h.dtype, device=h.device), h)
        z = h @ w_det.T
        if b_det is not None:
            z = z + b_det
        rows_c, g = _chunk_loss_grad(kind, _teacher_chunk(kind, teacher, r0, r1), z, opts, triton_path, any(want))
        del z
        scale = None if row_weight is None else row_weight[r0:r1].to(acc)
        if scale is not None:
            rows_c = torch.where(scale == 0, torch.zeros_like(rows_c), rows_c * scale)
        rows[r0:r1] = rows_c
        if not any(want):
            continue
        if row_scale is not None:
            scale = row_scale[r0:r1].to(acc) if scale is None else scale * row_scale[r0:r1].to(acc)
        if scale is not None:
            g = torch.where((scale == 0)[:, None], torch.zeros((), dtype=g.dtype, device=g.device),
                            g * scale[:, None].to(g.dtype))
        if g_hidden is not None:
            g_hidden[r0:r1] = g.to(acc) @ w_det.to(acc) if shard is not None else g.to(hidden.dtype) @ w_det
        if g_weight is not None:
            g_weight.addmm_(g.to(acc).T, h.to(acc))
        if g_bias is not None:
            g_bias += g.to(acc).sum(dim=0)
        del g
    if shard is not None and g_hidden is not None:
        g_hidden = shard.all_reduce(g_hidden).to(hidden.dtype)
    return rows, g_hidden, g_weight, g_bias


class _SpLinearFunction(torch.autograd.Function):
    """Everything backward reads goes through ``save_for_backward``: autograd frees it after the
    first backward (a second one raises, as for any autograd graph) and raises when a saved tensor,
    the teacher's included, was modified in place in between."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, row_weight, t0, t1, t2, kind, opts, reduction, chunk, triton_path,
                grad_mode):
        teacher = (t0, t1, t2)
        want = tuple(bool(n) and grad_mode for n in ctx.needs_input_grad[:3])  # nothing under no_grad
        ctx.reduction, ctx.want, ctx.dtypes = reduction, want, (hidden.dtype, weight.dtype,
                                                                None if bias is None else bias.dtype)
        if reduction == "none":  # per-row upstream gradients: backward recomputes the chunks
            rows, *_ = _pass(hidden, weight, bias, kind, teacher, row_weight, opts, chunk, triton_path,
                             want=(False, False, False))
            ctx.save_for_backward(hidden, weight, bias, row_weight, t0, t1, t2)
            ctx.args = (kind, opts, chunk, triton_path)
            return rows
        rows, gh, gw, gb = _pass(hidden, weight, bias, kind, teacher, row_weight, opts, chunk, triton_path,
                                 want=want)
        ctx.save_for_backward(gh, gw, gb)
        ctx.inv_n = 1.0 / hidden.shape[0] if reduction == "mean" else 1.0
        return rows.sum() * ctx.inv_n

    @staticmethod
    def backward(ctx, grad_out):
        if torch.is_grad_enabled():  # create_graph=True: the stored gradients have no graph of their own
            raise RuntimeError("sp_linear_loss does not support double backward (create_graph=True); its gradients "
                               "are computed chunk by chunk without a graph. Use the materialised sp losses for "
                               "higher-order derivatives.")
        if ctx.reduction == "none":
            hidden, weight, bias, row_weight, t0, t1, t2 = ctx.saved_tensors
            kind, opts, chunk, triton_path = ctx.args
            _, gh, gw, gb = _pass(hidden, weight, bias, kind, (t0, t1, t2), row_weight, opts, chunk, triton_path,
                                  row_scale=grad_out, want=ctx.want)
            scale = None
        else:
            gh, gw, gb = ctx.saved_tensors
            scale = grad_out * ctx.inv_n  # a 0-dim device tensor: no sync
        out = []
        for g, dtype in zip((gh, gw, gb), ctx.dtypes):
            if g is None:
                out.append(None)
            else:
                out.append((g if scale is None else g.to(scale.dtype) * scale).to(dtype))
        return (*out,) + (None,) * 10


def sp_linear_loss(hidden, weight, teacher, loss_type: str, temperature: float = 1.0, label_smoothing: float = 0.0,
                   js_beta: float = 0.5, *, bias=None, reduction: str = "mean", row_weight=None,
                   chunk_size: int | None = None, backend: str = "auto", check_inputs: bool = True,
                   temperature_mode: str = "teacher", teacher_vocab: str = "strict", group=None,
                   vocab_offset: int | None = None, dp_group=None, grad_reduction: str = "sum"):
    """Distillation loss of the student head ``logits = hidden @ weight.T + bias`` against
    ``teacher``, without ever holding the ``[N, V]`` logits or their gradient.

    ``hidden``: ``[N, H]``; ``weight``: ``[V, H]``; ``bias``: ``[V]`` or None. ``teacher``: a dense
    ``[N, V]`` tensor of teacher values (``-inf`` for padded actions), a :class:`TopKTeacher` or a
    :class:`LinearTeacher`. ``loss_type``: any sp loss type (``"ce"``, ``"ce-soft-fwd"``,
    ``"ce-soft-bwd"``, ``"kl-fwd"``, ``"kl-bwd"``, ``"js"``), only ``"kl-fwd"``/``"ce-soft-fwd"`` for
    a top-k teacher; ``temperature``, ``label_smoothing`` and ``js_beta`` mean what they mean in
    the sp losses. ``row_weight``: optional ``[N]`` factor of each row's loss; a row of weight 0
    adds nothing (the padding and prompt mask). ``reduction``: ``"mean"`` (over ``N``), ``"sum"``,
    ``"none"`` (``[N]``). ``chunk_size``: rows per chunk (default :func:`default_chunk_rows`).
    Gradients flow to ``hidden``, ``weight`` and ``bias``; the teacher gets none. The loss is fp32
    (fp64 for fp64 inputs); gradients come back in their inputs' dtypes. ``check_inputs`` checks a
    dense or top-k teacher's values with one host sync, as the sp helpers do; pass ``False`` for a
    sync-free call. ``temperature_mode`` as in :func:`fusedloss.sp_soft_ce_loss` (``"both"``
    divides each chunk's student logits by ``T`` too, in fp32). ``teacher_vocab``: ``"strict"``
    (the default: the teacher covers the student's ``V`` exactly) or ``"align"``: a teacher with
    a wider vocabulary is truncated to the first ``V`` ids (a top-k slot beyond them is unused), a
    narrower one padded with ``-inf`` (a linear teacher's head with zero rows and a ``-inf`` bias),
    as :func:`fusedloss.sp_soft_ce_loss` does.

    **Vocabulary parallel.** With ``group=`` (or a ``Shard(0)`` DTensor ``weight``), ``weight`` and
    ``bias`` are this rank's rows of the student head, as in :func:`fusedloss.linear_logprob`; a
    dense teacher is ``[N, V_r]``, the same columns, and a ``LinearTeacher``'s head the same rows; a
    ``TopKTeacher``'s ids are global. Each chunk all-gathers a few numbers per row and all-reduces
    two; every rank returns the same loss, the full gradient of ``hidden``, and its rows of the
    head's gradient. That path runs the PyTorch formulas per chunk, not the fused kernel.

    **Data parallel.** ``dp_group`` (``group`` is the vocabulary one): ``"mean"`` then returns this
    rank's share, its rows' (weighted) sum over the whole group's count of rows, so the ranks'
    losses and gradients sum to the whole batch's; ``grad_reduction="mean"`` scales the gradient
    by the group's size for DDP/FSDP's averaging.
    """
    check_dp(dp_group, grad_reduction)
    if dp_group is not None:
        total = sp_linear_loss(hidden, weight, teacher, loss_type, temperature, label_smoothing, js_beta, bias=bias,
                               reduction="sum" if reduction == "mean" else reduction, row_weight=row_weight,
                               chunk_size=chunk_size, backend=backend, check_inputs=check_inputs,
                               temperature_mode=temperature_mode, teacher_vocab=teacher_vocab, group=group,
                               vocab_offset=vocab_offset)
        if reduction == "mean":
            n = global_counts([hidden.shape[0]], dp_group, total.device)[0]
            total = total / n.to(total.dtype)
        return scale_grad(total, dp_group, grad_reduction)
    weight, bias, shard = resolve_vocab_shard(weight, bias, group, vocab_offset)
    if shard is not None and teacher_vocab != "strict":
        raise ValueError("teacher_vocab='align' is not supported with a vocabulary-sharded head: shard the teacher "
                         "to the student's columns.")
    require_float(hidden, "hidden")
    require_float(weight, "weight")
    if hidden.dim() != 2 or hidden.shape[0] == 0:
        raise ValueError(f"hidden must have shape [N, H] with N >= 1, got {tuple(hidden.shape)}.")
    N, H = hidden.shape
    if weight.dim() != 2 or weight.shape[1] != H or weight.shape[0] == 0:
        raise ValueError(f"weight must have shape [V, H] = [V, {H}] with V >= 1, got {tuple(weight.shape)}.")
    V = weight.shape[0]
    if weight.dtype != hidden.dtype:
        raise TypeError(f"hidden and weight must share a dtype, got {hidden.dtype} and {weight.dtype}.")
    if bias is not None:
        require_float(bias, "bias")
        if tuple(bias.shape) != (V,):
            raise ValueError(f"bias must have shape [V] = ({V},), got {tuple(bias.shape)}.")
    check_sp_options(loss_type, temperature, label_smoothing, js_beta)
    check_reduction(reduction)
    check_row_weight(row_weight, hidden, "row_weight", "hidden")
    if row_weight is not None:
        row_weight = row_weight.detach()
    if chunk_size is None:
        chunk_size = default_chunk_rows(N, V, H, hidden.device, shard)
    elif isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be None or an integer >= 1, got {chunk_size!r}.")
    require_same_device({"hidden": hidden, "weight": weight, "bias": bias})
    teacher = _align_teacher(teacher, V, teacher_vocab)
    V_ids = V if shard is None else shard.vocab  # a top-k teacher's ids are global
    try:
        kind = _check_teacher(teacher, hidden, V, loss_type, label_smoothing, V_ids)
    except ValueError as exc:
        if shard is not None or teacher_vocab != "strict" or not _wider_teacher(teacher, V):
            raise
        raise ValueError(f"{exc} {_SHARD_HINT}") from None
    floats = [hidden, weight] + ([teacher] if kind == "dense" else [teacher.logprob] if kind == "topk" else [])
    triton_path = resolve_backend(backend, "sp", *floats) is Backend.TRITON
    check_temperature_mode(temperature_mode)
    if shard is not None and check_inputs:
        _check_replicated(hidden, shard, "hidden")
    opts = (loss_type, float(temperature), float(label_smoothing), float(js_beta), temperature_mode, shard)
    loss = _SpLinearFunction.apply(hidden, weight, bias, row_weight, *_teacher_tensors(kind, teacher), kind, opts,
                                   reduction, chunk_size, triton_path, torch.is_grad_enabled())
    if check_inputs and kind == "dense":
        checks = q_star_checks(teacher, "teacher") if shard is None else sharded_q_star_checks(teacher, shard, "teacher")
        finalize_metrics({}, checks, "float")
    elif check_inputs and kind == "topk":
        finalize_metrics({}, topk_checks(teacher.index, teacher.logprob, V_ids), "float")
    return loss


@dataclasses.dataclass
class SpLinearLossConfig(LossConfig):
    """Configuration of :class:`SpLinearLoss` (the fields are :func:`sp_linear_loss`'s options)."""

    loss_type: str = "kl-fwd"
    """The sp loss type (see :func:`sp_linear_loss` and :func:`fusedloss.sp_topk_loss`)."""
    temperature: float = 1.0
    """Divides the teacher's values (> 0), and with ``temperature_mode`` the student's too."""
    label_smoothing: float = 0.0
    """Uniform mass mixed into the teacher, in ``[0, 1]``."""
    js_beta: float = 0.5
    """The β of ``"js"``, strictly inside ``(0, 1)``."""
    reduction: str = "mean"
    """``"mean"`` (over rows), ``"sum"`` or ``"none"``."""
    chunk_size: int | None = None
    """Rows per chunk, or None for :func:`default_chunk_rows`."""
    backend: str = "auto"
    """``"auto"`` (the fused kernel on CUDA where one exists, else the reference), ``"triton"`` (the kernel or a clear error) or ``"torch"`` (the reference)."""
    check_inputs: bool = True
    """Check the teacher's values with one host sync (False: no sync)."""
    temperature_mode: str = "teacher"
    """``"teacher"``, ``"both"`` or ``"both_t2"``, as :attr:`fusedloss.SpLossConfig.temperature_mode`."""
    teacher_vocab: str = "strict"
    """``"strict"`` or ``"align"`` (truncate a wider teacher, pad a narrower one), as in :func:`sp_linear_loss`."""
    grad_reduction: str = "sum"
    """With a data-parallel group (the module's ``group``, or ``dp_group`` at the call): ``"sum"`` or ``"mean"`` (scaled by the group's size, for DDP/FSDP's averaging)."""

    def check_values(self) -> None:
        check_grad_reduction(self.grad_reduction)
        check_temperature_mode(self.temperature_mode)
        check_teacher_vocab(self.teacher_vocab)
        check_sp_options(self.loss_type, self.temperature, self.label_smoothing, self.js_beta)
        check_reduction(self.reduction)
        if self.chunk_size is not None and self.chunk_size < 1:
            raise ValueError(f"chunk_size must be None or an integer >= 1, got {self.chunk_size!r}.")
        check_config_common(self.backend)

    def build(self) -> SpLinearLoss:
        """The :class:`SpLinearLoss` of this config (the registry's factory interface)."""
        return SpLinearLoss(self)


class SpLinearLoss(VocabParallelLoss):
    """``nn.Module`` form of :func:`sp_linear_loss`: ``forward(hidden, weight, teacher, bias=None,
    row_weight=None, dp_group=None, vocab_group=None, vocab_offset=None)``; pass the LM head's
    ``weight`` (and ``bias``) so their gradients flow. The module's :attr:`group` is its
    data-parallel group (``dp_group``); :attr:`vocab_group` (the function's ``group``) is the group
    its head is split over, for a vocabulary-sharded ``weight``."""

    config_cls = SpLinearLossConfig

    def forward(self, hidden, weight, teacher, bias=None, row_weight=None, dp_group=None, vocab_group=None,
                vocab_offset=None):
        c = self.cfg
        return sp_linear_loss(hidden, weight, teacher, c.loss_type, c.temperature, c.label_smoothing, c.js_beta,
                              bias=bias, reduction=c.reduction, row_weight=row_weight, chunk_size=c.chunk_size,
                              backend=c.backend, check_inputs=c.check_inputs, temperature_mode=c.temperature_mode,
                              teacher_vocab=c.teacher_vocab, grad_reduction=c.grad_reduction,
                              **self._groups(dp_group, vocab_group, vocab_offset))


def _verify_cases(small: bool) -> list[VerifyCase]:
    from .. import testing as T

    N, H, V = (12, 8, 300) if small else (4096, 64, 1000)

    def make(dtype, device):
        hidden, weight, _, teacher, _ = T.make_sp_linear_inputs(N, H, V, "dense", dtype, device, seed=9, pad=0.1)
        return teacher, hidden, weight

    def call(args, backend):
        return sp_linear_loss(args[1], args[2], args[0], "js", 1.2, 0.05, 0.3, chunk_size=max(1, N // 5),
                              backend=backend)

    return [VerifyCase("js,beta=0.3,T=1.2,ls=0.05,pad", f"N={N} H={H} V={V}", make, call)]


FAMILY = Family(
    name="sp_linear",
    section="Policy distillation",
    exports=("sp_linear_loss", "TopKTeacher", "LinearTeacher", "SpLinearLossConfig", "SpLinearLoss"),
    kernel="sp",
    factories={"sp_linear": SpLinearLossConfig},
    verify_cases=_verify_cases,
)
