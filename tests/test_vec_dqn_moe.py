import math

import pytest
import torch

import fusedloss as fl
from fusedloss.testing import make_router_logits, make_vec_dqn_inputs


def test_rope_rotate_is_complex_multiplication():
    x = torch.randn(3, 5, 8, dtype=torch.float64)
    theta = torch.randn(3, 5, dtype=torch.float64)
    got = fl.rope_rotate(x, theta)
    want = torch.view_as_real(torch.view_as_complex(x.unflatten(-1, (4, 2)).contiguous())
                              * torch.polar(torch.ones_like(theta), theta)[..., None]).flatten(-2)
    assert torch.allclose(got, want)
    assert torch.allclose(fl.rope_rotate(x, math.pi / 2)[..., 0::2], -x[..., 1::2])


def test_scores_d2_are_signed_angles():
    """D = 2, the exact geometry: the score of a is the sum of the angles from every v_i to v_a."""
    ang = torch.tensor([0.3, 1.9, -2.5, 0.9], dtype=torch.float64)
    v = torch.stack((ang.cos(), ang.sin()), -1) * torch.tensor([[2.0], [0.5], [1.0], [3.0]], dtype=torch.float64)
    got = fl.vec_dqn_scores(v)
    for a in range(4):
        want = sum(math.remainder(float(ang[a] - ang[i]), 2 * math.pi) for i in range(4))
        assert got[a].item() == pytest.approx(want, abs=1e-12)


def test_scores_general_d_loop():
    v = torch.randn(2, 5, 6, dtype=torch.float64)
    got = fl.vec_dqn_scores(v)
    for b in range(2):
        u = v[b] / v[b].norm(dim=-1, keepdim=True)
        for a in range(5):
            s = 0.0
            for i in range(5):
                r = torch.stack((-u[i, 1::2], u[i, 0::2]), -1).flatten()
                s += math.atan2(float(r @ u[a]), float(u[i] @ u[a]))
            assert got[b, a].item() == pytest.approx(s, abs=1e-12)


def independent_vec_dqn(step, online, target, cfg):
    B, S, A, D = online.shape
    total = 0.0
    for b in range(B):
        r = step["reward"][b, 1:].double()
        if cfg.normalize_reward_mean:
            r = r - r.mean()
        if cfg.normalize_reward_std:
            r = r / (r.std() + cfg.normalize_reward_eps) * cfg.normalize_reward_std_target
        for t in range(S - 1):
            g = int(fl.vec_dqn_scores(target[b, t + 1].double()).argmax())
            th = float(r[t]) * cfg.reward_scale + cfg.reward_shift
            v = target[b, t + 1, g].double()
            rot = torch.stack((v[0::2] * math.cos(th) - v[1::2] * math.sin(th),
                               v[0::2] * math.sin(th) + v[1::2] * math.cos(th)), -1).flatten()
            u = online[b, t, step["action"][b, t + 1]].detach().double()
            total += 1 - float(u @ rot) / (float(u.norm()) * float(rot.norm()))
    return total / (B * (S - 1))


@pytest.mark.parametrize("opts", [{}, {"normalize_reward_mean": True, "normalize_reward_std": True, "reward_scale": 0.3,
                                       "reward_shift": 0.2}], ids=["plain", "reward-norm"])
def test_vec_dqn_matches_independent(opts):
    cfg = fl.VecDqnLossConfig(backend="torch", **opts)
    step, online, target = make_vec_dqn_inputs(2, 4, 5, 4, torch.float64)
    loss, metrics = fl.vec_dqn_loss(step, online, target, cfg)
    assert loss.item() == pytest.approx(independent_vec_dqn(step, online, target, cfg), rel=1e-10)
    s = fl.vec_dqn_scores(online[:, -1].detach()).abs() / math.pi
    assert metrics["vec_dqn_score_abs_max"] == pytest.approx(s.max().item())
    assert metrics["vec_dqn_score_abs_min"] == pytest.approx(s.min().item())
    assert metrics["vec_dqn_score_abs_mean"] == pytest.approx(s.mean().item())
    assert torch.autograd.gradcheck(lambda o: fl.vec_dqn_loss(step, o, target, cfg)[0], (online,))


def test_vec_dqn_errors():
    step, online, target = make_vec_dqn_inputs(2, 4, 3, 4)
    with pytest.raises(ValueError, match="even"):
        fl.vec_dqn_loss(step, online[..., :3], target[..., :3])
    with pytest.raises(ValueError, match="even"):
        fl.rope_rotate(torch.randn(4, 5), 0.1)
    with pytest.raises(ValueError, match="target_vecs"):
        fl.vec_dqn_loss(step, online, target[:, :, :2])
    with pytest.raises(ValueError, match="S >= 2"):
        fl.vec_dqn_loss({k: v[:, :1] for k, v in step.items()}, online[:, :1], target[:, :1])
    bad = {**step, "action": step["action"].clone()}
    bad["action"][0, 2] = 3
    with pytest.raises(ValueError, match=r"\[0, A\)"):
        fl.vec_dqn_loss(bad, online, target)
    with pytest.raises(ValueError, match="theta"):
        fl.rope_rotate(torch.randn(4, 6), torch.randn(5))


def test_router_z_loss():
    x = make_router_logits(10, 4, torch.float64)
    assert fl.router_z_loss(x).item() == pytest.approx(sum(math.log(sum(math.exp(v) for v in row)) ** 2 for row in x.tolist()) / 10)
    assert fl.router_z_loss(x.to(torch.bfloat16)).dtype == torch.float32
    assert torch.autograd.gradcheck(fl.router_z_loss, (x,))


def test_switch_load_balancing():
    E = 4
    perfect = torch.eye(E, dtype=torch.float64).repeat(3, 1) * 50  # each expert wins equally, probs one-hot
    assert fl.switch_load_balancing_loss(perfect).item() == pytest.approx(1.0)
    x = make_router_logits(12, E, torch.float64)
    mask = torch.tensor([True] * 9 + [False] * 3)
    for k in (1, 2):
        got = fl.switch_load_balancing_loss(x.reshape(3, 4, E), top_k=k, mask=mask.reshape(3, 4))
        p = x[:9].detach().softmax(-1)
        counts = torch.zeros(E, dtype=torch.float64)
        for row in p:
            for i in row.topk(k).indices.tolist():
                counts[i] += 1
        want = E * float((counts / (9 * k) * p.mean(0)).sum())
        assert got.item() == pytest.approx(want)
    assert torch.autograd.gradcheck(lambda z: fl.switch_load_balancing_loss(z, top_k=2), (x,))
    with pytest.raises(ValueError, match="top_k"):
        fl.switch_load_balancing_loss(x, top_k=5)
    with pytest.raises(ValueError, match="mask"):
        fl.switch_load_balancing_loss(x, mask=mask[:5])
    with pytest.raises(ValueError, match="empty"):
        fl.router_z_loss(x[:0])
