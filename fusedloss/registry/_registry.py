"""``LOSS_BUILDER_REGISTRY``, the ``LossFactory`` protocol and ``build_loss``."""

from __future__ import annotations

import inspect
from collections.abc import Iterator, Mapping
from importlib.metadata import entry_points
from typing import Any, Protocol, runtime_checkable

from torch import nn

__all__ = ["Registry", "LossFactory", "LOSS_BUILDER_REGISTRY", "build_loss", "ENTRY_POINT_GROUP"]

ENTRY_POINT_GROUP = "fusedloss.losses"


@runtime_checkable
class LossFactory(Protocol):
    """A factory built from a config's ``params``; ``build()`` returns the loss ``nn.Module``."""

    def build(self) -> nn.Module: ...


class Registry:
    """Maps keys to factory classes. Third-party packages add theirs through the entry-point group
    ``fusedloss.losses``: each entry point either names a factory class (registered under the entry
    point's name) or a module that registers its factories when imported."""

    def __init__(self, name: str, entry_point_group: str | None = None):
        self._name = name
        self._group = entry_point_group
        self._entries: dict[str, type] = {}
        self._plugins_loaded = entry_point_group is None

    def register(self, key: str):
        if not isinstance(key, str) or not key:
            raise TypeError(f"{self._name} registry keys must be non-empty strings, got {key!r}.")

        def decorator(cls: type) -> type:
            if key in self._entries and self._entries[key] is not cls:
                raise ValueError(f"{self._name} registry key {key!r} is already taken by {self._entries[key]!r}.")
            if not callable(getattr(cls, "build", None)):
                raise TypeError(f"{cls!r} has no build() method, so it is not a LossFactory.")
            self._entries[key] = cls
            return cls

        return decorator

    def _load_plugins(self) -> None:
        if self._plugins_loaded:
            return
        self._plugins_loaded = True
        for ep in entry_points(group=self._group):
            obj = ep.load()
            if isinstance(obj, type) and ep.name not in self._entries:
                self.register(ep.name)(obj)

    def get(self, key: str) -> type:
        if key not in self._entries:
            self._load_plugins()
        try:
            return self._entries[key]
        except KeyError:
            raise KeyError(f"unknown {self._name} type {key!r}; known types: {sorted(self._entries)}.") from None

    def keys(self) -> list[str]:
        self._load_plugins()
        return sorted(self._entries)

    def __contains__(self, key: object) -> bool:
        self._load_plugins()
        return key in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.keys())

    def __len__(self) -> int:
        return len(self.keys())

    def __repr__(self) -> str:
        return f"Registry({self._name!r}, keys={self.keys()})"


LOSS_BUILDER_REGISTRY = Registry("loss", ENTRY_POINT_GROUP)


def _spec_parts(spec: Any) -> tuple[str, dict]:
    if isinstance(spec, Mapping):
        if "type" not in spec:
            raise KeyError(f"a loss spec needs a 'type' key, got keys {sorted(spec)}.")
        kind, params = spec["type"], spec.get("params")
    elif hasattr(spec, "type"):
        kind, params = spec.type, getattr(spec, "params", None)
    else:
        raise TypeError(f"a loss spec must be a mapping or an object with 'type' and 'params', got {type(spec).__name__}.")
    params = {} if params is None else params
    if not isinstance(params, Mapping):
        params = {k: v for k, v in vars(params).items() if not k.startswith("_")} if hasattr(params, "__dict__") else params
    if not isinstance(params, Mapping):
        raise TypeError(f"loss spec 'params' must be a mapping, got {type(params).__name__}.")
    return kind, dict(params)


def build_loss(spec: Any) -> nn.Module:
    """Build the ``nn.Module`` of a ``{type, params}`` spec (a mapping or an attribute object)."""
    kind, params = _spec_parts(spec)
    factory_cls = LOSS_BUILDER_REGISTRY.get(kind)
    sig = inspect.signature(factory_cls)
    accepts_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in sig.parameters.values())
    known = [n for n, p in sig.parameters.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    unknown = sorted(set(params) - set(known))
    if unknown and not accepts_any:
        raise TypeError(f"loss {kind!r} got unknown params {unknown}; it accepts {known}.")
    missing = [n for n, p in sig.parameters.items()
               if p.default is inspect.Parameter.empty and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
               and n not in params]
    if missing:
        raise TypeError(f"loss {kind!r} is missing required params {missing}.")
    module = factory_cls(**params).build()
    if not isinstance(module, nn.Module):
        raise TypeError(f"the {kind!r} factory's build() returned {type(module).__name__}, not an nn.Module.")
    return module
