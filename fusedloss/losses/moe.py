"""Mixture-of-experts router losses: z-loss and Switch load balancing."""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from .._families import Family, VerifyCase
from ._common import LossConfig, compute_dtype, require_float, require_same_device
from ._data_parallel import check_dp, check_grad_reduction, scale_grad

__all__ = ["router_z_loss", "switch_load_balancing_loss", "RouterZLoss", "SwitchLoadBalancingLoss"]


def _router_rows(router_logits: torch.Tensor) -> torch.Tensor:
    require_float(router_logits, "router_logits")
    if router_logits.dim() < 1 or router_logits.shape[-1] < 1:
        raise ValueError(f"router_logits must have shape [..., E] with E >= 1, got {tuple(router_logits.shape)}.")
    if router_logits.numel() == 0:
        raise ValueError(f"router_logits is empty: got shape {tuple(router_logits.shape)}.")
    return router_logits.reshape(-1, router_logits.shape[-1]).to(compute_dtype(router_logits))


def router_z_loss(router_logits: torch.Tensor) -> torch.Tensor:
    """ST-MoE z-loss: the mean over tokens of ``logsumexp(router_logits)²``; logits ``[..., E]``."""
    return _router_rows(router_logits).logsumexp(dim=-1).square().mean()


def switch_load_balancing_loss(router_logits: torch.Tensor, top_k: int = 1, mask: torch.Tensor | None = None, *,
                               group=None, grad_reduction: str = "sum"):
    """Switch-Transformer load balancing ``E · Σ_i f_i · P_i``; perfect balance gives 1.0.

    ``f_i`` is the fraction of the ``T · top_k`` routing slots that top-k of the softmax sends to
    expert ``i`` (no gradient), ``P_i`` the mean router probability of expert ``i``. ``mask``
    (``router_logits.shape[:-1]``, True for real tokens) drops padded tokens from both terms; with
    no real token the loss is 0.

    **Data parallel.** With ``group=`` (a ``torch.distributed`` process group whose ranks each hold
    their own tokens) ``f`` and ``P`` are those of the global batch: one all-reduce of ``2E + 1``
    numbers (the slot counts, the probability sums and the token count). Every rank returns the
    global loss, and its gradient is this rank's rows of the global gradient, so the ranks'
    gradients *sum* to the global one (the other ranks' sums enter as constants).
    ``grad_reduction="mean"`` scales the gradient (not the value) by the group's size, for a
    trainer that *averages* gradients over the group (DDP, FSDP): without it the averaged
    gradient is ``1/world`` of the global one (Megatron-LM #3769).
    """
    x = _router_rows(router_logits)
    T, E = x.shape
    if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= E:
        raise ValueError(f"top_k must be an integer in [1, E] = [1, {E}], got {top_k!r}.")
    check_dp(group, grad_reduction)
    if mask is None:
        m = torch.ones(T, dtype=x.dtype, device=x.device)
    else:
        require_same_device({"router_logits": router_logits, "mask": mask})
        if tuple(mask.shape) != tuple(router_logits.shape[:-1]):
            raise ValueError(
                f"mask must have shape router_logits.shape[:-1] = {tuple(router_logits.shape[:-1])}, got {tuple(mask.shape)}."
            )
        m = mask.reshape(T).to(torch.bool).to(x.dtype)
        # A padded token's logits (often -inf or garbage) must not reach the loss, not even as 0·NaN.
        x = torch.where(m[:, None] > 0, x, torch.zeros((), dtype=x.dtype, device=x.device))
    probs = x.softmax(dim=-1)
    chosen = probs.detach().topk(top_k, dim=-1).indices
    slots = torch.zeros_like(probs).scatter_(-1, chosen, 1.0)
    counts, psum, n = (slots * m[:, None]).sum(dim=0), (probs * m[:, None]).sum(dim=0), m.sum()
    if group is not None:
        import torch.distributed as dist

        local = torch.cat([counts, psum.detach(), n[None]])
        total = local.clone()
        dist.all_reduce(total, group=group)
        counts, n = total[:E], total[2 * E]
        psum = psum + (total[E:2 * E] - psum.detach())  # the global sums, with the gradient of this rank's rows
    n = n.clamp(min=1.0)
    f = counts / (n * top_k)
    P = psum / n
    loss = E * (f * P).sum()
    return scale_grad(loss, group, grad_reduction)  # "mean": the value stays, the gradient is world times larger


class RouterZLoss(nn.Module):
    """``nn.Module`` form of :func:`router_z_loss`; ``forward(router_logits)``."""

    def forward(self, router_logits: torch.Tensor) -> torch.Tensor:
        return router_z_loss(router_logits)


class SwitchLoadBalancingLoss(nn.Module):
    """``nn.Module`` form of :func:`switch_load_balancing_loss`; ``forward(router_logits, mask=None,
    group=None)``. A process group cannot come from a config: give it here or at each call (the
    call's wins)."""

    def __init__(self, top_k: int = 1, group=None, grad_reduction: str = "sum"):
        super().__init__()
        self.top_k, self.group, self.grad_reduction = top_k, group, grad_reduction

    def forward(self, router_logits: torch.Tensor, mask: torch.Tensor | None = None, group=None) -> torch.Tensor:
        return switch_load_balancing_loss(router_logits, self.top_k, mask, group=group or self.group,
                                          grad_reduction=self.grad_reduction)

    def extra_repr(self) -> str:
        return f"top_k={self.top_k}, grad_reduction={self.grad_reduction!r}"


@dataclasses.dataclass
class RouterZLossFactory:
    """The ``router_z`` registry entry: :class:`RouterZLoss` (no params)."""

    def build(self) -> nn.Module:
        return RouterZLoss()


@dataclasses.dataclass
class SwitchLoadBalancingLossFactory(LossConfig):
    """The ``switch_load_balancing`` registry entry: :class:`SwitchLoadBalancingLoss`."""

    top_k: int = 1
    """Experts each token is routed to (>= 1)."""
    grad_reduction: str = "sum"
    """``"sum"``, or ``"mean"`` where the trainer averages gradients over the data-parallel group (DDP, FSDP): see :func:`fusedloss.switch_load_balancing_loss`."""

    def check_values(self) -> None:
        if self.top_k < 1:
            raise ValueError(f"switch_load_balancing top_k must be an integer >= 1, got {self.top_k!r}.")
        check_grad_reduction(self.grad_reduction)

    def build(self) -> nn.Module:
        return SwitchLoadBalancingLoss(self.top_k, grad_reduction=self.grad_reduction)


def _verify_cases(small: bool) -> list[VerifyCase]:
    from .. import testing as T

    tokens = 36 if small else 4096

    def make(dtype, device):
        return (T.make_router_logits(tokens, 8, dtype, device, seed=5),)

    return [VerifyCase("default", f"T={tokens} E=8", make, lambda args, backend: router_z_loss(args[0]),
                       name="router_z"),
            VerifyCase("top_k=2", f"T={tokens} E=8", make,
                       lambda args, backend: switch_load_balancing_loss(args[0], top_k=2), name="switch_load_balancing")]


FAMILY = Family(
    name="moe",
    section="MoE router losses",
    exports=("router_z_loss", "RouterZLoss", "switch_load_balancing_loss", "SwitchLoadBalancingLoss"),
    factories={"router_z": RouterZLossFactory, "switch_load_balancing": SwitchLoadBalancingLossFactory},
    verify_cases=_verify_cases,
)
