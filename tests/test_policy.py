"""policy_loss and group_advantages against float64 loops written independently of the library,
token by token and row by row, masks included (the denominators of the aggregation modes are where
peers have had bugs), plus the edges: NaN outside the mask, empty rows, an empty batch, errors."""

import math

import pytest
import torch

import fusedloss as fl
from fusedloss.losses.policy import LOSS_AGG_MODES


def _inputs(B=5, T=7, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    lp = -torch.rand(B, T, generator=g, dtype=torch.float64) * 3
    old = lp + 0.4 * torch.randn(B, T, generator=g, dtype=torch.float64)
    ref = lp + 0.3 * torch.randn(B, T, generator=g, dtype=torch.float64)
    ent = torch.rand(B, T, generator=g, dtype=torch.float64)
    adv = torch.randn(B, T, generator=g, dtype=torch.float64)
    mask = torch.rand(B, T, generator=g) < 0.7
    mask[1] = False  # a row with no valid token
    mask[0, 0] = True
    return [t.to(dtype) for t in (lp, old, ref, ent, adv)] + [mask]


def _loop_loss(lp, old, ref, ent, adv, mask, *, clip_low, clip_high, dual_clip, agg, kl_coef, est, ent_coef):
    """The loss, token by token in Python floats."""
    B, T = len(mask), len(mask[0])
    high = clip_low if clip_high is None else clip_high

    def token_terms(b, t):
        r = math.exp(lp[b][t] - old[b][t])
        a = adv[b][t]
        pg = max(-a * r, -a * min(max(r, 1 - clip_low), 1 + high))
        if dual_clip is not None and a < 0:
            pg = min(pg, -a * dual_clip)
        d = ref[b][t] - lp[b][t]
        kl = {"k1": -d, "k2": 0.5 * d * d, "k3": math.exp(d) - d - 1}[est]
        return pg, kl, ent[b][t]

    def reduce(which):
        rows = []
        for b in range(B):
            vals = [token_terms(b, t)[which] for t in range(T) if mask[b][t]]
            rows.append(vals)
        n = sum(len(v) for v in rows)
        full = [v for v in rows if v]
        if agg == "token-mean":
            return sum(sum(v) for v in rows) / n if n else 0.0
        if agg == "seq-mean-token-sum":
            return sum(sum(v) for v in full) / len(full) if full else 0.0
        if agg == "seq-mean-token-mean":
            return sum(sum(v) / len(v) for v in full) / len(full) if full else 0.0
        return sum(sum(v) for v in rows) / T

    return reduce(0) + kl_coef * reduce(1) - ent_coef * reduce(2)


def _lists(*ts):
    return [t.double().tolist() for t in ts]


OPTIONS = [dict(clip_low=0.2, clip_high=None, dual_clip=None, kl_coef=0.0, est="k3", ent_coef=0.0),
           dict(clip_low=0.2, clip_high=0.28, dual_clip=3.0, kl_coef=0.05, est="k3", ent_coef=0.01),
           dict(clip_low=0.1, clip_high=0.3, dual_clip=None, kl_coef=0.1, est="k1", ent_coef=0.0),
           dict(clip_low=0.3, clip_high=None, dual_clip=1.5, kl_coef=0.2, est="k2", ent_coef=0.02)]


@pytest.mark.parametrize("opts", OPTIONS, ids=lambda o: f"clip{o['clip_low']}/{o['clip_high']},dual{o['dual_clip']},"
                                                         f"{o['est']}{o['kl_coef']},ent{o['ent_coef']}")
@pytest.mark.parametrize("agg", LOSS_AGG_MODES)
def test_policy_loss_matches_a_float64_loop(agg, opts):
    lp, old, ref, ent, adv, mask = _inputs(dtype=torch.float64)
    want = _loop_loss(*_lists(lp, old, ref, ent, adv), mask.tolist(), agg=agg, **opts)
    lp = lp.requires_grad_(True)
    ent = ent.requires_grad_(True)
    loss, m = fl.policy_loss(lp, old, adv, mask, clip_low=opts["clip_low"], clip_high=opts["clip_high"],
                             dual_clip=opts["dual_clip"], loss_agg=agg, ref_logprob=ref, kl_coef=opts["kl_coef"],
                             kl_estimator=opts["est"], entropy=ent, entropy_coef=opts["ent_coef"])
    assert float(loss.detach()) == pytest.approx(want, rel=1e-12, abs=1e-12)
    assert m["policy_loss"] == pytest.approx(want, rel=1e-12, abs=1e-12)
    # The gradient, by central differences of the loop, at a few valid and one masked token.
    g_lp, g_ent = torch.autograd.grad(loss, (lp, ent))
    for (b, t) in [(0, 0), (2, 3), (4, 6), (1, 2)]:
        for which, g in ((0, g_lp), (3, g_ent)):
            h = 1e-6
            plus, minus = _lists(lp.detach(), old, ref, ent.detach(), adv), _lists(lp.detach(), old, ref, ent.detach(),
                                                                                   adv)
            plus[which][b][t] += h
            minus[which][b][t] -= h
            num = (_loop_loss(*plus, mask.tolist(), agg=agg, **opts)
                   - _loop_loss(*minus, mask.tolist(), agg=agg, **opts)) / (2 * h)
            assert float(g[b, t]) == pytest.approx(num, rel=1e-5, abs=1e-8), (b, t, which)
    assert float(g_lp[1].abs().max()) == 0.0  # the empty row


def test_policy_loss_metrics():
    lp, old, ref, ent, adv, mask = _inputs(B=4, T=9, seed=3, dtype=torch.float64)
    _, m = fl.policy_loss(lp, old, adv, mask, clip_low=0.2)
    r, a, mm = (lp - old).exp().tolist(), adv.tolist(), mask.tolist()
    valid = [(b, t) for b in range(4) for t in range(9) if mm[b][t]]
    clipped = [(-a[b][t] * min(max(r[b][t], 0.8), 1.2)) > (-a[b][t] * r[b][t]) for b, t in valid]
    assert m["pg_clipfrac"] == pytest.approx(sum(clipped) / len(valid), rel=1e-12)
    assert m["ppo_kl"] == pytest.approx(sum(float(old[b, t] - lp[b, t]) for b, t in valid) / len(valid), rel=1e-12)
    assert 0 < m["pg_clipfrac"] < 1


@pytest.mark.parametrize("agg", LOSS_AGG_MODES)
def test_what_the_mask_excludes_never_counts(agg):
    lp, old, ref, ent, adv, mask = _inputs()
    bad = [t.clone() for t in (lp, old, ref, ent, adv)]
    for t, v in zip(bad, (float("nan"), float("inf"), float("-inf"), float("nan"), float("inf"))):
        t[~mask] = v
    lp_a, lp_b = lp.clone().requires_grad_(True), bad[0].clone().requires_grad_(True)
    kw = dict(loss_agg=agg, kl_coef=0.1, entropy_coef=0.01, dual_clip=2.0)
    la, ma = fl.policy_loss(lp_a, old, adv, mask, ref_logprob=ref, entropy=ent, **kw)
    lb, mb = fl.policy_loss(lp_b, bad[1], bad[4], mask, ref_logprob=bad[2], entropy=bad[3], **kw)
    assert torch.equal(la, lb) and ma == mb
    ga, gb = torch.autograd.grad(la, lp_a), torch.autograd.grad(lb, lp_b)
    assert torch.equal(ga[0], gb[0]) and torch.isfinite(gb[0]).all()


@pytest.mark.parametrize("agg", LOSS_AGG_MODES)
def test_an_empty_batch_gives_zero_and_zero_gradient(agg):
    lp = torch.randn(3, 4, requires_grad=True)
    loss, m = fl.policy_loss(lp, torch.randn(3, 4), torch.randn(3), torch.zeros(3, 4, dtype=torch.bool), loss_agg=agg)
    assert float(loss.detach()) == 0.0 and m["pg_clipfrac"] == 0.0
    (g,) = torch.autograd.grad(loss, lp)
    assert torch.equal(g, torch.zeros_like(g))


def test_policy_loss_lazy_metrics_compile_and_module():
    torch._dynamo.reset()
    lp, old, ref, ent, adv, mask = _inputs(dtype=torch.float32)
    f = torch.compile(lambda *a: fl.policy_loss(*a, ref_logprob=ref, kl_coef=0.1, metrics_mode="lazy"),
                      fullgraph=True)
    loss_c, m_c = f(lp, old, adv, mask)
    loss_e, m_e = fl.policy_loss(lp, old, adv, mask, ref_logprob=ref, kl_coef=0.1, metrics_mode="lazy")
    assert torch.allclose(loss_c, loss_e) and dict(m_c) == pytest.approx(dict(m_e))
    module = fl.build_loss({"type": "policy", "params": {"kl_coef": 0.1, "metrics_mode": "lazy"}})
    assert torch.equal(module(lp, old, adv, mask, ref_logprob=ref)[0], loss_e)
    bf = fl.policy_loss(lp.bfloat16(), old.bfloat16(), adv.bfloat16(), mask)[0]
    assert bf.dtype == torch.float32


def test_policy_loss_errors():
    lp, old, ref, ent, adv, mask = _inputs()
    with pytest.raises(TypeError, match="mask must be a bool tensor"):
        fl.policy_loss(lp, old, adv, mask.float())
    with pytest.raises(ValueError, match="advantages must have shape"):
        fl.policy_loss(lp, old, adv[:, :3], mask)
    with pytest.raises(ValueError, match="kl_coef > 0 needs ref_logprob"):
        fl.policy_loss(lp, old, adv, mask, kl_coef=0.1)
    with pytest.raises(ValueError, match="entropy_coef > 0 needs entropy"):
        fl.policy_loss(lp, old, adv, mask, entropy_coef=0.1)
    with pytest.raises(ValueError, match="dual_clip must be None or a finite number > 1"):
        fl.policy_loss(lp, old, adv, mask, dual_clip=0.5)
    with pytest.raises(ValueError, match="loss_agg must be one of"):
        fl.policy_loss(lp, old, adv, mask, loss_agg="mean")


def test_group_advantages_match_a_loop():
    g = torch.Generator().manual_seed(5)
    rewards = torch.randn(12, generator=g, dtype=torch.float64)
    got = fl.group_advantages(rewards, 4)
    r = rewards.tolist()
    for i in range(3):
        grp = r[4 * i:4 * i + 4]
        mu = sum(grp) / 4
        sd = math.sqrt(sum((x - mu) ** 2 for x in grp) / 3)  # unbiased
        for j in range(4):
            assert float(got[4 * i + j]) == pytest.approx((grp[j] - mu) / (sd + 1e-6), rel=1e-12)
    plain = fl.group_advantages(rewards, 4, normalize_std=False)
    assert float(plain[0]) == pytest.approx(r[0] - sum(r[:4]) / 4, rel=1e-12)
    mask = torch.rand(12, 6, generator=g) < 0.5
    tok = fl.group_advantages(rewards, 4, mask=mask)
    assert tok.shape == (12, 6) and torch.equal(tok[~mask], torch.zeros_like(tok[~mask]))
    assert torch.equal(tok[mask], got[:, None].expand(12, 6)[mask])
    with pytest.raises(ValueError, match="not a multiple of group_size"):
        fl.group_advantages(rewards, 5)
    with pytest.raises(ValueError, match="a group of one has no std"):
        fl.group_advantages(rewards, 1)


def test_a_huge_log_ratio_is_clamped_not_nan():
    """verl clamps the log-ratio to [-20, 20]: exp(100) would overflow and 0·inf make the gradient NaN."""
    lp = torch.tensor([[100.0, 0.0]], requires_grad=True)
    mask = torch.ones(1, 2, dtype=torch.bool)
    for adv, dual in ((1.0, None), (-1.0, 3.0), (-1.0, None)):
        loss, _ = fl.policy_loss(lp, torch.zeros(1, 2), torch.tensor([adv]), mask, dual_clip=dual)
        (g,) = torch.autograd.grad(loss, lp)
        assert torch.isfinite(loss) and torch.isfinite(g).all(), (adv, dual, loss, g)
    loss, _ = fl.policy_loss(torch.zeros(2, 0), torch.zeros(2, 0), torch.zeros(2), torch.zeros(2, 0, dtype=torch.bool),
                             loss_agg="seq-mean-token-sum-norm")
    assert float(loss) == 0.0  # T = 0: a mean over nothing
