"""No hidden work on the kernel paths, counted on CPU under a dispatch mode (the interpreter runs the
kernels): the backward of a fused loss runs its one backward op and no zero-fill. Autograd would
otherwise hand each op's backward a zero tensor for every output that gets no gradient (the stored
``[N, A]`` or ``[B, S, A]`` gradient, the metrics, ``|td|``)."""

import collections

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import fusedloss as fl
from fusedloss.testing import ZERO_FILL_OPS as FILLS
from fusedloss.testing import make_dqn_inputs, make_sp_inputs, make_topk_inputs, make_vec_dqn_inputs

pytest.importorskip("triton")


class _Ops(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


def _backward_ops(loss):
    with _Ops() as mode:
        loss.backward()
    return mode.ops


def _dqn(device):
    step, out = make_dqn_inputs(3, 7, 5, seed=0, device=device)
    return fl.dqn_loss(step, out, fl.DqnLossConfig(backend="triton", metrics_mode="lazy", return_td_error=True))[0]


def _vec_dqn(device):
    step, online, target = make_vec_dqn_inputs(2, 5, 4, 6, device=device, seed=0)
    return fl.vec_dqn_loss(step, online.requires_grad_(True), target,
                           fl.VecDqnLossConfig(backend="triton", metrics_mode="lazy"))[0]


def _sp(device):
    q, z = make_sp_inputs(6, 10, device=device, seed=0)
    return fl.sp_kl_loss(q, z.requires_grad_(True), 1.3, backend="triton", check_inputs=False)


def _sp_topk(device):
    idx, lp, z = make_topk_inputs(5, 12, 3, device=device, seed=0)
    return fl.sp_topk_loss(idx, lp, z, backend="triton", check_inputs=False)


@pytest.mark.parametrize("make, module, launcher", [(_dqn, "dqn", "dqn_bwd"), (_vec_dqn, "vec_dqn", "vec_dqn_bwd"),
                                                   (_sp, "sp", "sp_bwd"), (_sp_topk, "sp", "sp_bwd")],
                         ids=["dqn", "vec_dqn", "sp", "sp_topk"])
def test_backward_runs_one_op_and_no_zero_fill(make, module, launcher, device, monkeypatch):
    """Backward calls its one backward launcher (eagerly directly, under torch.compile through the
    custom op) and fills nothing with zeros."""
    import importlib

    kernels = importlib.import_module(f"fusedloss.kernels.{module}")
    calls = []
    real = getattr(kernels, launcher)
    monkeypatch.setattr(kernels, launcher, lambda *a, **k: calls.append(1) or real(*a, **k))
    loss = make(device)
    assert not calls
    ops = _backward_ops(loss)
    assert len(calls) == 1, dict(ops)
    assert not FILLS & set(ops), dict(ops)
