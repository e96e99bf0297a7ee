"""Sinkhorn imitation loss, forward + backward: geomloss tensorized vs online (KeOps) vs POT's
log-domain ``ot.sinkhorn2`` where its dense cost matrix fits. Time and peak memory; online is
linear in memory, tensorized and POT quadratic.

POT is a timing peer only: its ``sinkhorn2`` returns the transport cost ``<π, C>`` of a fixed-ε
problem with a fixed iteration budget, not geomloss's annealed, debiased divergence.
"""

import os

import pytest
import torch

import fusedloss as fl
from _common import CUDA, DEVICE, run_benchmark, sync
from fusedloss.testing import make_sinkhorn_inputs

# FUSEDLOSS_BENCH_SINKHORN_SIZES="1000,5000" overrides the sizes (for example for CPU figures).
_env = os.environ.get("FUSEDLOSS_BENCH_SINKHORN_SIZES")
SIZES = [int(v) for v in _env.split(",")] if _env else ([1000, 5000, 20000, 100000] if CUDA else [50])
DENSE_LIMIT = 20000 if CUDA else 5000  # beyond this a dense N x M float32 matrix is too large to try
POT_LIMIT = 20000 if CUDA else 1000  # POT's log-domain loop takes over 2 minutes a call at N = 5000 on 2 CPU cores
PROVIDERS = ["online", "tensorized", "pot"]
OPTS = dict(p=2, lam_state=0.5, blur=0.05, scaling=0.5)


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("n", SIZES, ids=lambda n: f"N{n}")
def bench_sinkhorn_fwd_bwd(benchmark, n, provider):
    if provider != "online" and n > (POT_LIMIT if provider == "pot" else DENSE_LIMIT):
        pytest.skip(f"{provider} needs a dense {n}x{n} cost matrix; too large or too slow here")
    pa, ta, ps, ts = make_sinkhorn_inputs(n, n, 4, 12, torch.float32, DEVICE, seed=0)
    if provider == "pot":
        ot = pytest.importorskip("ot", reason="POT is not installed")

        def loss_fn():
            x = torch.cat((pa, 0.5**0.5 * ps), 1)
            y = torch.cat((ta, 0.5**0.5 * ts), 1)
            w = torch.full((n,), 1.0 / n, device=DEVICE)
            return ot.sinkhorn2(w, w, torch.cdist(x, y) ** 2, reg=OPTS["blur"] ** 2 * 10, method="sinkhorn_log",
                                numItermax=100)
    else:
        loss_fn = lambda: fl.sinkhorn_loss(pa, ta, ps, ts, backend=provider, **OPTS)

    def timed():
        pa.grad = None
        loss_fn().backward()
        sync()

    benchmark.group = f"sinkhorn N=M={n} D=16"
    run_benchmark(benchmark, timed, family="sinkhorn", provider=provider, shape=f"N=M={n} D=16", dtype="float32")
