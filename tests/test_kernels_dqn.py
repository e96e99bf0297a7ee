"""The fused DQN kernel against the reference: CPU under TRITON_INTERPRET=1 in CI, CUDA on a GPU."""

import pytest
import torch

import fusedloss as fl
from fusedloss.losses.dqn import _KERNEL_METRICS, _kernel_scalars
from fusedloss.testing import assert_canaries_intact, assert_close_to_float64, make_dqn_inputs, nan_like

pytest.importorskip("triton")
from fusedloss.kernels import dqn as K  # noqa: E402

OPTIONS = {
    "seed": {},
    "gammas": {"gamma": 0.9, "gamma_terminal": 0.2, "gamma_truncated": 0.95},
    "cql": {"cql_weight": 0.3, "cql_scale_q_eps": 0.5},
    "reward-norm": {"normalize_reward_mean": True, "normalize_reward_std": True, "reward_scale": 0.5,
                    "reward_shift": 0.1, "normalize_reward_std_target": 2.0},
    "mean-norm-xformed": {"normalize_reward_mean": True, "use_xformed_reward": True},
    "double": {"double_dqn": True},
    "huber": {"td_loss": "huber", "huber_delta": 0.3},
    "weight-mask": {"weight_key": "weight", "mask_key": "mask"},
    "all": {"double_dqn": True, "td_loss": "huber", "weight_key": "weight", "mask_key": "mask", "cql_weight": 0.2,
            "normalize_reward_mean": True, "normalize_reward_std": True},
}
# (B, S, A, max_block_a): S = 2, B = 1, A = 1, a non-power-of-two A, A wider than one tile, and a
# sequence split over programs (two chunks of 64 steps at A = 5, the second one partial).
SHAPES = {"B1-S3-A5": (1, 3, 5, 1024), "B3-S7-A300-tiled": (3, 7, 300, 64), "B4-S9-A18": (4, 9, 18, 1024),
          "B2-S4-A1": (2, 4, 1, 1024), "B5-S2-A7": (5, 2, 7, 1024), "B2-S70-A5-chunks": (2, 70, 5, 1024)}
DTYPES = [torch.float32, torch.bfloat16]


def _reference(step, q, qt, cfg):
    loss, metrics, td = fl.dqn_loss(step, {"dqn": q, "dqn_target": qt},
                                    fl.DqnLossConfig(**{**vars(cfg), "backend": "torch", "return_td_error": True}))
    return loss, metrics, td


def check_kernel_against_reference(step, out, cfg, dtype, max_block, device):
    """The kernel's loss, |td|, gradient (times a random upstream scale) and metrics, written into
    NaN-poisoned buffers, within the tolerance rule of the reference against float64. Returns the
    kernel's metrics buffer."""
    q, qt = out["dqn"], out["dqn_target"]
    B, S, A = q.shape
    weight = step["weight"] if cfg.weight_key else None
    mask = step["mask"] if cfg.mask_key else None
    grad_buf, td_buf = nan_like((B, S, A), dtype, device), nan_like((B, S - 1), torch.float32, device)
    reward = step["xformed_reward" if cfg.use_xformed_reward else "reward"]
    loss, metrics, grad, td = K.dqn_fwd(q.detach(), qt, step["action"], reward, step["done"], weight, mask,
                                        **_kernel_scalars(cfg), max_block_a=max_block, grad_out=grad_buf, td_out=td_buf)
    assert_canaries_intact(grad_buf, td_buf)
    # The kernel's gradient is unscaled: d(sum of per-transition losses)/dq; the mean divides by count.
    grad = grad.float() * metrics[K.DqnMetric.INV_COUNT]

    up = float(torch.empty(()).uniform_(0.5, 2.0))
    ref_loss, ref_metrics, ref_td = _reference(step, q, qt, cfg)
    (ref_grad,) = torch.autograd.grad(ref_loss * up, q)
    q64 = q.detach().double().requires_grad_(True)
    ref64_loss, ref64_metrics, ref64_td = _reference(step, q64, qt.double(), cfg)
    (ref64_grad,) = torch.autograd.grad(ref64_loss * up, q64)

    assert_close_to_float64(loss, ref_loss, ref64_loss, dtype, "loss")
    assert_close_to_float64(td, ref_td, ref64_td, dtype, "|td error|")
    assert_close_to_float64(grad * up, ref_grad, ref64_grad, dtype, "gradient")
    for name, slot in _KERNEL_METRICS.items():
        if name in ref_metrics:
            assert_close_to_float64(metrics[K.DqnMetric[slot]], torch.tensor(ref_metrics[name]),
                                    torch.tensor(ref64_metrics[name]), dtype, name)
    return metrics


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("opts", list(OPTIONS))
def test_kernel_matches_reference(opts, dtype, shape, device):
    B, S, A, max_block = SHAPES[shape]
    cfg = fl.DqnLossConfig(**OPTIONS[opts])
    if cfg.normalize_reward_std and S < 3:
        pytest.skip("reward std needs S >= 3")
    step, out = make_dqn_inputs(B, S, A, dtype, device, weight=True, mask=True)
    metrics = check_kernel_against_reference(step, out, cfg, dtype, max_block, device)
    assert metrics[K.DqnMetric.BAD_ACTION] == 0 and metrics[K.DqnMetric.BAD_DONE] == 0


def test_sequences_split_over_programs():
    """The walk's grid: the chunked shape above really runs a sequence on two programs; 64
    sequences of a wide action space (one step per tile) fill about TARGET_PROGRAMS programs; a
    multi-step target keeps one program per sequence."""
    _, t_block, _ = K._tiles(5, 70)
    assert K.time_chunks(2, 70, t_block, False) == (64, 2)
    _, t_block, _ = K._tiles(32768, 64)
    assert t_block == 1 and K.time_chunks(64, 64, t_block, False) == (4, 16)
    assert K.time_chunks(2, 70, 64, True) == (128, 1)
    assert K.time_chunks(4096, 64, 32, False) == (64, 1)


@pytest.mark.parametrize("opts", ["seed", "cql", "all"])
def test_public_path_and_random_upstream_gradient(opts, device):
    step, out = make_dqn_inputs(3, 6, 11, torch.bfloat16, device, weight=True, mask=True)
    res = {}
    up = torch.randn((), device=device)
    for backend in ("triton", "torch"):
        q = out["dqn"].detach().clone().requires_grad_(True)
        cfg = fl.DqnLossConfig(backend=backend, return_td_error=True, **OPTIONS[opts])
        loss, metrics, td = fl.dqn_loss(step, {"dqn": q, "dqn_target": out["dqn_target"]}, cfg)
        (loss * up).backward()
        res[backend] = (loss, metrics, td, q.grad)
    assert res["triton"][0].dtype == torch.float32 and res["triton"][3].dtype == torch.bfloat16
    assert set(res["triton"][1]) == set(res["torch"][1])
    for k in res["torch"][1]:
        assert res["triton"][1][k] == pytest.approx(res["torch"][1][k], rel=1e-4, abs=1e-5)
    assert torch.allclose(res["triton"][2], res["torch"][2], atol=1e-5)
    assert torch.allclose(res["triton"][3].float(), res["torch"][3].float(), atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("key,value,match", [("action", 7, r"action.*\[0, A\)"), ("action", -3, "action"),
                                              ("done", 5, r"done.*\{0, 1, 2\}"), ("done", -1, "done")])
@pytest.mark.parametrize("mode", ["float", "lazy"])
def test_bad_indices_never_read_out_of_bounds(key, value, match, mode, device):
    step, out = make_dqn_inputs(2, 5, 7, torch.float32, device)
    step[key] = step[key].clone()
    step[key][1, 3] = value
    cfg = fl.DqnLossConfig(backend="triton", cql_weight=0.1, metrics_mode=mode)
    if mode == "float":
        with pytest.raises(ValueError, match=match):
            fl.dqn_loss(step, out, cfg)
        return
    loss, metrics = fl.dqn_loss(step, out, cfg)
    assert torch.isfinite(loss)
    with pytest.raises(ValueError, match=match):
        metrics["dqn_loss"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.int32, torch.uint8], ids=["float", "int32", "uint8"])
def test_done_dtypes(dtype, device):
    step, out = make_dqn_inputs(3, 6, 4, torch.float32, device)
    ref, _ = fl.dqn_loss(step, out, fl.DqnLossConfig(backend="torch"))
    step["done"] = step["done"].to(dtype)
    for backend in ("triton", "torch"):
        loss, _ = fl.dqn_loss(step, out, fl.DqnLossConfig(backend=backend))
        assert torch.allclose(loss, ref, atol=1e-6)
    if dtype == torch.float32:
        step["done"][0, 2] = 1.5
        for backend in ("triton", "torch"):
            with pytest.raises(ValueError, match="done"):
                fl.dqn_loss(step, out, fl.DqnLossConfig(backend=backend))


def test_step_zero_is_not_validated(device):
    step, out = make_dqn_inputs(2, 5, 4, torch.float32, device)
    step["action"][:, 0] = -1  # "no previous action" sentinels at t = 0 are never read
    step["done"][:, 0] = 9
    for backend in ("triton", "torch"):
        loss, _ = fl.dqn_loss(step, out, fl.DqnLossConfig(backend=backend))
        assert torch.isfinite(loss)


def test_deterministic(device):
    step, out = make_dqn_inputs(33, 17, 9, torch.float32, device)
    cfg = fl.DqnLossConfig(backend="triton", cql_weight=0.2, metrics_mode="lazy")
    a = fl.dqn_loss(step, out, cfg)
    b = fl.dqn_loss(step, out, cfg)
    assert torch.equal(a[0], b[0])
    assert all(torch.equal(a[1].tensors()[k], b[1].tensors()[k]) for k in a[1].tensors())


def test_all_masked_raises(device):
    step, out = make_dqn_inputs(2, 4, 3, torch.float32, device, mask=True)
    step["mask"][:] = False
    with pytest.raises(ValueError, match="no valid transition"):
        fl.dqn_loss(step, out, fl.DqnLossConfig(backend="triton", mask_key="mask"))


STEP_LAUNCHES = 4  # a training step: the walk and the fold, autograd's seed of the 0-dim loss, the backward


def step_launches_and_graph_replay(call):
    """Asserts that ``call()`` (a training step) launches at most ``STEP_LAUNCHES`` CUDA kernels,
    captures it in a CUDA graph and replays it; returns ``(eager result, replayed result)``."""
    from torch.profiler import ProfilerActivity, profile

    want = call()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        call()
        torch.cuda.synchronize()
    launches = [e for e in prof.events() if e.device_type.name == "CUDA"]
    assert len(launches) <= STEP_LAUNCHES, [e.name for e in launches]

    graph = torch.cuda.CUDAGraph()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        call()
    torch.cuda.current_stream().wait_stream(s)
    with torch.cuda.graph(graph):
        got = call()
    graph.replay()
    torch.cuda.synchronize()
    return want, got


@pytest.mark.cuda
@pytest.mark.parametrize("shape", [(256, 64, 18), (32, 512, 4), (1024, 32, 1024)], ids=lambda s: "B{}-S{}-A{}".format(*s))
def test_step_launches_and_cuda_graph_capture(shape):
    step, out = make_dqn_inputs(*shape, torch.bfloat16, "cuda")
    q = out["dqn"]
    cfg = fl.DqnLossConfig(backend="triton", cql_weight=0.1, metrics_mode="lazy")

    def call():
        loss, metrics = fl.dqn_loss(step, {"dqn": q, "dqn_target": out["dqn_target"]}, cfg)
        (g,) = torch.autograd.grad(loss, q)
        return loss, metrics, g

    want, got = step_launches_and_graph_replay(call)
    assert torch.equal(got[0], want[0]) and torch.equal(got[2], want[2])
    assert got[1]["dqn_loss"] == pytest.approx(want[1]["dqn_loss"])
