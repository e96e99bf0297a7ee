"""LLM-scale distillation: generalized JSD (β), top-k teachers and the fused-linear loss, each
against a float64 dense computation, on both paths (the kernels under the interpreter on CPU)."""

import pytest
import torch

import fusedloss as fl
from fusedloss.testing import (assert_canaries_intact, assert_close_to_float64, make_sp_inputs, make_sp_linear_inputs,
                               make_topk_inputs, nan_like)

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
    rows, grad, _ = K.sp_fwd(q, z.detach(), "js", T, eps, max_block, loss_out=loss_buf, grad_out=grad_buf,
                             js_beta=beta)
    assert_canaries_intact(loss_buf, grad_buf)
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


# ---------------------------------------------------------------- top-k teacher

def make_topk(N, V, k, dtype=torch.float32, device="cpu", unused=0.3, seed=0):
    return make_topk_inputs(N, V, k, dtype, device, seed=seed, unused=unused)


def dense_topk(idx, logprob, z, loss_type, T):
    """The definition on dense float64 tensors: the teacher scattered over V (0 off its slots)."""
    N, V = z.shape
    used = idx >= 0
    x = torch.where(used, logprob.double() / T, torch.tensor(float("-inf"), dtype=torch.float64))
    p = torch.zeros(N, V, dtype=torch.float64)
    for r in range(N):
        if used[r].any():
            pr = torch.softmax(x[r][used[r]], -1)
            p[r, idx[r][used[r]]] = pr
    log_q = torch.log_softmax(z.double(), -1)
    log_p = torch.where(p > 0, p.log(), torch.zeros_like(p))
    if loss_type == "kl-fwd":
        return (p * (log_p - log_q)).sum(-1)
    return -(p * log_q).sum(-1)


@pytest.mark.parametrize("loss_type", ["kl-fwd", "ce-soft-fwd"])
def test_topk_reference_matches_dense_definition(loss_type):
    idx, lp, z = make_topk(6, 23, 5, torch.float64)
    got = fl.sp_topk_reference(idx, lp, z, loss_type, 0.7)
    z2 = z.detach().clone().requires_grad_(True)
    want = dense_topk(idx, lp, z2, loss_type, 0.7)
    assert torch.allclose(got, want, rtol=1e-12, atol=1e-13)
    assert got[2] == 0  # no used slot
    up = torch.randn(6, dtype=torch.float64)
    (g1,) = torch.autograd.grad((got * up).sum(), z)
    (g2,) = torch.autograd.grad((want * up).sum(), z2)
    assert torch.allclose(g1, g2, rtol=1e-10, atol=1e-13) and torch.all(g1[2] == 0)


def test_topk_with_every_slot_is_the_dense_loss():
    q, z = make_sp_inputs(4, 9, torch.float64)
    idx = torch.stack([torch.randperm(9) for _ in range(4)])
    for lt in ("kl-fwd", "ce-soft-fwd"):
        got = fl.sp_topk_loss(idx, q.gather(-1, idx), z, lt, 1.6, backend="torch", reduction="none")
        assert torch.allclose(got, fl.sp_reference(q, z, lt, 1.6), rtol=1e-12)


TOPK_SHAPES = {"N5-V37-k4": (5, 37, 4, 8192), "N3-V300-k9-tiled": (3, 300, 9, 64), "N1-V8-k8": (1, 8, 8, 8192)}


@pytest.mark.parametrize("shape", list(TOPK_SHAPES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("loss_type", ["kl-fwd", "ce-soft-fwd"])
def test_topk_kernel_matches_reference(loss_type, dtype, shape, device):
    pytest.importorskip("triton")
    from fusedloss.kernels import sp as K

    N, V, k, max_block = TOPK_SHAPES[shape]
    idx, lp, z = make_topk(N, V, k, dtype, device, unused=0.0 if k == V else 0.3)
    T = 1.3
    loss_buf, grad_buf = nan_like((N,), torch.float32, device), nan_like((N, V), dtype, device)
    rows, grad = K.sp_topk_fwd(idx, lp, z.detach(), loss_type, T, max_block, loss_out=loss_buf, grad_out=grad_buf)
    assert_canaries_intact(loss_buf, grad_buf)
    z64 = z.detach().double().requires_grad_(True)
    ref64 = fl.sp_topk_reference(idx, lp.double(), z64, loss_type, T)
    (g64,) = torch.autograd.grad(ref64.sum(), z64)
    ref = fl.sp_topk_reference(idx, lp, z, loss_type, T)
    (g_ref,) = torch.autograd.grad(ref.sum(), z)
    assert_close_to_float64(rows, ref, ref64, dtype, "row loss")
    assert_close_to_float64(grad, g_ref.to(dtype), g64, dtype, "gradient")


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_topk_public_paths_agree(reduction, device):
    pytest.importorskip("triton")
    idx, lp, z = make_topk(7, 50, 6, torch.float32, device)
    w = torch.rand(7, device=device)
    up = torch.randn(7, device=device) if reduction == "none" else torch.randn((), device=device)
    outs = {}
    for backend in ("triton", "torch"):
        zz = z.detach().clone().requires_grad_(True)
        loss = fl.sp_topk_loss(idx, lp, zz, "kl-fwd", 0.8, reduction=reduction, weight=w, backend=backend)
        (loss * up).sum().backward()
        outs[backend] = loss.detach(), zz.grad
    assert torch.allclose(outs["triton"][0], outs["torch"][0], rtol=1e-5, atol=1e-6)
    assert torch.allclose(outs["triton"][1], outs["torch"][1], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("case,match", [("out-of-range", r"outside \[0, V\)"), ("below-minus-one", r"outside \[0, V\)"),
                                        ("duplicate", "repeats an index"), ("nan", "NaN or \\+inf")])
def test_topk_data_errors(case, match, backend):
    if backend == "triton":
        pytest.importorskip("triton")
    idx, lp, z = make_topk(4, 20, 5)
    idx, lp = idx.clone(), lp.clone()
    if case == "out-of-range":
        idx[1, 0] = 20
    elif case == "below-minus-one":
        idx[1, 0] = -2
    elif case == "duplicate":
        idx[3, 1] = idx[3, 0] = 7
    else:
        lp[0, 0] = float("nan")  # slot 0 of row 0 is used
    with pytest.raises(ValueError, match=match):
        fl.sp_topk_loss(idx, lp, z, backend=backend)
    # without the check the call makes no sync and never reads out of bounds
    loss = fl.sp_topk_loss(idx, lp, z, backend=backend, check_inputs=False)
    assert loss.shape == ()


@pytest.mark.parametrize("args,exc,match", [
    (lambda i, l, z: (i.float(), l, z), TypeError, "teacher_index"),
    (lambda i, l, z: (i, l.long(), z), TypeError, "teacher_logprob"),
    (lambda i, l, z: (i[:-1], l[:-1], z), ValueError, r"teacher_index must have shape \[N, k\]"),
    (lambda i, l, z: (i, l[:, :-1], z), ValueError, "teacher_logprob must have the shape"),
    (lambda i, l, z: (i, l, z[0]), ValueError, r"logits must have shape \[N, V\]"),
])
def test_topk_shape_errors(args, exc, match):
    idx, lp, z = make_topk(4, 20, 5)
    with pytest.raises(exc, match=match):
        fl.sp_topk_loss(*args(idx, lp, z))
    with pytest.raises(ValueError, match="loss_type"):
        fl.sp_topk_loss(idx, lp, z, "js")


def test_topk_module_from_registry():
    idx, lp, z = make_topk(5, 30, 4)
    m = fl.build_loss({"type": "sp_topk", "params": {"loss_type": "ce-soft-fwd", "temperature": 2.0,
                                                     "backend": "torch"}})
    assert torch.allclose(m(idx, lp, z), fl.sp_topk_loss(idx, lp, z, "ce-soft-fwd", 2.0, backend="torch"))


# ---------------------------------------------------------------- fused linear

def _linear_case(kind, N, H, V, dtype, device, bias, seed=0):
    return make_sp_linear_inputs(N, H, V, kind, dtype, device, seed=seed, bias=bias)


def _materialised(hidden, weight, bias, teacher, loss_type, T, eps, beta, reduction, row_weight, dtype=None):
    """The materialised path: full logits, then the sp reference, in ``dtype`` (float64 when given)."""
    cast = (lambda t: t.to(dtype)) if dtype is not None else (lambda t: t)
    z = cast(hidden) @ cast(weight).T
    if bias is not None:
        z = z + cast(bias)
    if isinstance(teacher, fl.TopKTeacher):
        rows = fl.sp_topk_reference(teacher.index, cast(teacher.logprob), z, loss_type, T)
    else:
        if isinstance(teacher, fl.LinearTeacher):
            q = cast(teacher.hidden) @ cast(teacher.weight).T + cast(teacher.bias)
        else:
            q = cast(teacher)
        rows = fl.sp_reference(q, z, loss_type, T, eps, beta)
    rows = torch.where(row_weight == 0, torch.zeros_like(rows), rows * row_weight.to(rows.dtype))
    return rows.mean() if reduction == "mean" else rows.sum() if reduction == "sum" else rows


LINEAR_CASES = {
    "dense-kl-fwd": ("dense", "kl-fwd", 1.0, 0.0),
    "dense-ce-ls": ("dense", "ce", 1.0, 0.1),
    "dense-ce-soft-bwd-T": ("dense", "ce-soft-bwd", 1.7, 0.0),
    "dense-kl-bwd-T-ls": ("dense", "kl-bwd", 0.6, 0.05),
    "dense-js-beta": ("dense", "js", 1.3, 0.0),
    "dense-ce-soft-fwd": ("dense", "ce-soft-fwd", 2.0, 0.1),
    "topk-kl-fwd": ("topk", "kl-fwd", 1.4, 0.0),
    "topk-ce-soft-fwd": ("topk", "ce-soft-fwd", 1.0, 0.0),
    "linear-kl-fwd": ("linear", "kl-fwd", 1.0, 0.0),
    "linear-js": ("linear", "js", 0.8, 0.0),
}


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", list(LINEAR_CASES))
def test_linear_matches_float64(case, dtype, backend, device):
    if backend == "triton":
        pytest.importorskip("triton")
    kind, loss_type, T, eps = LINEAR_CASES[case]
    N, H, V = 7, 5, 37
    reduction = {"dense-ce-ls": "none", "topk-ce-soft-fwd": "sum"}.get(case, "mean")
    bias = case not in ("dense-kl-fwd", "topk-kl-fwd")
    hidden, weight, b, teacher, row_weight = _linear_case(kind, N, H, V, dtype, device, bias)
    beta = 0.3 if loss_type == "js" else 0.5
    leaves = [hidden, weight] + ([b] if bias else [])
    up = torch.randn(N if reduction == "none" else (), dtype=torch.float64).to(device)

    got = fl.sp_linear_loss(hidden, weight, teacher, loss_type, T, eps, beta, bias=b, reduction=reduction,
                            row_weight=row_weight, chunk_size=3, backend=backend)
    got_grads = torch.autograd.grad((got * up.to(got.dtype)).sum(), leaves)
    ref = _materialised(hidden, weight, b, teacher, loss_type, T, eps, beta, reduction, row_weight)
    ref_grads = torch.autograd.grad((ref * up.to(ref.dtype)).sum(), leaves)
    ref64 = _materialised(hidden, weight, b, teacher, loss_type, T, eps, beta, reduction, row_weight, torch.float64)
    ref64_grads = torch.autograd.grad((ref64 * up).sum(), leaves)

    assert got.dtype == torch.float32 and got.shape == ref.shape
    assert_close_to_float64(got, ref, ref64, dtype, "loss")
    for name, g, r, r64, leaf in zip(("hidden", "weight", "bias"), got_grads, ref_grads, ref64_grads, leaves):
        assert g.dtype == leaf.dtype
        assert_close_to_float64(g, r, r64, dtype, f"gradient of {name}")
    assert torch.all(got_grads[0][1] == 0)  # the row of weight 0 gets nothing


@pytest.mark.parametrize("chunk", [1, 2, 4, 7, 100])
def test_linear_chunk_sizes_agree(chunk):
    hidden, weight, b, teacher, row_weight = _linear_case("linear", 7, 4, 19, torch.float64, "cpu", True)
    out = fl.sp_linear_loss(hidden, weight, teacher, "kl-fwd", bias=b, row_weight=row_weight, chunk_size=chunk,
                            backend="torch")
    grads = torch.autograd.grad(out, [hidden, weight, b])
    ref = _materialised(hidden, weight, b, teacher, "kl-fwd", 1.0, 0.0, 0.5, "mean", row_weight)
    ref_grads = torch.autograd.grad(ref, [hidden, weight, b])
    assert torch.allclose(out, ref, rtol=1e-12)
    for g, r in zip(grads, ref_grads):
        assert torch.allclose(g, r, rtol=1e-10, atol=1e-13)


def test_linear_zero_weight_rows_never_leak_nan():
    hidden, weight, b, teacher, row_weight = _linear_case("dense", 6, 4, 11, torch.float32, "cpu", True)
    hidden = hidden.detach().clone()
    hidden[1] = float("nan")  # a padding row (row_weight[1] == 0) full of garbage
    hidden.requires_grad_(True)
    loss = fl.sp_linear_loss(hidden, weight, teacher, "kl-fwd", bias=b, row_weight=row_weight, chunk_size=4,
                             backend="torch")
    gh, gw, gb = torch.autograd.grad(loss, [hidden, weight, b])
    assert torch.isfinite(loss) and torch.isfinite(gw).all() and torch.isfinite(gb).all()
    assert torch.all(gh[1] == 0) and torch.isfinite(gh).all()


def test_linear_frozen_head_and_no_grad():
    hidden, weight, b, teacher, row_weight = _linear_case("dense", 6, 4, 11, torch.float64, "cpu", True)
    frozen = weight.detach()
    loss = fl.sp_linear_loss(hidden, frozen, teacher, "kl-fwd", bias=b, row_weight=row_weight, backend="torch")
    gh, gb = torch.autograd.grad(loss, [hidden, b])
    ref = _materialised(hidden, frozen, b, teacher, "kl-fwd", 1.0, 0.0, 0.5, "mean", row_weight)
    rh, rb = torch.autograd.grad(ref, [hidden, b])
    assert torch.allclose(gh, rh, rtol=1e-10) and torch.allclose(gb, rb, rtol=1e-10)
    with torch.no_grad():
        value = fl.sp_linear_loss(hidden, weight, teacher, "kl-fwd", bias=b, row_weight=row_weight, backend="torch")
    assert not value.requires_grad and torch.allclose(value, ref.detach(), rtol=1e-12)


def test_linear_double_backward_is_an_error():
    hidden, weight, b, teacher, _ = _linear_case("dense", 5, 4, 11, torch.float64, "cpu", True)
    loss = fl.sp_linear_loss(hidden, weight, teacher, "kl-fwd", bias=b, backend="torch")
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(loss, hidden, create_graph=True)


def test_linear_chunks_follow_the_free_memory(monkeypatch):
    """With little free device memory the default chunk shrinks (the loss does not change); an
    explicit chunk_size is kept."""
    from fusedloss.losses import sp_linear as m

    hidden, weight, b, teacher, _ = _linear_case("dense", 64, 4, 13, torch.float64, "cpu", True)
    want = fl.sp_linear_loss(hidden, weight, teacher, "kl-fwd", bias=b, backend="torch")
    seen, real = [], m._chunks
    monkeypatch.setattr(m, "_chunks", lambda N, chunk: seen.append(chunk) or real(N, chunk))
    monkeypatch.setattr(m, "free_device_memory", lambda device: 4 * m.CHUNK_BYTES_PER_LOGIT * 13 * 4)  # 4 rows
    got = fl.sp_linear_loss(hidden, weight, teacher, "kl-fwd", bias=b, backend="torch")
    assert seen and set(seen) == {4}, seen
    assert torch.allclose(got, want, rtol=1e-12, atol=0)
    seen.clear()
    fl.sp_linear_loss(hidden, weight, teacher, "kl-fwd", bias=b, backend="torch", chunk_size=16)
    assert set(seen) == {16}, seen


def test_linear_default_chunk_and_module():
    assert fl.losses.sp_linear.default_chunk_size(4096, 32768, 128) == 16
    assert fl.losses.sp_linear.default_chunk_size(8192, 128256, 4096) == 256
    assert fl.losses.sp_linear.default_chunk_size(3, 10, 100) == 3
    # a nearly full device: 256 rows of 128256 fp32 logits would need 512 MiB; 100 MiB free fits 8 rows
    assert fl.losses.sp_linear.default_chunk_size(8192, 128256, 4096, free_bytes=100 * 2**20) == 8
    assert fl.losses.sp_linear.default_chunk_size(8192, 128256, 4096, free_bytes=2**40) == 256
    assert fl.losses.sp_linear.default_chunk_size(8192, 128256, 4096, free_bytes=0) == 1
    assert fl.losses.sp_linear.free_device_memory(torch.device("cpu")) is None
    hidden, weight, b, teacher, row_weight = _linear_case("topk", 5, 4, 13, torch.float32, "cpu", True)
    m = fl.build_loss({"type": "sp_linear", "params": {"loss_type": "ce-soft-fwd", "chunk_size": 2, "backend": "torch"}})
    got = m(hidden, weight, teacher, bias=b, row_weight=row_weight)
    want = fl.sp_linear_loss(hidden, weight, teacher, "ce-soft-fwd", bias=b, row_weight=row_weight, backend="torch")
    assert torch.allclose(got, want)


@pytest.mark.parametrize("change,exc,match", [
    (lambda a: {**a, "weight": a["weight"][:, :-1]}, ValueError, r"weight must have shape \[V, H\]"),
    (lambda a: {**a, "bias": a["bias"][:-1]}, ValueError, r"bias must have shape \[V\]"),
    (lambda a: {**a, "teacher": a["teacher"][:, :-1]}, ValueError, r"dense teacher must have shape \[N, V\]"),
    (lambda a: {**a, "teacher": "logits"}, TypeError, "TopKTeacher"),
    (lambda a: {**a, "row_weight": a["row_weight"][:-1]}, ValueError, r"row_weight must have shape \[N\]"),
    (lambda a: {**a, "chunk_size": 0}, ValueError, "chunk_size"),
    (lambda a: {**a, "loss_type": "kl"}, ValueError, "loss_type"),
    (lambda a: {**a, "js_beta": 1.0}, ValueError, "js_beta"),
    (lambda a: {**a, "reduction": "avg"}, ValueError, "reduction"),
    (lambda a: {**a, "teacher": fl.TopKTeacher(torch.zeros(6, 2, dtype=torch.long), torch.zeros(6, 2)),
                "loss_type": "js"}, ValueError, "loss_type with a TopKTeacher must be one of"),
    (lambda a: {**a, "teacher": fl.LinearTeacher(torch.zeros(6, 3), torch.zeros(10, 3))}, ValueError,
     r"teacher.weight must have shape \[V, H_t\]"),
])
def test_linear_errors(change, exc, match):
    hidden, weight, b, teacher, row_weight = _linear_case("dense", 6, 4, 11, torch.float32, "cpu", True)
    args = {"hidden": hidden, "weight": weight, "teacher": teacher, "loss_type": "kl-fwd", "bias": b,
            "row_weight": row_weight, "chunk_size": None, "js_beta": 0.5, "reduction": "mean"}
    with pytest.raises(exc, match=match):
        fl.sp_linear_loss(**change(args))


def test_linear_peak_memory_is_a_fraction_of_the_materialised_path():
    """CPU profiler peak (torch's allocations, operator granularity), forward and backward, kl-fwd
    with a LinearTeacher: the fused-linear loss at most 15% of the materialised path's peak."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    from _common import _cpu_peak_bytes

    N, H, V = 512, 64, 4096
    hidden, weight, _, teacher, _ = _linear_case("linear", N, H, V, torch.float32, "cpu", False)

    def fused():
        loss = fl.sp_linear_loss(hidden, weight, teacher, "kl-fwd", backend="torch")
        torch.autograd.grad(loss, [hidden, weight])

    def materialised():
        z = hidden @ weight.T
        q = teacher.hidden @ teacher.weight.T + teacher.bias
        loss = fl.sp_reference(q, z, "kl-fwd").mean()
        torch.autograd.grad(loss, [hidden, weight])

    ratio = _cpu_peak_bytes(fused) / _cpu_peak_bytes(materialised)
    assert ratio <= 0.15, ratio


# ---------------------------------------------------------------- CUDA: full sizes, compile, memory

@pytest.mark.cuda
@pytest.mark.parametrize("shape", [(8192, 32768, 64), (2048, 131072, 100)], ids=lambda s: "N{}-V{}-k{}".format(*s))
def test_topk_full_sizes_cuda(shape):
    from fusedloss.kernels import sp as K

    N, V, k = shape
    idx, lp, z = make_topk(N, V, k, torch.bfloat16, "cuda", unused=0.2)
    rows, grad = K.sp_topk_fwd(idx, lp, z.detach(), "kl-fwd", 1.2)
    ref = fl.sp_topk_reference(idx, lp, z, "kl-fwd", 1.2)
    (g_ref,) = torch.autograd.grad(ref.sum(), z)
    z64 = z.detach().double().requires_grad_(True)
    ref64 = fl.sp_topk_reference(idx, lp.double(), z64, "kl-fwd", 1.2)
    (g64,) = torch.autograd.grad(ref64.sum(), z64)
    assert_close_to_float64(rows, ref.detach(), ref64.detach(), torch.bfloat16, "row loss")
    assert_close_to_float64(grad, g_ref.to(torch.bfloat16), g64, torch.bfloat16, "gradient")


@pytest.mark.cuda
def test_topk_compile_fullgraph_cuda():
    idx, lp, z = make_topk(64, 1000, 16, torch.bfloat16, "cuda")

    def step(idx, lp, z):
        return fl.sp_topk_loss(idx, lp, z, "kl-fwd", backend="triton", check_inputs=False)

    loss_c = torch.compile(step, fullgraph=True)(idx, lp, z)
    (g_c,) = torch.autograd.grad(loss_c, z)
    loss_e = step(idx, lp, z)
    (g_e,) = torch.autograd.grad(loss_e, z)
    assert torch.allclose(loss_c, loss_e) and torch.equal(g_c, g_e)


@pytest.mark.cuda
def test_linear_cuda_matches_and_saves_memory():
    """bf16 at a Llama-like width: the fused-linear js matches the materialised path against float64
    and its CUDA peak is at most 15% of the materialised one."""
    N, H, V = 2048, 512, 32000
    hidden, weight, _, teacher, row_weight = _linear_case("linear", N, H, V, torch.bfloat16, "cuda", False)

    def peak(fn):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        out = fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base, out

    def fused():
        loss = fl.sp_linear_loss(hidden, weight, teacher, "js", row_weight=row_weight, backend="triton",
                                 check_inputs=False)
        return loss.detach(), torch.autograd.grad(loss, [hidden, weight])

    def materialised(dtype=None):
        loss = _materialised(hidden, weight, None, teacher, "js", 1.0, 0.0, 0.5, "mean", row_weight, dtype)
        return loss.detach(), torch.autograd.grad(loss, [hidden, weight])

    p_fused, (loss, grads) = peak(fused)
    p_mat, (ref, ref_grads) = peak(materialised)
    ref64, ref64_grads = materialised(torch.float64)
    assert_close_to_float64(loss, ref, ref64, torch.bfloat16, "loss")
    for g, r, r64 in zip(grads, ref_grads, ref64_grads):
        assert_close_to_float64(g, r, r64, torch.bfloat16, "gradient")
    assert p_fused <= 0.15 * p_mat, (p_fused, p_mat)


def test_topk_and_linear_modules_from_yaml():
    yaml = pytest.importorskip("yaml")
    topk = fl.build_loss(yaml.safe_load("""
type: sp_topk
params: {loss_type: kl-fwd, temperature: 1.5, reduction: sum, backend: torch}
"""))
    linear = fl.build_loss(yaml.safe_load("""
type: sp_linear
params:
  loss_type: js
  js_beta: 0.25
  temperature: 2.0
  label_smoothing: 0.05
  chunk_size: 3
  backend: torch
"""))
    assert isinstance(topk, fl.SpTopKLoss) and isinstance(linear, fl.SpLinearLoss)
    idx, lp, z = make_topk(5, 30, 4)
    assert torch.allclose(topk(idx, lp, z), fl.sp_topk_loss(idx, lp, z, "kl-fwd", 1.5, reduction="sum",
                                                            backend="torch"))
    hidden, weight, b, teacher, row_weight = _linear_case("dense", 7, 4, 13, torch.float32, "cpu", True)
    got = linear(hidden, weight, teacher, bias=b, row_weight=row_weight)
    want = _materialised(hidden, weight, b, teacher, "js", 2.0, 0.05, 0.25, "mean", row_weight)
    assert torch.allclose(got, want, rtol=1e-5)
    with pytest.raises(ValueError, match="js_beta"):
        fl.build_loss({"type": "sp_linear", "params": {"js_beta": 0.0}})


@pytest.mark.parametrize("kind", ["dense", "topk", "linear"])
def test_a_head_shard_without_group_is_named(kind):
    """One rank's rows of a vocabulary-parallel head passed without group=, with a whole-vocabulary
    teacher: the error says to pass group= (a plain tensor cannot say it is a shard; the teacher's
    width, or the labels' range, can)."""
    hidden, weight, b, teacher, _ = _linear_case(kind, 6, 4, 13, torch.float32, "cpu", True)
    with pytest.raises(ValueError, match="shard of a vocabulary-parallel head, pass group="):
        fl.sp_linear_loss(hidden, weight[:5], teacher, "kl-fwd", bias=b[:5], backend="torch")
    labels = torch.tensor([0, 12, 3, 4, 1, 2])
    with pytest.raises(ValueError, match="a vocabulary-sharded head needs group="):
        fl.linear_cross_entropy(hidden, weight[:5], labels, backend="torch")
