import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import fusedloss as fl
from fusedloss.testing import make_dqn_inputs


def independent_dqn(step, out, cfg):
    """Loop-based float64 DQN over Python floats, written from the spec, not the reference."""
    q = out["dqn"].detach().double().tolist()
    qt = out["dqn_target"].detach().double().tolist()
    act, done = step["action"].tolist(), step["done"].tolist()
    rew = step["xformed_reward" if cfg.use_xformed_reward else "reward"].double().tolist()
    B, S = len(q), len(q[0])
    terms, qs, targets = [], [], []
    for b in range(B):
        r = rew[b][1:]
        if cfg.normalize_reward_mean:
            mu = sum(r) / len(r)
            r = [x - mu for x in r]
        if cfg.normalize_reward_std:
            mu = sum(r) / len(r)
            sd = math.sqrt(sum((x - mu) ** 2 for x in r) / (len(r) - 1))
            r = [x / (sd + cfg.normalize_reward_eps) * cfg.normalize_reward_std_target for x in r]
        for t in range(S - 1):
            a, d = act[b][t + 1], done[b][t + 1]
            disc = {0: cfg.gamma, 1: cfg.gamma_terminal, 2: cfg.gamma_truncated}[d]
            target = r[t] * cfg.reward_scale + cfg.reward_shift + disc * max(qt[b][t + 1])
            qa = q[b][t][a]
            term = (qa - target) ** 2
            if cfg.cql_weight > 0:
                lse = math.log(sum(math.exp(x) for x in q[b][t]))
                term += cfg.cql_weight * (abs(target) + cfg.cql_scale_q_eps) * (lse - qa)
            terms.append(term)
            qs.append(qa)
            targets.append(target)
    return sum(terms) / len(terms), qs, targets


CONFIGS = {
    "default": {},
    "cql": {"cql_weight": 0.3, "cql_scale_q_eps": 0.5},
    "gammas": {"gamma": 0.9, "gamma_terminal": 0.1, "gamma_truncated": 0.95},
    "reward_norm": {"normalize_reward_mean": True, "normalize_reward_std": True, "reward_scale": 2.0,
                    "reward_shift": -0.5, "normalize_reward_std_target": 0.7},
    "xformed": {"use_xformed_reward": True, "cql_weight": 0.1},
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_dqn_matches_independent_formula(name):
    cfg = fl.DqnLossConfig(backend="torch", **CONFIGS[name])
    step, out = make_dqn_inputs(3, 6, 5, torch.float64)
    loss, metrics = fl.dqn_loss(step, out, cfg)
    want, qs, targets = independent_dqn(step, out, cfg)
    assert loss.item() == pytest.approx(want, rel=1e-10)
    assert metrics["q_values_mean"] == pytest.approx(sum(qs) / len(qs), rel=1e-9)
    mu = sum(qs) / len(qs)
    assert metrics["q_values_std"] == pytest.approx(math.sqrt(sum((x - mu) ** 2 for x in qs) / (len(qs) - 1)), rel=1e-9)
    assert metrics["q_values_min"] == pytest.approx(min(qs)) and metrics["q_values_max"] == pytest.approx(max(qs))
    assert metrics["q_values_target"] == pytest.approx(sum(targets) / len(targets), rel=1e-9)
    assert metrics["dqn_loss"] == pytest.approx(want, rel=1e-9)
    assert ("cql_penalty" in metrics) == (cfg.cql_weight > 0)


@pytest.mark.parametrize("name", ["default", "cql", "reward_norm"])
def test_dqn_gradcheck(name):
    cfg = fl.DqnLossConfig(backend="torch", **CONFIGS[name])
    step, out = make_dqn_inputs(2, 4, 3, torch.float64)
    q = out["dqn"]
    assert torch.autograd.gradcheck(lambda x: fl.dqn_loss(step, {"dqn": x, "dqn_target": out["dqn_target"]}, cfg)[0], (q,))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_dqn_low_precision_returns_fp32_and_grad_in_input_dtype(dtype):
    step, out = make_dqn_inputs(2, 5, 4, dtype)
    loss, _ = fl.dqn_loss(step, out, fl.DqnLossConfig(backend="torch", cql_weight=0.2))
    assert loss.dtype == torch.float32
    loss.backward()
    assert out["dqn"].grad.dtype == dtype


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), B=st.integers(1, 3), S=st.integers(2, 6), A=st.integers(1, 5))
def test_gamma_zero_is_regression_on_rewards(seed, B, S, A):
    step, out = make_dqn_inputs(B, S, A, torch.float64, seed=seed)
    cfg = fl.DqnLossConfig(gamma=0.0, backend="torch")
    loss, _ = fl.dqn_loss(step, out, cfg)
    q_sa = out["dqn"][:, :-1].gather(-1, step["action"][:, 1:, None]).squeeze(-1)
    assert torch.allclose(loss, ((q_sa - step["reward"][:, 1:].double()) ** 2).mean())


def test_extras_weight_mask_huber_double():
    step, out = make_dqn_inputs(3, 6, 4, torch.float64, weight=True, mask=True, seed=7)
    cfg = fl.DqnLossConfig(backend="torch", double_dqn=True, td_loss="huber", huber_delta=0.5,
                           weight_key="weight", mask_key="mask", return_td_error=True)
    loss, metrics, td_abs = fl.dqn_loss(step, out, cfg)
    q, qt = out["dqn"].detach(), out["dqn_target"]
    a, m = step["action"], step["mask"]
    num = den = 0.0
    for b in range(3):
        for t in range(5):
            valid = bool(m[b, t] and m[b, t + 1])
            a_star = int(q[b, t + 1].argmax())
            target = step["reward"][b, t + 1].item() + 0.99 * (step["done"][b, t + 1] == 0).item() * qt[b, t + 1, a_star].item()
            d = q[b, t, a[b, t + 1]].item() - target
            assert td_abs[b, t].item() == pytest.approx(abs(d) if valid else 0.0)
            if valid:
                h = 0.5 * d * d if abs(d) <= 0.5 else 0.5 * (abs(d) - 0.25)
                num += step["weight"][b, t + 1].item() * h
                den += 1
    assert loss.item() == pytest.approx(num / den, rel=1e-10)


def test_lazy_metrics_do_not_sync_and_match_float():
    step, out = make_dqn_inputs(2, 5, 3, seed=3)
    _, eager = fl.dqn_loss(step, out, fl.DqnLossConfig(backend="torch", cql_weight=0.2))
    _, lazy = fl.dqn_loss(step, out, fl.DqnLossConfig(backend="torch", cql_weight=0.2, metrics_mode="lazy"))
    assert isinstance(lazy, fl.LazyMetrics)
    assert set(lazy.tensors()) == set(eager)
    assert dict(lazy) == pytest.approx(eager)


def _bad(step, key, b, t, value):
    step = dict(step)
    step[key] = step[key].clone()
    step[key][b, t] = value
    return step


@pytest.mark.parametrize("key,value,match", [("action", 4, r"action.*\[0, A\)"), ("action", -1, r"action"),
                                              ("done", 3, r"done.*\{0, 1, 2\}")])
def test_bad_data_raises_value_error_in_both_modes(key, value, match):
    step, out = make_dqn_inputs(2, 5, 4, seed=1)
    bad = _bad(step, key, 1, 3, value)
    with pytest.raises(ValueError, match=match):
        fl.dqn_loss(bad, out, fl.DqnLossConfig(backend="torch"))
    loss, lazy = fl.dqn_loss(bad, out, fl.DqnLossConfig(backend="torch", metrics_mode="lazy"))
    assert torch.isfinite(loss)  # clamped, never out of bounds
    with pytest.raises(ValueError, match=match):
        lazy["dqn_loss"]


def test_documented_errors():
    step, out = make_dqn_inputs(2, 5, 4)
    cfg = fl.DqnLossConfig(backend="torch")
    with pytest.raises(KeyError, match="action"):
        fl.dqn_loss({k: v for k, v in step.items() if k != "action"}, out, cfg)
    with pytest.raises(KeyError, match="dqn_target"):
        fl.dqn_loss(step, {"dqn": out["dqn"]}, cfg)
    with pytest.raises(KeyError, match="xformed_reward"):
        fl.dqn_loss({k: v for k, v in step.items() if k != "xformed_reward"}, out,
                    fl.DqnLossConfig(use_xformed_reward=True))
    with pytest.raises(ValueError, match="S >= 2"):
        fl.dqn_loss({k: v[:, :1] for k, v in step.items()}, {k: v[:, :1] for k, v in out.items()}, cfg)
    with pytest.raises(ValueError, match="empty"):
        fl.dqn_loss({k: v[:0] for k, v in step.items()}, {k: v[:0] for k, v in out.items()}, cfg)
    with pytest.raises(ValueError, match=r"dqn_target.*\[B, S, A\]"):
        fl.dqn_loss(step, {"dqn": out["dqn"], "dqn_target": out["dqn_target"][:, :, :2]}, cfg)
    with pytest.raises(ValueError, match=r"reward.*\[B, S\]"):
        fl.dqn_loss({**step, "reward": step["reward"][:, :3]}, out, cfg)
    with pytest.raises(TypeError, match="integer"):
        fl.dqn_loss({**step, "action": step["action"].float()}, out, cfg)
    with pytest.raises(ValueError, match="td_loss"):
        fl.DqnLossConfig(td_loss="l3")
    with pytest.raises(ValueError, match="cql_weight"):
        fl.DqnLossConfig(cql_weight=-1.0)
    with pytest.raises(ValueError, match="backend"):
        fl.DqnLossConfig(backend="cuda")
    with pytest.raises(ValueError, match="metrics_mode"):
        fl.DqnLossConfig(metrics_mode="tensor")
    with pytest.raises(ValueError, match="S >= 3"):
        fl.dqn_loss({k: v[:, :2] for k, v in step.items()}, {k: v[:, :2] for k, v in out.items()},
                    fl.DqnLossConfig(normalize_reward_std=True))


def test_tensordict_step_stream():
    tensordict = pytest.importorskip("tensordict")
    step, out = make_dqn_inputs(2, 5, 4, seed=2)
    td_step = tensordict.TensorDict(step, batch_size=[2, 5])
    td_out = tensordict.TensorDict({"dqn": out["dqn"], "dqn_target": out["dqn_target"]}, batch_size=[2, 5])
    loss_td, _ = fl.dqn_loss(td_step, td_out, fl.DqnLossConfig(backend="torch"))
    loss, _ = fl.dqn_loss(step, out, fl.DqnLossConfig(backend="torch"))
    assert torch.equal(loss_td, loss)


DONE_DTYPES = [torch.bool, torch.uint8, torch.int16, torch.int32, torch.int64, torch.float32, torch.float64]


@pytest.mark.parametrize("dtype", DONE_DTYPES, ids=str)
def test_reference_done_dtypes(dtype):
    """The reference reads each ``done`` dtype as the same discounts (a uint8 index is not a mask)."""
    step, out = make_dqn_inputs(3, 6, 5, torch.float64, seed=4)
    if dtype == torch.bool:
        step["done"] = step["done"].clamp(max=1)
    step["done"] = step["done"].to(dtype)
    cfg = fl.DqnLossConfig(backend="torch", gamma=0.9, gamma_terminal=0.1, gamma_truncated=0.95)
    loss, _ = fl.dqn_loss(step, out, cfg)
    assert loss.item() == pytest.approx(independent_dqn(step, out, cfg)[0], rel=1e-10)


@pytest.mark.parametrize("dtype, bad", [(torch.uint8, 3), (torch.int16, -1), (torch.int32, 7), (torch.int64, -5),
                                        (torch.float32, 0.5), (torch.float64, float("nan"))], ids=str)
@pytest.mark.parametrize("mode", ["float", "lazy"])
def test_reference_done_out_of_range_is_named(dtype, bad, mode):
    step, out = make_dqn_inputs(2, 5, 4, torch.float32, seed=5)
    step["done"] = step["done"].to(dtype)
    step["done"][1, 3] = bad
    cfg = fl.DqnLossConfig(backend="torch", metrics_mode=mode)
    match = r"step_stream\['done'\] holds a value outside \{0, 1, 2\}"
    if mode == "float":
        with pytest.raises(ValueError, match=match):
            fl.dqn_loss(step, out, cfg)
        return
    loss, metrics = fl.dqn_loss(step, out, cfg)
    assert torch.isfinite(loss)
    with pytest.raises(ValueError, match=match):
        metrics["dqn_loss"]


@pytest.mark.parametrize("cls", [fl.DqnLossConfig, fl.VecDqnLossConfig])
def test_reward_config_is_checked_when_built_and_changed(cls):
    """The reward transform's values are a config check, not a per-call one."""
    with pytest.raises(ValueError, match="normalize_reward_eps must be > 0"):
        cls(normalize_reward_std=True, normalize_reward_eps=0.0)
    cfg = cls(normalize_reward_std=True)
    with pytest.raises(ValueError, match="reward_scale must be a finite number"):
        cfg.reward_scale = float("inf")
    assert cfg.reward_scale == 1.0


def test_discount_table_is_copied_once():
    """The discounts reach the device once per (config values, dtype, device): no per-call copy
    (which a CUDA graph could not capture), and each exactly as given."""
    from fusedloss.losses import _common

    step, out = make_dqn_inputs(2, 5, 4, torch.float32, seed=6)
    cfg = fl.DqnLossConfig(backend="torch", gamma=0.9, gamma_terminal=0.1, gamma_truncated=0.3)
    fl.dqn_loss(step, out, cfg)
    table = _common.discount_table(0.9, 0.1, 0.3, torch.float32, torch.device("cpu"))
    fl.dqn_loss(step, out, cfg)
    assert _common.discount_table(0.9, 0.1, 0.3, torch.float32, torch.device("cpu")) is table
    assert torch.equal(table, torch.tensor([0.9, 0.1, 0.3]))
    assert _common.discount_table(0.9, 0.1, 0.3, torch.float64, torch.device("cpu")).tolist() == [0.9, 0.1, 0.3]
