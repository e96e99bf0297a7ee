"""Metrics modes: floats after one host sync, or a lazy mapping that never syncs in the loss call.

Every loss that returns metrics gathers its named 0-dim tensors, plus the data-dependent input
checks that cannot be decided without reading device memory (an action outside ``[0, A)``, a
``done`` outside ``{0, 1, 2}``, non-finite teacher values), into one device vector.

- ``metrics_mode="float"`` (the default, as in the seed): one ``.tolist()`` moves that vector to the
  host. The checks raise ``ValueError`` before the call returns, and the metrics are a
  ``dict[str, float]``.
- ``metrics_mode="lazy"``: the call makes no host-device sync and can be captured by a CUDA graph.
  It returns a :class:`LazyMetrics` mapping. The first read of any key moves every value in one
  transfer and raises the ``ValueError`` of a failed check then. ``LazyMetrics.tensors()`` hands
  out the 0-dim device tensors without any sync or check.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator, Mapping

import torch

__all__ = ["LazyMetrics", "METRICS_MODES", "finalize_metrics", "finalize_buffer_metrics", "check_metrics_mode"]

METRICS_MODES = ("float", "lazy")

class AnyEqual:
    """A check's flag that is computed only when the metrics are packed (at the first read in lazy
    mode): whether any element of ``codes`` equals ``value``. A kernel that writes per-row check
    codes (the sp forward's teacher status) thus adds no launch to the loss call itself."""

    __slots__ = ("codes", "value")

    def __init__(self, codes: torch.Tensor, value: int):
        self.codes, self.value = codes.detach(), value

    def detach(self) -> "AnyEqual":
        return self

    def flag(self) -> torch.Tensor:
        return (self.codes == self.value).any()


# (flag, message): the check fails when flag is non-zero; the flag is a 0-dim tensor or an AnyEqual.
Check = tuple["torch.Tensor | AnyEqual", str]


def check_metrics_mode(mode: str) -> None:
    if mode not in METRICS_MODES:
        raise ValueError(f"metrics_mode must be one of {METRICS_MODES}, got {mode!r}.")


_FULLGRAPH_HINT = ("metrics_mode='float' reads the metrics and input checks on the host (one .tolist()), which "
                   "torch.compile(fullgraph=True) cannot trace: use metrics_mode='lazy' (check_inputs=False for the "
                   "sp_* helpers) inside a compiled region, and read the LazyMetrics outside it.")


def _to_host(packed: torch.Tensor) -> list[float]:
    """The one host transfer of the float mode. Compiled code graph-breaks here, and with
    ``fullgraph=True`` the error says to use lazy metrics (torch._dynamo is loaded whenever
    something compiles, and never imported here: importing it would import triton.language)."""
    if torch.compiler.is_compiling():
        sys.modules["torch._dynamo"].graph_break(msg=_FULLGRAPH_HINT)
    if packed.device.type == "meta":
        raise ValueError("meta tensors hold no data, so the metrics and input checks cannot be read: use "
                         "metrics_mode='lazy' (check_inputs=False for the sp_* helpers) to propagate shapes only.")
    return packed.tolist()


def _pack(named: Mapping[str, torch.Tensor], checks: list[Check]) -> torch.Tensor:
    values = [t.detach().reshape(()).to(torch.float64 if t.dtype == torch.float64 else torch.float32)
              for t in named.values()]
    flags = [(f.flag() if isinstance(f, AnyEqual) else f).detach().reshape(()).to(values[0].dtype if values
                                                                                    else torch.float32)
             for f, _ in checks]
    return torch.stack(values + flags)


def _unpack(keys: list[str], messages: list[str], values: list[float], flags: list[float]) -> dict[str, float]:
    for message, flag in zip(messages, flags):
        if flag != 0.0:
            raise ValueError(message)
    return dict(zip(keys, values))


class LazyMetrics(Mapping):
    """Metrics that stay on the device until first read; then one transfer moves them all.

    Either named 0-dim tensors with their checks (packed into one vector at first read), or, from
    :meth:`from_buffer`, entries of one device vector that a fused kernel wrote. No view of that
    vector is taken before a read, so a ``torch.compile`` graph returns the vector itself, and
    everything held is detached: the mapping deep-copies and keeps no autograd graph alive."""

    def __init__(self, named: Mapping[str, torch.Tensor], checks: list[Check]):
        self._named = {k: v.detach() for k, v in named.items()}
        self._checks = [(f.detach(), message) for f, message in checks]
        self._buffer = None
        self._host: dict[str, float] | None = None

    @classmethod
    def from_buffer(cls, buffer: torch.Tensor, slots: Mapping[str, int],
                    checks: list[tuple[int, str]]) -> "LazyMetrics":
        """Metrics at ``buffer[slots[name]]`` and input checks that fail where ``buffer[index]``
        is non-zero, for ``(index, message)`` in ``checks``."""
        self = cls({}, [])
        self._buffer = buffer.detach()
        self._slots = dict(slots)
        self._check_slots = list(checks)
        return self

    def _materialize(self) -> dict[str, float]:
        # Packing happens here, on first read, so that the loss call itself launches nothing.
        if self._host is None:
            if self._buffer is not None:
                host = _to_host(self._buffer)
                self._host = _unpack(list(self._slots), [m for _, m in self._check_slots],
                                     [host[i] for i in self._slots.values()], [host[i] for i, _ in self._check_slots])
            else:
                host = _to_host(_pack(self._named, self._checks))
                n = len(self._named)
                self._host = _unpack(list(self._named), [m for _, m in self._checks], host[:n], host[n:])
        return self._host

    def check(self) -> None:
        """Raise the ``ValueError`` of any failed input check (one host sync)."""
        self._materialize()

    def tensors(self) -> dict[str, torch.Tensor]:
        """The metrics as 0-dim device tensors: no sync, no input check."""
        if self._buffer is not None:
            return {k: self._buffer[i] for k, i in self._slots.items()}
        return dict(self._named)

    def _keys(self) -> list[str]:
        return list(self._slots) if self._buffer is not None else list(self._named)

    def __getitem__(self, key: str) -> float:
        return self._materialize()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys())

    def __len__(self) -> int:
        return len(self._keys())

    def __repr__(self) -> str:
        state = "read" if self._host is not None else "unread"
        return f"LazyMetrics({self._keys()}, {state})"


def finalize_metrics(named: Mapping[str, torch.Tensor], checks: list[Check], mode: str):
    """Turn named 0-dim tensors and input checks into the metrics the caller asked for."""
    if mode == "lazy":
        return LazyMetrics(named, checks)
    host = _to_host(_pack(named, checks))
    n = len(named)
    return _unpack(list(named), [m for _, m in checks], host[:n], host[n:])


def finalize_buffer_metrics(buffer: torch.Tensor, slots: Mapping[str, int], checks: list[tuple[int, str]],
                            mode: str):
    """:func:`finalize_metrics` for metrics and check flags that are entries of one device vector
    (``buffer[slots[name]]``; a check fails where ``buffer[index]`` is non-zero)."""
    if mode == "lazy":
        return LazyMetrics.from_buffer(buffer, slots, checks)
    host = _to_host(buffer.detach())
    return _unpack(list(slots), [m for _, m in checks], [host[i] for i in slots.values()],
                   [host[i] for i, _ in checks])
