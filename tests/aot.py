"""Ahead-of-time compilation of Triton kernels for real GPUs, with no GPU present.

``compile_for_gpus(kernel, signature, constexprs)`` compiles a module-level @triton.jit kernel for
sm_80 and sm_90 and returns one result per target with ``.asm["ptx"]`` and ``.asm["cubin"]``, so a
test catches GPU-only compile errors (the interpreter accepts things the compiler rejects) and can
look at the generated code.

The compile runs in a subprocess without TRITON_INTERPRET: under the interpreter (which the test
session switches on before Triton is imported) every @triton.jit function, helpers called by a
kernel included, is replaced by an interpreted stand-in that the compiler cannot take.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest

CAPABILITIES = (80, 90)

_CHILD = r"""
import importlib, json, sys
import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
req = json.loads(sys.stdin.read())
kernel = getattr(importlib.import_module(req["module"]), req["name"])
consts = {k: (getattr(tl, v[3:]) if isinstance(v, str) and v.startswith("tl:") else v) for k, v in req["constexprs"].items()}
sig = dict(req["signature"], **{k: "constexpr" for k in consts})
out = {}
for cap in req["capabilities"]:
    c = triton.compile(ASTSource(fn=kernel, signature=sig, constexprs=consts), target=GPUTarget("cuda", cap, 32))
    out[str(cap)] = {"ptx": c.asm["ptx"], "cubin": c.asm["cubin"].hex()}
print(json.dumps(out))
"""


_DTYPE_NAMES = {"fp16": "float16", "fp32": "float32", "fp64": "float64", "bf16": "bfloat16"}


def _encode(value):
    """constexprs cross the process boundary as JSON; Triton dtypes travel by name."""
    import triton.language as tl
    if isinstance(value, tl.dtype):
        return "tl:" + _DTYPE_NAMES.get(value.name, value.name)
    return value


def compile_for_gpus(kernel, signature: dict, constexprs: dict, capabilities=CAPABILITIES):
    pytest.importorskip("triton")
    fn = kernel
    while hasattr(fn, "fn"):  # JITFunction / InterpretedFunction wrap the Python function
        fn = fn.fn
    module, name = fn.__module__, fn.__name__
    req = {"module": module, "name": name, "signature": signature,
           "constexprs": {k: _encode(v) for k, v in constexprs.items()}, "capabilities": list(capabilities)}
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run([sys.executable, "-c", _CHILD], input=json.dumps(req), capture_output=True, text=True,
                          env=env, timeout=600)
    assert proc.returncode == 0, f"compiling {module}.{name} failed:\n{proc.stderr[-4000:]}"
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    results = []
    for cap in capabilities:
        r = out[str(cap)]
        assert r["cubin"], f"no cubin for sm_{cap}"
        results.append(SimpleNamespace(capability=cap, asm={"ptx": r["ptx"], "cubin": bytes.fromhex(r["cubin"])}))
    return results
