"""``python -m fusedloss verify``: run every loss on random inputs and check it against float64.

For each family it runs the reference and, where one exists, the fused kernel (on CUDA when a GPU
is present; on CPU under the Triton interpreter at small shapes), in fp32 and bf16, and compares the
loss and the gradient with a float64 evaluation of the same inputs. It prints one table row per run
and exits 1 on any failure.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from collections.abc import Callable

import torch


@dataclasses.dataclass
class Case:
    family: str
    options: str
    shape: str
    make: Callable  # (dtype, device) -> tuple of args
    call: Callable  # (args, backend) -> loss tensor
    dtypes: tuple = (torch.float32, torch.bfloat16)
    kernel_family: str | None = None


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


def _run(case: Case, args, backend: str, upstream: float):
    loss = case.call(args, backend)
    leaves = _leaves(args)
    grads = torch.autograd.grad(loss * upstream, leaves) if leaves else ()
    return loss.detach(), [g.detach() for g in grads]


def _cases(small: bool) -> list[Case]:
    import fusedloss as fl
    from fusedloss import testing as T

    B, S, A = (4, 9, 19) if small else (64, 64, 18)
    N, V = (12, 300) if small else (4096, 1000)
    D = 6 if small else 16
    cases: list[Case] = []

    for opts in ({}, {"cql_weight": 0.3}, {"normalize_reward_mean": True, "normalize_reward_std": True,
                                           "reward_scale": 0.5, "reward_shift": 0.1},
                 {"double_dqn": True, "td_loss": "huber", "weight_key": "weight", "mask_key": "mask"},
                 {"n_step": 5, "double_dqn": True, "value_rescaling": True, "mask_key": "mask"},
                 {"td_lambda": 0.95, "double_dqn": True, "value_rescaling": True, "cql_weight": 0.1}):
        def make(dtype, device, _opts=opts):
            return T.make_dqn_inputs(B, S, A, dtype, device, seed=1, weight=True, mask=True)

        def call(args, backend, _opts=opts):
            return fl.dqn_loss(args[0], args[1], fl.DqnLossConfig(backend=backend, **_opts))[0]

        cases.append(Case("dqn", ",".join(f"{k}={v}" for k, v in opts.items()) or "default",
                          f"B={B} S={S} A={A}", make, call, kernel_family="dqn"))

    def make_vec(dtype, device):
        return T.make_vec_dqn_inputs(B, S, A, D, dtype, device, seed=2, argmax_margin=1e-3)

    def call_vec(args, backend):
        return fl.vec_dqn_loss(args[0], args[1], args[2], fl.VecDqnLossConfig(backend=backend))[0]

    cases.append(Case("vec_dqn", "default", f"B={B} S={S} A={A} D={D}", make_vec, call_vec, kernel_family="vec_dqn"))

    for loss_type in ("ce", "ce-soft-fwd", "ce-soft-bwd", "kl-fwd", "kl-bwd", "js"):
        def make_sp(dtype, device):
            q, logits = T.make_sp_inputs(N, V, dtype, device, seed=3, pad_frac=0.1)
            return ({"q_star": q}, logits)

        def call_sp(args, backend, _lt=loss_type):
            cfg = fl.SpLossConfig(loss_type=_lt, temperature=1.7, label_smoothing=0.1, backend=backend)
            return fl.sp_loss(args[0], args[1], cfg)[0]

        cases.append(Case("sp", f"{loss_type},T=1.7,ls=0.1,pad", f"N={N} A={V}", make_sp, call_sp, kernel_family="sp"))

    def call_js_beta(args, backend):
        return fl.sp_js_loss(args[0]["q_star"], args[1], 1.3, 0.0, beta=0.2, backend=backend)

    cases.append(Case("sp", "js,beta=0.2,T=1.3,pad", f"N={N} A={V}", make_sp, call_js_beta, kernel_family="sp"))

    k = 16 if small else 64

    def make_topk(dtype, device):
        return T.make_topk_inputs(N, V, k, dtype, device, seed=7, unused=0.3)

    for lt in ("kl-fwd", "ce-soft-fwd"):
        def call_topk(args, backend, _lt=lt):
            return fl.sp_topk_loss(args[0], args[1], args[2], _lt, 1.4, backend=backend)

        cases.append(Case("sp_topk", f"{lt},k={k},T=1.4", f"N={N} V={V}", make_topk, call_topk, kernel_family="sp"))

    H = 8 if small else 64

    def make_linear(dtype, device):
        hidden, weight, _, teacher, _ = T.make_sp_linear_inputs(N, H, V, "dense", dtype, device, seed=9, pad=0.1)
        return teacher, hidden, weight

    def call_linear(args, backend):
        return fl.sp_linear_loss(args[1], args[2], args[0], "js", 1.2, 0.05, 0.3, chunk_size=max(1, N // 5),
                                 backend=backend)

    cases.append(Case("sp_linear", "js,beta=0.3,T=1.2,ls=0.05,pad", f"N={N} H={H} V={V}", make_linear, call_linear,
                      kernel_family="sp"))

    for lt in ("mse", "mae"):
        def make_sv(dtype, device):
            q, logits = T.make_sp_inputs(N, A, dtype, device, seed=4, pad_frac=0.2)
            return ({"q_star": q}, logits)

        def call_sv(args, backend, _lt=lt):
            return fl.sv_loss(args[0], args[1], fl.SvLossConfig(loss_type=_lt, backend=backend))[0]

        cases.append(Case("sv", lt, f"N={N} A={A}", make_sv, call_sv))

    def make_router(dtype, device):
        return (T.make_router_logits(B * S, 8, dtype, device, seed=5),)

    cases.append(Case("router_z", "default", f"T={B * S} E=8", make_router,
                      lambda args, backend: fl.router_z_loss(args[0])))
    cases.append(Case("switch_load_balancing", "top_k=2", f"T={B * S} E=8", make_router,
                      lambda args, backend: fl.switch_load_balancing_loss(args[0], top_k=2)))

    n_pts = 60 if small else 2000
    for sk_backend in ("tensorized", "online"):
        def make_sk(dtype, device):
            return T.make_sinkhorn_inputs(n_pts, n_pts + 7, 2, 3, dtype, device, seed=6)

        def call_sk(args, backend, _b=sk_backend):
            return fl.sinkhorn_loss(*args, p=2, lam_state=0.5, blur=0.5, scaling=0.9, backend=_b)

        cases.append(Case("sinkhorn", f"{sk_backend},p=2", f"N={n_pts} M={n_pts + 7}", make_sk, call_sk,
                          dtypes=(torch.float32,)))
    return cases


def verify(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fusedloss verify", description=__doc__.splitlines()[0])
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when present)")
    parser.add_argument("--family", action="append", help="only these families (repeatable)")
    args = parser.parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    from fusedloss import _dispatch

    # Kernels run on CPU tensors only under the interpreter, on before the first kernel is imported.
    _dispatch.use_interpreter_without_cuda(device)
    from fusedloss.testing import max_abs_error, tolerance

    small = device.type == "cpu"
    print(f"fusedloss verify on {device} (torch {torch.__version__}"
          + (f", {torch.cuda.get_device_name(device)}" if device.type == "cuda" else "")
          + (", Triton interpreter, small shapes" if small else "") + ")")
    header = f"{'family':<22} {'options':<44} {'shape':<18} {'path':<7} {'dtype':<9} {'fwd err':>9} {'grad err':>9} {'result':<6} {'ms':>8}"
    print(header)
    print("-" * len(header))
    failures = 0
    for case in _cases(small):
        if args.family and case.family not in args.family:
            continue
        kernel = case.kernel_family in _dispatch.KERNEL_FAMILIES and _dispatch.triton_available()
        for dtype in case.dtypes:
            inputs = case.make(dtype, device)
            inputs64 = _to64(inputs)
            upstream = float(torch.empty(()).uniform_(0.5, 2.0))
            ref64_loss, ref64_grads = _run(case, inputs64, "torch", upstream)
            ref_loss, ref_grads = _run(case, inputs, "torch", upstream)
            paths = [("torch", ref_loss, ref_grads, 0.0)]
            if kernel:
                start = time.perf_counter()
                try:
                    k_loss, k_grads = _run(case, inputs, "triton", upstream)
                    if device.type == "cuda":
                        torch.cuda.synchronize(device)
                    paths.append(("triton", k_loss, k_grads, time.perf_counter() - start))
                except Exception as exc:  # report, count, keep going
                    failures += 1
                    print(f"{case.family:<22} {case.options[:44]:<44} {case.shape:<18} {'triton':<7} "
                          f"{str(dtype)[6:]:<9} {'-':>9} {'-':>9} {'FAIL':<6} {type(exc).__name__}: {exc}")
            for path, loss, grads, elapsed in paths:
                f_err = max_abs_error(loss, ref64_loss)
                g_err = max((max_abs_error(g, r) for g, r in zip(grads, ref64_grads)), default=0.0)
                if path == "torch":
                    ok = f_err <= tolerance(0.0, ref64_loss, dtype) and all(
                        max_abs_error(g, r) <= tolerance(0.0, r, dtype) for g, r in zip(grads, ref64_grads))
                else:
                    ok = f_err <= tolerance(max_abs_error(ref_loss, ref64_loss), ref64_loss, dtype) and all(
                        max_abs_error(g, r) <= tolerance(max_abs_error(rg, r), r, dtype)
                        for g, rg, r in zip(grads, ref_grads, ref64_grads))
                failures += not ok
                ms = f"{elapsed * 1e3:8.1f}" if path != "torch" else f"{'':>8}"
                print(f"{case.family:<22} {case.options[:44]:<44} {case.shape:<18} {path:<7} {str(dtype)[6:]:<9} "
                      f"{f_err:9.2e} {g_err:9.2e} {'pass' if ok else 'FAIL':<6} {ms}")
    print(f"\n{'all checks passed' if failures == 0 else f'{failures} check(s) FAILED'}")
    return 1 if failures else 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in ("verify",):
        print("usage: python -m fusedloss verify [--device cuda|cpu] [--family NAME ...]", file=sys.stderr)
        return 2
    return verify(argv[1:])
