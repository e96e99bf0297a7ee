"""The fused sp kernel against the reference: CPU under TRITON_INTERPRET=1 in CI, CUDA on a GPU."""

import pytest
import torch

import fusedloss as fl
from fusedloss.testing import assert_canaries_intact, assert_close_to_float64, make_sp_inputs, nan_like

pytest.importorskip("triton")
from fusedloss.kernels import sp as K  # noqa: E402  (after conftest set TRITON_INTERPRET)

LOSS_TYPES = [code.loss_type for code in K.SpLossType]
DTYPES = [torch.float32, torch.bfloat16]
# (N, A, max_block): non-powers of two, a single row, the smallest A, rows longer than one tile.
SHAPES = {
    "N9-A7": (9, 7, K.MAX_BLOCK),
    "N1-A300-tiled": (1, 300, 64),
    "N5-A300": (5, 300, K.MAX_BLOCK),
    "N70-A2": (70, 2, K.MAX_BLOCK),
    "N4-A133-tiled": (4, 133, 32),
}
OPTIONS = {"plain": (1.0, 0.0, 0.0), "T1.7-ls0.1-pad": (1.7, 0.1, 0.25), "T0.5-pad": (0.5, 0.0, 0.4)}


def _rows_and_grad(q, z, lt, T, eps, backend_fn):
    rows = backend_fn(q, z)
    (g,) = torch.autograd.grad(rows.sum(), z)
    return rows.detach(), g


@pytest.mark.parametrize("opts", list(OPTIONS))
@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_kernel_matches_reference(loss_type, dtype, shape, opts, device):
    N, A, max_block = SHAPES[shape]
    T, eps, pad = OPTIONS[opts]
    q, z = make_sp_inputs(N, A, dtype, device, pad_frac=pad if A > 2 else 0.0)
    # Poisoned outputs: any element the kernel fails to write stays NaN and fails the comparison.
    loss_buf, grad_buf = nan_like((N,), torch.float32, device), nan_like((N, A), dtype, device)
    status_buf = torch.full((N,), -1, dtype=torch.int8, device=device)
    rows, grad, status = K.sp_fwd(q, z.detach(), loss_type, T, eps, max_block, loss_out=loss_buf, grad_out=grad_buf,
                                  status_out=status_buf)
    assert_canaries_intact(loss_buf, grad_buf)  # and nothing written past either end
    assert torch.equal(status, torch.zeros_like(status))  # every row written, and no teacher row is bad
    z64 = z.detach().double().requires_grad_(True)
    ref64, g64 = _rows_and_grad(q.double(), z64, loss_type, T, eps, lambda a, b: fl.sp_reference(a, b, loss_type, T, eps))
    ref, g_ref = _rows_and_grad(q, z, loss_type, T, eps, lambda a, b: fl.sp_reference(a, b, loss_type, T, eps))
    g_ref = g_ref.to(dtype)
    assert grad.dtype == dtype and rows.dtype == torch.float32
    assert_close_to_float64(rows, ref, ref64, dtype, "row loss")
    assert_close_to_float64(grad, g_ref, g64, dtype, "gradient")
    if pad:
        assert torch.all(grad[q == float("-inf")] == 0)


# (N, A): one row, a short tile, a row tile of 128 rows at A = 2, several row tiles with a partial last one.
MEAN_SHAPES = {"N1-A5": (1, 5), "N9-A7": (9, 7), "N70-A2": (70, 2), "N300-A18": (300, 18), "N130-A40": (130, 40)}


@pytest.mark.parametrize("shape", list(MEAN_SHAPES))
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("loss_type", ["kl-fwd", "ce-soft-bwd", "js"])
def test_mean_taken_in_the_kernel(loss_type, dtype, shape, device):
    """A few short rows: one program walks the row tiles and stores the mean times its factor (one
    launch, no aten mean); the gradient and the status codes are the per-row launch's, bit for bit."""
    N, A = MEAN_SHAPES[shape]
    assert K.mean_in_kernel(N, A, 0.7)
    q, z = make_sp_inputs(N, A, dtype, device, pad_frac=0.2 if A > 2 else 0.0, seed=5)
    mean_buf, grad_buf = nan_like((), torch.float32, device), nan_like((N, A), dtype, device)
    status_buf = torch.full((N,), -1, dtype=torch.int8, device=device)
    mean, grad, status = K.sp_fwd(q, z.detach(), loss_type, 1.3, 0.1, loss_out=mean_buf, grad_out=grad_buf,
                                  status_out=status_buf, mean_scale=0.7)
    assert_canaries_intact(mean_buf, grad_buf)
    rows, grad_rows, status_rows = K.sp_fwd(q, z.detach(), loss_type, 1.3, 0.1)
    assert torch.equal(grad, grad_rows) and torch.equal(status, status_rows)
    ref = fl.sp_reference(q, z.detach(), loss_type, 1.3, 0.1).mean() * 0.7
    ref64 = fl.sp_reference(q.double(), z.detach().double(), loss_type, 1.3, 0.1).mean() * 0.7
    assert mean.shape == () and mean.dtype == torch.float32
    assert_close_to_float64(mean, ref, ref64, dtype, "mean")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("N,A", [(1, 5), (37, 40), (512, 18)], ids=["N1-A5", "N37-A40", "N512-A18"])
@pytest.mark.parametrize("loss", ["kl", "js"])
def test_public_mean_through_the_kernel_with_random_upstream_gradient(loss, N, A, dtype, device):
    """sp_kl_loss / sp_js_loss with reduction='mean' and no weight take the in-kernel mean (512 rows
    of 18: its last tile), on rows at a stride wider than A, against float64, with a random upstream
    gradient."""
    q, z = make_sp_inputs(N, A + 3, dtype, device, pad_frac=0.2, seed=8)
    q, z = q[:, :A], z.detach()[:, :A]
    assert K.mean_in_kernel(N, A, 1.0) and z.stride(0) > A
    fn = {"kl": lambda a, b, **k: fl.sp_kl_loss(a, b, 1.3, **k),
          "js": lambda a, b, **k: fl.sp_js_loss(a, b, 1.3, 0.05, **k)}[loss]
    up = float(torch.empty(()).uniform_(-2.0, 2.0))
    outs = {}
    for name, backend, dt in (("kernel", "triton", dtype), ("ref", "torch", dtype), ("ref64", "torch", torch.float64)):
        zz = (z if dt == dtype else z.to(dt)).detach().requires_grad_(True)
        loss_value = fn(q.to(dt), zz, reduction="mean", backend=backend)
        (loss_value * up).backward()
        outs[name] = (loss_value.detach(), zz.grad)
    assert outs["kernel"][0].shape == ()
    assert_close_to_float64(outs["kernel"][0], outs["ref"][0], outs["ref64"][0], dtype, "loss")
    assert_close_to_float64(outs["kernel"][1], outs["ref"][1], outs["ref64"][1], dtype, "gradient")


def test_loss_out_must_fit_the_mean(device):
    q, z = make_sp_inputs(9, 7, torch.float32, device, seed=9)
    with pytest.raises(ValueError, match=r"loss_out must have shape \(\) \(the mean\)"):
        K.sp_fwd(q, z.detach(), "kl-fwd", 1.0, 0.0, loss_out=nan_like((9,), torch.float32, device), mean_scale=1.0)
    with pytest.raises(ValueError, match=r"loss_out must have shape \(9,\)"):
        K.sp_fwd(q, z.detach(), "kl-fwd", 1.0, 0.0, loss_out=nan_like((), torch.float32, device))


def test_mean_in_the_kernel_propagates_nan_and_knows_its_limits(device):
    q, z = make_sp_inputs(40, 18, torch.float32, device, seed=6)
    z = z.detach().clone()
    z[17, 3] = float("nan")
    mean, _, _ = K.sp_fwd(q, z, "kl-fwd", 1.0, 0.0, mean_scale=1.0)
    assert mean.shape == () and torch.isnan(mean)
    rows_per_tile = K._mean_rows(1, 18)
    assert K.mean_in_kernel(rows_per_tile * K.MEAN_TILES, 18, 1.0) and K.mean_in_kernel(4, 300, 1.0)
    assert not K.mean_in_kernel(rows_per_tile * K.MEAN_TILES + 1, 18, 1.0)  # more tiles than MEAN_TILES
    assert not K._mean_rows(4, 300, max_block=256)  # a row longer than one tile
    assert not K.mean_in_kernel(0, 18, 1.0) and not K.mean_in_kernel(8, 18, None)
    q, z = make_sp_inputs(rows_per_tile * K.MEAN_TILES + 1, 18, torch.float32, device, seed=7)
    rows, _, _ = K.sp_fwd(q, z.detach(), "kl-fwd", 1.0, 0.0, mean_scale=1.0)
    assert rows.shape == (rows_per_tile * K.MEAN_TILES + 1,)  # too many tiles: the rows, for an aten mean


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
def test_public_helpers_with_random_upstream_gradient(reduction, dtype, device):
    q, z = make_sp_inputs(11, 37, dtype, device, pad_frac=0.2)
    w = torch.rand(11, device=device) + 0.5
    up = torch.randn(11, device=device) if reduction == "none" else torch.randn((), device=device)
    outs = {}
    for backend in ("triton", "torch"):
        zz = z.detach().clone().requires_grad_(True)
        loss = fl.sp_js_loss(q, zz, 1.3, 0.05, reduction=reduction, weight=w, backend=backend)
        (loss * up).sum().backward()
        outs[backend] = (loss.detach(), zz.grad)
    z64 = z.detach().double().requires_grad_(True)
    loss64 = fl.sp_js_loss(q.double(), z64, 1.3, 0.05, reduction=reduction, weight=w.double(), backend="torch")
    (loss64 * up.double()).sum().backward()
    assert_close_to_float64(outs["triton"][0], outs["torch"][0], loss64.detach(), dtype, "loss")
    assert_close_to_float64(outs["triton"][1], outs["torch"][1], z64.grad, dtype, "gradient")


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_sp_loss_dispatches_to_kernel(loss_type, device, monkeypatch):
    calls = []
    real = K.sp_fwd
    monkeypatch.setattr(K, "sp_fwd", lambda *a, **k: calls.append(1) or real(*a, **k))
    q, z = make_sp_inputs(3, 4, torch.float32, device)
    q = q.reshape(1, 3, 4)
    z = z.detach().reshape(1, 3, 4).requires_grad_(True)
    cfg = lambda b: fl.SpLossConfig(loss_type=loss_type, temperature=2.0, label_smoothing=0.1, backend=b)
    lk, mk = fl.sp_loss({"q_star": q}, z, cfg("triton"))
    assert calls == [1]
    lr, mr = fl.sp_loss({"q_star": q}, z, cfg("torch"))
    assert calls == [1]
    assert torch.allclose(lk, lr, atol=1e-6) and mk["sp_loss"] == pytest.approx(mr["sp_loss"], abs=1e-6)
    (gk,) = torch.autograd.grad(lk, z)
    (gr,) = torch.autograd.grad(lr, z)
    assert torch.allclose(gk, gr, atol=1e-6)


@pytest.mark.parametrize("max_block", [64, 16], ids=["one tile", "tiled"])
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("temperature", [1.0, 1e-30])
def test_status_codes_are_the_teacher_checks(max_block, dtype, temperature, device):
    """The forward's per-row status is what q_star_checks decides from a second read of the teacher:
    1 for a row holding NaN or +inf (wherever it sits, among -inf too), 2 for a row of -inf only, 0
    otherwise (huge finite values and a temperature near 0 included)."""
    A, inf, nan = 40, float("inf"), float("nan")
    q = torch.randn(8, A, generator=torch.Generator().manual_seed(3))
    q[1, 37] = nan
    q[2, 5] = inf
    q[3] = -inf
    q[4, :] = -inf
    q[4, 30] = nan
    q[5, :39] = -inf  # one finite entry, in the last tile
    q[6] = 3e38
    q[7, ::2] = -inf
    want = torch.tensor([0, 1, 1, 2, 1, 0, 0, 0], dtype=torch.int8)
    z = torch.randn(8, A, generator=torch.Generator().manual_seed(4))
    q, z = q.to(dtype).to(device), z.to(dtype).to(device)
    for loss_type in LOSS_TYPES:
        status_buf = torch.full((8,), -1, dtype=torch.int8, device=device)
        _, _, status = K.sp_fwd(q, z, loss_type, temperature, 0.1, max_block, status_out=status_buf)
        assert torch.equal(status.cpu(), want), (loss_type, status)
    flags = [bool(f) for f, _ in fl.losses.sp.q_star_checks(q, "q")]
    assert flags == [True, True]


def test_underflow_gives_no_nan(device):
    q = torch.tensor([[0.0, -2000.0, -5000.0, 1e4, float("-inf")]], device=device)
    z = torch.tensor([[3000.0, -3000.0, 0.0, -1e4, 5.0]], device=device)
    for lt in LOSS_TYPES:
        rows, grad, _ = K.sp_fwd(q, z, lt, 1.0, 0.0)
        assert torch.isfinite(rows).all() and torch.isfinite(grad).all(), lt
        assert grad[0, 4] == 0


def test_ce_true_class_gradient_in_fp32_does_not_cancel(device):
    # A confident student: s_target ~ 1 - 1e-4. In bf16, s - 1 computed after rounding s would be 0.
    z = torch.tensor([[12.0, 2.0, 2.5, 3.0]], device=device, dtype=torch.bfloat16)
    q = torch.tensor([[5.0, 0.0, 0.0, 0.0]], device=device, dtype=torch.bfloat16)
    _, grad, _ = K.sp_fwd(q, z, "ce", 1.0, 0.0)
    want = torch.softmax(z.double(), -1)[0, 0] - 1.0
    assert grad[0, 0].item() == pytest.approx(want.item(), rel=1e-2)


def test_triton_backend_errors(monkeypatch):
    q, z = make_sp_inputs(2, 3)
    with pytest.raises(RuntimeError, match="float32, bfloat16 and float16"):
        fl.sp_js_loss(q.double(), z.double(), 1.0, backend="triton")
    if not torch.cuda.is_available():
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
            fl.sp_js_loss(q, z, 1.0, backend="triton")


def test_compile_fullgraph_reference_path():
    q, z = make_sp_inputs(6, 5)

    def step(q, z):
        loss, metrics = fl.sp_loss({"q_star": q}, z, fl.SpLossConfig(loss_type="kl-fwd", backend="torch",
                                                                       metrics_mode="lazy"))
        return loss, metrics

    loss_c, metrics_c = torch.compile(step, fullgraph=True)(q, z)
    loss_e, _ = step(q, z)
    assert torch.allclose(loss_c, loss_e) and metrics_c["sp_loss"] == pytest.approx(loss_e.item())


@pytest.mark.cuda
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_compile_fullgraph_kernel_path_cuda(loss_type):
    q, z = make_sp_inputs(64, 1000, torch.bfloat16, "cuda")

    def step(q, z):
        return fl.sp_kl_loss(q, z, 1.0, backend="triton", check_inputs=False) if loss_type == "kl-fwd" else \
            fl.sp_loss({"q_star": q}, z, fl.SpLossConfig(loss_type=loss_type, backend="triton", metrics_mode="lazy"))[0]

    compiled = torch.compile(step, fullgraph=True)
    loss_c = compiled(q, z)
    (g_c,) = torch.autograd.grad(loss_c, z)
    loss_e = step(q, z)
    (g_e,) = torch.autograd.grad(loss_e, z)
    assert torch.allclose(loss_c, loss_e) and torch.equal(g_c, g_e)


@pytest.mark.cuda
@pytest.mark.parametrize("shape", [(8192, 32768), (2048, 131072), (32768, 4096), (16384, 18), (16384, 256)],
                         ids=lambda s: f"N{s[0]}-A{s[1]}")
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("loss_type", ["ce", "kl-fwd", "js"])
def test_kernel_full_sizes_cuda(loss_type, dtype, shape):
    N, A = shape
    q, z = make_sp_inputs(N, A, dtype, "cuda", pad_frac=0.05)
    rows, grad, _ = K.sp_fwd(q, z.detach(), loss_type, 1.5, 0.1)
    ref = fl.sp_reference(q, z, loss_type, 1.5, 0.1)
    (g_ref,) = torch.autograd.grad(ref.sum(), z)
    z64 = z.detach().double().requires_grad_(True)
    ref64 = fl.sp_reference(q.double(), z64, loss_type, 1.5, 0.1)
    (g64,) = torch.autograd.grad(ref64.sum(), z64)
    assert_close_to_float64(rows, ref.detach(), ref64.detach(), dtype, "row loss")
    assert_close_to_float64(grad, g_ref.to(dtype), g64, dtype, "gradient")


def test_canaries_catch_writes_past_either_end():
    from fusedloss.testing import assert_canaries_intact

    buf = nan_like((3, 5), torch.float32, "cpu")
    assert buf.is_contiguous() and torch.isnan(buf).all()
    buf.fill_(1.0)
    assert_canaries_intact(buf)
    for offset in (-1, buf.numel()):
        b = nan_like((3, 5), torch.float32, "cpu")
        b._base[b.storage_offset() + offset] = 0.0  # one element just before, or just after
        with pytest.raises(AssertionError, match="1 element"):
            assert_canaries_intact(b)


def test_vmap_over_the_fused_loss_matches_a_loop(device):
    """torch.func.vmap runs the kernel path through its custom op (the eager Function has no vmap
    rule): the batched losses equal a loop over the batch."""
    q, _ = make_sp_inputs(3, 7, torch.float32, device, seed=12)
    zs = torch.randn(4, 3, 7, generator=torch.Generator().manual_seed(13)).to(device)
    call = lambda z: fl.sp_kl_loss(q, z, 1.3, backend="triton", check_inputs=False)  # noqa: E731
    got = torch.func.vmap(call)(zs)
    want = torch.stack([call(z) for z in zs])
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)
