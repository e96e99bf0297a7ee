"""DQN, forward + backward per call: fused kernel (and the same captured in a CUDA graph) vs the
eager reference vs torch.compile(fullgraph=True) of the reference. Every provider calls the public
``dqn_loss`` (input checks and lazy metrics included), so they do the same work.

Byte model: forward reads q and the t+1 rows of q_target once and writes the gradient; backward
reads and writes the gradient: ``5·B·S·A·b``. RL shapes are reported in µs per call and launches
per call; the large-A shape in GB/s.
"""

import pytest
import torch

import fusedloss as fl
from _common import CUDA, DEVICE, provider_loss, run_benchmark, sync
from fusedloss.testing import make_dqn_inputs

if CUDA:
    SHAPES = [(256, 64, 18), (32, 512, 4), (1024, 32, 1024), (64, 64, 32768)]
    DTYPES = [torch.float32, torch.bfloat16]
else:
    SHAPES = [(2, 5, 7)]
    DTYPES = [torch.float32]
PROVIDERS = ["fused", "fused-cudagraph", "eager", "compile"]
CFG = dict(cql_weight=0.1)


def _public(backend):
    cfg = fl.DqnLossConfig(backend=backend, metrics_mode="lazy", **CFG)
    return lambda step, q, qt: fl.dqn_loss(step, {"dqn": q, "dqn_target": qt}, cfg)[0]


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}-S{}-A{}".format(*s))
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
def bench_dqn_fwd_bwd(benchmark, dtype, shape, provider):
    B, S, A = shape
    step, out = make_dqn_inputs(B, S, A, dtype, DEVICE, seed=0)
    q, qt = out["dqn"], out["dqn_target"]
    call = provider_loss(provider, _public)
    loss_fn = lambda: call(step, q, qt)

    def step_fn():
        (g,) = torch.autograd.grad(loss_fn(), q)
        return g

    if provider == "fused-cudagraph":
        if not CUDA:
            pytest.skip("CUDA graphs need a GPU")
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            step_fn()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            step_fn()

        def timed():
            graph.replay()
            sync()
    else:
        def timed():
            step_fn()
            sync()

    benchmark.group = f"dqn {str(dtype)[6:]} B={B} S={S} A={A}"
    run_benchmark(benchmark, timed, byte_model="5*B*S*A*b (fwd: read q, q_target[t+1], write grad; bwd: read+write grad)",
                  nbytes=5 * B * S * A * q.element_size(), family="dqn", provider=provider,
                  shape=f"B={B} S={S} A={A}", dtype=str(dtype)[6:])
