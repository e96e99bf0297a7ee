"""The family table: one :class:`Family` declaration per loss family, in the family's own module.

``fusedloss.losses.FAMILIES`` lists the family modules in order; each module ends with its
``FAMILY``. Everything that names the families is built from that table, so adding a family means
writing its files and adding its module to the table:

- dispatch (:func:`fusedloss._dispatch.kernel_families`): the families with a fused kernel;
- the ahead-of-time compile check (``tests/compile_check.py``): each kernel module's
  ``compile_variants()``;
- ``python -m fusedloss verify``: each family's :attr:`Family.verify_cases`;
- the registry: each family's :attr:`Family.factories`;
- the public names (``fusedloss.__all__``): each family's :attr:`Family.exports`;
- the API page (``docs/api.md``): one section per :attr:`Family.section`, in table order.

Nothing here imports Triton.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping

import torch

__all__ = ["Family", "VerifyCase"]


@dataclasses.dataclass(frozen=True)
class VerifyCase:
    """One row group of ``python -m fusedloss verify``: a loss on random inputs, checked against a
    float64 evaluation of the same inputs on each path."""

    options: str
    """The options, as printed (``"cql_weight=0.3"``)."""
    shape: str
    """The shape, as printed (``"B=4 S=9 A=19"``)."""
    make: Callable
    """``(dtype, device) -> args``: the inputs; floating tensors that require grad get checked gradients."""
    call: Callable
    """``(args, backend) -> loss``: a scalar loss."""
    dtypes: tuple = (torch.float32, torch.bfloat16)
    """The dtypes to run."""
    name: str | None = None
    """The row's family column when it differs from the family's name (``"sp_topk"``)."""


@dataclasses.dataclass(frozen=True)
class Family:
    """The one declaration of a loss family, from which the package builds its dispatch entry,
    compile variants, verify cases, registry factories, public names and API section."""

    name: str
    """The family's name: its module ``fusedloss.losses.<name>``, and the ``family`` argument of
    :func:`fusedloss._dispatch.resolve_backend` for its losses."""
    section: str
    """The API page's section title; consecutive families with one title share the section."""
    exports: tuple[str, ...]
    """The public names, in the API page's order; each is an attribute of the family's module."""
    kernel: str | None = None
    """The module ``fusedloss.kernels.<kernel>`` holding the fused kernel this family's losses
    dispatch to (its name is the dispatch family), or None for a reference-only family."""
    factories: Mapping[str, type] = dataclasses.field(default_factory=dict)
    """Registry keys and their factory classes (a config whose ``build()`` returns the module, or
    another ``LossFactory``)."""
    verify_cases: Callable[[bool], list[VerifyCase]] | None = None
    """``(small) -> cases`` for ``python -m fusedloss verify``: ``small`` for CPU (the interpreter)."""
    extra: str | None = None
    """The ``pip install fusedloss[<extra>]`` the family needs beyond torch and numpy."""
