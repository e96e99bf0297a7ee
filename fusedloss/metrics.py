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


def _flag(f: "torch.Tensor | AnyEqual") -> torch.Tensor:
    """A check's flag as a tensor (an :class:`AnyEqual` computed now)."""
    return f.flag() if isinstance(f, AnyEqual) else f


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
    flags = [_flag(f).detach().reshape(()).to(values[0].dtype if values else torch.float32) for f, _ in checks]
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

    def __init__(self, named: Mapping[str, torch.Tensor], checks: list[Check], count=None):
        self._named = {k: v.detach() for k, v in named.items()}
        self._checks = [(f.detach(), message) for f, message in checks]
        self._buffer = None
        self._host: dict[str, float] | None = None
        self._count = count.detach() if isinstance(count, torch.Tensor) else count
        self._count_slot = None

    @classmethod
    def from_buffer(cls, buffer: torch.Tensor, slots: Mapping[str, int],
                    checks: list[tuple[int, str]], count_slot: int | None = None,
                    extra_checks: list[Check] = ()) -> "LazyMetrics":
        """Metrics at ``buffer[slots[name]]`` and input checks that fail where ``buffer[index]``
        is non-zero, for ``(index, message)`` in ``checks``, plus ``extra_checks`` of their own
        flags; ``buffer[count_slot]`` is the :attr:`count`."""
        self = cls({}, list(extra_checks))
        self._count_slot = count_slot
        self._buffer = buffer.detach()
        self._slots = dict(slots)
        self._check_slots = list(checks)
        return self

    def _materialize(self) -> dict[str, float]:
        # Packing happens here, on first read, so that the loss call itself launches nothing.
        if self._host is None:
            if self._buffer is not None:
                self._host = _unpack_buffer(self._buffer, self._slots, self._check_slots, self._checks)
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

    @property
    def count(self):
        """What the metrics are means over (this rank's tokens, rows or valid transitions), or
        None: the weight of this rank's values in :meth:`all_reduce`."""
        if self._buffer is not None and self._count_slot is not None:
            return self._buffer[self._count_slot]
        return self._count

    def all_reduce(self, group=None) -> "LazyMetrics":
        """These metrics combined over a ``torch.distributed`` process group, as one process would
        compute them on every rank's data together: still lazy, after one all-gather of this
        rank's values, its :attr:`count` and its check flags, with no host sync.

        By name: ``*_min`` and ``*_max`` are the group's min and max; ``*_std`` (the unbiased std of
        the values whose mean is ``*_mean``) is pooled from each rank's mean, std and count;
        everything else is a mean weighted by each rank's :attr:`count` (equal weights when the
        loss gave none). A rank with a count of 0 adds nothing, even a NaN. A check that failed on
        any rank fails on every rank. Every rank must call it, with the same metrics."""
        import torch.distributed as dist

        named = self.tensors()
        keys = list(named)
        slot_flags = [self._buffer[i] for i, _ in self._check_slots] if self._buffer is not None else []
        columns = list(named.values()) + slot_flags + [_flag(f) for f, _ in self._checks]
        device = columns[0].device if columns else torch.device("cpu")
        count = self.count
        weighted = count is not None
        n = count if isinstance(count, torch.Tensor) else torch.tensor(float(1 if count is None else count))
        local = torch.stack([t.reshape(()).to(device=device, dtype=torch.float64) for t in [n] + columns])
        parts = [torch.empty_like(local) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, local, group=group)
        every = torch.stack(parts)  # [world, 1 + metrics + flags]
        counts, has = every[:, 0], every[:, 0] > 0
        total = counts.sum()
        zero = torch.zeros((), dtype=torch.float64, device=every.device)

        def col(key):
            return every[:, 1 + keys.index(key)]

        def mean_of(key):
            v = torch.where(has, col(key), zero)
            return (counts * v).sum() / total

        out = {}
        for key in keys:
            v = col(key)
            if key.endswith("_min"):
                out[key] = torch.where(has, v, float("inf")).amin()
            elif key.endswith("_max"):
                out[key] = torch.where(has, v, float("-inf")).amax()
            elif key.endswith("_std") and key[:-4] + "_mean" in keys and weighted:
                mu_r = torch.where(has, col(key[:-4] + "_mean"), zero)
                mu = mean_of(key[:-4] + "_mean")
                m2 = torch.where(has, v * v * (counts - 1).clamp(min=0) + counts * (mu_r - mu) ** 2, zero).sum()
                out[key] = (m2 / (total - 1).clamp(min=1)).sqrt()
            else:
                out[key] = mean_of(key)
        out = {k: t.to(named[k].dtype) for k, t in out.items()}
        reduced = every[:, 1 + len(keys):].amax(dim=0)
        messages = [m for _, m in (self._check_slots if self._buffer is not None else [])] + [m for _, m in self._checks]
        return LazyMetrics(out, list(zip(reduced, messages)), total if weighted else None)

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


def finalize_metrics(named: Mapping[str, torch.Tensor], checks: list[Check], mode: str, count=None):
    """Turn named 0-dim tensors and input checks into the metrics the caller asked for; ``count``
    (lazy mode): what the metrics are means over, for :meth:`LazyMetrics.all_reduce`."""
    if mode == "lazy":
        return LazyMetrics(named, checks, count)
    host = _to_host(_pack(named, checks))
    n = len(named)
    return _unpack(list(named), [m for _, m in checks], host[:n], host[n:])


def _unpack_buffer(buffer: torch.Tensor, slots: Mapping[str, int], checks: list[tuple[int, str]],
                   extra_checks: list[Check]) -> dict[str, float]:
    """One transfer of ``buffer`` (and of ``extra_checks``' flags after it, when there are any)."""
    vec = buffer.detach()
    if extra_checks:
        flags = [_flag(f).detach().reshape(()).to(vec.dtype) for f, _ in extra_checks]
        vec = torch.cat([vec.reshape(-1), torch.stack(flags)])
    host = _to_host(vec)
    n = buffer.numel()
    messages = [m for _, m in checks] + [m for _, m in extra_checks]
    return _unpack(list(slots), messages, [host[i] for i in slots.values()], [host[i] for i, _ in checks] + host[n:])


def finalize_buffer_metrics(buffer: torch.Tensor, slots: Mapping[str, int], checks: list[tuple[int, str]],
                            mode: str, count_slot: int | None = None, extra_checks: list[Check] = ()):
    """:func:`finalize_metrics` for metrics and check flags that are entries of one device vector
    (``buffer[slots[name]]``; a check fails where ``buffer[index]`` is non-zero), plus
    ``extra_checks`` with flags of their own; ``buffer[count_slot]`` is the metrics' count."""
    if mode == "lazy":
        return LazyMetrics.from_buffer(buffer, slots, checks, count_slot, extra_checks)
    return _unpack_buffer(buffer, slots, checks, list(extra_checks))
