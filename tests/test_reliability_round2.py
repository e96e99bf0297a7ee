"""Regression tests for the faults of issue 21 (reliability, round 2), numbered as in the issue.
Each failed before its fix. Kernel paths run on CUDA when present, else under TRITON_INTERPRET=1."""

import copy
import math

import pytest
import torch

import fusedloss as fl
from fusedloss.testing import assert_close_to_float64, make_dqn_inputs, make_sp_inputs, make_topk_inputs

triton = pytest.importorskip("triton")
BACKENDS = ["torch", "triton"]


def _grad(loss, x):
    (g,) = torch.autograd.grad(loss, x)
    return g


# 1. The fp16 weight gradient of sp_linear_loss is summed in fp32: no overflow before the 1/N.
@pytest.mark.parametrize("backend", BACKENDS)
def test_sp_linear_fp16_weight_gradient_does_not_overflow(backend, device):
    N, H, V = 2048, 64, 16
    g = torch.Generator().manual_seed(0)
    hidden = (40.0 + torch.randn(N, H, generator=g)).to(device)
    weight = (0.01 * torch.randn(V, H, generator=g)).to(device)
    teacher = torch.zeros((N, V), device=device)
    teacher[:, 3] = 40.0  # one-hot: every row's teacher on action 3
    grads = {}
    for dtype in (torch.float16, torch.float64):
        w = weight.to(dtype).requires_grad_(True)
        b = "torch" if dtype == torch.float64 else backend
        loss = fl.sp_linear_loss(hidden.to(dtype), w, teacher.to(dtype), "kl-fwd", backend=b)  # one chunk of 2048 rows
        grads[dtype] = _grad(loss, w)
    g16, g64 = grads[torch.float16].double(), grads[torch.float64]
    assert torch.isfinite(g16).all()
    assert float(g64.abs().max()) > 1.0  # the case is the issue's: a gradient of about -37
    assert float((g16 - g64).abs().max()) <= 2e-3 * float(g64.abs().max())


# 2. A TopKTeacher with label smoothing raises: where the smoothing mass goes is undefined.
def test_sp_linear_topk_teacher_rejects_label_smoothing():
    hidden, weight, _, teacher, _ = fl.testing.make_sp_linear_inputs(6, 4, 20, "topk", seed=0)
    with pytest.raises(ValueError, match="label_smoothing must be 0 with a TopKTeacher"):
        fl.sp_linear_loss(hidden, weight, teacher, "kl-fwd", label_smoothing=0.3)


# 3. NaN or +inf teacher log-probabilities at a used slot, unchecked: NaN out, on both paths.
@pytest.mark.parametrize("special", ["nan", "inf"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_sp_topk_unchecked_non_finite_teacher_gives_nan(special, backend, device):
    idx, lp, z = make_topk_inputs(4, 30, 5, device=device, seed=3)
    lp = lp.clone()
    lp[1, 2] = float(special)
    rows = fl.sp_topk_loss(idx, lp, z, reduction="none", backend=backend, check_inputs=False)
    assert torch.isnan(rows[1]) and torch.isfinite(rows[[0, 2, 3]]).all()
    g = _grad(rows.sum(), z)
    assert torch.isnan(g[1]).all() and torch.isfinite(g[[0, 2, 3]]).all()
    # A NaN at an unused slot is never read.
    lp2, idx2 = lp.clone(), idx.clone()
    lp2[1, 2], idx2[1, 2] = float(special), -1
    assert torch.isfinite(fl.sp_topk_loss(idx2, lp2, z, backend=backend, check_inputs=False))


# 6. A repeated top-k index (unchecked): each slot is a term, and the gradient sums them, on both paths.
@pytest.mark.parametrize("backend", BACKENDS)
def test_sp_topk_duplicate_index_gradient(backend, device):
    idx, lp, z = make_topk_inputs(3, 9, 3, dtype=torch.float64 if backend == "torch" else torch.float32,
                                  device=device, seed=4)
    idx = idx.clone()
    idx[0] = torch.tensor([1, 1, 4])
    got = _grad(fl.sp_topk_loss(idx, lp, z, backend=backend, check_inputs=False), z)
    z64 = z.detach().double()

    def f(x):
        return fl.sp_topk_loss(idx, lp.double(), x, backend="torch", check_inputs=False)

    h = 1e-6
    e = torch.zeros_like(z64)
    e[0, 1] = h
    central = (f(z64 + e) - f(z64 - e)) / (2 * h)
    assert abs(float(got[0, 1]) - float(central)) < 1e-5
    want = _grad(f(z64.requires_grad_(True)), z64)
    assert_close_to_float64(got, got if backend == "torch" else want.float(), want, got.dtype, "gradient")


# 7. reduction="none": backward re-reads the teacher, so changing it in place in between raises.
@pytest.mark.parametrize("kind", ["dense", "topk", "linear"])
def test_sp_linear_none_detects_teacher_modified_in_place(kind):
    hidden, weight, _, teacher, _ = fl.testing.make_sp_linear_inputs(6, 4, 20, kind, seed=1)
    rows = fl.sp_linear_loss(hidden, weight, teacher, "kl-fwd", reduction="none", backend="torch")
    with torch.no_grad():
        {"dense": lambda: teacher, "topk": lambda: teacher.logprob, "linear": lambda: teacher.hidden}[kind]().mul_(-3)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        rows.sum().backward()


# 8. The top-k temperature scales differences from the row max, not the values.
@pytest.mark.parametrize("backend", BACKENDS)
def test_sp_topk_temperature_of_huge_negative_values(backend, device):
    z = torch.randn(1, 6, generator=torch.Generator().manual_seed(5)).to(device)
    idx = torch.tensor([[0, 3, 5]], device=device)
    lp = torch.tensor([[-3e38, -3.2e38, -3.3e38]], device=device)
    shifted = fl.sp_topk_loss(idx, lp + 3e38, z, temperature=0.5, backend=backend)
    huge = fl.sp_topk_loss(idx, lp, z, temperature=0.5, backend=backend)
    assert torch.isfinite(huge) and float(huge) > 1.0
    assert abs(float(huge) - float(shifted)) <= 1e-5 * abs(float(shifted))


# 10. A temperature so small that 1/T overflows fp32 gives the one-hot teacher, not NaN.
@pytest.mark.parametrize("loss_type", ["kl-fwd", "ce-soft-fwd", "js"])
def test_sp_tiny_temperature(loss_type, device):
    q, z = make_sp_inputs(4, 9, device=device, seed=6)
    out = {b: fl.sp_loss({"q_star": q}, z, fl.SpLossConfig(loss_type=loss_type, temperature=1e-39, backend=b))[0]
           .detach() for b in BACKENDS}
    assert torch.isfinite(out["triton"])
    assert abs(float(out["triton"]) - float(out["torch"])) <= 1e-5 * max(1.0, abs(float(out["torch"])))
    idx, lp, zt = make_topk_inputs(4, 12, 4, device=device, seed=7)
    topk = {b: fl.sp_topk_loss(idx, lp, zt, temperature=1e-39, backend=b).detach() for b in BACKENDS}
    assert torch.isfinite(topk["triton"])
    assert abs(float(topk["triton"]) - float(topk["torch"])) <= 1e-5 * max(1.0, abs(float(topk["torch"])))
    # Below fp32's smallest subnormal (T rounds to 0 in fp32): still the one-hot limit, on both paths.
    for b in BACKENDS:
        tiny = fl.sp_loss({"q_star": q}, z, fl.SpLossConfig(loss_type=loss_type, temperature=1e-46, backend=b))[0]
        assert float(tiny.detach()) == pytest.approx(float(out["torch"]), rel=1e-5, abs=1e-6)
        tiny = fl.sp_topk_loss(idx, lp, zt, temperature=1e-46, backend=b)
        assert float(tiny.detach()) == pytest.approx(float(topk["torch"]), rel=1e-5, abs=1e-6)


# 15. Unsigned index tensors cannot hold -1 (an unused slot): rejected up front, not a false range error.
def test_topk_unsigned_index_is_rejected():
    idx, lp, z = make_topk_inputs(3, 20, 4, seed=8)
    with pytest.raises(TypeError, match="signed integer tensor"):
        fl.sp_topk_loss(idx.to(torch.uint8), lp, z)
    hidden, weight, _, _, _ = fl.testing.make_sp_linear_inputs(3, 4, 20, "dense", seed=8)
    with pytest.raises(TypeError, match="signed integer tensor"):
        fl.sp_linear_loss(hidden, weight, fl.TopKTeacher(idx.to(torch.uint8), lp), "kl-fwd")


# 16. sp_linear_loss frees its gradient buffers in backward; a second backward raises.
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_sp_linear_second_backward_raises(reduction):
    hidden, weight, _, teacher, _ = fl.testing.make_sp_linear_inputs(6, 4, 20, "linear", seed=2)
    loss = fl.sp_linear_loss(hidden, weight, teacher, "kl-fwd", reduction=reduction, backend="torch").sum()
    loss.backward()
    with pytest.raises(RuntimeError, match="backward through the graph a second time"):
        loss.backward()


def test_sp_linear_frees_saved_buffers_after_backward():
    hidden, weight, _, teacher, _ = fl.testing.make_sp_linear_inputs(6, 4, 20, "linear", seed=2)
    loss = fl.sp_linear_loss(hidden, weight, teacher, "kl-fwd", backend="torch")
    assert any(t is not None and t.shape == weight.shape for t in loss.grad_fn.saved_tensors)
    loss.backward()
    with pytest.raises(RuntimeError, match="freed"):
        loss.grad_fn.saved_tensors


# 17. Clear errors: a LinearTeacher of mixed dtypes names the teacher.
def test_linear_teacher_mixed_dtypes_error():
    hidden, weight, _, t, _ = fl.testing.make_sp_linear_inputs(3, 4, 20, "linear", seed=9)
    with pytest.raises(TypeError, match="LinearTeacher's hidden, weight and bias must share a dtype"):
        fl.sp_linear_loss(hidden, weight, fl.LinearTeacher(t.hidden, t.weight.bfloat16(), t.bias), "kl-fwd")


def _dqn_case(device, S=5, **step_changes):
    step, out = make_dqn_inputs(2, S, 4, torch.float32, device, seed=11)
    step = {**step, **step_changes}
    return step, out


def _dqn(step, q, q_target, backend, **cfg):
    return fl.dqn_loss(step, {"dqn": q, "dqn_target": q_target}, fl.DqnLossConfig(backend=backend, **cfg))


MULTI = [{}, {"n_step": 3}, {"td_lambda": 0.9}, {"td_lambda": 1.0}, {"td_lambda": 0.0, "double_dqn": True},
         {"double_dqn": True}, {"n_step": 3, "value_rescaling": True}]


# 4. A zero discount never reads its bootstrap: -inf (all actions illegal after a terminal) gives r alone.
@pytest.mark.parametrize("opts", MULTI, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "one-step")
@pytest.mark.parametrize("backend", BACKENDS)
def test_dqn_zero_discount_ignores_infinite_bootstrap(opts, backend, device):
    step, out = _dqn_case(device)
    done = torch.zeros_like(step["done"])
    done[0, 2] = 1  # terminal at step 2: gamma_terminal = 0 discounts V[2]
    step["done"] = done
    q = out["dqn"]
    finite_t = out["dqn_target"].clone()
    inf_t = finite_t.clone()
    inf_t[0, 2, :] = float("-inf")
    finite_t[0, 2, :] = 123.0  # any value: it must not be read
    loss_inf, m_inf = _dqn(step, q, inf_t, backend, **opts)
    loss_fin, m_fin = _dqn(step, q, finite_t, backend, **opts)
    assert torch.isfinite(loss_inf)
    assert float(loss_inf.detach()) == pytest.approx(float(loss_fin.detach()), rel=1e-6)
    assert torch.equal(_grad(loss_inf, q), _grad(loss_fin, q))
    assert m_inf == pytest.approx(m_fin, rel=1e-6)


# 5. Reward-std normalisation and the q std metric scale before squaring: no overflow near 1e20.
@pytest.mark.parametrize("backend", BACKENDS)
def test_dqn_reward_std_of_huge_rewards(backend, device):
    step, out = _dqn_case(device, S=9)
    step["reward"] = step["reward"] * 2e19
    step["mask"] = torch.ones_like(step["done"], dtype=torch.bool)
    opts = dict(normalize_reward_mean=True, normalize_reward_std=True, gamma=0.9)
    want = _dqn(step, out["dqn"], out["dqn_target"], "torch", **opts)[0]  # unmasked reference: right already
    masked = _dqn(step, out["dqn"], out["dqn_target"], backend, mask_key="mask", **opts)[0]
    plain = _dqn(step, out["dqn"], out["dqn_target"], backend, **opts)[0]
    for got in (masked, plain):
        assert float(got.detach()) == pytest.approx(float(want.detach()), rel=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_dqn_q_std_metric_of_huge_values(backend, device):
    step, out = _dqn_case(device, S=9)
    q = (out["dqn"].detach() * 1e20).requires_grad_(True)
    m = _dqn(step, q, out["dqn_target"] * 1e20, backend, gamma=0.0)[1]
    want = _dqn(step, q.double(), out["dqn_target"].double() * 1e20, "torch", gamma=0.0)[1]
    assert math.isfinite(m["q_values_std"]) and m["q_values_std"] > 1e19
    assert m["q_values_std"] == pytest.approx(want["q_values_std"], rel=1e-5)
    assert m["q_values_mean"] == pytest.approx(want["q_values_mean"], rel=1e-4, abs=1e14)


@pytest.mark.parametrize("backend", BACKENDS)
def test_dqn_q_mean_metric_near_the_fp32_range(backend, device):
    """Means of q near +-2e38 are combined in units of the largest |q|: no count·mean or
    x - mean overflows (the lanes, the sequences, and the batch)."""
    step, out = _dqn_case(device, S=9)
    sign = torch.where(torch.arange(9, device=device) % 3 == 0, -1.0, 1.0)
    for q in (torch.full_like(out["dqn"], 2e38), 2e38 * sign[None, :, None].expand_as(out["dqn"]).contiguous()):
        m = _dqn(step, q, out["dqn_target"], backend, gamma=0.0)[1]
        want = _dqn(step, q.double(), out["dqn_target"].double(), "torch", gamma=0.0)[1]
        for name in ("q_values_mean", "q_values_std"):
            assert math.isfinite(m[name]), name
            assert m[name] == pytest.approx(want[name], rel=1e-5, abs=1e-6 * 2e38), name


# The lambda-return's scan cuts only at a zero per-step coefficient: a product of small discounts
# that underflows in fp32 still carries a -inf bootstrap, as the step-by-step recurrence does.
# S = 100 crosses the kernel's 64-step chunks, so the carry between chunks is tested too (its product
# over the 35 steps of the second chunk underflows). At S = 20 only the GPU's tree scan composes products
# within a chunk; the interpreter's scan is sequential.
@pytest.mark.parametrize("S", [20, 100])
@pytest.mark.parametrize("backend", BACKENDS)
def test_dqn_lambda_scan_product_underflow(S, backend, device):
    step, out = _dqn_case(device, S=S, done=torch.zeros(2, S, dtype=torch.int64, device=device))
    q_target = out["dqn_target"].clone()
    q_target[0, S - 2] = float("-inf")
    opts = dict(td_lambda=0.5, gamma=1e-6, return_td_error=True)
    td = _dqn(step, out["dqn"], q_target, backend, **opts)[2]
    want = _dqn(step, out["dqn"].double(), q_target.double(), "torch", **opts)[2]  # no fp64 underflow at S=20
    assert torch.isinf(want[0, : S - 2]).all()  # every G[t] before it: lambda·gamma > 0 at each step
    assert torch.equal(torch.isinf(td), torch.isinf(want))
    fin = torch.isfinite(want)
    assert torch.allclose(td[fin].double(), want[fin], rtol=1e-5, atol=1e-6)


# 11. sequence_priority: eta of 0 or 1 drops the other term (inf stays inf); fp16 rows sum in fp32.
def test_sequence_priority_edges(device):
    td = torch.tensor([[1.0, float("inf"), 2.0], [1.0, 2.0, 3.0]], device=device)
    assert torch.isinf(fl.sequence_priority(td, eta=0.0)[0]) and torch.isinf(fl.sequence_priority(td, eta=1.0)[0])
    assert float(fl.sequence_priority(td, eta=1.0)[1]) == 3.0 and float(fl.sequence_priority(td, eta=0.0)[1]) == 2.0
    big = torch.full((2, 300), 6e4, dtype=torch.float16, device=device)
    p = fl.sequence_priority(big, eta=0.9)
    assert p.dtype == torch.float16 and torch.isfinite(p).all()
    assert torch.allclose(p.float(), torch.full((2,), 6e4, device=device), rtol=1e-3)
    # Row counts past 256 are not bf16 numbers: the count is kept in fp32, so the mean is exact.
    td = torch.randn((64, 301), generator=torch.Generator().manual_seed(13)).to(device, torch.bfloat16)
    want = (0.3 * td.double().abs().amax(dim=1) + 0.7 * td.double().abs().mean(dim=1)).to(torch.bfloat16)
    for mask in (None, torch.ones_like(td, dtype=torch.bool)):
        assert torch.equal(fl.sequence_priority(td, mask, eta=0.3), want)


# 12. torch.compile(fullgraph=True) of dqn_loss with lazy metrics on the kernel path returns its metrics.
def test_dqn_lazy_metrics_compile_fullgraph(device):
    torch._dynamo.reset()
    step, out = _dqn_case(device, S=7)
    cfg = fl.DqnLossConfig(backend="triton", metrics_mode="lazy", cql_weight=0.1)
    loss_c, m_c = torch.compile(lambda s, o: fl.dqn_loss(s, o, cfg), fullgraph=True)(step, out)
    loss_e, m_e = fl.dqn_loss(step, out, cfg)
    assert torch.equal(loss_c, loss_e)
    assert dict(m_c) == dict(m_e)


# 13. Lazy metrics of the kernel path deep-copy, and hold no autograd graph.
def test_dqn_lazy_metrics_deepcopy(device):
    step, out = _dqn_case(device)
    _, m = fl.dqn_loss(step, out, fl.DqnLossConfig(backend="triton", metrics_mode="lazy"))
    assert all(t.grad_fn is None and not t.requires_grad for t in m.tensors().values())
    assert dict(copy.deepcopy(m)) == dict(m)


# 17. Clear errors, and no false ones.
def test_dqn_huge_n_step_on_the_kernel_path(device):
    step, out = _dqn_case(device, S=6)
    got = _dqn(step, out["dqn"], out["dqn_target"], "triton", n_step=10**20)
    want = _dqn(step, out["dqn"], out["dqn_target"], "torch", n_step=10**20)
    assert float(got[0].detach()) == pytest.approx(float(want[0].detach()), rel=1e-5)


def test_dqn_config_errors():
    with pytest.raises(ValueError, match="cql_weight must be a finite number"):
        fl.DqnLossConfig(cql_weight=float("inf"))
    step, out = make_dqn_inputs(2, 5, 3, seed=0)
    step["reward"] = torch.ones_like(step["reward"])
    with pytest.raises(ValueError, match="normalize_reward_eps must be > 0 with normalize_reward_std"):
        fl.dqn_loss(step, out, fl.DqnLossConfig(normalize_reward_std=True, normalize_reward_eps=0.0))


def test_float_metrics_under_fullgraph_name_lazy_metrics():
    torch._dynamo.reset()
    step, out = make_dqn_inputs(2, 5, 3, seed=0)
    f = torch.compile(lambda s, o: fl.dqn_loss(s, o, fl.DqnLossConfig(backend="torch")), fullgraph=True)
    with pytest.raises(Exception, match="metrics_mode='lazy'"):
        f(step, out)


# 18. The n-step window compiles once per n_step, whatever S; a long window loops and matches the reference.
def test_dqn_n_step_variants_do_not_grow_with_s():
    from fusedloss.kernels.dqn import MAX_UNROLL, n_step_window

    for n_step in (3, MAX_UNROLL, MAX_UNROLL + 1, 10**6):
        unrolls = {n_step_window(n_step, S)[1] for S in range(n_step + 2 if n_step < 100 else 3, 400)}
        assert len(unrolls) == 1
    assert n_step_window(5, 2) == (1, 1)  # one transition: the one-step target


@pytest.mark.parametrize("n_step", [20, 10**6])
def test_dqn_long_window_matches_reference(n_step, device):
    step, out = make_dqn_inputs(2, 23, 3, torch.float32, device, seed=12, mask=True)
    opts = dict(n_step=n_step, mask_key="mask", gamma=0.95, double_dqn=True)
    got = _dqn(step, out["dqn"], out["dqn_target"], "triton", **opts)[0]
    want = _dqn(step, out["dqn"], out["dqn_target"], "torch", **opts)[0]
    assert float(got.detach()) == pytest.approx(float(want.detach()), rel=1e-5)
    assert torch.allclose(_grad(got, out["dqn"]), _grad(want, out["dqn"]), rtol=1e-4, atol=1e-6)


def _jsd_mpmath(q, z, beta):
    """The generalized JSD of each row and its gradient in 50-digit arithmetic (the exact answer)."""
    import mpmath

    mpmath.mp.dps = 50
    losses, grads = [], []
    for qr, zr in zip(q.double().tolist(), z.double().tolist()):
        p = [mpmath.exp(mpmath.mpf(v)) for v in qr]
        s = [mpmath.exp(mpmath.mpf(v)) for v in zr]
        p = [x / sum(p) for x in p]
        s = [x / sum(s) for x in s]
        b = mpmath.mpf(beta)
        m = [b * pi + (1 - b) * si for pi, si in zip(p, s)]
        kq = sum(si * mpmath.log(si / mi) for si, mi in zip(s, m))
        losses.append(b * sum(pi * mpmath.log(pi / mi) for pi, mi in zip(p, m)) + (1 - b) * kq)
        grads.append([(1 - b) * si * (mpmath.log(si / mi) - kq) for si, mi in zip(s, m)])
    return torch.tensor([float(x) for x in losses]), torch.tensor([[float(x) for x in r] for r in grads])


# 9. The generalized JSD keeps its relative precision as beta -> 0 or 1, loss and gradient.
@pytest.mark.parametrize("beta", [1e-12, 1e-7, 1e-6, 1e-3, 0.5, 1 - 1e-6, 1 - 1e-9])
@pytest.mark.parametrize("backend", BACKENDS)
def test_js_beta_limits(beta, backend, device):
    q, z = make_sp_inputs(3, 7, device=device, seed=13)
    rows = fl.sp_js_loss(q, z, 1.0, beta=beta, reduction="none", backend=backend)
    g = _grad(rows.sum(), z)
    want, want_g = _jsd_mpmath(q.cpu(), z.detach().cpu(), beta)
    rel = ((rows.detach().double().cpu() - want.double()).abs() / want.double().abs()).max()
    assert float(rel) < 2e-6, f"relative loss error {float(rel):.2e}"
    rel_g = (g.double().cpu() - want_g.double()).abs().max() / want_g.double().abs().max()
    assert float(rel_g) < 2e-6, f"relative gradient error {float(rel_g):.2e}"
