"""The opt-in autotuned launches (FUSEDLOSS_AUTOTUNE=1, fusedloss.kernels._common.Tuned) give the
fixed configs' results. Under the interpreter the benchmark is one wall-clock call per config
(Triton's own needs CUDA), so this checks the wiring (configs, pruning, grids of the
meta-parameters), not the choice. Every config's sm_90 compile is in tests/compile_check.py."""

import pytest
import torch

import fusedloss as fl
from fusedloss.testing import make_dqn_inputs, make_sp_inputs, make_vec_dqn_inputs

pytest.importorskip("triton")
from fusedloss.kernels import _common, dqn as KD, lm_head as KL, rope as KR, sp as K, vec_dqn as KV  # noqa: E402


def _both(monkeypatch, call):
    monkeypatch.delenv(_common.AUTOTUNE_ENV, raising=False)
    fixed = call()
    monkeypatch.setenv(_common.AUTOTUNE_ENV, "1")
    return fixed, call()


def _close(a, b):
    for x, y in zip(a, b):
        assert torch.allclose(x.float(), y.float(), rtol=1e-5, atol=1e-6, equal_nan=True)


@pytest.mark.parametrize("loss_type", ["kl-fwd", "js"])
@pytest.mark.parametrize("max_block", [16, K.MAX_BLOCK], ids=["tiles", "one-tile"])
def test_sp_forward_and_backward(monkeypatch, loss_type, max_block, device):
    q, z = make_sp_inputs(5, 37, torch.float32, device, seed=1)
    up = torch.rand(5, device=device) + 0.5

    def call():
        rows, grad, status = K.sp_fwd(q, z.detach(), loss_type, 1.0, 0.1, max_block=max_block)
        return rows, grad, status, K.sp_bwd(grad, up, torch.float32)

    fixed, tuned = _both(monkeypatch, call)
    _close(fixed, tuned)
    space = K._SP_FWD_LONG if max_block == 16 else K._SP_FWD_TILE
    assert space.tuner().cache, "the autotuner never ran"


def test_sp_wide_backward(monkeypatch, device):
    g = torch.randn(3, K.BWD_TUNED_FROM + 5, device=device)
    up = torch.rand(3, device=device)
    fixed, tuned = _both(monkeypatch, lambda: (K.sp_bwd(g, up, torch.float32, 0.5),))
    _close(fixed, tuned)
    assert K._SP_BWD_WIDE.tuner().cache


def test_sp_topk_tiles(monkeypatch, device):
    z = torch.randn(4, 37, device=device)
    idx = torch.stack([torch.randperm(37, device=device)[:6] for _ in range(4)])
    lp = torch.log_softmax(torch.randn(4, 6, device=device), -1)
    fixed, tuned = _both(monkeypatch, lambda: K.sp_topk_fwd(idx, lp, z, "kl-fwd", 1.0, max_block=16))
    _close(fixed, tuned)
    assert K._SP_TOPK_LONG.tuner().cache


def test_dqn_backward(monkeypatch, device):
    step, out = make_dqn_inputs(3, 6, 5, torch.float32, device, seed=2)
    cfg = fl.DqnLossConfig(backend="triton", cql_weight=0.1, metrics_mode="lazy")

    def call():
        q = out["dqn"].detach().clone().requires_grad_(True)
        loss, _ = fl.dqn_loss(step, {"dqn": q, "dqn_target": out["dqn_target"]}, cfg)
        (g,) = torch.autograd.grad(loss * 1.7, q)
        return loss, g

    fixed, tuned = _both(monkeypatch, call)
    _close(fixed, tuned)
    assert KD._DQN_BWD.tuner().cache


def test_vec_dqn_scores_loss_and_backward(monkeypatch, device):
    """A full pairwise tile (17 actions, 18-wide vectors: every score config, some wider than the
    row) and the dense backward's space (its pruning keeps the tiles no wider than the actions)."""
    step, online, target = make_vec_dqn_inputs(2, 3, 17, 18, torch.float32, device, seed=4, argmax_margin=1e-3)
    cfg = fl.VecDqnLossConfig(backend="triton")
    assert KV._score_tiles(17, 9)[:3] == KV._FULL_SCORE_TILE  # the tuned spaces apply

    def call():
        o = online.detach().clone().requires_grad_(True)
        loss, _ = fl.vec_dqn_loss(step, o, target, cfg)
        (g,) = torch.autograd.grad(loss * 1.3, o)
        return KV.vec_dqn_scores_fwd(target.flatten(0, 1)), loss, g

    fixed, tuned = _both(monkeypatch, call)
    _close(fixed, tuned)
    assert KV._SCORES.tuner().cache and KV._FWD.tuner().cache and KV._BWD.tuner().cache
    kept = KV._fits_the_row(KV._BWD.configs, {"A": 17, "HALF": 9})
    assert {c.kwargs["BA"] for c in kept} == {16}
    # nothing fits (8 actions, 1024-wide vectors): the launcher's own tile, not the first config
    fallback = KV._fits_the_row(KV._BWD.configs, {"A": 8, "HALF": 512})
    assert [c.kwargs["BA"] for c in fallback] == [KV._bwd_tiles(8, 1024)[0]]


@pytest.mark.parametrize("softcap", [None, 3.0])
def test_lm_head_stats_and_in_place_gradient(monkeypatch, softcap, device):
    """The LM-head kernels' spaces (rows of any width tune here, TUNED_FROM lowered); the gradient
    written over the logits it reads, as grad_op does, comes out the same: the timed runs restore
    the logits between configs."""
    monkeypatch.setattr(KL, "TUNED_FROM", 1)
    g = torch.Generator().manual_seed(3)
    z = (torch.randn(3, 37, generator=g) * 2).to(device)
    labels = torch.tensor([0, 36, 5], device=device)
    coef = torch.randn(3, 4, generator=g).to(device)

    def call():
        stats = KL.lm_head_stats(z, labels, 0.8, softcap)
        work = z.clone()
        return stats, KL.lm_head_grad(work, labels, stats, coef, 0.8, softcap, out=work)

    fixed, tuned = _both(monkeypatch, call)
    _close(fixed, tuned)
    assert KL._STATS_LONG.tuner().cache and KL._GRAD_LONG.tuner().cache


@pytest.mark.parametrize("D", [34, 128])
def test_rope(monkeypatch, D, device):
    x = torch.randn(5, 3, D, device=device)
    theta = torch.rand(5, 3, device=device) * 6
    fixed, tuned = _both(monkeypatch, lambda: (KR.rope_fwd(x, theta), KR.rope_fwd(x, theta, -1.0)))
    _close(fixed, tuned)
    assert KR._ROPE.tuner().cache


def test_off_by_default(monkeypatch):
    monkeypatch.delenv(_common.AUTOTUNE_ENV, raising=False)
    assert not _common.autotune_enabled()
    monkeypatch.setenv(_common.AUTOTUNE_ENV, "1")
    assert _common.autotune_enabled()
