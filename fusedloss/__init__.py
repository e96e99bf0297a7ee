"""fusedloss: training losses for sequence RL, imitation learning and policy distillation.

Every loss has a pure-PyTorch reference; the families with a fused Triton kernel dispatch to it
by one rule (see :mod:`fusedloss._dispatch`).
"""

from . import _dispatch
from ._dispatch import Backend, explain_backend
from .losses import *  # noqa: F401,F403  (the names of every family in the table, fusedloss.losses.FAMILIES)
from .losses import __all__ as _losses_all
from .metrics import LazyMetrics
from .registry import LOSS_BUILDER_REGISTRY, LossFactory, build_loss

_dispatch.kernel_families()  # read the table once, so that traced calls only look it up

__version__ = "0.1.0"

__all__ = ["Backend", "explain_backend", "LazyMetrics", "LOSS_BUILDER_REGISTRY", "LossFactory", "build_loss", *_losses_all]
