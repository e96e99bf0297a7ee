"""LLM-scale distillation: generalized JSD (β), top-k teachers and the fused-linear loss, each
against a float64 dense computation, on both paths (the kernels under the interpreter on CPU)."""

import math

import pytest
import torch

import fusedloss as fl
from fusedloss.testing import assert_close_to_float64, make_sp_inputs, nan_like

BETAS = [0.1, 0.5, 0.9]


def dense_jsd_beta(q, z, beta, T=1.0):
    """JSD_β(P‖Q) per row from the definition, in float64 (no padding)."""
    p = torch.softmax(q.double() / T, dim=-1)
    s = torch.softmax(z.double(), dim=-1)
    m = beta * p + (1 - beta) * s
    return beta * (p * (p / m).log()).sum(-1) + (1 - beta) * (s * (s / m).log()).sum(-1)


@pytest.mark.parametrize("beta", BETAS)
def test_js_beta_reference_matches_definition(beta):
    q, z = make_sp_inputs(7, 13, torch.float64, scale=3.0)
    got = fl.sp_reference(q, z, "js", 1.3, 0.0, beta)
    assert torch.allclose(got, dense_jsd_beta(q, z, beta, 1.3), rtol=1e-12, atol=1e-14)
    # the gradient too (autograd through the definition)
    z1 = z.detach().clone().requires_grad_(True)
    z2 = z.detach().clone().requires_grad_(True)
    up = torch.randn(7, dtype=torch.float64)
    (g1,) = torch.autograd.grad((fl.sp_reference(q, z1, "js", 1.3, 0.0, beta) * up).sum(), z1)
    (g2,) = torch.autograd.grad((dense_jsd_beta(q, z2, beta, 1.3) * up).sum(), z2)
    assert torch.allclose(g1, g2, rtol=1e-10, atol=1e-13)


def test_js_beta_half_is_symmetric_js():
    q, z = make_sp_inputs(5, 9, torch.float64)
    half = fl.sp_js_loss(q, z, 1.0, backend="torch", reduction="none")
    p, s = torch.softmax(q, -1), torch.softmax(z.detach(), -1)
    m = 0.5 * (p + s)
    want = 0.5 * (p * (p / m).log()).sum(-1) + 0.5 * (s * (s / m).log()).sum(-1)
    assert torch.allclose(half, want, rtol=1e-12)
    assert torch.allclose(fl.sp_js_loss(q, z, 1.0, beta=0.5, backend="torch"), half.mean())
    # JSD_β(P‖Q) = JSD_(1-β)(Q‖P)
    a = fl.sp_reference(q, z.detach(), "js", 1.0, 0.0, 0.2)
    b = fl.sp_reference(z.detach(), q, "js", 1.0, 0.0, 0.8)
    assert torch.allclose(a, b, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("bad", [0.0, 1.0, -0.5, 1.5, float("nan"), True, "0.5"])
def test_js_beta_errors(bad):
    q, z = make_sp_inputs(3, 4)
    with pytest.raises((ValueError, TypeError), match="beta"):
        fl.sp_js_loss(q, z, 1.0, beta=bad)
    with pytest.raises((ValueError, TypeError), match="js_beta"):
        fl.SpLossConfig(loss_type="js", js_beta=bad)


def test_js_beta_config_and_registry():
    q, z = make_sp_inputs(6, 11)
    cfg = fl.SpLossConfig(loss_type="js", js_beta=0.3, temperature=2.0, backend="torch")
    loss, _ = fl.sp_loss({"q_star": q}, z, cfg)
    assert torch.allclose(loss, fl.sp_js_loss(q, z, 2.0, beta=0.3, backend="torch"))
    module = fl.build_loss({"type": "sp", "params": {"loss_type": "js", "js_beta": 0.3, "temperature": 2.0,
                                                      "backend": "torch"}})
    assert torch.allclose(module({"q_star": q}, z)[0], loss)


# (N, A, max_block): one tile, a single row over several tiles, packed short rows.
JS_SHAPES = {"N9-A37": (9, 37, 8192), "N1-A300-tiled": (1, 300, 64), "N40-A5": (40, 5, 8192)}


@pytest.mark.parametrize("shape", list(JS_SHAPES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("beta", BETAS)
def test_js_beta_kernel_matches_reference(beta, dtype, shape, device):
    pytest.importorskip("triton")
    from fusedloss.kernels import sp as K

    N, A, max_block = JS_SHAPES[shape]
    q, z = make_sp_inputs(N, A, dtype, device, pad_frac=0.2)
    T, eps = 1.4, 0.05
    loss_buf, grad_buf = nan_like((N,), torch.float32, device), nan_like((N, A), dtype, device)
    rows, grad = K.sp_fwd(q, z.detach(), "js", T, eps, max_block, loss_out=loss_buf, grad_out=grad_buf, js_beta=beta)
    z64 = z.detach().double().requires_grad_(True)
    ref64 = fl.sp_reference(q.double(), z64, "js", T, eps, beta)
    (g64,) = torch.autograd.grad(ref64.sum(), z64)
    ref = fl.sp_reference(q, z, "js", T, eps, beta)
    (g_ref,) = torch.autograd.grad(ref.sum(), z)
    assert_close_to_float64(rows, ref, ref64, dtype, "row loss")
    assert_close_to_float64(grad, g_ref.to(dtype), g64, dtype, "gradient")
    assert torch.all(grad[q == float("-inf")] == 0)


def test_js_beta_public_paths_agree(device):
    pytest.importorskip("triton")
    q, z = make_sp_inputs(8, 29, torch.float32, device, pad_frac=0.1)
    w = torch.rand(8, device=device)
    up = torch.randn(8, device=device)
    outs = {}
    for backend in ("triton", "torch"):
        zz = z.detach().clone().requires_grad_(True)
        loss = fl.sp_js_loss(q, zz, 0.7, beta=0.25, reduction="none", weight=w, backend=backend)
        (loss * up).sum().backward()
        outs[backend] = loss.detach(), zz.grad
    assert torch.allclose(outs["triton"][0], outs["torch"][0], rtol=1e-5, atol=1e-6)
    assert torch.allclose(outs["triton"][1], outs["torch"][1], rtol=1e-5, atol=1e-7)
