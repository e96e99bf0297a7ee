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


# --- distillation (sp_linear_loss) over a vocabulary-sharded head ----------------------------------------------------

def _gather_rows(cols: list[torch.Tensor], shard: VocabShard) -> torch.Tensor:
    """``[world, n, len(cols)]``: every rank's per-row numbers, in one all-gather."""
    import torch.distributed as dist

    local = torch.stack(cols, dim=1).contiguous()
    parts = [torch.empty_like(local) for _ in range(shard.world)]
    dist.all_gather(parts, local, group=shard.group)
    return torch.stack(parts)


def _combine_lse(m: torch.Tensor, s: torch.Tensor, scale) -> tuple[torch.Tensor, torch.Tensor]:
    """The global ``(max, Σ exp((x - max)·scale))`` of a row from each shard's ``[world, n]`` max and
    sum relative to its own max (a shard with nothing, max -inf, adds nothing)."""
    M = m.amax(dim=0)  # NaN propagates
    M_safe = torch.where(M == float("-inf"), torch.zeros_like(M), M)
    w = torch.where(m == float("-inf"), torch.zeros_like(m), torch.exp((m - M_safe) * scale))
    return M, (s * w).sum(dim=0)


def _safe_max(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    m = x.amax(dim=-1)
    return m, torch.where(m == float("-inf"), torch.zeros_like(m), m)


def sp_sharded_rows_grad(kind: str, t_chunk, z: torch.Tensor, loss_type: str, temperature: float, eps: float,
                         beta: float, shard: VocabShard, need_grad: bool):
    """Per-row losses (global, the same on every rank) of one chunk of this shard's student logits
    ``z`` ``[n, V_r]`` and the gradient of their sum with respect to ``z``, with the semantics of
    :func:`fusedloss.sp_reference` / :func:`fusedloss.sp_topk_reference` on the whole row.

    One all-gather of per-row statistics gives the student's and teacher's global log-sum-exps (and,
    for ``"ce"``, the teacher's argmax; the count of valid actions for smoothing). The loss terms of
    this shard's columns are then those of the whole-row formulas; with the student's ``lse`` held as
    an input, ``∂/∂z`` of the local terms plus ``Σ_ranks ∂/∂lse`` times the global softmax is the
    gradient, and one all-reduce sums the row losses and the ``∂/∂lse``."""
    import torch.distributed as dist

    from .sp import _over_temperature, _wmul, inverse_temperature, soft_terms

    cd = torch.float64 if z.dtype == torch.float64 else torch.float32
    zz = z.detach().to(cd)
    n, Vr = zz.shape
    zero = torch.zeros((), dtype=cd, device=zz.device)
    if kind == "topk":
        idx, logprob = t_chunk
        used = (idx >= 0) & (idx < shard.vocab)
        own = used & (idx >= shard.offset) & (idx < shard.offset + Vr)
        m_z, m_z0 = _safe_max(zz)
        stats = _gather_rows([m_z, torch.exp(zz - m_z0[:, None]).sum(dim=-1)], shard)
        M_z, S_z = _combine_lse(stats[..., 0], stats[..., 1], 1.0)
        lse = M_z + torch.log(S_z)
        v = logprob.detach().to(cd).masked_fill(~used, float("-inf"))  # the teacher: the same on every rank
        mx = v.amax(dim=-1, keepdim=True)
        mx = torch.where(mx == float("-inf"), torch.zeros_like(mx), mx)
        x = _over_temperature(v - mx, temperature)
        e = x.exp()
        total = e.sum(dim=-1, keepdim=True)
        p = torch.where(used & (total != 0), e / total, torch.zeros_like(e))
        log_p = torch.where(used, x - total.log(), torch.zeros_like(x))
        local_idx = torch.where(own, idx - shard.offset, torch.zeros_like(idx)).long()

        def per_of(z_, lse_):
            log_q = torch.where(own, z_.gather(-1, local_idx) - lse_[:, None], zero)
            per = _wmul(p, log_p - log_q) if loss_type == "kl-fwd" else _wmul(p, -log_q)
            return torch.where(own, per, zero).sum(dim=-1)

        def softmax_of(lse_):
            return torch.exp(zz - lse_[:, None])
    else:
        q = t_chunk.detach().to(cd)
        pad = q == float("-inf")
        inv_t = inverse_temperature(temperature, cd)
        m_t, m_t0 = _safe_max(q)
        zv = zz.masked_fill(pad, float("-inf"))
        m_z, m_z0 = _safe_max(zv)
        key = torch.where(q == q, q, torch.full_like(q, float("-inf")))
        best, arg = key.max(dim=-1)
        stats = _gather_rows([m_t, torch.exp((q - m_t0[:, None]) * inv_t).sum(dim=-1), m_z,
                              torch.exp(zv - m_z0[:, None]).sum(dim=-1), (~pad).sum(dim=-1).to(cd), best,
                              (arg + shard.offset).to(cd)], shard)
        M_t, S_t = _combine_lse(stats[..., 0], stats[..., 1], inv_t)
        M_z, S_z = _combine_lse(stats[..., 2], stats[..., 3], 1.0)
        lse = M_z + torch.log(S_z)
        n_valid = stats[..., 4].sum(dim=0)[:, None]
        # the teacher's argmax: the first rank that holds the row's max (ties to the lowest index, as torch.argmax)
        bests = stats[..., 5]
        first = (bests == bests.amax(dim=0, keepdim=True)).to(torch.int64).argmax(dim=0)
        target = stats[..., 6].gather(0, first[None])[0].long() - shard.offset
        log_t = _over_temperature(q - M_t[:, None], temperature) - torch.log(S_t)[:, None]
        if eps > 0.0 and loss_type != "ce":
            log_t = torch.log((1.0 - eps) * log_t.exp() + eps / n_valid)
        log_t0 = log_t.masked_fill(pad, 0.0)
        p_t = log_t0.exp().masked_fill(pad, 0.0)
        cols = torch.arange(Vr, device=zz.device)[None, :]

        def per_of(z_, lse_):
            log_s0 = torch.where(pad, zero, z_ - lse_[:, None])
            if loss_type == "ce":
                per = -torch.where(cols == target[:, None], log_s0, zero)
                if eps:
                    per = (1.0 - eps) * per + eps * (-log_s0 / n_valid)
                return per.sum(dim=-1)
            p_s = log_s0.exp().masked_fill(pad, 0.0)
            per = soft_terms(loss_type, p_t, log_t0, p_s, log_s0, beta)
            return torch.where(pad, zero, per).sum(dim=-1)

        def softmax_of(lse_):
            return torch.where(pad, zero, torch.exp(zz - lse_[:, None]))
    if not need_grad:
        rows = per_of(zz, lse)
        dist.all_reduce(rows, group=shard.group)
        return rows, None
    rows, vjp = torch.func.vjp(per_of, zz, lse)
    g_z, g_lse = vjp(torch.ones_like(rows))
    both = torch.stack([rows, g_lse], dim=1)
    dist.all_reduce(both, group=shard.group)
    return both[:, 0], g_z + both[:, 1:2] * softmax_of(lse)


def sharded_q_star_checks(q: torch.Tensor, shard: VocabShard, name: str):
    """:func:`fusedloss.losses.sp.q_star_checks` of a teacher sharded by columns: the row max over
    every shard (one all-gather of ``[N]``), so a shard whose part of a row is all padding is no
    error while the whole row is not."""
    from .sp import row_max_checks

    return row_max_checks(_gather_rows([q.detach().amax(dim=-1)], shard)[..., 0].amax(dim=0), name)  # NaN propagates
