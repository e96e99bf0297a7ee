"""Vector DQN: pairwise-angle action scores, RoPE rotation by reward, and a cosine loss."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch
import torch.nn.functional as F

from .._dispatch import Backend, resolve_backend
from .._families import Family, VerifyCase
from ..metrics import AnyEqual, finalize_metrics
from ._common import (
    ConfigLoss,
    LossConfig,
    check_config_common,
    check_loss_config,
    check_index,
    check_reward_config,
    check_reward_steps,
    clamp_index,
    compute_dtype,
    require_float,
    require_same_device,
    reward_tensor,
    stream_get,
    transform_rewards,
)
from ._data_parallel import check_dp, check_grad_reduction, dp_share, global_counts, scale_grad
from .rope import check_even_d, rope_rotate, rope_rotate_reference  # noqa: F401  (rope_rotate: its old home)

__all__ = [
    "VecDqnLossConfig",
    "vec_dqn_loss",
    "vec_dqn_reference",
    "vec_dqn_scores",
    "vec_dqn_scores_reference",
    "VecDqnLoss",
]


@dataclasses.dataclass
class VecDqnLossConfig(LossConfig):
    """Configuration of :func:`vec_dqn_loss`, with the seed's fields and defaults."""

    weight: float = 0.0
    """The loss's weight in the trainer's sum (carried for the trainer; the loss functions do not use it)."""
    tau: float = 0.01
    """Target-network soft-update rate (carried for the trainer; the loss functions do not use it)."""
    reward_scale: float = 1.0
    """Multiplies the (normalised) reward: ``r' = r·reward_scale + reward_shift``."""
    reward_shift: float = 0.0
    """Added to the scaled reward: ``r' = r·reward_scale + reward_shift``."""
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
    backend: str = "auto"
    """``"auto"`` (the fused kernel on CUDA where one exists, else the reference), ``"triton"`` (the kernel or a clear error) or ``"torch"`` (the reference)."""
    metrics_mode: str = "float"
    """``"float"``: metrics as a ``dict[str, float]`` with one host transfer (and the input checks raised then); ``"lazy"``: a :class:`fusedloss.LazyMetrics`, no host sync."""
    grad_reduction: str = "sum"
    """With a data-parallel ``group``: ``"sum"`` (the ranks' gradients sum to the batch's) or ``"mean"`` (scaled by the group's size, for DDP/FSDP's averaging)."""

    def check_values(self) -> None:
        check_config_common(self.backend, self.metrics_mode)
        check_grad_reduction(self.grad_reduction)
        check_reward_config(self)

    def build(self) -> VecDqnLoss:
        """The :class:`VecDqnLoss` of this config (the registry's factory interface)."""
        return VecDqnLoss(self)


def vec_dqn_scores_reference(vecs: torch.Tensor) -> torch.Tensor:
    """Materializes the ``[..., A, A]`` angle matrix; the fused path never does."""
    v = F.normalize(vecs.to(compute_dtype(vecs)), dim=-1)
    rot = rope_rotate_reference(v, math.pi / 2)
    sin = torch.einsum("...id,...ad->...ai", rot, v)
    cos = torch.einsum("...id,...ad->...ai", v, v)
    return torch.atan2(sin, cos).sum(dim=-1)


def vec_dqn_scores(vecs: torch.Tensor, *, backend: str = "auto") -> torch.Tensor:
    """Action scores ``[..., A]`` from action vectors ``[..., A, D]`` (``D`` even).

    The vectors are normalized; the score of action ``a`` is
    ``Σ_i atan2(<rot90(v_i), v_a>, <v_i, v_a>)``, the signed angles from every action to ``a``,
    with ``rot90`` = :func:`rope_rotate` by ``π/2``. fp32 (fp64 for fp64 input).
    """
    require_float(vecs, "vecs")
    if vecs.dim() < 2:
        raise ValueError(f"vecs must have shape [..., A, D], got {tuple(vecs.shape)}.")
    check_even_d(vecs, "vecs")
    if resolve_backend(backend, "vec_dqn", vecs) is Backend.TRITON:
        from ..kernels import vec_dqn as kernels

        return kernels.vec_dqn_scores_fused(vecs)
    return vec_dqn_scores_reference(vecs)


def vec_dqn_reference(online_vecs, target_vecs, action, reward, cfg):
    """Reference on validated inputs: ``[B, S, A, D]`` vectors, ``action`` int64 ``[B, S]``."""
    cd = compute_dtype(online_vecs, target_vecs)
    online = online_vecs.to(cd)
    B, S, A, D = online.shape
    curr = online[:, :-1]
    nxt = target_vecs[:, 1:].to(cd)
    a = action[:, 1:].reshape(B, S - 1, 1, 1).expand(B, S - 1, 1, D)
    curr_action_vecs = curr.gather(2, a).squeeze(2)
    greedy = vec_dqn_scores_reference(nxt).argmax(dim=-1)
    next_action_vecs = nxt.gather(2, greedy.reshape(B, S - 1, 1, 1).expand(B, S - 1, 1, D)).squeeze(2)
    theta = transform_rewards(reward[:, 1:].to(cd), cfg)
    rotated = rope_rotate_reference(next_action_vecs, theta)
    cosine = F.cosine_similarity(curr_action_vecs, rotated.detach(), dim=-1)
    # A NaN or inf among the target vectors at t+1 leaves no meaningful greedy action: that
    # transition's loss and gradient are NaN (the NaN-as-max argmax would otherwise hide it).
    bad = ~torch.isfinite(nxt).all(dim=-1).all(dim=-1)
    loss = ((1.0 - cosine) * torch.where(bad, float("nan"), 1.0)).mean()
    return loss, _metrics(loss, vec_dqn_scores_reference(online[:, -1].detach()))


def _metrics(loss: torch.Tensor, last_scores: torch.Tensor) -> dict[str, torch.Tensor]:
    """The seed's metrics: the loss and the |scores| of the online vectors at the last step, over π."""
    abs_scores = last_scores.abs() / math.pi
    lo, hi = abs_scores.aminmax()
    return {
        "vec_dqn_loss": loss.detach(),
        "vec_dqn_score_abs_min": lo,
        "vec_dqn_score_abs_max": hi,
        "vec_dqn_score_abs_mean": abs_scores.mean(),
    }


def vec_dqn_loss(step_stream: Any, online_vecs: torch.Tensor, target_vecs: torch.Tensor,
                 cfg: VecDqnLossConfig | None = None, group=None):
    """Cosine loss between the online vector of the taken action at ``t`` and the target vector
    of the greedy action at ``t+1`` rotated by ``theta = r' `` (the transformed reward, detached).

    ``online_vecs``, ``target_vecs``: ``[B, S, A, D]``, ``D`` even; ``step_stream["action"]`` and
    ``["reward"]``: ``[B, S]``, the transition out of ``t`` stored at ``t+1``.
    Returns ``(loss, metrics)``. ``group``: the data-parallel process group; the loss is then this
    rank's share of the whole batch's mean over transitions, as in :func:`fusedloss.dqn_loss`
    (the metrics stay this rank's own).
    """
    cfg = check_loss_config(cfg, VecDqnLossConfig, "vec_dqn_loss")
    check_dp(group, cfg.grad_reduction)
    require_float(online_vecs, "online_vecs")
    require_float(target_vecs, "target_vecs")
    if online_vecs.dim() != 4:
        raise ValueError(f"online_vecs must have shape [B, S, A, D], got {tuple(online_vecs.shape)}.")
    if tuple(target_vecs.shape) != tuple(online_vecs.shape):
        raise ValueError(
            f"target_vecs must have the shape of online_vecs [B, S, A, D] = {tuple(online_vecs.shape)}, "
            f"got {tuple(target_vecs.shape)}."
        )
    B, S, A, D = online_vecs.shape
    if B == 0 or A == 0:
        raise ValueError(f"online_vecs is empty: got shape [B, S, A, D] = {tuple(online_vecs.shape)}.")
    if S < 2:
        raise ValueError(f"vec_dqn_loss needs S >= 2 steps per sequence, got S = {S}.")
    check_even_d(online_vecs, "online_vecs")
    check_reward_steps(cfg, S)
    action = stream_get(step_stream, "action")
    check_index(action, "step_stream['action']", (B, S), "[B, S]")
    reward = reward_tensor(step_stream, cfg.use_xformed_reward, (B, S), "[B, S]")
    require_same_device({"online_vecs": online_vecs, "target_vecs": target_vecs, "step_stream['action']": action,
                         "step_stream['reward']": reward})
    bad_msg = f"step_stream['action'] holds a value outside [0, A) = [0, {A}) at a used step (t >= 1)."
    if resolve_backend(cfg.backend, "vec_dqn", online_vecs, target_vecs) is Backend.TRITON:
        from ..kernels import vec_dqn as kernels

        # the kernel clamps the action and reports the range check per transition: no aten op for it
        theta = transform_rewards(reward[:, 1:].to(torch.float32), cfg)
        loss, status = kernels.vec_dqn_fused(online_vecs, target_vecs, action, theta, mean=True)
        named = _metrics(loss, kernels.vec_dqn_scores_fused(online_vecs[:, -1]))
        checks = [(AnyEqual(status, 1), bad_msg)]
    else:
        action, bad_action = clamp_index(action, A, used=slice(1, None))
        loss, named = vec_dqn_reference(online_vecs, target_vecs, action, reward, cfg)
        checks = [(bad_action, bad_msg)]
    if group is not None:
        n_global = global_counts([B * (S - 1)], group, loss.device)[0]
        loss = scale_grad(dp_share(loss, B * (S - 1), n_global), group, cfg.grad_reduction)
    return loss, finalize_metrics(named, checks, cfg.metrics_mode, count=B * (S - 1))


class VecDqnLoss(ConfigLoss):
    """``nn.Module`` form of :func:`vec_dqn_loss`; ``forward(step_stream, online_vecs, target_vecs, group=None)``
    (``group``: this call's, else the module's)."""

    config_cls = VecDqnLossConfig

    def forward(self, step_stream: Any, online_vecs: torch.Tensor, target_vecs: torch.Tensor, group=None):
        return vec_dqn_loss(step_stream, online_vecs, target_vecs, self.cfg, self.group if group is None else group)


def _verify_cases(small: bool) -> list[VerifyCase]:
    from .. import testing as T

    B, S, A, D = (4, 9, 19, 6) if small else (64, 64, 18, 16)

    def make(dtype, device):
        return T.make_vec_dqn_inputs(B, S, A, D, dtype, device, seed=2, argmax_margin=1e-3)

    def call(args, backend):
        return vec_dqn_loss(args[0], args[1], args[2], VecDqnLossConfig(backend=backend))[0]

    return [VerifyCase("default", f"B={B} S={S} A={A} D={D}", make, call)]


FAMILY = Family(
    name="vec_dqn",
    section="Vector DQN",
    exports=("vec_dqn_loss", "VecDqnLossConfig", "VecDqnLoss", "vec_dqn_reference", "vec_dqn_scores",
             "vec_dqn_scores_reference"),
    kernel="vec_dqn",
    factories={"vec_dqn": VecDqnLossConfig},
    verify_cases=_verify_cases,
)
