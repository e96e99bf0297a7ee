"""Sinkhorn optimal-transport imitation loss between predicted and target (action, state) clouds.

A point is ``z = concat(flatten(action), sqrt(lam_state) · flatten(state))``. The ground cost is
``‖z − z'‖`` for ``p = 1`` (``ε = blur``) and the full square ``‖z − z'‖² = ‖a − a'‖² +
lam_state·‖s − s'‖²`` for ``p = 2`` (``ε = blur²``). geomloss's own ``p = 2`` cost is half the
square, so the features are scaled by ``√2`` for ``p = 2`` and geomloss keeps its default cost,
which every backend (``tensorized``, ``online``, ``multiscale``) and batched problems support.
The user's ``p`` is always passed through: it also sets ε, the reach and the ε-scaling schedule.

The value is geomloss's debiased Sinkhorn divergence ``S_ε(α, β) = OT_ε(α, β) − ½ OT_ε(α, α) −
½ OT_ε(β, β)`` (``debias=True``), or ``OT_ε(α, β)`` (``debias=False``).

The ``online`` backend (the default) runs on KeOps: linear memory, so clouds of 10^4 to 10^6 points
fit where the ``tensorized`` dense cost matrix cannot. KeOps compiles each formula with g++ (CPU)
or nvrtc (CUDA) on first use, about 6 to 15 s per formula on CPU, and caches the binaries in
``KEOPS_CACHE_FOLDER`` (default ``~/.cache/keops*``).

Distributed training. Under DDP each rank solves its own batch: the loss is the divergence between
that rank's predicted and target clouds, and DDP averages the gradients, which optimises the mean of
the per-rank divergences (not the divergence of the union). ``gather_distributed=True`` all-gathers
both clouds (and weights) with the differentiable ``torch.distributed.nn.functional.all_gather``
before solving, so every rank solves the one global problem; the gather's backward sums the ranks'
gradients, and DDP's averaging then yields exactly the gradient of the global divergence. Every
rank must hold the same number of points.

geomloss estimates the clouds' diameter with one host sync per call, so this loss is not sync-free.
Under ``torch.compile`` the call runs eagerly (``torch.compiler.disable``): the online backend
returns NaN when traced.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import numbers

import torch
from torch import nn

from .._families import Family, VerifyCase
from ._common import LossConfig, check_positive, compute_dtype, require_float, require_same_device

__all__ = ["SINKHORN_BACKENDS", "SinkhornOptions", "sinkhorn_loss", "KOTSinkhornLoss", "sinkhorn_points"]

SINKHORN_BACKENDS = ("tensorized", "online", "multiscale")


@dataclasses.dataclass
class SinkhornOptions(LossConfig):
    """The options of :func:`sinkhorn_loss`, :class:`KOTSinkhornLoss` and the ``sinkhorn_knopp``
    registry entry, defined once and checked on construction.

    ``p`` (1 or 2) sets the cost and ``ε = blur^p``; ``lam_state`` weighs the state features;
    ``debias`` picks the Sinkhorn divergence over plain entropic OT; ``backend`` is geomloss's
    (``"tensorized"``, ``"online"``, ``"multiscale"``); ``scaling`` in (0, 1) is the ε-scaling
    ratio; ``reach`` (None or > 0) makes the problem unbalanced; ``batched`` adds a leading problem
    dimension, reduced by ``reduction``; ``gather_distributed`` solves the union of all ranks' clouds.
    """

    p: int = 2
    """1 (cost ``‖z - z'‖``, ``ε = blur``) or 2 (squared cost, ``ε = blur²``)."""
    lam_state: float = 1.0
    """Weight of the state features in the cost (>= 0)."""
    blur: float = 0.05
    """The entropic blur (> 0): ``ε = blur^p``."""
    debias: bool = True
    """The debiased Sinkhorn divergence (True) or plain entropic OT (False)."""
    backend: str = "online"
    """geomloss's backend: ``"tensorized"``, ``"online"`` (KeOps, linear memory) or ``"multiscale"``."""
    scaling: float = 0.5
    """The ε-scaling ratio, in the open interval ``(0, 1)``."""
    reach: float | None = None
    """None (balanced OT) or the reach ``> 0`` of unbalanced OT."""
    batched: bool = False
    """The clouds carry a leading problem dimension ``[B, N, ...]``."""
    reduction: str = "mean"
    """``"mean"``, ``"sum"`` or ``"none"`` over the batched problems."""
    gather_distributed: bool = False
    """All-gather both clouds across ranks (differentiably) and solve their union."""

    def check_values(self) -> None:
        if self.p not in (1, 2) or isinstance(self.p, bool):
            raise ValueError(f"p must be 1 or 2, got {self.p!r}.")
        if not (isinstance(self.lam_state, numbers.Real) and math.isfinite(self.lam_state) and self.lam_state >= 0):
            raise ValueError(f"lam_state must be a finite number >= 0, got {self.lam_state!r}.")
        check_positive(self.blur, "blur")
        if not (isinstance(self.scaling, numbers.Real) and 0.0 < self.scaling < 1.0):
            raise ValueError(f"scaling must be a number in the open interval (0, 1), got {self.scaling!r}.")
        if self.backend not in SINKHORN_BACKENDS:
            raise ValueError(f"backend must be one of {SINKHORN_BACKENDS}, got {self.backend!r}.")
        if self.reach is not None:
            check_positive(self.reach, "reach")
        if self.reduction not in ("mean", "sum", "none"):
            raise ValueError(f"reduction must be one of ('mean', 'sum', 'none'), got {self.reduction!r}.")

    def build(self) -> KOTSinkhornLoss:
        """The :class:`KOTSinkhornLoss` of these options (the ``sinkhorn_knopp`` registry entry)."""
        return KOTSinkhornLoss(**dataclasses.asdict(self))


def sinkhorn_points(action: torch.Tensor, state: torch.Tensor, lam_state: float, p: int, batched: bool = False,
                    dtype: torch.dtype | None = None):
    """The points ``[N, F]`` (``[B, N, F]`` when ``batched``) that geomloss sees, in ``dtype``
    (default: fp64 if either input is fp64, else fp32).

    For ``p = 2`` they carry the extra ``√2`` that turns geomloss's ``½‖x−y‖²`` into ``‖z−z'‖²``.
    """
    lead = 2 if batched else 1
    cd = compute_dtype(action, state) if dtype is None else dtype
    a = action.to(cd).flatten(lead) if action.dim() > lead else action.to(cd).unsqueeze(-1)
    s = state.to(cd).flatten(lead) if state.dim() > lead else state.to(cd).unsqueeze(-1)
    z = torch.cat((a, math.sqrt(lam_state) * s), dim=-1)
    return z * math.sqrt(2.0) if p == 2 else z


_KEOPS_PROBLEMS: dict[str, str | None] = {}


def _keops_problem(device_type: str) -> str | None:
    """Why KeOps cannot run on ``device_type``, or None once a tiny formula compiled and ran
    (found once per device type)."""
    if device_type not in _KEOPS_PROBLEMS:
        _KEOPS_PROBLEMS[device_type] = _find_keops_problem(device_type)
    return _KEOPS_PROBLEMS[device_type]


def _find_keops_problem(device_type: str) -> str | None:
    if importlib.util.find_spec("pykeops") is None:
        return "pykeops is not installed (pip install 'fusedloss[sinkhorn]')"
    try:
        from pykeops.torch import LazyTensor

        x = torch.arange(6.0, device=device_type).reshape(3, 2)
        xi, xj = LazyTensor(x[:, None, :]), LazyTensor(x[None, :, :])
        out = ((xi - xj) ** 2).sum(-1).sum(dim=1)
        if not torch.allclose(out.reshape(-1).cpu(), torch.tensor([40.0, 16.0, 40.0])):
            return "a KeOps test reduction returned a wrong value"
    except Exception as exc:  # KeOps raises many kinds; all mean the same here
        compiler = "g++" if device_type == "cpu" else "nvrtc"
        return f"KeOps could not compile or run a formula with {compiler} ({type(exc).__name__}: {exc})"
    return None


def _validate_cloud(action, state, name_a, name_s, batched):
    require_float(action, name_a)
    require_float(state, name_s)
    lead = 2 if batched else 1
    form = "[B, N, ...]" if batched else "[N, ...]"
    if action.dim() < lead or state.dim() < lead:
        raise ValueError(f"{name_a} and {name_s} must have shape {form}, got {tuple(action.shape)} and {tuple(state.shape)}.")
    if tuple(action.shape[:lead]) != tuple(state.shape[:lead]):
        raise ValueError(
            f"{name_a} and {name_s} must have the same leading {form[:-6]}] dimensions, got "
            f"{tuple(action.shape)} and {tuple(state.shape)}."
        )
    if action.shape[lead - 1] == 0 or (batched and action.shape[0] == 0):
        raise ValueError(f"{name_a} is empty: got shape {tuple(action.shape)}.")


def _validate_weights(w, shape, name):
    if w is None:
        return None
    require_float(w, name)
    if tuple(w.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)} (one weight per point), got {tuple(w.shape)}.")
    if not bool(torch.isfinite(w).all() and (w >= 0).all() and (w.sum(-1) > 0).all()):
        raise ValueError(f"{name} must be finite and >= 0, with a positive sum per problem.")
    return w / w.sum(dim=-1, keepdim=True)


_EAGER_SOLVE = None


def _gather(t: torch.Tensor | None, dim: int) -> torch.Tensor | None:
    if t is None:
        return None
    from torch.distributed.nn.functional import all_gather

    return torch.cat(all_gather(t.contiguous()), dim=dim)


def _check_gather_shapes(x: torch.Tensor, name: str) -> None:
    import torch.distributed as dist

    shape = torch.tensor(x.shape, dtype=torch.int64)
    shapes = [torch.empty_like(shape) for _ in range(dist.get_world_size())]
    dist.all_gather(shapes, shape)
    if any(not torch.equal(s, shape) for s in shapes):
        raise ValueError(f"gather_distributed=True needs {name} of one shape on every rank, got {[tuple(s.tolist()) for s in shapes]}.")


def _solve_outside_graph(*args):
    """``_solve`` under ``torch.compiler.disable``: traced, the online backend returns NaN. The
    wrapper is made on first use, because importing torch._dynamo at ``import fusedloss`` would
    import triton.language before a user can switch on TRITON_INTERPRET."""
    global _EAGER_SOLVE
    if _EAGER_SOLVE is None:
        _EAGER_SOLVE = torch.compiler.disable(_solve)
    return _EAGER_SOLVE(*args)


def _require_geomloss():
    """geomloss's ``SamplesLoss``, or an ``ImportError`` that names the extra to install."""
    try:
        from geomloss import SamplesLoss
    except ImportError as exc:
        raise ImportError("sinkhorn_loss needs geomloss (and pykeops for backend='online'), which are optional: "
                          "pip install 'fusedloss[sinkhorn]'.") from exc
    return SamplesLoss


def _solve(x, y, a, b, p, blur, reach, debias, scaling, backend):
    SamplesLoss = _require_geomloss()

    batched = x.dim() == 3
    # geomloss takes log(diameter) for its ε schedule: a cloud of identical points (diameter 0)
    # would give -inf there, so the start scale is kept at least at blur.
    flat_x, flat_y = x.detach().reshape(-1, x.shape[-1]), y.detach().reshape(-1, y.shape[-1])
    both = torch.cat((flat_x, flat_y))
    diameter = max(float((both.amax(0) - both.amin(0)).norm()), blur * (math.sqrt(2.0) if p == 2 else 1.0))
    cluster_scale = None
    if backend == "multiscale":
        # pykeops's grid_cluster handles D <= 3 only; voxel labels work in any dimension.
        D = x.shape[-1]
        cluster_scale = diameter / (math.sqrt(D) * 2000 ** (1 / D))
    solver = SamplesLoss(
        "sinkhorn", p=p, blur=blur, reach=reach, diameter=diameter, scaling=scaling, debias=debias,
        backend=backend, cluster_scale=cluster_scale,
    )
    if backend != "multiscale":
        return solver(_weights(a, x), x, _weights(b, y), y)
    xs, ys = (x, y) if batched else (x[None], y[None])
    values = [
        solver(_voxel_labels(xi, cluster_scale), _weights(None if a is None else a[i] if batched else a, xi), xi,
               _voxel_labels(yi, cluster_scale), _weights(None if b is None else b[i] if batched else b, yi), yi)
        for i, (xi, yi) in enumerate(zip(xs, ys))
    ]
    return torch.stack(values) if batched else values[0]


def _weights(w, x):
    if w is None:
        n = x.shape[-2]
        return torch.full(x.shape[:-1], 1.0 / n, dtype=x.dtype, device=x.device)
    return w.to(x.dtype)


def _voxel_labels(x, scale):
    vox = torch.floor(x.detach() / scale).to(torch.int64)
    return torch.unique(vox, dim=0, return_inverse=True)[1].to(torch.int32)


def _clouds(pred_action, target_action, state_pred, state_target, opts: SinkhornOptions):
    """Validate both clouds and return their points ``x``, ``y`` as geomloss sees them, both in one
    dtype: fp64 when any input is fp64, else fp32 (mixed clouds are promoted, never mixed)."""
    _validate_cloud(pred_action, state_pred, "pred_action", "state_pred", opts.batched)
    _validate_cloud(target_action, state_target, "target_action", "state_target", opts.batched)
    clouds = {"pred_action": pred_action, "target_action": target_action, "state_pred": state_pred,
              "state_target": state_target}
    require_same_device(clouds)
    if pred_action.device.type == "meta":
        raise ValueError("sinkhorn_loss needs tensors with data: geomloss reads the clouds' diameter on the host, "
                         "so meta tensors cannot be solved.")
    cd = compute_dtype(*clouds.values())
    x = sinkhorn_points(pred_action, state_pred, opts.lam_state, opts.p, opts.batched, cd)
    y = sinkhorn_points(target_action, state_target, opts.lam_state, opts.p, opts.batched, cd)
    if x.shape[-1] != y.shape[-1]:
        raise ValueError(
            f"predicted points have {x.shape[-1]} features (action + state) but target points have "
            f"{y.shape[-1]}: pred_action/state_pred and target_action/state_target must match per point."
        )
    if opts.batched and x.shape[0] != y.shape[0]:
        raise ValueError(f"batched clouds must share B: got {x.shape[0]} predicted and {y.shape[0]} target problems.")
    return x, y


def _gather_problem(x, y, a, b, batched: bool):
    """Every rank's clouds and weights, concatenated along the point dimension (differentiably)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("gather_distributed=True needs an initialized torch.distributed process group.")
    if dist.get_world_size() == 1:
        return x, y, a, b
    point_dim = 1 if batched else 0
    _check_gather_shapes(x, "the predicted clouds")
    _check_gather_shapes(y, "the target clouds")
    x, y = _gather(x, point_dim), _gather(y, point_dim)
    # Per-rank normalised weights: the union weighs each rank's cloud equally.
    a, b = _gather(a, point_dim), _gather(b, point_dim)
    a = None if a is None else a / a.sum(dim=-1, keepdim=True)
    b = None if b is None else b / b.sum(dim=-1, keepdim=True)
    return x, y, a, b


def sinkhorn_loss(
    pred_action: torch.Tensor,
    target_action: torch.Tensor,
    state_pred: torch.Tensor,
    state_target: torch.Tensor,
    *,
    weights_pred: torch.Tensor | None = None,
    weights_target: torch.Tensor | None = None,
    **options,
) -> torch.Tensor:
    """Sinkhorn divergence between the predicted and target (action, state) clouds.

    Unbatched: ``pred_action`` ``[N, ...]``, ``state_pred`` ``[N, ...]``, ``target_action`` and
    ``state_target`` ``[M, ...]``; returns a 0-dim fp32 tensor. ``batched=True``: a leading problem
    dimension ``B`` on all four (``[B, N, ...]``); ``reduction`` ``"mean"``, ``"sum"`` or ``"none"``
    (``[B]``). Optional ``weights_pred`` ``[(B,) N]`` and ``weights_target`` ``[(B,) M]`` are normalized
    per problem. ``options`` are the fields of :class:`SinkhornOptions` (``p=2, lam_state=1.0,
    blur=0.05, debias=True, backend="online", scaling=0.5, reach=None, batched=False,
    reduction="mean", gather_distributed=False``). bf16/fp16 inputs are solved in fp32 (KeOps takes
    float and double only) and their gradients come back in the input dtype.
    """
    opts = SinkhornOptions(**options)
    _require_geomloss()
    x, y = _clouds(pred_action, target_action, state_pred, state_target, opts)
    lead = 2 if opts.batched else 1
    a = _validate_weights(weights_pred, pred_action.shape[:lead], "weights_pred")
    b = _validate_weights(weights_target, target_action.shape[:lead], "weights_target")
    if opts.gather_distributed:
        x, y, a, b = _gather_problem(x, y, a, b, opts.batched)
    if opts.backend == "online":
        problem = _keops_problem(x.device.type)
        if problem is not None:
            raise RuntimeError(
                f"sinkhorn backend='online' needs KeOps: {problem}. Fall back to backend='tensorized' "
                "(dense cost matrix, quadratic memory), or fix the KeOps install."
            )
    value = _solve_outside_graph(x, y, a, b, opts.p, float(opts.blur), None if opts.reach is None else float(opts.reach),
                                 opts.debias, opts.scaling, opts.backend)
    if not opts.batched or opts.reduction == "none":
        return value
    return value.mean() if opts.reduction == "mean" else value.sum()


class KOTSinkhornLoss(nn.Module):
    """``nn.Module`` form of :func:`sinkhorn_loss`, built from the :class:`SinkhornOptions` fields
    (positionally in their order, or by name); ``forward(pred_action, target_action, state_pred,
    state_target, weights_pred=None, weights_target=None)``."""

    def __init__(self, *args, **kwargs):
        super().__init__()
        self.options = dataclasses.asdict(SinkhornOptions(*args, **kwargs))

    def forward(self, pred_action, target_action, state_pred, state_target, weights_pred=None, weights_target=None):
        return sinkhorn_loss(pred_action, target_action, state_pred, state_target,
                             weights_pred=weights_pred, weights_target=weights_target, **self.options)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.options.items())


def _verify_cases(small: bool) -> list[VerifyCase]:
    from .. import testing as T

    n_pts = 60 if small else 2000
    cases = []
    for sk_backend in ("tensorized", "online"):
        def make(dtype, device):
            return T.make_sinkhorn_inputs(n_pts, n_pts + 7, 2, 3, dtype, device, seed=6)

        def call(args, backend, _b=sk_backend):
            return sinkhorn_loss(*args, p=2, lam_state=0.5, blur=0.5, scaling=0.9, backend=_b)

        cases.append(VerifyCase(f"{sk_backend},p=2", f"N={n_pts} M={n_pts + 7}", make, call, dtypes=(torch.float32,)))
    return cases


FAMILY = Family(
    name="sinkhorn",
    section="Sinkhorn",
    exports=("sinkhorn_loss", "KOTSinkhornLoss"),
    factories={"sinkhorn_knopp": SinkhornOptions},
    verify_cases=_verify_cases,
    extra="sinkhorn",
)
