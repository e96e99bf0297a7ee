"""The built-in loss factories. Each config-backed factory subclasses its loss config, so the
factory's signature is the config's and ``build_loss`` checks params against it."""

from __future__ import annotations

import dataclasses

from torch import nn

from ..losses.dqn import DqnLoss, DqnLossConfig
from ..losses.moe import RouterZLoss, SwitchLoadBalancingLoss
from ..losses.sinkhorn import KOTSinkhornLoss, SinkhornOptions
from ..losses.sp import SpLoss, SpLossConfig
from ..losses.sv import SvLoss, SvLossConfig
from ..losses.vec_dqn import VecDqnLoss, VecDqnLossConfig
from ._registry import LOSS_BUILDER_REGISTRY

__all__ = [
    "L2LossFactory", "SinkhornKnoppLossFactory", "DqnLossFactory", "VecDqnLossFactory",
    "SpLossFactory", "SvLossFactory", "RouterZLossFactory", "SwitchLoadBalancingLossFactory",
]


def _config_of(factory, config_cls):
    return config_cls(**{f.name: getattr(factory, f.name) for f in dataclasses.fields(config_cls)})


@LOSS_BUILDER_REGISTRY.register("l2_loss")
@dataclasses.dataclass
class L2LossFactory:
    """``torch.nn.MSELoss`` with a configurable reduction."""

    reduction: str = "mean"

    def __post_init__(self) -> None:
        if self.reduction not in ("mean", "sum", "none"):
            raise ValueError(f"l2_loss reduction must be 'mean', 'sum' or 'none', got {self.reduction!r}.")

    def build(self) -> nn.Module:
        return nn.MSELoss(reduction=self.reduction)


@LOSS_BUILDER_REGISTRY.register("sinkhorn_knopp")
@dataclasses.dataclass
class SinkhornKnoppLossFactory(SinkhornOptions):
    """:class:`~fusedloss.losses.sinkhorn.KOTSinkhornLoss`; ``backend`` is geomloss's."""

    def build(self) -> nn.Module:
        return KOTSinkhornLoss(**dataclasses.asdict(self))


@LOSS_BUILDER_REGISTRY.register("dqn")
@dataclasses.dataclass
class DqnLossFactory(DqnLossConfig):
    def build(self) -> nn.Module:
        return DqnLoss(_config_of(self, DqnLossConfig))


@LOSS_BUILDER_REGISTRY.register("vec_dqn")
@dataclasses.dataclass
class VecDqnLossFactory(VecDqnLossConfig):
    def build(self) -> nn.Module:
        return VecDqnLoss(_config_of(self, VecDqnLossConfig))


@LOSS_BUILDER_REGISTRY.register("sp")
@dataclasses.dataclass
class SpLossFactory(SpLossConfig):
    def build(self) -> nn.Module:
        return SpLoss(_config_of(self, SpLossConfig))


@LOSS_BUILDER_REGISTRY.register("sv")
@dataclasses.dataclass
class SvLossFactory(SvLossConfig):
    def build(self) -> nn.Module:
        return SvLoss(_config_of(self, SvLossConfig))


@LOSS_BUILDER_REGISTRY.register("router_z")
@dataclasses.dataclass
class RouterZLossFactory:
    def build(self) -> nn.Module:
        return RouterZLoss()


@LOSS_BUILDER_REGISTRY.register("switch_load_balancing")
@dataclasses.dataclass
class SwitchLoadBalancingLossFactory:
    top_k: int = 1

    def __post_init__(self) -> None:
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 1:
            raise ValueError(f"switch_load_balancing top_k must be an integer >= 1, got {self.top_k!r}.")

    def build(self) -> nn.Module:
        return SwitchLoadBalancingLoss(self.top_k)
