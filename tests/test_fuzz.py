"""Fuzz suite: hypothesis draws dtypes, shapes, masks, extreme values, NaN and inf, and
non-contiguous views, and holds every public loss, on both backends, to three invariants:

1. the two paths agree, NaN and inf included (``torch`` against ``triton`` where a kernel exists,
   ``tensorized`` against ``online`` for Sinkhorn);
2. a finite input gives a finite loss, gradient and metrics;
3. or both paths raise the same ``ValueError``/``TypeError``; any other exception fails.

The default example counts keep CI short under the Triton interpreter and are derandomized, so CI
sees the same cases every run; ``pytest --fuzz-long`` draws twenty times more, at random.
"""

from __future__ import annotations

import math
import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fusedloss as fl

LONG = os.environ.get("FUSEDLOSS_FUZZ_LONG") == "1"
FLOAT_DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# Disagreement allowed between two paths in the same dtype, relative to the result's magnitude.
RTOL = {torch.float32: 1e-4, torch.float64: 1e-9, torch.bfloat16: 2.0**-6, torch.float16: 2.0**-9}
pytest.importorskip("triton")


def fuzz(examples: int):
    return settings(max_examples=examples * 20 if LONG else examples, deadline=None, derandomize=not LONG,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.function_scoped_fixture])


# Value kinds. "finite" kinds feed invariant 2; "special" puts NaN, inf or -inf somewhere.
FINITE_KINDS = ["normal", "large", "tiny", "zeros", "ties"]
SPECIALS = ["nan", "inf", "-inf"]


def values(g: torch.Generator, shape, dtype, kind: str, device) -> torch.Tensor:
    x = torch.randn(shape, generator=g, dtype=torch.float64)
    if kind == "large":
        x = x * 1e3
    elif kind == "tiny":
        x = x * 1e-6
    elif kind == "zeros":
        x = torch.zeros(shape, dtype=torch.float64)
    elif kind == "ties":
        x = torch.randint(-2, 3, shape, generator=g).to(torch.float64)
    return x.to(dtype).to(device)


def inject(g: torch.Generator, x: torch.Tensor, special: str | None) -> torch.Tensor:
    """``x`` with one or two entries set to ``special`` (None: unchanged)."""
    if special is None or x.numel() == 0:
        return x
    x = x.clone()
    flat = x.view(-1)
    for _ in range(int(torch.randint(1, 3, (1,), generator=g))):
        flat[int(torch.randint(0, flat.numel(), (1,), generator=g))] = float(special)
    return x


def layout(x: torch.Tensor, kind: str) -> torch.Tensor:
    """The same values as a contiguous tensor, a view into a wider last dimension, or a view whose
    leading dimensions are permuted in memory."""
    if kind == "padded":
        wide = torch.zeros((*x.shape[:-1], x.shape[-1] + 3), dtype=x.dtype, device=x.device)
        wide[..., : x.shape[-1]] = x
        return wide[..., : x.shape[-1]]
    if kind == "permuted" and x.dim() >= 2:
        return x.transpose(0, 1).contiguous().transpose(0, 1)
    return x


def assert_agree(a, b, dtype, what: str, scale: float = 1.0) -> None:
    """Two paths' results: the same NaN and ±inf pattern, finite values within RTOL of the
    magnitude of the result, or of ``scale`` (the magnitude of the terms a sum or mean adds up,
    whose rounding depends on the order of the additions)."""
    if isinstance(a, float):
        a, b = torch.tensor(a), torch.tensor(b)
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    assert a.shape == b.shape, f"{what}: shapes {tuple(a.shape)} vs {tuple(b.shape)}"
    assert torch.equal(torch.isnan(a), torch.isnan(b)), f"{what}: NaN differs\n{a}\n{b}"
    for inf in (math.inf, -math.inf):
        assert torch.equal(a == inf, b == inf), f"{what}: {inf} differs\n{a}\n{b}"
    fin = torch.isfinite(a) & torch.isfinite(b)
    if fin.any():
        scale = max(1.0, scale, float(b[fin].abs().max()))
        err = float((a[fin] - b[fin]).abs().max())
        assert err <= RTOL[dtype] * scale, f"{what}: paths differ by {err:.3e} (scale {scale:.3e})\n{a}\n{b}"


def assert_finite(result, what: str) -> None:
    for name, t in result.items():
        t = torch.as_tensor(t)
        assert torch.isfinite(t).all(), f"{what}: {name} is not finite for a finite input: {t}"


def run_both(call, backends):
    """``call(backend)`` on each backend: a dict of results, or the ``ValueError``/``TypeError``
    they all raise (then the same type and message)."""
    results, errors = {}, {}
    for backend in backends:
        try:
            results[backend] = call(backend)
        except (ValueError, TypeError) as exc:
            errors[backend] = exc
    if errors:
        assert len(errors) == len(backends), f"only {sorted(errors)} raised: {errors}"
        first = next(iter(errors.values()))
        assert all(type(e) is type(first) and str(e) == str(first) for e in errors.values()), errors
        return None
    return results


def compare(results, dtype, finite_input: bool, what: str, skip=(), scale_of=None):
    if results is None:
        return
    items = list(results.items())
    (name_a, a) = items[0]
    scale = 1.0
    if scale_of is not None:
        terms = a[scale_of].detach().double()
        terms = terms[torch.isfinite(terms)]
        scale = float(terms.abs().max()) if terms.numel() else 1.0
    for name_b, b in items[1:]:
        for key in a:
            if key not in skip:
                assert_agree(b[key], a[key], dtype, f"{what} {key} ({name_b} vs {name_a})", scale)
    if finite_input:
        for name, r in items:
            assert_finite(r, f"{what} [{name}]")


KERNEL_BACKENDS = ["torch", "triton"]


@fuzz(20)
@given(seed=st.integers(0, 2**31 - 1), B=st.integers(1, 3), S=st.integers(2, 5), A=st.integers(1, 7),
       dtype=st.sampled_from(FLOAT_DTYPES), kind=st.sampled_from(FINITE_KINDS),
       special=st.sampled_from([None, None, *SPECIALS]), target=st.sampled_from(["q", "q_target", "reward"]),
       lay=st.sampled_from(["contiguous", "padded", "permuted"]),
       opts=st.fixed_dictionaries({"cql_weight": st.sampled_from([0.0, 0.3]), "double_dqn": st.booleans(),
                                   "td_loss": st.sampled_from(["l2", "huber"]),
                                   "normalize_reward_mean": st.booleans(), "normalize_reward_std": st.booleans()}),
       mask=st.booleans(), weight=st.booleans(), bad_action=st.sampled_from([False, False, False, True]))
def test_fuzz_dqn(seed, B, S, A, dtype, kind, special, target, lay, opts, mask, weight, bad_action, device):
    if opts["normalize_reward_std"] and S < 3:
        opts["normalize_reward_std"] = False
    g = torch.Generator().manual_seed(seed)
    q = values(g, (B, S, A), dtype, kind, device)
    qt = values(g, (B, S, A), dtype, kind, device)
    step = {"action": torch.randint(0, A, (B, S), generator=g).to(device),
            "reward": values(g, (B, S), torch.float32, kind, device),
            "done": torch.randint(0, 3, (B, S), generator=g).to(device)}
    if bad_action:
        step["action"][0, -1] = A
    if mask:
        step["mask"] = torch.ones(B, S, dtype=torch.bool, device=device)
        step["mask"][:, -1] = torch.rand(B, generator=g).to(device) < 0.5
    if weight:
        step["weight"] = (torch.rand(B, S, generator=g) + 0.5).to(device)
    q = inject(g, q, special) if target == "q" else q
    qt = inject(g, qt, special) if target == "q_target" else qt
    step["reward"] = inject(g, step["reward"], special) if target == "reward" else step["reward"]
    q, qt = layout(q, lay), layout(qt, lay)

    def call(backend):
        qq = q.detach().clone().requires_grad_(True) if lay == "contiguous" else q.detach().requires_grad_(True)
        cfg = fl.DqnLossConfig(backend=backend, return_td_error=True, mask_key="mask" if mask else None,
                               weight_key="weight" if weight else None, **opts)
        loss, metrics, td = fl.dqn_loss(step, {"dqn": qq, "dqn_target": qt}, cfg)
        (grad,) = torch.autograd.grad(loss, qq)
        return {"loss": loss, "grad": grad, "td": td, **metrics}

    # A sequence with one valid transition (or equal rewards) has std 0: rewards / (0 + 1e-8) reach
    # 1e8 and the gradient overflows fp16's range on both paths, rightly.
    fits = not (dtype == torch.float16 and opts["normalize_reward_std"])
    # The metrics are means over transitions: their rounding scales with the per-transition terms.
    compare(run_both(call, KERNEL_BACKENDS), dtype, special is None and fits, "dqn", scale_of="td")


@fuzz(12)
@given(seed=st.integers(0, 2**31 - 1), B=st.integers(1, 3), S=st.integers(2, 12), A=st.integers(1, 6),
       dtype=st.sampled_from(FLOAT_DTYPES), kind=st.sampled_from(FINITE_KINDS),
       special=st.sampled_from([None, None, *SPECIALS]), target=st.sampled_from(["q", "q_target", "reward"]),
       multi=st.one_of(st.fixed_dictionaries({"n_step": st.sampled_from([2, 3, 5])}),
                       st.fixed_dictionaries({"td_lambda": st.sampled_from([0.0, 0.5, 0.95, 1.0])})),
       opts=st.fixed_dictionaries({"cql_weight": st.sampled_from([0.0, 0.3]), "double_dqn": st.booleans(),
                                   "value_rescaling": st.booleans(), "normalize_reward_mean": st.booleans()}),
       mask=st.booleans(), p_done=st.sampled_from([0.0, 0.2, 0.6]))
def test_fuzz_dqn_multistep(seed, B, S, A, dtype, kind, special, target, multi, opts, mask, p_done, device):
    g = torch.Generator().manual_seed(seed)
    q = values(g, (B, S, A), dtype, kind, device)
    qt = values(g, (B, S, A), dtype, kind, device)
    ends = torch.rand(B, S, generator=g) < p_done
    step = {"action": torch.randint(0, A, (B, S), generator=g).to(device),
            "reward": values(g, (B, S), torch.float32, kind, device),
            "done": torch.where(ends, torch.randint(1, 3, (B, S), generator=g), 0).to(device)}
    if mask:  # a hole anywhere and a padded tail
        step["mask"] = torch.ones(B, S, dtype=torch.bool, device=device)
        step["mask"][:, int(torch.randint(0, S, (1,), generator=g))] = False
        step["mask"][:, -1] = torch.rand(B, generator=g).to(device) < 0.5
    q = inject(g, q, special) if target == "q" else q
    qt = inject(g, qt, special) if target == "q_target" else qt
    step["reward"] = inject(g, step["reward"], special) if target == "reward" else step["reward"]

    def call(backend):
        qq = q.detach().clone().requires_grad_(True)
        cfg = fl.DqnLossConfig(backend=backend, return_td_error=True, mask_key="mask" if mask else None,
                               **multi, **opts)
        loss, metrics, td = fl.dqn_loss(step, {"dqn": qq, "dqn_target": qt}, cfg)
        (grad,) = torch.autograd.grad(loss, qq)
        return {"loss": loss, "grad": grad, "td": td, **metrics}

    compare(run_both(call, KERNEL_BACKENDS), dtype, special is None, "dqn multi-step", scale_of="td")


@fuzz(20)
@given(seed=st.integers(0, 2**31 - 1), N=st.integers(1, 4), A=st.integers(1, 40), dtype=st.sampled_from(FLOAT_DTYPES),
       kind=st.sampled_from(FINITE_KINDS), loss_type=st.sampled_from(list(fl.losses.sp.SP_LOSS_TYPES)),
       T=st.sampled_from([0.3, 1.0, 2.5]), eps=st.sampled_from([0.0, 0.1]),
       pad=st.sampled_from(["none", "-inf", "finfo.min", "all-inf"]), special=st.sampled_from([None, None, *SPECIALS]),
       target=st.sampled_from(["logits", "q_star"]), lay=st.sampled_from(["contiguous", "padded", "permuted"]))
def test_fuzz_sp(seed, N, A, dtype, kind, loss_type, T, eps, pad, special, target, lay, device):
    g = torch.Generator().manual_seed(seed)
    q = values(g, (N, A), dtype, kind, device)
    z = values(g, (N, A), dtype, kind, device)
    if pad != "none" and A > 1:
        value = torch.finfo(dtype).min if pad == "finfo.min" else float("-inf")
        cols = torch.rand(A, generator=g) < 0.4
        cols[0] = False
        q[:, cols.to(device)] = value
        if pad == "all-inf":
            q[-1] = float("-inf")  # a fully padded row: an error on both paths
    q = inject(g, q, special) if target == "q_star" else q
    z = inject(g, z, special) if target == "logits" else z
    q, z = layout(q, lay), layout(z, lay)

    def call(backend):
        zz = z.detach().requires_grad_(True)
        cfg = fl.SpLossConfig(loss_type=loss_type, temperature=T, label_smoothing=eps, backend=backend)
        loss, metrics = fl.sp_loss({"q_star": q}, zz, cfg)
        (grad,) = torch.autograd.grad(loss, zz)
        rows = fl.sp_kl_loss(q, zz.detach(), T, eps, reduction="none", backend=backend, check_inputs=False)
        return {"loss": loss, "grad": grad, "rows": rows, **metrics}

    # ce-soft-bwd and kl-bwd weigh log p by the student's mass: a finfo.min teacher entry is a real,
    # astronomically unlikely action there, and its log p overflows fp32 (use -inf for padding).
    # The loss is then inf on both paths; its gradient is non-finite on both, not in one pattern.
    overflow = pad == "finfo.min" and loss_type in ("ce-soft-bwd", "kl-bwd")
    compare(run_both(call, KERNEL_BACKENDS), dtype, special is None and not overflow, "sp",
            skip=("grad",) if overflow else ())


@fuzz(15)
@given(seed=st.integers(0, 2**31 - 1), N=st.integers(1, 4), V=st.integers(1, 40), k=st.integers(1, 6),
       dtype=st.sampled_from(FLOAT_DTYPES), kind=st.sampled_from(FINITE_KINDS),
       loss_type=st.sampled_from(["kl-fwd", "ce-soft-fwd"]), T=st.sampled_from([0.3, 1.0, 2.5]),
       unused=st.sampled_from([0.0, 0.4, 1.0]), special=st.sampled_from([None, None, *SPECIALS]),
       target=st.sampled_from(["logprob", "logits"]), beta=st.sampled_from([1e-6, 0.1, 0.5, 0.9, 1 - 1e-6]))
def test_fuzz_sp_topk_and_js_beta(seed, N, V, k, dtype, kind, loss_type, T, unused, special, target, beta, device):
    """The top-k teacher (unused slots, rows with none, -inf log-probs) and the generalized JSD."""
    g = torch.Generator().manual_seed(seed)
    k = min(k, V)
    idx = torch.stack([torch.randperm(V, generator=g)[:k] for _ in range(N)])
    idx = idx.masked_fill(torch.rand(N, k, generator=g) < unused, -1).to(device)
    lp = values(g, (N, k), dtype, kind, device)
    z = values(g, (N, V), dtype, kind, device)
    q = values(g, (N, V), dtype, kind, device)
    lp = inject(g, lp, special) if target == "logprob" else lp
    z = inject(g, z, special) if target == "logits" else z

    def call(backend):
        zz = z.detach().requires_grad_(True)
        loss = fl.sp_topk_loss(idx, lp, zz, loss_type, T, backend=backend)
        js = fl.sp_js_loss(q, zz, T, beta=beta, reduction="none", backend=backend, check_inputs=False)
        (grad,) = torch.autograd.grad(loss + js.sum(), zz)
        return {"loss": loss, "js": js, "grad": grad}

    compare(run_both(call, KERNEL_BACKENDS), dtype, special is None, "sp top-k / js beta")


@fuzz(15)
@given(seed=st.integers(0, 2**31 - 1), N=st.integers(1, 4), V=st.integers(1, 30), k=st.integers(1, 6),
       dtype=st.sampled_from(FLOAT_DTYPES), kind=st.sampled_from(FINITE_KINDS), T=st.sampled_from([0.3, 1.0, 2.5]),
       unused=st.sampled_from([0.0, 0.4]), dup=st.booleans(), bad_index=st.booleans(),
       special=st.sampled_from([None, None, *SPECIALS]))
def test_fuzz_sp_topk_unchecked(seed, N, V, k, dtype, kind, T, unused, dup, bad_index, special, device):
    """``sp_topk_loss(check_inputs=False)``: repeated indices, indices outside ``[0, V)`` (unused
    slots) and non-finite log-probabilities give the same results on both paths."""
    g = torch.Generator().manual_seed(seed)
    k = min(k, V)
    idx = torch.stack([torch.randperm(V, generator=g)[:k] for _ in range(N)])
    idx = idx.masked_fill(torch.rand(N, k, generator=g) < unused, -1)
    if dup and k > 1:
        idx[:, -1] = idx[:, 0]
    if bad_index:
        idx[0, 0] = V + 3
    idx = idx.to(device)
    lp = inject(g, values(g, (N, k), dtype, kind, device), special)
    z = values(g, (N, V), dtype, kind, device)

    def call(backend):
        zz = z.detach().requires_grad_(True)
        rows = fl.sp_topk_loss(idx, lp, zz, "kl-fwd", T, reduction="none", backend=backend, check_inputs=False)
        (grad,) = torch.autograd.grad(rows.sum(), zz)
        return {"rows": rows, "grad": grad}

    compare(run_both(call, KERNEL_BACKENDS), dtype, special is None, "sp top-k unchecked")


@fuzz(10)
@given(seed=st.integers(0, 2**31 - 1), N=st.integers(1, 7), H=st.integers(1, 6), V=st.integers(1, 30),
       dtype=st.sampled_from(FLOAT_DTYPES), teacher=st.sampled_from(["dense", "topk", "linear"]),
       loss_type=st.sampled_from(["kl-fwd", "ce-soft-fwd", "js", "kl-bwd"]), bias=st.booleans(),
       row_weight=st.booleans(), reduction=st.sampled_from(["mean", "sum", "none"]), chunk=st.integers(1, 4),
       special=st.sampled_from([None, None, None, *SPECIALS]))
def test_fuzz_sp_linear(seed, N, H, V, dtype, teacher, loss_type, bias, row_weight, reduction, chunk, special,
                        device):
    """``sp_linear_loss`` over every teacher kind, bias, row weights (with a zero), reductions and
    chunk sizes: both paths agree with each other, gradients included."""
    from fusedloss.testing import make_sp_linear_inputs

    if teacher == "topk" and loss_type not in ("kl-fwd", "ce-soft-fwd"):
        loss_type = "kl-fwd"
    h, w, b, t, rw = make_sp_linear_inputs(N, H, V, teacher, dtype, device, seed=seed % 1000, bias=bias)
    if special is not None:
        h = inject(torch.Generator().manual_seed(seed), h.detach(), special).requires_grad_(True)

    def call(backend):
        hh, ww = h.detach().requires_grad_(True), w.detach().requires_grad_(True)
        bb = None if b is None else b.detach().requires_grad_(True)
        out = fl.sp_linear_loss(hh, ww, t, loss_type, bias=bb, row_weight=rw if row_weight else None,
                                reduction=reduction, chunk_size=chunk, backend=backend, check_inputs=False)
        grads = torch.autograd.grad(out.sum(), [hh, ww] + ([bb] if bb is not None else []))
        return {"loss": out, **{f"grad{i}": gi for i, gi in enumerate(grads)}}

    # a NaN hidden row reaches every weight-gradient entry; a zero row weight must still keep it out
    compare(run_both(call, KERNEL_BACKENDS), dtype, special is None, "sp_linear", scale_of="loss")


@fuzz(20)
@given(seed=st.integers(0, 2**31 - 1), N=st.integers(1, 7), H=st.integers(1, 6), V=st.integers(1, 40),
       dtype=st.sampled_from(FLOAT_DTYPES), kind=st.sampled_from(FINITE_KINDS), bias=st.booleans(),
       fn=st.sampled_from(["logprob", "ce-mean", "ce-none"]), T=st.sampled_from([1.0, 0.5, 2.0]),
       softcap=st.sampled_from([None, 3.0]), ls=st.sampled_from([0.0, 0.1]), z_loss=st.sampled_from([0.0, 1e-3]),
       ignore=st.sampled_from([0.0, 0.4, 1.0]), chunk=st.integers(1, 4), special=st.sampled_from([None, None, *SPECIALS]))
def test_fuzz_lm_head(seed, N, H, V, dtype, kind, bias, fn, T, softcap, ls, z_loss, ignore, chunk, special, device):
    """``linear_logprob`` (with entropy) and ``linear_cross_entropy`` over values, ignored tokens
    (none, some, all; their hidden rows NaN), softcap, temperature, smoothing, z-loss and chunks:
    both paths agree, gradients included, and a finite input gives finite results."""
    from fusedloss.testing import make_lm_head_inputs

    g = torch.Generator().manual_seed(seed)
    h, w, b, y = make_lm_head_inputs(N, H, V, dtype, device, seed=seed % 1000, bias=bias, ignore_frac=ignore)
    keep = (y != -100).to(device)
    base = torch.where(keep[:, None], values(g, (N, H), dtype, kind, device), h.detach())
    h = inject(g, base, special) if special is not None else base

    def call(backend):
        hh, ww = h.detach().requires_grad_(True), w.detach().requires_grad_(True)
        bb = None if b is None else b.detach().requires_grad_(True)
        leaves = [hh, ww] + ([bb] if bb is not None else [])
        if fn == "logprob":
            lp, ent = fl.linear_logprob(hh, ww, y, bias=bb, temperature=T, softcap=softcap, return_entropy=True,
                                        chunk_size=chunk, backend=backend, check_inputs=False)
            up = torch.linspace(-1, 1, N, dtype=torch.float32, device=lp.device)
            grads = torch.autograd.grad((lp * up + ent * up.flip(0)).sum(), leaves)
            out = {"logprob": lp, "entropy": ent}
        else:
            red = "mean" if fn == "ce-mean" else "none"
            loss = fl.linear_cross_entropy(hh, ww, y, bias=bb, reduction=red, label_smoothing=ls, z_loss=z_loss,
                                           softcap=softcap, chunk_size=chunk, backend=backend, check_inputs=False)
            grads = torch.autograd.grad(loss.sum(), leaves)
            out = {"loss": loss}
        return {**out, **{f"grad{i}": gi for i, gi in enumerate(grads)}}

    # an injected special value in a kept row reaches that row and every weight-gradient entry only
    compare(run_both(call, KERNEL_BACKENDS), dtype, special is None, "lm_head",
            scale_of="logprob" if fn == "logprob" else "loss")


@fuzz(3)
@given(seed=st.integers(0, 2**31 - 1), opts=st.sampled_from([{}, {"cql_weight": 0.2}, {"n_step": 3}]),
       special=st.sampled_from([None, "nan"]))
def test_fuzz_lazy_metrics_compile_and_deepcopy(seed, opts, special, device):
    """Lazy DQN metrics: a fullgraph compile returns the eager metrics, and they deep-copy."""
    import copy

    from fusedloss.testing import make_dqn_inputs

    torch._dynamo.reset()
    step, out = make_dqn_inputs(2, 6, 4, torch.float32, device, seed=seed % 1000)
    g = torch.Generator().manual_seed(seed)
    out = {"dqn": inject(g, out["dqn"].detach(), special).requires_grad_(True), "dqn_target": out["dqn_target"]}
    for backend in KERNEL_BACKENDS:
        cfg = fl.DqnLossConfig(backend=backend, metrics_mode="lazy", **opts)
        loss_c, m_c = torch.compile(lambda s, o: fl.dqn_loss(s, o, cfg), fullgraph=True)(step, out)
        loss_e, m_e = fl.dqn_loss(step, out, cfg)
        assert_agree(loss_c, loss_e, torch.float32, f"compiled loss [{backend}]")
        for key in m_e:
            assert_agree(m_c[key], m_e[key], torch.float32, f"compiled {key} [{backend}]")
        assert dict(copy.deepcopy(m_c)).keys() == dict(m_e).keys()


@fuzz(20)
@given(seed=st.integers(0, 2**31 - 1), B=st.integers(1, 3), S=st.integers(0, 300),
       dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]),
       kind=st.sampled_from(["normal", "large", "zeros"]), eta=st.sampled_from([0.0, 0.3, 0.9, 1.0]),
       masked=st.booleans(), special=st.sampled_from([None, None, *SPECIALS]))
def test_fuzz_sequence_priority(seed, B, S, dtype, kind, eta, masked, special, device):
    """``sequence_priority`` against the float64 formula: masked entries never reach it, an
    infinite error gives inf for any eta, and a finite fp16 input never overflows."""
    g = torch.Generator().manual_seed(seed)
    x = inject(g, values(g, (B, S), torch.float64, kind, device), special).to(dtype)  # fp16 rows of 1e3 sum past 65504
    mask = (torch.rand(B, S, generator=g) < 0.7).to(device) if masked else None
    got = fl.sequence_priority(x, mask, eta)
    a = x.double().abs()
    valid = torch.ones_like(a, dtype=torch.bool) if mask is None else mask
    a = torch.where(valid, a, torch.zeros_like(a))
    peak = a.amax(dim=1) if S else torch.zeros(B, dtype=torch.float64)
    mean = a.sum(dim=1) / valid.sum(dim=1).clamp(min=1) if S else torch.zeros(B, dtype=torch.float64)
    want = peak if eta == 1.0 else mean if eta == 0.0 else eta * peak + (1 - eta) * mean
    assert got.dtype == dtype
    assert_agree(got, want.to(dtype), dtype, "sequence_priority")
    if special is None:
        assert torch.isfinite(got).all()


@fuzz(12)
@given(seed=st.integers(0, 2**31 - 1), B=st.integers(1, 2), S=st.integers(2, 3), A=st.integers(1, 5),
       D=st.sampled_from([2, 4, 6]), dtype=st.sampled_from(FLOAT_DTYPES), kind=st.sampled_from(["normal", "tiny", "zeros"]),
       special=st.sampled_from([None, None, *SPECIALS]), target=st.sampled_from(["online", "target", "reward"]))
def test_fuzz_vec_dqn(seed, B, S, A, D, dtype, kind, special, target, device):
    from fusedloss.testing import make_vec_dqn_inputs

    step, online, target_vecs = make_vec_dqn_inputs(B, S, A, D, dtype, device, seed=seed % 2**31, argmax_margin=1e-2)
    if kind != "normal":
        # Tiny vectors have huge gradients (1/max(|u|, 1e-8)): fp16 cannot hold them, rightly.
        scale = (0.0 if kind == "zeros" else 1e-6) if dtype != torch.float16 else 1e-2
        online = (online.detach() * scale).to(dtype)
    g = torch.Generator().manual_seed(seed)
    online = inject(g, online.detach(), special) if target == "online" else online.detach()
    target_vecs = inject(g, target_vecs, special) if target == "target" else target_vecs
    step["reward"] = inject(g, step["reward"], special) if target == "reward" else step["reward"]

    def call(backend):
        oo = online.clone().requires_grad_(True)
        loss, metrics = fl.vec_dqn_loss(step, oo, target_vecs, fl.VecDqnLossConfig(backend=backend))
        (grad,) = torch.autograd.grad(loss, oo)
        return {"loss": loss, "grad": grad, **metrics,
                "scores": fl.vec_dqn_scores(target_vecs, backend=backend)}

    compare(run_both(call, KERNEL_BACKENDS), dtype, special is None, "vec_dqn")


@fuzz(15)
@given(seed=st.integers(0, 2**31 - 1), lead=st.lists(st.integers(0, 3), min_size=0, max_size=2),
       D=st.sampled_from([2, 4, 10]), dtype=st.sampled_from(FLOAT_DTYPES),
       theta_kind=st.sampled_from(["float", "full", "broadcast", "bad"]), special=st.sampled_from([None, *SPECIALS]))
def test_fuzz_rope(seed, lead, D, dtype, theta_kind, special, device):
    g = torch.Generator().manual_seed(seed)
    x = inject(g, values(g, (*lead, D), dtype, "normal", device), special)
    if theta_kind == "float":
        theta = 0.7
    elif theta_kind == "full":
        theta = values(g, tuple(lead), torch.float32, "normal", device)
    elif theta_kind == "broadcast":
        theta = values(g, (1,) * len(lead), torch.float32, "normal", device)
    else:
        theta = values(g, (2, *lead), torch.float32, "normal", device)

    def call(backend):
        xx = x.detach().requires_grad_(True)
        out = fl.rope_rotate(xx, theta, backend=backend)
        (grad,) = torch.autograd.grad(out, xx, torch.ones_like(out))
        return {"out": out, "grad": grad}

    compare(run_both(call, KERNEL_BACKENDS), dtype, special is None, "rope")


@fuzz(15)
@given(seed=st.integers(0, 2**31 - 1), N=st.integers(1, 4), A=st.integers(1, 6), dtype=st.sampled_from(FLOAT_DTYPES),
       kind=st.sampled_from(FINITE_KINDS), loss_type=st.sampled_from(["mse", "mae"]),
       special=st.sampled_from([None, None, "nan", "-inf"]), target=st.sampled_from(["logits", "q_star"]))
def test_fuzz_sv(seed, N, A, dtype, kind, loss_type, special, target, device):
    g = torch.Generator().manual_seed(seed)
    q = values(g, (N, A), dtype, kind, device)
    z = values(g, (N, A), dtype, kind, device)
    q[:, 0] = float("-inf") if A > 1 else q[:, 0]  # padding
    q = inject(g, q, special) if target == "q_star" else q
    z = inject(g, z, special) if target == "logits" else z

    def call(backend):
        zz = z.detach().requires_grad_(True)
        loss, metrics = fl.sv_loss({"q_star": q}, zz, fl.SvLossConfig(loss_type=loss_type, backend=backend))
        (grad,) = torch.autograd.grad(loss, zz)
        return {"loss": loss, "grad": grad, **metrics}

    # A NaN or -inf teacher entry is padding: only a special value in a used logit spoils the result.
    compare(run_both(call, ["torch"]), dtype, special is None or target == "q_star", "sv")


@fuzz(15)
@given(seed=st.integers(0, 2**31 - 1), T=st.integers(1, 8), E=st.integers(1, 6), dtype=st.sampled_from(FLOAT_DTYPES),
       kind=st.sampled_from(FINITE_KINDS), top_k=st.integers(1, 3), masked=st.sampled_from(["none", "some"]),
       special=st.sampled_from([None, *SPECIALS]))
def test_fuzz_moe(seed, T, E, dtype, kind, top_k, masked, special, device):
    g = torch.Generator().manual_seed(seed)
    x = values(g, (T, E), dtype, kind, device)
    top_k = min(top_k, E)
    mask = None if masked == "none" else torch.rand(T, generator=g).to(device) < 0.6
    if mask is not None and not mask.all():
        x[(~mask).nonzero()[0, 0]] = float(special) if special is not None else 0.0  # a padded token's garbage
        masked_only = True
    else:
        x = inject(g, x, special)
        masked_only = False

    def call(backend):
        xx = x.detach().requires_grad_(True)
        z = fl.router_z_loss(xx)
        lb = fl.switch_load_balancing_loss(xx, top_k, mask)
        gz, glb = (torch.autograd.grad(v, xx)[0] for v in (z, lb))
        return {"z": z, "gz": gz, "lb": lb, "glb": glb}

    res = run_both(call, ["torch"])["torch"]
    if special is None:
        assert_finite(res, "moe")
    elif masked_only:  # router_z has no mask; the load-balancing loss must not see the padded token
        assert_finite({"lb": res["lb"], "glb": res["glb"]}, "switch with a masked special")


@fuzz(4)
@given(seed=st.integers(0, 2**31 - 1), N=st.integers(1, 12), M=st.integers(1, 12),
       dtypes=st.sampled_from([(torch.float32, torch.float32), (torch.float32, torch.float64),
                               (torch.bfloat16, torch.float32)]),
       kind=st.sampled_from(["normal", "ties"]), p=st.sampled_from([1, 2]), weighted=st.booleans())
def test_fuzz_sinkhorn(seed, N, M, dtypes, kind, p, weighted, device):
    g = torch.Generator().manual_seed(seed)
    pa, ps = values(g, (N, 2), dtypes[0], kind, device), values(g, (N, 3), dtypes[0], kind, device)
    ta, ts = values(g, (M, 2), dtypes[1], kind, device), values(g, (M, 3), dtypes[1], kind, device)
    wp = (torch.rand(N, generator=g) + 0.1).to(device) if weighted else None

    def call(backend):
        a = pa.detach().requires_grad_(True)
        loss = fl.sinkhorn_loss(a, ta, ps, ts, p=p, blur=0.5, scaling=0.7, backend=backend, weights_pred=wp)
        (grad,) = torch.autograd.grad(loss, a)
        return {"loss": loss, "grad": grad}

    res = run_both(call, ["tensorized", "online"])
    dtype = torch.float64 if torch.float64 in dtypes else torch.float32
    for r in res.values():
        assert r["loss"].dtype == dtype
    # The two backends sum in different orders: agree to fp32 (or fp64) rounding of the iteration.
    a, b = res["tensorized"], res["online"]
    for key in a:
        x, y = a[key].detach().double(), b[key].detach().double()
        assert torch.allclose(x, y, rtol=1e-3, atol=1e-3 * float(y.abs().max())), (key, x, y)
    assert_finite(a, "sinkhorn tensorized")
    assert_finite(b, "sinkhorn online")
