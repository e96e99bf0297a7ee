"""fusedloss: training losses for sequence RL, imitation learning and policy distillation.

Every loss has a pure-PyTorch reference; the families with a fused Triton kernel dispatch to it
by one rule (see :mod:`fusedloss._dispatch`).
"""

from ._dispatch import Backend
from .losses import *  # noqa: F401,F403
from .losses import __all__ as _losses_all
from .metrics import LazyMetrics
from .registry import LOSS_BUILDER_REGISTRY, LossFactory, build_loss

__version__ = "0.1.0"

__all__ = ["Backend", "LazyMetrics", "LOSS_BUILDER_REGISTRY", "LossFactory", "build_loss", *_losses_all]
