"""The loss registry: ``LOSS_BUILDER_REGISTRY``, ``LossFactory`` and ``build_loss``."""

from . import factories  # noqa: F401  (registers the built-in losses)
from ._registry import ENTRY_POINT_GROUP, LOSS_BUILDER_REGISTRY, LossFactory, Registry, build_loss

__all__ = ["ENTRY_POINT_GROUP", "LOSS_BUILDER_REGISTRY", "LossFactory", "Registry", "build_loss"]
