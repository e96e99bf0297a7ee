"""Loss families: each module holds its config, its PyTorch reference, the public function and
the ``nn.Module``. Kernels are imported lazily through :mod:`fusedloss._dispatch`."""

from .dqn import DqnLoss, DqnLossConfig, dqn_loss, dqn_reference, sequence_priority
from .moe import RouterZLoss, SwitchLoadBalancingLoss, router_z_loss, switch_load_balancing_loss
from .sinkhorn import KOTSinkhornLoss, sinkhorn_loss
from .sp import (SpLoss, SpLossConfig, SpTopKLoss, SpTopKLossConfig, sp_js_loss, sp_kl_loss, sp_loss, sp_reference,
                 sp_soft_ce_loss, sp_topk_loss, sp_topk_reference)
from .sp_linear import LinearTeacher, SpLinearLoss, SpLinearLossConfig, TopKTeacher, sp_linear_loss
from .sv import SvLoss, SvLossConfig, sv_loss, sv_reference
from .vec_dqn import (
    VecDqnLoss,
    VecDqnLossConfig,
    rope_rotate,
    rope_rotate_reference,
    vec_dqn_loss,
    vec_dqn_reference,
    vec_dqn_scores,
    vec_dqn_scores_reference,
)

__all__ = [
    "DqnLoss", "DqnLossConfig", "dqn_loss", "dqn_reference", "sequence_priority",
    "RouterZLoss", "SwitchLoadBalancingLoss", "router_z_loss", "switch_load_balancing_loss",
    "KOTSinkhornLoss", "sinkhorn_loss",
    "SpLoss", "SpLossConfig", "sp_js_loss", "sp_kl_loss", "sp_loss", "sp_reference", "sp_soft_ce_loss",
    "sp_topk_loss", "sp_topk_reference",
    "LinearTeacher", "SpLinearLoss", "SpLinearLossConfig", "SpTopKLoss", "SpTopKLossConfig", "TopKTeacher",
    "sp_linear_loss",
    "SvLoss", "SvLossConfig", "sv_loss", "sv_reference",
    "VecDqnLoss", "VecDqnLossConfig", "rope_rotate", "rope_rotate_reference", "vec_dqn_loss",
    "vec_dqn_reference", "vec_dqn_scores", "vec_dqn_scores_reference",
]
