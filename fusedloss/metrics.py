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

from collections.abc import Iterator, Mapping

import torch

__all__ = ["LazyMetrics", "METRICS_MODES", "finalize_metrics", "check_metrics_mode"]

METRICS_MODES = ("float", "lazy")

# (flag, message): the check fails when flag is non-zero.
Check = tuple[torch.Tensor, str]


def check_metrics_mode(mode: str) -> None:
    if mode not in METRICS_MODES:
        raise ValueError(f"metrics_mode must be one of {METRICS_MODES}, got {mode!r}.")


def _pack(named: Mapping[str, torch.Tensor], checks: list[Check]) -> torch.Tensor:
    values = [t.detach().reshape(()).to(torch.float64 if t.dtype == torch.float64 else torch.float32)
              for t in named.values()]
    flags = [f.detach().reshape(()).to(values[0].dtype if values else torch.float32) for f, _ in checks]
    return torch.stack(values + flags)


def _unpack(keys: list[str], checks: list[Check], host: list[float]) -> dict[str, float]:
    for (_, message), flag in zip(checks, host[len(keys):]):
        if flag != 0.0:
            raise ValueError(message)
    return dict(zip(keys, host[: len(keys)]))


class LazyMetrics(Mapping):
    """Metrics that stay on the device until first read; then one transfer moves them all."""

    def __init__(self, named: Mapping[str, torch.Tensor], checks: list[Check]):
        self._named = {k: v.detach() for k, v in named.items()}
        self._checks = checks
        self._host: dict[str, float] | None = None

    def _materialize(self) -> dict[str, float]:
        # Packing happens here, on first read, so that the loss call itself launches nothing.
        if self._host is None:
            self._host = _unpack(list(self._named), self._checks, _pack(self._named, self._checks).tolist())
        return self._host

    def check(self) -> None:
        """Raise the ``ValueError`` of any failed input check (one host sync)."""
        self._materialize()

    def tensors(self) -> dict[str, torch.Tensor]:
        """The metrics as 0-dim device tensors: no sync, no input check."""
        return dict(self._named)

    def __getitem__(self, key: str) -> float:
        return self._materialize()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._named)

    def __len__(self) -> int:
        return len(self._named)

    def __repr__(self) -> str:
        state = "read" if self._host is not None else "unread"
        return f"LazyMetrics({list(self._named)}, {state})"


def finalize_metrics(named: Mapping[str, torch.Tensor], checks: list[Check], mode: str):
    """Turn named 0-dim tensors and input checks into the metrics the caller asked for."""
    if mode == "lazy":
        return LazyMetrics(named, checks)
    packed = _pack(named, checks)
    if packed.device.type == "meta":
        raise ValueError("meta tensors hold no data, so the metrics and input checks cannot be read: use "
                         "metrics_mode='lazy' (check_inputs=False for the sp_* helpers) to propagate shapes only.")
    return _unpack(list(named), checks, packed.tolist())
