"""The distributed losses over torch.distributed, in separate processes on the CPU with gloo
(world sizes 2 and 3): with uneven shards of the head, the vocabulary-parallel LM-head losses and
sp_linear_loss (dense, linear and top-k teachers, every loss type), and every gradient, equal one
process's on the whole head (fp32 to ~1e-6, bf16 by the tolerance rule),
on the reference path and on the kernels (the Triton interpreter); the data-parallel Switch load
balancing equals one process's on the whole batch, under real DistributedDataParallel too; a
Shard(0) DTensor head (weight and bias) for each LM-head loss, every other placement named; a 2 × 2
grid of vocabulary and data parallelism (world 4); and, in this process, the options that need a
group or an initialised torch.distributed. Each run ends by itself: the process group has a 60 s
timeout and the spawn joins its processes."""

import datetime
import math
import os
import sys

import pytest
import torch

import fusedloss as fl
from fusedloss.testing import assert_close_to_float64

dist = pytest.importorskip("torch.distributed")
if not dist.is_available():
    pytest.skip("torch.distributed is not available in this build", allow_module_level=True)

V = 37
SHARDS = {2: [10, 27], 3: [5, 20, 12]}  # uneven, in rank order
PATHS = ["torch"] + (["triton"] if __import__("importlib").util.find_spec("triton") else [])


def _inputs(dtype, seed=0, N=9, H=8):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, H, generator=g).to(dtype)
    weight = (torch.randn(V, H, generator=g) * 0.7).to(dtype)
    bias = (torch.randn(V, generator=g) * 0.3).to(dtype)
    labels = torch.randint(0, V, (N,), generator=g)
    labels[::4] = -100
    ups = torch.randn(2, N, generator=g)
    return hidden, weight, bias, labels, ups


def _leaves(*ts):
    return [t.detach().clone().requires_grad_(True) for t in ts]


def _logprob_loss(h, w, b, y, ups, **kw):
    lp, ent = fl.linear_logprob(h, w, y, bias=b, temperature=0.8, softcap=5.0, return_entropy=True, chunk_size=4,
                                **kw)
    return lp, ent, (lp * ups[0]).sum() + (ent * ups[1]).sum()


def _ce_losses(h, w, b, y, ups, **kw):
    mean = fl.linear_cross_entropy(h, w, y, bias=b, label_smoothing=0.1, z_loss=1e-3, chunk_size=4, **kw)
    rows = fl.linear_cross_entropy(h.reshape(3, 3, -1), w, y.reshape(3, 3), bias=b, reduction="none", shift=True,
                                   softcap=4.0, chunk_size=2, **kw)
    return mean, rows, mean + (rows * ups[0, :6].reshape(3, 2)).sum()


def _compare(rank, shard, case, backend, dtype, group_kw):
    """``case(h, w, b, y, ups, **kw) -> (*outputs, scalar)`` on the shard against the whole head."""
    off, size = shard
    hidden, weight, bias, labels, ups = _inputs(dtype)
    h, w, b = _leaves(hidden, weight, bias)
    *outs, loss = case(h, w, b, labels, ups, backend=backend)
    grads = torch.autograd.grad(loss, [h, w, b])
    h64, w64, b64 = _leaves(hidden.double(), weight.double(), bias.double())
    *outs64, loss64 = case(h64, w64, b64, labels, ups.double(), backend="torch")
    grads64 = torch.autograd.grad(loss64, [h64, w64, b64])
    hs, ws, bs = _leaves(hidden, weight[off:off + size], bias[off:off + size])
    *outs_d, loss_d = case(hs, ws, bs, labels, ups, backend=backend, **group_kw)
    grads_d = torch.autograd.grad(loss_d, [hs, ws, bs])
    rows = slice(off, off + size)
    tag = f"rank {rank} {backend} {dtype}"
    # the one tolerance rule: within twice one process's own error against float64, plus a floor (fp32's
    # fixed rtol 1e-5 failed on a machine whose matmul rounds differently, at 4e-5 on an entry of 0.03)
    for o_d, o, o64 in zip(outs_d + [loss_d], outs + [loss], outs64 + [loss64]):
        assert_close_to_float64(o_d, o, o64, dtype, tag)
    for g_d, g, g64, sl in zip(grads_d, grads, grads64, [slice(None), rows, rows]):
        assert_close_to_float64(g_d, g[sl], g64[sl], dtype, f"{tag} gradient")


class _NoHostSync(__import__("torch.utils._python_dispatch", fromlist=["TorchDispatchMode"]).TorchDispatchMode):
    """Fails on anything that reads a tensor's value on the host, the CPU's stand-in for a
    device-to-host sync: the ops behind ``.item()`` and ``bool()`` (``aten._local_scalar_dense``,
    ``aten.equal``), and ``.tolist()`` and ``.numpy()``, which read CPU memory without an op."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket in (torch.ops.aten._local_scalar_dense, torch.ops.aten.equal):
            raise AssertionError(f"a host sync ({func}) in a path that must not have one")
        return func(*args, **(kwargs or {}))

    def __enter__(self):
        def refuse(name):
            def read(*args, **kwargs):
                raise AssertionError(f"a host sync (Tensor.{name}) in a path that must not have one")
            return read

        self._saved = {name: getattr(torch.Tensor, name) for name in ("tolist", "numpy")}
        for name in self._saved:
            setattr(torch.Tensor, name, refuse(name))
        return super().__enter__()

    def __exit__(self, *exc):
        for name, method in self._saved.items():
            setattr(torch.Tensor, name, method)
        return super().__exit__(*exc)


def _no_host_sync(rank, world):
    """The data-parallel losses, the vocabulary-parallel LM head (after its first call cached the
    shard sizes, with check_inputs=False) and LazyMetrics.all_reduce read nothing on the host."""
    group, sizes = dist.group.WORLD, BATCH[world]
    step, out = fl.testing.make_dqn_inputs(sum(sizes), 6, 5, seed=8, mask=True)
    mine = {k: _split(v, sizes, rank) for k, v in step.items()}
    q_r = {"dqn": _split(out["dqn"], sizes, rank), "dqn_target": _split(out["dqn_target"], sizes, rank)}
    cfg = fl.DqnLossConfig(backend="torch", metrics_mode="lazy", mask_key="mask", grad_reduction="mean")
    q, z = fl.testing.make_sp_inputs(sum(sizes), 11, seed=3)
    hidden, weight, bias, labels, _ = _inputs(torch.float32)
    sizes_v = SHARDS[world]
    rows = slice(sum(sizes_v[:rank]), sum(sizes_v[: rank + 1]))
    w_r = weight[rows].clone().requires_grad_(True)
    fl.linear_cross_entropy(hidden, w_r, labels, group=group, check_inputs=False)  # caches the shard sizes
    with _NoHostSync():
        loss, metrics = fl.dqn_loss(mine, q_r, cfg, group=group)
        reduced = metrics.all_reduce(group)
        fl.sp_kl_loss(_split(q, sizes, rank), _split(z, sizes, rank), 1.3, check_inputs=False, group=group,
                      backend="torch")
        ce = fl.linear_cross_entropy(hidden, w_r, labels, bias=bias[rows], group=group, dp_group=group,
                                     check_inputs=False, backend="torch")
        ce.backward()
    assert set(dict(reduced)) >= {"q_values_mean", "dqn_loss"}  # read after the mode: one transfer, here


def _errors(rank, world, shard):
    off, size = shard
    hidden, weight, bias, labels, _ = _inputs(torch.float32)
    w = weight[off:off + size]
    with pytest.raises(ValueError, match="vocab_offset=3 does not match"):
        fl.linear_logprob(hidden, w, labels, group=dist.group.WORLD, vocab_offset=3 if off != 3 else 4)
    bad = labels.clone()
    bad[1] = V  # in no shard
    with pytest.raises(ValueError, match=rf"labels must lie in \[0, V\) = \[0, {V}\)"):
        fl.linear_cross_entropy(hidden, w, bad, group=dist.group.WORLD)
    with pytest.raises(ValueError, match="hidden differs across the vocabulary-parallel group"):
        fl.linear_cross_entropy(hidden + rank, w, labels, group=dist.group.WORLD)
    # the same label out of range without the check: NaN, as on one rank, never a silent number
    out = fl.linear_logprob(hidden, w, bad, group=dist.group.WORLD, check_inputs=False)
    assert out[1].isnan() and torch.isfinite(out[0])
    teacher = torch.randn(hidden.shape[0], V)
    with pytest.raises(ValueError, match="teacher_vocab='align' is not supported with a vocabulary-sharded head"):
        fl.sp_linear_loss(hidden, w, teacher[:, off:off + size], "kl-fwd", teacher_vocab="align",
                          group=dist.group.WORLD)
    # a dense teacher's shard must be the student's: the whole teacher, or another rank's columns, is named
    with pytest.raises(ValueError, match="teacher"):
        fl.sp_linear_loss(hidden, w, teacher[:, :size + 1], "kl-fwd", group=dist.group.WORLD)
    # top-k ids are global: one past the shards' total is out of range on every rank
    idx = torch.zeros(hidden.shape[0], 2, dtype=torch.long)
    idx[0, 1] = V
    with pytest.raises(ValueError, match="index"):
        fl.sp_linear_loss(hidden, w, fl.TopKTeacher(idx, torch.zeros(idx.shape)), "kl-fwd", group=dist.group.WORLD)


def _dtensor(rank, world):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (world,))
    hidden, weight, bias, labels, ups = _inputs(torch.float32, seed=3)
    h, w = _leaves(hidden, weight)
    lp, ent, loss = _logprob_loss(h, w, None, labels, ups, backend="torch")
    gh, gw = torch.autograd.grad(loss, [h, w])
    hd = hidden.clone().requires_grad_(True)
    wd = distribute_tensor(weight.clone(), mesh, [Shard(0)]).requires_grad_(True)  # torch.chunk's split
    h64, w64 = _leaves(hidden.double(), weight.double())
    lp64, _, loss64 = _logprob_loss(h64, w64, None, labels, ups.double(), backend="torch")
    gh64, gw64 = torch.autograd.grad(loss64, [h64, w64])
    lp_d, ent_d, loss_d = _logprob_loss(hd, wd, None, labels, ups, backend="torch")
    loss_d.backward()
    assert_close_to_float64(lp_d, lp, lp64, torch.float32, "DTensor logprob")
    assert_close_to_float64(hd.grad, gh, gh64, torch.float32, "DTensor dhidden")
    assert tuple(wd.grad.placements) == (Shard(0),)
    assert_close_to_float64(wd.grad.full_tensor(), gw, gw64, torch.float32, "DTensor dweight")
    with pytest.raises(ValueError, match=r"placements \(Shard\(0\),\).*Replicate"):
        fl.linear_logprob(hidden, distribute_tensor(weight, mesh, [Replicate()]), labels)
    with pytest.raises(ValueError, match=r"placements \(Shard\(0\),\).*Shard\(dim=1\)"):
        fl.linear_cross_entropy(hidden, distribute_tensor(weight, mesh, [Shard(1)]), labels)
    with pytest.raises(ValueError, match=r"placements \(Shard\(0\),\).*Partial"):
        fl.linear_cross_entropy(hidden, DTensor.from_local(weight, mesh, [Partial()]), labels)
    with pytest.raises(ValueError, match="group= is not the process group of the DTensor weight's mesh"):
        fl.linear_logprob(hidden, wd.detach(), labels, group=dist.new_group(list(range(world))))
    # an FSDP2-sharded head is a Shard(0) DTensor too, but each rank has its own rows of hidden: the
    # check names it, and weight.full_tensor() (what the docs say to pass) gives this rank's loss
    mine = hidden + rank
    with pytest.raises(ValueError, match="hidden differs across the vocabulary-parallel group"):
        fl.linear_cross_entropy(mine, wd.detach(), labels)
    torch.testing.assert_close(fl.linear_cross_entropy(mine, wd.detach().full_tensor(), labels),
                               fl.linear_cross_entropy(mine, weight, labels), rtol=1e-6, atol=1e-6)
    mesh2 = init_device_mesh("cpu", (world, 1), mesh_dim_names=("tp", "dp"))
    with pytest.raises(ValueError, match="on a 2-D mesh"):
        fl.linear_logprob(hidden, distribute_tensor(weight, mesh2, [Shard(0), Replicate()]), labels)
    _dtensor_losses(mesh, world)


def _dtensor_losses(mesh, world):
    """linear_cross_entropy with a Shard(0) weight and bias, and sp_linear_loss with a Shard(0)
    weight against a dense teacher split the same way (torch.chunk's rows), equal one process."""
    from torch.distributed.tensor import Shard, distribute_tensor

    hidden, weight, bias, labels, _ = _inputs(torch.float32, seed=5)
    rank = dist.get_rank()
    rows = torch.arange(V).chunk(world)[rank]
    teacher = torch.randn(hidden.shape[0], V, generator=torch.Generator().manual_seed(6))
    cases = {
        "linear_cross_entropy": lambda h, w, b, cols: fl.linear_cross_entropy(h, w, labels, bias=b, label_smoothing=0.1,
                                                                             chunk_size=4),
        "sp_linear_loss": lambda h, w, b, cols: fl.sp_linear_loss(h, w, teacher[:, cols], "js", 1.3, bias=b,
                                                                 chunk_size=4),
    }
    for name, case in cases.items():
        h, w, b = _leaves(hidden, weight, bias)
        want = case(h, w, b, slice(None))
        gh, gw, gb = torch.autograd.grad(want, [h, w, b])
        hd = hidden.clone().requires_grad_(True)
        wd = distribute_tensor(weight.clone(), mesh, [Shard(0)]).requires_grad_(True)
        bd = distribute_tensor(bias.clone(), mesh, [Shard(0)]).requires_grad_(True)
        got = case(hd, wd, bd, slice(int(rows[0]), int(rows[-1]) + 1))
        got.backward()
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6, msg=lambda m: f"DTensor {name}: {m}")
        torch.testing.assert_close(hd.grad, gh, rtol=1e-5, atol=1e-6, msg=lambda m: f"DTensor {name} dhidden: {m}")
        for leaf, g, what in ((wd, gw, "dweight"), (bd, gb, "dbias")):
            assert tuple(leaf.grad.placements) == (Shard(0),), (name, what)
            torch.testing.assert_close(leaf.grad.full_tensor(), g, rtol=1e-5, atol=1e-6,
                                       msg=lambda m: f"DTensor {name} {what}: {m}")


def _sp_linear_case(rank, shard, kind, loss_type, dtype, reduction, **opts):
    """sp_linear_loss on this rank's shard of the student head (and of a dense or linear teacher)
    against one process on the whole head: loss, and the gradients of hidden, weight and bias."""
    from fusedloss.testing import make_sp_linear_inputs

    off, size = shard
    hidden, weight, bias, teacher, _ = make_sp_linear_inputs(10, 6, V, kind, dtype, seed=11, bias=True, pad=0.25)
    ups = torch.randn(10, generator=torch.Generator().manual_seed(12))
    rows = slice(off, off + size)
    if kind == "dense":
        mine = teacher[:, rows]
    elif kind == "linear":
        mine = fl.LinearTeacher(teacher.hidden, teacher.weight[rows], teacher.bias[rows])
    else:
        mine = teacher

    def run(h, w, b, t, **kw):
        loss = fl.sp_linear_loss(h, w, t, loss_type, bias=b, reduction=reduction, chunk_size=3, **opts, **kw)
        total = loss if reduction != "none" else (loss * ups.to(loss.dtype)).sum()
        return loss, torch.autograd.grad(total, [h, w, b])

    loss, grads = run(*_leaves(hidden, weight, bias), teacher, backend="torch")
    loss_d, grads_d = run(*_leaves(hidden, weight[rows], bias[rows]), mine, group=dist.group.WORLD)
    tag = f"rank {rank} sp_linear {kind} {loss_type} {reduction} {opts} {dtype}"
    if dtype == torch.float32:
        torch.testing.assert_close(loss_d, loss, rtol=1e-5, atol=1e-6, msg=lambda m: f"{tag}: {m}")
        for g_d, g, sl in zip(grads_d, grads, [slice(None), rows, rows]):
            torch.testing.assert_close(g_d, g[sl], rtol=1e-5, atol=1e-6, msg=lambda m: f"{tag} gradient: {m}")
    else:
        t64 = (teacher.double() if kind == "dense" else fl.LinearTeacher(teacher.hidden.double(), teacher.weight.double(),
                                                                           teacher.bias.double())
               if kind == "linear" else fl.TopKTeacher(teacher.index, teacher.logprob.double()))
        loss64, grads64 = run(*_leaves(hidden.double(), weight.double(), bias.double()), t64, backend="torch")
        assert_close_to_float64(loss_d, loss, loss64, dtype, tag)
        for g_d, g, g64, sl in zip(grads_d, grads, grads64, [slice(None), rows, rows]):
            assert_close_to_float64(g_d, g[sl], g64[sl], dtype, f"{tag} gradient")


def _sp_linear(rank, shard):
    for loss_type in ("ce", "ce-soft-fwd", "ce-soft-bwd", "kl-fwd", "kl-bwd", "js"):
        _sp_linear_case(rank, shard, "dense", loss_type, torch.float32, "mean", temperature=1.3, label_smoothing=0.05)
    _sp_linear_case(rank, shard, "dense", "js", torch.float32, "none", js_beta=0.3, temperature_mode="both_t2",
                    temperature=2.0)
    _sp_linear_case(rank, shard, "linear", "kl-bwd", torch.float32, "sum")
    _sp_linear_case(rank, shard, "linear", "js", torch.bfloat16, "mean", temperature=0.7)
    _sp_linear_case(rank, shard, "linear", "ce", torch.float32, "mean", label_smoothing=0.1, temperature=1.7,
                    temperature_mode="both_t2")
    _sp_linear_case(rank, shard, "topk", "ce-soft-fwd", torch.float32, "mean", temperature=0.8,
                    temperature_mode="both")
    for loss_type in ("kl-fwd", "ce-soft-fwd"):
        _sp_linear_case(rank, shard, "topk", loss_type, torch.float32, "none", temperature=1.5)
    _sp_linear_case(rank, shard, "dense", "kl-fwd", torch.bfloat16, "mean", temperature=1.3, temperature_mode="both")
    _sp_linear_case(rank, shard, "topk", "kl-fwd", torch.bfloat16, "sum")


def _modules(rank, shard):
    """The registry's LM-head modules take the vocabulary group when built, as an attribute, or per
    call, and give the functions' results."""
    from fusedloss.testing import make_sp_linear_inputs

    off, size = shard
    rows = slice(off, off + size)
    hidden, weight, bias, labels, _ = _inputs(torch.float32)
    world = dist.group.WORLD
    want = fl.linear_cross_entropy(hidden, weight[rows], labels, bias=bias[rows], label_smoothing=0.1, group=world)
    ce = fl.build_loss({"type": "linear_cross_entropy", "params": {"label_smoothing": 0.1}})
    assert torch.equal(ce(hidden, weight[rows], labels, bias=bias[rows], vocab_group=world), want)
    ce.vocab_group = world
    assert torch.equal(ce(hidden, weight[rows], labels, bias=bias[rows]), want)
    assert torch.equal(ce(hidden, weight[rows], labels, bias=bias[rows], vocab_offset=off), want)
    h, w, b, teacher, _ = make_sp_linear_inputs(10, 6, V, "dense", torch.float32, seed=11, bias=True)
    want = fl.sp_linear_loss(h, w[rows], teacher[:, rows], "js", bias=b[rows], group=world)
    sp = fl.losses.sp_linear.SpLinearLoss(fl.SpLinearLossConfig(loss_type="js"), vocab_group=world)
    assert torch.equal(sp(h, w[rows], teacher[:, rows], bias=b[rows]), want)


def _moe(rank, world):
    """switch_load_balancing_loss(group=): each rank routes its own tokens (uneven batches, masks);
    every rank's loss is the whole batch's, the ranks' gradients sum to its gradient, and under real
    DistributedDataParallel, which averages them, grad_reduction="mean" gives it exactly."""
    import copy

    E, sizes = 5, [7, 4, 6][:world]
    g = torch.Generator().manual_seed(7)
    xs = [torch.randn(n, 6, generator=g) for n in sizes]
    masks = [torch.rand(n, generator=g) > 0.2 for n in sizes]
    torch.manual_seed(0)
    router = torch.nn.Linear(6, E)
    ref = copy.deepcopy(router)
    loss_ref = fl.switch_load_balancing_loss(ref(torch.cat(xs)), top_k=2, mask=torch.cat(masks))
    grads_ref = torch.autograd.grad(loss_ref, list(ref.parameters()))
    mine = copy.deepcopy(router)
    loss = fl.switch_load_balancing_loss(mine(xs[rank]), top_k=2, mask=masks[rank], group=dist.group.WORLD)
    torch.testing.assert_close(loss, loss_ref, rtol=1e-6, atol=1e-7)
    for g_r, g_ref in zip(torch.autograd.grad(loss, list(mine.parameters())), grads_ref):
        dist.all_reduce(g_r)
        torch.testing.assert_close(g_r, g_ref, rtol=1e-5, atol=1e-7)
    ddp = _keep(torch.nn.parallel.DistributedDataParallel(copy.deepcopy(router)))
    module = fl.SwitchLoadBalancingLoss(top_k=2, group=dist.group.WORLD, grad_reduction="mean")
    module(ddp(xs[rank]), masks[rank]).backward()
    for p, g_ref in zip(ddp.module.parameters(), grads_ref):
        torch.testing.assert_close(p.grad, g_ref, rtol=1e-5, atol=1e-7)


# DDP and FSDP wrappers live until the worker exits: their native threads, torn down while the group was
# still in use, aborted a process now and then here ("terminate called without an active exception").
_KEPT = []


def _keep(module):
    _KEPT.append(module)
    return module


BATCH = {2: [5, 8], 3: [5, 8, 3]}  # each rank's rows (sequences) of the data-parallel batch, uneven


def _split(t, sizes, rank, dim=0):
    """This rank's rows of ``t``, as a leaf when ``t`` needs a gradient."""
    part = t.detach().narrow(dim, sum(sizes[:rank]), sizes[rank]).clone()
    return part.requires_grad_(t.requires_grad)


def _assert_share(rank, sizes, share, full_loss, leaf, full_leaf, dim=0, what=""):
    """The ranks' shares sum to the whole batch's loss, and this rank's gradient is its rows of the
    whole batch's gradient."""
    total = share.detach().clone()
    dist.all_reduce(total)
    torch.testing.assert_close(total, full_loss.detach(), rtol=1e-5, atol=1e-6, msg=lambda m: f"{what} loss: {m}")
    (g,) = torch.autograd.grad(share, leaf)
    (g_full,) = torch.autograd.grad(full_loss, full_leaf)
    torch.testing.assert_close(g, _split(g_full, sizes, rank, dim), rtol=1e-5, atol=1e-6,
                               msg=lambda m: f"{what} gradient: {m}")


def _dp_sp(rank, world, backend):
    sizes, group = BATCH[world], dist.group.WORLD
    q, z = fl.testing.make_sp_inputs(sum(sizes), 11, seed=3, pad_frac=0.2)
    w = torch.rand(sum(sizes), generator=torch.Generator().manual_seed(4)) + 0.5
    z_r = _split(z, sizes, rank)
    cases = [("kl", lambda q_, z_, w_, **k: fl.sp_kl_loss(q_, z_, 1.3, backend=backend, check_inputs=False, **k)),
             ("js weighted", lambda q_, z_, w_, **k: fl.sp_js_loss(q_, z_, 0.8, 0.05, beta=0.3, weight=w_,
                                                                    backend=backend, check_inputs=False, **k))]
    for what, fn in cases:
        _assert_share(rank, sizes, fn(_split(q, sizes, rank), z_r, _split(w, sizes, rank), group=group),
                      fn(q, z, w), z_r, z, what=f"sp {what} {backend}")
    idx, lp, zt = fl.testing.make_topk_inputs(sum(sizes), 13, 4, seed=5, unused=0.3)
    zt_r = _split(zt, sizes, rank)
    _assert_share(rank, sizes, fl.sp_topk_loss(_split(idx, sizes, rank), _split(lp, sizes, rank), zt_r,
                                               backend=backend, check_inputs=False, group=group),
                  fl.sp_topk_loss(idx, lp, zt, backend=backend, check_inputs=False), zt_r, zt,
                  what=f"sp_topk {backend}")
    # sp_loss through the registry's module, the group given after it is built; [B, S, A] split over B
    q3, z3 = (t.detach().reshape(-1, 2, 11) for t in fl.testing.make_sp_inputs(2 * sum(sizes), 11, seed=6))
    z3.requires_grad_(True)
    module = fl.build_loss({"type": "sp", "params": {"loss_type": "kl-fwd", "backend": backend,
                                                     "metrics_mode": "lazy"}})
    z3_r = _split(z3, sizes, rank)
    full, full_metrics = module({"q_star": q3}, z3)
    module.group = group
    share, metrics = module({"q_star": _split(q3, sizes, rank)}, z3_r)
    _assert_share(rank, sizes, share, full, z3_r, z3, what=f"SpLoss {backend}")
    # the metric stays this rank's mean; all_reduce weighs it by the rank's rows
    torch.testing.assert_close(metrics.all_reduce(group).tensors()["sp_loss"], full_metrics.tensors()["sp_loss"],
                               rtol=1e-5, atol=1e-6)


def _dp_policy(rank, world):
    sizes, group = BATCH[world], dist.group.WORLD
    B, T = sum(sizes), 6
    g = torch.Generator().manual_seed(11)
    lp = (torch.randn(B, T, generator=g) * 0.3 - 1.0).requires_grad_(True)
    old, ref = lp.detach() + torch.randn(B, T, generator=g) * 0.1, lp.detach() + torch.randn(B, T, generator=g) * 0.2
    ent = torch.rand(B, T, generator=g).requires_grad_(True)
    adv = torch.randn(B, generator=g)
    mask = torch.rand(B, T, generator=g) > 0.3
    mask[1] = False  # a row with no valid token
    if world == 3:
        mask[sum(sizes[:2]):] = False  # a rank with no valid token at all
    opts = dict(kl_coef=0.05, entropy_coef=0.01, clip_high=0.28, dual_clip=3.0)
    for agg in ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm"):
        full, _ = fl.policy_loss(lp, old, adv, mask, ref_logprob=ref, entropy=ent, loss_agg=agg, **opts)
        lp_r = _split(lp, sizes, rank)
        share, _ = fl.policy_loss(lp_r, _split(old, sizes, rank), _split(adv, sizes, rank), _split(mask, sizes, rank),
                                  ref_logprob=_split(ref, sizes, rank), entropy=_split(ent, sizes, rank), loss_agg=agg,
                                  group=group, **opts)
        _assert_share(rank, sizes, share, full, lp_r, lp, what=f"policy {agg}")


def _dp_dqn(rank, world, backend):
    """dqn_loss(group=) with masks (under world 3 one rank holds no valid transition) and without;
    the lazy metrics, all-reduced, equal one process's on the whole batch."""
    sizes, group = BATCH[world], dist.group.WORLD
    for use_mask in (True, False):
        step, out = fl.testing.make_dqn_inputs(sum(sizes), 6, 5, seed=8, mask=use_mask, weight=True)
        if use_mask and world == 3:
            step["mask"][sum(sizes[:2]):] = False
        cfg = fl.DqnLossConfig(backend=backend, metrics_mode="lazy", cql_weight=0.3, weight_key="weight",
                               mask_key="mask" if use_mask else None)
        full, full_metrics = fl.dqn_loss(step, out, cfg)
        q_r = _split(out["dqn"], sizes, rank)
        mine = {k: _split(v, sizes, rank) for k, v in step.items()}
        share, metrics = fl.dqn_loss(mine, {"dqn": q_r, "dqn_target": _split(out["dqn_target"], sizes, rank)}, cfg,
                                     group=group)
        _assert_share(rank, sizes, share, full, q_r, out["dqn"], what=f"dqn mask={use_mask} {backend}")
        reduced, expected = metrics.all_reduce(group), full_metrics.tensors()
        for key, value in reduced.tensors().items():
            torch.testing.assert_close(value, expected[key], rtol=1e-5, atol=1e-5, msg=lambda m, k=key: f"{k}: {m}")
        reduced.check()  # the whole batch has valid transitions, though a rank may have none
    if world == 3:  # no valid transition anywhere: an error that names the whole group's batch, on every rank
        step["mask"] = torch.zeros(out["dqn"].shape[:2], dtype=torch.bool)
        cfg = fl.DqnLossConfig(backend=backend, mask_key="mask")
        mine = {k: _split(v, sizes, rank) for k, v in step.items()}
        with pytest.raises(ValueError, match="whole group's batch"):
            fl.dqn_loss(mine, {"dqn": _split(out["dqn"], sizes, rank),
                               "dqn_target": _split(out["dqn_target"], sizes, rank)}, cfg, group=group)


def _dp_vec_dqn(rank, world):
    sizes, group = BATCH[world], dist.group.WORLD
    step, online, target = fl.testing.make_vec_dqn_inputs(sum(sizes), 4, 5, 4, seed=9, argmax_margin=1e-3)
    online.requires_grad_(True)
    cfg = fl.VecDqnLossConfig(backend="torch", reward_scale=0.5)
    full, _ = fl.vec_dqn_loss(step, online, target, cfg)
    on_r = _split(online, sizes, rank)
    share, _ = fl.vec_dqn_loss({k: _split(v, sizes, rank) for k, v in step.items()}, on_r,
                               _split(target, sizes, rank), cfg, group=group)
    _assert_share(rank, sizes, share, full, on_r, online, what="vec_dqn")


def _dp_ddp(rank, world):
    """Under real DistributedDataParallel, which averages gradients over the group,
    grad_reduction="mean" gives one process's gradient on the whole batch."""
    import copy

    sizes = BATCH[world]
    g = torch.Generator().manual_seed(12)
    x, q = torch.randn(sum(sizes), 6, generator=g), torch.randn(sum(sizes), 9, generator=g)
    torch.manual_seed(0)
    student = torch.nn.Linear(6, 9)
    ref = copy.deepcopy(student)
    grads_ref = torch.autograd.grad(fl.sp_kl_loss(q, ref(x), 1.5, check_inputs=False), list(ref.parameters()))
    ddp = _keep(torch.nn.parallel.DistributedDataParallel(copy.deepcopy(student)))
    fl.sp_kl_loss(_split(q, sizes, rank), ddp(_split(x, sizes, rank)), 1.5, check_inputs=False,
                  group=dist.group.WORLD, grad_reduction="mean").backward()
    for p, g_ref in zip(ddp.module.parameters(), grads_ref):
        torch.testing.assert_close(p.grad, g_ref, rtol=1e-5, atol=1e-6)


def _dp_lm_head(rank, world, backend):
    """linear_cross_entropy(dp_group=) (ignored labels, shift) and sp_linear_loss(dp_group=): each
    rank's share of the whole batch's token mean, on a whole head."""
    sizes, group = BATCH[world], dist.group.WORLD
    hidden, weight, bias, _, _ = _inputs(torch.float32, seed=13, N=sum(sizes) * 3)
    hidden = hidden.reshape(sum(sizes), 3, -1).requires_grad_(True)
    labels = torch.randint(0, V, (sum(sizes), 3), generator=torch.Generator().manual_seed(14))
    labels[::3, 1] = -100
    if world == 3:
        labels[sum(sizes[:2]):] = -100  # a rank with no scored token
    h_r = _split(hidden, sizes, rank)
    for shift in (False, True):
        kw = dict(bias=bias, label_smoothing=0.1, z_loss=1e-3, shift=shift, chunk_size=4, backend=backend,
                  check_inputs=False)
        h = hidden if shift else hidden.reshape(-1, hidden.shape[-1])
        full = fl.linear_cross_entropy(h, weight, labels if shift else labels.reshape(-1), **kw)
        mine = h_r if shift else h_r.reshape(-1, h_r.shape[-1])
        y_r = _split(labels, sizes, rank)
        share = fl.linear_cross_entropy(mine, weight, y_r if shift else y_r.reshape(-1), dp_group=group, **kw)
        _assert_share(rank, sizes, share, full, h_r, hidden, what=f"linear_cross_entropy shift={shift} {backend}")
    h2 = hidden.detach().reshape(-1, hidden.shape[-1])[: 2 * sum(sizes)].reshape(sum(sizes), 2, -1)[:, 0]
    h2 = h2.clone().requires_grad_(True)
    teacher_h = torch.randn(sum(sizes), 5, generator=torch.Generator().manual_seed(15))
    teacher_w = torch.randn(V, 5, generator=torch.Generator().manual_seed(16))
    full = fl.sp_linear_loss(h2, weight, fl.LinearTeacher(teacher_h, teacher_w), "js", 1.3, backend=backend)
    h2_r = _split(h2, sizes, rank)
    share = fl.sp_linear_loss(h2_r, weight, fl.LinearTeacher(_split(teacher_h, sizes, rank), teacher_w), "js", 1.3,
                              backend=backend, dp_group=group)
    _assert_share(rank, sizes, share, full, h2_r, h2, what=f"sp_linear_loss {backend}")


class _TinyLM(torch.nn.Module):
    """A body and an LM head whose loss is taken inside forward, where FSDP2 has gathered the head."""

    def __init__(self, H=8):
        super().__init__()
        self.body = torch.nn.Linear(H, H)
        self.head = torch.nn.Linear(H, V, bias=False)

    def forward(self, x, labels, dp_group=None, grad_reduction="sum"):
        return fl.linear_cross_entropy(torch.tanh(self.body(x)), self.head.weight, labels, chunk_size=4,
                                       check_inputs=False, dp_group=dp_group, grad_reduction=grad_reduction)


def _fsdp2(rank, world):
    """FSDP2 end to end: the head is sharded over the data-parallel ranks (a Shard(0) DTensor, not
    a vocabulary shard); the loss runs inside the module's forward, where the weight is whole, with
    dp_group= and grad_reduction="mean"; FSDP's reduce-scatter averages the gradients, and each
    rank's gradient shard is its rows of one process's gradient on the whole batch."""
    import copy

    from torch.distributed.fsdp import fully_shard

    sizes = BATCH[world]
    g = torch.Generator().manual_seed(17)
    x, y = torch.randn(sum(sizes), 8, generator=g), torch.randint(0, V, (sum(sizes),), generator=g)
    y[::3] = -100
    torch.manual_seed(0)
    model = _TinyLM()
    ref = copy.deepcopy(model)
    ref(x, y).backward()
    sharded = copy.deepcopy(model)
    fully_shard(sharded.body)
    _keep(fully_shard(sharded))
    sharded(_split(x, sizes, rank), _split(y, sizes, rank), dist.group.WORLD, "mean").backward()
    for (name, p), p_ref in zip(sharded.named_parameters(), ref.parameters()):
        assert type(p.grad).__name__ == "DTensor", name
        torch.testing.assert_close(p.grad.full_tensor(), p_ref.grad, rtol=1e-5, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")


def _data_parallel(rank, world):
    for backend in PATHS:
        _dp_sp(rank, world, backend)
        _dp_dqn(rank, world, backend)
        _dp_lm_head(rank, world, backend)
    _dp_policy(rank, world)
    _dp_vec_dqn(rank, world)
    _dp_ddp(rank, world)


def _spawned(rank, world, init_file, backend, body):
    """One rank of a spawned group: ``body(rank, world)`` between the group's set-up and tear-down."""
    import faulthandler

    faulthandler.enable()  # a C++ abort in a collective shows the Python stack it came from
    dist.init_process_group(backend, init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    try:
        body(rank, world)
        dist.barrier()
    except BaseException:  # the other ranks would wait in a collective until the timeout: say why at once
        import traceback

        traceback.print_exc()
        os._exit(1)
    # every rank is done: leave without the native destructors of the group and the kept wrappers
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _spawn(body, world, tmp_path, backend="gloo"):
    torch.multiprocessing.spawn(_spawned, args=(world, str(tmp_path / "store"), backend, body), nprocs=world,
                                join=True)


class _Collectives:
    """Records the shape of every all_gather / all_reduce that fusedloss makes (it calls them through
    the torch.distributed module, so patching the module sees each one)."""

    def __init__(self):
        self.seen = []

    def __enter__(self):
        self.real = dist.all_gather, dist.all_reduce
        dist.all_gather = lambda parts, t, *a, **k: self._log("all_gather", t) or self.real[0](parts, t, *a, **k)
        dist.all_reduce = lambda t, *a, **k: self._log("all_reduce", t) or self.real[1](t, *a, **k)
        return self

    def _log(self, op, t):
        self.seen.append((op, tuple(t.shape)))

    def __exit__(self, *exc):
        dist.all_gather, dist.all_reduce = self.real


def _communication(rank, shard):
    """Each chunk of rows exchanges per-row numbers only, a few per row, never a [n, V_r] block; the
    one [N, H] collective is the hidden gradient's all-reduce, once per backward."""
    from fusedloss.testing import make_sp_linear_inputs

    off, size = shard
    rows, chunk = slice(off, off + size), 4
    hidden, weight, bias, labels, _ = _inputs(torch.float32)
    _, _, _, teacher, _ = make_sp_linear_inputs(hidden.shape[0], hidden.shape[1], V, "dense", torch.float32, seed=2)
    topk = fl.TopKTeacher(torch.topk(teacher, 5).indices, torch.log_softmax(torch.topk(teacher, 5).values, -1))
    cases = {
        "linear_cross_entropy": lambda h, w: fl.linear_cross_entropy(h, w, labels, label_smoothing=0.1, z_loss=1e-3,
                                                                     chunk_size=chunk, group=dist.group.WORLD,
                                                                     check_inputs=False),
        "linear_logprob": lambda h, w: sum(t.sum() for t in fl.linear_logprob(h, w, labels, return_entropy=True,
                                                                              chunk_size=chunk, group=dist.group.WORLD,
                                                                              check_inputs=False)),
        "sp_linear dense": lambda h, w: fl.sp_linear_loss(h, w, teacher[:, rows], "js", chunk_size=chunk,
                                                          group=dist.group.WORLD, check_inputs=False),
        "sp_linear top-k": lambda h, w: fl.sp_linear_loss(h, w, topk, "kl-fwd", chunk_size=chunk,
                                                          group=dist.group.WORLD, check_inputs=False),
    }
    N, H = hidden.shape
    for name, case in cases.items():
        h, w = _leaves(hidden, weight[rows])
        with _Collectives() as log:
            case(h, w).backward()
        assert [op for op, s in log.seen if s == (N, H)] == ["all_reduce"], (name, log.seen)
        for op, s in log.seen:
            if s != (N, H):  # [n, k] per chunk (k <= 8 numbers a row), or a scalar
                assert not s or (s[0] <= chunk and math.prod(s[1:]) <= 8), (name, op, s, log.seen)


def _vocab_parallel(rank, world):
    sizes = SHARDS[world]
    shard = (sum(sizes[:rank]), sizes[rank])
    group_kw = {"group": dist.group.WORLD}
    for backend in PATHS:
        for dtype in (torch.float32, torch.bfloat16):
            _compare(rank, shard, _logprob_loss, backend, dtype, group_kw)
            _compare(rank, shard, _ce_losses, backend, dtype, group_kw)
    _compare(rank, shard, _ce_losses, "torch", torch.float32, {**group_kw, "vocab_offset": shard[0]})
    _errors(rank, world, shard)
    _no_host_sync(rank, world)
    _sp_linear(rank, shard)
    _communication(rank, shard)
    _modules(rank, shard)
    if world == 2:  # before any DistributedDataParallel: a DDP reducer alive while the device mesh forms its
        _dtensor(rank, world)  # groups aborted the process now and then (std::terminate in a native thread)
    _data_parallel(rank, world)
    _moe(rank, world)


@pytest.mark.parametrize("world", [2, 3])
def test_vocab_parallel_lm_head_matches_one_process(world, tmp_path):
    _spawn(_vocab_parallel, world, tmp_path)


def test_dtensor_heads_at_world_3(tmp_path):
    """The DTensor cases over three ranks (torch.chunk's 13, 13, 11 rows), in processes of their own
    (see _vocab_parallel on DistributedDataParallel and device meshes)."""
    _spawn(_dtensor, 3, tmp_path)


@pytest.mark.parametrize("world", [2, 3])
def test_fsdp2_lm_head_loss_matches_one_process(world, tmp_path):
    pytest.importorskip("torch.distributed.fsdp")
    _spawn(_fsdp2, world, tmp_path)


def _nccl_smoke(rank, world):
    torch.cuda.set_device(rank)
    group = dist.group.WORLD
    hidden, weight, bias, labels, _ = (t.cuda() for t in _inputs(torch.float32))
    for backend in ("torch", "triton"):
        whole = fl.linear_cross_entropy(hidden, weight, labels, bias=bias, backend=backend, check_inputs=False)
        sharded = fl.linear_cross_entropy(hidden, weight, labels, bias=bias, backend=backend, check_inputs=False,
                                          group=group, dp_group=group)
        torch.testing.assert_close(sharded, whole, rtol=1e-5, atol=1e-6)
    q, z = (t.cuda() for t in fl.testing.make_sp_inputs(7, 11, seed=3))
    torch.testing.assert_close(fl.sp_kl_loss(q, z, 1.3, check_inputs=False, group=group),
                               fl.sp_kl_loss(q, z, 1.3, check_inputs=False), rtol=1e-5, atol=1e-6)


@pytest.mark.cuda
def test_nccl_single_rank_smoke(tmp_path):
    """The vocabulary- and data-parallel paths over NCCL on one GPU: a group of one gives the
    ungrouped result (multi-GPU parity is for a machine with several)."""
    if not (torch.cuda.is_available() and dist.is_nccl_available()):
        pytest.skip("needs CUDA and NCCL")
    _spawn(_nccl_smoke, 1, tmp_path, backend="nccl")


def _tp_dp_grid(rank, world):
    """A 2 × 2 grid: the head's vocabulary split over the tensor-parallel pairs {0, 1} and {2, 3}
    (uneven shards), the batch's rows over the data-parallel pairs {0, 2} and {1, 3} (uneven). Each
    rank's loss is its data-parallel share of the whole batch's global loss (the same on both ranks
    of a vocabulary pair); the data-parallel sum of the shares is one process's loss on the whole
    batch and head, each rank's hidden gradient is its rows of that process's, and the data-parallel
    sum of a shard's weight and bias gradients is its rows of that process's."""
    tp_groups = [dist.new_group([0, 1]), dist.new_group([2, 3])]
    dp_groups = [dist.new_group([0, 2]), dist.new_group([1, 3])]
    tp, dp = tp_groups[rank // 2], dp_groups[rank % 2]
    v_sizes, b_sizes = SHARDS[2], [4, 7]
    off, size = sum(v_sizes[:rank % 2]), v_sizes[rank % 2]
    cols, dp_rank = slice(off, off + size), rank // 2
    hidden, weight, bias, labels, _ = _inputs(torch.float32, seed=21, N=sum(b_sizes))
    labels[[0, b_sizes[0] + 1]] = -100  # each data-parallel part has an ignored row
    teacher = torch.randn(sum(b_sizes), V, generator=torch.Generator().manual_seed(22))
    cases = {
        "linear_cross_entropy": lambda h, w, b, y, t, **kw: fl.linear_cross_entropy(
            h, w, y, bias=b, label_smoothing=0.1, z_loss=1e-3, chunk_size=3, **kw),
        "sp_linear_loss": lambda h, w, b, y, t, **kw: fl.sp_linear_loss(h, w, t, "kl-fwd", 1.3, bias=b, chunk_size=3,
                                                                       **kw),
    }
    for backend in PATHS:
        for name, case in cases.items():
            h, w, b = _leaves(hidden, weight, bias)
            full = case(h, w, b, labels, teacher, backend=backend)
            grads = torch.autograd.grad(full, [h, w, b])
            h_r, w_r, b_r = _leaves(_split(hidden, b_sizes, dp_rank), weight[cols], bias[cols])
            share = case(h_r, w_r, b_r, _split(labels, b_sizes, dp_rank),
                         _split(teacher, b_sizes, dp_rank)[:, cols], backend=backend, group=tp, dp_group=dp)
            g_h, g_w, g_b = torch.autograd.grad(share, [h_r, w_r, b_r])
            tag = f"rank {rank} {name} {backend}"
            total = share.detach().clone()
            dist.all_reduce(total, group=dp)
            torch.testing.assert_close(total, full.detach(), rtol=1e-5, atol=1e-6, msg=lambda m: f"{tag} loss: {m}")
            torch.testing.assert_close(g_h, _split(grads[0], b_sizes, dp_rank), rtol=1e-5, atol=1e-6,
                                       msg=lambda m: f"{tag} dhidden: {m}")
            for g, g_full, what in ((g_w, grads[1], "dweight"), (g_b, grads[2], "dbias")):
                dist.all_reduce(g, group=dp)
                torch.testing.assert_close(g, g_full[cols], rtol=1e-5, atol=1e-6, msg=lambda m: f"{tag} {what}: {m}")


def test_tensor_and_data_parallel_grid_matches_one_process(tmp_path):
    _spawn(_tp_dp_grid, 4, tmp_path)


# --- what needs a group, or an initialised torch.distributed, is named (one process, no group) ---------------------

def test_the_sync_detector_detects():
    """_NoHostSync, which the spawned ranks use, fails on each way of reading a value."""
    step, out = fl.testing.make_dqn_inputs(2, 4, 3, seed=1)
    for read in (lambda: float(torch.ones(2).sum()), lambda: torch.ones(2).tolist(), lambda: bool(torch.ones(()) > 0),
                 lambda: fl.dqn_loss(step, out, fl.DqnLossConfig(backend="torch"))):  # float metrics: one transfer
        with pytest.raises(AssertionError, match="a host sync"):
            with _NoHostSync():
                read()
    assert torch.Tensor.tolist is not None and torch.ones(1).tolist() == [1.0]  # restored


def test_a_group_before_init_process_group_is_named():
    assert not dist.is_initialized()
    hidden, weight, _, labels, _ = _inputs(torch.float32)
    q, z = fl.testing.make_sp_inputs(4, 5, seed=1)
    calls = [lambda: fl.linear_cross_entropy(hidden, weight, labels, group=object()),
             lambda: fl.linear_cross_entropy(hidden, weight, labels, dp_group=object()),
             lambda: fl.linear_logprob(hidden, weight, labels, group=object()),
             lambda: fl.sp_kl_loss(q, z, 1.0, group=object()),
             lambda: fl.switch_load_balancing_loss(z, group=object())]
    for call in calls:
        with pytest.raises(RuntimeError, match=r"group= needs torch.distributed initialised"):
            call()


def test_options_that_need_a_group_are_named():
    hidden, weight, _, labels, _ = _inputs(torch.float32)
    q, z = fl.testing.make_sp_inputs(4, 5, seed=1)
    step, out = fl.testing.make_dqn_inputs(2, 4, 3, seed=2)
    with pytest.raises(ValueError, match=r"grad_reduction='mean' needs group="):
        fl.sp_kl_loss(q, z, 1.0, grad_reduction="mean")
    with pytest.raises(ValueError, match=r"grad_reduction='mean' needs group="):
        fl.linear_cross_entropy(hidden, weight, labels, grad_reduction="mean")
    with pytest.raises(ValueError, match=r"grad_reduction='mean' needs group="):
        fl.dqn_loss(step, out, fl.DqnLossConfig(backend="torch", grad_reduction="mean"))
    with pytest.raises(ValueError, match=r"grad_reduction='mean' needs group="):
        fl.switch_load_balancing_loss(z, grad_reduction="mean")
    for call in (lambda: fl.linear_logprob(hidden, weight, labels, vocab_offset=0),
                 lambda: fl.linear_cross_entropy(hidden, weight, labels, vocab_offset=3),
                 lambda: fl.sp_linear_loss(hidden, weight, torch.randn(hidden.shape[0], V), "js", vocab_offset=0)):
        with pytest.raises(ValueError, match=r"vocab_offset= needs group="):
            call()
