"""The built-in loss factories. Each config-backed factory subclasses its loss config, so the
factory's signature is the config's and ``build_loss`` checks params against it."""

from __future__ import annotations

import dataclasses

from torch import nn

from ..losses._common import check_field_types
from ..losses.dqn import DqnLoss, DqnLossConfig
from ..losses.moe import RouterZLoss, SwitchLoadBalancingLoss
from ..losses.sinkhorn import KOTSinkhornLoss, SinkhornOptions
from ..losses.sp import SpLoss, SpLossConfig, SpTopKLoss, SpTopKLossConfig
from ..losses.sp_linear import SpLinearLoss, SpLinearLossConfig
from ..losses.sv import SvLoss, SvLossConfig
from ..losses.vec_dqn import VecDqnLoss, VecDqnLossConfig
from ._registry import LOSS_BUILDER_REGISTRY

__all__ = [
    "L2LossFactory", "SinkhornKnoppLossFactory", "DqnLossFactory", "VecDqnLossFactory",
    "SpLossFactory", "SvLossFactory", "SpTopKLossFactory", "SpLinearLossFactory", "RouterZLossFactory", "SwitchLoadBalancingLossFactory",
]


def _config_factory(key: str, config_cls: type, module_cls: type) -> type:
    """Register ``key`` as a factory that subclasses ``config_cls`` (so ``build_loss`` checks params
    against the config's fields) and builds ``module_cls(config)``."""

    def build(self) -> nn.Module:
        return module_cls(config_cls(**{f.name: getattr(self, f.name) for f in dataclasses.fields(config_cls)}))

    name = f"{module_cls.__name__}Factory"
    factory = dataclasses.dataclass(type(name, (config_cls,), {"build": build, "__module__": __name__,
                                                                "__doc__": f"Builds :class:`{module_cls.__name__}`."}))
    return LOSS_BUILDER_REGISTRY.register(key)(factory)


@LOSS_BUILDER_REGISTRY.register("l2_loss")
@dataclasses.dataclass
class L2LossFactory:
    """``torch.nn.MSELoss`` with a configurable reduction."""

    reduction: str = "mean"

    def __post_init__(self) -> None:
        check_field_types(self)
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


DqnLossFactory = _config_factory("dqn", DqnLossConfig, DqnLoss)
VecDqnLossFactory = _config_factory("vec_dqn", VecDqnLossConfig, VecDqnLoss)
SpLossFactory = _config_factory("sp", SpLossConfig, SpLoss)
SvLossFactory = _config_factory("sv", SvLossConfig, SvLoss)
SpTopKLossFactory = _config_factory("sp_topk", SpTopKLossConfig, SpTopKLoss)
SpLinearLossFactory = _config_factory("sp_linear", SpLinearLossConfig, SpLinearLoss)


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
        check_field_types(self)
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 1:
            raise ValueError(f"switch_load_balancing top_k must be an integer >= 1, got {self.top_k!r}.")

    def build(self) -> nn.Module:
        return SwitchLoadBalancingLoss(self.top_k)
