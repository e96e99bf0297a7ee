"""The built-in registry entries, from the family table: each family's ``factories``
(``fusedloss.losses.FAMILIES``). A config-backed entry is the config class itself (its fields are
the ``params``, checked on construction, and its ``build()`` returns the loss module)."""

from __future__ import annotations

from ..losses import FAMILIES
from ._registry import LOSS_BUILDER_REGISTRY

for _family in FAMILIES:
    for _key, _factory in _family.factories.items():
        LOSS_BUILDER_REGISTRY.register(_key)(_factory)
