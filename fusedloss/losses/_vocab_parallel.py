"""Vocabulary-parallel LM heads over ``torch.distributed``: each rank holds a contiguous range of
the head's rows (tensor parallelism), and the losses exchange per-row statistics only.

Each chunk of rows all-gathers ``[n, 5]`` numbers per rank (the shard's ``lse``, entropy, ``Σu``,
the label's logit where the label is in the shard, and whether it is), from which every rank
computes the same global statistics; the partial gradients of ``hidden`` are summed over the group
once per call (one all-reduce of ``[N, H]`` fp32), and the weight's and bias's gradients stay with
their shard. The shard sizes are all-gathered once per (group, local size) and cached.
"""

from __future__ import annotations

import dataclasses
import sys
from typing import Any

import torch

__all__ = ["VocabShard", "resolve_vocab_shard"]

_SIZES: dict = {}


@dataclasses.dataclass(frozen=True)
class VocabShard:
    """This rank's rows ``[offset, offset + V_r)`` of a ``vocab``-row head split over ``group``."""

    group: Any
    offset: int
    vocab: int
    world: int
    max_rows: int = 0
    """The largest shard's rows: every rank picks its default chunk from it, so the chunks, and the
    collectives they make, are the same on every rank."""

    def combine(self, st: torch.Tensor, in_shard: torch.Tensor) -> torch.Tensor:
        """Global ``(lse, entropy, Σu, u[label])`` per row from every shard's ``[n, 4]`` statistics
        (``in_shard``: the row's label is one of this shard's columns). With ``w_r = exp(lse_r -
        lse)`` the shard's share of the softmax mass, ``Σ_{j in r} s_j u_j = w_r (lse_r - H_r)``, so
        ``H = lse - Σ_r w_r (lse_r - H_r)``. A label in no shard (out of range) gives NaN, as on one rank."""
        import torch.distributed as dist

        zero = torch.zeros((), dtype=st.dtype, device=st.device)
        local = torch.cat([st[:, :3], torch.where(in_shard, st[:, 3], zero)[:, None],
                           in_shard.to(st.dtype)[:, None]], dim=1).contiguous()
        parts = [torch.empty_like(local) for _ in range(self.world)]
        dist.all_gather(parts, local, group=self.group)
        every = torch.stack(parts)  # [world, n, 5]
        lse_r, ent_r = every[..., 0], every[..., 1]
        lse = torch.logsumexp(lse_r, dim=0)
        w = torch.exp(lse_r - lse[None])
        share = torch.where(w == 0, zero, w * (lse_r - ent_r))  # a shard with no mass adds nothing, not 0·inf
        entropy = lse - share.sum(dim=0)
        hits = every[..., 4].sum(dim=0)
        u_y = torch.where(hits > 0, every[..., 3].sum(dim=0), torch.full_like(lse, float("nan")))
        return torch.stack([lse, entropy, every[..., 2].sum(dim=0), u_y], dim=1)

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        dist.all_reduce(t, group=self.group)
        return t


def _dtensor_type():
    """``DTensor`` where torch.distributed.tensor is already imported (a DTensor exists only then)."""
    module = sys.modules.get("torch.distributed.tensor")
    return getattr(module, "DTensor", None)


def _local_shard(t, name: str, group):
    """``t`` and its group: a ``Shard(0)`` DTensor on a 1-D mesh becomes its local rows (``to_local``
    is differentiable: the gradient comes back as a ``Shard(0)`` DTensor); any other placement is
    an error that names it."""
    DTensor = _dtensor_type()
    if DTensor is None or not isinstance(t, DTensor):
        return t, group
    from torch.distributed.tensor import Shard

    mesh, placements = t.device_mesh, tuple(t.placements)
    if mesh.ndim != 1 or len(placements) != 1 or not (isinstance(placements[0], Shard) and placements[0].dim == 0):
        raise ValueError(f"a DTensor {name} is used as a vocabulary-parallel head only with placements (Shard(0),) on "
                         f"a 1-D mesh, got {placements} on a {mesh.ndim}-D mesh. Under FSDP2 call the loss where the "
                         f"head is whole (inside the module's forward) or pass {name}.full_tensor().")
    mesh_group = mesh.get_group()
    if group is not None and group is not mesh_group:
        raise ValueError(f"group= is not the process group of the DTensor {name}'s mesh.")
    return t.to_local(), mesh_group


def _check_replicated(hidden: torch.Tensor, shard: VocabShard, name: str) -> None:
    """Every rank of a vocabulary-parallel group must hold the same ``hidden``: compares two sums
    bit for bit (NaN included) across the group, with one all-gather and one host sync."""
    import torch.distributed as dist

    h = hidden.detach().float()
    mine = torch.stack([h.sum(), (h * h).sum()]).view(torch.int32)
    parts = [torch.empty_like(mine) for _ in range(shard.world)]
    dist.all_gather(parts, mine, group=shard.group)
    if not all(torch.equal(p, parts[0]) for p in parts[1:]):
        raise ValueError(f"{name} differs across the vocabulary-parallel group: every rank of group= must pass the "
                         "same rows (an FSDP2-sharded head is not a vocabulary shard: pass weight.full_tensor(), or "
                         "call the loss inside the module's forward). Pass check_inputs=False to skip this check.")


def resolve_vocab_shard(weight, bias, group, vocab_offset):
    """``(weight, bias, shard)``: the local rows and the :class:`VocabShard` they are, or the
    arguments unchanged and ``None`` for a whole head (no ``group`` and no DTensor)."""
    weight, group = _local_shard(weight, "weight", group)
    if bias is not None:
        bias, group = _local_shard(bias, "bias", group)
    if group is None:
        if vocab_offset is not None:
            raise ValueError("vocab_offset= needs group=: the offset of a vocabulary shard within its group.")
        return weight, bias, None
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("group= needs torch.distributed initialised (torch.distributed.init_process_group).")
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        return weight, bias, VocabShard(group, 0, 0, world)  # the shape check names it
    key = (group, rank, weight.shape[0])
    sizes = _SIZES.get(key)
    if sizes is None:
        mine = torch.tensor([weight.shape[0]], dtype=torch.int64, device=weight.device)
        parts = [torch.empty_like(mine) for _ in range(world)]
        dist.all_gather(parts, mine, group=group)
        sizes = _SIZES[key] = [int(p.item()) for p in parts]
    offset = sum(sizes[:rank])
    if vocab_offset is not None and vocab_offset != offset:
        raise ValueError(f"vocab_offset={vocab_offset} does not match the shards of group=: their sizes {sizes} in rank "
                         f"order put rank {rank}'s rows at offset {offset}.")
    return weight, bias, VocabShard(group, offset, sum(sizes), world, max(sizes))
