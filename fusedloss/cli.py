"""``python -m fusedloss verify``: run every loss on random inputs and check it against float64.

For each family it runs the reference and, where one exists, the fused kernel (on CUDA when a GPU
is present; on CPU under the Triton interpreter at small shapes), in fp32 and bf16, and compares the
loss and the gradient with a float64 evaluation of the same inputs. It prints one table row per run
and exits 1 on any failure.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings

import torch


def _to64(obj):
    if isinstance(obj, torch.Tensor):
        if obj.is_floating_point():
            return obj.detach().to(torch.float64).requires_grad_(obj.requires_grad)
        return obj
    if isinstance(obj, dict):
        return {k: _to64(v) for k, v in obj.items()}
    if isinstance(obj, (tuple, list)):
        return type(obj)(_to64(v) for v in obj)
    return obj


def _leaves(obj):
    if isinstance(obj, torch.Tensor):
        return [obj] if obj.requires_grad else []
    if isinstance(obj, dict):
        return [t for v in obj.values() for t in _leaves(v)]
    if isinstance(obj, (tuple, list)):
        return [t for v in obj for t in _leaves(v)]
    return []


def _run(case, args, backend: str, upstream: float):
    loss = case.call(args, backend)
    leaves = _leaves(args)
    grads = torch.autograd.grad(loss * upstream, leaves) if leaves else ()
    return loss.detach(), [g.detach() for g in grads]


def _cases(small: bool, families=None) -> list[tuple]:
    """``(row name, family, case)`` for every verify case of the family table, in table order."""
    from fusedloss.losses import FAMILIES

    return [(case.name or fam.name, fam, case) for fam in FAMILIES
            if fam.verify_cases is not None and (families is None or fam.name in families)
            for case in fam.verify_cases(small)]


def _quiet() -> None:
    """What verify itself runs prints no noise: the interpreter's numpy warnings on the edge cases it
    feeds, and KeOps's compile messages (the table says what ran)."""
    warnings.filterwarnings("ignore", category=RuntimeWarning, module="triton.runtime.interpreter")
    os.environ.setdefault("PYKEOPS_VERBOSE", "0")  # read when pykeops is first imported
    if "pykeops" in sys.modules:
        sys.modules["pykeops"].set_verbose(False)


def _row(name, case, path, dtype, f_err, g_err, result, tail="") -> str:
    fe = f"{f_err:9.2e}" if f_err is not None else f"{'-':>9}"
    ge = f"{g_err:9.2e}" if g_err is not None else f"{'-':>9}"
    return (f"{name:<22} {case.options[:44]:<44} {case.shape:<18} {path:<7} {str(dtype)[6:]:<9} {fe} {ge} "
            f"{result:<6} {tail}").rstrip()


def verify(argv: list[str] | None = None) -> int:
    """Check every family's losses (or those named by ``--family``) against float64; exit 1 on any
    failure. The last line names every path that could not be checked, and why."""
    from fusedloss.losses import FAMILIES

    names = sorted({f.name for f in FAMILIES} | {name for name, _, _ in _cases(True)})
    parser = argparse.ArgumentParser(
        prog="python -m fusedloss verify",
        description="Run every loss on random inputs and check it, forward and gradient, against a float64 "
                    "evaluation; exit 1 on any failure. Kernels run on CUDA when present, else on CPU under the "
                    "Triton interpreter at small shapes.")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when present)")
    parser.add_argument("--family", action="append", metavar="NAME",
                        help=f"only this family (repeatable); one of {', '.join(names)}")
    args = parser.parse_args(argv)
    unknown = sorted(set(args.family or ()) - set(names))
    if unknown:
        parser.error(f"unknown family {', '.join(map(repr, unknown))}; known: {', '.join(names)}")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    from fusedloss import _dispatch

    # Kernels run on CPU tensors only under the interpreter, on before the first kernel is imported.
    _dispatch.use_interpreter_without_cuda(device)
    _quiet()
    from fusedloss.testing import check_close_to_float64

    small = device.type == "cpu"
    print(f"fusedloss verify on {device} (torch {torch.__version__}"
          + (f", {torch.cuda.get_device_name(device)}" if device.type == "cuda" else "")
          + (", small shapes" if small else "") + ")")
    header = (f"{'family':<22} {'options':<44} {'shape':<18} {'path':<7} {'dtype':<9} {'fwd err':>9} "
              f"{'grad err':>9} {'result':<6} {'ms':>8}")
    print(header)
    print("-" * len(header))
    failures, checks, skipped = 0, 0, {}
    for name, fam, case in _cases(small):
        if args.family and name not in args.family and fam.name not in args.family:
            continue
        why_not = None
        if fam.kernel is not None:
            probe = torch.empty(1, device=device)
            why_not = _dispatch.why_not_kernel(fam.kernel, [probe])
            if why_not is not None:
                skipped.setdefault(why_not, []).append(name)
        for dtype in case.dtypes:
            inputs = case.make(dtype, device)
            upstream = float(torch.empty(()).uniform_(0.5, 2.0))
            ref64_loss, ref64_grads = _run(case, _to64(inputs), "torch", upstream)
            ref_loss, ref_grads = _run(case, inputs, "torch", upstream)
            paths = [("torch", ref_loss, ref_grads, None)]
            if fam.kernel is not None and why_not is None:
                start = time.perf_counter()
                try:
                    k_loss, k_grads = _run(case, inputs, "triton", upstream)
                    if device.type == "cuda":
                        torch.cuda.synchronize(device)
                    paths.append(("triton", k_loss, k_grads, time.perf_counter() - start))
                except Exception as exc:  # report, count, keep going
                    failures += 1
                    print(_row(name, case, "triton", dtype, None, None, "FAIL", f"{type(exc).__name__}: {exc}"))
            for path, loss, grads, elapsed in paths:
                own = None if path == "torch" else ref_loss
                ok, f_err, _, _ = check_close_to_float64(loss, own, ref64_loss, dtype)
                g_err = 0.0
                for g, rg, r in zip(grads, ref_grads, ref64_grads):
                    g_ok, e, _, _ = check_close_to_float64(g, None if path == "torch" else rg, r, dtype)
                    ok, g_err = ok and g_ok, max(g_err, e)
                checks += 1
                failures += not ok
                print(_row(name, case, path, dtype, f_err, g_err, "pass" if ok else "FAIL",
                           f"{elapsed * 1e3:8.1f}" if elapsed is not None else ""))
    if failures:
        summary = f"{failures} check(s) FAILED"
    elif checks == 0:
        summary = "no check ran"
    else:
        summary = f"all {checks} checks passed"
    for reason, rows in skipped.items():
        summary += f"\nnot checked: the triton path of {', '.join(dict.fromkeys(rows))} ({reason})"
    print(f"\n{summary}")
    return 1 if failures or checks == 0 else 0


def main(argv: list[str] | None = None) -> int:
    """``python -m fusedloss verify [--device cuda|cpu] [--family NAME ...]``."""
    parser = argparse.ArgumentParser(prog="python -m fusedloss", description="fusedloss command line.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.add_parser("verify", help="check every loss against float64 on random inputs", add_help=False)
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] != "verify":
        parser.parse_args(argv)  # --help exits 0 with the usage; anything else: the usage and exit 2
        parser.print_usage(sys.stderr)
        return 2
    return verify(argv[1:])
