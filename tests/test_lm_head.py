"""linear_logprob and linear_cross_entropy against a float64 evaluation of the materialised logits,
written here independently: forward and every gradient (hidden, weight, bias), fp32 and bf16, on
the reference path and on the kernels (the Triton interpreter on CPU), with the one tolerance rule."""

import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import fusedloss as fl
from conftest import DEVICE
from fusedloss.testing import assert_canaries_intact, assert_close_to_float64, make_lm_head_inputs, nan_like

IGNORE = -100
PATHS = ["torch", pytest.param("triton", marks=pytest.mark.skipif(
    __import__("importlib").util.find_spec("triton") is None, reason="needs triton"))]
# (N, H, V): one row; a vocabulary that is not a multiple of the tile; rows longer than one tile (4096)
SHAPES = [(1, 3, 37), (13, 8, 300), (3, 4, 4100)]
DTYPES = [torch.float32, torch.bfloat16]


def _ids(shape):
    return "N={} H={} V={}".format(*shape)


def _u(h, w, b, y, temperature, softcap):
    """Materialised ``u = softcap(z)/T`` in the inputs' dtype, ignored rows zeroed first."""
    h = torch.where((y != IGNORE)[:, None], h, torch.zeros((), dtype=h.dtype))
    z = h @ w.T
    if b is not None:
        z = z + b
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    return z / temperature


def naive_logprob(h, w, b, y, temperature=1.0, softcap=None):
    u = _u(h, w, b, y, temperature, softcap)
    ls = torch.log_softmax(u.float() if u.dtype == torch.bfloat16 else u, dim=-1).to(u.dtype)
    keep = y != IGNORE
    lp = ls.gather(1, y.clamp(min=0)[:, None])[:, 0]
    ent = -(ls.exp() * ls).sum(-1)
    zero = torch.zeros((), dtype=lp.dtype)
    return torch.where(keep, lp, zero), torch.where(keep, ent, zero)


def naive_ce(h, w, b, y, reduction="mean", label_smoothing=0.0, z_loss=0.0, softcap=None):
    u = _u(h, w, b, y, 1.0, softcap)
    keep = y != IGNORE
    rows = F.cross_entropy(u, y, ignore_index=IGNORE, label_smoothing=label_smoothing, reduction="none")
    if z_loss:
        rows = rows + z_loss * torch.where(keep, torch.logsumexp(u, -1), torch.zeros((), dtype=u.dtype)) ** 2
    if reduction == "none":
        return rows
    total = rows.sum()
    return total / keep.sum().clamp_min(1) if reduction == "mean" else total


def _leaves(shape, dtype, bias, seed):
    h, w, b, y = make_lm_head_inputs(*shape, dtype=dtype, device="cpu", seed=seed, bias=bias)
    if shape[0] == 1:  # one row: keep it
        y = y.clamp(min=0)
        h = torch.nan_to_num(h.detach()).requires_grad_(True)
    return [t for t in (h, w, b) if t is not None], y


def _grads(out, leaves, upstream):
    return torch.autograd.grad([o for o in out], leaves, [g for g in upstream])


def _check(fused_fn, naive_fn, shape, dtype, bias, upstream_shapes, seed=0):
    """Fused (on ``DEVICE``) against naive float64, with naive in ``dtype`` as the reference error."""
    leaves, y = _leaves(shape, dtype, bias, seed)
    gen = torch.Generator().manual_seed(seed + 1)
    ups = [torch.randn(s, generator=gen, dtype=torch.float64) for s in upstream_shapes]
    dev = [t.detach().to(DEVICE).requires_grad_(True) for t in leaves]
    out = fused_fn(*dev, y.to(DEVICE))
    out = out if isinstance(out, tuple) else (out,)
    g = _grads(out, dev, [u.to(out[0].dtype).to(DEVICE) for u in ups])
    l64 = [t.detach().double().requires_grad_(True) for t in leaves]
    out64 = naive_fn(*l64, y)
    out64 = out64 if isinstance(out64, tuple) else (out64,)
    g64 = _grads(out64, l64, ups)
    lsame = [t.detach().clone().requires_grad_(True) for t in leaves]
    outs = naive_fn(*lsame, y)
    outs = outs if isinstance(outs, tuple) else (outs,)
    gs = _grads(outs, lsame, [u.to(outs[0].dtype) for u in ups])
    for i, (o, r, r64) in enumerate(zip(out, outs, out64)):
        assert o.dtype == (torch.float32 if dtype != torch.float64 else torch.float64)
        assert torch.isfinite(o).all(), o
        assert_close_to_float64(o.cpu(), r, r64, dtype, f"output {i}")
    for i, (gf, r, r64, leaf) in enumerate(zip(g, gs, g64, leaves)):
        assert gf.dtype == leaf.dtype
        assert torch.isfinite(gf).all(), f"gradient {i} not finite (a NaN hidden row leaked?)"
        assert_close_to_float64(gf.cpu(), r, r64, dtype, f"gradient {i}")
    return leaves, y, g


def _split(leaves, bias):
    return (leaves[0], leaves[1], leaves[2] if bias else None)


@pytest.mark.parametrize("backend", PATHS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=_ids)
@pytest.mark.parametrize("temperature,softcap", [(1.0, None), (0.7, 5.0)], ids=["plain", "T=0.7,softcap=5"])
def test_linear_logprob_and_entropy(backend, dtype, shape, temperature, softcap):
    bias = softcap is not None
    N = shape[0]

    def fused(*args):
        h, w, b = args[0], args[1], (args[2] if bias else None)
        return fl.linear_logprob(h, w, args[-1], bias=b, temperature=temperature, softcap=softcap,
                                 return_entropy=True, chunk_size=5, backend=backend)

    def naive(*args):
        h, w, b = args[0], args[1], (args[2] if bias else None)
        return naive_logprob(h, w, b, args[-1], temperature, softcap)

    _check(fused, naive, shape, dtype, bias, [(N,), (N,)])


@pytest.mark.parametrize("backend", PATHS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=_ids)
@pytest.mark.parametrize("reduction,ls,zl,softcap", [("mean", 0.0, 0.0, None), ("sum", 0.1, 1e-3, 5.0),
                                                     ("none", 0.2, 0.0, None)],
                         ids=["mean", "sum,ls=0.1,z=1e-3,softcap=5", "none,ls=0.2"])
def test_linear_cross_entropy(backend, dtype, shape, reduction, ls, zl, softcap):
    bias = reduction == "sum"

    def fused(*args):
        return fl.linear_cross_entropy(args[0], args[1], args[-1], bias=args[2] if bias else None,
                                       reduction=reduction, label_smoothing=ls, z_loss=zl, softcap=softcap,
                                       chunk_size=4, backend=backend)

    def naive(*args):
        return naive_ce(args[0], args[1], args[2] if bias else None, args[-1], reduction, ls, zl, softcap)

    _check(fused, naive, shape, dtype, bias, [(shape[0],) if reduction == "none" else ()])


@pytest.mark.parametrize("backend", PATHS)
def test_all_tokens_ignored_gives_zero_and_zero_gradients(backend):
    h, w, _, y = make_lm_head_inputs(6, 4, 50, seed=3)
    y = torch.full_like(y, IGNORE)
    h = h.detach().fill_(float("nan")).requires_grad_(True)  # never reaches a product
    loss = fl.linear_cross_entropy(h.to(DEVICE), w.to(DEVICE), y.to(DEVICE), backend=backend)
    gh, gw = torch.autograd.grad(loss, [h, w])
    assert loss.item() == 0.0 and loss.dtype == torch.float32 and loss.dim() == 0
    assert (gh == 0).all() and (gw == 0).all()
    lp, ent = fl.linear_logprob(h, w, y, return_entropy=True, backend=backend)
    assert (lp == 0).all() and (ent == 0).all()


@pytest.mark.parametrize("backend", PATHS)
def test_shift_pairs_hidden_t_with_label_t_plus_1(backend):
    B, T, H, V = 2, 5, 4, 33
    g = torch.Generator().manual_seed(4)
    h = torch.randn(B, T, H, generator=g, requires_grad=True)
    w = torch.randn(V, H, generator=g, requires_grad=True)
    y = torch.randint(0, V, (B, T), generator=g)
    y[0, 3] = IGNORE
    rows, lse = fl.linear_cross_entropy(h, w, y, shift=True, reduction="none", return_lse=True, backend=backend)
    assert rows.shape == (B, T - 1) and lse.shape == (B, T - 1) and not lse.requires_grad
    up = torch.randn(B, T - 1, generator=g)
    gh, gw = torch.autograd.grad(rows, [h, w], up)
    h2, w2 = h.detach().double().requires_grad_(True), w.detach().double().requires_grad_(True)
    z = h2[:, :-1] @ w2.T
    ref = F.cross_entropy(z.reshape(-1, V), y[:, 1:].reshape(-1), ignore_index=IGNORE, reduction="none").view(B, T - 1)
    rh, rw = torch.autograd.grad(ref, [h2, w2], up.double())
    torch.testing.assert_close(rows.double(), ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse.double(), torch.where(y[:, 1:] != IGNORE, torch.logsumexp(z, -1), 0.0),
                               rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gh.double(), rh, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gw.double(), rw, rtol=1e-5, atol=1e-5)
    assert (gh[:, -1] == 0).all()
    mean = fl.linear_cross_entropy(h, w, y, shift=True, backend=backend)
    torch.testing.assert_close(mean.double(), ref.sum() / (y[:, 1:] != IGNORE).sum(), rtol=1e-5, atol=1e-6)


def test_logprob_under_no_grad_and_nd_inputs():
    h, w, _, y = make_lm_head_inputs(12, 4, 40, seed=5, ignore_frac=0.0)
    with torch.no_grad():
        lp = fl.linear_logprob(h.view(3, 4, 4), w, y.view(3, 4))
    assert lp.shape == (3, 4) and not lp.requires_grad
    ref = torch.log_softmax(h.detach() @ w.detach().T, -1).gather(1, y[:, None])[:, 0]
    torch.testing.assert_close(lp.reshape(-1), ref, rtol=1e-5, atol=1e-6)


def test_entropy_gradient_alone():
    """Only the entropy gets an upstream gradient (the log-prob output is unused)."""
    h, w, _, y = make_lm_head_inputs(7, 5, 60, seed=6)
    _, ent = fl.linear_logprob(h, w, y, return_entropy=True, backend="torch")
    gh, gw = torch.autograd.grad(ent.sum(), [h, w])
    h2, w2 = h.detach().double().requires_grad_(True), w.detach().double().requires_grad_(True)
    _, ent64 = naive_logprob(h2, w2, None, y)
    rh, rw = torch.autograd.grad(ent64.sum(), [h2, w2])
    torch.testing.assert_close(gh.double(), rh, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gw.double(), rw, rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(__import__("importlib").util.find_spec("triton") is None, reason="needs triton")
@pytest.mark.parametrize("V", [1, 37, 4100], ids=lambda v: f"V={v}")
@pytest.mark.parametrize("softcap", [None, 3.0], ids=["plain", "softcap"])
def test_kernels_write_every_element_and_nothing_else(V, softcap):
    from fusedloss.kernels import lm_head as K
    from fusedloss.losses.lm_head import lm_head_grad_reference, lm_head_stats_reference

    n = 3
    g = torch.Generator().manual_seed(7)
    z = (3 * torch.randn(n, V, generator=g)).to(DEVICE)
    y = torch.tensor([0, V - 1, -100])[:n].to(DEVICE)
    stats = K.lm_head_stats(z, y, 1 / 0.8, softcap, out=nan_like((n, 4), torch.float32, DEVICE))
    ref = lm_head_stats_reference(z.double(), y, 1 / 0.8, softcap)
    assert_canaries_intact(stats)
    torch.testing.assert_close(stats[:2].double(), ref[:2], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(stats[2, :3].double(), ref[2, :3], rtol=1e-5, atol=1e-5)
    assert stats[2, 3].isnan()  # the label outside [0, V): the loss masks the row
    coef = torch.randn(n, 4, generator=g).to(DEVICE)
    dz = K.lm_head_grad(z, y, stats, coef, 1 / 0.8, softcap, out=nan_like((n, V), torch.float32, DEVICE))
    assert_canaries_intact(dz)
    torch.testing.assert_close(dz.double(), lm_head_grad_reference(z.double(), y, ref, coef.double(), 1 / 0.8, softcap),
                               rtol=1e-4, atol=1e-5)


def test_peak_memory_is_a_fraction_of_the_materialised_path():
    """CPU profiler peak, forward and backward, N=4096 H=128 V=32768 fp32: at most 5% of the
    materialised cross-entropy's."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    from _common import _cpu_peak_bytes

    h, w, _, y = make_lm_head_inputs(4096, 128, 32768, seed=8)
    h = torch.nan_to_num(h.detach()).requires_grad_(True)

    def fused():
        torch.autograd.grad(fl.linear_cross_entropy(h, w, y, backend="torch"), [h, w])

    def materialised():
        torch.autograd.grad(F.cross_entropy(h @ w.T, y, ignore_index=IGNORE), [h, w])

    ratio = _cpu_peak_bytes(fused) / _cpu_peak_bytes(materialised)
    assert ratio <= 0.05, ratio


BAD = [
    (lambda a: {**a, "labels": a["labels"].float()}, TypeError, "labels must be an int64 or int32"),
    (lambda a: {**a, "labels": a["labels"][:-1]}, ValueError, r"labels must have shape hidden.shape\[:-1\]"),
    (lambda a: {**a, "weight": a["weight"][:, :-1]}, ValueError, r"weight must have shape \[V, H\]"),
    (lambda a: {**a, "weight": a["weight"].double()}, TypeError, "must share a dtype"),
    (lambda a: {**a, "bias": torch.zeros(3)}, ValueError, r"bias must have shape \[V\]"),
    (lambda a: {**a, "labels": a["labels"].clone().fill_(40)}, ValueError, r"labels must lie in \[0, V\)"),
    (lambda a: {**a, "softcap": 0.0}, ValueError, "softcap must be None or a number > 0"),
    (lambda a: {**a, "chunk_size": 0}, ValueError, "chunk_size must be None or an integer >= 1"),
    (lambda a: {**a, "hidden": a["hidden"][0]}, ValueError, r"hidden must have shape \[..., H\]"),
]


@pytest.mark.parametrize("change,exc,match", BAD, ids=[m for _, _, m in BAD])
def test_bad_inputs_raise_clearly(change, exc, match):
    h, w, _, y = make_lm_head_inputs(6, 4, 40, seed=9)
    args = change({"hidden": h, "weight": w, "labels": y, "bias": None, "softcap": None, "chunk_size": None})
    with pytest.raises(exc, match=match):
        fl.linear_cross_entropy(args["hidden"], args["weight"], args["labels"], bias=args["bias"],
                                softcap=args["softcap"], chunk_size=args["chunk_size"])
    with pytest.raises(exc, match=match):
        fl.linear_logprob(args["hidden"], args["weight"], args["labels"], bias=args["bias"],
                          softcap=args["softcap"], chunk_size=args["chunk_size"])


@pytest.mark.parametrize("kw,match", [({"label_smoothing": 1.5}, "label_smoothing must be"),
                                      ({"z_loss": -1.0}, "z_loss must be"), ({"z_loss": float("inf")}, "z_loss must be"),
                                      ({"label_smoothing": float("nan")}, "label_smoothing must be"),
                                      ({"reduction": "avg"}, "reduction"),
                                      ({"shift": True}, "shift=True needs hidden")])
def test_bad_ce_options(kw, match):
    h, w, _, y = make_lm_head_inputs(6, 4, 40, seed=9)
    with pytest.raises(ValueError, match=match):
        fl.linear_cross_entropy(h, w, y, **kw)


def test_temperature_must_be_positive():
    h, w, _, y = make_lm_head_inputs(6, 4, 40, seed=9)
    with pytest.raises(ValueError, match="temperature must be a number > 0"):
        fl.linear_logprob(h, w, y, temperature=0.0)


def test_double_backward_raises():
    h, w, _, y = make_lm_head_inputs(6, 4, 40, seed=10, ignore_frac=0.0)
    loss = fl.linear_cross_entropy(h, w, y, reduction="none").sum()
    with pytest.raises(RuntimeError, match="does not support double backward"):
        torch.autograd.grad(loss, [h], create_graph=True)


class _GridRecorder:
    """Stands in for a Triton kernel: ``kernel[grid](...)`` records the grid, fills the output
    with zeros and launches nothing, so a grid for 70 000 rows costs no kernel time."""

    def __init__(self, grids, name, out_arg):
        self.grids, self.name, self.out_arg = grids, name, out_arg

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.grids.append((self.name, tuple(grid)))
            args[self.out_arg].zero_()
        return launch


@pytest.mark.skipif(__import__("importlib").util.find_spec("triton") is None, reason="needs triton")
@pytest.mark.parametrize("N, V, chunk", [(70_000, 5, 70_000), (4, 300_000, 4)], ids=["N=70000", "V=300000"])
def test_grids_stay_within_cuda_limits(monkeypatch, N, V, chunk):
    """CUDA allows 2³¹ − 1 blocks on the grid's x axis and 65 535 on y and z (Liger #1294: a grid
    of rows on y broke at N > 65 535). Rows go on x for both kernels, column blocks on y; the grids
    are recorded with the kernels stubbed, and cover every row and every column exactly."""
    from fusedloss import _dispatch
    from fusedloss.kernels import lm_head as K

    grids = []
    stats, grad = _GridRecorder(grids, "stats", 2), _GridRecorder(grids, "grad", 4)
    monkeypatch.setattr(K, "_lm_head_stats_kernel", stats)
    monkeypatch.setattr(K, "_lm_head_grad_kernel", grad)
    # rows wider than one tile launch through the autotune spaces, which hold the kernels themselves
    monkeypatch.setattr(K._STATS_LONG, "kernel", stats)
    monkeypatch.setattr(K._GRAD_LONG, "kernel", grad)
    monkeypatch.delenv("FUSEDLOSS_AUTOTUNE", raising=False)
    monkeypatch.setattr(_dispatch, "why_not_kernel", lambda family, tensors: None)
    hidden = torch.zeros(N, 2, requires_grad=True)
    weight = torch.zeros(V, 2, requires_grad=True)
    labels = torch.zeros(N, dtype=torch.long)
    loss = fl.linear_cross_entropy(hidden, weight, labels, backend="triton", chunk_size=chunk, check_inputs=False)
    loss.backward()
    lp, _ = fl.linear_logprob(hidden, weight, labels, return_entropy=True, backend="triton", chunk_size=chunk,
                              check_inputs=False)
    lp.sum().backward()
    block = K._tiles(V)[0]
    assert {name for name, _ in grids} == {"stats", "grad"}
    for name, grid in grids:
        assert grid[0] <= 2**31 - 1 and all(g <= 65_535 for g in grid[1:]), (name, grid)
        assert grid[0] == chunk  # one program per row of the chunk
        if name == "grad":
            assert grid[1] * block >= V > (grid[1] - 1) * block  # every column block, no more


def test_config_and_registry_build_the_same_loss():
    """``{"type": "linear_cross_entropy", "params": ...}`` builds a module whose loss and gradients
    are the function's; bad options raise when the config is built."""
    hidden, weight, bias, labels = make_lm_head_inputs(3 * 5, 8, 37, torch.float32, DEVICE, seed=4, bias=True,
                                                       ignore_frac=0.0)
    params = {"label_smoothing": 0.1, "z_loss": 1e-3, "softcap": 4.0, "shift": True, "reduction": "sum",
              "chunk_size": 4, "backend": "torch"}
    module = fl.build_loss({"type": "linear_cross_entropy", "params": params})
    assert isinstance(module, fl.LinearCrossEntropyLoss)
    h, y = hidden.reshape(3, 5, 8), labels.reshape(3, 5)
    got = module(h, weight, y, bias=bias)
    want = fl.linear_cross_entropy(h, weight, y, bias=bias, **params)
    assert torch.equal(got, want)
    for a, b in zip(torch.autograd.grad(got, (hidden, weight, bias)), torch.autograd.grad(want, (hidden, weight, bias))):
        assert torch.equal(a, b)
    for bad, match in (({"label_smoothing": 1.5}, "label_smoothing"), ({"reduction": "avg"}, "reduction"),
                       ({"softcap": 0.0}, "softcap"), ({"chunk_size": 0}, "chunk_size"), ({"backend": "cuda"}, "backend")):
        with pytest.raises(ValueError, match=match):
            fl.LinearCrossEntropyConfig(**bad)


@pytest.mark.parametrize("backend", PATHS)
@pytest.mark.parametrize("layout", ["stride 3", "stride 0", "transposed"])
def test_labels_of_any_layout(backend, layout):
    """A labels view of any stride gives what its contiguous copy gives (the kernels index labels by
    row: a strided view once read the wrong labels, and past the allocation for stride 0)."""
    N, H, V = 12, 8, 37
    hidden, weight, _, _ = make_lm_head_inputs(N, H, V, torch.float32, DEVICE, seed=5, ignore_frac=0.0)
    g = torch.Generator().manual_seed(6)
    if layout == "stride 3":
        labels = torch.randint(0, V, (N, 3), generator=g)[:, 0]
    elif layout == "stride 0":
        labels = torch.tensor(7).expand(N)
    else:
        labels = torch.randint(0, V, (4, 3), generator=g).T  # [3, 4], not contiguous
        hidden = hidden.reshape(3, 4, H)
    labels = labels.to(DEVICE)
    assert not labels.is_contiguous()
    for fn in (lambda y: fl.linear_logprob(hidden, weight, y, chunk_size=N, backend=backend),
               lambda y: fl.linear_cross_entropy(hidden, weight, y, chunk_size=N, backend=backend, reduction="none")):
        got, want = fn(labels), fn(labels.contiguous())
        assert torch.equal(got, want)
