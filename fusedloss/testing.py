"""Input makers and the one tolerance rule, shared by tests/, bench/ and ``python -m fusedloss verify``.

The tolerance rule: a path's error against a float64 evaluation must be within twice the PyTorch
reference's own error in the same dtype, plus a small floor relative to the magnitude of the result.
"""

from __future__ import annotations

import math

import torch

__all__ = [
    "make_dqn_inputs",
    "make_vec_dqn_inputs",
    "make_sp_inputs",
    "make_topk_inputs",
    "make_sp_linear_inputs",
    "make_lm_head_inputs",
    "make_router_logits",
    "make_sinkhorn_inputs",
    "max_abs_error",
    "tolerance",
    "assert_close_to_float64",
    "check_close_to_float64",
    "nan_like",
    "assert_canaries_intact",
    "CANARY",
    "ZERO_FILL_OPS",
    "FLOORS",
]

# Floor of the tolerance, relative to max(1, |float64 value|), per dtype. For bf16/fp16 it is one
# ulp (at most 2^-7 of the magnitude for bf16): two paths whose fp32 values differ in the last bits may round to neighbouring
# low-precision values, a whole ulp apart, where the reference alone is at most half an ulp off.
FLOORS = {torch.float64: 1e-10, torch.float32: 2e-6, torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10}


def _gen(seed: int | None, device) -> torch.Generator:
    """A generator of its own on ``device``, seeded with ``seed`` (a fresh random seed when None);
    the global RNG is left alone."""
    g = torch.Generator(device=device)
    if seed is None:
        g.seed()
    else:
        g.manual_seed(seed)
    return g


def _randn(shape, g, dtype, device, scale=1.0):
    return (torch.randn(shape, generator=g, dtype=torch.float64, device=g.device) * scale).to(dtype=dtype, device=device)


def make_dqn_inputs(B=4, S=7, A=5, dtype=torch.float32, device="cpu", seed=None, weight=False, mask=False):
    """``(step_stream, out)`` for :func:`fusedloss.dqn_loss`; all three ``done`` values occur."""
    g = _gen(seed, device)
    step = {
        "action": torch.randint(0, A, (B, S), generator=g, device=g.device),
        "reward": _randn((B, S), g, torch.float32, device),
        "xformed_reward": _randn((B, S), g, torch.float32, device, 0.5),
        "done": torch.randint(0, 3, (B, S), generator=g, device=g.device),
    }
    if weight:
        step["weight"] = torch.rand((B, S), generator=g, device=g.device) + 0.5
    if mask:
        lengths = torch.randint(max(2, S // 2), S + 1, (B,), generator=g, device=g.device)
        step["mask"] = torch.arange(S, device=g.device)[None, :] < lengths[:, None]
    out = {
        "dqn": _randn((B, S, A), g, dtype, device).requires_grad_(True),
        "dqn_target": _randn((B, S, A), g, dtype, device),
    }
    return step, out


def make_vec_dqn_inputs(B=3, S=5, A=6, D=4, dtype=torch.float32, device="cpu", seed=None, argmax_margin=0.0):
    """``(step_stream, online_vecs, target_vecs)``. With ``argmax_margin > 0`` the target vectors at
    ``t >= 1`` are redrawn where the float64 scores' top two are closer than the margin, so the
    greedy pick cannot flip between precisions and blur a comparison."""
    from .losses.vec_dqn import vec_dqn_scores_reference

    g = _gen(seed, device)
    step = {
        "action": torch.randint(0, A, (B, S), generator=g, device=g.device),
        "reward": _randn((B, S), g, torch.float32, device),
        "xformed_reward": _randn((B, S), g, torch.float32, device, 0.5),
    }
    online = _randn((B, S, A, D), g, dtype, device).requires_grad_(True)
    target = _randn((B, S, A, D), g, dtype, device)
    if argmax_margin > 0 and A > 1:
        for _ in range(200):
            top = vec_dqn_scores_reference(target[:, 1:].double()).topk(2, dim=-1).values
            close = (top[..., 0] - top[..., 1]) <= argmax_margin
            if not bool(close.any()):
                break
            fresh = _randn((B, S - 1, A, D), g, dtype, device)
            target[:, 1:][close] = fresh[close]
        else:
            raise RuntimeError("could not draw target vectors with clear greedy actions")
    return step, online, target


def make_sp_inputs(N=6, A=10, dtype=torch.float32, device="cpu", seed=None, pad_frac=0.0, scale=2.0):
    """``(q_targets, logits)`` ``[N, A]``; ``pad_frac`` of the teacher entries become ``-inf``,
    never a whole row."""
    g = _gen(seed, device)
    q = _randn((N, A), g, torch.float64, device, scale)
    if pad_frac > 0:
        pad = torch.rand((N, A), generator=g, device=g.device) < pad_frac
        pad[torch.arange(N, device=g.device), torch.randint(0, A, (N,), generator=g, device=g.device)] = False
        q = q.masked_fill(pad, float("-inf"))
    logits = _randn((N, A), g, dtype, device, scale).requires_grad_(True)
    return q.to(dtype=dtype, device=device), logits


def make_topk_inputs(N=6, V=40, k=5, dtype=torch.float32, device="cpu", seed=None, unused=0.0, scale=2.0):
    """``(teacher_index, teacher_logprob, logits)`` for :func:`fusedloss.sp_topk_loss`: ``k``
    distinct indices per row, ``unused`` of the slots set to -1 (slot 0 of row 0 always kept; with
    ``unused > 0`` and ``N > 2``, row 2 has no used slot), normalised log-probabilities ``[N, k]``
    and student logits ``[N, V]`` that require grad."""
    g = _gen(seed, device)
    idx = torch.rand((N, V), generator=g, device=g.device).topk(k, dim=-1).indices
    drop = torch.rand((N, k), generator=g, device=g.device) < unused
    drop[0, 0] = False
    if unused > 0 and N > 2:
        drop[2] = True
    idx = idx.masked_fill(drop, -1)
    logprob = torch.log_softmax(_randn((N, k), g, torch.float64, device, scale), dim=-1).to(dtype)
    logits = _randn((N, V), g, dtype, device, scale).requires_grad_(True)
    return idx.to(device), logprob, logits


def make_sp_linear_inputs(N=8, H=4, V=40, teacher="linear", dtype=torch.float32, device="cpu", seed=None,
                          bias=False, pad=0.2):
    """``(hidden, weight, bias, teacher, row_weight)`` for :func:`fusedloss.sp_linear_loss`: the
    student's ``[N, H]`` hidden states and ``[V, H]`` head (and ``[V]`` bias when ``bias``), all
    requiring grad; ``teacher`` ``"dense"`` (``[N, V]`` values, ``pad`` of them ``-inf``, never a
    whole row), ``"topk"`` (a :class:`~fusedloss.TopKTeacher` of ``min(6, V)`` slots) or
    ``"linear"`` (a :class:`~fusedloss.LinearTeacher` of width ``H + 2`` with a bias); and
    ``row_weight`` ``[N]`` in ``[0.5, 1.5)`` with row 1 (when ``N > 1``) at 0."""
    from .losses.sp_linear import LinearTeacher, TopKTeacher

    g = _gen(seed, device)
    head = 2.0 * H**-0.5  # logits of order 1..2
    hidden = _randn((N, H), g, dtype, device).requires_grad_(True)
    weight = _randn((V, H), g, dtype, device, head).requires_grad_(True)
    b = _randn((V,), g, dtype, device, 0.5).requires_grad_(True) if bias else None
    if teacher == "dense":
        values = _randn((N, V), g, dtype, device, 2.0)
        holes = torch.rand((N, V), generator=g, device=g.device) < pad
        holes[:, 0] = False
        t = values.masked_fill(holes.to(device), float("-inf"))
    elif teacher == "topk":
        idx, lp, _ = make_topk_inputs(N, V, min(6, V), dtype, device, seed=None if seed is None else seed + 1,
                                      unused=0.3)
        t = TopKTeacher(idx, lp)
    elif teacher == "linear":
        Ht = H + 2
        t = LinearTeacher(_randn((N, Ht), g, dtype, device), _randn((V, Ht), g, dtype, device, 2.0 * Ht**-0.5),
                          _randn((V,), g, dtype, device, 0.5))
    else:
        raise ValueError(f"teacher must be 'dense', 'topk' or 'linear', got {teacher!r}.")
    row_weight = (torch.rand(N, generator=g, device=g.device, dtype=torch.float64) + 0.5).to(dtype).to(device)
    if N > 1:
        row_weight[1] = 0.0
    return hidden, weight, b, t, row_weight


def make_lm_head_inputs(N=8, H=4, V=40, dtype=torch.float32, device="cpu", seed=None, bias=False,
                        ignore_frac=0.25, ignore_index=-100):
    """``(hidden, weight, bias, labels)`` for :func:`fusedloss.linear_logprob` and
    :func:`fusedloss.linear_cross_entropy`: ``[N, H]`` hidden states, a ``[V, H]`` head (and a
    ``[V]`` bias when ``bias``), all requiring grad, logits of order 1 to 3; int64 ``labels``
    ``[N]`` with about ``ignore_frac`` of them ``ignore_index``, whose hidden rows are NaN (they
    must change nothing)."""
    g = _gen(seed, device)
    hidden = _randn((N, H), g, dtype, device)
    weight = _randn((V, H), g, dtype, device, 2.0 * H**-0.5)
    b = _randn((V,), g, dtype, device, 0.5).requires_grad_(True) if bias else None
    labels = torch.randint(0, V, (N,), generator=g, device=g.device)
    ignored = torch.rand(N, generator=g, device=g.device) < ignore_frac
    labels = labels.masked_fill(ignored, ignore_index).to(device)
    hidden = hidden.masked_fill(ignored.to(device)[:, None], float("nan"))
    return hidden.requires_grad_(True), weight.requires_grad_(True), b, labels


def make_router_logits(T=16, E=8, dtype=torch.float32, device="cpu", seed=None):
    g = _gen(seed, device)
    return _randn((T, E), g, dtype, device).requires_grad_(True)


def make_sinkhorn_inputs(N=30, M=40, Da=2, Ds=3, dtype=torch.float32, device="cpu", seed=None, batch=None):
    g = _gen(seed, device)
    lead = () if batch is None else (batch,)
    pa = _randn((*lead, N, Da), g, dtype, device).requires_grad_(True)
    ta = _randn((*lead, M, Da), g, dtype, device)
    ps = _randn((*lead, N, Ds), g, dtype, device).requires_grad_(True)
    ts = _randn((*lead, M, Ds), g, dtype, device)
    return pa, ta, ps, ts


# aten ops that fill a tensor with a constant: none may run in a fused path's backward (tests/test_hidden_work.py,
# tests/test_model.py).
ZERO_FILL_OPS = frozenset({"zeros", "zeros_like", "new_zeros", "fill_", "fill", "full", "full_like", "zero_"})

CANARY = -7777.0  # what the margins around a nan_like buffer hold; a kernel never computes it exactly


def nan_like(shape, dtype, device) -> torch.Tensor:
    """An output buffer poisoned with NaN, so anything a kernel never writes shows up, inside a
    larger allocation whose margins before and after hold :data:`CANARY`, so a write past either end
    shows up too (:func:`assert_canaries_intact`). The buffer is contiguous."""
    shape = tuple(shape)
    n = math.prod(shape)
    margin = max(256, shape[-1] if shape else 1)
    whole = torch.full((n + 2 * margin,), CANARY, dtype=dtype, device=device)
    whole[margin:margin + n] = float("nan")
    return whole[margin:margin + n].view(shape)


def assert_canaries_intact(*buffers: torch.Tensor) -> None:
    """Raise ``AssertionError`` if a kernel wrote outside any of these :func:`nan_like` buffers."""
    for i, t in enumerate(buffers):
        whole = t._base
        if whole is None or whole.dim() != 1:
            raise TypeError(f"buffer {i} was not made by nan_like")
        start = t.storage_offset() - whole.storage_offset()
        outside = torch.cat((whole[:start], whole[start + t.numel():]))
        bad = outside != CANARY
        if bool(bad.any()):
            raise AssertionError(f"buffer {i} {tuple(t.shape)}: {int(bad.sum())} element(s) written outside it")


def max_abs_error(x: torch.Tensor, ref: torch.Tensor) -> float:
    x64, r64 = x.detach().to(torch.float64).cpu(), ref.detach().to(torch.float64).cpu()
    if x64.shape != r64.shape:
        raise AssertionError(f"shape {tuple(x64.shape)} != reference shape {tuple(r64.shape)}")
    if not torch.equal(torch.isnan(x64), torch.isnan(r64)):
        return math.inf
    both = ~torch.isnan(r64)
    return float((x64[both] - r64[both]).abs().max()) if both.any() else 0.0


def tolerance(ref_err: float, ref64: torch.Tensor, dtype: torch.dtype) -> float:
    scale = max(1.0, float(ref64.detach().abs().max())) if ref64.numel() else 1.0
    return 2.0 * ref_err + FLOORS[dtype] * scale


def check_close_to_float64(out: torch.Tensor, ref_same_dtype: torch.Tensor | None, ref64: torch.Tensor,
                           dtype: torch.dtype) -> tuple[bool, float, float, float]:
    """The one tolerance rule: ``(passed, error, reference error, tolerance)`` of ``out`` against
    ``ref64``, allowed twice the error of ``ref_same_dtype`` (the reference path in ``dtype``; None
    when ``out`` is that reference itself) plus a floor."""
    err = max_abs_error(out, ref64)
    ref_err = 0.0 if ref_same_dtype is None else max_abs_error(ref_same_dtype, ref64)
    tol = tolerance(ref_err, ref64, dtype)
    return err <= tol, err, ref_err, tol


def assert_close_to_float64(out: torch.Tensor, ref_same_dtype: torch.Tensor, ref64: torch.Tensor,
                            dtype: torch.dtype, what: str = "output") -> None:
    """``out`` must be within 2x the reference's own error in ``dtype``, plus a floor."""
    ok, err, ref_err, tol = check_close_to_float64(out, ref_same_dtype, ref64, dtype)
    if not ok:
        raise AssertionError(
            f"{what}: error {err:.3e} against float64 exceeds {tol:.3e} "
            f"(2 x reference error {ref_err:.3e} + floor, dtype {dtype})"
        )
