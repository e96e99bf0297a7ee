"""Multi-step DQN targets (n-step, Peng's Q(lambda), value rescaling) and ``sequence_priority``.

Three layers: a plain float64 loop written from the issue's definitions checks the reference; the
fused kernel (interpreter on CPU, compiled on CUDA) is checked against the reference and float64;
the config, the registry and the errors are checked on their own.
"""

import math

import pytest
import torch

import fusedloss as fl
from fusedloss.testing import make_dqn_inputs


def _h(x, eps):
    return math.copysign(math.sqrt(abs(x) + 1.0) - 1.0, x) + eps * x


def _h_inv(x, eps):
    y = ((math.sqrt(1.0 + 4.0 * eps * (abs(x) + 1.0 + eps)) - 1.0) / (2.0 * eps)) ** 2 - 1.0
    return math.copysign(y, x)


def loop_targets(step, out, cfg):
    """Per-sequence lists of (valid, q[t, a], G[t]) from the definitions, one transition at a time."""
    q = out["dqn"].detach().double().tolist()
    qt = out["dqn_target"].detach().double().tolist()
    act, done = step["action"].tolist(), step["done"].tolist()
    rew = step["xformed_reward" if cfg.use_xformed_reward else "reward"].double().tolist()
    B, S = len(q), len(q[0])
    mask = step[cfg.mask_key].tolist() if cfg.mask_key else [[True] * S for _ in range(B)]
    rows = []
    for b in range(B):
        n_tr = S - 1
        valid = [bool(mask[b][t] and mask[b][t + 1]) for t in range(n_tr)]
        r = [rew[b][t + 1] for t in range(n_tr)]
        used = [x for x, v in zip(r, valid) if v]
        if cfg.normalize_reward_mean:
            mu = sum(used) / max(len(used), 1)
            r = [x - mu for x in r]
            used = [x - mu for x in used]
        if cfg.normalize_reward_std:
            mu = sum(used) / max(len(used), 1)
            sd = math.sqrt(sum((x - mu) ** 2 for x in used) / max(len(used) - 1, 1))
            r = [x / (sd + cfg.normalize_reward_eps) * cfg.normalize_reward_std_target for x in r]
        r = [x * cfg.reward_scale + cfg.reward_shift for x in r]
        d = [done[b][t + 1] for t in range(n_tr)]
        disc = [{0: cfg.gamma, 1: cfg.gamma_terminal, 2: cfg.gamma_truncated}[x] for x in d]

        def V(k):  # bootstrap value at step k
            if cfg.double_dqn:
                row = q[b][k]
                v = qt[b][k][row.index(max(row))]
            else:
                v = max(qt[b][k])
            return _h_inv(v, cfg.value_rescaling_eps) if cfg.value_rescaling else v

        G = [0.0] * n_tr
        if cfg.td_lambda is not None:
            lam = cfg.td_lambda
            for t in reversed(range(n_tr)):
                if d[t] == 0 and t + 1 <= S - 2 and valid[t + 1]:
                    G[t] = r[t] + disc[t] * ((1 - lam) * V(t + 1) + lam * G[t + 1])
                else:
                    G[t] = r[t] + disc[t] * V(t + 1)
        else:
            for t in range(n_tr):
                m = 0
                for j in range(cfg.n_step):
                    if t + j > S - 2 or not valid[t + j]:
                        break
                    m = j + 1
                    if d[t + j] != 0:
                        break
                if m == 0:
                    continue
                G[t] = sum(cfg.gamma**j * r[t + j] for j in range(m)) + cfg.gamma ** (m - 1) * disc[t + m - 1] * V(t + m)
        if cfg.value_rescaling:
            G = [_h(x, cfg.value_rescaling_eps) for x in G]
        rows.append([(valid[t], q[b][t][act[b][t + 1]], G[t], q[b][t]) for t in range(n_tr)])
    return rows


def loop_loss(step, out, cfg):
    """The mean loss, ``|td|`` rows and the mean target over valid transitions, from :func:`loop_targets`."""
    rows = loop_targets(step, out, cfg)
    w = step[cfg.weight_key].double().tolist() if cfg.weight_key else None
    terms, targets, td = [], [], []
    for b, row in enumerate(rows):
        td.append([])
        for t, (valid, qa, g, qrow) in enumerate(row):
            td[-1].append(abs(qa - g) if valid else 0.0)
            if not valid:
                continue
            diff = qa - g
            if cfg.td_loss == "huber":
                per = 0.5 * diff**2 if abs(diff) <= cfg.huber_delta else cfg.huber_delta * (abs(diff) - 0.5 * cfg.huber_delta)
            else:
                per = diff**2
            if cfg.cql_weight > 0:
                lse = math.log(sum(math.exp(x) for x in qrow))
                per += cfg.cql_weight * (abs(g) + cfg.cql_scale_q_eps) * (lse - qa)
            terms.append(per * (w[b][t + 1] if w else 1.0))
            targets.append(g)
    return sum(terms) / len(terms), torch.tensor(td, dtype=torch.float64), sum(targets) / len(targets)


def multistep_inputs(B, S, A, dtype, device, seed=None, p_done=0.15):
    """DQN inputs whose sequences run for a while between dones (both kinds), with a tail padding
    mask and, for S > 4, a hole in the middle of the first sequence."""
    step, out = make_dqn_inputs(B, S, A, dtype, device, seed=seed, weight=True, mask=True)
    g = torch.Generator(device=step["done"].device).manual_seed(0 if seed is None else seed + 1)
    ends = torch.rand((B, S), generator=g, device=g.device) < p_done
    step["done"] = torch.where(ends, step["done"].clamp(min=1), torch.zeros_like(step["done"]))
    if S > 4:
        step["mask"][0, S // 2] = False
    return step, out


LOOP_OPTIONS = {
    "n1": {},
    "n3": {"n_step": 3},
    "n5-gammas": {"n_step": 5, "gamma": 0.9, "gamma_terminal": 0.3, "gamma_truncated": 0.8},
    "n5-double-rescale": {"n_step": 5, "double_dqn": True, "value_rescaling": True},
    "n3-mask-norm-cql": {"n_step": 3, "mask_key": "mask", "normalize_reward_mean": True, "normalize_reward_std": True,
                         "cql_weight": 0.3},
    "n10-huber-weight": {"n_step": 10, "td_loss": "huber", "huber_delta": 0.5, "weight_key": "weight"},
    "lam0": {"td_lambda": 0.0},
    "lam0.5": {"td_lambda": 0.5, "gamma_truncated": 0.9},
    "lam0.95-mask-double": {"td_lambda": 0.95, "mask_key": "mask", "double_dqn": True},
    "lam1": {"td_lambda": 1.0, "gamma_truncated": 0.7},
    "lam0.95-rescale-cql-norm": {"td_lambda": 0.95, "value_rescaling": True, "value_rescaling_eps": 1e-2,
                                 "cql_weight": 0.2, "normalize_reward_mean": True, "reward_scale": 3.0},
    "rescale-1step": {"value_rescaling": True, "mask_key": "mask"},
}


@pytest.mark.parametrize("S", [2, 3, 12], ids=lambda s: f"S{s}")
@pytest.mark.parametrize("opts", list(LOOP_OPTIONS))
def test_reference_matches_loop(opts, S):
    cfg = fl.DqnLossConfig(backend="torch", return_td_error=True, **LOOP_OPTIONS[opts])
    if cfg.normalize_reward_std and S < 3:
        pytest.skip("reward std needs S >= 3")
    step, out = multistep_inputs(3, S, 5, torch.float64, "cpu", seed=S, p_done=0.3)
    step["reward"] = step["reward"].double()
    if cfg.mask_key:
        step["mask"][:, :2] = True  # every sequence keeps a valid transition
    loss, metrics, td = fl.dqn_loss(step, out, cfg)
    want_loss, want_td, want_target = loop_loss(step, out, cfg)
    assert loss.item() == pytest.approx(want_loss, rel=1e-10, abs=1e-12)
    assert torch.allclose(td, want_td, rtol=1e-10, atol=1e-12)
    assert metrics["q_values_target"] == pytest.approx(want_target, rel=1e-9, abs=1e-12)


def test_lambda_limits():
    """lambda = 0 is the one-step target; lambda = 1 is the discounted return to the end of the
    sequence (or the first done), bootstrapped there."""
    step, out = multistep_inputs(4, 9, 6, torch.float64, "cpu", seed=3, p_done=0.3)
    one = fl.dqn_loss(step, out, fl.DqnLossConfig(backend="torch", return_td_error=True))[2]
    lam0 = fl.dqn_loss(step, out, fl.DqnLossConfig(backend="torch", return_td_error=True, td_lambda=0.0))[2]
    assert torch.allclose(lam0, one, rtol=1e-12, atol=1e-12)
    # Without dones and with gamma = 1, lambda = 1 gives sum of rewards plus V at the sequence end.
    step["done"].zero_()
    cfg = fl.DqnLossConfig(backend="torch", return_td_error=True, td_lambda=1.0, gamma=1.0)
    lam1 = fl.dqn_loss(step, out, cfg)[2]
    r = step["reward"].double()[:, 1:]
    ret = r.flip(1).cumsum(1).flip(1) + out["dqn_target"].detach()[:, -1].amax(-1, keepdim=True)
    qa = out["dqn"].detach()[:, :-1].gather(-1, step["action"][:, 1:, None]).squeeze(-1)
    assert torch.allclose(lam1, (qa - ret).abs(), rtol=1e-12, atol=1e-12)
    # n_step >= S - 1 with gamma = 1 is the same Monte-Carlo return.
    n_big = fl.dqn_loss(step, out, fl.DqnLossConfig(backend="torch", return_td_error=True, n_step=20, gamma=1.0))[2]
    assert torch.allclose(n_big, lam1, rtol=1e-12, atol=1e-12)


def test_value_rescaling_round_trip():
    from fusedloss.losses.dqn import value_rescale, value_rescale_inverse

    x = torch.cat([torch.linspace(-1e4, 1e4, 2001, dtype=torch.float64), torch.tensor([0.0, 1e-9, -1e-9])])
    for eps in (1e-3, 1e-2, 0.5):
        assert torch.allclose(value_rescale_inverse(value_rescale(x, eps), eps), x, rtol=1e-9, atol=1e-12)
        assert value_rescale(x, eps).tolist() == pytest.approx([_h(v, eps) for v in x.tolist()], rel=1e-12, abs=1e-15)
    # fp32 keeps relative precision near 0, where the textbook formula of h^-1 cancels.
    small = torch.tensor([1e-6, -3e-5, 2e-4], dtype=torch.float32)
    back = value_rescale_inverse(value_rescale(small, 1e-3), 1e-3)
    assert torch.allclose(back, small, rtol=1e-5, atol=0)


def test_defaults_are_the_one_step_target():
    step, out = multistep_inputs(3, 8, 5, torch.float64, "cpu", seed=1)
    base = fl.dqn_loss(step, out, fl.DqnLossConfig(backend="torch", return_td_error=True, cql_weight=0.1))
    same = fl.dqn_loss(step, out, fl.DqnLossConfig(backend="torch", return_td_error=True, cql_weight=0.1, n_step=1,
                                                   td_lambda=None, value_rescaling=False))
    assert torch.equal(base[0], same[0]) and torch.equal(base[2], same[2])
    assert base[1] == same[1]


@pytest.mark.parametrize("opts", ["n3", "lam0.95-mask-double"])
def test_reference_gradcheck(opts):
    cfg = fl.DqnLossConfig(backend="torch", cql_weight=0.2, **LOOP_OPTIONS[opts])
    step, out = multistep_inputs(2, 6, 3, torch.float64, "cpu", seed=5)
    qt = out["dqn_target"]
    assert torch.autograd.gradcheck(lambda x: fl.dqn_loss(step, {"dqn": x, "dqn_target": qt}, cfg)[0], (out["dqn"],))


# ---------------------------------------------------------------- the fused kernel

KERNEL_OPTIONS = {
    "n3": {"n_step": 3},
    "n5-double-cql": {"n_step": 5, "double_dqn": True, "cql_weight": 0.2},
    "n5-rescale-mask-norm": {"n_step": 5, "value_rescaling": True, "mask_key": "mask", "normalize_reward_mean": True,
                             "normalize_reward_std": True},
    "lam0": {"td_lambda": 0.0},
    "lam0.5-rescale-double": {"td_lambda": 0.5, "value_rescaling": True, "double_dqn": True},
    "lam0.95-cql-huber-weight": {"td_lambda": 0.95, "cql_weight": 0.3, "td_loss": "huber", "weight_key": "weight",
                                 "gamma_truncated": 0.9},
    "lam1-mask-norm": {"td_lambda": 1.0, "mask_key": "mask", "normalize_reward_mean": True, "reward_scale": 0.5},
    "rescale-1step": {"value_rescaling": True, "cql_weight": 0.1},
}
# (B, S, A, max_block_a): S = 2; a single sequence; S over several chunks of T_BLOCK (32 at A = 18);
# an action space wider than one tile.
KERNEL_SHAPES = {"B3-S2-A5": (3, 2, 5, 1024), "B1-S9-A7": (1, 9, 7, 1024), "B2-S70-A18-chunks": (2, 70, 18, 1024),
                 "B2-S40-A300-tiled": (2, 40, 300, 64)}


@pytest.mark.parametrize("shape", list(KERNEL_SHAPES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("opts", list(KERNEL_OPTIONS))
def test_kernel_matches_reference(opts, dtype, shape, device):
    pytest.importorskip("triton")
    from test_kernels_dqn import check_kernel_against_reference

    B, S, A, max_block = KERNEL_SHAPES[shape]
    cfg = fl.DqnLossConfig(**KERNEL_OPTIONS[opts])
    if cfg.normalize_reward_std and S < 3:
        pytest.skip("reward std needs S >= 3")
    step, out = multistep_inputs(B, S, A, dtype, device)
    step["mask"][:, :2] = True
    check_kernel_against_reference(step, out, cfg, dtype, max_block, device)


@pytest.mark.parametrize("opts", ["n5-double-cql", "lam0.95-cql-huber-weight"])
def test_public_path_random_upstream_gradient(opts, device):
    pytest.importorskip("triton")
    step, out = multistep_inputs(3, 11, 9, torch.float32, device)
    up = torch.randn((), device=device)
    res = {}
    for backend in ("triton", "torch"):
        q = out["dqn"].detach().clone().requires_grad_(True)
        cfg = fl.DqnLossConfig(backend=backend, return_td_error=True, metrics_mode="lazy", **KERNEL_OPTIONS[opts])
        loss, metrics, td = fl.dqn_loss(step, {"dqn": q, "dqn_target": out["dqn_target"]}, cfg)
        (loss * up).backward()
        res[backend] = loss, metrics, td, q.grad
    (lk, mk, tk, gk), (lr, mr, tr, gr) = res["triton"], res["torch"]
    assert torch.allclose(lk, lr, rtol=1e-5, atol=1e-6)
    assert torch.allclose(tk, tr, rtol=1e-5, atol=1e-6)
    assert torch.allclose(gk, gr, rtol=1e-5, atol=1e-7)
    assert mk["q_values_target"] == pytest.approx(mr["q_values_target"], rel=1e-5, abs=1e-6)


def test_kernel_nan_beyond_a_cut_does_not_leak(device):
    """A NaN bootstrap value reaches only the transitions whose target uses it, on both paths:
    nothing behind a done (lambda) and nothing whose n-step window ends elsewhere."""
    pytest.importorskip("triton")
    step, out = multistep_inputs(1, 10, 4, torch.float32, device)
    step["done"].zero_()
    step["done"][0, 5] = 1  # transition 4 ends the episode
    out["dqn_target"] = out["dqn_target"].clone()
    out["dqn_target"][0, 8, 2] = float("nan")  # V[8]: lambda uses it in transitions 5..7, 3-step in 5 only
    for opts, nan_at in (({"td_lambda": 0.9}, [5, 6, 7]), ({"n_step": 3}, [5])):
        tds = {}
        for backend in ("triton", "torch"):
            cfg = fl.DqnLossConfig(backend=backend, return_td_error=True, metrics_mode="lazy", **opts)
            tds[backend] = fl.dqn_loss(step, out, cfg)[2][0].detach()
        want_nan = torch.zeros(9, dtype=torch.bool, device=tds["torch"].device)
        want_nan[nan_at] = True
        for td in tds.values():
            assert torch.equal(torch.isnan(td), want_nan) and torch.isfinite(td[~want_nan]).all()
        assert torch.allclose(tds["triton"][~want_nan], tds["torch"][~want_nan], rtol=1e-5, atol=1e-6)


@pytest.mark.cuda
@pytest.mark.parametrize("opts", [{"n_step": 5, "double_dqn": True, "value_rescaling": True},
                                  {"td_lambda": 0.95, "double_dqn": True, "value_rescaling": True}],
                         ids=["n5", "lam0.95"])
def test_multistep_launches_graph_and_compile(opts):
    """R2D2-like shapes: at most STEP_LAUNCHES launches a step (the forward's two, autograd's seed,
    the backward), CUDA-graph capture, and compile fullgraph."""
    from test_kernels_dqn import step_launches_and_graph_replay

    step, out = multistep_inputs(32, 80, 18, torch.bfloat16, "cuda")
    q = out["dqn"]
    cfg = fl.DqnLossConfig(backend="triton", cql_weight=0.1, metrics_mode="lazy", **opts)

    def call(q):
        loss, metrics = fl.dqn_loss(step, {"dqn": q, "dqn_target": out["dqn_target"]}, cfg)
        (g,) = torch.autograd.grad(loss, q)
        return loss, g

    want, got = step_launches_and_graph_replay(lambda: call(q))
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])

    loss_c = torch.compile(lambda q: fl.dqn_loss(step, {"dqn": q, "dqn_target": out["dqn_target"]}, cfg)[0],
                           fullgraph=True)(q)
    (g_c,) = torch.autograd.grad(loss_c, q)
    assert torch.equal(loss_c, want[0]) and torch.equal(g_c, want[1])


# ---------------------------------------------------------------- config, registry, errors

@pytest.mark.parametrize("kwargs,exc,match", [
    ({"n_step": 0}, ValueError, "n_step"),
    ({"n_step": -2}, ValueError, "n_step"),
    ({"n_step": 2.0}, TypeError, "n_step"),
    ({"n_step": True}, TypeError, "n_step"),
    ({"td_lambda": -0.1}, ValueError, "td_lambda"),
    ({"td_lambda": 1.5}, ValueError, "td_lambda"),
    ({"td_lambda": float("nan")}, ValueError, "td_lambda"),
    ({"td_lambda": "0.9"}, TypeError, "td_lambda"),
    ({"td_lambda": 0.9, "n_step": 3}, ValueError, "td_lambda.*n_step"),
    ({"value_rescaling": "yes"}, TypeError, "value_rescaling"),
    ({"value_rescaling_eps": 0.0}, ValueError, "value_rescaling_eps"),
    ({"value_rescaling_eps": -1e-3}, ValueError, "value_rescaling_eps"),
])
def test_config_errors(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        fl.DqnLossConfig(**kwargs)


def test_registry_yaml_r2d2():
    yaml = pytest.importorskip("yaml")
    spec = yaml.safe_load("""
type: dqn
params:
  gamma: 0.997
  n_step: 5
  double_dqn: true
  value_rescaling: true
  value_rescaling_eps: 1.0e-3
  mask_key: mask
  return_td_error: true
  backend: torch
""")
    loss_fn = fl.build_loss(spec)
    assert loss_fn.cfg.n_step == 5 and loss_fn.cfg.value_rescaling and loss_fn.cfg.td_lambda is None
    step, out = multistep_inputs(4, 12, 6, torch.float32, "cpu", seed=2)
    loss, metrics, td = loss_fn(step, out)
    want, want_td, _ = loop_loss(step, out, loss_fn.cfg)
    assert loss.item() == pytest.approx(want, rel=1e-5)
    assert torch.allclose(td.double(), want_td, rtol=1e-5, atol=1e-5)
    lam = fl.build_loss({"type": "dqn", "params": {"td_lambda": 0.95}})
    assert lam.cfg.td_lambda == 0.95
    with pytest.raises(ValueError, match="td_lambda"):
        fl.build_loss({"type": "dqn", "params": {"td_lambda": 0.95, "n_step": 5}})


def test_readme_r2d2_example_builds_and_runs():
    """The README's R2D2 YAML, as written there, builds through the registry and runs."""
    yaml = pytest.importorskip("yaml")
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    block = text.split("# r2d2.yaml\n", 1)[1].split("```", 1)[0]
    loss_fn = fl.build_loss(yaml.safe_load(block))
    assert loss_fn.cfg.n_step == 5 and loss_fn.cfg.metrics_mode == "lazy"
    step, out = multistep_inputs(3, 10, 4, torch.float32, "cpu", seed=7)
    step["mask"][:, :2] = True
    loss, metrics, td = loss_fn(step, out)
    valid = step["mask"][:, :-1] & step["mask"][:, 1:]
    prio = fl.sequence_priority(td, valid, eta=0.9)
    assert prio.shape == (3,) and torch.isfinite(prio).all()
    assert float(metrics["dqn_loss"]) == pytest.approx(float(loss.detach()))


# ---------------------------------------------------------------- sequence_priority

def _loop_priority(td, mask, eta):
    out = []
    for b in range(td.shape[0]):
        xs = [abs(float(td[b, t])) for t in range(td.shape[1]) if mask is None or bool(mask[b, t])]
        out.append(eta * max(xs) + (1 - eta) * sum(xs) / len(xs) if xs else 0.0)
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("eta", [0.0, 0.9, 1.0])
@pytest.mark.parametrize("masked", [False, True], ids=["no-mask", "mask"])
def test_sequence_priority_matches_loop(eta, masked):
    td = torch.randn(5, 7, dtype=torch.float64)
    mask = torch.rand(5, 7) < 0.6 if masked else None
    if masked:
        mask[0] = False  # a row with no valid transition gets 0
        mask[1] = True
        td[2][~mask[2]] = float("nan")  # never reaches the result
    got = fl.sequence_priority(td, mask, eta=eta)
    assert got.shape == (5,) and got.dtype == td.dtype
    assert torch.allclose(got, _loop_priority(td, mask, eta), rtol=1e-12, atol=0)
    if masked:
        assert got[0] == 0


def test_sequence_priority_from_dqn_loss():
    step, out = multistep_inputs(4, 9, 5, torch.float32, "cpu", seed=4)
    cfg = fl.DqnLossConfig(backend="torch", return_td_error=True, td_lambda=0.95, mask_key="mask")
    _, _, td = fl.dqn_loss(step, out, cfg)
    valid = step["mask"][:, :-1] & step["mask"][:, 1:]
    prio = fl.sequence_priority(td, valid)
    assert prio.shape == (4,) and torch.isfinite(prio).all() and (prio >= 0).all()
    assert torch.allclose(prio.double(), _loop_priority(td, valid, 0.9), rtol=1e-6)
    # lazy metrics and the priority make no host sync: they work on meta tensors
    assert fl.sequence_priority(td.to("meta"), valid.to("meta")).shape == (4,)


@pytest.mark.parametrize("args,exc,match", [
    ((torch.zeros(3, 4, dtype=torch.int64),), TypeError, "td_error"),
    ((torch.zeros(3),), ValueError, r"td_error.*\[B, S-1\]"),
    ((torch.zeros(3, 4), torch.ones(3, 5, dtype=torch.bool)), ValueError, "mask"),
    ((torch.zeros(3, 4), torch.ones(3, 4)), TypeError, "mask.*bool"),
    ((torch.zeros(3, 4), None, 1.5), ValueError, "eta"),
    ((torch.zeros(3, 4), None, float("nan")), ValueError, "eta"),
    ((torch.zeros(3, 4), None, True), ValueError, "eta"),
])
def test_sequence_priority_errors(args, exc, match):
    with pytest.raises(exc, match=match):
        fl.sequence_priority(*args)
