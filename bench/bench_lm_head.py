"""LM-head losses for RL on language models, forward + backward at BT = 8192, H = 4096 (bf16):
``linear_cross_entropy`` (mean) against Liger-Kernel's ``LigerFusedLinearCrossEntropyLoss``, Cut
Cross-Entropy's ``linear_cross_entropy`` (``cut-cross-entropy`` on PyPI, its default gradient
filter), the materialised loss (``F.cross_entropy(hidden @ weight.T)``) eager and under
``torch.compile``; ``linear_logprob`` (per-token log-probs with random upstream gradients, and
with the entropy) against the materialised ``log_softmax`` eager and compiled, and Cut
Cross-Entropy's per-token loss (``reduction="none"``, the negated log-prob; no entropy).

These losses are matmul-bound: the figures are time, peak extra memory and launches, with the
matmul FLOPs (``6·N·H·V``: logits, then the gradients of hidden and weight; the fused paths
recompute the logits in backward where the upstream gradient is per token, ``8·N·H·V``) in
``extra_info``, not GB/s. On CPU the suite is a smoke test at tiny shapes; ``python
bench/bench_lm_head.py --cpu-memory`` prints the CPU peak-memory rows (fused against materialised,
torch's allocations at operator granularity) as JSON.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys

import pytest
import torch
import torch.nn.functional as F

import fusedloss as fl
from _common import CUDA, DEVICE, compiled, need_triton, peak_extra_memory, run_benchmark, sync, versions
from fusedloss.losses.sp_linear import default_chunk_size
from fusedloss.testing import make_lm_head_inputs

if CUDA:
    SHAPES = [(8192, 4096, 32000), (8192, 4096, 128256)]  # Llama-2 and Llama-3 heads
    DTYPES = [torch.bfloat16]
else:  # smoke test under the interpreter
    SHAPES = [(6, 8, 40)]
    DTYPES = [torch.float32]


def _inputs(N, H, V, dtype):
    hidden, weight, _, labels = make_lm_head_inputs(N, H, V, dtype, DEVICE, seed=0, ignore_frac=0.0)
    return hidden, weight, labels


def _materialised_ce(hidden, weight, labels):
    return F.cross_entropy((hidden @ weight.T).float(), labels)


def _materialised_logprob(hidden, weight, labels, entropy: bool):
    logp = torch.log_softmax((hidden @ weight.T).float(), dim=-1)
    lp = logp.gather(1, labels[:, None])[:, 0]
    if not entropy:
        return lp, None
    return lp, -(logp.exp() * logp).sum(-1)


def _peer(module: str, reason: str):
    if not CUDA:
        pytest.skip(f"{reason} runs on CUDA only")
    return pytest.importorskip(module, reason=f"{reason} is not installed")


def ce_loss(provider):
    """``(hidden, weight, labels) -> scalar loss`` of one provider."""
    if provider == "fused":
        need_triton()
        return lambda h, w, y: fl.linear_cross_entropy(h, w, y, check_inputs=False)
    if provider == "eager":
        return _materialised_ce
    if provider == "compile":
        return compiled(_materialised_ce)
    if provider == "liger":
        mod = _peer("liger_kernel.transformers", "Liger-Kernel").LigerFusedLinearCrossEntropyLoss()
        return lambda h, w, y: mod(w, h, y)
    if provider == "cce":
        cce = _peer("cut_cross_entropy", "Cut Cross-Entropy")
        return lambda h, w, y: cce.linear_cross_entropy(h, w, y)
    raise ValueError(provider)


def logprob_rows(provider, entropy: bool):
    """``(hidden, weight, labels) -> (logprob [N], entropy [N] or None)`` of one provider."""
    if provider == "fused":
        need_triton()
        if entropy:
            return lambda h, w, y: fl.linear_logprob(h, w, y, return_entropy=True, check_inputs=False)
        return lambda h, w, y: (fl.linear_logprob(h, w, y, check_inputs=False), None)
    if provider == "eager":
        return lambda h, w, y: _materialised_logprob(h, w, y, entropy)
    if provider == "compile":
        return compiled(lambda h, w, y: _materialised_logprob(h, w, y, entropy))
    if provider == "cce":
        if entropy:
            pytest.skip("Cut Cross-Entropy gives no entropy")
        cce = _peer("cut_cross_entropy", "Cut Cross-Entropy")
        return lambda h, w, y: (-cce.linear_cross_entropy(h, w, y, reduction="none"), None)
    raise ValueError(provider)


def _tag(dtype):
    return str(dtype)[6:]


@pytest.mark.parametrize("provider", ["fused", "liger", "cce", "compile", "eager"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "N{}-H{}-V{}".format(*s))
@pytest.mark.parametrize("dtype", DTYPES, ids=_tag)
def bench_linear_cross_entropy_fwd_bwd(benchmark, dtype, shape, provider):
    N, H, V = shape
    hidden, weight, labels = _inputs(N, H, V, dtype)
    loss_fn = ce_loss(provider)

    def step():
        torch.autograd.grad(loss_fn(hidden, weight, labels), [hidden, weight])
        sync()

    benchmark.group = f"linear_cross_entropy {_tag(dtype)} N={N} H={H} V={V}"
    run_benchmark(benchmark, step, family="lm_head", provider=provider, shape=f"N={N} H={H} V={V}",
                  dtype=_tag(dtype), loss="linear_cross_entropy", flops=6 * N * H * V)


@pytest.mark.parametrize("provider", ["fused", "cce", "compile", "eager"])
@pytest.mark.parametrize("entropy", [False, True], ids=["logprob", "logprob+entropy"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "N{}-H{}-V{}".format(*s))
@pytest.mark.parametrize("dtype", DTYPES, ids=_tag)
def bench_linear_logprob_fwd_bwd(benchmark, dtype, shape, entropy, provider):
    N, H, V = shape
    hidden, weight, labels = _inputs(N, H, V, dtype)
    rows_fn = logprob_rows(provider, entropy)
    g = torch.Generator(device=DEVICE).manual_seed(1)
    up_lp = torch.randn(N, generator=g, device=DEVICE)  # per-token upstream gradients, as a policy loss gives
    up_ent = torch.randn(N, generator=g, device=DEVICE)

    def step():
        lp, ent = rows_fn(hidden, weight, labels)
        loss = (lp * up_lp).sum() + (0 if ent is None else (ent * up_ent).sum())
        torch.autograd.grad(loss, [hidden, weight])
        sync()

    what = "linear_logprob+entropy" if entropy else "linear_logprob"
    benchmark.group = f"{what} {_tag(dtype)} N={N} H={H} V={V}"
    run_benchmark(benchmark, step, family="lm_head", provider=provider, shape=f"N={N} H={H} V={V}",
                  dtype=_tag(dtype), loss=what, flops=(8 if provider == "fused" else 6) * N * H * V)


def cpu_memory_rows(shapes=((512, 64, 4096), (4096, 128, 32768))) -> list[dict]:
    """Peak extra CPU memory of forward + backward, fp32, reference path: the fused losses against
    the materialised ones (torch's own allocations at operator granularity)."""
    rows = []
    for N, H, V in shapes:
        hidden, weight, _, labels = make_lm_head_inputs(N, H, V, torch.float32, "cpu", seed=0, ignore_frac=0.0)
        up = torch.randn(N, generator=torch.Generator().manual_seed(1))
        cases = {
            "linear_cross_entropy": (
                lambda: fl.linear_cross_entropy(hidden, weight, labels, backend="torch", check_inputs=False),
                lambda: _materialised_ce(hidden, weight, labels)),
            "linear_logprob+entropy": (
                lambda: sum((r * up).sum() for r in fl.linear_logprob(hidden, weight, labels, return_entropy=True,
                                                                     backend="torch", check_inputs=False)),
                lambda: sum((r * up).sum() for r in _materialised_logprob(hidden, weight, labels, True))),
        }
        for loss, (fused, materialised) in cases.items():
            peaks = [peak_extra_memory(lambda f=f: torch.autograd.grad(f(), [hidden, weight])) for f in (fused,
                                                                                                          materialised)]
            rows.append({"loss": loss, "N": N, "H": H, "V": V,
                         "chunk": default_chunk_size(N, V, H),
                         "fused_peak_bytes": peaks[0], "materialised_peak_bytes": peaks[1],
                         "ratio": peaks[0] / peaks[1]})
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="CPU peak-memory rows of the LM-head losses (JSON on stdout)")
    ap.add_argument("--cpu-memory", action="store_true", help="measure and print the rows")
    ap.add_argument("--small", action="store_true", help="only the small shape (a quick check)")
    ap.add_argument("--out", help="write the JSON here (default: stdout, where some peers also print)")
    args = ap.parse_args(argv)
    if not args.cpu_memory:
        ap.print_help()
        return 2
    shapes = ((512, 64, 4096),) if args.small else ((512, 64, 4096), (4096, 128, 32768))
    record = {"date": datetime.date.today().isoformat(), "versions": versions(),
              "method": "forward + backward (gradients of hidden and weight), fp32, backend='torch'; peak of "
                        "torch's CPU allocations at operator granularity (bench/_common._cpu_peak_bytes)",
              "rows": cpu_memory_rows(shapes)}
    text = json.dumps(record, indent=2) + "\n"
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
