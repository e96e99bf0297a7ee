"""Vector DQN: the loss forward + backward (fused, also captured in a CUDA graph and compiled: the
RL-shape headline, vs eager vs compile), and vec_dqn_scores alone at
acting batch shapes (µs per call). The loss providers call the public ``vec_dqn_loss`` (checks and
lazy metrics included), so they do the same work.

Byte model of the loss: read the target vectors at t+1 and the taken online vectors, write the
dense gradient in backward: ``2·B·S·A·D·b``; the arithmetic is O(B·S·A²·D). Peak extra memory is
O(B·S·A·D) for the fused path; the eager reference materializes O(B·S·A²) angle tensors.
"""

import pytest
import torch

import fusedloss as fl
from _common import (CUDA, DEVICE, HEADLINE_PROVIDERS, compiled, need_triton, provider_loss, run_benchmark, sync,
                     timed_step)
from fusedloss.testing import make_vec_dqn_inputs

if CUDA:
    LOSS_SHAPES = [(256, 64, 18, 2), (256, 64, 18, 16), (256, 64, 18, 64), (64, 128, 128, 32)]
    SCORE_SHAPES = [(1, 18, 16), (64, 18, 16), (4096, 18, 16)]
else:
    LOSS_SHAPES = [(2, 3, 5, 4)]
    SCORE_SHAPES = [(2, 5, 4)]
PROVIDERS = ["fused", "eager", "compile"]
LOSS_PROVIDERS = ["fused", *HEADLINE_PROVIDERS, "eager", "compile"]


def _public(backend):
    cfg = fl.VecDqnLossConfig(backend=backend, metrics_mode="lazy")
    return lambda step, online, target: fl.vec_dqn_loss(step, online, target, cfg)[0]


@pytest.mark.parametrize("provider", LOSS_PROVIDERS)
@pytest.mark.parametrize("shape", LOSS_SHAPES, ids=lambda s: "B{}-S{}-A{}-D{}".format(*s))
def bench_vec_dqn_fwd_bwd(benchmark, shape, provider):
    B, S, A, D = shape
    step, online, target = make_vec_dqn_inputs(B, S, A, D, torch.float32, DEVICE, seed=0)
    call = provider_loss(provider, _public)
    loss_fn = lambda: call(step, online, target)

    timed = timed_step(provider, lambda: torch.autograd.grad(loss_fn(), online))
    benchmark.group = f"vec_dqn loss B={B} S={S} A={A} D={D}"
    run_benchmark(benchmark, timed, byte_model="2*B*S*A*D*b", nbytes=2 * B * S * A * D * online.element_size(),
                  family="vec_dqn", provider=provider, shape=f"B={B} S={S} A={A} D={D}", dtype="float32")


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("shape", SCORE_SHAPES, ids=lambda s: "B{}-A{}-D{}".format(*s))
def bench_vec_dqn_scores(benchmark, shape, provider):
    B, A, D = shape
    v = torch.randn(B, A, D, device=DEVICE)
    if provider == "fused":
        need_triton()
        fn = lambda: fl.vec_dqn_scores(v, backend="triton")
    elif provider == "eager":
        fn = lambda: fl.vec_dqn_scores_reference(v)
    else:
        fn = compiled(fl.vec_dqn_scores_reference)
        fn = (lambda f: lambda: f(v))(fn)

    def timed():
        fn()
        sync()

    benchmark.group = f"vec_dqn_scores B={B} A={A} D={D}"
    run_benchmark(benchmark, timed, family="vec_dqn_scores", provider=provider, shape=f"B={B} A={A} D={D}",
                  dtype="float32")
