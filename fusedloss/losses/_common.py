"""Input handling shared by the loss families: key look-up, shape and dtype checks, reward transforms.

Checks that only need shapes, dtypes and config values raise at once. Checks that need the data
(an action outside ``[0, A)``, a ``done`` outside ``{0, 1, 2}``) become device flags that
:func:`fusedloss.metrics.finalize_metrics` raises on, so the loss call itself never syncs; indices
are clamped first, so a bad value can never read out of bounds or trip a device-side assert.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import types
import typing
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from .._dispatch import Backend
from ..metrics import check_metrics_mode


def _hint_accepts(value: Any, hint: Any) -> bool:
    """Whether ``value`` is of the annotation ``hint``: ``bool``, ``int``, ``float`` (any real
    number but a bool), ``str``, ``None``, a class, ``Optional``/``Union``/``X | Y`` and ``Literal``.
    Other annotations (generic containers) are left to the config's ``check_values``."""
    origin = typing.get_origin(hint)
    if origin is typing.Union or origin is types.UnionType:
        return any(_hint_accepts(value, h) for h in typing.get_args(hint))
    if origin is typing.Literal:
        return any(type(value) is type(a) and value == a for a in typing.get_args(hint))
    if hint is Any:
        return True
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is float:
        return isinstance(value, numbers.Real) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, numbers.Integral) and not isinstance(value, bool)
    if isinstance(hint, type) and typing.get_origin(hint) is None:  # list[int] is a type on Python 3.10
        return isinstance(value, hint)
    return True


def _hint_form(hint: Any) -> str:
    """The annotation ``hint`` in words, for an error message."""
    origin = typing.get_origin(hint)
    if origin is typing.Union or origin is types.UnionType:
        return " or ".join(_hint_form(h) for h in typing.get_args(hint))
    if origin is typing.Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(hint))
    names = {bool: "a bool (True or False)", float: "a number", int: "an integer", str: "a string",
             type(None): "None"}
    return names.get(hint, getattr(hint, "__name__", str(hint)))


_FIELD_HINTS: dict[type, dict[str, Any]] = {}


def field_hints(cls: type) -> dict[str, Any]:
    """``{field name: resolved annotation}`` of the dataclass ``cls`` (``typing.get_type_hints``,
    so string annotations and ``from __future__ import annotations`` resolve), once per class. An
    annotation that cannot be resolved (a name imported only for type checkers) becomes ``Any``,
    which the checks accept anything for. The package's own configs are resolved at import
    (:func:`resolve_field_hints`); a config class first built while ``torch.compile`` traces, where
    ``get_type_hints`` cannot run, has its fields' types left unchecked in that call."""
    hints = _FIELD_HINTS.get(cls)
    if hints is not None:
        return hints
    if torch.compiler.is_compiling():  # traced: no get_type_hints, and no dataclasses.fields of a class
        return {name: Any for name in cls.__dataclass_fields__}
    fields = dataclasses.fields(cls)
    try:
        resolved = typing.get_type_hints(cls)
    except Exception:  # an unresolvable name: resolve field by field, and leave the rest unchecked
        resolved = {}
        for f in fields:
            try:
                resolved[f.name] = typing.get_type_hints(type("_One", (), {"__annotations__": {f.name: f.type},
                                                                           "__module__": cls.__module__}))[f.name]
            except Exception:
                resolved[f.name] = Any
    hints = _FIELD_HINTS[cls] = {f.name: resolved.get(f.name, Any) for f in fields}
    return hints


def resolve_field_hints(*classes: type) -> None:
    """Resolve the annotations of these config classes now (at import), so that building one while
    ``torch.compile`` traces checks its fields as an eager call does."""
    for cls in classes:
        if dataclasses.is_dataclass(cls):
            field_hints(cls)


def _is_set(obj: Any, name: str) -> bool:
    """Whether the field ``name`` of ``obj`` holds a value: in its slot (the class attribute of a
    ``slots=True`` field is the slot's descriptor), else in ``__dict__``."""
    slot = getattr(type(obj), name, None)
    if isinstance(slot, types.MemberDescriptorType):
        try:
            slot.__get__(obj, type(obj))
        except AttributeError:
            return False
        return True
    return name in obj.__dict__


# Values of these exact types pass these annotations at once, before the general check.
_EXACT = {float: (float, int), int: (int,), bool: (bool,), str: (str,)}


def check_field(cfg: Any, name: str, value: Any) -> None:
    """Raise ``TypeError`` naming ``type(cfg).name`` when ``value`` is not of the field's
    annotation: a bool must be a bool (``"false"`` is not), a float takes any real number but not a
    string or a bool."""
    hint = field_hints(type(cfg))[name]
    if type(value) in _EXACT.get(hint, ()) or _hint_accepts(value, hint):
        return
    hint_text = ""
    if isinstance(value, str) and _hint_accepts(1.0, hint) and _parses_as_float(value):
        hint_text = (" (YAML reads a number without a decimal point, such as 1e-3, as a string: write 1.0e-3, "
                     "or convert it)")
    kind = type(value)
    kind_name = kind.__qualname__ if kind.__module__ == "builtins" else f"{kind.__module__}.{kind.__qualname__}"
    raise TypeError(f"{type(cfg).__name__}.{name} must be {_hint_form(hint)}, got {value!r} ({kind_name}){hint_text}.")


def check_field_types(cfg: Any) -> None:
    """Check every field of the dataclass ``cfg`` against its annotation (:func:`check_field`)."""
    for name in field_hints(type(cfg)):
        check_field(cfg, name, getattr(cfg, name))


def _parses_as_float(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


@dataclasses.dataclass
class LossConfig:
    """Base of the loss configs, checked once, where a value changes: each field against its
    annotation as it is set (in ``__init__`` and on every later assignment), then the values
    together (:meth:`check_values`) after ``__init__`` and after each assignment. An assignment that
    fails leaves the config as it was. A loss call does not check its config again.

    A config is also its registry factory: :meth:`build` returns its loss module."""

    def __setattr__(self, name: str, value: Any) -> None:
        hints = field_hints(type(self))
        if name not in hints:
            object.__setattr__(self, name, value)
            return
        check_field(self, name, value)
        had = _is_set(self, name)
        old = getattr(self, name) if had else None
        object.__setattr__(self, name, value)
        # __init__ sets the fields in order, the last one last, and __post_init__ then checks the
        # values: until that first setting of the last field, nothing is checked here.
        last = next(reversed(hints))
        if not _is_set(self, last) or (name == last and not had):
            return
        try:
            self.check_values()
        except Exception:
            if had:
                object.__setattr__(self, name, old)
            else:
                object.__delattr__(self, name)
            raise

    def __post_init__(self) -> None:
        self.check_values()

    def validate(self) -> None:
        """Check every field and the values again (after ``object.__setattr__``, for instance)."""
        check_field_types(self)
        self.check_values()

    def check_values(self) -> None:
        """Raise ``ValueError`` for a value out of its range."""

    def build(self) -> nn.Module:
        """The loss module of this config: the registry's factory interface (``LossFactory``)."""
        raise NotImplementedError(f"{type(self).__name__} builds no loss module.")


def check_loss_config(cfg: Any, cls: type, fn: str):
    """``cfg``, or a default ``cls()`` when None; a ``TypeError`` naming ``fn`` for anything that
    is not a ``cls``."""
    if cfg is None:
        return cls()
    if not isinstance(cfg, cls):
        raise TypeError(f"{fn}: cfg must be a {cls.__name__} (or None), got {type(cfg).__name__}.")
    return cfg


class ConfigLoss(nn.Module):
    """Base of the config-driven loss modules: holds ``cfg`` (a default ``config_cls()`` when
    None) and shows it in the repr; a subclass sets ``config_cls`` and defines ``forward``."""

    config_cls: type

    def __init__(self, cfg=None, group=None):
        super().__init__()
        self.cfg = check_loss_config(cfg, self.config_cls, type(self).__name__)
        self.group = group
        """The data-parallel process group of the losses that take one (a config cannot hold it):
        given here, set after :func:`fusedloss.build_loss`, or passed to each call."""

    def extra_repr(self) -> str:
        return repr(self.cfg)


class VocabParallelLoss(ConfigLoss):
    """A loss module over a vocabulary-sharded LM head: besides :attr:`group` (data-parallel), it
    holds :attr:`vocab_group`, the process group the head's rows are split over, and
    :attr:`vocab_offset` (None: derived from the shard sizes), given here, set after
    :func:`fusedloss.build_loss`, or passed to each call."""

    def __init__(self, cfg=None, group=None, vocab_group=None, vocab_offset: int | None = None):
        super().__init__(cfg, group)
        self.vocab_group = vocab_group
        self.vocab_offset = vocab_offset

    def _groups(self, dp_group, vocab_group, vocab_offset) -> dict:
        """The call's group keywords: each argument, or the module's own where it is None."""
        return {"dp_group": self.group if dp_group is None else dp_group,
                "group": self.vocab_group if vocab_group is None else vocab_group,
                "vocab_offset": self.vocab_offset if vocab_offset is None else vocab_offset}


def stream_get(stream: Any, key: str, argname: str = "step_stream") -> torch.Tensor:
    """``stream[key]`` for a TensorDict or any mapping, with an error that names both."""
    if not (isinstance(stream, Mapping) or hasattr(stream, "keys")):
        raise TypeError(f"{argname} must be a TensorDict or a mapping of names to tensors, got {type(stream).__name__}.")
    if key not in stream.keys():  # keys(): a TensorDict has no `in` of its own
        raise KeyError(f"{argname} has no key {key!r} (it has {sorted(map(str, stream.keys()))}).")
    value = stream[key]
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{argname}[{key!r}] must be a torch.Tensor, got {type(value).__name__}.")
    return value


def require_float(t: torch.Tensor, name: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}.")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}.")


def require_same_device(tensors: Mapping[str, torch.Tensor | None]) -> None:
    """Raise ``ValueError`` naming the arguments when the given tensors (None skipped) are not all
    on one device."""
    devices = {t.device for t in tensors.values() if t is not None}
    if len(devices) > 1:
        present = {name: t for name, t in tensors.items() if t is not None}
        listing = ", ".join(f"{name} on {t.device}" for name, t in present.items())
        raise ValueError(f"all tensors must be on one device, got {listing}.")


def require_shape(t: torch.Tensor, shape: tuple[int, ...], name: str, form: str) -> None:
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {form} = {tuple(shape)}, got {tuple(t.shape)}.")


def compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """fp32 for fp32/bf16/fp16 inputs, fp64 when any input is fp64 (for gradcheck)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def check_config_common(backend: str, metrics_mode: str | None = None) -> None:
    """Raise ``ValueError`` for a ``backend`` or ``metrics_mode`` outside its choices."""
    Backend.parse(backend)  # raises for an unknown name; the parsed value is resolved per call
    if metrics_mode is not None:
        check_metrics_mode(metrics_mode)


def check_positive(value: float, name: str) -> None:
    if not (isinstance(value, numbers.Real) and math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}.")


def check_finite_number(value: float, name: str) -> None:
    if not (isinstance(value, numbers.Real) and math.isfinite(value)):
        raise ValueError(f"{name} must be a finite number, got {value!r}.")


def check_index(t: torch.Tensor, name: str, shape: tuple[int, ...], form: str) -> None:
    """Host-side checks of an integer index tensor (dtype, shape)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}.")
    if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor (an action index), got {t.dtype}.")
    require_shape(t, shape, name, form)


def clamp_index(t: torch.Tensor, upper: int, used: slice = slice(None)):
    """``t`` as int64 clamped to ``[0, upper)``, and a device flag: any value in ``t[:, used]``
    out of range. Only the used steps are checked (step 0's action is never read)."""
    idx = t.to(torch.long)
    clamped = idx.clamp(0, upper - 1)
    return clamped, (clamped[:, used] != idx[:, used]).any()


def used_index(t: torch.Tensor, upper: int):
    """``t[:, 1:]``, the used steps of a ``[B, S]`` index (step 0's is never read), as int64
    clamped to ``[0, upper)``, and a device flag: any of them out of range."""
    idx = t[:, 1:].long()
    clamped = idx.clamp(0, upper - 1)
    return clamped, (clamped != idx).any()


def index_tensor(t: torch.Tensor, name: str, shape: tuple[int, ...], form: str, upper: int,
                 used: slice = slice(None)):
    """Validate an integer index tensor; return it clamped to ``[0, upper)`` and the range flag."""
    check_index(t, name, shape, form)
    return clamp_index(t, upper, used)


DONE_NAME = "step_stream['done']"


def check_done(t: torch.Tensor, shape: tuple[int, ...], form: str) -> None:
    """``done`` holds 0 (running), 1 (terminal) or 2 (truncated), as integers, bools or floats."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{DONE_NAME} must be a torch.Tensor, got {type(t).__name__}.")
    require_shape(t, shape, DONE_NAME, form)
    if t.is_complex():
        raise TypeError(f"{DONE_NAME} must hold 0 (running), 1 (terminal) or 2 (truncated), got {t.dtype}.")


def done_codes(t: torch.Tensor):
    """A checked ``done`` (:func:`check_done`)'s used steps ``[:, 1:]`` as int64 indices in {0, 1,
    2} (running, terminal, truncated) into a table of discounts (:func:`discount_table`), and a
    device flag for values outside {0, 1, 2}, or None where none can be (bool). Integers cost one
    clamp and one compare: an out-of-range value reads the clamped entry, and the flag names it."""
    u = t[:, 1:]
    if t.dtype == torch.bool:  # 0 or 1: never out of range, never truncated
        return u.long(), None
    if t.is_floating_point():
        ok = (u == 0) | (u == 1) | (u == 2)  # 0.5 and NaN are not
        return torch.where(ok, u, 0).long(), ~ok.all()
    codes = u.clamp(0, 2)
    return codes.long(), (codes != u).any()


_DISCOUNT_TABLES: dict = {}


def discount_table(gamma: float, gamma_terminal: float, gamma_truncated: float, dtype: torch.dtype,
                   device: torch.device) -> torch.Tensor:
    """``[gamma, gamma_terminal, gamma_truncated]`` in ``dtype`` on ``device``, indexed by
    :func:`done_codes`: each discount exactly as given (rounded once to ``dtype``), one ``take`` per
    call, and one host-to-device copy per (config values, dtype, device), not one per call (so a
    CUDA graph captured after a warm-up step copies nothing). Under ``torch.compile`` the table is
    a constant of the graph."""
    values = [gamma, gamma_terminal, gamma_truncated]
    if torch.compiler.is_compiling():
        return torch.tensor(values, dtype=dtype, device=device)
    key = (gamma, gamma_terminal, gamma_truncated, dtype, device)
    table = _DISCOUNT_TABLES.get(key)
    if table is None:
        if len(_DISCOUNT_TABLES) >= 64:  # configs swept in one process: bounded
            _DISCOUNT_TABLES.clear()
        table = _DISCOUNT_TABLES[key] = torch.tensor(values, dtype=dtype, device=device)
    return table


def bootstrapped(reward: torch.Tensor, coef: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """``reward + coef·value``, and exactly ``reward`` where ``coef`` is 0: a zero discount never
    reads its bootstrap value, even a -inf (every action illegal after a terminal) or a NaN."""
    return torch.where(coef == 0, reward, torch.addcmul(reward, coef, value))


def reward_tensor(stream: Any, use_xformed: bool, shape: tuple[int, ...], form: str) -> torch.Tensor:
    key = "xformed_reward" if use_xformed else "reward"
    if use_xformed and "xformed_reward" not in list(stream.keys()):
        raise KeyError(
            "use_xformed_reward=True but 'xformed_reward' is not in step_stream; "
            "add the 'xformed_reward' column to the batch."
        )
    r = stream_get(stream, key)
    require_shape(r, shape, f"step_stream[{key!r}]", form)
    if not (r.is_floating_point() or r.dtype in (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)):
        raise TypeError(f"step_stream[{key!r}] must be a real tensor, got {r.dtype}.")
    return r


def masked(x: torch.Tensor, m: torch.Tensor | None) -> torch.Tensor:
    """``x`` with the entries where the 0/1 mask ``m`` is 0 set to 0 (``x`` itself when ``m`` is
    None). Unlike ``x * m``, a NaN or inf under the mask does not leak through ``0·NaN``, and its
    gradient there is 0."""
    return x if m is None else torch.where(m > 0, x, torch.zeros((), dtype=x.dtype, device=x.device))


def safe_scale(x: torch.Tensor) -> torch.Tensor:
    """``x`` as a divisor that brings values into ``[-1, 1]`` before they are squared: itself where
    finite and > 0, else 1. The fused kernels scale the same way."""
    return torch.where((x > 0) & torch.isfinite(x), x, torch.ones_like(x))


def discounted(coef: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """``coef·value``, and exactly 0 where ``coef`` is 0: a zero discount never reads its
    bootstrap value, even a -inf (every action illegal after a terminal) or a NaN."""
    return torch.where(coef == 0, torch.zeros((), dtype=value.dtype, device=value.device), coef * value)


def transform_rewards(r: torch.Tensor, cfg: Any, m: torch.Tensor | None = None) -> torch.Tensor:
    """The reward transform of dqn and vec_dqn, written once for both and their fused paths:
    per-sequence mean/std normalisation over dim 1 (over the entries where the float 0/1 mask ``m``
    is 1, when given), then ``r * reward_scale + reward_shift``. The fused DQN kernel applies the
    same steps to the scalars of :func:`reward_kernel_args`."""
    if m is None:
        if cfg.normalize_reward_mean:
            r = r - r.mean(dim=1, keepdim=True)
        if cfg.normalize_reward_std:
            r = r / (r.std(dim=1, keepdim=True) + cfg.normalize_reward_eps) * cfg.normalize_reward_std_target
    else:
        n = m.sum(dim=1, keepdim=True)
        if cfg.normalize_reward_mean:
            r = r - masked(r, m).sum(dim=1, keepdim=True) / n.clamp(min=1)
        if cfg.normalize_reward_std:
            # deviations in units of max|r|, as the fused kernel: no square overflows for |r| up to the dtype's max
            mean = masked(r, m).sum(dim=1, keepdim=True) / n.clamp(min=1)
            unit = safe_scale(masked(r, m).abs().amax(dim=1, keepdim=True))
            dev = masked((r / unit - mean / unit) ** 2, m)
            std = (dev.sum(dim=1, keepdim=True) / (n - 1).clamp(min=1)).sqrt() * unit
            r = r / (std + cfg.normalize_reward_eps) * cfg.normalize_reward_std_target
    if cfg.reward_scale == 1.0 and cfg.reward_shift == 0.0:
        return r  # the identity: no two launches for it
    return r * cfg.reward_scale + cfg.reward_shift


def reward_kernel_args(cfg: Any) -> dict:
    """The reward transform of ``cfg`` as the fused DQN kernel's keyword scalars."""
    return dict(reward_scale=float(cfg.reward_scale), reward_shift=float(cfg.reward_shift),
                norm_mean=bool(cfg.normalize_reward_mean), norm_std=bool(cfg.normalize_reward_std),
                norm_eps=float(cfg.normalize_reward_eps), norm_target=float(cfg.normalize_reward_std_target))


def check_reward_config(cfg: Any) -> None:
    """The reward transform's values (a config's :meth:`~LossConfig.check_values`: checked when the
    config is built or changed, not per call)."""
    for name in ("reward_scale", "reward_shift", "normalize_reward_std_target"):
        check_finite_number(getattr(cfg, name), name)
    if not (math.isfinite(cfg.normalize_reward_eps) and cfg.normalize_reward_eps >= 0):
        raise ValueError(f"normalize_reward_eps must be a finite number >= 0, got {cfg.normalize_reward_eps!r}.")
    if cfg.normalize_reward_std and cfg.normalize_reward_eps == 0:
        raise ValueError("normalize_reward_eps must be > 0 with normalize_reward_std=True: a sequence of constant "
                         "rewards has std 0, and 0/0 would make its rewards NaN.")


def check_reward_steps(cfg: Any, S: int) -> None:
    """The per-call part of the reward transform's checks: its std needs two transitions."""
    if cfg.normalize_reward_std and S < 3:
        raise ValueError(
            f"normalize_reward_std needs at least 2 transitions per sequence (S >= 3) for an "
            f"unbiased std, got S = {S}."
        )
