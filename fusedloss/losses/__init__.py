"""Loss families: each module holds its config, its PyTorch reference, the public function, the
``nn.Module`` and, last, its :class:`fusedloss._families.Family` declaration. Kernels are imported
lazily through :mod:`fusedloss._dispatch`.

``FAMILY_MODULES`` is the family table: adding a family means writing ``losses/<fam>.py`` (and its
kernel, tests and bench) and adding its module here. The public names, the registry entries, the
dispatch families, the verify cases, the compile check and the API page all come from it.
"""

from __future__ import annotations

import importlib

from .._families import Family
from ._common import resolve_field_hints

FAMILY_MODULES = ("dqn", "vec_dqn", "rope", "sp", "sp_linear", "lm_head", "sv", "sinkhorn", "moe", "policy")

FAMILIES: tuple[Family, ...] = tuple(importlib.import_module(f"{__name__}.{m}").FAMILY for m in FAMILY_MODULES)


def _exports() -> dict[str, object]:
    names: dict[str, object] = {}
    for module_name, family in zip(FAMILY_MODULES, FAMILIES):
        module = importlib.import_module(f"{__name__}.{module_name}")
        if family.name != module_name:
            raise RuntimeError(f"fusedloss.losses.{module_name}.FAMILY is named {family.name!r}, not {module_name!r}.")
        for name in family.exports:
            if name in names:
                raise RuntimeError(f"{name!r} is exported by two families (fusedloss.losses.{module_name}).")
            names[name] = getattr(module, name)
    return names


globals().update(_exports())
# Resolve every config's annotations now: a config first built inside torch.compile is then checked too.
resolve_field_hints(*(f for family in FAMILIES for f in family.factories.values()))

__all__ = [name for family in FAMILIES for name in family.exports]
