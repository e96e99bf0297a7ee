import math

import pytest
import torch

import fusedloss as fl
from fusedloss.losses import sinkhorn as sk
from fusedloss.testing import make_sinkhorn_inputs


def log_sinkhorn_ot(x, y, a, b, p, eps, iters=3000):
    """Entropic OT_eps(a, b) = <a, f> + <b, g> by float64 log-domain Sinkhorn at fixed eps."""
    d = torch.cdist(x, y)
    C = d if p == 1 else d**2
    la, lb = a.log(), b.log()
    f = torch.zeros_like(a)
    g = torch.zeros_like(b)
    for _ in range(iters):
        f = -eps * torch.logsumexp(lb[None, :] + (g[None, :] - C) / eps, dim=1)
        g = -eps * torch.logsumexp(la[:, None] + (f[:, None] - C) / eps, dim=0)
    return (a * f).sum() + (b * g).sum()


def independent_divergence(pa, ta, ps, ts, lam, p, blur):
    x = torch.cat((pa.flatten(1), math.sqrt(lam) * ps.flatten(1)), 1).double()
    y = torch.cat((ta.flatten(1), math.sqrt(lam) * ts.flatten(1)), 1).double()
    a = torch.full((len(x),), 1.0 / len(x), dtype=torch.float64)
    b = torch.full((len(y),), 1.0 / len(y), dtype=torch.float64)
    eps = blur**p
    return (log_sinkhorn_ot(x, y, a, b, p, eps) - 0.5 * log_sinkhorn_ot(x, x, a, a, p, eps)
            - 0.5 * log_sinkhorn_ot(y, y, b, b, p, eps)).item()


@pytest.mark.parametrize("backend", ["tensorized", "online", "multiscale"])
@pytest.mark.parametrize("p", [1, 2])
def test_cost_semantics_against_independent_solver(p, backend):
    pa, ta, ps, ts = make_sinkhorn_inputs(40, 50, 2, 3, seed=p)
    want = independent_divergence(pa, ta, ps, ts, 0.3, p, 0.7)
    got = fl.sinkhorn_loss(pa, ta, ps, ts, p=p, lam_state=0.3, blur=0.7, scaling=0.97, backend=backend)
    assert got.item() == pytest.approx(want, rel=0.01)


def test_p2_cost_is_full_square():
    """One point each: the divergence is the full squared cost ||a-a'||^2 + lam*||s-s'||^2."""
    pa, ta = torch.tensor([[0.0, 0.0]]), torch.tensor([[3.0, 0.0]])
    ps, ts = torch.tensor([[0.0]]), torch.tensor([[2.0]])
    got = fl.sinkhorn_loss(pa, ta, ps, ts, p=2, lam_state=0.25, blur=0.01, backend="tensorized")
    assert got.item() == pytest.approx(9.0 + 0.25 * 4.0, rel=1e-4)
    got1 = fl.sinkhorn_loss(pa, ta, ps, ts, p=1, lam_state=0.25, blur=0.01, backend="tensorized")
    assert got1.item() == pytest.approx(math.sqrt(10.0), rel=1e-4)


@pytest.mark.parametrize("backend", ["tensorized", "online"])
def test_batched_equals_loop(backend):
    pa, ta, ps, ts = make_sinkhorn_inputs(20, 25, 2, 3, seed=4, batch=3)
    opts = dict(p=2, lam_state=0.5, blur=0.5, scaling=0.9, backend=backend)
    got = fl.sinkhorn_loss(pa, ta, ps, ts, batched=True, reduction="none", **opts)
    want = torch.stack([fl.sinkhorn_loss(pa[i], ta[i], ps[i], ts[i], **opts) for i in range(3)])
    # One eps-annealing schedule serves the whole batch (geomloss takes one diameter), so the
    # values match a per-problem loop to the schedule's truncation error, not to rounding.
    assert torch.allclose(got, want, rtol=2e-3)
    assert torch.allclose(fl.sinkhorn_loss(pa, ta, ps, ts, batched=True, **opts), got.mean(), rtol=1e-6)


def test_weights_equal_duplicated_points():
    pa, ta, ps, ts = make_sinkhorn_inputs(5, 6, 2, 2, seed=8)
    opts = dict(p=2, lam_state=1.0, blur=0.5, scaling=0.9, backend="tensorized")
    w = torch.tensor([2.0, 1, 1, 1, 1])
    dup = lambda t: torch.cat((t[:1], t))
    got = fl.sinkhorn_loss(pa, ta, ps, ts, weights_pred=w, **opts)
    want = fl.sinkhorn_loss(dup(pa), ta, dup(ps), ts, **opts)
    assert got.item() == pytest.approx(want.item(), rel=1e-5)


def test_gradient_against_finite_differences_of_converged_loss():
    pa, ta, ps, ts = (t.detach().double() for t in make_sinkhorn_inputs(6, 7, 2, 1, seed=9))
    pa.requires_grad_(True)
    opts = dict(p=2, lam_state=0.5, blur=0.8, scaling=0.999, backend="tensorized")
    (g,) = torch.autograd.grad(fl.sinkhorn_loss(pa, ta, ps, ts, **opts), pa)
    h = 1e-4
    for i, j in [(0, 0), (3, 1), (5, 0)]:
        e = torch.zeros_like(pa)
        e[i, j] = h
        plus = independent_divergence(pa.detach() + e, ta, ps, ts, 0.5, 2, 0.8)
        minus = independent_divergence(pa.detach() - e, ta, ps, ts, 0.5, 2, 0.8)
        assert g[i, j].item() == pytest.approx((plus - minus) / (2 * h), rel=0.02, abs=1e-4)


def test_low_precision_gradients_in_input_dtype():
    pa, ta, ps, ts = make_sinkhorn_inputs(10, 12, 2, 3, dtype=torch.bfloat16, seed=2)
    loss = fl.sinkhorn_loss(pa, ta, ps, ts, backend="tensorized", blur=0.5)
    assert loss.dtype == torch.float32
    loss.backward()
    assert pa.grad.dtype == torch.bfloat16 and torch.isfinite(pa.grad.float()).all()


def test_degenerate_inputs():
    same = torch.ones(5, 2)
    val = fl.sinkhorn_loss(same, same, same, same, backend="tensorized", blur=0.1)
    assert torch.isfinite(val) and abs(val.item()) < 1e-5
    one = fl.sinkhorn_loss(torch.zeros(1, 2), torch.ones(1, 2), torch.zeros(1, 1), torch.zeros(1, 1),
                           p=1, blur=0.01, backend="tensorized")
    assert one.item() == pytest.approx(math.sqrt(2.0), rel=1e-3)
    with pytest.raises(ValueError, match="features"):
        fl.sinkhorn_loss(torch.randn(4, 2), torch.randn(4, 3), torch.randn(4, 1), torch.randn(4, 1))
    with pytest.raises(ValueError, match="same leading"):
        fl.sinkhorn_loss(torch.randn(4, 2), torch.randn(4, 2), torch.randn(3, 1), torch.randn(4, 1))
    with pytest.raises(ValueError, match="empty"):
        fl.sinkhorn_loss(torch.randn(0, 2), torch.randn(4, 2), torch.randn(0, 1), torch.randn(4, 1))


@pytest.mark.parametrize("kw,match", [({"lam_state": -0.1}, "lam_state"), ({"blur": 0.0}, "blur"), ({"p": 3}, "p must"),
                                      ({"scaling": 1.0}, "scaling"), ({"scaling": 0.0}, "scaling"),
                                      ({"backend": "keops"}, "backend"), ({"reach": -1.0}, "reach")])
def test_option_errors(kw, match):
    pa, ta, ps, ts = make_sinkhorn_inputs(4, 4, 2, 2)
    with pytest.raises(ValueError, match=match):
        fl.sinkhorn_loss(pa, ta, ps, ts, **kw)
    with pytest.raises(ValueError, match=match):
        fl.KOTSinkhornLoss(**kw)


def test_keops_unavailable_names_fallback(monkeypatch):
    monkeypatch.setattr(sk, "_keops_problem", lambda device_type: "pykeops is not installed")
    pa, ta, ps, ts = make_sinkhorn_inputs(4, 4, 2, 2)
    with pytest.raises(RuntimeError, match="pykeops is not installed.*tensorized"):
        fl.sinkhorn_loss(pa, ta, ps, ts, backend="online")


def test_compiled_training_step_matches_eager():
    pa, ta, ps, ts = make_sinkhorn_inputs(20, 20, 2, 3, seed=5)
    opts = dict(p=2, lam_state=0.5, blur=0.5, scaling=0.9, backend="online")

    def step(pa, ps):
        return 2.0 * fl.sinkhorn_loss(pa, ta, ps, ts, **opts) + (pa**2).mean()

    eager = step(pa, ps)
    compiled = torch.compile(step)(pa, ps)
    assert torch.isfinite(compiled) and compiled.item() == pytest.approx(eager.item(), rel=1e-5)


def test_reach_is_unbalanced_and_tends_to_balanced():
    pa, ta, ps, ts = make_sinkhorn_inputs(15, 20, 2, 2, seed=12)
    opts = dict(p=2, blur=0.3, scaling=0.9, backend="tensorized")
    balanced = fl.sinkhorn_loss(pa, ta, ps, ts, **opts).item()
    tight = fl.sinkhorn_loss(pa, ta + 5.0, ps, ts, reach=0.5, **opts).item()
    loose = fl.sinkhorn_loss(pa, ta, ps, ts, reach=100.0, **opts).item()  # far beyond the diameter
    far_balanced = fl.sinkhorn_loss(pa, ta + 5.0, ps, ts, **opts).item()
    assert loose == pytest.approx(balanced, rel=1e-2)
    assert tight < far_balanced / 10  # a small reach stops paying for transport far away


def _dist_worker(rank, world, init_file, out_dir):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    pa, ta, ps, ts = make_sinkhorn_inputs(8, 8, 2, 2, dtype=torch.float64, seed=20 + rank)
    loss = fl.sinkhorn_loss(pa, ta, ps, ts, p=2, lam_state=0.5, blur=0.5, scaling=0.9, backend="tensorized",
                            gather_distributed=True)
    loss.backward()
    torch.save({"loss": loss.detach(), "grad": pa.grad, "inputs": (pa.detach(), ta, ps.detach(), ts)},
               f"{out_dir}/rank{rank}.pt")
    dist.destroy_process_group()


def test_gather_distributed_two_gloo_processes(tmp_path):
    import torch.multiprocessing as mp

    world = 2
    mp.spawn(_dist_worker, args=(world, str(tmp_path / "init"), str(tmp_path)), nprocs=world, join=True)
    res = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]
    parts = [torch.cat([r["inputs"][i] for r in res]) for i in range(4)]
    pa = parts[0].clone().requires_grad_(True)
    want = fl.sinkhorn_loss(pa, parts[1], parts[2], parts[3], p=2, lam_state=0.5, blur=0.5, scaling=0.9,
                            backend="tensorized")
    want.backward()
    for r in range(world):
        assert res[r]["loss"].item() == pytest.approx(want.item(), rel=1e-9)
        # The gather's backward sums the identical per-rank losses' gradients: world x the global
        # gradient, which DDP's averaging turns back into the global gradient.
        assert torch.allclose(res[r]["grad"], world * pa.grad[8 * r: 8 * (r + 1)], rtol=1e-6, atol=1e-9)


def test_gather_distributed_needs_process_group():
    pa, ta, ps, ts = make_sinkhorn_inputs(4, 4, 2, 2)
    with pytest.raises(RuntimeError, match="process group"):
        fl.sinkhorn_loss(pa, ta, ps, ts, backend="tensorized", gather_distributed=True)


def test_sinkhorn_dependencies_are_optional():
    """Without geomloss and pykeops (the ``sinkhorn`` extra) every other loss works, and
    sinkhorn_loss raises an ImportError that names the extra."""
    import subprocess
    import sys

    code = ("import sys; sys.modules['geomloss'] = None; sys.modules['pykeops'] = None\n"
            "import torch, fusedloss as fl\n"
            "from fusedloss.testing import make_dqn_inputs, make_sinkhorn_inputs\n"
            "step, out = make_dqn_inputs(2, 5, 3, seed=0)\n"
            "assert torch.isfinite(fl.dqn_loss(step, out, fl.DqnLossConfig(backend='torch'))[0])\n"
            "assert isinstance(fl.build_loss({'type': 'sinkhorn_knopp'}), fl.KOTSinkhornLoss)\n"
            "try:\n    fl.sinkhorn_loss(*make_sinkhorn_inputs(5, 6, seed=0), backend='tensorized')\n"
            "except ImportError as e:\n    print(e)\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert "pip install 'fusedloss[sinkhorn]'" in res.stdout
