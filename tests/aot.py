"""Ahead-of-time compilation of Triton kernels for real GPUs, with no GPU present.

``compile_for_gpus(kernel, signature, constexprs)`` compiles for sm_80 and sm_90 and returns the
compiled kernels (``.asm["ptx"]``, ``.asm["cubin"]``), so a test can catch GPU-only compile errors
(the interpreter accepts things the compiler rejects) and look at the generated code.
The interpreter flag must be off while compiling: it replaces @triton.jit functions.
"""
from __future__ import annotations

import pytest

CAPABILITIES = (80, 90)


def compile_for_gpus(kernel, signature: dict, constexprs: dict, capabilities=CAPABILITIES):
    triton = pytest.importorskip("triton")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = getattr(kernel, "fn", kernel)  # under TRITON_INTERPRET, kernels are InterpretedFunction
    from triton.runtime.jit import JITFunction
    if not isinstance(fn, JITFunction):
        fn = JITFunction(fn)
    sig = dict(signature)
    for name in constexprs:
        sig[name] = "constexpr"
    out = []
    for cap in capabilities:
        compiled = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=constexprs),
                                  target=GPUTarget("cuda", cap, 32))
        assert compiled.asm["cubin"], f"no cubin for sm_{cap}"
        out.append(compiled)
    return out
