"""What each Triton kernel asks of a GPU's SM at the launch configurations of the benchmark's GPU
shapes: registers per thread, local memory (register spills), shared memory, the programs that fit on
one SM at once and the waves the grid takes. Compiled for sm_90 (or sm_80) with no GPU present:

    python -m benchmarks.kernel_resources --out DIR [--capability 90]

writes DIR/kernel_resources.json and DIR/kernel_resources.md.

How: the launchers of fusedtech.triton_kernels run on CPU tensors of the GPU shapes with Triton's
launch replaced by a recorder (`recording()`): each launch is specialised by Triton's own binder
exactly as its JIT would specialise it on a GPU (argument types, 16-byte alignment of pointers and
sizes, constexprs, num_warps, num_stages), compiled for the target, and the cubin's usage read with
the cuobjdump that Triton ships. Nothing runs on the tensors (their contents are never read), so a
64 MB case records in milliseconds. Occupancy is the fewest programs allowed by registers (allocated
per warp in units of 256), threads, shared memory (1 KB reserved per program) and the block limit.

Why: a GPU was lent to few sessions, and bandwidth-bound kernels are usually limited by what they
keep in flight per SM: these numbers say where, before a GPU measures how much.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import re
import subprocess
import sys
import tempfile

import torch

# sm_80 (A100) and sm_90 (H100/H200) per-SM limits: registers, threads, resident blocks, shared memory
# usable by blocks (bytes), SMs of the flagship part.
SM_LIMITS = {80: dict(regs=65536, threads=2048, blocks=32, smem=164 * 1024, sms=108),
             90: dict(regs=65536, threads=2048, blocks=32, smem=228 * 1024, sms=132)}


@dataclasses.dataclass
class Launch:
    module: str
    kernel: str
    case: str
    constexprs: dict
    num_warps: int
    num_stages: int
    programs: int
    grid: tuple = (1, 1, 1)
    regs: int = 0
    local_bytes: int = 0  # per thread: register spills (and stack)
    shared_bytes: int = 0
    programs_per_sm: int = 0
    waves: float = 0.0


def _grid(grid, bound_args) -> tuple[int, int, int]:
    if callable(grid):
        grid = grid(bound_args)
    grid = tuple(int(g) for g in grid)
    return grid + (1,) * (3 - len(grid))


# CUDA's grid limits: x up to 2^31 - 1, y and z up to 65,535 (a larger grid fails at launch).
GRID_LIMITS = (2 ** 31 - 1, 65535, 65535)


def programs_per_sm(regs: int, num_warps: int, shared: int, capability: int) -> int:
    """Programs of this size one SM holds at once (the fewest that registers, threads, shared memory
    and the block limit allow)."""
    lim = SM_LIMITS[capability]
    regs_per_warp = math.ceil(max(regs, 1) * 32 / 256) * 256
    by_regs = (lim["regs"] // regs_per_warp) // num_warps
    by_threads = lim["threads"] // (32 * num_warps)
    by_smem = lim["smem"] // (shared + 1024)
    return min(by_regs, by_threads, by_smem, lim["blocks"])


def _cuobjdump() -> str:
    import triton
    from triton import knobs
    with contextlib.suppress(Exception):
        path = knobs.nvidia.cuobjdump.path
        if path and os.path.exists(path):
            return path
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


def cubin_usage(cubin: bytes) -> dict:
    """REG, STACK, SHARED and LOCAL of the cubin's one kernel (cuobjdump -res-usage)."""
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(cubin)
    try:
        out = subprocess.run([_cuobjdump(), "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
    finally:
        os.unlink(f.name)
    return {k: int(v) for k, v in re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", out)}


class Recorder:
    """Stands in for JITFunction.run: specialises and compiles each distinct launch for `capability`
    (cached), records it under the current case and launches nothing. It calls what JITFunction.run
    calls (the binder from create_function_from_signature, _pack_args): private Triton API, checked
    against Triton 3.6 and 3.8; a Triton that changes them fails here loudly, not silently."""

    def __init__(self, capability: int = 90):
        from triton.backends.compiler import GPUTarget
        from triton.compiler import make_backend
        self.capability = capability
        self.target = GPUTarget("cuda", capability, 32)
        self.backend = make_backend(self.target)
        self.case = ""
        self.launches: list[Launch] = []
        self._compiled: dict = {}
        self._binders: dict = {}

    def run(self, fn, args, kwargs, grid):
        import triton
        from triton.compiler import ASTSource
        from triton.runtime.jit import create_function_from_signature
        if fn not in self._binders:
            self._binders[fn] = create_function_from_signature(fn.signature, fn.params, self.backend)
        bound, specialization, options = self._binders[fn](*args, **kwargs)
        options, signature, constexprs, attrs = fn._pack_args(self.backend, kwargs, bound, specialization, options)
        key = (fn, repr(signature), repr(sorted(constexprs.items(), key=str)), repr(sorted(attrs.items(), key=str)),
               repr(sorted(options.__dict__.items(), key=str)))
        if key not in self._compiled:
            compiled = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=self.target,
                                      options=options.__dict__)
            usage = cubin_usage(compiled.asm["cubin"])
            self._compiled[key] = (usage, compiled.metadata.shared)
        usage, shared = self._compiled[key]
        names = [p.name for p in fn.params]
        consts = {names[path[0]]: (str(v) if not isinstance(v, (int, float, bool, type(None))) else v)
                  for path, v in constexprs.items() if len(path) == 1}
        dims = _grid(grid, bound)
        launch = Launch(module=fn.fn.__module__, kernel=fn.__name__, case=self.case, constexprs=consts,
                        num_warps=options.num_warps, num_stages=options.num_stages, programs=math.prod(dims),
                        grid=dims, regs=usage.get("REG", 0), local_bytes=usage.get("LOCAL", 0) + usage.get("STACK", 0),
                        shared_bytes=shared)
        launch.programs_per_sm = programs_per_sm(launch.regs, launch.num_warps, shared, self.capability)
        sms = SM_LIMITS[self.capability]["sms"]
        launch.waves = round(launch.programs / max(launch.programs_per_sm * sms, 1), 2)
        self.launches.append(launch)


@contextlib.contextmanager
def triton_on_cpu_tensors(capability: int = 90, tool: str = "kernel_resources"):
    """Within: the Triton backend counts as available on CPU tensors (so the public API reaches the
    launchers), and the LayerNorm backward sizes its grid for sm_`capability`'s SM count instead of
    the interpreter's. What recording() here and benchmarks.host_time's stub_gpu() both need."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError(f"{tool} compiles Triton kernels: unset TRITON_INTERPRET")
    from fusedtech import _backend
    from fusedtech.triton_kernels import layer_norm
    saved = layer_norm.bwd_programs, _backend.why_unavailable

    def why_unavailable(backend, device_type):
        return None if (backend, device_type) == ("triton", "cpu") else saved[1](backend, device_type)

    layer_norm.bwd_programs = lambda device: 4 * SM_LIMITS[capability]["sms"]
    _backend.why_unavailable = why_unavailable
    try:
        yield
    finally:
        layer_norm.bwd_programs, _backend.why_unavailable = saved


@contextlib.contextmanager
def recording(capability: int = 90):
    """Within: every Triton launch is compiled for sm_`capability` and recorded, not run (on CPU
    tensors, as triton_on_cpu_tensors)."""
    from triton.runtime.jit import JITFunction
    with triton_on_cpu_tensors(capability):
        rec = Recorder(capability)
        saved = JITFunction.run

        def run(self, *args, grid, warmup, **kwargs):
            rec.run(self, args, kwargs, grid)

        JITFunction.run = run
        try:
            yield rec
        finally:
            JITFunction.run = saved


def _e(shape, dtype, memory_format=torch.contiguous_format):
    return torch.empty(shape, dtype=dtype).contiguous(memory_format=memory_format)


def record_norms(rec: Recorder, hidden, dtypes, rows_for):
    from fusedtech.triton_kernels import dropout as dk
    from fusedtech.triton_kernels import layer_norm as lk
    for dtype in dtypes:
        for n in hidden:
            rows = rows_for(n)
            x, w, b = _e((rows, n), dtype), _e(n, torch.float32), _e(n, torch.float32)
            mean, rstd = _e(rows, torch.float32), _e(rows, torch.float32)
            for rms in (False, True):
                rec.case = f"{'rms_norm' if rms else 'layer_norm'} {rows}x{n} {str(dtype)[6:]}"
                lk.layer_norm_fwd(x, w, None if rms else b, 1e-5, rms)
                lk.layer_norm_bwd(x, x, w, None if rms else b, mean, rstd, rms, False)
            rec.case = f"layer_norm memory_efficient bwd {rows}x{n} {str(dtype)[6:]}"
            lk.layer_norm_bwd(x, x, w, b, mean, rstd, False, True)
            # bench_nn's "-rowstages2" variant: the backward prefetching the next rows.
            saved, lk.BWD_ROW_STAGES = lk.BWD_ROW_STAGES, 2
            try:
                rec.case = f"layer_norm bwd rowstages2 {rows}x{n} {str(dtype)[6:]}"
                lk.layer_norm_bwd(x, x, w, b, mean, rstd, False, False)
            finally:
                lk.BWD_ROW_STAGES = saved
            rec.case = f"dropout_add_layer_norm fwd {rows}x{n} {str(dtype)[6:]}"
            dk.dropout_add_norm_fwd(x, x, w, b, 0.1, 1e-5, False, torch.zeros(1, dtype=torch.int64))


def record_dropout(rec: Recorder, numel: int, dtypes, drop_block_shapes):
    from fusedtech.triton_kernels import drop_block as bk
    from fusedtech.triton_kernels import dropout as dk
    seed = torch.zeros(1, dtype=torch.int64)
    for dtype in dtypes:
        rec.case = f"dropout {numel} {str(dtype)[6:]}"
        dk.dropout_apply(_e(numel, dtype), 0.1, seed)
        for shape in drop_block_shapes:
            x = _e(shape, dtype)
            rec.case = f"drop_block2d {'x'.join(map(str, shape))} {str(dtype)[6:]}"
            keep, scale = bk.drop_block_keep_scale(x, seed, 0.01, 7, 1e-6)
            bk.drop_block_apply(x, keep, scale)


def record_batch_norm(rec: Recorder, shapes, dtypes):
    from fusedtech.triton_kernels import batch_norm as nk
    for dtype in dtypes:
        for shape in shapes:
            c = shape[1]
            w, b, mean, invstd = (_e(c, torch.float32) for _ in range(4))
            for fmt, name in ((torch.contiguous_format, "NCHW"), (torch.channels_last, "NHWC")):
                x = _e(shape, dtype, fmt)
                bits = torch.empty((x.numel() + 7) // 8, dtype=torch.uint8)
                tag = f"{'x'.join(map(str, shape))} {name} {str(dtype)[6:]}"
                rec.case = f"batch_norm {tag}"
                nk.batch_norm_stats(x, 1e-5)
                nk.batch_norm_apply(x, mean, invstd, w, b)
                nk.batch_norm_bwd(x, x, w, mean, invstd, True)
                rec.case = f"batch_norm+relu {tag}"
                nk.batch_norm_act_apply(x, mean, invstd, w, b, None, 1)
                nk.batch_norm_act_bwd(x, x, w, b, mean, invstd, bits, False, 1, True)
                rec.case = f"batch_norm+residual+gelu {tag}"
                nk.batch_norm_act_apply(x, mean, invstd, w, b, x, 2)
                nk.batch_norm_act_bwd(x, x, w, b, mean, invstd, x, True, 2, True)


# (shape, groups, memory format): sizes of 1 (one group, one channel a group, one position), a group
# split over several programs (1x4x2048), partial tiles and SD-UNet-like groups of 40 channels.
GROUP_NORM_EDGE_CASES = (((2, 6, 5, 7), 3, torch.contiguous_format), ((3, 4), 2, torch.contiguous_format),
                         ((1, 1, 2), 1, torch.contiguous_format), ((2, 5, 1), 5, torch.contiguous_format),
                         ((1, 4, 2048), 1, torch.contiguous_format), ((2, 4, 3, 3), 2, torch.channels_last),
                         ((2, 8, 3, 3, 3), 8, torch.channels_last_3d), ((2, 8, 3, 3, 3), 8, torch.contiguous_format),
                         ((2, 1280, 8, 8), 32, torch.contiguous_format), ((2, 1280, 8, 8), 32, torch.channels_last),
                         ((1, 512, 4, 4), 1, torch.channels_last))


def record_group_norm(rec: Recorder, cases, dtypes, activations=(0, 1, 2, 3)):
    """GroupNorm forward and backward through fusedtech.triton_kernels.group_norm itself: each of
    `activations` with weight and bias, then no activation, weight or bias."""
    from fusedtech.triton_kernels import group_norm as gk
    for dtype in dtypes:
        for shape, groups, fmt in cases:
            x = torch.empty(shape, dtype=dtype, memory_format=fmt)
            c = shape[1]
            w, b = _e(c, torch.float32), _e(c, torch.float32)
            mean, rstd = _e((shape[0], groups), torch.float32), _e((shape[0], groups), torch.float32)
            tag = f"{'x'.join(map(str, shape))} G={groups} {str(fmt)[6:]} {str(dtype)[6:]}"
            for act in activations:
                rec.case = f"group_norm act={act} {tag}"
                gk.group_norm_fwd(x, w, b, groups, 1e-5, act)
                gk.group_norm_bwd(x, x, w, b, mean, rstd, groups, act)
            rec.case = f"group_norm no affine {tag}"
            gk.group_norm_fwd(x, None, None, groups, 1e-5, 0)
            gk.group_norm_bwd(x, x, None, None, mean, rstd, groups, 0)


def record_edge_shapes(rec: Recorder):
    """Every Triton kernel through the public API (forward and backward, optimizer steps) on small
    and odd shapes: sizes of 1, which Triton's JIT passes as constexprs rather than integers (a
    kernel that calls .to() on such an argument compiles in the interpreter and fails on a GPU),
    rows longer than one block, both memory formats, fp32 and bf16."""
    import fusedtech
    from fusedtech.nn import functional as F
    from fusedtech.nn.utils import clip_grad_norm_

    def leaf(*shape, dtype=torch.float32, memory_format=torch.contiguous_format):
        return torch.randn(shape, dtype=dtype).contiguous(memory_format=memory_format).requires_grad_()

    with fusedtech.use_backend("triton"):
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            name = str(dtype)[6:]
            for rows, n in ((1, 1), (3, 1), (1, 7), (5, 4096), (2, 9000)):
                x, r, w, b = leaf(rows, n, dtype=dtype), leaf(rows, n, dtype=dtype), leaf(n), leaf(n)
                rec.case = f"norms {rows}x{n} {name}"
                F.layer_norm(x, (n,), w, b).sum().backward()
                F.layer_norm(x, (n,), w, b, memory_efficient=True).sum().backward()
                F.rms_norm(x, (n,), w).sum().backward()
                F.layer_norm(x, (n,)).sum().backward()
                rec.case = f"dropout {rows}x{n} {name}"
                F.dropout(x, 0.1).sum().backward()
                out, s = F.dropout_add_layer_norm(x, r, w, b, p=0.1, return_residual=True)
                (out.sum() + s.sum()).backward()
                F.dropout_add_layer_norm(x, r, w, None, p=0.1, rms=True).sum().backward()
            for shape in ((2, 1, 1, 1), (2, 3, 1, 1), (1, 2, 5, 5), (3, 5, 4, 4), (2, 16, 8, 8)):
                for fmt in (torch.contiguous_format, torch.channels_last):
                    x, res = leaf(*shape, dtype=dtype, memory_format=fmt), leaf(*shape, dtype=dtype, memory_format=fmt)
                    c = shape[1]
                    w, b, rm, rv = leaf(c), leaf(c), torch.zeros(c), torch.ones(c)
                    rec.case = f"batch_norm {'x'.join(map(str, shape))} {fmt} {name}"
                    for training in (True, False):
                        F.batch_norm(x, rm, rv, w, b, training=training).sum().backward()
                        for act in ("relu", "gelu", "silu"):
                            F.batch_norm_act(x, rm, rv, w, b, training=training, activation=act).sum().backward()
                            F.batch_norm_act(x, rm, rv, w, b, training=training, activation=act,
                                             residual=res).sum().backward()
                    F.batch_norm(x, rm, rv, training=True).sum().backward()
                    rec.case = f"drop_block2d {'x'.join(map(str, shape))} {fmt} {name}"
                    F.drop_block2d(x, 0.2, 3 if min(shape[2:]) >= 3 else 1).sum().backward()
        # Every case in fp32; the half types and the activations on a few (each compile costs ~0.2 s).
        record_group_norm(rec, GROUP_NORM_EDGE_CASES, (torch.float32,), (0,))
        record_group_norm(rec, GROUP_NORM_EDGE_CASES[:2] + GROUP_NORM_EDGE_CASES[5:7], (torch.float16, torch.bfloat16),
                          (0,))
        record_group_norm(rec, GROUP_NORM_EDGE_CASES[:1] + GROUP_NORM_EDGE_CASES[5:6], (torch.float32, torch.bfloat16),
                          (1, 2, 3))
        for dtype in (torch.float32, torch.bfloat16):
            params = [torch.nn.Parameter(torch.randn(*s, dtype=dtype)) for s in ((1,), (3, 5), (17,), (64, 33))]
            for p in params:
                p.grad = torch.randn_like(p)
            rec.case = f"clip_grad_norm_ {str(dtype)[6:]}"
            clip_grad_norm_(params, 1.0)
            clip_grad_norm_(params, 1.0, norm_type=float("inf"))
            for make in (lambda ps: fusedtech.optim.Adam(ps, lr=1e-3),
                         lambda ps: fusedtech.optim.Adam(ps, lr=1e-3, amsgrad=True, weight_decay=0.1),
                         lambda ps: fusedtech.optim.AdamW(ps, lr=1e-3),
                         lambda ps: fusedtech.optim.SGD(ps, lr=0.1),
                         lambda ps: fusedtech.optim.SGD(ps, lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-4),
                         lambda ps: fusedtech.optim.RMSprop(ps, lr=1e-2),
                         lambda ps: fusedtech.optim.RMSprop(ps, lr=1e-2, momentum=0.9, centered=True),
                         lambda ps: fusedtech.optim.Adagrad(ps, lr=1e-2),
                         lambda ps: fusedtech.optim.LAMB(ps, lr=1e-3, weight_decay=0.01),
                         lambda ps: fusedtech.optim.AdamW8bit(ps, lr=1e-3, min_quantized_numel=0),
                         lambda ps: fusedtech.optim.Adam8bit(ps, lr=1e-3, amsgrad=True, min_quantized_numel=0),
                         lambda ps: fusedtech.optim.AdamWFp8(ps, lr=1e-3, min_quantized_numel=0)):
                opt = make(params)
                rec.case = f"{type(opt).__name__} {str(dtype)[6:]}"
                opt.step()
                opt.step()
            rec.case = f"quantize_blockwise {str(dtype)[6:]}"
            from fusedtech.ops import quantization
            for n in (1, 300, 2049):
                for fmt in ("int8", "fp8"):
                    codes, absmax = quantization.quantize_blockwise(torch.randn(n, dtype=dtype), signed=True, state_dtype=fmt)
                    quantization.dequantize_blockwise(codes, absmax, signed=True, state_dtype=fmt)


def record_huge_shapes(rec: Recorder):
    """Tensors of 2^32 + 4 elements, which take the kernels' 64-bit (WIDE) index paths and 64-bit
    size arguments. Allocated with torch.empty and never touched (the kernels do not run), so they
    cost address space, not memory."""
    import fusedtech
    from fusedtech.nn import functional as F
    big = 2 ** 32 + 4
    with fusedtech.use_backend("triton"):
        x = torch.empty(big, dtype=torch.bfloat16, requires_grad=True)
        rec.case = f"dropout {big} bfloat16"
        torch.autograd.backward(F.dropout(x, 0.1), torch.empty_like(x))
        del x
        x = torch.empty(2, 2, big // 4, dtype=torch.bfloat16, requires_grad=True)
        w, b, rm, rv = torch.ones(2, requires_grad=True), torch.zeros(2, requires_grad=True), torch.zeros(2), torch.ones(2)
        rec.case = f"batch_norm 2x2x{big // 4} bfloat16"
        torch.autograd.backward(F.batch_norm(x, rm, rv, w, b, training=True), torch.empty_like(x))
        del x
        # GroupNorm: 2^32 + 4 elements NCHW (also 2^31 + 2 positions a channel), just over 2^32
        # channels-last (32 groups of 40 channels, SD-like)
        record_group_norm(rec, (((2, 2, big // 4), 2, torch.contiguous_format),
                                ((1, 2, big // 2), 1, torch.contiguous_format),
                                ((2, 1280, 1024, 1639), 32, torch.channels_last)), (torch.bfloat16,), (0, 3))
        rows, n = 2 ** 21 + 1, 2048
        x = torch.empty(rows, n, dtype=torch.bfloat16, requires_grad=True)
        w, b = torch.ones(n, requires_grad=True), torch.zeros(n, requires_grad=True)
        rec.case = f"layer_norm {rows}x{n} bfloat16"
        torch.autograd.backward(F.layer_norm(x, (n,), w, b), torch.empty_like(x))


def record_all(capability: int = 90) -> list[Launch]:
    from benchmarks import bench_nn
    dtypes = (torch.float32, torch.bfloat16)
    with recording(capability) as rec:
        record_norms(rec, bench_nn.GPU_HIDDEN, dtypes, lambda n: bench_nn.rows_for(n, gpu=True))
        record_dropout(rec, bench_nn.rows_for(1024, gpu=True) * 1024, dtypes, bench_nn.GPU_DROP_BLOCK_SHAPES)
        record_batch_norm(rec, bench_nn.GPU_BN_SHAPES, dtypes)
    return rec.launches


def _consts(c: dict) -> str:
    skip = ("DTYPE",)
    return ", ".join(f"{k}={v}" for k, v in c.items() if k not in skip and v is not None)


def markdown(launches: list[Launch], capability: int) -> str:
    lim = SM_LIMITS[capability]
    lines = [f"# Triton kernels' resources on sm_{capability}",
             "",
             f"Per-SM limits: {lim['regs']} registers, {lim['threads']} threads, {lim['smem'] // 1024} KB shared "
             f"memory, {lim['blocks']} blocks; waves = programs / (programs per SM x {lim['sms']} SMs). "
             "`local` is local memory per thread (register spills): it should be 0.",
             "",
             "| case | kernel | constexprs | warps | num_stages | regs | local B | shared B | programs/SM | programs | waves |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    seen = set()
    for r in launches:
        key = (r.case, r.kernel, repr(r.constexprs), r.num_warps, r.programs)
        if key in seen:
            continue
        seen.add(key)
        lines.append(f"| {r.case} | {r.kernel} | {_consts(r.constexprs)} | {r.num_warps} | {r.num_stages} | {r.regs} | "
                     f"{r.local_bytes} | {r.shared_bytes} | {r.programs_per_sm} | {r.programs} | {r.waves} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--capability", type=int, default=90, choices=sorted(SM_LIMITS))
    ap.add_argument("--shapes", choices=("bench", "edge", "huge"), default="bench",
                    help="bench: the benchmark's GPU shapes; edge: every kernel on small and odd shapes; huge: "
                         "past 2^32 elements (both for tests)")
    args = ap.parse_args(argv)
    import triton
    if args.shapes == "bench":
        launches = record_all(args.capability)
    else:
        with recording(args.capability) as rec:
            (record_edge_shapes if args.shapes == "edge" else record_huge_shapes)(rec)
        launches = rec.launches
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "kernel_resources.json"), "w") as f:
        json.dump({"capability": args.capability, "triton": triton.__version__, "torch": torch.__version__,
                   "launches": [dataclasses.asdict(r) for r in launches]}, f, indent=1)
    with open(os.path.join(args.out, "kernel_resources.md"), "w") as f:
        f.write(markdown(launches, args.capability))
    too_large = sorted({(r.kernel, r.case) for r in launches if any(g > m for g, m in zip(r.grid, GRID_LIMITS))})
    if too_large:
        print("grids past CUDA's limits:" + "".join(f"\n  {k} ({c})" for k, c in too_large))
    spilling = sorted({(r.kernel, r.case) for r in launches if r.local_bytes})
    print(f"{len(launches)} launches recorded; {len(spilling)} spill registers"
          + "".join(f"\n  {k} ({c})" for k, c in spilling))
    return 0


if __name__ == "__main__":
    sys.exit(main())
