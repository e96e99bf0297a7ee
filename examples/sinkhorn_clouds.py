"""Point-cloud matching with the Sinkhorn divergence: a gradient flow of one cloud onto another.

The source cloud starts as a Gaussian blob, the target is a noisy ring; each step moves every source
point along ``-N·∇ sinkhorn_loss`` (the divergence's gradient per point, rescaled), on geomloss's
online backend (KeOps: linear memory, the cost matrix never stored). KeOps compiles its formulas on
first use (10-15 s on a CPU, cached after that).

    python examples/sinkhorn_clouds.py [--points 500] [--steps 40] [--device cpu] [--plot sinkhorn_clouds.png]

It prints the divergence as it drops and saves a before/after plot.

Measured with the defaults (500 points a cloud, 40 steps, blur 0.05) on the 2-core CPU machine,
torch 2.13.0+cpu, geomloss 0.3.1, pykeops 2.3, 2026-12-02: the divergence fell from 1.748 to
1e-5 in 21 s (after KeOps' first compile, about 40 s more on a fresh cache); by step 10 the source
already lies on the ring.
"""

from __future__ import annotations

import argparse
import math
import time

import torch

import fusedloss as fl


def clouds(n: int, seed: int, device):
    g = torch.Generator().manual_seed(seed)
    source = torch.randn(n, 2, generator=g) * 0.3 + torch.tensor([-1.0, 0.5])
    angle = torch.rand(n, generator=g) * 2 * math.pi
    radius = 1.0 + 0.05 * torch.randn(n, generator=g)
    target = torch.stack([radius * angle.cos(), radius * angle.sin()], dim=1)
    return source.to(device), target.to(device)


def flow(points: int = 500, steps: int = 40, lr: float = 0.5, blur: float = 0.05, device: str = "cpu", seed: int = 0,
         backend: str = "online", plot: str | None = None, quiet: bool = False) -> dict:
    say = (lambda *a: None) if quiet else print
    x, y = clouds(points, seed, device)
    start = x.clone()
    none_x = torch.zeros(points, 0, device=device)  # no state features: the clouds are the actions
    none_y = torch.zeros(y.shape[0], 0, device=device)
    costs, t0 = [], time.time()
    for step in range(steps + 1):
        x.requires_grad_(True)
        loss = fl.sinkhorn_loss(x, y, none_x, none_y, p=2, blur=blur, backend=backend, scaling=0.7)
        (g,) = torch.autograd.grad(loss, x)
        costs.append(loss.item())
        if step % 10 == 0 or step == steps:
            say(f"step {step:3d}: Sinkhorn divergence {costs[-1]:.5f}")
        if step == steps:
            break
        with torch.no_grad():
            x = x - lr * points * g  # the divergence's gradient is O(1/N) per point
    result = {"costs": costs, "seconds": time.time() - t0, "start": start.cpu(), "end": x.detach().cpu(),
              "target": y.cpu()}
    if plot:
        _plot(result, plot)
        say(f"plot: {plot}")
    return result


def _plot(r, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(8, 4), sharex=True, sharey=True)
    for ax, pts, title in ((axes[0], r["start"], "before"), (axes[1], r["end"], f"after {len(r['costs']) - 1} steps")):
        ax.scatter(r["target"][:, 0], r["target"][:, 1], s=4, c="tab:orange", label="target")
        ax.scatter(pts[:, 0], pts[:, 1], s=4, c="tab:blue", label="source")
        ax.set_title(title)
        ax.set_aspect("equal")
    axes[0].legend(loc="lower left", fontsize=8)
    fig.suptitle("Sinkhorn gradient flow (fusedloss.sinkhorn_loss, online backend)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--points", type=int, default=500, help="points in each cloud")
    ap.add_argument("--steps", type=int, default=40, help="gradient-flow steps")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default, one per core; "
                    "KeOps runs its own)")
    ap.add_argument("--plot", default="sinkhorn_clouds.png", help="where the before/after plot goes")
    args = ap.parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    r = flow(args.points, args.steps, device=args.device, plot=args.plot)
    print(f"divergence {r['costs'][0]:.4f} -> {r['costs'][-1]:.5f} in {r['seconds']:.0f} s on {args.device}")
    return r


if __name__ == "__main__":
    main()
