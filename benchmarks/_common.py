"""Shared by the benchmark modules (benchmarks/bench_*.py): time one call with pytest-benchmark and
record what the report needs (bytes moved, so GB/s; the device copy of the same bytes, so the
fraction of copy bandwidth).

Every timed case calls ``measure(benchmark, fn, ...)``. A module adds, for each shape it times, a
``copy`` case (``impl="copy"``) through ``copy_fn`` moving the same number of bytes, so that the
report can put each implementation next to a device-to-device copy measured in the same run.
"""
from __future__ import annotations

import os

import torch

QUICK = os.environ.get("FUSEDTECH_BENCH_QUICK", "0") == "1"


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _sync(dev: torch.device):
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def measure(benchmark, fn, *, dev: torch.device, op: str, impl: str, case: str, dtype, bytes_moved: int,
            calls: int | None = None, rounds: int | None = None, **extra):
    """Times fn. A round runs `calls` back-to-back calls then synchronizes, so on a GPU the launch
    queue stays full and the sync is amortised; the report divides by `calls`."""
    if calls is None:
        # CPU: five calls a round up to 64 MB moved (one call a round, in quick mode three rounds,
        # left a median of three single calls, which this shared VM's 2x tails moved by 2.4x).
        calls = 20 if dev.type == "cuda" else (1 if bytes_moved > (1 << 26) else 5)
    if rounds is None:
        rounds = 3 if QUICK else (30 if dev.type == "cuda" else 7)

    def round_():
        for _ in range(calls):
            fn()
        _sync(dev)

    for _ in range(2):  # warm-up: compilation, autotuning, allocator
        round_()
    benchmark.extra_info.update(
        op=op, impl=impl, case=case, dtype=str(dtype).replace("torch.", ""),
        bytes=None if bytes_moved is None else int(bytes_moved),
        calls_per_round=calls, device=torch.cuda.get_device_name() if dev.type == "cuda" else "cpu", **extra)
    benchmark.pedantic(round_, rounds=rounds, iterations=1, warmup_rounds=0)
    if dev.type == "cuda":
        benchmark.extra_info["gpu_busy_s"] = gpu_busy_seconds(round_) / calls


def gpu_busy_seconds(round_) -> float:
    """Seconds the GPU spent in kernels and copies during one round (torch.profiler's device time).
    Next to the wall time it tells a kernel that is slow from a call whose host side (Python,
    launches) outlasts the kernel: then wall time > busy time and the GPU idles between calls."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        round_()
    gpu_events = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    return sum(e.time_range.elapsed_us() for e in gpu_events) / 1e6


def copy_fn(nbytes: int, dev: torch.device):
    """A device copy that reads nbytes/2 and writes nbytes/2: the yardstick for nbytes moved."""
    n = max(1, nbytes // 2 // 4)
    src = torch.randn(n, device=dev)
    dst = torch.empty_like(src)
    return lambda: dst.copy_(src)
