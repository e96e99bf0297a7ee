"""A performance model of the fused paths that runs without a GPU: launches, bytes and host time,
counted on the real calls with every Triton launch stubbed out.

    python bench/model.py [--json model.json] [--repeat 200]

For each case (the bench shapes of each family, the kernel path, fwd and fwd+bwd) it runs the
public loss on CPU tensors with ``JITFunction.run`` replaced by a recorder, so no kernel executes and
no GPU is needed, while everything around the kernels (validation, dispatch, custom ops, autograd,
the aten ops) runs as it would. It reports:

- **launches**: Triton launches plus aten ops that would launch a device kernel (views, detach and
  allocations excluded), counted under a ``TorchDispatchMode``;
- **bytes**: the sum over the Triton launches of their tensor arguments' sizes (each read or
  written once; a kernel that reads a row twice past one tile moves more), and its ratio to the
  family's minimal byte model;
- **host µs** (RL shapes only): the median wall time of one eager fwd+bwd call with the launches
  stubbed, on one CPU thread: what Python, validation, dispatch and autograd cost before any kernel
  runs (the aten ops still run, on the CPU).

Everything here is a count or a CPU time, not a GPU figure; ``tests/test_model.py`` asserts the
counts (launch budgets), never the times. A limit: the dispatch mode does not see the aten ops run
inside fusedloss's own custom ops (a copy of a non-contiguous input, the DQN ticket counter's
first-call fill), so those are not counted; the bench inputs are contiguous.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import os
import statistics
import sys
import time

os.environ.pop("TRITON_INTERPRET", None)  # real JITFunctions, whose launch the recorder replaces

import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

import fusedloss as fl  # noqa: E402

# aten ops that launch no device kernel: views, metadata, allocation.
NO_LAUNCH = {"detach", "view", "_unsafe_view", "reshape", "expand", "slice", "select", "as_strided", "t",
             "transpose", "permute", "unsqueeze", "squeeze", "alias", "empty", "empty_like", "empty_strided",
             "new_empty", "new_empty_strided", "lift_fresh", "_to_copy_noop", "unbind", "split", "split_with_sizes",
             "chunk", "narrow", "flatten", "unflatten", "movedim", "numel", "sym_size", "is_same_size"}


class _Recorder(TorchDispatchMode):
    """Counts the aten ops, by name, that would launch a device kernel."""

    def __init__(self):
        super().__init__()
        self.ops = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name not in NO_LAUNCH and func.namespace != "fusedloss":  # a custom op's launches are the Triton ones
            self.ops[name] += 1
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def stubbed_launches(log: list):
    """Every ``kernel[grid](...)`` appends ``(kernel name, bytes of its tensor arguments)`` to
    ``log`` instead of compiling and running."""
    from triton.runtime.jit import JITFunction

    def run(self, *args, grid, warmup, **kwargs):
        seen = {}  # one argument passed twice (a placeholder pointer) is one buffer
        for a in (*args, *kwargs.values()):
            if isinstance(a, torch.Tensor):
                seen[(a.data_ptr(), a.numel() * a.element_size())] = a.numel() * a.element_size()
        log.append((self.fn.__name__, sum(seen.values())))

    from fusedloss import _dispatch

    original, why_not = JITFunction.run, _dispatch.why_not_kernel
    JITFunction.run = run
    _dispatch.why_not_kernel = lambda family, tensors: None  # CPU tensors take the kernel path, launch stubbed
    try:
        yield
    finally:
        JITFunction.run, _dispatch.why_not_kernel = original, why_not


def _zeros(shape, dtype=torch.float32, grad=False):
    return torch.zeros(shape, dtype=dtype).requires_grad_(grad)


def _dqn_case(B, S, A, rl=False):
    step = {"action": torch.zeros(B, S, dtype=torch.long), "reward": _zeros((B, S)),
            "done": torch.zeros(B, S, dtype=torch.long)}
    out = {"dqn": _zeros((B, S, A), torch.bfloat16, True), "dqn_target": _zeros((B, S, A), torch.bfloat16)}
    cfg = fl.DqnLossConfig(backend="triton", metrics_mode="lazy")
    b = 2
    return {"call": lambda: fl.dqn_loss(step, out, cfg)[0], "leaf": out["dqn"], "rl": rl,
            "model": 5 * B * S * A * b,  # read q, q_target; write the stored gradient; backward reads it, writes dq
            "model_text": "read q and q_target, write the gradient; backward reads it and writes dq: 5·B·S·A·b"}


def _sp_case(N, V, loss_type, rl=False):
    q, z = _zeros((N, V), torch.bfloat16), _zeros((N, V), torch.bfloat16, True)
    b = 2
    return {"call": lambda: fl.sp_loss({"q_star": q}, z, fl.SpLossConfig(loss_type=loss_type, backend="triton",
                                                                         metrics_mode="lazy"))[0],
            "leaf": z, "rl": rl, "model": 5 * N * V * b, "model_text": "read teacher and student, write dz; backward reads "
                                                               "and writes dz: 5·N·V·b"}


def _topk_case(N, V, k):
    idx = torch.arange(k).repeat(N, 1)
    lp, z = _zeros((N, k), torch.bfloat16), _zeros((N, V), torch.bfloat16, True)
    b = 2
    return {"call": lambda: fl.sp_topk_loss(idx, lp, z, backend="triton", check_inputs=False), "leaf": z,
            "model": 4 * N * V * b + N * k * (8 + b),
            "model_text": "read z, write the gradient; backward reads it and writes dz: 4·N·V·b, plus the teacher's N·k"}


def _vec_dqn_case(B, S, A, D):
    step = {"action": torch.zeros(B, S, dtype=torch.long), "reward": _zeros((B, S))}
    online, target = _zeros((B, S, A, D), torch.bfloat16, True), _zeros((B, S, A, D), torch.bfloat16)
    cfg = fl.VecDqnLossConfig(backend="triton", metrics_mode="lazy")
    b = 2
    return {"call": lambda: fl.vec_dqn_loss(step, online, target, cfg)[0], "leaf": online,
            "model": 2 * B * S * A * D * b + B * S * A * D * b,
            "model_text": "read online and target vectors, write the dense gradient: 3·B·S·A·D·b"}


CASES = {
    "dqn B=256 S=64 A=18": lambda: _dqn_case(256, 64, 18),
    "dqn B=32 S=80 A=18": lambda: _dqn_case(32, 80, 18, rl=True),
    "sp kl-fwd N=8192 V=32768": lambda: _sp_case(8192, 32768, "kl-fwd"),
    "sp kl-fwd N=256 V=18": lambda: _sp_case(256, 18, "kl-fwd", rl=True),
    "sp_topk N=8192 V=32768 k=64": lambda: _topk_case(8192, 32768, 64),
    "vec_dqn B=64 S=32 A=18 D=16": lambda: _vec_dqn_case(64, 32, 18, 16),
}


def measure(name: str, repeat: int = 0) -> dict:
    case = CASES[name]()
    leaf = case["leaf"]
    row = {"case": name, "byte_model": case["model_text"]}
    for phase in ("fwd", "fwd+bwd"):
        launches: list = []
        with stubbed_launches(launches), _Recorder() as rec:
            loss = case["call"]()
            if phase == "fwd+bwd":
                loss.backward()
        leaf.grad = None
        row[f"{phase} triton launches"] = [k for k, _ in launches]
        row[f"{phase} aten launches"] = dict(rec.ops)
        row[f"{phase} launches"] = len(launches) + sum(rec.ops.values())
        row[f"{phase} bytes"] = sum(n for _, n in launches)
    row["bytes / model"] = row["fwd+bwd bytes"] / case["model"]
    if repeat and case.get("rl"):  # host time where it decides: the small RL shapes
        times = []
        with stubbed_launches([]):
            for _ in range(repeat):
                start = time.perf_counter()
                case["call"]().backward()
                times.append(time.perf_counter() - start)
                leaf.grad = None
        row["host us fwd+bwd"] = 1e6 * statistics.median(times)
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--json", help="also write the rows here")
    ap.add_argument("--repeat", type=int, default=200, help="calls timed per case for the host µs (0: none)")
    ap.add_argument("--case", action="append", choices=sorted(CASES), help="only these cases")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    rows = [measure(name, args.repeat) for name in (args.case or CASES)]
    print(f"fusedloss performance model (counted with the launches stubbed; CPU host time; torch "
          f"{torch.__version__}; a model, not a GPU measurement)")
    print(f"{'case':<30} {'launches fwd':>12} {'fwd+bwd':>8} {'GB fwd+bwd':>11} {'× model':>8} {'host µs':>9}")
    for r in rows:
        host = f"{r['host us fwd+bwd']:9.0f}" if "host us fwd+bwd" in r else f"{'-':>9}"
        print(f"{r['case']:<30} {r['fwd launches']:>12} {r['fwd+bwd launches']:>8} {r['fwd+bwd bytes'] / 1e9:11.3f} "
              f"{r['bytes / model']:8.2f} {host}")
        print(f"{'':<30} triton: {' '.join(r['fwd+bwd triton launches'])}; aten: "
              + ", ".join(f"{k}×{v}" for k, v in sorted(r["fwd+bwd aten launches"].items())))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": rows, "torch": torch.__version__, "python": sys.version.split()[0]}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
