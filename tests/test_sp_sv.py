import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import fusedloss as fl
from fusedloss.testing import make_sp_inputs

LOSS_TYPES = ["ce", "ce-soft-fwd", "ce-soft-bwd", "kl-fwd", "kl-bwd", "js"]


def independent_sp_row(q, z, loss_type, T, eps):
    """One row in numpy float64, straight from the definitions; -inf in q marks padding."""
    valid = np.isfinite(q)
    n = valid.sum()
    qv, zv = q[valid], z[valid]
    ls = zv - zv.max() - np.log(np.exp(zv - zv.max()).sum())
    s = np.exp(ls)
    if loss_type == "ce":
        k = int(np.argmax(qv))
        return (1 - eps) * -ls[k] + eps * -ls.mean()
    p = np.exp(qv / T - (qv / T).max())
    p = p / p.sum()
    p = (1 - eps) * p + eps / n
    lp = np.log(p)
    if loss_type == "ce-soft-fwd":
        return -(p * ls).sum()
    if loss_type == "ce-soft-bwd":
        return -(s * lp).sum()
    if loss_type == "kl-fwd":
        return (p * (lp - ls)).sum()
    if loss_type == "kl-bwd":
        return (s * (ls - lp)).sum()
    m = 0.5 * (p + s)
    return 0.5 * (p * np.log(p / m)).sum() + 0.5 * (s * np.log(s / m)).sum()


@pytest.mark.parametrize("pad", [0.0, 0.3], ids=["dense", "padded"])
@pytest.mark.parametrize("T,eps", [(1.0, 0.0), (2.5, 0.0), (0.7, 0.2)], ids=["T1", "T2.5", "T0.7-ls0.2"])
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_sp_reference_matches_independent(loss_type, T, eps, pad):
    q, logits = make_sp_inputs(5, 9, torch.float64, pad_frac=pad)
    per_row = fl.sp_reference(q, logits, loss_type, T, eps)
    want = [independent_sp_row(q[i].numpy(), logits[i].detach().numpy(), loss_type, T, eps) for i in range(5)]
    np.testing.assert_allclose(per_row.detach().numpy(), want, rtol=1e-10, atol=1e-12)
    loss, metrics = fl.sp_loss({"q_star": q}, logits, fl.SpLossConfig(loss_type=loss_type, temperature=T,
                                                                       label_smoothing=eps, backend="torch"))
    assert loss.item() == pytest.approx(float(np.mean(want)), rel=1e-10)
    assert metrics == {"sp_loss": pytest.approx(float(np.mean(want)), rel=1e-10)}


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_sp_gradcheck_and_padding_gets_zero_grad(loss_type):
    q, logits = make_sp_inputs(4, 7, torch.float64, pad_frac=0.3, seed=11)
    fn = lambda z: fl.sp_loss({"q_star": q}, z, fl.SpLossConfig(loss_type=loss_type, temperature=1.3,
                                                                  label_smoothing=0.1, backend="torch"))[0]
    assert torch.autograd.gradcheck(fn, (logits,))
    (g,) = torch.autograd.grad(fn(logits), logits)
    assert torch.all(g[q == float("-inf")] == 0)
    assert torch.isfinite(g).all()


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_helpers_reduction_and_weight(reduction):
    q, logits = make_sp_inputs(6, 5, torch.float64)
    w = torch.rand(6, dtype=torch.float64)
    rows = fl.sp_reference(q, logits, "kl-fwd", 1.5, 0.05) * w
    got = fl.sp_kl_loss(q, logits, 1.5, 0.05, "fwd", reduction=reduction, weight=w, backend="torch")
    want = {"mean": rows.mean(), "sum": rows.sum(), "none": rows}[reduction]
    assert torch.allclose(got, want)
    assert torch.allclose(fl.sp_soft_ce_loss(q, logits, 1.0, direction="bwd", backend="torch"),
                          fl.sp_reference(q, logits, "ce-soft-bwd").mean())
    assert torch.allclose(fl.sp_js_loss(q, logits, 2.0, backend="torch"), fl.sp_reference(q, logits, "js", 2.0).mean())


rows = st.integers(1, 4)
cols = st.integers(2, 12)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), n=rows, a=cols, T=st.floats(0.1, 10.0), eps=st.floats(0.0, 1.0),
       scale=st.floats(0.1, 60.0))
def test_kl_nonnegative_js_bounded(seed, n, a, T, eps, scale):
    q, logits = make_sp_inputs(n, a, torch.float64, seed=seed, scale=scale)
    for lt in ("kl-fwd", "kl-bwd"):
        assert (fl.sp_reference(q, logits, lt, T, eps) >= -1e-12).all()
    js = fl.sp_reference(q, logits, "js", T, eps)
    assert torch.isfinite(js).all()
    assert (js >= -1e-12).all() and (js <= math.log(2) + 1e-12).all()


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), n=rows, a=cols, scale=st.floats(0.1, 30.0))
def test_js_symmetric_at_unit_temperature(seed, n, a, scale):
    q, logits = make_sp_inputs(n, a, torch.float64, seed=seed, scale=scale)
    assert torch.allclose(fl.sp_reference(q, logits, "js"), fl.sp_reference(logits.detach(), q, "js"), atol=1e-12)


def test_sp_underflow_no_nan():
    q = torch.tensor([[0.0, -2000.0, -5000.0, 1e4]], dtype=torch.float32)
    z = torch.tensor([[3000.0, -3000.0, 0.0, -1e4]], requires_grad=True)
    for lt in LOSS_TYPES:
        loss = fl.sp_reference(q, z, lt, 1.0, 0.0).sum()
        (g,) = torch.autograd.grad(loss, z)
        assert torch.isfinite(loss) and torch.isfinite(g).all(), lt


def test_sp_errors():
    q, logits = make_sp_inputs(3, 4)
    cfg = fl.SpLossConfig(backend="torch")
    with pytest.raises(ValueError, match="temperature"):
        fl.SpLossConfig(temperature=0.0)
    with pytest.raises(ValueError, match="loss_type"):
        fl.SpLossConfig(loss_type="kl")
    with pytest.raises(ValueError, match="label_smoothing"):
        fl.SpLossConfig(label_smoothing=1.5)
    with pytest.raises(ValueError, match="direction"):
        fl.sp_kl_loss(q, logits, 1.0, direction="up")
    with pytest.raises(ValueError, match="temperature"):
        fl.sp_js_loss(q, logits, -1.0)
    with pytest.raises(KeyError, match="q_star"):
        fl.sp_loss({}, logits, cfg)
    with pytest.raises(ValueError, match="shape"):
        fl.sp_loss({"q_star": q[:, :3]}, logits, cfg)
    with pytest.raises(ValueError, match="empty"):
        fl.sp_loss({"q_star": q[:0]}, logits[:0], cfg)
    with pytest.raises(ValueError, match="reduction"):
        fl.sp_js_loss(q, logits, 1.0, reduction="max")
    for bad in (float("nan"), float("inf")):
        qb = q.clone()
        qb[1, 2] = bad
        with pytest.raises(ValueError, match="NaN or \\+inf"):
            fl.sp_loss({"q_star": qb}, logits, cfg)
        with pytest.raises(ValueError, match="NaN or \\+inf"):
            fl.sp_kl_loss(qb, logits, 1.0, backend="torch")
    qb = q.clone()
    qb[0] = float("-inf")
    with pytest.raises(ValueError, match="no finite entry"):
        fl.sp_loss({"q_star": qb}, logits, cfg)
    _, lazy = fl.sp_loss({"q_star": qb}, logits, fl.SpLossConfig(backend="torch", metrics_mode="lazy"))
    with pytest.raises(ValueError, match="no finite entry"):
        lazy.check()


@pytest.mark.parametrize("loss_type", ["mse", "mae"])
def test_sv_matches_independent_and_gradcheck(loss_type):
    q, logits = make_sp_inputs(4, 6, torch.float64, pad_frac=0.3)
    loss, metrics = fl.sv_loss({"q_star": q}, logits, fl.SvLossConfig(loss_type=loss_type))
    fin = torch.isfinite(q)
    d = (logits.detach() - q)[fin]
    want = (d**2).mean() if loss_type == "mse" else d.abs().mean()
    assert loss.item() == pytest.approx(want.item(), rel=1e-12)
    assert metrics["sv_loss"] == pytest.approx(want.item(), rel=1e-12)
    assert torch.autograd.gradcheck(lambda z: fl.sv_loss({"q_star": q}, z, fl.SvLossConfig(loss_type=loss_type))[0], (logits,))


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), n=rows, a=cols, pad=st.floats(0.05, 0.9))
def test_sv_padding_gradient_is_zero(seed, n, a, pad):
    q, logits = make_sp_inputs(n, a, torch.float64, seed=seed, pad_frac=pad)
    for lt in ("mse", "mae"):
        (g,) = torch.autograd.grad(fl.sv_loss({"q_star": q}, logits, fl.SvLossConfig(loss_type=lt))[0], logits)
        assert torch.all(g[~torch.isfinite(q)] == 0)


def test_sv_errors():
    q, logits = make_sp_inputs(3, 4)
    with pytest.raises(ValueError, match="no finite"):
        fl.sv_loss({"q_star": torch.full_like(q, float("-inf"))}, logits)
    with pytest.raises(ValueError, match="loss_type"):
        fl.SvLossConfig(loss_type="huber")
    with pytest.raises(NotImplementedError, match="no fused kernel"):
        fl.sv_loss({"q_star": q}, logits, fl.SvLossConfig(backend="triton"))
    with pytest.raises(ValueError, match="shape"):
        fl.sv_loss({"q_star": q[:2]}, logits)
