"""Policy-gradient losses for RL on language models: PPO's clipped surrogate with the variants of
GRPO, DAPO and Dr. GRPO, and GRPO's group-relative advantages.

Per-token tensors are ``[B, T]`` (sequences × response tokens) with a bool ``mask`` ``[B, T]`` of
the tokens that count. Everything runs in PyTorch, sync-free with ``metrics_mode="lazy"``, and
traces under ``torch.compile(fullgraph=True)``. Tokens outside the mask may hold anything, NaN and
inf included: they never reach the loss, its gradient or the metrics.

The surrogate, with ``r = exp(logprob - old_logprob)`` (the log-ratio clamped to ``[-20, 20]`` first,
as verl does, so its gradient is 0 beyond) and advantages ``A`` (Schulman et al. 2017,
PPO; the clip-higher bound of DAPO, Yu et al. 2025; the dual clip of Ye et al. 2020, as verl's
``compute_policy_loss``)::

    pg = max(-A·r, -A·clip(r, 1 - clip_low, 1 + clip_high))
    pg = min(pg, -A·dual_clip)   where A < 0, with dual_clip set (> 1)

The KL penalty against a reference policy, per token, with ``d = ref_logprob - logprob``
(Schulman, "Approximating KL divergence", 2020): ``k1 = -d``, ``k2 = d²/2``, ``k3 = exp(d) - d - 1``
(the low-variance one, never negative; TRL's form; verl's ``low_var_kl`` also clamps it to
``[-10, 10]``, fusedloss does not). The loss is ``agg(pg) + kl_coef·agg(kl) - entropy_coef·agg(entropy)``,
every term with the same aggregation.

Aggregations (verl's ``loss_agg_mode`` names; ``x`` masked, ``n_b`` the valid tokens of row ``b``):

- ``token-mean``: ``Σ x / Σ n_b`` over the batch (DAPO's token-level loss);
- ``seq-mean-token-sum``: the mean over rows of ``Σ_t x``;
- ``seq-mean-token-mean``: the mean over rows of ``Σ_t x / n_b`` (the original GRPO);
- ``seq-mean-token-sum-norm``: ``Σ x / T``, ``T`` the mask's length (Dr. GRPO, as verl divides).

The seq-mean modes leave out rows with no valid token (verl counts such a row as 0 in
``seq-mean-token-sum`` and gets NaN in ``seq-mean-token-mean``), and a mean over nothing is 0 with a
zero gradient (``F.cross_entropy``'s mean gives NaN there).
"""

from __future__ import annotations

import dataclasses
import math
import numbers

import torch

from .._families import Family, VerifyCase
from ..metrics import check_metrics_mode, finalize_metrics
from ._common import ConfigLoss, LossConfig, check_loss_config, compute_dtype, require_float, require_same_device
from ._data_parallel import check_dp, check_grad_reduction, dp_share, global_counts, scale_grad

__all__ = ["LOSS_AGG_MODES", "KL_ESTIMATORS", "PolicyLossConfig", "policy_loss", "PolicyLoss", "group_advantages",
           "aggregate"]

LOG_RATIO_CLAMP = 20.0
LOSS_AGG_MODES = ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm")
KL_ESTIMATORS = ("k1", "k2", "k3")


@dataclasses.dataclass
class PolicyLossConfig(LossConfig):
    """Configuration of :func:`policy_loss` (and the ``policy`` registry entry)."""

    clip_low: float = 0.2
    """The ratio's lower clip, ``1 - clip_low`` (>= 0)."""
    clip_high: float | None = None
    """The ratio's upper clip, ``1 + clip_high``; None: ``clip_low`` (DAPO's clip-higher sets it larger)."""
    dual_clip: float | None = None
    """None, or the dual-clip constant ``c > 1``: the loss of a token with a negative advantage is at most ``-A·c``."""
    loss_agg: str = "token-mean"
    """The aggregation of every term: ``"token-mean"``, ``"seq-mean-token-sum"``, ``"seq-mean-token-mean"`` or ``"seq-mean-token-sum-norm"``."""
    kl_coef: float = 0.0
    """The KL penalty's weight (>= 0); non-zero needs ``ref_logprob``."""
    kl_estimator: str = "k3"
    """``"k1"``, ``"k2"`` or ``"k3"``: the per-token estimate of ``KL(policy ‖ reference)``."""
    entropy_coef: float = 0.0
    """The entropy bonus's weight (>= 0); non-zero needs ``entropy``."""
    metrics_mode: str = "float"
    """``"float"``: metrics as a ``dict[str, float]`` with one host transfer; ``"lazy"``: a :class:`fusedloss.LazyMetrics`, no host sync."""
    grad_reduction: str = "sum"
    """With a data-parallel ``group``: ``"sum"`` (the ranks' gradients sum to the batch's) or ``"mean"`` (scaled by the group's size, for DDP/FSDP's averaging)."""

    def check_values(self) -> None:
        check_grad_reduction(self.grad_reduction)
        for name in ("clip_low", "kl_coef", "entropy_coef"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}.")
        if self.clip_high is not None and not (math.isfinite(self.clip_high) and self.clip_high >= 0):
            raise ValueError(f"clip_high must be None or a finite number >= 0, got {self.clip_high!r}.")
        if self.dual_clip is not None and not (math.isfinite(self.dual_clip) and self.dual_clip > 1):
            raise ValueError(f"dual_clip must be None or a finite number > 1, got {self.dual_clip!r}.")
        if self.loss_agg not in LOSS_AGG_MODES:
            raise ValueError(f"loss_agg must be one of {LOSS_AGG_MODES}, got {self.loss_agg!r}.")
        if self.kl_estimator not in KL_ESTIMATORS:
            raise ValueError(f"kl_estimator must be one of {KL_ESTIMATORS}, got {self.kl_estimator!r}.")
        check_metrics_mode(self.metrics_mode)

    def build(self) -> PolicyLoss:
        """The :class:`PolicyLoss` of this config (the registry's factory interface)."""
        return PolicyLoss(self)


def aggregate(x: torch.Tensor, mask: torch.Tensor, mode: str = "token-mean") -> torch.Tensor:
    """``x`` ``[B, T]`` over the True entries of ``mask`` by one of :data:`LOSS_AGG_MODES` (the module
    docstring has each formula); masked entries never reach the result, not even a NaN."""
    x = torch.where(mask, x, torch.zeros((), dtype=x.dtype, device=x.device))
    m = mask.to(x.dtype)
    if mode == "token-mean":
        return x.sum() / m.sum().clamp(min=1)
    if mode == "seq-mean-token-sum-norm":
        return x.sum() / max(mask.shape[-1], 1)
    tokens = m.sum(dim=-1)
    per_row = x.sum(dim=-1)
    if mode == "seq-mean-token-mean":
        per_row = per_row / tokens.clamp(min=1)
    elif mode != "seq-mean-token-sum":
        raise ValueError(f"loss_agg must be one of {LOSS_AGG_MODES}, got {mode!r}.")
    rows = (tokens > 0).to(x.dtype)
    return (per_row * rows).sum() / rows.sum().clamp(min=1)


def _token_tensor(t, name: str, shape: tuple, allow_rows: bool = False) -> torch.Tensor:
    require_float(t, name)
    if tuple(t.shape) == shape:
        return t
    if allow_rows and tuple(t.shape) == shape[:1]:
        return t[:, None].expand(shape)
    rows = f" or [B] = ({shape[0]},)" if allow_rows else ""
    raise ValueError(f"{name} must have shape [B, T] = {shape}{rows}, got {tuple(t.shape)}.")


def _kl(logprob: torch.Tensor, ref_logprob: torch.Tensor, estimator: str) -> torch.Tensor:
    d = ref_logprob - logprob
    if estimator == "k1":
        return -d
    if estimator == "k2":
        return 0.5 * d * d
    return torch.expm1(d) - d  # exp(d) - d - 1, without cancelling near d = 0


def policy_loss(logprob: torch.Tensor, old_logprob: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                *, clip_low: float = 0.2, clip_high: float | None = None, dual_clip: float | None = None,
                loss_agg: str = "token-mean", ref_logprob: torch.Tensor | None = None, kl_coef: float = 0.0,
                kl_estimator: str = "k3", entropy: torch.Tensor | None = None, entropy_coef: float = 0.0,
                metrics_mode: str = "float", cfg: PolicyLossConfig | None = None, group=None,
                grad_reduction: str = "sum"):
    """PPO's clipped policy loss and its GRPO, DAPO and Dr. GRPO variants (formulas in the module
    docstring). Returns ``(loss, metrics)``.

    ``logprob`` ``[B, T]``: the policy's log-probabilities of the sampled tokens (they get the
    gradient); ``old_logprob`` ``[B, T]``: the sampling policy's; ``advantages``: ``[B, T]``, or
    ``[B]`` for one advantage per sequence (GRPO); ``mask``: bool ``[B, T]``, the tokens that count.
    ``ref_logprob`` ``[B, T]`` (with ``kl_coef > 0``) and ``entropy`` ``[B, T]`` (with
    ``entropy_coef > 0``, differentiable) add the KL penalty and the entropy bonus. The options are
    :class:`PolicyLossConfig`'s fields; pass ``cfg`` instead to use a config.

    Metrics: ``policy_loss`` (the total), ``pg_loss``, ``pg_clipfrac`` (the fraction of valid tokens
    where the clipped term wins strictly, verl's), ``ppo_kl`` (the token mean of ``old_logprob -
    logprob``, clamped as the ratio's log), and ``kl`` and ``entropy`` (aggregated as the loss) when given. No host sync with
    ``metrics_mode="lazy"``. Computed in fp32 (fp64 for fp64 inputs).

    ``group``: a ``torch.distributed`` process group over which the batch's sequences are split
    (data parallel). The loss is then this rank's share of the whole batch's aggregate: its sum
    over the group's count of valid tokens (``token-mean``) or of rows with one (the ``seq-mean``
    modes; ``Σ x / T`` needs no count), so the ranks' losses and gradients sum to the whole
    batch's. The metrics stay this rank's own (:meth:`fusedloss.LazyMetrics.all_reduce` combines
    them, weighted by the valid tokens). ``grad_reduction="mean"`` (or ``cfg.grad_reduction``)
    scales the gradient by the group's size for a trainer that averages gradients (DDP, FSDP).
    """
    if cfg is None:
        cfg = PolicyLossConfig(clip_low=clip_low, clip_high=clip_high, dual_clip=dual_clip, loss_agg=loss_agg,
                               kl_coef=kl_coef, kl_estimator=kl_estimator, entropy_coef=entropy_coef,
                               metrics_mode=metrics_mode, grad_reduction=grad_reduction)
    else:
        cfg = check_loss_config(cfg, PolicyLossConfig, "policy_loss")
    require_float(logprob, "logprob")
    if logprob.dim() != 2:
        raise ValueError(f"logprob must have shape [B, T], got {tuple(logprob.shape)}.")
    shape = tuple(logprob.shape)
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or tuple(mask.shape) != shape:
        got = f"{mask.dtype} {tuple(mask.shape)}" if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise TypeError(f"mask must be a bool tensor of shape [B, T] = {shape}, got {got}.")
    old_logprob = _token_tensor(old_logprob, "old_logprob", shape)
    advantages = _token_tensor(advantages, "advantages", shape, allow_rows=True)
    if cfg.kl_coef > 0 and ref_logprob is None:
        raise ValueError("kl_coef > 0 needs ref_logprob, the reference policy's log-probabilities [B, T].")
    if cfg.entropy_coef > 0 and entropy is None:
        raise ValueError("entropy_coef > 0 needs entropy, the policy's per-token entropy [B, T].")
    extra = {}
    if ref_logprob is not None:
        extra["ref_logprob"] = _token_tensor(ref_logprob, "ref_logprob", shape)
    if entropy is not None:
        extra["entropy"] = _token_tensor(entropy, "entropy", shape)
    require_same_device({"logprob": logprob, "old_logprob": old_logprob, "advantages": advantages, "mask": mask,
                         **extra})

    check_dp(group, cfg.grad_reduction)
    cd = compute_dtype(logprob, old_logprob, advantages, *extra.values())
    zero = torch.zeros((), dtype=cd, device=logprob.device)

    def valid(t: torch.Tensor) -> torch.Tensor:  # masked before any arithmetic: no NaN gradient through 0·NaN
        return torch.where(mask, t.to(cd), zero)

    lp, old, adv = valid(logprob), valid(old_logprob).detach(), valid(advantages).detach()
    # clamped to [-20, 20] before exp, as verl does: exp would overflow past 88 and 0·inf make the gradient NaN
    log_ratio = (lp - old).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    ratio = torch.exp(log_ratio)
    high = cfg.clip_low if cfg.clip_high is None else cfg.clip_high
    pg1 = -adv * ratio
    pg2 = -adv * ratio.clamp(1.0 - cfg.clip_low, 1.0 + high)
    pg = torch.maximum(pg1, pg2)
    if cfg.dual_clip is not None:
        pg = torch.where(adv < 0, torch.minimum(pg, -adv * cfg.dual_clip), pg)
    pg_loss = aggregate(pg, mask, cfg.loss_agg)
    loss = pg_loss
    named = {"policy_loss": loss, "pg_loss": pg_loss.detach(),  # policy_loss: replaced by the total below
             "pg_clipfrac": aggregate((pg2 > pg1).to(cd), mask, "token-mean"),
             "ppo_kl": aggregate(-log_ratio.detach(), mask, "token-mean")}
    if "ref_logprob" in extra:
        kl = aggregate(_kl(lp, valid(extra["ref_logprob"]).detach(), cfg.kl_estimator), mask, cfg.loss_agg)
        loss = loss + cfg.kl_coef * kl
        named["kl"] = kl.detach()
    if "entropy" in extra:
        ent = aggregate(valid(extra["entropy"]), mask, cfg.loss_agg)
        loss = loss - cfg.entropy_coef * ent
        named["entropy"] = ent.detach()
    named["policy_loss"] = loss.detach()
    if group is not None and cfg.loss_agg != "seq-mean-token-sum-norm":  # Σ x / T: its share is the local value
        # every term is aggregated by cfg.loss_agg, over the valid tokens or the rows holding one
        n_local = mask.sum() if cfg.loss_agg == "token-mean" else (mask.sum(dim=-1) > 0).sum()
        loss = dp_share(loss, n_local, global_counts([n_local], group, loss.device)[0])
    count = mask.sum() if cfg.metrics_mode == "lazy" else None  # the metrics' weight in LazyMetrics.all_reduce
    return scale_grad(loss, group, cfg.grad_reduction), finalize_metrics(named, [], cfg.metrics_mode, count=count)


def group_advantages(rewards: torch.Tensor, group_size: int, *, normalize_std: bool = True, eps: float = 1e-6,
                     mask: torch.Tensor | None = None) -> torch.Tensor:
    """GRPO's group-relative advantages (Shao et al. 2024): ``rewards`` ``[B·G]`` hold contiguous
    groups of ``group_size`` samples of one prompt; each gets ``r - mean_g``, divided by
    ``std_g + eps`` (the unbiased std, ``eps`` outside the root) with ``normalize_std`` (Dr. GRPO
    turns it off). Returns ``[B·G]``, or ``[B·G, T]`` broadcast over the True entries of ``mask``
    ``[B·G, T]`` (0 elsewhere). The rewards get no gradient."""
    require_float(rewards, "rewards")
    if rewards.dim() != 1:
        raise ValueError(f"rewards must have shape [B·G], got {tuple(rewards.shape)}.")
    if isinstance(group_size, bool) or not isinstance(group_size, numbers.Integral) or group_size < 1:
        raise ValueError(f"group_size must be an integer >= 1, got {group_size!r}.")
    if normalize_std and group_size < 2:
        raise ValueError("group_size must be >= 2 with normalize_std=True: a group of one has no std.")
    if rewards.shape[0] % group_size:
        raise ValueError(f"rewards holds {rewards.shape[0]} samples, not a multiple of group_size = {group_size}.")
    if not (isinstance(eps, numbers.Real) and math.isfinite(eps) and eps >= 0):
        raise ValueError(f"eps must be a finite number >= 0, got {eps!r}.")
    cd = compute_dtype(rewards)
    r = rewards.detach().to(cd).reshape(-1, group_size)
    adv = r - r.mean(dim=1, keepdim=True)
    if normalize_std:
        adv = adv / (r.std(dim=1, keepdim=True) + eps)
    adv = adv.reshape(-1)
    if mask is None:
        return adv
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or mask.dim() != 2 or mask.shape[0] != adv.shape[0]:
        raise TypeError(f"mask must be a bool tensor of shape [B·G, T] with B·G = {adv.shape[0]}.")
    require_same_device({"rewards": rewards, "mask": mask})
    return torch.where(mask, adv[:, None], torch.zeros((), dtype=cd, device=adv.device))


class PolicyLoss(ConfigLoss):
    """``nn.Module`` form of :func:`policy_loss`: ``forward(logprob, old_logprob, advantages, mask,
    ref_logprob=None, entropy=None, group=None)`` (``group``: this call's, else the module's)."""

    config_cls = PolicyLossConfig

    def forward(self, logprob, old_logprob, advantages, mask, ref_logprob=None, entropy=None, group=None):
        return policy_loss(logprob, old_logprob, advantages, mask, ref_logprob=ref_logprob, entropy=entropy,
                           cfg=self.cfg, group=self.group if group is None else group)


def _verify_cases(small: bool) -> list[VerifyCase]:
    B, T = (6, 11) if small else (256, 1024)

    def make(dtype, device):
        g = torch.Generator(device=device).manual_seed(10)
        lp = (-torch.rand(B, T, generator=g, device=device) * 3).to(dtype).requires_grad_(True)
        old = (lp.detach().float() + 0.3 * torch.randn(B, T, generator=g, device=device)).to(dtype)
        ref = (lp.detach().float() + 0.2 * torch.randn(B, T, generator=g, device=device)).to(dtype)
        adv = torch.randn(B, generator=g, device=device).to(dtype)
        mask = torch.rand(B, T, generator=g, device=device) < 0.8
        return lp, old, adv, mask, ref

    cases = []
    for agg in LOSS_AGG_MODES:
        def call(args, backend, _agg=agg):
            lp, old, adv, mask, ref = args
            return policy_loss(lp, old, adv, mask, clip_high=0.28, dual_clip=3.0, loss_agg=_agg, ref_logprob=ref,
                               kl_coef=0.05)[0]

        cases.append(VerifyCase(f"{agg},clip 0.2/0.28,dual 3,k3 0.05", f"B={B} T={T}", make, call))
    return cases


FAMILY = Family(
    name="policy",
    section="RL for language models",
    exports=("policy_loss", "PolicyLossConfig", "PolicyLoss", "group_advantages"),
    factories={"policy": PolicyLossConfig},
    verify_cases=_verify_cases,
)
