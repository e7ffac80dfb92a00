"""Host time per call of fusedtech's Triton path, measured without a GPU:

    python -m benchmarks.host_time --out DIR

writes DIR/host_time.json and DIR/host_time.md.

Why: on the H100 the wall time of a norm or dropout call was bound by the host (0.1-0.2 ms of
Python and Triton launch against 0.03-0.09 ms for torch's C++ path) and no GPU is lent to most
sessions. What the host does per call does not need one.

How: Triton's CUDA driver is replaced by a stub (`stub_gpu()`) that reports device 0, stream 0 and
an sm_90 target, loads nothing and launches nothing. Every call then goes the whole way a GPU call
goes on the host: our Python, torch's autograd and allocations (on CPU tensors), Triton's binder,
cache lookup and launch metadata, up to the C launcher, which is the only step left out (a few
microseconds of cuLaunchKernel on a GPU). The kernels are compiled for sm_90 on first use. Each op
is timed twice: as is, and with Triton's JITFunction.run replaced by a no-op; the difference is
Triton's share. torch's own op on the same small CPU tensors is timed beside it as a reference for
dispatch cost (it includes a little CPU compute; its CUDA path has no compute on the host but a
launch per kernel). Tiny tensors, so that the CPU-side work of torch's ops stays negligible.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
import types

import torch

REPEATS, CALLS = 5, 200


class StubDriver:
    """Just enough of Triton's CUDA driver for JITFunction.run to go its whole way on CPU tensors
    (private Triton API, checked against Triton 3.6 and 3.8). Counts the launches it swallows."""

    def __init__(self, capability: int = 90):
        from triton.backends.compiler import GPUTarget
        from benchmarks.kernel_resources import SM_LIMITS
        self.target = GPUTarget("cuda", capability, 32)
        self.launches = 0
        self.utils = types.SimpleNamespace(
            load_binary=lambda name, kernel, shared, device: (0, 0, 32, 0, 1024),
            get_device_properties=lambda device: {"max_shared_mem": SM_LIMITS[capability]["smem"],
                                                  "multiprocessor_count": SM_LIMITS[capability]["sms"]})

    def launcher_cls(self, src, metadata):
        def launch(*args):
            self.launches += 1
        return launch

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return self.target

    def get_active_torch_device(self):
        return torch.device("cpu")


@contextlib.contextmanager
def stub_gpu(capability: int = 90):
    """Within: Triton launches on CPU tensors compile for sm_`capability` and are counted, not run
    (the backend set-up is kernel_resources.triton_on_cpu_tensors)."""
    from triton.runtime.driver import driver
    from benchmarks.kernel_resources import triton_on_cpu_tensors
    with triton_on_cpu_tensors(capability, tool="host_time"):
        stub = StubDriver(capability)
        saved = driver._active  # None until first used (reading driver.active would create one and fail)
        driver.set_active(stub)
        try:
            yield stub
        finally:
            driver.set_active(saved)


@contextlib.contextmanager
def triton_run_skipped():
    """JITFunction.run as a no-op: what is left of a call is ours and torch's."""
    from triton.runtime.jit import JITFunction
    saved = JITFunction.run
    JITFunction.run = lambda self, *args, grid, warmup, **kwargs: None
    try:
        yield
    finally:
        JITFunction.run = saved


def _leaf(*shape, dtype=torch.float32, memory_format=torch.contiguous_format):
    return torch.randn(shape, dtype=dtype).contiguous(memory_format=memory_format).requires_grad_()


def cases():
    """name -> (fusedtech call, torch's call): each a zero-argument step (forward and backward, or
    an optimizer step) on small tensors."""
    import fusedtech.optim
    from fusedtech.nn import functional as F
    tnf = torch.nn.functional
    x2, w, b = _leaf(8, 64), _leaf(64), _leaf(64)
    g2 = torch.ones(8, 64)
    x4 = _leaf(4, 8, 4, 4, memory_format=torch.channels_last)
    c8, c8b = _leaf(8), _leaf(8)
    g4 = torch.ones(4, 8, 4, 4)
    rm, rv = torch.zeros(8), torch.ones(8)
    params = [torch.zeros(s) for s in ((64, 64), (64,), (10, 64), (10,))]
    for p in params:
        p.grad = torch.ones_like(p)
    ours = {"Adam": fusedtech.optim.Adam(params, lr=1e-3), "SGD": fusedtech.optim.SGD(params, lr=0.1, momentum=0.9)}
    theirs = {"Adam": torch.optim.Adam(params, lr=1e-3, fused=False, foreach=True),
              "SGD": torch.optim.SGD(params, lr=0.1, momentum=0.9, foreach=True)}
    return {
        "layer_norm fwd+bwd": (lambda: F.layer_norm(x2, (64,), w, b).backward(g2),
                               lambda: tnf.layer_norm(x2, (64,), w, b).backward(g2)),
        "rms_norm fwd+bwd": (lambda: F.rms_norm(x2, (64,), w).backward(g2),
                             lambda: tnf.rms_norm(x2, (64,), w).backward(g2)),
        "batch_norm fwd+bwd (NHWC)": (lambda: F.batch_norm(x4, rm, rv, c8, c8b, True).backward(g4),
                                      lambda: tnf.batch_norm(x4, rm, rv, c8, c8b, True).backward(g4)),
        "batch_norm+gelu fwd+bwd (NHWC; torch: BN then GELU)": (
            lambda: F.batch_norm_act(x4, rm, rv, c8, c8b, True, activation="gelu").backward(g4),
            lambda: tnf.gelu(tnf.batch_norm(x4, rm, rv, c8, c8b, True)).backward(g4)),
        "dropout fwd+bwd": (lambda: F.dropout(x2, 0.1).backward(g2), lambda: tnf.dropout(x2, 0.1).backward(g2)),
        "dropout+add+layer_norm fwd+bwd (torch: composed)": (
            lambda: F.dropout_add_layer_norm(x2, x2, w, b, 0.1).backward(g2),
            lambda: tnf.layer_norm(tnf.dropout(x2, 0.1) + x2, (64,), w, b).backward(g2)),
        "Adam step, 4 tensors (torch: foreach)": (ours["Adam"].step, theirs["Adam"].step),
        "SGD momentum step, 4 tensors (torch: foreach)": (ours["SGD"].step, theirs["SGD"].step),
    }


def best_us(fn, repeats: int = REPEATS, calls: int = CALLS) -> float:
    """Best of `repeats` means over `calls` back-to-back calls, in microseconds."""
    for _ in range(3):
        fn()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, (time.perf_counter() - t0) / calls * 1e6)
    return best


def measure(names=None, repeats: int = REPEATS, calls: int = CALLS) -> list[dict]:
    import fusedtech
    import triton
    rows = []
    with stub_gpu() as stub, fusedtech.use_backend("triton"):
        table = cases()
        for name, (ours, theirs) in table.items():
            if names is not None and name not in names:
                continue
            ours()  # compiles for sm_90
            stub.launches = 0
            ours()
            launches = stub.launches
            total = best_us(ours, repeats, calls)
            with triton_run_skipped():
                without = best_us(ours, repeats, calls)
            rows.append(dict(op=name, fusedtech_us=round(total, 1), triton_launches=launches,
                             triton_launch_path_us=round(total - without, 1), ours_and_torch_us=round(without, 1),
                             torch_cpu_us=round(best_us(theirs, repeats, calls), 1), triton=triton.__version__))
    return rows


def markdown(rows: list[dict]) -> str:
    lines = ["| op (small tensors) | fusedtech triton, launch stubbed (us) | Triton launches | of which Triton's "
             "launch path (us) | torch on CPU tensors (us) |", "|---|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['op']} | {r['fusedtech_us']:.1f} | {r['triton_launches']} | "
                     f"{r['triton_launch_path_us']:.1f} | {r['torch_cpu_us']:.1f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="bench_out")
    ap.add_argument("--quick", action="store_true", help="fewer repeats (a smoke run)")
    args = ap.parse_args(argv)
    rows = measure(repeats=2, calls=20) if args.quick else measure()
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "host_time.json"), "w") as f:
        json.dump({"torch": torch.__version__, "python": sys.version.split()[0], "rows": rows}, f, indent=1)
    md = markdown(rows)
    with open(os.path.join(args.out, "host_time.md"), "w") as f:
        f.write(md + "\n")
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
