"""The vector-DQN kernels against the references: CPU under TRITON_INTERPRET=1 in CI, CUDA on a GPU."""

import math

import pytest
import torch

import fusedloss as fl
from fusedloss.losses._common import transform_rewards
from fusedloss.testing import assert_canaries_intact, assert_close_to_float64, make_vec_dqn_inputs, nan_like

pytest.importorskip("triton")
from fusedloss.kernels import vec_dqn as K  # noqa: E402

DTYPES = [torch.float32, torch.bfloat16]


@pytest.mark.parametrize("A", [1, 2, 7, 18, 40])
@pytest.mark.parametrize("D", [2, 16, 130])
def test_scores_match_reference(A, D, device):
    v = torch.randn(3, A, D, device=device)
    out = nan_like((3, A), torch.float32, device)
    got = K.vec_dqn_scores_fwd(v, out=out)
    assert_canaries_intact(out)
    ref = fl.vec_dqn_scores_reference(v)
    ref64 = fl.vec_dqn_scores_reference(v.double())
    assert_close_to_float64(got, ref, ref64, torch.float32, "scores")
    # Public entry with leading dims and bf16 input.
    vb = v.to(torch.bfloat16).reshape(3, 1, A, D)
    got_b = fl.vec_dqn_scores(vb, backend="triton")
    assert got_b.shape == (3, 1, A) and got_b.dtype == torch.float32
    assert_close_to_float64(got_b, fl.vec_dqn_scores_reference(vb), fl.vec_dqn_scores_reference(vb.double()),
                            torch.bfloat16, "bf16 scores")


def test_scores_d2_exact_geometry(device):
    ang = torch.tensor([0.3, 1.9, -2.5, 0.9, 2.2], device=device)
    v = torch.stack((ang.cos(), ang.sin()), -1) * torch.tensor([[2.0], [0.5], [1.0], [3.0], [0.7]], device=device)
    got = fl.vec_dqn_scores(v, backend="triton")
    want = [sum(math.remainder(float(ang[a] - ang[i]), 2 * math.pi) for i in range(5)) for a in range(5)]
    assert torch.allclose(got.cpu(), torch.tensor(want), atol=2e-6)


def test_greedy_tie_breaks_to_lowest_index(device):
    # Two identical best vectors (actions 1 and 3): torch.argmax picks 1; so must the kernel.
    B, S, A, D = 1, 2, 4, 2
    target = torch.zeros(B, S, A, D, device=device)
    target[0, 1] = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [0.0, 1.0]], device=device)
    s = fl.vec_dqn_scores_reference(target[0, 1])
    assert s[1] == s[3] and int(s.argmax()) == 1
    online = torch.randn(B, S, A, D, device=device, requires_grad=True)
    step = {"action": torch.zeros(B, S, dtype=torch.long, device=device), "reward": torch.zeros(B, S, device=device)}
    lk, _ = fl.vec_dqn_loss(step, online, target, fl.VecDqnLossConfig(backend="triton"))
    lr, _ = fl.vec_dqn_loss(step, online, target, fl.VecDqnLossConfig(backend="torch"))
    assert torch.allclose(lk, lr, atol=1e-6)


SHAPES = {"B2-S2-A1-D2": (2, 2, 1, 2), "B3-S5-A6-D16": (3, 5, 6, 16), "B1-S3-A40-D130": (1, 3, 40, 130),
          "B2-S4-A18-D2": (2, 4, 18, 2)}


@pytest.mark.parametrize("norm", [False, True], ids=["raw-reward", "norm-reward"])
@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
def test_loss_and_gradient_match_reference(dtype, shape, norm, device):
    B, S, A, D = SHAPES[shape]
    if norm and S < 3:
        pytest.skip("reward std needs S >= 3")
    cfg = dict(normalize_reward_mean=norm, normalize_reward_std=norm, reward_scale=0.7, reward_shift=0.2)
    step, online, target = make_vec_dqn_inputs(B, S, A, D, dtype, device, argmax_margin=1e-3)
    # The kernel's own outputs, poisoned first.
    # [B, S-1], read at its strides: here column-major, the layout a plain [:, 1:] view does not have
    theta = transform_rewards(step["reward"][:, 1:].float(), fl.VecDqnLossConfig(**cfg)).t().contiguous().t()
    loss_buf, g_buf = nan_like((B * (S - 1),), torch.float32, device), nan_like((B * (S - 1), D), torch.float32, device)
    status_buf = torch.full((B * (S - 1),), 7, dtype=torch.int8, device=device)
    rows, g, status = K.vec_dqn_fwd(online.detach(), target, step["action"], theta, loss_out=loss_buf, g_out=g_buf,
                                    status_out=status_buf)
    assert_canaries_intact(loss_buf, g_buf)
    assert torch.isfinite(rows).all() and torch.isfinite(g).all()
    assert (status == 0).all(), status  # every action in range, every code written

    up = float(torch.empty(()).uniform_(0.5, 2.0))
    results = {}
    for name, backend, dt in (("kernel", "triton", dtype), ("ref", "torch", dtype), ("ref64", "torch", torch.float64)):
        o = online.detach().to(dt).requires_grad_(True)
        loss, metrics = fl.vec_dqn_loss(step, o, target.to(dt), fl.VecDqnLossConfig(backend=backend, **cfg))
        (grad,) = torch.autograd.grad(loss * up, o)
        results[name] = (loss, metrics, grad)
    k, r, r64 = results["kernel"], results["ref"], results["ref64"]
    assert k[2].dtype == dtype and k[0].dtype == torch.float32
    assert_close_to_float64(k[0], r[0], r64[0], dtype, "loss")
    assert_close_to_float64(k[2], r[2], r64[2], dtype, "gradient")
    for key in r[1]:
        assert_close_to_float64(torch.tensor(k[1][key]), torch.tensor(r[1][key]), torch.tensor(r64[1][key]), dtype, key)


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
def test_rope_rotate_kernel(dtype, device):
    x = torch.randn(4, 3, 10, device=device, dtype=dtype, requires_grad=True)
    theta = torch.randn(4, 3, device=device, requires_grad=True)
    up = torch.randn(4, 3, 10, device=device, dtype=dtype)
    outs = {}
    for backend in ("triton", "torch"):
        xx = x.detach().clone().requires_grad_(True)
        th = theta.detach().clone().requires_grad_(True)
        y = fl.rope_rotate(xx, th, backend=backend)
        y.backward(up)
        outs[backend] = (y.detach(), xx.grad, th.grad)
    x64 = x.detach().double().requires_grad_(True)
    t64 = theta.detach().double().requires_grad_(True)
    y64 = fl.rope_rotate(x64, t64, backend="torch")
    y64.backward(up.double())
    for i, want in enumerate((y64.detach(), x64.grad, t64.grad)):
        assert_close_to_float64(outs["triton"][i], outs["torch"][i], want, dtype, ["out", "grad x", "grad theta"][i])
    scalar = fl.rope_rotate(x.detach(), 0.4, backend="triton")
    assert_close_to_float64(scalar, fl.rope_rotate_reference(x.detach(), 0.4),
                            fl.rope_rotate_reference(x.detach().double(), 0.4), dtype, "scalar theta")


def test_bad_action_and_odd_d(device):
    step, online, target = make_vec_dqn_inputs(2, 4, 3, 4, device=device)
    step["action"][1, 2] = 3
    with pytest.raises(ValueError, match=r"\[0, A\)"):
        fl.vec_dqn_loss(step, online, target, fl.VecDqnLossConfig(backend="triton"))
    loss, lazy = fl.vec_dqn_loss(step, online, target, fl.VecDqnLossConfig(backend="triton", metrics_mode="lazy"))
    assert torch.isfinite(loss)
    with pytest.raises(ValueError, match=r"\[0, A\)"):
        lazy.check()
    # lazy mode computes with the action clamped to [0, A), as the reference does, and step 0 is never read
    step["action"][0, 1] = -5
    step["action"][1, 0] = 99
    online.requires_grad_(True)
    out = {}
    for backend in ("triton", "torch"):
        loss, lazy = fl.vec_dqn_loss(step, online, target, fl.VecDqnLossConfig(backend=backend, metrics_mode="lazy"))
        out[backend] = (loss, *torch.autograd.grad(loss, online))
        with pytest.raises(ValueError, match=r"\[0, A\)"):
            lazy.check()
    assert torch.allclose(out["triton"][0], out["torch"][0], rtol=1e-5) and torch.isfinite(out["triton"][1]).all()
    assert torch.allclose(out["triton"][1], out["torch"][1], rtol=1e-4, atol=1e-7)
    step["action"][0, 1] = step["action"][1, 2] = 0
    fl.vec_dqn_loss(step, online, target, fl.VecDqnLossConfig(backend="triton"))  # step 0's 99: not an error
    with pytest.raises(ValueError, match="even"):
        fl.vec_dqn_scores(torch.randn(3, 5), backend="triton")


@pytest.mark.cuda
@pytest.mark.parametrize("shape", [(256, 64, 18, 16), (64, 128, 128, 32), (64, 8, 512, 256)],
                         ids=lambda s: "B{}-S{}-A{}-D{}".format(*s))
def test_full_sizes_cuda(shape):
    B, S, A, D = shape
    step, online, target = make_vec_dqn_inputs(B, S, A, D, torch.float32, "cuda", seed=0, argmax_margin=1e-3)
    lk, mk = fl.vec_dqn_loss(step, online, target, fl.VecDqnLossConfig(backend="triton"))
    (gk,) = torch.autograd.grad(lk, online)
    lr, mr = fl.vec_dqn_loss(step, online, target, fl.VecDqnLossConfig(backend="torch"))
    (gr,) = torch.autograd.grad(lr, online)
    assert lk.item() == pytest.approx(lr.item(), rel=1e-5)
    assert torch.allclose(gk, gr, rtol=1e-4, atol=1e-9)
    assert mk["vec_dqn_score_abs_max"] == pytest.approx(mr["vec_dqn_score_abs_max"], rel=1e-5)
