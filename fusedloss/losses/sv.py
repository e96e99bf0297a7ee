"""Supervised value regression: MSE or MAE of logits against ``q_star`` over its finite entries."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn

from ..metrics import finalize_metrics
from .._dispatch import resolve_backend
from .._families import Family, VerifyCase
from ._common import (ConfigLoss, LossConfig, check_config_common, check_loss_config, compute_dtype, require_float,
                      require_same_device, stream_get)

__all__ = ["SV_LOSS_TYPES", "SvLossConfig", "sv_loss", "sv_reference", "SvLoss"]

SV_LOSS_TYPES = ("mse", "mae")


@dataclasses.dataclass
class SvLossConfig(LossConfig):
    """Configuration of :func:`sv_loss`, with the seed's fields and defaults. There is no fused
    kernel for this family; ``backend="triton"`` raises ``NotImplementedError``."""

    weight: float = 0.0
    """The loss's weight in the trainer's sum (carried for the trainer; the loss functions do not use it)."""
    loss_type: str = "mse"
    """``"mse"`` or ``"mae"``, over the finite entries of ``q_star``."""
    backend: str = "auto"
    """``"auto"`` (the fused kernel on CUDA where one exists, else the reference), ``"triton"`` (the kernel or a clear error) or ``"torch"`` (the reference)."""
    metrics_mode: str = "float"
    """``"float"``: metrics as a ``dict[str, float]`` with one host transfer (and the input checks raised then); ``"lazy"``: a :class:`fusedloss.LazyMetrics`, no host sync."""

    def check_values(self) -> None:
        if self.loss_type not in SV_LOSS_TYPES:
            raise ValueError(f"loss_type must be one of {SV_LOSS_TYPES}, got {self.loss_type!r}.")
        check_config_common(self.backend, self.metrics_mode)

    def build(self) -> SvLoss:
        """The :class:`SvLoss` of this config (the registry's factory interface)."""
        return SvLoss(self)


def sv_reference(q_targets: torch.Tensor, logits: torch.Tensor, loss_type: str) -> torch.Tensor:
    """Mean error over the finite entries of ``q_targets``, without boolean indexing (no sync).
    Padded entries (``-inf``, or any non-finite value) get exactly zero gradient, whatever the
    student logit there (even -inf or NaN). The teacher is a target: it gets no gradient."""
    cd = compute_dtype(q_targets, logits)
    finite = torch.isfinite(q_targets)
    zero = torch.zeros((), dtype=cd, device=logits.device)
    diff = torch.where(finite, logits.to(cd), zero) - torch.where(finite, q_targets.detach().to(cd), zero)
    err = diff.square() if loss_type == "mse" else diff.abs()
    return err.sum() / finite.sum()


def sv_loss(step_stream: Any, logits: torch.Tensor, cfg: SvLossConfig | None = None):
    """Regress ``logits`` ``[..., A]`` on ``step_stream["q_star"]`` of the same shape, over its finite
    entries (``-inf`` marks padding). Returns ``(loss, metrics)`` with the metric ``sv_loss``."""
    cfg = check_loss_config(cfg, SvLossConfig, "sv_loss")
    require_float(logits, "logits")
    q_star = stream_get(step_stream, "q_star")
    require_float(q_star, "step_stream['q_star']")
    if tuple(q_star.shape) != tuple(logits.shape):
        raise ValueError(
            f"step_stream['q_star'] must have the shape of logits {tuple(logits.shape)}, got {tuple(q_star.shape)}."
        )
    require_same_device({"logits": logits, "step_stream['q_star']": q_star})
    if logits.numel() == 0:
        raise ValueError("sv_loss: the batch is empty (no tokens).")
    resolve_backend(cfg.backend, "sv", logits)  # raises for backend="triton": no kernel
    loss = sv_reference(q_star, logits, cfg.loss_type)
    checks = [(~torch.isfinite(q_star).any(), "step_stream['q_star'] contains no finite values (all NaN or -inf).")]
    return loss, finalize_metrics({"sv_loss": loss}, checks, cfg.metrics_mode)


class SvLoss(ConfigLoss):
    """``nn.Module`` form of :func:`sv_loss`; ``forward(step_stream, logits)``."""

    config_cls = SvLossConfig

    def forward(self, step_stream: Any, logits: torch.Tensor):
        return sv_loss(step_stream, logits, self.cfg)


@dataclasses.dataclass
class L2LossFactory(LossConfig):
    """The ``l2_loss`` registry entry: ``torch.nn.MSELoss`` with a configurable reduction."""

    reduction: str = "mean"
    """``"mean"``, ``"sum"`` or ``"none"``, as ``torch.nn.MSELoss`` takes it."""

    def check_values(self) -> None:
        if self.reduction not in ("mean", "sum", "none"):
            raise ValueError(f"l2_loss reduction must be 'mean', 'sum' or 'none', got {self.reduction!r}.")

    def build(self) -> nn.Module:
        return nn.MSELoss(reduction=self.reduction)


def _verify_cases(small: bool) -> list[VerifyCase]:
    from .. import testing as T

    N, A = (12, 19) if small else (4096, 18)
    cases = []
    for loss_type in SV_LOSS_TYPES:
        def make(dtype, device):
            q, logits = T.make_sp_inputs(N, A, dtype, device, seed=4, pad_frac=0.2)
            return ({"q_star": q}, logits)

        def call(args, backend, _lt=loss_type):
            return sv_loss(args[0], args[1], SvLossConfig(loss_type=_lt, backend=backend))[0]

        cases.append(VerifyCase(loss_type, f"N={N} A={A}", make, call))
    return cases


FAMILY = Family(
    name="sv",
    section="Value regression",
    exports=("sv_loss", "SvLossConfig", "SvLoss", "sv_reference"),
    factories={"sv": SvLossConfig, "l2_loss": L2LossFactory},
    verify_cases=_verify_cases,
)
