"""Distillation family, forward + backward: fused kernel vs eager reference vs torch.compile vs
Liger-Kernel (JSD and KL-div, fed the log-probabilities they expect). The first three call the
public ``sp_loss`` (the teacher checks and lazy metrics included), so they do the same work.

Byte model when a row fits one tile: read teacher, read student, write the gradient in the forward
and read + write it in backward: ``5·N·A·b`` per forward+backward (``3·N·A·b`` forward alone).
"""

import pytest
import torch

import fusedloss as fl
from _common import CUDA, DEVICE, HEADLINE_PROVIDERS, provider_loss, run_benchmark, timed_step
from fusedloss.testing import make_sp_inputs

if CUDA:
    SHAPES = [(8192, 32768), (8192, 131072), (32768, 4096), (16384, 18), (16384, 256)]
    DTYPES = [torch.bfloat16, torch.float32]
else:  # smoke test under the interpreter
    SHAPES = [(6, 37)]
    DTYPES = [torch.float32]
LOSS_TYPES = ["kl-fwd", "js", "ce"]
PROVIDERS = ["fused", *HEADLINE_PROVIDERS, "eager", "compile", "liger"]
RL_WIDTH = 256  # rows this narrow are RL action spaces, where host time decides: the headline providers run there


def _public(loss_type):
    def on(backend):
        cfg = fl.SpLossConfig(loss_type=loss_type, backend=backend, metrics_mode="lazy")
        return lambda q, z: fl.sp_loss({"q_star": q}, z, cfg)[0]

    return on


def _loss_fn(provider, loss_type):
    if provider != "liger":
        return provider_loss(provider, _public(loss_type))
    if not CUDA:
        pytest.skip("Liger-Kernel runs on CUDA only")
    liger = pytest.importorskip("liger_kernel.transformers", reason="Liger-Kernel is not installed")
    if loss_type == "js":
        mod = liger.LigerJSD(beta=0.5)
        return lambda q, z: mod(torch.log_softmax(z.float(), -1), torch.log_softmax(q.float(), -1))
    if loss_type == "kl-fwd":
        mod = liger.LigerKLDIVLoss(reduction="batchmean", log_target=True)
        return lambda q, z: mod(torch.log_softmax(z.float(), -1), torch.log_softmax(q.float(), -1))
    pytest.skip("Liger has no matching loss for this type")


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"N{s[0]}-A{s[1]}")
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def bench_sp_fwd_bwd(benchmark, loss_type, dtype, shape, provider):
    N, A = shape
    if provider in HEADLINE_PROVIDERS and A > RL_WIDTH and CUDA:
        pytest.skip("the captured and compiled steps are the headline for RL shapes; wide rows are bandwidth-bound")
    q, z = make_sp_inputs(N, A, dtype, DEVICE, seed=0)
    loss_fn = _loss_fn(provider, loss_type)
    grads = []

    def step():
        grads[:] = torch.autograd.grad(loss_fn(q, z), z)

    benchmark.group = f"sp {loss_type} {str(dtype)[6:]} N={N} A={A}"
    run_benchmark(benchmark, timed_step(provider, step),
                  byte_model="5*N*A*b (fwd: read q, z, write grad; bwd: read+write grad)",
                  nbytes=5 * N * A * z.element_size(), family="sp", provider=provider, loss_type=loss_type,
                  shape=f"N={N} A={A}", dtype=str(dtype)[6:])
    assert torch.isfinite(grads[0]).all()
