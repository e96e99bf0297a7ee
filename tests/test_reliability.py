"""Regression tests for the faults the adversarial review found (issue 13), one or more per fault,
numbered as in the issue. Kernel paths run on CUDA when present, else under TRITON_INTERPRET=1."""

import threading

import pytest
import torch

import fusedloss as fl
from fusedloss.testing import assert_close_to_float64, make_dqn_inputs, make_sp_inputs, make_vec_dqn_inputs

triton = pytest.importorskip("triton")
BACKENDS = ["torch", "triton"]
SP_TYPES = ["ce", "ce-soft-fwd", "ce-soft-bwd", "kl-fwd", "kl-bwd", "js"]


def _grad(loss, x):
    (g,) = torch.autograd.grad(loss, x)
    return g


# 1. Sinkhorn with mixed dtypes is promoted to fp64, on every backend, never NaN.
@pytest.mark.parametrize("backend", ["tensorized", "online"])
def test_sinkhorn_mixed_dtypes_are_promoted(backend):
    g = torch.Generator().manual_seed(0)
    pa, ps = torch.randn(7, 2, generator=g), torch.randn(7, 3, generator=g)
    ta, ts = torch.randn(9, 2, generator=g).double(), torch.randn(9, 3, generator=g).double()
    mixed = fl.sinkhorn_loss(pa, ta, ps, ts, backend=backend, blur=0.5, scaling=0.8)
    want = fl.sinkhorn_loss(pa.double(), ta, ps.double(), ts, backend=backend, blur=0.5, scaling=0.8)
    assert mixed.dtype == torch.float64 and torch.isfinite(mixed)
    assert torch.allclose(mixed, want, rtol=1e-9, atol=1e-12)


# 2. Rows whose values are all below -1e30 (finfo.min padding) give the reference's answer.
@pytest.mark.parametrize("where", ["student", "teacher"])
@pytest.mark.parametrize("loss_type", SP_TYPES)
def test_sp_rows_of_huge_negative_values(loss_type, where, device):
    q, z = make_sp_inputs(3, 7, device=device, seed=1)
    lowest = torch.finfo(torch.float32).min
    if where == "student":
        z = z.detach().clone()
        z[1] = lowest
        z[2, :4] = -3e37
        z.requires_grad_(True)
    else:
        q = q.clone()
        q[1] = lowest
    out = {}
    for backend in BACKENDS:
        loss = fl.sp_loss({"q_star": q}, z, fl.SpLossConfig(loss_type=loss_type, backend=backend))[0]
        out[backend] = (loss.detach(), _grad(loss, z))
    z64 = z.detach().double().requires_grad_(True)
    loss64 = fl.sp_loss({"q_star": q.double()}, z64, fl.SpLossConfig(loss_type=loss_type, backend="torch"))[0]
    for i, ref64 in enumerate((loss64.detach(), _grad(loss64, z64))):
        assert torch.isfinite(out["triton"][i]).all()
        assert_close_to_float64(out["triton"][i], out["torch"][i], ref64, torch.float32)


def test_cql_logsumexp_of_values_below_minus_1e30(device):
    B, S, A = 2, 4, 5
    q = torch.full((B, S, A), -2e30, device=device)
    q[:, :, 2] = -1.5e30
    step = {"action": torch.full((B, S), 2, device=device), "reward": torch.zeros(B, S, device=device),
            "done": torch.zeros(B, S, dtype=torch.long, device=device)}
    out = {}
    for backend in BACKENDS + ["fp64"]:
        qq = (q.double() if backend == "fp64" else q).clone().requires_grad_(True)
        cfg = fl.DqnLossConfig(backend="torch" if backend == "fp64" else backend, gamma=1.0, cql_weight=0.5,
                               cql_scale_q_eps=1e-30)
        loss = fl.dqn_loss(step, {"dqn": qq, "dqn_target": qq.detach()}, cfg)[0]
        out[backend] = (loss.detach(), _grad(loss, qq))
    for i in range(2):
        assert torch.isfinite(out["triton"][i]).all()
        assert_close_to_float64(out["triton"][i], out["torch"][i], out["fp64"][i], torch.float32)


# 3. fp16: the unscaled gradient no longer overflows before the 1/count scaling.
def test_dqn_fp16_gradient_does_not_overflow(device):
    step, out = make_dqn_inputs(8, 9, 4, torch.float16, device, seed=2)
    q = (out["dqn"].detach().float() * 3e4).clamp(-6e4, 6e4).half().requires_grad_(True)
    qt = torch.zeros_like(q)
    grads = {}
    for backend in BACKENDS:
        loss = fl.dqn_loss(step, {"dqn": q, "dqn_target": qt}, fl.DqnLossConfig(backend=backend))[0]
        grads[backend] = _grad(loss, q)
    q64 = q.detach().double().requires_grad_(True)
    g64 = _grad(fl.dqn_loss(step, {"dqn": q64, "dqn_target": qt.double()}, fl.DqnLossConfig(backend="torch"))[0], q64)
    assert grads["triton"].dtype == torch.float16 and torch.isfinite(grads["triton"]).all()
    assert_close_to_float64(grads["triton"], grads["torch"], g64, torch.float16, "fp16 gradient")


def test_sp_fp16_gradient_does_not_overflow(device):
    N, A = 64, 6
    q = torch.zeros(N, A, device=device, dtype=torch.float16)
    q[:, 1:] = -6e4  # at T = 0.01, log p = -6e6 where the student puts mass: unscaled bwd gradients ~1e6
    z = torch.zeros(N, A, device=device, dtype=torch.float16, requires_grad=True)
    for loss_type in ("ce-soft-bwd", "kl-bwd"):
        cfg = lambda b: fl.SpLossConfig(loss_type=loss_type, temperature=0.01, backend=b)
        g_k = _grad(fl.sp_loss({"q_star": q}, z, cfg("triton"))[0], z)
        g_r = _grad(fl.sp_loss({"q_star": q}, z, cfg("torch"))[0], z)
        z64 = z.detach().double().requires_grad_(True)
        g64 = _grad(fl.sp_loss({"q_star": q.double()}, z64, cfg("torch"))[0], z64)
        assert torch.isfinite(g_k).all(), loss_type
        assert_close_to_float64(g_k, g_r, g64, torch.float16, loss_type)


# 4. The DQN kernel never drops a NaN.
@pytest.mark.parametrize("double", [False, True], ids=["max", "double"])
def test_dqn_nan_in_q_target_is_nan_out(double, device):
    step, out = make_dqn_inputs(2, 5, 4, device=device, seed=3)
    step["done"] = step["done"].clone()
    step["done"][1, 2] = 0  # running: the NaN bootstrap is read (a zero discount would not read it, issue 21)
    qt = out["dqn_target"].clone()
    qt[1, 2, :] = float("nan") if double else qt[1, 2, :]
    qt[1, 2, 3] = float("nan")
    for backend in BACKENDS:
        cfg = fl.DqnLossConfig(backend=backend, double_dqn=double, metrics_mode="lazy", return_td_error=True)
        loss, _, td = fl.dqn_loss(step, {"dqn": out["dqn"], "dqn_target": qt}, cfg)
        assert torch.isnan(loss), backend
        assert torch.isnan(td[1, 1]) and torch.isfinite(td[0]).all(), backend


def test_dqn_double_argmax_takes_the_first_nan_as_torch_does(device):
    step, out = make_dqn_inputs(2, 5, 6, device=device, seed=4)
    q = out["dqn"].detach().clone()
    q[0, 3, 4] = float("nan")  # q[t+1] picks action 4 for t = 2 on both paths; q_target there is finite
    losses = []
    for backend in BACKENDS:
        qq = q.clone().requires_grad_(True)
        cfg = fl.DqnLossConfig(backend=backend, double_dqn=True, metrics_mode="lazy", return_td_error=True)
        loss, _, td = fl.dqn_loss(step, {"dqn": qq, "dqn_target": out["dqn_target"]}, cfg)
        losses.append(td)
    assert torch.allclose(losses[0], losses[1], atol=1e-5, equal_nan=True)


def test_dqn_nan_in_untaken_q_with_cql_is_nan(device):
    step, out = make_dqn_inputs(2, 5, 4, device=device, seed=5)
    q = out["dqn"].detach().clone()
    a = int(step["action"][0, 2])
    q[0, 1, (a + 1) % 4] = float("nan")
    for backend in BACKENDS:
        qq = q.clone().requires_grad_(True)
        cfg = fl.DqnLossConfig(backend=backend, cql_weight=0.5, metrics_mode="lazy")
        loss, metrics = fl.dqn_loss(step, {"dqn": qq, "dqn_target": out["dqn_target"]}, cfg)
        g = _grad(loss, qq)
        assert torch.isnan(loss), backend
        assert torch.isnan(g[0, 1]).all(), backend  # the whole row's softmax is NaN
        assert torch.isfinite(g[1]).all() and torch.isfinite(g[0, 0]).all(), backend
        assert torch.isnan(metrics.tensors()["cql_penalty"]), backend


def test_dqn_nan_in_taken_q_reaches_min_max_metrics(device):
    step, out = make_dqn_inputs(2, 5, 4, device=device, seed=6)
    q = out["dqn"].detach().clone()
    q[1, 2, int(step["action"][1, 3])] = float("nan")
    for backend in BACKENDS:
        m = fl.dqn_loss(step, {"dqn": q, "dqn_target": out["dqn_target"]},
                        fl.DqnLossConfig(backend=backend, metrics_mode="lazy"))[1].tensors()
        for key in ("q_values_mean", "q_values_std", "q_values_min", "q_values_max", "dqn_loss"):
            assert torch.isnan(m[key]), (backend, key)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_dqn_masked_transitions_never_leak(bad, device):
    step, out = make_dqn_inputs(2, 5, 3, device=device, seed=15, weight=True, mask=True)
    step["mask"][:] = True
    step["mask"][1, 3:] = False  # transitions t = 2, 3 of sequence 1 are masked
    q, qt = out["dqn"].detach().clone(), out["dqn_target"].clone()
    q[1, 3, :] = bad
    qt[1, 4, :] = bad
    step["reward"][1, 4] = bad
    step["weight"][1, 4] = bad
    res = {}
    for backend in BACKENDS:
        qq = q.clone().requires_grad_(True)
        cfg = fl.DqnLossConfig(backend=backend, cql_weight=0.3, double_dqn=True, mask_key="mask", weight_key="weight",
                               normalize_reward_mean=True, metrics_mode="lazy")
        loss, metrics = fl.dqn_loss(step, {"dqn": qq, "dqn_target": qt}, cfg)
        g = _grad(loss, qq)
        assert torch.isfinite(loss) and torch.isfinite(g).all(), backend
        assert (g[1, 2:] == 0).all(), backend
        assert all(torch.isfinite(v) for v in metrics.tensors().values()), backend
        res[backend] = (loss, g)
    assert torch.allclose(res["triton"][0], res["torch"][0], rtol=1e-5)
    assert torch.allclose(res["triton"][1], res["torch"][1], rtol=1e-4, atol=1e-6)


# 5. Nothing outlives a DQN call (no counter, no global state): an interrupted launch leaves nothing
# behind, and calls from two threads give their one-thread results bit for bit.
def test_dqn_interrupted_launch_leaves_no_state(device, monkeypatch):
    if device != "cpu":
        pytest.skip("interrupting a launch midway needs the interpreter")
    from fusedloss.kernels import dqn as K

    step, out = make_dqn_inputs(5, 4, 3, device=device, seed=7)
    cfg = fl.DqnLossConfig(backend="triton", metrics_mode="lazy", cql_weight=0.1)
    want = fl.dqn_loss(step, out, cfg)
    real, calls = K._write_partials, []

    def interrupted(*args):
        calls.append(1)
        if len(calls) == 3:  # two programs have stored their partials
            raise KeyboardInterrupt
        return real(*args)

    monkeypatch.setattr(K, "_write_partials", interrupted)
    with pytest.raises(KeyboardInterrupt):
        fl.dqn_loss(step, out, cfg)
    monkeypatch.setattr(K, "_write_partials", real)
    got = fl.dqn_loss(step, out, cfg)
    assert torch.equal(got[0], want[0])
    assert all(torch.equal(got[1].tensors()[k], v) for k, v in want[1].tensors().items())


def test_dqn_two_threads(device):
    inputs = [make_dqn_inputs(6, 5, 3, device=device, seed=s) for s in (8, 9)]
    cfg = fl.DqnLossConfig(backend="triton", metrics_mode="lazy", cql_weight=0.1)
    want = [fl.dqn_loss(step, out, cfg)[0] for step, out in inputs]
    got, errors = [None, None], []

    def run(i):
        try:
            for _ in range(3):
                got[i] = fl.dqn_loss(*inputs[i], cfg)[0]
                assert torch.equal(got[i], want[i])
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors


# 6. Meta tensors: shape propagation where the metrics are lazy, a clear error otherwise, never a crash.
def test_meta_tensors():
    step, out = make_dqn_inputs(2, 4, 3)
    meta = lambda d: {k: v.detach().to("meta") for k, v in d.items()}
    loss, _ = fl.dqn_loss(meta(step), meta(out), fl.DqnLossConfig(metrics_mode="lazy"))
    assert loss.device.type == "meta" and loss.shape == ()
    with pytest.raises(ValueError, match="meta tensors.*metrics_mode='lazy'"):
        fl.dqn_loss(meta(step), meta(out))
    q, z = make_sp_inputs(3, 4)
    assert fl.sp_kl_loss(q.to("meta"), z.detach().to("meta"), 1.0, check_inputs=False).device.type == "meta"
    with pytest.raises(ValueError, match="meta tensors"):
        fl.sp_kl_loss(q.to("meta"), z.detach().to("meta"), 1.0)
    with pytest.raises(ValueError, match="meta tensors"):
        fl.sinkhorn_loss(*(torch.randn(5, 2, device="meta") for _ in range(4)))
    assert fl.router_z_loss(torch.randn(4, 3, device="meta")).device.type == "meta"
    assert fl.vec_dqn_scores(torch.randn(2, 3, 4, device="meta")).shape == (2, 3)
    with pytest.raises(RuntimeError, match="got meta"):
        fl.vec_dqn_scores(torch.randn(2, 3, 4, device="meta"), backend="triton")


# 7. vec-DQN's cosine clamps each norm as F.cosine_similarity does, value and gradient.
@pytest.mark.parametrize("scale", [1e-9, 1e-12, 0.0])
def test_vec_dqn_tiny_vectors_match_cosine_similarity(scale, device):
    step, online, target = make_vec_dqn_inputs(2, 3, 4, 6, device=device, seed=10, argmax_margin=1e-3)
    online = (online.detach() * scale).requires_grad_(True)
    res = {}
    for backend in BACKENDS:
        loss = fl.vec_dqn_loss(step, online, target, fl.VecDqnLossConfig(backend=backend))[0]
        res[backend] = (loss.detach(), _grad(loss, online))
    o64 = online.detach().double().requires_grad_(True)
    l64 = fl.vec_dqn_loss(step, o64, target.double(), fl.VecDqnLossConfig(backend="torch"))[0]
    for i, ref in enumerate((l64.detach(), _grad(l64, o64))):
        assert_close_to_float64(res["triton"][i], res["torch"][i], ref, torch.float32)


# 8. Masked tokens never reach the Switch loss, not even through 0·NaN.
@pytest.mark.parametrize("bad", [float("-inf"), float("nan")])
def test_switch_masked_tokens_do_not_reach_the_loss(bad):
    x = torch.randn(6, 4)
    mask = torch.tensor([True, False, True, True, False, True])
    xb = x.clone()
    xb[~mask] = bad
    xb.requires_grad_(True)
    loss = fl.switch_load_balancing_loss(xb, top_k=2, mask=mask)
    want = fl.switch_load_balancing_loss(x[mask], top_k=2)
    assert torch.allclose(loss, want)
    g = _grad(loss, xb)
    assert torch.isfinite(g).all() and (g[~mask] == 0).all()


# 9. sv: padded entries ignore the student logit entirely; the teacher gets no gradient.
def test_sv_padding_and_teacher_gradient():
    q = torch.tensor([[1.0, float("-inf"), 0.5]], requires_grad=True)
    z = torch.tensor([[0.5, float("-inf"), float("nan")]])
    z[0, 2] = 2.0
    z.requires_grad_(True)
    for loss_type in ("mse", "mae"):
        loss = fl.sv_loss({"q_star": q}, z, fl.SvLossConfig(loss_type=loss_type))[0]
        loss.backward()
        assert torch.isfinite(loss) and torch.isfinite(z.grad).all() and z.grad[0, 1] == 0
        assert q.grad is None
        z.grad = None


# 10. Config fields are type-checked on construction and again when a loss runs.
def test_config_types():
    with pytest.raises(TypeError, match=r"double_dqn must be a bool.*'false'"):
        fl.DqnLossConfig(double_dqn="false")
    with pytest.raises(TypeError, match=r"cql_weight must be a number.*YAML"):
        fl.DqnLossConfig(cql_weight="1e-3")
    with pytest.raises(TypeError, match="temperature must be a number"):
        fl.SpLossConfig(temperature="2")
    with pytest.raises(TypeError, match="blur must be a number"):
        fl.build_loss({"type": "sinkhorn_knopp", "params": {"blur": "0.1"}})
    with pytest.raises(TypeError, match="normalize_reward_mean must be a bool"):
        fl.build_loss({"type": "vec_dqn", "params": {"normalize_reward_mean": 1}})
    assert fl.DqnLossConfig(gamma=1, cql_weight=0).gamma == 1  # ints are numbers
    # A config mutated after construction is checked at the assignment, before any loss uses it.
    cfg = fl.DqnLossConfig()
    with pytest.raises(TypeError, match="double_dqn"):
        cfg.double_dqn = "no"
    module = fl.build_loss({"type": "sp", "params": {}})
    with pytest.raises(ValueError, match="temperature"):
        module.cfg.temperature = -1.0
    assert module.cfg.temperature == 1.0
    with pytest.raises(TypeError, match="cfg must be a DqnLossConfig"):
        fl.dqn_loss(*make_dqn_inputs(2, 4, 3), {"gamma": 0.9})


# 11. vec-DQN: a NaN or inf target vector gives a NaN transition on both paths, and never crashes.
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_vec_dqn_nonfinite_target_vectors(bad, device):
    step, online, target = make_vec_dqn_inputs(2, 3, 4, 4, device=device, seed=11, argmax_margin=1e-3)
    target = target.clone()
    target[1, 2, 3, 1] = bad  # transition (b=1, t=1)
    res = {}
    for backend in BACKENDS:
        rows_loss = fl.vec_dqn_loss(step, online, target, fl.VecDqnLossConfig(backend=backend, metrics_mode="lazy"))[0]
        res[backend] = (rows_loss, _grad(rows_loss, online))
    for backend, (loss, g) in res.items():
        assert torch.isnan(loss), backend
        a = int(step["action"][1, 2])
        assert torch.isnan(g[1, 1, a]).all() and torch.isfinite(g[0]).all(), backend


# 12. Small inconsistencies.
def test_done_just_off_one_is_rejected_on_both_paths(device):
    step, out = make_dqn_inputs(2, 4, 3, device=device, seed=12)
    step["done"] = step["done"].double()
    step["done"][0, 2] = 1 + 1e-12
    for backend in BACKENDS:
        with pytest.raises(ValueError, match="done"):
            fl.dqn_loss(step, out, fl.DqnLossConfig(backend=backend))


def test_importance_weights_get_no_gradient(device):
    step, out = make_dqn_inputs(2, 4, 3, device=device, seed=13, weight=True)
    step["weight"].requires_grad_(True)
    for backend in BACKENDS:
        loss = fl.dqn_loss(step, out, fl.DqnLossConfig(backend=backend, weight_key="weight"))[0]
        g_q, g_w = torch.autograd.grad(loss, [out["dqn"], step["weight"]], allow_unused=True)
        assert g_q is not None and g_w is None, backend


@pytest.mark.parametrize("family", ["sp", "dqn", "vec_dqn"])
def test_double_backward_and_func_grad_raise_clearly(family, device):
    if family == "sp":
        q, z = make_sp_inputs(3, 5, device=device)
        call = lambda x: fl.sp_kl_loss(q, x, 1.0, backend="triton", check_inputs=False)
        x = z
    elif family == "dqn":
        step, out = make_dqn_inputs(2, 4, 3, device=device)
        call = lambda x: fl.dqn_loss(step, {"dqn": x, "dqn_target": out["dqn_target"]},
                                     fl.DqnLossConfig(backend="triton", metrics_mode="lazy"))[0]
        x = out["dqn"]
    else:
        step, online, target = make_vec_dqn_inputs(2, 3, 4, 4, device=device)
        call = lambda x: fl.vec_dqn_loss(step, x, target, fl.VecDqnLossConfig(backend="triton",
                                                                               metrics_mode="lazy"))[0]
        x = online
    (g,) = torch.autograd.grad(call(x), x, create_graph=True)
    with pytest.raises(RuntimeError, match=f"double backward through the fused {family} kernel is not supported"):
        g.sum().backward()
    with pytest.raises(RuntimeError, match="torch.func gradient transforms"):
        torch.func.grad(call)(x.detach())


@pytest.mark.parametrize("backend", BACKENDS)
def test_rope_theta_shapes_agree(backend):
    x = torch.randn(4, 6)
    with pytest.raises(ValueError, match=r"theta must broadcast to x.shape\[:-1\]"):
        fl.rope_rotate(x, torch.randn(3, 4), backend=backend)
    assert fl.rope_rotate(x, torch.randn(1), backend=backend).shape == x.shape
    assert fl.rope_rotate(torch.randn(0, 6), 0.3, backend=backend).shape == (0, 6)


@pytest.mark.parametrize("shape", [(2, 0, 4), (0, 3, 4)])
def test_scores_of_empty_inputs(shape):
    for backend in BACKENDS:
        out = fl.vec_dqn_scores(torch.randn(shape), backend=backend)
        assert out.shape == shape[:-1] and out.dtype == torch.float32


def test_device_mismatch_names_the_arguments():
    step, out = make_dqn_inputs(2, 4, 3)
    with pytest.raises(ValueError, match=r"one device.*out\['dqn'\] on cpu.*out\['dqn_target'\] on meta"):
        fl.dqn_loss(step, {"dqn": out["dqn"], "dqn_target": out["dqn_target"].to("meta")})
    q, z = make_sp_inputs(3, 4)
    with pytest.raises(ValueError, match="q_targets on meta, logits on cpu"):
        fl.sp_js_loss(q.to("meta"), z, 1.0)
    with pytest.raises(ValueError, match="one device"):
        fl.sinkhorn_loss(torch.randn(4, 2), torch.randn(4, 2, device="meta"), torch.randn(4, 1), torch.randn(4, 1))
    with pytest.raises(ValueError, match="router_logits on cpu, mask on meta"):
        fl.switch_load_balancing_loss(torch.randn(4, 3), mask=torch.ones(4, dtype=torch.bool, device="meta"))


# 13. The reference itself is numerically safe.
@pytest.mark.parametrize("loss_type", SP_TYPES)
def test_sp_huge_logits_give_no_nan(loss_type, device):
    z = torch.tensor([[3e38, 0.0, -3e38], [1.0, 2.0, 3.0]], device=device, requires_grad=True)
    q = torch.tensor([[1.0, 0.0, 2.0], [0.0, 1.0, 0.5]], device=device)
    for backend in BACKENDS:
        loss = fl.sp_loss({"q_star": q}, z, fl.SpLossConfig(loss_type=loss_type, backend=backend))[0]
        g = _grad(loss, z)
        assert not torch.isnan(loss) and not torch.isnan(g).any(), backend


def test_q_values_std_of_large_q():
    step, out = make_dqn_inputs(3, 6, 4, seed=14)
    q = out["dqn"].detach() * 1e20
    m = fl.dqn_loss(step, {"dqn": q, "dqn_target": out["dqn_target"]}, fl.DqnLossConfig(backend="torch"))[1]
    m64 = fl.dqn_loss(step, {"dqn": q.double(), "dqn_target": out["dqn_target"].double()},
                      fl.DqnLossConfig(backend="torch"))[1]
    for key in ("q_values_mean", "q_values_std"):
        assert m[key] == pytest.approx(m64[key], rel=1e-5)
