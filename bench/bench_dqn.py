"""DQN, forward + backward per call: fused kernel (and the same captured in a CUDA graph, and under
torch.compile: the RL-shape headline) vs the eager reference vs torch.compile(fullgraph=True) of
the reference. Every provider calls the public ``dqn_loss`` (input checks and lazy metrics
included), so they do the same work.

Byte model: forward reads q and the t+1 rows of q_target once and writes the gradient; backward
reads and writes the gradient: ``5·B·S·A·b``. RL shapes are reported in µs per call and launches
per call; the large-A shape in GB/s.

``bench_dqn_multistep_fwd_bwd``: the R2D2-like shape (B = 32, S = 80, A = 18) with n-step (n = 5)
and lambda-return (lambda = 0.95) targets, double DQN and value rescaling. The sweep adds a
``[B, S-1]`` fp32 scratch written and read once (``8·B·S`` bytes) to the same byte model.
"""

import pytest
import torch

import fusedloss as fl
from _common import CUDA, DEVICE, HEADLINE_PROVIDERS, provider_loss, run_benchmark, timed_step
from fusedloss.testing import make_dqn_inputs

if CUDA:
    SHAPES = [(256, 64, 18), (32, 512, 4), (1024, 32, 1024), (64, 64, 32768)]
    DTYPES = [torch.float32, torch.bfloat16]
else:
    SHAPES = [(2, 5, 7)]
    DTYPES = [torch.float32]
PROVIDERS = ["fused", *HEADLINE_PROVIDERS, "eager", "compile"]
CFG = dict(cql_weight=0.1)
MULTISTEP_SHAPES = [(32, 80, 18)] if CUDA else [(2, 9, 5)]
MULTISTEP = {"n5": dict(n_step=5, double_dqn=True, value_rescaling=True),
             "lambda0.95": dict(td_lambda=0.95, double_dqn=True, value_rescaling=True)}


def _public_with(opts):
    def public(backend):
        cfg = fl.DqnLossConfig(backend=backend, metrics_mode="lazy", **opts)
        return lambda step, q, qt: fl.dqn_loss(step, {"dqn": q, "dqn_target": qt}, cfg)[0]

    return public


_public = _public_with(CFG)


def _run(benchmark, dtype, shape, provider, public, group, byte_model, nbytes_per_elem, extra_bytes=0):
    B, S, A = shape
    step, out = make_dqn_inputs(B, S, A, dtype, DEVICE, seed=0)
    q, qt = out["dqn"], out["dqn_target"]
    call = provider_loss(provider, public)
    loss_fn = lambda: call(step, q, qt)

    def step_fn():
        (g,) = torch.autograd.grad(loss_fn(), q)
        return g

    if provider in HEADLINE_PROVIDERS and A > 1024:
        pytest.skip("the captured and compiled steps are the headline for RL shapes; wide A is bandwidth-bound")
    timed = timed_step(provider, step_fn)
    benchmark.group = group
    run_benchmark(benchmark, timed, byte_model=byte_model,
                  nbytes=nbytes_per_elem * B * S * A * q.element_size() + extra_bytes, family="dqn", provider=provider,
                  shape=f"B={B} S={S} A={A}", dtype=str(dtype)[6:])


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}-S{}-A{}".format(*s))
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
def bench_dqn_fwd_bwd(benchmark, dtype, shape, provider):
    B, S, A = shape
    _run(benchmark, dtype, shape, provider, _public, f"dqn {str(dtype)[6:]} B={B} S={S} A={A}",
         "5*B*S*A*b (fwd: read q, q_target[t+1], write grad; bwd: read+write grad)", 5)


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("target", list(MULTISTEP))
@pytest.mark.parametrize("shape", MULTISTEP_SHAPES, ids=lambda s: "B{}-S{}-A{}".format(*s))
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
def bench_dqn_multistep_fwd_bwd(benchmark, dtype, shape, target, provider):
    B, S, A = shape
    _run(benchmark, dtype, shape, provider, _public_with(MULTISTEP[target]),
         f"dqn {target} {str(dtype)[6:]} B={B} S={S} A={A}",
         "6*B*S*A*b + 8*B*S (double DQN: read q, q[t+1], q_target[t+1], write grad; bwd: read+write grad; "
         "fp32 scratch of V or G)", 6, 8 * B * S)
