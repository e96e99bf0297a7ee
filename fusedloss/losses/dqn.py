"""DQN: symmetric two-head one-step TD with terminal/truncated discounts, reward transforms and CQL."""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Any

import torch
import torch.nn.functional as F

from .._dispatch import Backend, resolve_backend
from .._families import Family, VerifyCase
from ..metrics import finalize_buffer_metrics, finalize_metrics
from ._common import (
    ConfigLoss,
    LossConfig,
    bootstrapped,
    check_config_common,
    check_done,
    check_finite_number,
    check_index,
    check_loss_config,
    check_positive,
    check_reward_config,
    check_reward_steps,
    compute_dtype,
    discount_table,
    discounted,
    done_codes,
    masked,
    require_float,
    require_same_device,
    require_shape,
    reward_kernel_args,
    reward_tensor,
    safe_scale,
    stream_get,
    transform_rewards,
    used_index,
)
from ._data_parallel import check_dp, check_grad_reduction, dp_share, global_counts, scale_grad

__all__ = ["DqnLossConfig", "dqn_loss", "dqn_reference", "DqnLoss", "TD_LOSSES", "sequence_priority"]

TD_LOSSES = ("l2", "huber")
# The metric names and the kernel's DqnMetric slots that hold them.
_KERNEL_METRICS = {"q_values_mean": "Q_MEAN", "q_values_std": "Q_STD", "q_values_min": "Q_MIN",
                   "q_values_max": "Q_MAX", "q_values_target": "Q_TARGET", "dqn_loss": "LOSS",
                   "cql_penalty": "CQL_PENALTY"}


@dataclasses.dataclass
class DqnLossConfig(LossConfig):
    """Configuration of :func:`dqn_loss`. The first fields are the seed's, with its defaults.

    Beyond the seed, each off by default: ``double_dqn`` (next action by argmax of the online
    ``q[t+1]``, evaluated by ``q_target``), ``td_loss="huber"`` with ``huber_delta`` (PyTorch's
    ``huber_loss``, ``0.5·d²`` inside the delta; ``"l2"`` is the seed's ``d²``), ``weight_key``
    (per-transition importance weights in ``step_stream``, stored at ``t+1``), ``mask_key``
    (a ``[B, S]`` validity mask; transition ``t`` counts when steps ``t`` and ``t+1`` are both valid),
    and ``return_td_error`` (return ``|TD error|`` ``[B, S-1]`` as a third value).

    Multi-step targets, off by default (the defaults give the one-step target bit for bit):

    - ``n_step`` (int >= 1): the n-step return ``sum_{j<m} gamma^j r'[t+j] + gamma^(m-1)
      disc[t+m-1] V[t+m]``, the window of ``m <= n_step`` transitions stopping at the first
      ``done != 0`` (included), before the first invalid transition, and at the sequence end.
    - ``td_lambda`` (``None`` or a number in ``[0, 1]``; not with ``n_step > 1``): Peng's Q(lambda)
      return ``G[t] = r'[t] + disc[t]((1 - lambda) V[t+1] + lambda G[t+1])``, cut to the one-step
      target where ``done[t+1] != 0``, at the last transition, and before an invalid transition.
    - ``value_rescaling`` with ``value_rescaling_eps`` (> 0): R2D2's invertible
      ``h(x) = sign(x)(sqrt(|x| + 1) - 1) + eps·x``; bootstrap values go through ``h^-1`` and the
      target through ``h``, so ``q`` and the target both live in h-space.

    ``V[k]`` is ``max_a q_target[k, a]`` (``q_target[k, argmax_a q[k, a]]`` with ``double_dqn``).
    """

    weight: float = 0.0
    """The loss's weight in the trainer's sum (carried for the trainer; the loss functions do not use it)."""
    gamma: float = 0.99
    """Discount of a running transition (``done[t+1] == 0``)."""
    gamma_terminal: float = 0.0
    """Discount at a terminal (``done[t+1] == 1``); 0 means no bootstrap."""
    gamma_truncated: float = 0.0
    """Discount at a truncation (``done[t+1] == 2``, a time limit): usually ``gamma``."""
    tau: float = 0.01
    """Target-network soft-update rate (carried for the trainer; the loss functions do not use it)."""
    normalize_reward_mean: bool = False
    """Subtract each sequence's mean reward (over its valid transitions) first."""
    normalize_reward_std: bool = False
    """Divide by each sequence's unbiased reward std (plus ``normalize_reward_eps``), then multiply by ``normalize_reward_std_target``."""
    normalize_reward_eps: float = 1e-08
    """Added to the reward std before dividing (> 0)."""
    normalize_reward_std_target: float = 1.0
    """The std the normalised rewards are scaled to."""
    use_xformed_reward: bool = False
    """Read ``step_stream["xformed_reward"]`` instead of ``step_stream["reward"]``."""
    cql_weight: float = 0.0
    """Weight of the CQL penalty ``(|target| + cql_scale_q_eps)·(logsumexp q[t] - q[t, a])``; 0 turns it off."""
    cql_scale_q_eps: float = 1.0
    """Added to ``|target|`` in the CQL scale."""
    reward_scale: float = 1.0
    """Multiplies the (normalised) reward: ``r' = r·reward_scale + reward_shift``."""
    reward_shift: float = 0.0
    """Added to the scaled reward: ``r' = r·reward_scale + reward_shift``."""
    double_dqn: bool = False
    """Bootstrap from ``q_target[t+1]`` at the argmax of the online ``q[t+1]`` instead of its max."""
    td_loss: str = "l2"
    """``"l2"`` (the seed's ``d²``) or ``"huber"`` (PyTorch's ``huber_loss`` with ``huber_delta``)."""
    huber_delta: float = 1.0
    """The Huber threshold (> 0)."""
    weight_key: str | None = None
    """Key of ``[B, S]`` per-transition importance weights in ``step_stream`` (stored at ``t+1``), or None."""
    mask_key: str | None = None
    """Key of a ``[B, S]`` validity mask in ``step_stream``, or None; transition ``t`` counts when steps ``t`` and ``t+1`` are valid."""
    return_td_error: bool = False
    """Also return ``|TD error|`` ``[B, S-1]`` (fp32, detached, 0 at invalid transitions) as a third value."""
    backend: str = "auto"
    """``"auto"`` (the fused kernel on CUDA where one exists, else the reference), ``"triton"`` (the kernel or a clear error) or ``"torch"`` (the reference)."""
    metrics_mode: str = "float"
    """``"float"``: metrics as a ``dict[str, float]`` with one host transfer (and the input checks raised then); ``"lazy"``: a :class:`fusedloss.LazyMetrics`, no host sync."""
    n_step: int = 1
    """Length of the n-step return (int >= 1; 1 is the one-step target)."""
    td_lambda: float | None = None
    """Peng's Q(lambda) in ``[0, 1]``, or None for off; not with ``n_step > 1``."""
    value_rescaling: bool = False
    """R2D2's invertible value rescaling: bootstrap through ``h^-1``, target through ``h``."""
    value_rescaling_eps: float = 1e-3
    """The ``eps`` of ``h(x) = sign(x)(sqrt(|x| + 1) - 1) + eps·x`` (> 0)."""
    grad_reduction: str = "sum"
    """With a data-parallel ``group``: ``"sum"`` (the ranks' gradients sum to the batch's) or ``"mean"`` (scaled by the group's size, for DDP/FSDP's averaging)."""

    def check_values(self) -> None:
        check_grad_reduction(self.grad_reduction)
        for name in ("gamma", "gamma_terminal", "gamma_truncated", "cql_scale_q_eps"):
            check_finite_number(getattr(self, name), name)
        if self.n_step < 1:
            raise ValueError(f"n_step must be an integer >= 1, got {self.n_step!r}.")
        if self.td_lambda is not None:
            if not (math.isfinite(self.td_lambda) and 0.0 <= self.td_lambda <= 1.0):
                raise ValueError(f"td_lambda must be None (off) or a number in [0, 1], got {self.td_lambda!r}.")
            if self.n_step > 1:
                raise ValueError(f"td_lambda and n_step > 1 are two kinds of multi-step target; set one, got "
                                 f"td_lambda={self.td_lambda!r} with n_step={self.n_step!r}.")
        check_positive(self.value_rescaling_eps, "value_rescaling_eps")
        if not (isinstance(self.cql_weight, numbers.Real) and math.isfinite(self.cql_weight) and self.cql_weight >= 0):
            raise ValueError(f"cql_weight must be a finite number >= 0, got {self.cql_weight!r}.")
        if self.td_loss not in TD_LOSSES:
            raise ValueError(f"td_loss must be one of {TD_LOSSES}, got {self.td_loss!r}.")
        check_positive(self.huber_delta, "huber_delta")
        check_reward_config(self)
        check_config_common(self.backend, self.metrics_mode)

    def build(self) -> DqnLoss:
        """The :class:`DqnLoss` of this config (the registry's factory interface)."""
        return DqnLoss(self)


def _td_target(rewards, discount, next_v, done, m, cfg: DqnLossConfig) -> torch.Tensor:
    """The detached target of every transition ``[B, S-1]`` from the transformed rewards, discounts,
    bootstrap values ``V[t+1]``, the :func:`done_codes` of ``done[t+1]`` and the 0/1 validity ``m``."""
    if cfg.value_rescaling:
        next_v = value_rescale_inverse(next_v, cfg.value_rescaling_eps)
    if cfg.n_step == 1 and cfg.td_lambda is None:
        target = bootstrapped(rewards, discount, next_v)
    else:
        running = done == 0
        valid = torch.ones_like(running) if m is None else m > 0
        if cfg.td_lambda is None:
            target = _n_step_target(rewards, discount, next_v, running, valid, cfg.n_step, cfg.gamma)
        else:
            target = _lambda_target(rewards, discount, next_v, running, valid, cfg.td_lambda)
    if cfg.value_rescaling:
        target = value_rescale(target, cfg.value_rescaling_eps)
    return target.detach()


def _masked_mean(x: torch.Tensor, m: torch.Tensor | None) -> torch.Tensor:
    """The mean of ``x`` over the entries where ``m`` (float 0/1) is 1, as the kernel sums it."""
    return x.mean() if m is None else masked(x, m).sum() / m.sum()


def _q_stats(x: torch.Tensor, m: torch.Tensor | None):
    """``(mean, std, min, max)`` of ``x`` over the valid entries: :func:`_masked_moments` and a
    masked min and max; without a mask, one ``aminmax`` gives the scale as well."""
    if m is not None:
        mean, std = _masked_moments(x, m)
        return (mean, std, torch.where(m > 0, x, float("inf")).amin(), torch.where(m > 0, x, float("-inf")).amax())
    lo, hi = x.aminmax()
    if x.numel() == 1:  # the std of one entry is 0, not NaN; NaN where it is NaN or infinite, as the kernel's
        return x.reshape(()), (x - x).reshape(()), lo, hi
    if x.dtype != torch.float64 and x.device.type != "mps":
        # fp64 holds every sum and square of narrower values: no scaling needed (a sum, not
        # std_mean's running mean: an infinite value makes the mean infinite, as the kernel's sum)
        xd = x.double()
        return xd.mean().to(x.dtype), xd.std().to(x.dtype), lo, hi
    scale = safe_scale(torch.maximum(hi, -lo))  # max |x|; NaN or inf: 1
    xs = x / scale
    # a sum, not std_mean's running mean: an infinite value makes the mean infinite, as the kernel's sum
    return xs.mean() * scale, xs.std() * scale, lo, hi


def _masked_moments(x: torch.Tensor, m: torch.Tensor | None):
    """Mean and unbiased std of ``x`` over the entries where ``m`` (float 0/1) is 1; the std of a
    single entry is 0, not NaN. Computed on ``x / max|x|``, so sums and squares of values near the
    dtype's range do not overflow; masked entries never reach the result (not even a NaN)."""
    x = masked(x, m)
    if m is None:
        n, n_minus_1 = x.numel(), max(x.numel() - 1, 1)
    else:
        n = m.sum()
        n_minus_1 = (n - 1).clamp(min=1)
    scale = safe_scale(x.abs().amax())
    xs = x / scale
    mean = xs.sum() / n
    var = masked((xs - mean) ** 2, m).sum() / n_minus_1
    return mean * scale, var.sqrt() * scale


def value_rescale(x: torch.Tensor, eps: float) -> torch.Tensor:
    """R2D2's ``h(x) = sign(x)(sqrt(|x| + 1) - 1) + eps·x``, with ``sqrt(u + 1) - 1`` written as
    ``u / (sqrt(u + 1) + 1)`` so small values keep their precision. The fused kernel computes the
    same expression."""
    u = x.abs()
    y = u / ((u + 1.0).sqrt() + 1.0) + eps * u
    return torch.where(x < 0, -y, y)


def value_rescale_inverse(x: torch.Tensor, eps: float) -> torch.Tensor:
    """``h^-1(x) = sign(x)(((sqrt(1 + 4 eps(|x| + 1 + eps)) - 1) / (2 eps))^2 - 1)``, free of
    cancellation: with ``z = sqrt(y + 1) - 1`` the equation ``|x| = h(y)`` is the quadratic
    ``eps z^2 + (1 + 2 eps) z = |x|``, whose root is ``z = 2|x| / (c + sqrt(c^2 + 4 eps |x|))``,
    ``c = 1 + 2 eps``, and ``y = z (z + 2)``. The textbook form loses about ``fp32_eps / eps`` of
    relative precision near 0; this one keeps it. The fused kernel computes the same expression."""
    u = x.abs()
    c = 1.0 + 2.0 * eps
    z = 2.0 * u / (c + (c * c + 4.0 * eps * u).sqrt())
    y = z * (z + 2.0)
    return torch.where(x < 0, -y, y)


def _ahead(x: torch.Tensor, j: int, fill) -> torch.Tensor:
    """``x[:, t + j]`` at each ``t`` (``fill`` past the end)."""
    if j == 0:
        return x
    pad = torch.full((x.shape[0], min(j, x.shape[1])), fill, dtype=x.dtype, device=x.device)
    return torch.cat([x[:, j:], pad], dim=1)


def _n_step_target(rewards, discount, next_v, running, valid, n_step: int, gamma: float):
    """``sum_{j<m} gamma^j r'[t+j] + gamma^(m-1) disc[t+m-1] V[t+m]`` over ``[B, S-1]`` transitions,
    ``m`` the longest window ``<= n_step`` that stays valid and stops at (including) the first done.
    One vectorised shift per ``j``; the sum runs in the kernel's order."""
    acc = torch.zeros_like(rewards)
    boot = torch.zeros_like(rewards)
    alive = valid
    gpow = 1.0
    for j in range(min(n_step, rewards.shape[1])):
        if j > 0:
            alive = alive & _ahead(valid, j, False)
        acc = acc + torch.where(alive, gpow * _ahead(rewards, j, 0.0), 0.0)
        boot = torch.where(alive, discounted(gpow * _ahead(discount, j, 0.0), _ahead(next_v, j, 0.0)), boot)
        alive = alive & _ahead(running, j, False)
        gpow *= gamma
    return acc + boot


def _times_positive(b: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``b·x`` for a product ``b`` of positive coefficients, which may have underflowed to 0: an
    infinite ``x`` stays infinite (``0·inf`` would be NaN, and the true product is not 0)."""
    return torch.where((b == 0) & x.isinf(), x, b * x)


def _lambda_target(rewards, discount, next_v, running, valid, lam: float):
    """Peng's Q(lambda) return as the linear recurrence ``G[t] = a[t] + b[t] G[t+1]``, cut where
    ``cont[t]`` is false (a done at ``t+1``, the last transition, or an invalid next transition):
    ``a = r' + disc·(1 - lambda·cont)·V``, ``b = lambda·disc``. Solved by a log2(S)-step doubling
    scan over the maps ``G -> a + b·G``: a cut, or a zero coefficient (tested per step, never on the
    scan's products, which may underflow), drops everything behind it, even a NaN or a -inf (a
    ``torch.where``, never a product with 0), as the kernel's scan does."""
    cont = running & _ahead(valid, 1, False)
    a = rewards + torch.where(cont, discounted(discount * (1.0 - lam), next_v), discounted(discount, next_v))
    a = torch.where(valid, a, 0.0)
    b = lam * discount
    cont = cont & (b != 0)  # a zero coefficient cuts, per step; products that underflow later do not
    off = 1
    while off < a.shape[1]:
        a = torch.where(cont, a + _times_positive(b, _ahead(a, off, 0.0)), a)
        b = b * _ahead(b, off, 0.0)
        cont = cont & _ahead(cont, off, False)
        off *= 2
    return a


def dqn_reference(
    q: torch.Tensor,
    q_target: torch.Tensor,
    action: torch.Tensor,
    reward: torch.Tensor,
    done: torch.Tensor,
    cfg: DqnLossConfig,
    weight: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
):
    """The PyTorch reference on validated inputs.

    ``q``, ``q_target``: ``[B, S, A]``; ``reward``, ``weight`` and ``mask`` (bool): ``[B, S]``;
    ``action`` and ``done``: the used steps' ``[B, S-1]``, int64 actions in ``[0, A)``
    (:func:`~fusedloss.losses._common.used_index`) and
    :func:`~fusedloss.losses._common.done_codes`. Returns ``(loss, named_metrics, td_abs_error)``
    (``td_abs_error`` None unless ``cfg.return_td_error``); the loss is fp32 (fp64 for fp64 inputs).
    Without a mask, weights or CQL, the loss is one ``mse_loss`` or ``huber_loss``: the fewest
    ops for the RL shapes, where each op's host cost is the time.
    """
    cd = compute_dtype(q, q_target)
    q = q.to(cd)
    curr_q = q[:, :-1]
    next_q_target = q_target[:, 1:].to(cd)
    a = action
    m = None if mask is None else (mask[:, :-1] & mask[:, 1:]).to(cd)
    # Masked transitions must not reach the loss or the gradient, not even as 0·NaN in a backward:
    # their q rows, targets and weights are replaced by zeros before anything is computed on them.
    curr_q = curr_q if m is None else masked(curr_q, m.unsqueeze(-1))

    q_values = curr_q.gather(-1, a.unsqueeze(-1)).squeeze(-1)
    if cfg.double_dqn:
        a_next = q[:, 1:].detach().argmax(dim=-1, keepdim=True)
        next_v = next_q_target.gather(-1, a_next).squeeze(-1)
    else:
        next_v = next_q_target.amax(dim=-1)
    rewards = transform_rewards(reward[:, 1:].to(cd), cfg, m)
    table = discount_table(float(cfg.gamma), float(cfg.gamma_terminal), float(cfg.gamma_truncated), cd, q.device)
    discount = table.take(done)  # each discount exactly as given
    td_target = masked(_td_target(rewards, discount, next_v.detach(), done, m, cfg), m)

    huber = cfg.td_loss == "huber"
    if m is None and weight is None and cfg.cql_weight == 0.0:
        # the aten ops themselves (reduction 1: the mean): F's wrappers add a broadcast_tensors call per step
        reduced = (torch.ops.aten.huber_loss.default(q_values, td_target, 1, cfg.huber_delta) if huber
                   else torch.ops.aten.mse_loss.default(q_values, td_target, 1))
        return reduced, _reference_metrics(q_values, td_target, reduced, None, None), _td_abs(q_values, td_target, m, cfg)
    if huber:
        per = F.huber_loss(q_values, td_target, reduction="none", delta=cfg.huber_delta)
    else:
        per = (q_values - td_target) ** 2
    cql_penalty = None
    if cfg.cql_weight > 0.0:
        q_scale = td_target.abs() + cfg.cql_scale_q_eps
        cql_penalty = curr_q.logsumexp(dim=-1) - q_values
        per = per + cfg.cql_weight * q_scale * cql_penalty
    if weight is not None:
        per = per * masked(weight[:, 1:].detach().to(cd), m)  # importance weights are constants, as in the kernel

    loss = per.mean() if m is None else masked(per, m).sum() / m.sum()
    return loss, _reference_metrics(q_values, td_target, loss, cql_penalty, m), _td_abs(q_values, td_target, m, cfg)


def _reference_metrics(q_values, td_target, loss, cql_penalty, m) -> dict[str, torch.Tensor]:
    q_mean, q_std, q_min, q_max = _q_stats(q_values.detach(), m)
    named = {
        "q_values_mean": q_mean,
        "q_values_std": q_std,
        "q_values_min": q_min,
        "q_values_max": q_max,
        "q_values_target": _masked_mean(td_target, m),
        "dqn_loss": loss.detach(),
    }
    if cql_penalty is not None:
        named["cql_penalty"] = _masked_mean(cql_penalty.detach(), m)
    return named


def _td_abs(q_values, td_target, m, cfg: DqnLossConfig):
    """``|TD error|`` (0 at invalid transitions) where the config asks for it, else None."""
    return masked((q_values.detach() - td_target).abs(), m) if cfg.return_td_error else None


def _kernel_scalars(cfg: DqnLossConfig) -> dict:
    """The config as the fused kernel's keyword scalars."""
    return dict(gamma=float(cfg.gamma), gamma_terminal=float(cfg.gamma_terminal),
                gamma_truncated=float(cfg.gamma_truncated), **reward_kernel_args(cfg),
                cql_weight=float(cfg.cql_weight), cql_eps=float(cfg.cql_scale_q_eps), huber=cfg.td_loss == "huber",
                huber_delta=float(cfg.huber_delta), double=bool(cfg.double_dqn), n_step=int(cfg.n_step),
                td_lambda=None if cfg.td_lambda is None else float(cfg.td_lambda),
                value_rescaling=bool(cfg.value_rescaling), rescale_eps=float(cfg.value_rescaling_eps))


def _dp_loss(loss: torch.Tensor, count, group, cfg: DqnLossConfig, masked_batch: bool, msg_mask: str):
    """This rank's share of the group's mean (``loss`` itself without a group), and the check that
    the whole batch has a valid transition."""
    if group is None:
        return loss, []
    n_global = global_counts([count], group, loss.device)[0]
    share = scale_grad(dp_share(loss, count, n_global), group, cfg.grad_reduction)
    if not masked_batch:
        return share, []
    return share, [(n_global == 0, msg_mask.replace("leaves", "leaves the whole group's batch"))]


def dqn_loss(step_stream: Any, out: Any, cfg: DqnLossConfig | None = None, group=None):
    """TD loss on ``out["dqn"]`` against ``out["dqn_target"]`` (both ``[B, S, A]``): one-step by
    default, n-step or Peng's Q(lambda) with ``cfg.n_step`` / ``cfg.td_lambda`` (see
    :class:`DqnLossConfig`), optionally in R2D2's rescaled value space.

    The transition out of step ``t`` is stored at ``t+1``: ``a = action[t+1]``, ``r = reward[t+1]``,
    ``done[t+1]`` in ``{0: running, 1: terminal, 2: truncated}`` picks ``gamma``,
    ``gamma_terminal`` or ``gamma_truncated``. ``loss = mean((q[t, a] - target)²)`` with
    ``target = r' + discount · max_a' q_target[t+1, a']`` (detached, the one-step target), ``r'`` the
    transformed reward;
    plus ``cql_weight · (|target| + cql_scale_q_eps) · (logsumexp q[t] - q[t, a])`` when
    ``cql_weight > 0``.

    Returns ``(loss, metrics)`` (and ``|TD error|`` ``[B, S-1]`` when ``cfg.return_td_error``).

    ``group``: a ``torch.distributed`` process group over which the batch's sequences are split
    (data parallel). The loss is then this rank's share of the whole batch's mean, its sum over
    the group's count of valid transitions (a rank with none contributes 0), so the ranks' losses
    and gradients sum to the whole batch's; ``cfg.grad_reduction="mean"`` scales the gradient by
    the group's size for DDP/FSDP's averaging. The metrics stay this rank's own statistics
    (:meth:`fusedloss.LazyMetrics.all_reduce` combines them over the group).
    """
    cfg = check_loss_config(cfg, DqnLossConfig, "dqn_loss")
    check_dp(group, cfg.grad_reduction)
    q = stream_get(out, "dqn", "out")
    q_target = stream_get(out, "dqn_target", "out")
    require_float(q, "out['dqn']")
    require_float(q_target, "out['dqn_target']")
    if q.dim() != 3:
        raise ValueError(f"out['dqn'] must have shape [B, S, A], got {tuple(q.shape)}.")
    B, S, A = q.shape
    require_shape(q_target, (B, S, A), "out['dqn_target']", "[B, S, A]")
    if B == 0 or A == 0:
        raise ValueError(f"out['dqn'] is empty: got shape [B, S, A] = {tuple(q.shape)}.")
    if S < 2:
        raise ValueError(f"dqn_loss needs S >= 2 steps per sequence to form a transition, got S = {S}.")
    check_reward_steps(cfg, S)
    action = stream_get(step_stream, "action")
    check_index(action, "step_stream['action']", (B, S), "[B, S]")
    done = stream_get(step_stream, "done")
    check_done(done, (B, S), "[B, S]")
    reward = reward_tensor(step_stream, cfg.use_xformed_reward, (B, S), "[B, S]")
    weight = mask = None
    if cfg.weight_key is not None:
        weight = stream_get(step_stream, cfg.weight_key)
        require_float(weight, f"step_stream[{cfg.weight_key!r}]")
        require_shape(weight, (B, S), f"step_stream[{cfg.weight_key!r}]", "[B, S]")
    if cfg.mask_key is not None:
        mask = stream_get(step_stream, cfg.mask_key)
        require_shape(mask, (B, S), f"step_stream[{cfg.mask_key!r}]", "[B, S]")
        mask = mask.to(torch.bool)
    reward_name = "step_stream['xformed_reward']" if cfg.use_xformed_reward else "step_stream['reward']"
    require_same_device({"out['dqn']": q, "out['dqn_target']": q_target, "step_stream['action']": action,
                         "step_stream['done']": done, reward_name: reward,
                         f"step_stream[{cfg.weight_key!r}]": weight, f"step_stream[{cfg.mask_key!r}]": mask})

    msg_action = f"step_stream['action'] holds a value outside [0, A) = [0, {A}) at a used step (t >= 1)."
    msg_done = "step_stream['done'] holds a value outside {0, 1, 2} (running, terminal, truncated) at a used step (t >= 1)."
    msg_mask = f"step_stream[{cfg.mask_key!r}] leaves no valid transition (steps t and t+1 both valid)."
    # With a group, "no valid transition" is the whole batch's check: a rank may hold none.
    local_mask_check = mask is not None and group is None
    if resolve_backend(cfg.backend, "dqn", q, q_target) is Backend.TRITON:
        from ..kernels import dqn as kernels

        # The kernel checks and clamps indices itself; metrics and flags are views of one buffer.
        loss, buf, td_abs = kernels.dqn_fused(q, q_target, action, reward, done, weight, mask, **_kernel_scalars(cfg))
        slot = kernels.DqnMetric
        names = list(_KERNEL_METRICS) if cfg.cql_weight > 0.0 else list(_KERNEL_METRICS)[:-1]
        slots = {k: int(slot[_KERNEL_METRICS[k]]) for k in names}
        check_slots = [(int(slot.BAD_ACTION), msg_action), (int(slot.BAD_DONE), msg_done)]
        if local_mask_check:
            check_slots.append((int(slot.NO_VALID), msg_mask))
        count = None if group is None else buf[int(slot.COUNT)]
        share, group_checks = _dp_loss(loss, count, group, cfg, mask is not None, msg_mask)
        metrics = finalize_buffer_metrics(buf, slots, check_slots, cfg.metrics_mode, count_slot=int(slot.COUNT),
                                          extra_checks=group_checks)
    else:
        action, bad_action = used_index(action, A)
        codes, bad_done = done_codes(done)
        checks = [(bad_action, msg_action)] + ([] if bad_done is None else [(bad_done, msg_done)])
        # the valid transitions: the local check (without a group), the share (with one), the metrics' weight
        n_valid = B * (S - 1) if mask is None else (mask[:, :-1] & mask[:, 1:]).sum()
        if local_mask_check:
            checks.append((n_valid == 0, msg_mask))
        loss, named, td_abs = dqn_reference(q, q_target, action, reward, codes, cfg, weight, mask)
        share, group_checks = _dp_loss(loss, n_valid, group, cfg, mask is not None, msg_mask)
        metrics = finalize_metrics(named, checks + group_checks, cfg.metrics_mode, count=n_valid)
    loss = share
    if cfg.return_td_error:
        return loss, metrics, td_abs
    return loss, metrics


def sequence_priority(td_error: torch.Tensor, mask: torch.Tensor | None = None, eta: float = 0.9) -> torch.Tensor:
    """R2D2's replay priority of each sequence: ``eta·max|delta| + (1 - eta)·mean|delta|`` over its valid
    transitions.

    ``td_error``: float ``[B, S-1]``, such as the third value :func:`dqn_loss` returns with
    ``return_td_error=True``. ``mask``: optional bool ``[B, S-1]``, the valid transitions (all when
    None); entries outside it never reach the result, not even a NaN. ``eta``: a number in
    ``[0, 1]``. Returns ``[B]`` in ``td_error``'s dtype (computed in fp32, fp64 for fp64); a row with
    no valid transition gets 0, and ``eta`` of 0 or 1 leaves out the other term (an infinite error
    gives inf, not ``0·inf``). Runs on the device, with no host sync.
    """
    require_float(td_error, "td_error")
    if td_error.dim() != 2:
        raise ValueError(f"td_error must have shape [B, S-1], got {tuple(td_error.shape)}.")
    if not (isinstance(eta, numbers.Real) and not isinstance(eta, bool) and math.isfinite(eta) and 0.0 <= eta <= 1.0):
        raise ValueError(f"eta must be a number in [0, 1], got {eta!r}.")
    x = td_error.abs()
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32  # an fp16 row sum overflows at 65504
    if mask is None:
        count = torch.full((x.shape[0],), x.shape[1], dtype=acc, device=x.device)
    else:
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
            raise TypeError(f"mask must be a bool tensor of shape [B, S-1], got "
                            f"{mask.dtype if isinstance(mask, torch.Tensor) else type(mask).__name__}.")
        require_shape(mask, tuple(x.shape), "mask", "[B, S-1] (td_error's shape)")
        require_same_device({"td_error": td_error, "mask": mask})
        x = torch.where(mask, x, torch.zeros((), dtype=x.dtype, device=x.device))
        count = mask.sum(dim=1).to(acc)  # bf16 counts past 256 are not exact
    if x.shape[1] == 0:
        return torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
    x = x.to(acc)
    eta = float(eta)
    peak, mean = x.amax(dim=1), x.sum(dim=1) / count.clamp(min=1)
    if eta == 1.0:  # the other term has weight 0: not 0·inf = NaN
        out = peak
    elif eta == 0.0:
        out = mean
    else:
        out = eta * peak + (1.0 - eta) * mean
    return out.to(td_error.dtype)


class DqnLoss(ConfigLoss):
    """``nn.Module`` form of :func:`dqn_loss`; ``forward(step_stream, out, group=None)``
    (``group``: this call's, else the module's)."""

    config_cls = DqnLossConfig

    def forward(self, step_stream: Any, out: Any, group=None):
        return dqn_loss(step_stream, out, self.cfg, self.group if group is None else group)


def _verify_cases(small: bool) -> list[VerifyCase]:
    from .. import testing as T

    B, S, A = (4, 9, 19) if small else (64, 64, 18)
    cases = []
    for opts in ({}, {"cql_weight": 0.3}, {"normalize_reward_mean": True, "normalize_reward_std": True,
                                           "reward_scale": 0.5, "reward_shift": 0.1},
                 {"double_dqn": True, "td_loss": "huber", "weight_key": "weight", "mask_key": "mask"},
                 {"n_step": 5, "double_dqn": True, "value_rescaling": True, "mask_key": "mask"},
                 {"td_lambda": 0.95, "double_dqn": True, "value_rescaling": True, "cql_weight": 0.1}):
        def make(dtype, device):
            return T.make_dqn_inputs(B, S, A, dtype, device, seed=1, weight=True, mask=True)

        def call(args, backend, _opts=opts):
            return dqn_loss(args[0], args[1], DqnLossConfig(backend=backend, **_opts))[0]

        cases.append(VerifyCase(",".join(f"{k}={v}" for k, v in opts.items()) or "default", f"B={B} S={S} A={A}",
                                make, call))
    return cases


FAMILY = Family(
    name="dqn",
    section="DQN",
    exports=("dqn_loss", "DqnLossConfig", "DqnLoss", "dqn_reference", "sequence_priority"),
    kernel="dqn",
    factories={"dqn": DqnLossConfig},
    verify_cases=_verify_cases,
)
