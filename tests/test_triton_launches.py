"""Every Triton kernel, launched through the public API as a GPU would launch it, compiled for sm_90.

Triton's JIT specialises a launch's arguments before compiling: an integer equal to 1 becomes a
constexpr (a Python int), 16-byte-aligned pointers and sizes get divisibility hints. The interpreter
does neither, so a kernel can pass every interpreter test and fail to compile on its first GPU
launch (fast_divmod called .to() on its shift argument, which is 1 for every divisor >= 2: every
Triton BatchNorm and DropBlock launch failed so, unseen, until this test). benchmarks/kernel_resources.py
runs the launchers on CPU tensors with Triton's launch replaced by a recorder that specialises and
compiles each launch exactly as the JIT would; these tests read what it recorded.
"""
from __future__ import annotations

import importlib
import json
import os
import pkgutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

pytest.importorskip("triton")


def _cuobjdump_found() -> bool:
    from benchmarks.kernel_resources import _cuobjdump
    return os.path.exists(_cuobjdump())


pytestmark = pytest.mark.skipif(not _cuobjdump_found(), reason="this Triton ships no cuobjdump to read cubins with")


def _record(shapes: str, out) -> list[dict]:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT] + [p for p in sys.path if p]))
    env.pop("TRITON_INTERPRET", None)  # the kernels must be Triton's JITFunctions, not interpreted stand-ins
    proc = subprocess.run([sys.executable, "-m", "benchmarks.kernel_resources", "--out", str(out), "--shapes", shapes],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, f"recording the {shapes} launches failed:\n{proc.stderr[-6000:]}"
    with open(os.path.join(out, "kernel_resources.json")) as f:
        return json.load(f)["launches"]


def _launched_kernels() -> set[tuple[str, str]]:
    """(module, name) of every Triton kernel of fusedtech.triton_kernels: the @triton.jit functions
    named *_kernel (the others are helpers the kernels call)."""
    import fusedtech.triton_kernels as package
    kernels = set()
    for info in pkgutil.iter_modules(package.__path__):
        module = importlib.import_module(f"{package.__name__}.{info.name}")
        for name, value in vars(module).items():
            fn = getattr(value, "fn", None)
            if name.endswith("_kernel") and callable(fn) and fn.__module__ == module.__name__:
                kernels.add((module.__name__, name))
    return kernels


def test_every_kernel_compiles_for_sm90_as_the_jit_specialises_it(tmp_path):
    launches = _record("edge", tmp_path)
    recorded = {(r["module"], r["kernel"]) for r in launches}
    kernels = _launched_kernels()
    assert len(kernels) >= 20
    assert kernels <= recorded, f"never launched by the edge cases: {sorted(kernels - recorded)}"
    assert all(r["regs"] > 0 and r["programs_per_sm"] >= 1 for r in launches)
    # What the test is for: size-1 arguments reached the compiler as constexprs.
    assert any(r["kernel"] == "_fwd_rows_kernel" and r["constexprs"].get("n") == 1 for r in launches)
    assert any(r["kernel"] == "_stats_kernel" and r["constexprs"].get("S_1") == 1 for r in launches)


def test_row_kernels_keep_their_rows_in_registers_at_the_benchmark_shapes(tmp_path):
    """A row held in local memory costs kilobytes per thread (4,336 B in the dropout+add+LayerNorm
    kernel at hidden 16,384 before its warps grew with the row; 192 B in the LayerNorm backward's
    coefficient kernel): the bound is far below that and above the few values ptxas parks in local
    memory in kernels that otherwise stay in registers (up to 32 B per thread at these shapes)."""
    launches = _record("bench", tmp_path)
    assert {r["kernel"] for r in launches} >= {"_fwd_kernel", "_bwd_kernel", "_bwd_coeffs_kernel",
                                               "_dropout_add_norm_kernel", "_stats_kernel", "_bwd_apply_rows_kernel"}
    spilling = [(r["case"], r["kernel"], r["num_warps"], r["local_bytes"]) for r in launches if r["local_bytes"] > 64]
    assert not spilling, spilling
    # Launchable at all: within CUDA's grid limits, and at least one program fits an SM (registers,
    # threads and shared memory).
    from benchmarks.kernel_resources import GRID_LIMITS
    assert all(g <= limit for r in launches for g, limit in zip(r["grid"], GRID_LIMITS))
    assert all(r["programs_per_sm"] >= 1 for r in launches)
    # The LayerNorm backward's row prefetch (ROW_STAGES=2) stages the next row's x and dy in shared
    # memory: the rows, not only the per-row statistics, are what it prefetches.
    staged = [r for r in launches if r["kernel"] == "_bwd_kernel" and r["constexprs"]["ROW_STAGES"] == 2
              and r["constexprs"]["ONE_BLOCK"]]
    assert staged
    for r in staged:
        row_bytes = r["constexprs"]["BLOCK"] * (2 if "bfloat16" in r["case"] else 4)
        assert r["shared_bytes"] >= 2 * row_bytes, (r["case"], r["shared_bytes"])


def test_kernels_compile_past_2_pow_32_elements(tmp_path):
    """Tensors of 2^32 + 4 elements (allocated, never touched: nothing runs) take the 64-bit index
    paths: dropout, BatchNorm (WIDE) and LayerNorm forward and backward compile for sm_90 as launched."""
    launches = _record("huge", tmp_path)
    kernels = {r["kernel"] for r in launches}
    assert {"_dropout_kernel", "_apply_kernel", "_bwd_apply_kernel", "_bwd_reduce_kernel", "_fwd_kernel",
            "_bwd_kernel"} <= kernels
    assert any(r["constexprs"].get("WIDE") is True for r in launches)
    assert all(r["regs"] > 0 for r in launches)


_HOST_TIME_CHECK = r"""
import json, fusedtech
from benchmarks import host_time, kernel_resources
rows = host_time.measure(repeats=1, calls=2)
recorded = {}
with kernel_resources.recording() as rec, fusedtech.use_backend("triton"):
    for name, (ours, _) in host_time.cases().items():
        before = len(rec.launches)
        ours()
        recorded[name] = len(rec.launches) - before
print(json.dumps({"rows": rows, "recorded": recorded}))
"""


def test_host_time_goes_the_whole_launch_path():
    """benchmarks/host_time.py times calls through Triton's real launch path with a stub driver: each
    op's launches reach the stub's launcher exactly as often as the recorder (which compiles each
    launch as the JIT would) sees them, so the timing leaves out nothing but the C launch."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT] + [p for p in sys.path if p]))
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run([sys.executable, "-c", _HOST_TIME_CHECK], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-6000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    rows, recorded = result["rows"], result["recorded"]
    assert {r["op"] for r in rows} == set(recorded) and len(rows) >= 8
    for r in rows:
        assert r["triton_launches"] == recorded[r["op"]] >= 1, r
        assert r["fusedtech_us"] > 0 and r["torch_cpu_us"] > 0, r
