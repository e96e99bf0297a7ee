"""teacher_vocab: a teacher whose vocabulary is wider than the student's is truncated to its first V
ids, and a narrower one is padded with -inf, on the dense helpers, sp_loss, the top-k loss and the
fused-linear loss (dense, top-k and linear teachers), both paths. "strict" (the default) raises a
ValueError that names the option (TRL #6252: the Qwen2.5 7B and 0.5B heads differ by 128 rows)."""

import pytest
import torch

import fusedloss as fl
from fusedloss.testing import assert_close_to_float64, make_sp_inputs, make_sp_linear_inputs, make_topk_inputs

pytest.importorskip("triton")
BACKENDS = ["torch", "triton"]
N, V = 5, 19


def _grad(loss, x):
    (g,) = torch.autograd.grad(loss, x)
    return g


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("loss_type", ["kl-fwd", "kl-bwd", "js"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_dense_wider_teacher_is_truncated(backend, loss_type, dtype, device):
    q, z = make_sp_inputs(N, V + 7, dtype, device, seed=1, pad_frac=0.1)
    z = z[:, :V].detach().requires_grad_(True)
    up = torch.rand(N, device=device) + 0.5
    rows = fl.sp_kl_loss if loss_type.startswith("kl") else fl.sp_js_loss
    kw = {"direction": loss_type[3:]} if loss_type.startswith("kl") else {}
    got = rows(q, z, 1.3, 0.05, reduction="none", backend=backend, teacher_vocab="align", **kw)
    # the definition: the teacher's first V columns; float64 on the truncated teacher
    z64 = z.detach().double().requires_grad_(True)
    want = fl.sp_reference(q[:, :V].double(), z64, loss_type, 1.3, 0.05)
    ref_z = z.detach().requires_grad_(True)
    ref = fl.sp_reference(q[:, :V].contiguous(), ref_z.float(), loss_type, 1.3, 0.05)
    assert_close_to_float64(got, ref.detach(), want.detach(), dtype, "rows")
    assert_close_to_float64(_grad((got * up).sum(), z), _grad((ref * up).sum(), ref_z),
                            _grad((want * up.double()).sum(), z64), dtype, "gradient")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("loss_type", ["kl-fwd", "ce-soft-bwd", "js"])
def test_dense_narrower_teacher_is_padded(backend, loss_type, device):
    """The student's extra actions are padded actions: the loss is the loss on the student's first
    V_t logits, and the extra logits get zero gradient."""
    Vt = V - 6
    q, z = make_sp_inputs(N, V, torch.float32, device, seed=2, pad_frac=0.1)
    q = q[:, :Vt].contiguous()
    z = z.detach().requires_grad_(True)
    cfg = fl.SpLossConfig(loss_type=loss_type, temperature=0.8, label_smoothing=0.1, backend=backend,
                          teacher_vocab="align")
    loss, _ = fl.sp_loss({"q_star": q}, z, cfg)
    z64 = z.detach().double().requires_grad_(True)
    want = fl.sp_reference(q.double(), z64[:, :Vt], loss_type, 0.8, 0.1).mean()
    ref_z = z.detach().requires_grad_(True)
    ref = fl.sp_reference(q, ref_z[:, :Vt], loss_type, 0.8, 0.1).mean()
    assert_close_to_float64(loss, ref.detach(), want.detach(), torch.float32, "loss")
    g = _grad(loss, z)
    assert_close_to_float64(g, _grad(ref, ref_z), _grad(want, z64), torch.float32, "gradient")
    assert torch.equal(g[:, Vt:], torch.zeros_like(g[:, Vt:]))


def test_registry_builds_the_option(device):
    q, z = make_sp_inputs(N, V + 3, torch.float32, device, seed=3)
    z = z[:, :V]
    loss = fl.build_loss({"type": "sp", "params": {"loss_type": "kl-fwd", "teacher_vocab": "align",
                                                   "backend": "torch"}})
    got, _ = loss({"q_star": q}, z)
    want, _ = fl.sp_loss({"q_star": q[:, :V]}, z, fl.SpLossConfig(loss_type="kl-fwd", backend="torch"))
    assert torch.equal(got, want)


def test_strict_mismatch_names_the_option(device):
    q, z = make_sp_inputs(N, V + 1, torch.float32, device, seed=4)
    z = z[:, :V]
    with pytest.raises(ValueError, match="teacher_vocab='align'"):
        fl.sp_kl_loss(q, z, 1.0)
    with pytest.raises(ValueError, match="teacher_vocab='align'"):
        fl.sp_loss({"q_star": q}, z, fl.SpLossConfig(loss_type="js"))
    hidden, weight, _, teacher, _ = make_sp_linear_inputs(N, 4, V, "dense", device=device, seed=4)
    with pytest.raises(ValueError, match="teacher_vocab='align'"):
        fl.sp_linear_loss(hidden, weight[:-2], teacher, "kl-fwd")
    # a mismatch in rows is not a vocabulary mismatch: no hint
    with pytest.raises(ValueError) as err:
        fl.sp_kl_loss(q[:-1, :V], z, 1.0)
    assert "teacher_vocab" not in str(err.value)


@pytest.mark.parametrize("bad", ["pad", "Align", ""])
def test_unknown_mode_raises(bad, device):
    q, z = make_sp_inputs(N, V, torch.float32, device, seed=5)
    with pytest.raises(ValueError, match="teacher_vocab must be one of"):
        fl.sp_kl_loss(q, z, 1.0, teacher_vocab=bad)
    with pytest.raises(ValueError, match="teacher_vocab must be one of"):
        fl.SpLossConfig(teacher_vocab=bad)
    with pytest.raises(ValueError, match="teacher_vocab must be one of"):
        fl.SpTopKLossConfig(teacher_vocab=bad)
    with pytest.raises(ValueError, match="teacher_vocab must be one of"):
        fl.SpLinearLossConfig(teacher_vocab=bad)


@pytest.mark.parametrize("backend", BACKENDS)
def test_topk_slots_beyond_the_student_are_unused(backend, device):
    idx, lp, z = make_topk_inputs(N, V + 5, 6, device=device, seed=6)
    z = z[:, :V].detach().requires_grad_(True)
    assert (idx >= V).any() and (idx < V).any(dim=1).all()
    with pytest.raises(ValueError, match="teacher_vocab='align'"):
        fl.sp_topk_loss(idx, lp, z, backend=backend)
    got = fl.sp_topk_loss(idx, lp, z, backend=backend, teacher_vocab="align")
    want = fl.sp_topk_loss(torch.where(idx < V, idx, -1), lp, z, backend=backend)
    assert torch.equal(got, want)
    module = fl.build_loss({"type": "sp_topk", "params": {"teacher_vocab": "align", "backend": backend}})
    assert torch.equal(module(idx, lp, z), want)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["dense", "topk", "linear"])
@pytest.mark.parametrize("wider", [True, False], ids=["wider", "narrower"])
def test_sp_linear_teachers(backend, kind, wider, device):
    """align on the fused-linear loss equals the strict loss on the teacher aligned by hand, loss
    and gradients."""
    Vt = V + 4 if wider else V - 5
    hidden, weight, bias, _, _ = make_sp_linear_inputs(N, 4, V, "dense", device=device, seed=7, bias=True)
    _, _, _, teacher, _ = make_sp_linear_inputs(N, 4, Vt, kind, device=device, seed=8)
    if kind == "dense":
        by_hand = (teacher[:, :V] if wider
                   else torch.nn.functional.pad(teacher, (0, V - Vt), value=float("-inf")))
    elif kind == "topk":
        by_hand = fl.TopKTeacher(torch.where(teacher.index < V, teacher.index, -1), teacher.logprob)
    else:
        w, b = teacher.weight.detach(), teacher.bias
        if wider:
            by_hand = fl.LinearTeacher(teacher.hidden, w[:V].clone(), b[:V].clone())
        else:
            pad_w = torch.cat([w, w.new_zeros(V - Vt, w.shape[1])])
            pad_b = torch.cat([b, b.new_full((V - Vt,), float("-inf"))])
            by_hand = fl.LinearTeacher(teacher.hidden, pad_w, pad_b)
    loss_type = "kl-fwd" if kind == "topk" else "js"
    opts = {"bias": bias, "chunk_size": 2, "backend": backend}
    got = fl.sp_linear_loss(hidden, weight, teacher, loss_type, 1.2, teacher_vocab="align", **opts)
    want = fl.sp_linear_loss(hidden, weight, by_hand, loss_type, 1.2, **opts)
    assert torch.isfinite(want)
    assert torch.equal(got, want)
    g_got = torch.autograd.grad(got, (hidden, weight, bias))
    g_want = torch.autograd.grad(want, (hidden, weight, bias))
    for a, b in zip(g_got, g_want):
        assert torch.equal(a, b)
    if not wider and kind != "topk":  # the student's extra actions are padded: no gradient reaches their rows
        assert torch.equal(g_got[1][Vt:], torch.zeros_like(g_got[1][Vt:]))


def test_align_leaves_bad_teachers_to_their_checks(device):
    """align never hides a malformed teacher: an integer dense teacher, or a linear teacher whose
    bias does not match its head, raises the error that names it."""
    q, z = make_sp_inputs(N, V - 3, torch.float32, device, seed=9)
    z = torch.cat([z.detach(), z.detach()[:, :3]], dim=1)
    with pytest.raises(TypeError, match="floating-point"):
        fl.sp_kl_loss(q.long(), z, 1.0, teacher_vocab="align")
    hidden, weight, _, _, _ = make_sp_linear_inputs(N, 4, V, "dense", device=device, seed=10)
    _, _, _, teacher, _ = make_sp_linear_inputs(N, 4, V + 4, "linear", device=device, seed=11)
    bad = fl.LinearTeacher(teacher.hidden, teacher.weight, teacher.bias[:-2])
    with pytest.raises(ValueError, match="teacher.bias"):
        fl.sp_linear_loss(hidden, weight, bad, "js", teacher_vocab="align")
