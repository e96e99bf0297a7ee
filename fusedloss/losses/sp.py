"""Supervised policy (distillation) losses: hard CE, soft CE fwd/bwd, KL fwd/bwd and JS.

Semantics, shared by the reference and the fused kernel:

- The teacher distribution is ``P = softmax(q_star / temperature)``; the temperature divides only
  the teacher, and there is no ``T²`` factor. The student distribution is ``Q = softmax(logits)``.
- ``label_smoothing = ε`` mixes uniform mass into the teacher only: ``(1 - ε) P + ε / A_valid``.
  For ``"ce"`` the target is ``argmax(q_star)`` with PyTorch's ``cross_entropy`` smoothing.
- ``js`` is the generalized Jensen–Shannon divergence ``JSD_β(P‖Q) = β·KL(P‖M) + (1−β)·KL(Q‖M)``
  with ``M = βP + (1−β)Q`` (``js_beta = β`` strictly inside ``(0, 1)``; ``0.5`` is the symmetric JS).
- The teacher gets no gradient. ``q_star = -inf`` marks a padded action. It drops out of both distributions (``A_valid`` counts the
  rest) and the student logit there gets zero gradient. NaN, ``+inf``, or a row with no finite entry
  is an error.
- ``temperature_mode`` also divides the student (``"both"``, ``"both_t2"``); ``teacher_vocab="align"``
  truncates a wider teacher to the student's actions and pads a narrower one with ``-inf``.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Any

import torch

from .._dispatch import Backend, resolve_backend
from .._families import Family, VerifyCase
from ..metrics import AnyEqual, finalize_metrics
from ._common import (
    ConfigLoss,
    LossConfig,
    check_config_common,
    check_loss_config,
    check_positive,
    compute_dtype,
    require_float,
    require_same_device,
    stream_get,
)
from ._data_parallel import check_dp, check_grad_reduction, global_counts, scale_grad

__all__ = [
    "SP_LOSS_TYPES",
    "TOPK_LOSS_TYPES",
    "SpLossConfig",
    "sp_loss",
    "sp_reference",
    "sp_soft_ce_loss",
    "sp_kl_loss",
    "sp_js_loss",
    "sp_topk_loss",
    "sp_topk_reference",
    "SpTopKLossConfig",
    "SpTopKLoss",
    "SpLoss",
]

SP_LOSS_TYPES = ("ce", "ce-soft-fwd", "ce-soft-bwd", "js", "kl-fwd", "kl-bwd")
REDUCTIONS = ("mean", "sum", "none")


@dataclasses.dataclass
class SpLossConfig(LossConfig):
    """Configuration of :func:`sp_loss`, with the seed's fields and defaults, plus ``js_beta``
    (the β of ``loss_type="js"``, strictly inside ``(0, 1)``; 0.5 is the symmetric JS)."""

    weight: float = 0.0
    """The loss's weight in the trainer's sum (carried for the trainer; the loss functions do not use it)."""
    label_smoothing: float = 0.0
    """Uniform mass mixed into the teacher, in ``[0, 1]`` (PyTorch's smoothing for ``"ce"``)."""
    loss_type: str = "ce"
    """One of ``"ce"``, ``"ce-soft-fwd"``, ``"ce-soft-bwd"``, ``"kl-fwd"``, ``"kl-bwd"``, ``"js"``."""
    temperature: float = 1.0
    """Divides the teacher's values (> 0), and with ``temperature_mode`` the student's too."""
    backend: str = "auto"
    """``"auto"`` (the fused kernel on CUDA where one exists, else the reference), ``"triton"`` (the kernel or a clear error) or ``"torch"`` (the reference)."""
    metrics_mode: str = "float"
    """``"float"``: metrics as a ``dict[str, float]`` with one host transfer (and the input checks raised then); ``"lazy"``: a :class:`fusedloss.LazyMetrics`, no host sync."""
    js_beta: float = 0.5
    """The β of ``"js"``, strictly inside ``(0, 1)``; 0.5 is the symmetric JS."""
    temperature_mode: str = "teacher"
    """``"teacher"`` (``temperature`` divides the teacher only, the reference semantics), ``"both"`` (the student too, as TRL's GKD and Liger) or ``"both_t2"`` (both, times ``T²``)."""
    teacher_vocab: str = "strict"
    """``"strict"`` (``q_star`` has the student's ``A``) or ``"align"`` (a wider teacher truncated to ``A``, a narrower one padded with ``-inf``)."""
    grad_reduction: str = "sum"
    """With a data-parallel ``group``: ``"sum"`` (the ranks' gradients sum to the batch's) or ``"mean"`` (scaled by the group's size, for DDP/FSDP's averaging)."""

    def check_values(self) -> None:
        check_sp_options(self.loss_type, self.temperature, self.label_smoothing, self.js_beta)
        check_grad_reduction(self.grad_reduction)
        check_temperature_mode(self.temperature_mode)
        check_teacher_vocab(self.teacher_vocab)
        check_config_common(self.backend, self.metrics_mode)

    def build(self) -> SpLoss:
        """The :class:`SpLoss` of this config (the registry's factory interface)."""
        return SpLoss(self)


def check_js_beta(beta: float, name: str = "js_beta") -> None:
    if not (isinstance(beta, numbers.Real) and not isinstance(beta, bool) and 0.0 < beta < 1.0):
        raise ValueError(f"{name} must be a number strictly inside (0, 1), got {beta!r}.")


def check_reduction(reduction: str) -> None:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}.")


def check_row_weight(weight, rows: torch.Tensor, name: str = "weight", rows_name: str = "logits") -> None:
    """An optional per-row factor: a float ``[N]`` tensor on the device of ``rows`` (``[N, ...]``)."""
    if weight is None:
        return
    require_float(weight, name)
    N = rows.shape[0]
    if tuple(weight.shape) != (N,):
        raise ValueError(f"{name} must have shape [N] = ({N},), got {tuple(weight.shape)}.")
    require_same_device({rows_name: rows, name: weight})


def check_sp_options(loss_type: str, temperature: float, label_smoothing: float, js_beta: float = 0.5) -> None:
    check_js_beta(js_beta)
    if loss_type not in SP_LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {SP_LOSS_TYPES}, got {loss_type!r}.")
    check_positive(temperature, "temperature")
    if not (isinstance(label_smoothing, numbers.Real) and 0.0 <= label_smoothing <= 1.0):
        raise ValueError(f"label_smoothing must be a number in [0, 1], got {label_smoothing!r}.")


def inverse_temperature(temperature: float, dtype: torch.dtype) -> float:
    """``1/T``, at most ``finfo(dtype).max``, as the kernels scale: a ``T`` below the dtype's smallest
    subnormal would round to 0 and give ``0/0 = NaN`` at the row max, where the limit ``T -> 0`` is
    the one-hot teacher."""
    return min(1.0 / float(temperature), torch.finfo(dtype).max)


def _over_temperature(x: torch.Tensor, temperature: float) -> torch.Tensor:
    """``x / T`` as ``x · inverse_temperature(T)``."""
    return x * inverse_temperature(temperature, x.dtype)


TEMPERATURE_MODES = ("teacher", "both", "both_t2")


def check_temperature_mode(mode: str) -> None:
    if mode not in TEMPERATURE_MODES:
        raise ValueError(f"temperature_mode must be one of {TEMPERATURE_MODES}, got {mode!r}.")


TEACHER_VOCAB_MODES = ("strict", "align")
_ALIGN_HINT = ("Pass teacher_vocab='align' to truncate a wider teacher to the student's V (its extra ids are the "
               "padding rows of a larger embedding, as Qwen2.5-7B's 152064 against 0.5B's 151936) or pad a "
               "narrower one with -inf.")


def check_teacher_vocab(mode: str) -> None:
    if mode not in TEACHER_VOCAB_MODES:
        raise ValueError(f"teacher_vocab must be one of {TEACHER_VOCAB_MODES}, got {mode!r}.")


def vocab_mismatch_hint(teacher_shape, student_shape) -> str:
    """The ``teacher_vocab`` hint when two shapes differ in their last dimension only."""
    t, s = tuple(teacher_shape), tuple(student_shape)
    return f" {_ALIGN_HINT}" if len(t) == len(s) and t[:-1] == s[:-1] and t[-1] != s[-1] else ""


def align_teacher(teacher: torch.Tensor, V: int, mode: str) -> torch.Tensor:
    """A dense teacher ``[..., V_t]`` over the student's ``V`` actions. ``"strict"``: unchanged (the
    shape check then names the mismatch). ``"align"``: the first ``V`` columns of a wider teacher
    (a view, no copy: the teacher's softmax is renormalised over the shared ids), or a narrower
    one padded with ``-inf`` (one copy): the student's extra actions are padded actions, which drop
    out of both distributions and get zero gradient, as any ``-inf`` teacher value."""
    check_teacher_vocab(mode)
    if mode == "strict" or not isinstance(teacher, torch.Tensor) or teacher.dim() < 1 or not teacher.is_floating_point():
        return teacher  # the checks that follow name what is wrong
    Vt = teacher.shape[-1]
    if Vt > V:
        return teacher[..., :V]
    if Vt < V:
        return torch.nn.functional.pad(teacher, (0, V - Vt), value=float("-inf"))
    return teacher


def align_topk_index(index: torch.Tensor, V: int, mode: str) -> torch.Tensor:
    """A top-k teacher's index over the student's ``V`` actions: with ``"align"``, a slot naming an id
    ``>= V`` (the wider teacher's) becomes unused (``-1``), and the teacher renormalises over the rest,
    as it does over its used slots; a narrower teacher needs nothing."""
    check_teacher_vocab(mode)
    if mode == "strict" or not isinstance(index, torch.Tensor):
        return index
    return torch.where(index < V, index, torch.full_like(index, -1))


def student_at_temperature(logits: torch.Tensor, temperature: float, mode: str) -> torch.Tensor:
    """The student's logits as the loss sees them: unchanged with ``mode="teacher"``, else divided
    by ``T`` as well (in fp32 for bf16/fp16 logits, so the division adds no rounding of its own;
    autograd carries the ``1/T`` into their gradient)."""
    if mode == "teacher":
        return logits
    z = logits.float() if logits.dtype in (torch.bfloat16, torch.float16) else logits
    return _over_temperature(z, temperature)


def rows_at_temperature(rows: torch.Tensor, temperature: float, mode: str) -> torch.Tensor:
    """Per-row losses times ``T²`` with ``mode="both_t2"`` (Hinton's scaling), else unchanged."""
    return rows * (float(temperature) ** 2) if mode == "both_t2" else rows


def _wmul(w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``w·x`` with ``0·x = 0`` for any ``x`` (the ``0·log 0`` convention, also where a log
    overflowed to -inf), with finite gradients there; NaN weights stay NaN."""
    return w * torch.where(w == 0, torch.zeros((), dtype=x.dtype, device=x.device), x)


def sp_reference(
    q_targets: torch.Tensor,
    logits: torch.Tensor,
    loss_type: str,
    temperature: float = 1.0,
    label_smoothing: float = 0.0,
    js_beta: float = 0.5,
) -> torch.Tensor:
    """Per-row loss ``[N]`` for ``[N, A]`` teacher values and student logits (fp32, or fp64).
    The teacher is a target: it gets no gradient. ``js_beta`` is the β of ``"js"``."""
    cd = compute_dtype(q_targets, logits)
    q = q_targets.detach().to(cd)
    pad = q == float("-inf")
    log_s = torch.log_softmax(logits.to(cd).masked_fill(pad, float("-inf")), dim=-1)
    log_s0 = log_s.masked_fill(pad, 0.0)  # finite everywhere, so masked products have finite grads
    n_valid = (~pad).sum(dim=-1, keepdim=True).to(cd)
    eps = float(label_smoothing)
    if loss_type == "ce":
        target = q.argmax(dim=-1, keepdim=True)
        nll = -log_s0.gather(-1, target).squeeze(-1)
        if eps == 0.0:
            return nll
        smooth = -log_s0.sum(dim=-1) / n_valid.squeeze(-1)
        return (1.0 - eps) * nll + eps * smooth
    # (q - max) / T: the same distribution, but finfo.min padding cannot overflow to -inf at T < 1.
    log_t = torch.log_softmax(_over_temperature(q - q.amax(dim=-1, keepdim=True), temperature), dim=-1)
    if eps > 0.0:
        log_t = torch.log((1.0 - eps) * log_t.exp() + eps / n_valid)
    log_t0 = log_t.masked_fill(pad, 0.0)
    p_t = log_t0.exp().masked_fill(pad, 0.0)
    p_s = log_s0.exp().masked_fill(pad, 0.0)
    return soft_terms(loss_type, p_t, log_t0, p_s, log_s0, float(js_beta)).sum(dim=-1)


def soft_terms(loss_type: str, p_t, log_t0, p_s, log_s0, beta: float) -> torch.Tensor:
    """The per-entry terms of the soft loss types, whose row sum is the row loss, from the teacher's
    and student's probabilities and log-probabilities (0 at padded entries)."""
    if loss_type == "ce-soft-fwd":
        return _wmul(p_t, -log_s0)
    if loss_type == "ce-soft-bwd":
        return _wmul(p_s, -log_t0)
    if loss_type == "kl-fwd":
        return _wmul(p_t, log_t0 - log_s0)
    if loss_type == "kl-bwd":
        return _wmul(p_s, log_s0 - log_t0)
    # js: log M = logaddexp(log β + log P, log(1 - β) + log Q)
    log_m = torch.logaddexp(log_t0 + math.log(beta), log_s0 + math.log1p(-beta))
    return beta * _kl_to_mix(p_t, log_t0, p_s, log_m, 1.0 - beta) + (1.0 - beta) * _kl_to_mix(p_s, log_s0, p_t,
                                                                                             log_m, beta)


def _phi_series(u: torch.Tensor) -> torch.Tensor:
    """``u - log(1 + u)`` for ``|u| < 0.1``: its Taylor series to ``u^8`` (relative error below 3e-8)."""
    poly = 0.125
    for c in (-1.0 / 7.0, 1.0 / 6.0, -0.2, 0.25, -1.0 / 3.0, 0.5):
        poly = c + u * poly
    return u * u * poly


def _kl_to_mix(a: torch.Tensor, log_a: torch.Tensor, b: torch.Tensor, log_m: torch.Tensor, c: float) -> torch.Tensor:
    """The terms of ``KL(A‖M)``, ``m = a + c·(b - a)``, as ``a·log(a/m) + c·(b - a)`` (the added
    terms sum to 0 over a row of two distributions), that is ``a·φ(u) >= 0`` with ``u = c(b - a)/a``
    and ``φ(u) = u - log(1 + u)``: a series where ``|u| < 0.1`` (0.01 in fp64), the log-domain form
    elsewhere.
    No term cancels another, so the generalized JSD keeps its relative precision as β -> 0 or 1
    (the plain sum loses about ``1e-8/β``). The unused branch's inputs are finite, so autograd
    sees no ``0·inf``. The kernel computes the same terms."""
    diff = c * (b - a)
    # the series' truncation (2|u|^7/9, relative) below the dtype's precision: fp32 to 0.1, fp64 to 0.01
    small = diff.abs() < (0.01 if a.dtype == torch.float64 else 0.1) * a
    u = torch.where(small, diff / torch.where(small, a, torch.ones_like(a)), torch.zeros_like(a))
    return torch.where(small, a * _phi_series(u), _wmul(a, log_a - log_m) + diff)


def _q_star_messages(name: str) -> tuple[str, str]:
    return (f"{name} contains NaN or +inf (use -inf to mark padded actions).",
            f"{name} has a row with no finite entry (every action padded with -inf).")


def q_star_checks(q: torch.Tensor, name: str):
    """The teacher's input checks from one pass over it: a row's max is NaN when the row holds a
    NaN (amax propagates NaN), +inf when it holds +inf, and -inf when every entry is padding."""
    return row_max_checks(q.detach().amax(dim=-1), name)


def row_max_checks(row_max: torch.Tensor, name: str):
    """The teacher's checks from its per-row max (NaN-propagating): NaN or +inf, or a row of -inf only."""
    bad_msg, empty_msg = _q_star_messages(name)
    return [((torch.isnan(row_max) | (row_max == float("inf"))).any(), bad_msg),
            ((row_max == float("-inf")).any(), empty_msg)]


def status_checks(status: torch.Tensor, name: str):
    """The same checks from the per-row codes the sp kernel writes (1: NaN or +inf, 2: no finite
    entry), evaluated only when the metrics are packed: no second read of the teacher, and in lazy
    mode no launch in the loss call."""
    bad_msg, empty_msg = _q_star_messages(name)
    return [(AnyEqual(status, 1), bad_msg), (AnyEqual(status, 2), empty_msg)]


def _reduce(per_row: torch.Tensor, reduction: str, weight: torch.Tensor | None, group=None,
            grad_reduction: str = "sum") -> torch.Tensor:
    """``reduction`` of the per-row losses (times ``weight``); with ``group`` the mean is this
    rank's share, its sum over the global count of rows (:mod:`fusedloss.losses._data_parallel`)."""
    if weight is not None:
        per_row = per_row * weight.to(per_row.dtype)
    if group is not None:
        if reduction == "mean":
            n = global_counts([per_row.shape[0]], group, per_row.device)[0]
            per_row = per_row.sum() / n.to(per_row.dtype)
        elif reduction == "sum":
            per_row = per_row.sum()
        return scale_grad(per_row, group, grad_reduction)
    if reduction == "mean":
        return per_row.mean()
    if reduction == "sum":
        return per_row.sum()
    return per_row


def _check_rows(q_targets, logits, loss_type, temperature, label_smoothing, reduction, weight, js_beta=0.5) -> None:
    """Validate the ``[N, A]`` inputs and options of the ``sp_*`` helpers."""
    require_float(logits, "logits")
    if not isinstance(q_targets, torch.Tensor):
        raise TypeError(f"q_targets must be a torch.Tensor, got {type(q_targets).__name__}.")
    if not q_targets.is_floating_point():
        raise TypeError(f"q_targets must be a floating-point tensor, got {q_targets.dtype}.")
    if logits.dim() != 2 or logits.shape[-1] < 1:
        raise ValueError(f"logits must have shape [N, A], got {tuple(logits.shape)}.")
    if tuple(q_targets.shape) != tuple(logits.shape):
        raise ValueError(
            f"q_targets must have the shape of logits [N, A] = {tuple(logits.shape)}, got {tuple(q_targets.shape)}."
            + vocab_mismatch_hint(q_targets.shape, logits.shape)
        )
    if logits.shape[0] == 0:
        raise ValueError("logits is empty: the batch has no rows (N = 0).")
    check_sp_options(loss_type, temperature, label_smoothing, js_beta)
    check_reduction(reduction)
    require_same_device({"q_targets": q_targets, "logits": logits})
    check_row_weight(weight, logits)


def _t2_factor(temperature: float, mode: str) -> float:
    return float(temperature) ** 2 if mode == "both_t2" else 1.0


def _sp_rows(q_targets, logits, loss_type, temperature, label_smoothing, backend, js_beta=0.5,
             temperature_mode="teacher", name="q_targets", mean=False):
    """Per-row losses of validated ``[N, A]`` inputs on the chosen backend (their mean with
    ``mean=True``, which the kernel path folds into its backward launch), and the teacher's input
    checks: from the kernel's per-row codes on the kernel path, from one more read of the teacher
    (:func:`q_star_checks`, computed only when called) on the reference path."""
    z = student_at_temperature(logits, temperature, temperature_mode)
    if resolve_backend(backend, "sp", logits, q_targets) is Backend.TRITON:
        from ..kernels import sp as kernels

        out, status = kernels.sp_fused(q_targets, z, loss_type, temperature, label_smoothing, js_beta=js_beta,
                                       mean_scale=_t2_factor(temperature, temperature_mode) if mean else None)
        checks = lambda: status_checks(status, name)  # noqa: E731
        return (out if mean else rows_at_temperature(out, temperature, temperature_mode)), checks
    rows = rows_at_temperature(sp_reference(q_targets, z, loss_type, temperature, label_smoothing, js_beta),
                               temperature, temperature_mode)
    return (rows.mean() if mean else rows), lambda: q_star_checks(q_targets, name)


def _dense_loss(q_targets, logits, *, loss_type, temperature, label_smoothing, reduction, weight, backend,
                check_inputs, js_beta=0.5, temperature_mode="teacher", teacher_vocab="strict", group=None,
                grad_reduction="sum"):
    """The reduced loss of the functional forms (``sp_soft_ce_loss``, ``sp_kl_loss``, ``sp_js_loss``)."""
    if isinstance(logits, torch.Tensor) and logits.dim() >= 1:
        q_targets = align_teacher(q_targets, logits.shape[-1], teacher_vocab)
    _check_rows(q_targets, logits, loss_type, temperature, label_smoothing, reduction, weight, js_beta)
    check_temperature_mode(temperature_mode)
    check_dp(group, grad_reduction)
    mean = reduction == "mean" and weight is None and group is None
    rows, checks = _sp_rows(q_targets, logits, loss_type, temperature, label_smoothing, backend, js_beta,
                            temperature_mode, mean=mean)
    loss = rows if mean else _reduce(rows, reduction, weight, group, grad_reduction)
    if check_inputs:
        finalize_metrics({}, checks(), "float")
    return loss


def _direction(direction: str, fn: str) -> str:
    if direction not in ("fwd", "bwd"):
        raise ValueError(f"{fn} direction must be 'fwd' or 'bwd', got {direction!r}.")
    return direction


def sp_soft_ce_loss(q_targets, logits, temperature: float, label_smoothing: float = 0.0, direction: str = "fwd",
                    *, reduction: str = "mean", weight=None, backend: str = "auto", check_inputs: bool = True,
                    temperature_mode: str = "teacher", teacher_vocab: str = "strict", group=None,
                    grad_reduction: str = "sum"):
    """Soft cross-entropy between teacher ``P = softmax(q_targets / T)`` (smoothed) and student
    ``Q = softmax(logits)``: ``"fwd"`` is ``H(P, Q) = -Σ P log Q``, ``"bwd"`` is ``H(Q, P) = -Σ Q log P``.

    ``q_targets``, ``logits``: ``[N, A]``; ``weight``: optional per-row ``[N]`` factor; ``reduction``
    ``"mean"`` (over rows, as in the seed), ``"sum"`` or ``"none"`` (``[N]``).
    ``check_inputs`` checks ``q_targets`` for NaN/+inf/all-padded rows with one host sync; pass
    ``False`` for a sync-free call. ``temperature_mode``: ``"teacher"`` (the default: ``T`` divides
    the teacher only, no ``T²``), ``"both"`` (the student's logits are divided by ``T`` too, as TRL's
    GKD and Liger do) or ``"both_t2"`` (``"both"`` times ``T²``, Hinton et al.'s scaling).
    ``teacher_vocab``: ``"strict"`` (the default: ``q_targets`` must have the student's ``A``) or
    ``"align"`` (a wider teacher is truncated to the first ``A`` columns, a narrower one padded
    with ``-inf``: see :func:`fusedloss.losses.sp.align_teacher`).
    ``group``: a ``torch.distributed`` process group over which the batch's rows are split (data
    parallel): ``"mean"`` then returns this rank's share, its rows' sum over the global row count,
    so the ranks' losses and gradients sum to the whole batch's; ``grad_reduction="mean"`` scales
    the gradient by the group's size for a trainer that averages gradients (DDP, FSDP). See
    :mod:`fusedloss.losses._data_parallel`.
    """
    loss_type = "ce-soft-" + _direction(direction, "sp_soft_ce_loss")
    return _dense_loss(q_targets, logits, loss_type=loss_type, temperature=temperature, label_smoothing=label_smoothing,
                       reduction=reduction, weight=weight, backend=backend, check_inputs=check_inputs,
                       temperature_mode=temperature_mode, teacher_vocab=teacher_vocab, group=group,
                       grad_reduction=grad_reduction)


def sp_kl_loss(q_targets, logits, temperature: float, label_smoothing: float = 0.0, direction: str = "fwd",
               *, reduction: str = "mean", weight=None, backend: str = "auto", check_inputs: bool = True,
               temperature_mode: str = "teacher", teacher_vocab: str = "strict", group=None,
               grad_reduction: str = "sum"):
    """KL divergence: ``"fwd"`` is ``KL(P_teacher ‖ Q_student)``, ``"bwd"`` is ``KL(Q ‖ P)``.
    Temperature on the teacher only, no ``T²``. Other arguments as :func:`sp_soft_ce_loss`."""
    loss_type = "kl-" + _direction(direction, "sp_kl_loss")
    return _dense_loss(q_targets, logits, loss_type=loss_type, temperature=temperature, label_smoothing=label_smoothing,
                       reduction=reduction, weight=weight, backend=backend, check_inputs=check_inputs,
                       temperature_mode=temperature_mode, teacher_vocab=teacher_vocab, group=group,
                       grad_reduction=grad_reduction)


def sp_js_loss(q_targets, logits, temperature: float, label_smoothing: float = 0.0, beta: float = 0.5,
               *, reduction: str = "mean", weight=None, backend: str = "auto", check_inputs: bool = True,
               temperature_mode: str = "teacher", teacher_vocab: str = "strict", group=None,
               grad_reduction: str = "sum"):
    """Generalized Jensen–Shannon divergence ``β KL(P ‖ M) + (1 − β) KL(Q ‖ M)``, ``M = βP + (1 − β)Q``
    (GKD's JSD_β), ``P`` the teacher and ``Q`` the student. ``beta`` is strictly inside ``(0, 1)``;
    0.5 is the symmetric JS, in ``[0, log 2]``. Temperature on the teacher only, no ``T²``. Other
    arguments as :func:`sp_soft_ce_loss`."""
    check_js_beta(beta, "beta")
    return _dense_loss(q_targets, logits, loss_type="js", temperature=temperature, label_smoothing=label_smoothing,
                       reduction=reduction, weight=weight, backend=backend, check_inputs=check_inputs, js_beta=beta,
                       temperature_mode=temperature_mode, teacher_vocab=teacher_vocab, group=group,
                       grad_reduction=grad_reduction)


def sp_loss(step_stream: Any, logits: torch.Tensor, cfg: SpLossConfig | None = None, group=None):
    """Supervised policy loss over all ``[B, S]`` positions: ``logits`` ``[..., A]`` against
    ``step_stream["q_star"]`` of the same shape, mean over rows. Returns ``(loss, metrics)``
    with the metric ``sp_loss``. ``group``: the data-parallel process group; the loss is then
    this rank's share of the global mean, as in :func:`sp_kl_loss`, with ``cfg.grad_reduction``;
    the metric stays this rank's mean (:meth:`fusedloss.LazyMetrics.all_reduce` combines it)."""
    cfg = check_loss_config(cfg, SpLossConfig, "sp_loss")
    check_dp(group, cfg.grad_reduction)
    require_float(logits, "logits")
    q_star = stream_get(step_stream, "q_star")
    if logits.dim() < 1 or logits.shape[-1] < 1:
        raise ValueError(f"logits must have shape [..., A] with A >= 1, got {tuple(logits.shape)}.")
    q_star = align_teacher(q_star, logits.shape[-1], cfg.teacher_vocab)
    if tuple(q_star.shape) != tuple(logits.shape):
        raise ValueError(
            f"step_stream['q_star'] must have the shape of logits {tuple(logits.shape)}, got {tuple(q_star.shape)}."
            + vocab_mismatch_hint(q_star.shape, logits.shape)
        )
    require_same_device({"logits": logits, "step_stream['q_star']": q_star})
    if not q_star.is_floating_point():
        raise TypeError(f"step_stream['q_star'] must be a floating-point tensor, got {q_star.dtype}.")
    A = logits.shape[-1]
    if logits.numel() == 0:
        raise ValueError("sp_loss: the batch is empty (no tokens).")
    q_rows, l_rows = q_star.reshape(-1, A), logits.reshape(-1, A)
    loss, checks = _sp_rows(q_rows, l_rows, cfg.loss_type, cfg.temperature, cfg.label_smoothing, cfg.backend,
                            cfg.js_beta, cfg.temperature_mode, "step_stream['q_star']", mean=group is None)
    named = {"sp_loss": loss}
    if group is not None:  # the loss is this rank's share of the group's mean; the metric stays this rank's mean
        named["sp_loss"] = loss.mean()
        loss = _reduce(loss, "mean", None, group, cfg.grad_reduction)
    return loss, finalize_metrics(named, checks(), cfg.metrics_mode, count=q_rows.shape[0])


TOPK_LOSS_TYPES = ("kl-fwd", "ce-soft-fwd")


def sp_topk_reference(teacher_index: torch.Tensor, teacher_logprob: torch.Tensor, logits: torch.Tensor,
                      loss_type: str = "kl-fwd", temperature: float = 1.0) -> torch.Tensor:
    """Per-row loss ``[N]`` of a top-k teacher (fp32, or fp64) on validated inputs.

    The teacher is ``softmax(teacher_logprob / T)`` over the used slots (``teacher_index >= 0``),
    the student the full ``log_softmax(logits)`` over ``V``; ``kl-fwd`` is ``Σ p (log p - log q)``
    and ``ce-soft-fwd`` is ``-Σ p log q`` over the teacher's slots. A row with no used slot has
    loss 0 and no gradient. The teacher gets no gradient."""
    cd = compute_dtype(teacher_logprob, logits)
    V = logits.shape[-1]
    used = (teacher_index >= 0) & (teacher_index < V)
    v = teacher_logprob.detach().to(cd).masked_fill(~used, float("-inf"))
    mx = v.amax(dim=-1, keepdim=True)  # NaN propagates; +inf stays and gives NaN below
    mx = torch.where(mx == float("-inf"), torch.zeros_like(mx), mx)  # all slots unused or -inf: p = 0, no NaN
    x = _over_temperature(v - mx, temperature)  # differences scaled, never the values: finfo.min rows cannot overflow at T < 1
    e = x.exp()
    total = e.sum(dim=-1, keepdim=True)
    p = torch.where(used & (total != 0), e / total, torch.zeros_like(e))  # NaN total (NaN/+inf in): NaN
    log_p = torch.where(used, x - total.log(), torch.zeros_like(x))
    log_q = torch.log_softmax(logits.to(cd), dim=-1).gather(-1, teacher_index.clamp(0, V - 1).long())
    log_q = torch.where(used, log_q, torch.zeros_like(log_q))
    if loss_type == "kl-fwd":
        per = _wmul(p, log_p - log_q)
    else:
        per = _wmul(p, -log_q)
    return per.sum(dim=-1)


def check_topk_loss_type(loss_type: str, what: str = "loss_type for a top-k teacher") -> None:
    """Raise ``ValueError`` unless ``loss_type`` is one a sparse teacher defines (:data:`TOPK_LOSS_TYPES`)."""
    if loss_type not in TOPK_LOSS_TYPES:
        raise ValueError(f"{what} must be one of {TOPK_LOSS_TYPES}, got {loss_type!r}.")


def topk_checks(index: torch.Tensor, logprob: torch.Tensor, V: int, name: str = "teacher"):
    """Data checks of a top-k teacher as device flags: an index outside ``[-1, V)``, a used index
    twice in a row, NaN or +inf log-probabilities at used slots."""
    used = index >= 0
    srt = torch.sort(torch.where(used, index, torch.full_like(index, -1)), dim=-1).values
    dup = ((srt[:, 1:] == srt[:, :-1]) & (srt[:, 1:] >= 0)).any()
    lp = logprob.detach()
    return [
        (((index < -1) | (index >= V)).any(), f"{name}_index holds an index outside [0, V) = [0, {V}) (-1 marks an "
                                              f"unused slot; a teacher with a wider vocabulary: "
                                              f"teacher_vocab='align')."),
        (dup, f"{name}_index repeats an index within a row (each used slot must name a different action)."),
        ((used & (torch.isnan(lp) | (lp == float("inf")))).any(), f"{name}_logprob contains NaN or +inf at a used "
                                                                  "slot."),
    ]


def check_topk_teacher(index, logprob, V: int, like: torch.Tensor, like_name: str, name: str = "teacher") -> None:
    """Shape, dtype and device checks of a top-k teacher for the ``N`` rows of ``like`` (the
    student's logits ``[N, V]`` or hidden states ``[N, H]``), over ``V`` actions."""
    if not isinstance(index, torch.Tensor) or index.dtype not in (torch.int64, torch.int32, torch.int16, torch.int8):
        raise TypeError(f"{name}_index must be a signed integer tensor [N, k] (int64, int32, int16 or int8: -1 marks "
                        f"an unused slot), got {index.dtype if isinstance(index, torch.Tensor) else type(index).__name__}.")
    require_float(logprob, f"{name}_logprob")
    N = like.shape[0]
    if index.dim() != 2 or index.shape[0] != N or index.shape[1] < 1:
        raise ValueError(f"{name}_index must have shape [N, k] = [{N}, k] with k >= 1, got {tuple(index.shape)}.")
    if tuple(logprob.shape) != tuple(index.shape):
        raise ValueError(f"{name}_logprob must have the shape of {name}_index {tuple(index.shape)}, got "
                         f"{tuple(logprob.shape)}.")
    if index.shape[1] > V:
        raise ValueError(f"{name}_index has k = {index.shape[1]} slots, more than the V = {V} actions.")
    require_same_device({f"{name}_index": index, f"{name}_logprob": logprob, like_name: like})


def _topk_rows(index, logprob, logits, loss_type, temperature, backend, temperature_mode="teacher",
               mean=False) -> torch.Tensor:
    """Per-row losses, or their mean with ``mean=True`` (as :func:`_sp_rows`)."""
    z = student_at_temperature(logits, temperature, temperature_mode)
    if resolve_backend(backend, "sp", logits, logprob) is Backend.TRITON:
        from ..kernels import sp as kernels

        out = kernels.sp_topk_fused(index, logprob, z, loss_type, temperature,
                                    mean_scale=_t2_factor(temperature, temperature_mode) if mean else None)
        return out if mean else rows_at_temperature(out, temperature, temperature_mode)
    rows = rows_at_temperature(sp_topk_reference(index, logprob, z, loss_type, temperature), temperature,
                               temperature_mode)
    return rows.mean() if mean else rows


def _check_topk_options(loss_type: str, temperature: float, reduction: str) -> None:
    check_topk_loss_type(loss_type)
    check_positive(temperature, "temperature")
    check_reduction(reduction)


def sp_topk_loss(teacher_index, teacher_logprob, logits, loss_type: str = "kl-fwd", temperature: float = 1.0, *,
                 reduction: str = "mean", weight=None, backend: str = "auto", check_inputs: bool = True,
                 temperature_mode: str = "teacher", teacher_vocab: str = "strict", group=None,
                 grad_reduction: str = "sum"):
    """Distillation from a teacher that stored only its top-k log-probabilities per token.

    ``teacher_index``: int ``[N, k]``, the teacher's actions, ``-1`` for an unused slot;
    ``teacher_logprob``: float ``[N, k]``; ``logits``: the student's ``[N, V]``. The teacher is
    ``softmax(teacher_logprob / temperature)`` renormalised over its used slots; the student keeps
    its full softmax over ``V``. ``loss_type``: ``"kl-fwd"`` (``Σ p (log p - log q)``) or
    ``"ce-soft-fwd"`` (``-Σ p log q``), over the teacher's slots. A row with no used slot adds 0.
    ``weight``: optional per-row ``[N]`` factor; ``reduction``: ``"mean"`` (over rows), ``"sum"``
    or ``"none"``. The teacher is never scattered into a dense ``[N, V]`` tensor; the kernel reads
    ``k`` values per row. ``check_inputs`` raises ``ValueError`` for an index outside
    ``[-1, V)``, a repeated index in a row, or NaN/+inf log-probabilities, with one host sync;
    pass ``False`` for a sync-free call. Then an index outside ``[0, V)`` is an unused slot
    (never read), a repeated index is not an error (each slot is its own term of the loss, and
    the gradient at that action sums them, on both paths), and a NaN or ``+inf`` log-probability
    at a used slot makes the row's loss and gradient NaN, as in the dense losses.
    ``temperature_mode`` as in :func:`sp_soft_ce_loss`. ``teacher_vocab="align"`` (for a teacher
    with a wider vocabulary) makes a slot naming an id ``>= V`` unused, so ``check_inputs`` accepts
    it; the default ``"strict"`` counts it as an error. A narrower teacher needs no option.
    ``group``, ``grad_reduction``: data-parallel means, as in :func:`sp_soft_ce_loss`.
    """
    require_float(logits, "logits")
    if logits.dim() != 2 or logits.shape[1] < 1 or logits.shape[0] == 0:
        raise ValueError(f"logits must have shape [N, V] with N, V >= 1, got {tuple(logits.shape)}.")
    V = logits.shape[1]
    teacher_index = align_topk_index(teacher_index, V, teacher_vocab)
    check_topk_teacher(teacher_index, teacher_logprob, V, logits, "logits")
    _check_topk_options(loss_type, temperature, reduction)
    check_temperature_mode(temperature_mode)
    check_row_weight(weight, logits)
    check_dp(group, grad_reduction)
    mean = reduction == "mean" and weight is None and group is None
    rows = _topk_rows(teacher_index, teacher_logprob, logits, loss_type, temperature, backend, temperature_mode,
                      mean=mean)
    loss = rows if mean else _reduce(rows, reduction, weight, group, grad_reduction)
    if check_inputs:
        finalize_metrics({}, topk_checks(teacher_index, teacher_logprob, V), "float")
    return loss


@dataclasses.dataclass
class SpTopKLossConfig(LossConfig):
    """Configuration of :class:`SpTopKLoss` (the options of :func:`fusedloss.sp_topk_loss`)."""

    loss_type: str = "kl-fwd"
    """The sp loss type (see :func:`sp_linear_loss` and :func:`fusedloss.sp_topk_loss`)."""
    temperature: float = 1.0
    """Divides the teacher's values (> 0), and with ``temperature_mode`` the student's too."""
    reduction: str = "mean"
    """``"mean"`` (over rows), ``"sum"`` or ``"none"``."""
    backend: str = "auto"
    """``"auto"`` (the fused kernel on CUDA where one exists, else the reference), ``"triton"`` (the kernel or a clear error) or ``"torch"`` (the reference)."""
    check_inputs: bool = True
    """Check the teacher's values with one host sync (False: no sync)."""
    temperature_mode: str = "teacher"
    """``"teacher"``, ``"both"`` or ``"both_t2"``, as :attr:`SpLossConfig.temperature_mode`."""
    teacher_vocab: str = "strict"
    """``"strict"`` or ``"align"`` (slots naming an id ``>= V`` are unused), as in :func:`fusedloss.sp_topk_loss`."""
    grad_reduction: str = "sum"
    """With a data-parallel ``group``: ``"sum"`` or ``"mean"`` (for DDP/FSDP's averaging), as :attr:`SpLossConfig.grad_reduction`."""

    def check_values(self) -> None:
        _check_topk_options(self.loss_type, self.temperature, self.reduction)
        check_grad_reduction(self.grad_reduction)
        check_temperature_mode(self.temperature_mode)
        check_teacher_vocab(self.teacher_vocab)
        check_config_common(self.backend)

    def build(self) -> SpTopKLoss:
        """The :class:`SpTopKLoss` of this config (the registry's factory interface)."""
        return SpTopKLoss(self)


class SpTopKLoss(ConfigLoss):
    """``nn.Module`` form of :func:`fusedloss.sp_topk_loss`: ``forward(teacher_index,
    teacher_logprob, logits, weight=None, group=None)`` (``group``: this call's, else the module's)."""

    config_cls = SpTopKLossConfig

    def forward(self, teacher_index, teacher_logprob, logits, weight=None, group=None):
        c = self.cfg
        return sp_topk_loss(teacher_index, teacher_logprob, logits, c.loss_type, c.temperature, reduction=c.reduction,
                            weight=weight, backend=c.backend, check_inputs=c.check_inputs,
                            temperature_mode=c.temperature_mode, teacher_vocab=c.teacher_vocab,
                            group=self.group if group is None else group, grad_reduction=c.grad_reduction)


class SpLoss(ConfigLoss):
    """``nn.Module`` form of :func:`sp_loss`; ``forward(step_stream, logits, group=None)``
    (``group``: this call's, else the module's)."""

    config_cls = SpLossConfig

    def forward(self, step_stream: Any, logits: torch.Tensor, group=None):
        return sp_loss(step_stream, logits, self.cfg, self.group if group is None else group)


def _verify_cases(small: bool) -> list[VerifyCase]:
    from .. import testing as T

    N, V = (12, 300) if small else (4096, 1000)
    k = 16 if small else 64

    def make(dtype, device):
        q, logits = T.make_sp_inputs(N, V, dtype, device, seed=3, pad_frac=0.1)
        return ({"q_star": q}, logits)

    cases = []
    for loss_type in SP_LOSS_TYPES:
        def call(args, backend, _lt=loss_type):
            cfg = SpLossConfig(loss_type=_lt, temperature=1.7, label_smoothing=0.1, backend=backend)
            return sp_loss(args[0], args[1], cfg)[0]

        cases.append(VerifyCase(f"{loss_type},T=1.7,ls=0.1,pad", f"N={N} A={V}", make, call))

    def call_js_beta(args, backend):
        return sp_js_loss(args[0]["q_star"], args[1], 1.3, 0.0, beta=0.2, backend=backend)

    cases.append(VerifyCase("js,beta=0.2,T=1.3,pad", f"N={N} A={V}", make, call_js_beta))

    def make_topk(dtype, device):
        return T.make_topk_inputs(N, V, k, dtype, device, seed=7, unused=0.3)

    for loss_type in TOPK_LOSS_TYPES:
        def call_topk(args, backend, _lt=loss_type):
            return sp_topk_loss(args[0], args[1], args[2], _lt, 1.4, backend=backend)

        cases.append(VerifyCase(f"{loss_type},k={k},T=1.4", f"N={N} V={V}", make_topk, call_topk, name="sp_topk"))
    return cases


FAMILY = Family(
    name="sp",
    section="Policy distillation",
    exports=("sp_loss", "SpLossConfig", "SpLoss", "sp_soft_ce_loss", "sp_kl_loss", "sp_js_loss", "sp_reference",
             "sp_topk_loss", "sp_topk_reference", "SpTopKLossConfig", "SpTopKLoss"),
    kernel="sp",
    factories={"sp": SpLossConfig, "sp_topk": SpTopKLossConfig},
    verify_cases=_verify_cases,
)
