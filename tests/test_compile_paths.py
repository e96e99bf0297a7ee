"""``torch.compile(fullgraph=True)`` over the public losses on their kernel paths: the custom ops
trace through their fake implementations, and the compiled call equals the eager one, loss and
gradient. On CPU the compiled graph calls the ops, which run the kernels under the interpreter;
on CUDA the same tests run compiled kernels."""

import pytest
import torch

import fusedloss as fl
from fusedloss.testing import assert_close_to_float64, make_dqn_inputs, make_sp_inputs, make_topk_inputs

pytest.importorskip("triton")


def _compiled_equals_eager(f, x, exact=True):
    """Compiled and eager calls agree: bitwise where the kernel does all the arithmetic (DQN folds
    its mean in the kernel), to the last bits where inductor also fuses PyTorch ops around it."""
    loss_c = torch.compile(f, fullgraph=True)(x)
    (g_c,) = torch.autograd.grad(loss_c, x)
    loss_e = f(x)
    (g_e,) = torch.autograd.grad(loss_e, x)
    if exact:
        assert torch.equal(loss_c, loss_e) and torch.equal(g_c, g_e)
    else:
        assert torch.allclose(loss_c, loss_e, rtol=1e-6, atol=0) and torch.allclose(g_c, g_e, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("opts", [{"cql_weight": 0.2}, {"n_step": 3, "double_dqn": True, "value_rescaling": True},
                                  {"td_lambda": 0.9, "cql_weight": 0.1}], ids=["one-step-cql", "n3", "lambda"])
def test_dqn_kernel_path_compiles_fullgraph(opts, device):
    torch._dynamo.reset()
    step, out = make_dqn_inputs(3, 9, 5, torch.float32, device, mask=True)
    cfg = fl.DqnLossConfig(backend="triton", metrics_mode="lazy", mask_key="mask", **opts)
    _compiled_equals_eager(lambda q: fl.dqn_loss(step, {"dqn": q, "dqn_target": out["dqn_target"]}, cfg)[0],
                           out["dqn"])


def test_sp_and_topk_kernel_paths_compile_fullgraph(device):
    torch._dynamo.reset()
    q, z = make_sp_inputs(6, 37, torch.float32, device, pad_frac=0.2)
    # The mean over rows runs as a PyTorch op, which inductor fuses: equal to the last bits only.
    _compiled_equals_eager(lambda z: fl.sp_js_loss(q, z, 1.3, beta=0.3, backend="triton", check_inputs=False), z,
                           exact=False)
    idx, lp, _ = make_topk_inputs(6, 37, 5, torch.float32, device, unused=0.3)
    _compiled_equals_eager(lambda z: fl.sp_topk_loss(idx, lp, z, "kl-fwd", backend="triton", check_inputs=False), z,
                           exact=False)


def test_vec_dqn_kernel_path_compiles_fullgraph(device):
    from fusedloss.testing import make_vec_dqn_inputs

    torch._dynamo.reset()
    step, online, target = make_vec_dqn_inputs(2, 5, 6, 4, torch.float32, device, seed=3, argmax_margin=1e-3)
    cfg = fl.VecDqnLossConfig(backend="triton", metrics_mode="lazy")
    # theta and the mean run as PyTorch ops, which inductor fuses: equal to the last bits only
    _compiled_equals_eager(lambda x: fl.vec_dqn_loss(step, x, target, cfg)[0], online, exact=False)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("kind", ["dense", "topk", "linear"])
def test_sp_linear_compiles_fullgraph(kind, backend, device):
    """sp_linear_loss (issue 21, item 14): its chunks call the kernels through their custom ops and
    take the reference's chunk gradient with torch.func.vjp, so Dynamo traces the whole loss."""
    from fusedloss.testing import make_sp_linear_inputs

    torch._dynamo.reset()
    hidden, weight, bias, teacher, row_weight = make_sp_linear_inputs(8, 4, 21, kind, torch.float32, device, seed=0,
                                                                      bias=True)

    def f(h, w):
        return fl.sp_linear_loss(h, w, teacher, "kl-fwd", bias=bias, row_weight=row_weight, chunk_size=3,
                                 backend=backend, check_inputs=False)

    loss_c = torch.compile(f, fullgraph=True)(hidden, weight)
    grads_c = torch.autograd.grad(loss_c, (hidden, weight))
    loss_e = f(hidden, weight)
    grads_e = torch.autograd.grad(loss_e, (hidden, weight))
    assert torch.allclose(loss_c, loss_e, rtol=1e-6, atol=0)
    for g_c, g_e in zip(grads_c, grads_e):
        assert torch.allclose(g_c, g_e, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_lm_head_losses_compile_fullgraph(backend, device):
    """linear_logprob (with entropy) and linear_cross_entropy (mean with the gradient computed in
    the forward; none with shift, recomputed in backward) in one compiled graph: the kernels run
    through their custom ops, and loss and gradients equal the eager call's."""
    from fusedloss.testing import make_lm_head_inputs

    torch._dynamo.reset()
    hidden, weight, bias, labels = make_lm_head_inputs(10, 8, 37, torch.float32, device, seed=0, bias=True)
    w_lp = torch.randn(10, generator=torch.Generator().manual_seed(1)).to(device)
    w_ce = torch.randn(2, 4, generator=torch.Generator().manual_seed(2)).to(device)
    # shifted labels that score each hidden row against its own label (the maker's ignored rows are NaN)
    labels_bt = labels.reshape(2, 5)
    shifted = torch.cat([labels_bt.new_full((2, 1), -100), labels_bt[:, :-1]], dim=1)

    def f(h, w, b=bias, wl=w_lp, wc=w_ce, be=backend):
        opts = {"bias": b, "chunk_size": 3, "backend": be, "check_inputs": False}
        lp, ent = fl.linear_logprob(h, w, labels, temperature=0.8, softcap=5.0, return_entropy=True, **opts)
        mean = fl.linear_cross_entropy(h, w, labels, label_smoothing=0.1, z_loss=1e-3, **opts)
        rows = fl.linear_cross_entropy(h.reshape(2, 5, 8), w, shifted, reduction="none", shift=True,
                                       softcap=5.0, **opts)
        return (lp * wl).sum() + ent.sum() + mean + (rows * wc).sum()

    loss_c = torch.compile(f, fullgraph=True)(hidden, weight)
    grads_c = torch.autograd.grad(loss_c, (hidden, weight))
    loss_e = f(hidden, weight)
    grads_e = torch.autograd.grad(loss_e, (hidden, weight))
    h64, w64 = (t.detach().double().requires_grad_(True) for t in (hidden, weight))
    loss_64 = f(h64, w64, bias.double(), w_lp.double(), w_ce.double(), "torch")
    grads_64 = torch.autograd.grad(loss_64, (h64, w64))
    assert torch.isfinite(loss_e)
    # Inductor reorders the sums, so the compiled call is held to the one tolerance rule, against
    # float64, allowed twice the eager call's own error.
    assert_close_to_float64(loss_c, loss_e, loss_64, torch.float32, "loss")
    for name, g_c, g_e, g_64 in zip(("hidden", "weight"), grads_c, grads_e, grads_64):
        assert_close_to_float64(g_c, g_e, g_64, torch.float32, f"d{name}")


def test_lm_head_label_check_names_its_fix_under_fullgraph(device):
    """check_inputs=True needs a host sync; fullgraph compile says to pass check_inputs=False."""
    from fusedloss.testing import make_lm_head_inputs

    torch._dynamo.reset()
    hidden, weight, _, labels = make_lm_head_inputs(4, 8, 37, torch.float32, device, seed=0)
    with pytest.raises(Exception, match="check_inputs=False"):
        torch.compile(lambda h: fl.linear_logprob(h, weight, labels).sum(), fullgraph=True)(hidden)
