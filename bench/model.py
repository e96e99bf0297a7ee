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
  runs (the aten ops still run, on the CPU);
- **SASS** (unless ``--no-sass``): each recorded launch compiled ahead of time for sm_90 exactly as
  the runtime would specialise it (:mod:`fusedloss.kernels.aot`): registers, spills, shared memory,
  occupancy, top-level loops (each loop over a row's tiles is one pass over it) and static SASS
  instructions per element;
- **predicted time** on H100 and H200 (:func:`predict`): per launch the largest of bytes ÷ copy
  bandwidth, warp instructions ÷ issue rate and the launch cost, under the assumptions in ``GPUS``.
  It is a model: the first GPU run calibrates it.

Everything here is a count, a static figure or a CPU time, not a GPU measurement;
``tests/test_model.py`` asserts the counts (launch budgets, bytes, instruction budgets, no spills),
never the times. A limit: the dispatch mode does not see the aten ops run
inside fusedloss's own custom ops (a copy of a non-contiguous input), so those are not counted;
the bench inputs are contiguous.
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
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # the runtime's default, stated (Triton 3.9 warns otherwise)

import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

import fusedloss as fl  # noqa: E402

# aten ops that launch no device kernel: views, metadata, allocation.
NO_LAUNCH = {"detach", "view", "_unsafe_view", "reshape", "expand", "slice", "select", "as_strided", "t",
             "transpose", "permute", "unsqueeze", "squeeze", "alias", "empty", "empty_like", "empty_strided",
             "new_empty", "new_empty_strided", "lift_fresh", "_to_copy_noop", "unbind", "split", "split_with_sizes",
             "chunk", "narrow", "flatten", "unflatten", "movedim", "numel", "sym_size", "is_same_size"}


def _tensor_bytes(*trees) -> int:
    """Bytes of the distinct tensors in ``trees`` (nested tuples, lists and dicts)."""
    seen = {}

    def walk(x):
        if isinstance(x, torch.Tensor):
            seen[(x.data_ptr(), x.numel() * x.element_size())] = x.numel() * x.element_size()
        elif isinstance(x, (tuple, list)):
            for y in x:
                walk(y)
        elif isinstance(x, dict):
            for y in x.values():
                walk(y)

    for t in trees:
        walk(t)
    return sum(seen.values())


class _Recorder(TorchDispatchMode):
    """Counts the aten ops, by name, that would launch a device kernel, and the bytes of their
    inputs and outputs (each once)."""

    def __init__(self):
        super().__init__()
        self.ops = collections.Counter()
        self.bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        out = func(*args, **(kwargs or {}))
        if name not in NO_LAUNCH and func.namespace != "fusedloss":  # a custom op's launches are the Triton ones
            self.ops[name] += 1
            self.bytes += _tensor_bytes(args, kwargs or {}, out)
        return out


@contextlib.contextmanager
def stubbed_launches(log: list | None):
    """Every ``kernel[grid](...)`` appends ``(kernel name, bytes of its tensor arguments, the
    launch)`` to ``log`` instead of compiling and running; the launch is ``(JITFunction, grid,
    args, kwargs)``, its tensors as meta tensors, from which :func:`fusedloss.kernels.aot.launch_variant` rebuilds the compile. With ``log=None`` the stub records nothing and returns at once, so that
    host timings do not include its own work."""
    from triton.runtime.jit import JITFunction

    def run(self, *args, grid, warmup, **kwargs):
        if log is None:  # timing: the stub itself costs nothing
            return None
        seen = {}  # one argument passed twice (a placeholder pointer) is one buffer
        for a in (*args, *kwargs.values()):
            if isinstance(a, torch.Tensor):
                seen[(a.data_ptr(), a.numel() * a.element_size())] = a.numel() * a.element_size()
        # meta copies: holding the real tensors would keep autograd from stealing a gradient buffer
        meta = [torch.empty_like(a, device="meta") if isinstance(a, torch.Tensor) else a for a in args]
        kw = {k: torch.empty_like(a, device="meta") if isinstance(a, torch.Tensor) else a for k, a in kwargs.items()}
        log.append((self.fn.__name__, sum(seen.values()), (self, grid, tuple(meta), kw)))

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
    cfg = fl.SpLossConfig(loss_type=loss_type, backend="triton", metrics_mode="lazy")  # built once, as a trainer does
    b = 2
    return {"call": lambda: fl.sp_loss({"q_star": q}, z, cfg)[0],
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
    "dqn B=1024 S=32 A=1024": lambda: _dqn_case(1024, 32, 1024),
    "dqn B=64 S=64 A=32768": lambda: _dqn_case(64, 64, 32768),
    "sp kl-fwd N=8192 V=32768": lambda: _sp_case(8192, 32768, "kl-fwd"),
    "sp kl-fwd N=1024 V=131072": lambda: _sp_case(1024, 131072, "kl-fwd"),
    "sp js N=2048 V=32768": lambda: _sp_case(2048, 32768, "js"),
    "sp kl-fwd N=256 V=18": lambda: _sp_case(256, 18, "kl-fwd", rl=True),
    "sp_topk N=8192 V=32768 k=64": lambda: _topk_case(8192, 32768, 64),
    "vec_dqn B=64 S=32 A=18 D=16": lambda: _vec_dqn_case(64, 32, 18, 16),
}


def _textbook_dqn(step, out, gamma):
    """A minimal one-step DQN loss on the same tensors, for the reference path's yardstick: the
    taken action's value against ``r + γ·max q_target`` (0 after a terminal), squared, mean; no
    input checks, no metrics, no truncation."""
    a, r, d = step["action"][:, 1:], step["reward"][:, 1:], step["done"][:, 1:]
    q, qt = out["dqn"], out["dqn_target"]
    q_sa = q[:, :-1].gather(-1, a.unsqueeze(-1)).squeeze(-1)
    target = (r + torch.where(d == 1, 0.0, gamma) * qt[:, 1:].amax(-1)).detach()
    return ((q_sa - target) ** 2).mean()


def reference_vs_textbook(repeat: int, B: int = 32, S: int = 80, A: int = 18) -> dict:
    """``dqn_loss(backend="torch")`` (the path CPU users get, metrics included, lazy) against
    :func:`_textbook_dqn` at an RL shape: aten ops and the median host µs of fwd+bwd, on one thread,
    the two calls interleaved."""
    from fusedloss.testing import make_dqn_inputs

    step, out = make_dqn_inputs(B, S, A, seed=0)
    cfg = fl.DqnLossConfig(backend="torch", metrics_mode="lazy")
    calls = {"fusedloss reference": lambda: fl.dqn_loss(step, out, cfg)[0],
             "textbook": lambda: _textbook_dqn(step, out, cfg.gamma)}
    result = {"shape": f"B={B} S={S} A={A}"}
    times = {name: [] for name in calls}
    for name, call in calls.items():
        with _Recorder() as rec:
            call().backward()
        out["dqn"].grad = None
        result[name] = {"aten ops": sum(rec.ops.values())}
    for _ in range(repeat):  # interleaved, so that the machine's drift falls on both alike
        for name, call in calls.items():
            start = time.perf_counter()
            call().backward()
            times[name].append(time.perf_counter() - start)
            out["dqn"].grad = None
    for name in calls:
        result[name]["host us"] = 1e6 * statistics.median(times[name]) if repeat else None
    return result


# The GPUs the prediction is made for. Assumptions of the model, not measurements: copy bandwidth
# (H200: the figure issue 24 works with; H100 SXM: about 90% of its 3.35 TB/s), 132 SMs issuing 4
# warp instructions per clock at a sustained 1.755 GHz, and 3 µs per dependent launch in eager
# mode. The first GPU run (issue 20) calibrates them.
GPUS = {"H100": {"copy_bw": 3.0e12, "sms": 132, "clock": 1.755e9, "launch_s": 3e-6},
        "H200": {"copy_bw": 4.3e12, "sms": 132, "clock": 1.755e9, "launch_s": 3e-6}}

_SASS_CACHE: dict = {}


def launch_sass(launch) -> dict:
    """The AOT sm_90 record of one recorded launch (:func:`fusedloss.kernels.aot.analyse`), and
    its work: ``programs`` (grid size), ``elements`` (its largest tensor argument's), and
    ``warp_instructions`` (instructions per element × elements ÷ 32) where the kernel names a tile."""
    from fusedloss.kernels import aot

    fn, grid, args, kwargs = launch
    v = aot.launch_variant(fn, args, kwargs)
    key = (fn.fn.__name__, tuple(sorted(v.signature.items())), tuple(sorted(v.constexprs.items(), key=str)),
           v.num_warps, tuple(sorted((k, n % 16 == 0) for k, n in v.ints.items())))
    if key not in _SASS_CACHE:
        _SASS_CACHE[key] = aot.analyse(v)
    rec = dict(_SASS_CACHE[key])
    grid = grid if isinstance(grid, tuple) else (grid,)
    rec["programs"] = int(torch.tensor(grid).prod())
    rec["elements"] = max((a.numel() for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)), default=0)
    if "instr_per_element" in rec:
        rec["warp_instructions"] = rec["instr_per_element"] * rec["elements"] / 32
    return rec


def predict(launches: list, sass: list, aten_ops: int, aten_bytes: int, gpu: dict) -> dict:
    """The model's time on ``gpu``: per Triton launch the largest of its bytes ÷ copy bandwidth
    (scaled down when its programs cannot cover the SMs), its warp instructions ÷ the issue rate,
    and the launch cost; per aten op the larger of its bytes ÷ bandwidth and the launch cost.
    Returns the seconds, and which term bound each Triton launch."""
    issue = gpu["sms"] * 4 * gpu["clock"]
    total, bounds = 0.0, []
    for (_, nbytes, _), rec in zip(launches, sass):
        fill = min(1.0, rec["programs"] / gpu["sms"])
        terms = {"bytes": nbytes / (gpu["copy_bw"] * fill), "launch": gpu["launch_s"]}
        if "warp_instructions" in rec:
            terms["instructions"] = rec["warp_instructions"] / (issue * fill)
        bound = max(terms, key=terms.get)
        total += terms[bound]
        bounds.append(bound)
    total += max(aten_ops * gpu["launch_s"], aten_bytes / gpu["copy_bw"])
    return {"seconds": total, "bound": bounds}


def measure(name: str, repeat: int = 0, sass: bool = False) -> dict:
    case = CASES[name]()
    leaf = case["leaf"]
    row = {"case": name, "byte_model": case["model_text"], "model_bytes": case["model"]}
    with stubbed_launches([]):  # one call first: what a first call sets up once (caches) is not per call
        case["call"]().backward()
    leaf.grad = None
    for phase in ("fwd", "fwd+bwd"):
        launches: list = []
        with stubbed_launches(launches), _Recorder() as rec:
            loss = case["call"]()
            if phase == "fwd+bwd":
                loss.backward()
        leaf.grad = None
        row[f"{phase} triton launches"] = [k for k, _, _ in launches]
        row[f"{phase} aten launches"] = dict(rec.ops)
        row[f"{phase} launches"] = len(launches) + sum(rec.ops.values())
        row[f"{phase} bytes"] = sum(n for _, n, _ in launches)
        row[f"{phase} aten bytes"] = rec.bytes
    row["bytes / model"] = row["fwd+bwd bytes"] / case["model"]
    row["all bytes / model"] = (row["fwd+bwd bytes"] + row["fwd+bwd aten bytes"]) / case["model"]
    if repeat and case.get("rl"):  # host time where it decides: the small RL shapes
        times = []
        with stubbed_launches(None):
            for _ in range(repeat):
                start = time.perf_counter()
                case["call"]().backward()
                times.append(time.perf_counter() - start)
                leaf.grad = None
        row["host us fwd+bwd"] = 1e6 * statistics.median(times)
    if sass:
        records = [launch_sass(launch) for _, _, launch in launches]
        row["sass"] = [{k: r[k] for k in ("kernel", "num_warps", "regs", "spill_stores", "spill_loads", "shared",
                                          "occupancy", "instructions", "loops", "programs",
                                          "instr_per_element")
                        if k in r} for r in records]
        for gpu_name, gpu in GPUS.items():
            p = predict(launches, records, sum(rec.ops.values()), rec.bytes, gpu)
            row[f"{gpu_name} predicted us"] = 1e6 * p["seconds"]
            row[f"{gpu_name} bound"] = p["bound"]
            row[f"{gpu_name} % of copy"] = 100 * case["model"] / gpu["copy_bw"] / p["seconds"]
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--json", help="also write the rows here")
    ap.add_argument("--repeat", type=int, default=200, help="calls timed per case for the host µs (0: none)")
    ap.add_argument("--case", action="append", choices=sorted(CASES), help="only these cases")
    ap.add_argument("--no-sass", dest="sass", action="store_false",
                    help="skip the sm_90 compiles (SASS counts, occupancy, predicted time)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    names = args.case or list(CASES)
    # the host times first, for every case, before any sm_90 compile (its worker threads and caches slow the
    # timed calls that follow), then the counts and compiles
    host = {name: measure(name, args.repeat, False).get("host us fwd+bwd") for name in names}
    rows = [measure(name, 0, args.sass) for name in names]
    for row in rows:
        if host[row["case"]] is not None:
            row["host us fwd+bwd"] = host[row["case"]]
    print(f"fusedloss performance model (counted with the launches stubbed; CPU host time; torch "
          f"{torch.__version__}; a model, not a GPU measurement)")
    print(f"{'case':<30} {'launches fwd':>12} {'fwd+bwd':>8} {'GB fwd+bwd':>11} {'× model':>8} {'+aten':>6} "
          f"{'host µs':>8} {'H100 µs':>8} {'H200 µs':>8} {'H200 %copy':>10}")
    for r in rows:
        host = f"{r['host us fwd+bwd']:8.0f}" if "host us fwd+bwd" in r else f"{'-':>8}"
        pred = (f"{r['H100 predicted us']:8.1f} {r['H200 predicted us']:8.1f} {r['H200 % of copy']:10.0f}"
                if "H200 predicted us" in r else f"{'-':>8} {'-':>8} {'-':>10}")
        print(f"{r['case']:<30} {r['fwd launches']:>12} {r['fwd+bwd launches']:>8} {r['fwd+bwd bytes'] / 1e9:11.3f} "
              f"{r['bytes / model']:8.2f} {r['all bytes / model']:6.2f} {host} {pred}")
        print(f"{'':<30} triton: {' '.join(r['fwd+bwd triton launches'])}; aten: "
              + ", ".join(f"{k}×{v}" for k, v in sorted(r["fwd+bwd aten launches"].items())))
        for k, bound in zip(r.get("sass", []), r.get("H200 bound", [])):
            ipe = f"{k['instr_per_element']:.1f} instr/element" if "instr_per_element" in k else "instr/element n/a"
            print(f"{'':<32}{k['kernel']}: {k['regs']} regs, {k['spill_stores'] + k['spill_loads']} B spilled, "
                  f"{k['shared']} B shared, occupancy {k['occupancy']:.2f}, {k['programs']} programs, {k['loops']} loop(s), {ipe}; "
                  f"H200 {bound}-bound")
    ref = reference_vs_textbook(args.repeat)
    ours, book = ref["fusedloss reference"], ref["textbook"]
    ratio = f", {ours['host us'] / book['host us']:.2f}× its host time" if args.repeat else ""
    print(f"dqn reference path {ref['shape']} (backend='torch', lazy metrics): {ours['aten ops']} aten ops fwd+bwd "
          f"against a textbook one-step loss's {book['aten ops']}{ratio}"
          + (f" ({ours['host us']:.0f} against {book['host us']:.0f} µs)" if args.repeat else ""))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": rows, "reference": ref, "torch": torch.__version__, "python": sys.version.split()[0],
                       "gpus": GPUS if args.sass else {}}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
