"""temperature_mode: "teacher" (T divides the teacher only), "both" (the student too, as TRL's GKD and
Liger) and "both_t2" (both, times T², Hinton's), on the dense, top-k and fused-linear losses, both
paths, fp32 and bf16, against the float64 reference evaluated on the student's logits divided by T."""

import pytest
import torch

import fusedloss as fl
from fusedloss.testing import assert_close_to_float64, make_sp_inputs, make_sp_linear_inputs, make_topk_inputs

pytest.importorskip("triton")
T = 2.5
MODES = ["teacher", "both", "both_t2"]


def _by_hand(rows_fn, z, mode):
    """The definition: the loss of z / T (z itself for "teacher"), times T² for "both_t2"."""
    rows = rows_fn(z if mode == "teacher" else z / T)
    return rows * (T * T if mode == "both_t2" else 1.0)


def _grad(loss, x):
    (g,) = torch.autograd.grad(loss, x)
    return g


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("loss_type", ["kl-fwd", "js", "ce-soft-bwd"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_dense(mode, loss_type, dtype, device):
    q, z = make_sp_inputs(6, 13, dtype, device, seed=1, pad_frac=0.1)
    up = torch.rand(6, device=device, dtype=torch.float64) + 0.5  # random upstream gradients
    z64 = z.detach().double().requires_grad_(True)
    want = _by_hand(lambda zz: fl.sp_reference(q.double(), zz, loss_type, T, 0.05), z64, mode)
    ref_z = z.detach().requires_grad_(True)
    ref = _by_hand(lambda zz: fl.sp_reference(q, zz, loss_type, T, 0.05), ref_z.float(), mode)
    # kl-fwd through the helper with per-row upstream gradients, the others through sp_loss's mean
    weights = up if loss_type == "kl-fwd" else torch.full_like(up, 1.0 / 6)
    g_ref, g_want = _grad((ref * weights.to(ref.dtype)).sum(), ref_z), _grad((want * weights).sum(), z64)
    for backend in ("torch", "triton"):
        zz = z.detach().requires_grad_(True)
        if loss_type == "kl-fwd":
            rows = fl.sp_kl_loss(q, zz, T, 0.05, reduction="none", backend=backend, temperature_mode=mode)
            assert_close_to_float64(rows, ref.detach(), want.detach(), dtype, f"{backend} rows")
            loss = (rows * weights.to(rows.dtype)).sum()
        else:
            cfg = fl.SpLossConfig(loss_type=loss_type, temperature=T, label_smoothing=0.05, backend=backend,
                                  temperature_mode=mode)
            loss = fl.sp_loss({"q_star": q}, zz, cfg)[0]
            assert_close_to_float64(loss, ref.detach().mean(), want.detach().mean(), dtype, f"{backend} loss")
        assert_close_to_float64(_grad(loss, zz), g_ref, g_want, dtype, f"{backend} gradient")


@pytest.mark.parametrize("mode", MODES)
def test_topk(mode, device):
    idx, lp, z = make_topk_inputs(5, 21, 4, device=device, seed=2)
    z64 = z.detach().double().requires_grad_(True)
    want = _by_hand(lambda zz: fl.sp_topk_reference(idx, lp.double(), zz, "kl-fwd", T), z64, mode).mean()
    ref_z = z.detach().requires_grad_(True)
    ref = _by_hand(lambda zz: fl.sp_topk_reference(idx, lp, zz, "kl-fwd", T), ref_z, mode).mean()
    g_ref, g_want = _grad(ref, ref_z), _grad(want, z64)
    for backend in ("torch", "triton"):
        zz = z.detach().requires_grad_(True)
        loss = fl.sp_topk_loss(idx, lp, zz, "kl-fwd", T, backend=backend, temperature_mode=mode)
        assert_close_to_float64(loss, ref.detach(), want.detach(), torch.float32, f"{backend} loss")
        assert_close_to_float64(_grad(loss, zz), g_ref, g_want, torch.float32, f"{backend} gradient")


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("kind", ["dense", "topk", "linear"])
def test_sp_linear(mode, kind, device):
    hidden, weight, bias, teacher, row_weight = make_sp_linear_inputs(9, 6, 17, kind, device=device, seed=3, bias=True)
    lt = "kl-fwd"

    def materialised(h, w, b):
        logits = h @ w.T + b
        if kind == "topk":
            rows_fn = lambda zz: fl.sp_topk_reference(teacher.index, teacher.logprob.to(zz.dtype), zz, lt, T)  # noqa: E731
        else:
            tq = teacher if kind == "dense" else teacher.hidden @ teacher.weight.T + teacher.bias
            rows_fn = lambda zz: fl.sp_reference(tq.to(zz.dtype), zz, lt, T, 0.0)  # noqa: E731
        return (_by_hand(rows_fn, logits, mode) * row_weight.to(logits.dtype)).mean()

    leaves64 = [t.detach().double().requires_grad_(True) for t in (hidden, weight, bias)]
    want = materialised(*leaves64)
    g64 = torch.autograd.grad(want, leaves64)
    for backend in ("torch", "triton"):
        leaves = [t.detach().requires_grad_(True) for t in (hidden, weight, bias)]
        loss = fl.sp_linear_loss(leaves[0], leaves[1], teacher, lt, T, bias=leaves[2], row_weight=row_weight,
                                 chunk_size=4, backend=backend, temperature_mode=mode)
        assert float(loss.detach()) == pytest.approx(float(want.detach()), rel=1e-5, abs=1e-6), backend
        for g, w in zip(torch.autograd.grad(loss, leaves), g64):
            assert torch.allclose(g.double(), w, rtol=1e-4, atol=1e-6), backend


def test_temperature_mode_is_checked():
    with pytest.raises(ValueError, match="temperature_mode must be one of"):
        fl.SpLossConfig(temperature_mode="student")
    q, z = make_sp_inputs(3, 5, seed=0)
    with pytest.raises(ValueError, match="temperature_mode must be one of"):
        fl.sp_js_loss(q, z, 2.0, temperature_mode="t2")
    assert fl.build_loss({"type": "sp_linear", "params": {"temperature_mode": "both_t2"}}).cfg.temperature_mode \
        == "both_t2"
