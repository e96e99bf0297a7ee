"""Data-parallel means over ``torch.distributed``: each rank's share of the global batch's mean.

A loss that averages over tokens (rows, transitions) takes ``group=``, a process group whose ranks
each hold their own part of the batch. It then divides this rank's sum by the **global** count, so
each rank returns ``Σ_local / N_global``: the ranks' losses, and their gradients, *sum* to the loss
and gradient of one process on the whole batch (TransformerEngine #2476: not the local count).
The count is all-reduced on the device, in the loss call, with no host sync; several counts of one
call travel in one all-reduce.

A trainer that *averages* gradients over the group (DDP, FSDP) would get ``1/world`` of the global
gradient from those shares (Megatron-LM #3769). ``grad_reduction="mean"`` is the fix: the value
stays the share, and the gradient is ``world`` times larger, so the averaged gradient is the
global-batch one.
"""

from __future__ import annotations

import torch

__all__ = ["GRAD_REDUCTIONS", "check_grad_reduction", "check_dp", "global_counts", "dp_share", "scale_grad"]

GRAD_REDUCTIONS = ("sum", "mean")


def check_grad_reduction(grad_reduction: str) -> None:
    if grad_reduction not in GRAD_REDUCTIONS:
        raise ValueError(f"grad_reduction must be one of {GRAD_REDUCTIONS}, got {grad_reduction!r}.")


def check_dp(group, grad_reduction: str) -> None:
    """Validate ``group=`` and ``grad_reduction=`` of a data-parallel mean."""
    check_grad_reduction(grad_reduction)
    if group is None:
        if grad_reduction == "mean":
            raise ValueError("grad_reduction='mean' needs group=: the group whose gradient average it corrects.")
        return
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("group= needs torch.distributed initialised (torch.distributed.init_process_group).")


def global_counts(counts: list, group, device: torch.device) -> torch.Tensor:
    """The sums over ``group`` of this rank's ``counts`` (ints or 0-dim tensors), as one fp64 vector
    from one all-reduce, on ``device``; no host sync. fp64 holds any token count exactly."""
    import torch.distributed as dist

    parts = [c.detach().reshape(1).to(device=device, dtype=torch.float64) if isinstance(c, torch.Tensor)
             else torch.full((1,), float(c), dtype=torch.float64, device=device) for c in counts]
    total = torch.cat(parts)
    dist.all_reduce(total, group=group)
    return total


def dp_share(loss: torch.Tensor, n_local, n_global: torch.Tensor) -> torch.Tensor:
    """``loss``, this rank's mean over its ``n_local`` items, as its share of the group's mean over
    ``n_global`` (:func:`global_counts`): ``loss · n_local / n_global``. A rank with no item adds
    0, never the NaN of its empty mean (the caller's masking keeps that NaN out of the gradient)."""
    n = (n_local.detach().to(device=loss.device, dtype=torch.float64) if isinstance(n_local, torch.Tensor)
         else torch.tensor(float(n_local), dtype=torch.float64, device=loss.device))
    ratio = (n / n_global.clamp(min=1)).to(loss.dtype)
    return torch.where(n > 0, loss, torch.zeros((), dtype=loss.dtype, device=loss.device)) * ratio


def scale_grad(loss: torch.Tensor, group, grad_reduction: str) -> torch.Tensor:
    """``loss`` with its gradient scaled by the group's size for ``grad_reduction="mean"`` (its
    value unchanged); ``loss`` itself otherwise."""
    if group is None or grad_reduction != "mean":
        return loss
    import torch.distributed as dist

    world = dist.get_world_size(group)
    return loss + (world - 1) * (loss - loss.detach())
