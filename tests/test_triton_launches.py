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
    assert any(r["kernel"] == "_fwd_kernel" and r["constexprs"].get("n") == 1 for r in launches)
    assert any(r["kernel"] == "_stats_kernel" and r["constexprs"].get("S_1") == 1 for r in launches)

