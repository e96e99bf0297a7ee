"""Shared benchmark plumbing: device, byte models, copy bandwidth, peak memory, launch counts.

Every benchmark times forward plus backward (the headline) with a device synchronize inside the
timed function, and records in ``extra_info``: the byte model and its bytes, effective GB/s, the
percentage of the copy bandwidth measured in the same session, peak extra memory and launches
per call (CUDA only). On CPU the suite is a smoke test at tiny shapes (``--benchmark-disable``).
"""

from __future__ import annotations

import functools

import pytest
import torch

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"


def sync():
    if CUDA:
        torch.cuda.synchronize()


@functools.lru_cache(maxsize=None)
def copy_bandwidth_gbs() -> float | None:
    """Device-to-device copy bandwidth (read + write) of a 1 GiB buffer, larger than any L2."""
    if not CUDA:
        return None
    src = torch.empty(1 << 28, dtype=torch.float32, device="cuda")
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(20):
        dst.copy_(src)
    end.record()
    torch.cuda.synchronize()
    seconds = start.elapsed_time(end) / 1e3 / 20
    return 2 * src.numel() * 4 / seconds / 1e9


def _cpu_peak_bytes(fn) -> int | None:
    """Peak of torch's CPU allocations during ``fn``, at operator granularity: the running sum of
    each operator's self allocations minus frees, in start order. Memory held outside torch (KeOps'
    own buffers) is not seen."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e.time_range.start, e.self_cpu_memory_usage) for e in prof.events())
    running = peak = 0
    for _, delta in events:
        running += delta
        peak = max(peak, running)
    return peak


def peak_extra_memory(fn) -> int | None:
    """Bytes allocated above the starting point during one call of ``fn``: the CUDA allocator's
    peak on a GPU, torch's CPU allocations (profiler memory events) on CPU."""
    if not CUDA:
        return _cpu_peak_bytes(fn)
    sync()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    sync()
    return torch.cuda.max_memory_allocated() - base


def launches_per_call(fn) -> int | None:
    if not CUDA:
        return None
    from torch.profiler import ProfilerActivity, profile

    fn()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        sync()
    return sum(1 for e in prof.events() if e.device_type.name == "CUDA")


@functools.lru_cache(maxsize=None)
def versions() -> dict:
    import platform

    out = {"device": torch.cuda.get_device_name() if CUDA else f"cpu ({platform.processor() or platform.machine()})",
           "torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version()}
    for name in ("triton", "geomloss", "pykeops", "liger_kernel", "ot"):
        try:
            mod = __import__(name)
            out[name] = getattr(mod, "__version__", "?")
        except Exception:  # optional peers
            out[name] = None
    if CUDA:
        try:
            import subprocess

            out["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                           capture_output=True, text=True, timeout=10).stdout.strip() or None
        except Exception:
            out["driver"] = None
    return out


def run_benchmark(benchmark, fn, *, byte_model: str = "", nbytes: int | None = None, **info):
    """Time ``fn`` (which must synchronize) and attach the derived figures to ``extra_info``."""
    fn()  # warm-up: compilation and autotuning stay out of the timing
    benchmark.extra_info.update(info)
    benchmark.extra_info.update(versions())
    if byte_model:
        benchmark.extra_info["byte_model"] = byte_model
        benchmark.extra_info["bytes"] = nbytes
    benchmark.extra_info["peak_extra_memory_bytes"] = peak_extra_memory(fn)
    benchmark.extra_info["launches_per_call"] = launches_per_call(fn)
    benchmark(fn)
    stats = getattr(benchmark, "stats", None)
    if stats is not None and nbytes:
        seconds = stats.stats.median
        gbs = nbytes / seconds / 1e9
        benchmark.extra_info["gbs"] = gbs
        copy = copy_bandwidth_gbs()
        if copy:
            benchmark.extra_info["copy_gbs"] = copy
            benchmark.extra_info["pct_of_copy"] = 100.0 * gbs / copy


def timed_step(provider: str, step_fn):
    """What a benchmark times for ``provider``: ``step_fn()`` (a training step: forward and the
    gradient) and a sync; for ``fused-cudagraph``, one replay of ``step_fn`` captured in a CUDA
    graph after a warm-up on a side stream (the way a trainer captures its step). CUDA graphs need
    a GPU: elsewhere that provider is skipped."""
    if provider != "fused-cudagraph":
        def timed():
            step_fn()
            sync()

        return timed
    if not CUDA:
        pytest.skip("CUDA graphs need a GPU")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step_fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step_fn()

    def replay():
        graph.replay()
        sync()

    return replay


def compiled(fn):
    return torch.compile(fn, fullgraph=True, dynamic=False)


def need_triton():
    pytest.importorskip("triton")


# Providers of the RL-shape headline: the fused step as a trainer would run it where host time decides.
HEADLINE_PROVIDERS = ["fused-cudagraph", "fused-compile"]


def provider_loss(provider: str, public):
    """The loss call a provider times. ``public(backend)`` returns the public entry of the family
    on that backend (with sync-free lazy metrics), so every provider does the same work, input
    checks and metrics included: ``fused*`` on ``"triton"`` (``fused-compile`` under
    ``torch.compile(fullgraph=True, dynamic=False)``, the kernels as custom ops), ``eager`` on
    ``"torch"``, ``compile`` the ``"torch"`` entry under the same ``torch.compile``."""
    if provider == "fused-compile":
        need_triton()
        return compiled(public("triton"))
    if provider.startswith("fused"):
        need_triton()
        return public("triton")
    if provider == "eager":
        return public("torch")
    if provider == "compile":
        return compiled(public("torch"))
    raise ValueError(f"unknown provider {provider!r}")
