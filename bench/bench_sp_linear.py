"""LLM-scale distillation, forward + backward: the fused-linear loss (``sp_linear_loss``, the
``[N, V]`` logits never held) against the materialised eager path (full student and teacher logits,
then ``sp_reference``) and Liger-Kernel's ``LigerFusedLinearJSD`` (JSD at β = 0.5 and T = 1, where
its semantics match ours); and the top-k teacher (``sp_topk_loss``) fused against eager.

Fused-linear is matmul-bound: the figure is time and peak extra memory, not GB/s. The top-k byte
model: read the student logits (twice when a row is wider than one tile), write the gradient, then
backward reads and writes it: ``4·N·V·b`` (``5·N·V·b`` tiled) plus ``O(N·k)``.
"""

import pytest
import torch

import fusedloss as fl
from _common import CUDA, DEVICE, need_triton, run_benchmark, sync
from fusedloss.testing import make_sp_linear_inputs, make_topk_inputs

if CUDA:
    LINEAR_SHAPES = [(8192, 4096, 128256)]  # a Llama-3-like head
    TOPK_SHAPES = [(8192, 32768, 64), (8192, 131072, 64)]
    DTYPES = [torch.bfloat16]
else:  # smoke test under the interpreter
    LINEAR_SHAPES = [(6, 8, 40)]
    TOPK_SHAPES = [(5, 40, 4)]
    DTYPES = [torch.float32]


def _linear_step(provider, hidden, weight, teacher):
    if provider == "fused-linear":
        need_triton()
        return lambda: fl.sp_linear_loss(hidden, weight, teacher, "js", backend="auto", check_inputs=False)
    if provider == "eager":
        def materialised():
            z = hidden @ weight.T
            q = teacher.hidden @ teacher.weight.T
            return fl.sp_reference(q, z, "js").mean()

        return materialised
    if provider == "liger":
        if not CUDA:
            pytest.skip("Liger-Kernel runs on CUDA only")
        liger = pytest.importorskip("liger_kernel.transformers", reason="Liger-Kernel is not installed")
        mod = liger.LigerFusedLinearJSD(jsd_beta=0.5, temperature=1.0)
        return lambda: mod(hidden, weight, teacher.hidden, teacher.weight)
    raise ValueError(provider)


@pytest.mark.parametrize("provider", ["fused-linear", "eager", "liger"])
@pytest.mark.parametrize("shape", LINEAR_SHAPES, ids=lambda s: "N{}-H{}-V{}".format(*s))
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
def bench_sp_linear_js_fwd_bwd(benchmark, dtype, shape, provider):
    N, H, V = shape
    hidden, weight, _, teacher, _ = make_sp_linear_inputs(N, H, V, "linear", dtype, DEVICE, seed=0)
    loss_fn = _linear_step(provider, hidden, weight, teacher)

    def step():
        torch.autograd.grad(loss_fn(), [hidden, weight])
        sync()

    benchmark.group = f"sp_linear js {str(dtype)[6:]} N={N} H={H} V={V}"
    run_benchmark(benchmark, step, family="sp_linear", provider=provider, shape=f"N={N} H={H} V={V}",
                  dtype=str(dtype)[6:], flops=4 * 2 * N * H * V)


@pytest.mark.parametrize("provider", ["fused", "eager"])
@pytest.mark.parametrize("shape", TOPK_SHAPES, ids=lambda s: "N{}-V{}-k{}".format(*s))
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
def bench_sp_topk_fwd_bwd(benchmark, dtype, shape, provider):
    N, V, k = shape
    idx, logprob, z = make_topk_inputs(N, V, k, dtype, DEVICE, seed=0)
    if provider == "fused":
        need_triton()
    backend = "triton" if provider == "fused" else "torch"

    def step():
        loss = fl.sp_topk_loss(idx, logprob, z, "kl-fwd", backend=backend, check_inputs=False)
        torch.autograd.grad(loss, z)
        sync()

    benchmark.group = f"sp_topk kl-fwd {str(dtype)[6:]} N={N} V={V} k={k}"
    run_benchmark(benchmark, step, byte_model="4*N*V*b + O(N*k) (fwd: read z, write grad; bwd: read+write grad)",
                  nbytes=4 * N * V * z.element_size(), family="sp_topk", provider=provider,
                  shape=f"N={N} V={V} k={k}", dtype=str(dtype)[6:])
