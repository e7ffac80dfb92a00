"""LayerNorm, RMSNorm, dropout, dropout+add+LayerNorm, DropBlock, BatchNorm2d and BatchNormAct2d (BN+ReLU, BN+GELU,
BN+residual+ReLU), GroupNorm(32)+SiLU (GroupNormAct against torch's GroupNorm then SiLU): forward and forward+backward per implementation (on a GPU also torch.compile of
the torch modules for BatchNorm2d and its activation variants).

Bytes moved (each input read once, each output written once, activations in the given dtype):
forward x + y = 2 N; forward+backward adds dy, x and dx = 5 N (weights and statistics are
negligible); BatchNorm2d the same. Dropout: forward 2 N, forward+backward 4 N (torch also writes
and reads a 1-byte mask: +2 N bytes for it, not counted); DropBlock the same as dropout (torchvision's
composition, timed as "torch", keeps an input-sized mask). `saved_bytes` records the activation
memory each implementation keeps for backward, `peak_bytes` (GPU) the memory one call needs. dropout +
add + LayerNorm: forward 4 N (x, residual in; out, sum out), forward+backward 8 N. BN + residual +
act: forward 3 N, forward+backward 7 N (dy in, dx and dresidual out).
"""
from __future__ import annotations

import contextlib

import pytest
import torch

import fusedtech
from benchmarks import _common
from fusedtech.nn import functional as F

DEV = _common.device()
GPU = DEV.type == "cuda"
DTYPES = [torch.float32, torch.bfloat16] if GPU else [torch.float32]
# The GPU shapes (also what benchmarks.kernel_resources compiles the Triton kernels for).
# 128: the short-row kernels (a tile of rows per program; triton_kernels/layer_norm.py, unmeasured).
GPU_HIDDEN = [128, 512, 1024, 4096, 16384, 65536 + 1024]
GPU_BN_SHAPES = [(512, 64, 32, 32), (512, 128, 16, 16), (512, 256, 8, 8), (512, 512, 4, 4)]  # CIFAR ResNet-18, batch 512
GPU_DROP_BLOCK_SHAPES = [(512, 64, 32, 32), (512, 256, 8, 8)]
# GroupNorm(32) + SiLU: the activations of a Stable-Diffusion-1.5 UNet at batch 2 (its ResnetBlock2D
# runs GroupNorm -> SiLU twice per block), and a CIFAR ResNet with GroupNorm at batch 128.
GPU_GN_SHAPES = [(2, 320, 64, 64), (2, 640, 32, 32), (2, 1280, 16, 16), (2, 1280, 8, 8), (128, 64, 32, 32),
                 (128, 256, 8, 8)]


def rows_for(n: int, gpu: bool = GPU) -> int:
    """Rows of an (rows, n) input of about 64 MB of fp32 (GPU) or 4 MB (CPU)."""
    return max(1, (64 << 20 if gpu else 4 << 20) // (n * 4))


HIDDEN = GPU_HIDDEN if GPU else [512, 4096]
BN_SHAPES = GPU_BN_SHAPES if GPU else [(32, 64, 16, 16)]
GN_SHAPES = GPU_GN_SHAPES if GPU else [(2, 320, 32, 32), (16, 64, 16, 16)]
GN_DTYPES = [torch.float32, torch.bfloat16]  # bf16 on the CPU too: a diffusion UNet trains in it


def _fused_backends():
    return [b for b in fusedtech.available_backends(DEV) if b != "torch" and not (b == "triton" and not GPU)]


def _has_liger() -> bool:
    try:
        import liger_kernel.transformers  # noqa: F401
        return GPU
    except ImportError:
        return False


LIGER_MAX_HIDDEN = 65536  # Liger's norms hold a row in one block and refuse longer rows (its bench case failed)


def _impls(op: str, hidden: int = 0):
    impls = [("torch", None)] + [(f"fusedtech-{b}", b) for b in _fused_backends()]
    if op in ("layer_norm", "rms_norm") and _has_liger() and hidden <= LIGER_MAX_HIDDEN:
        impls.append(("liger", None))  # the peer: Liger-Kernel's Triton LayerNorm / RMSNorm modules
    if op == "group_norm_silu" and _has_liger():
        impls.append(("liger", None))  # Liger's GroupNorm (NCHW only, no activation: SiLU after it)
    return impls


def _liger_norm(op: str, h: int):
    from liger_kernel.transformers import LigerLayerNorm, LigerRMSNorm
    # Same math as the torch modules timed beside it: LayerNorm with a bias and eps 1e-5, RMSNorm eps 1e-6.
    return LigerLayerNorm(h, eps=1e-5, bias=True) if op == "layer_norm" else LigerRMSNorm(h, eps=1e-6)


def _fused(mod):
    fused = fusedtech.nn.convert_model(mod)
    assert type(fused).__module__.startswith("fusedtech."), f"convert_model left {type(fused).__name__} unconverted"
    return fused


def _saved_bytes(fn, x):
    total = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: total.append(t.numel() * t.element_size()) or t, lambda t: t):
        fn(x)
    return sum(total)


def _case(label, impl, backend, dtype, shape, direction, benchmark):
    """label: the op, with "_nhwc" appended for a channels_last input."""
    op = label.removesuffix("_nhwc")
    x = torch.randn(shape, device=DEV, dtype=dtype)
    if op != label:
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_(direction == "fwd+bwd")
    n = x.numel() * x.element_size()
    if op in ("layer_norm", "rms_norm"):
        h = shape[-1]
        if impl == "liger":
            mod = _liger_norm(op, h).to(DEV, dtype)
        else:
            mod = (torch.nn.LayerNorm(h) if op == "layer_norm" else torch.nn.RMSNorm(h, eps=1e-6)).to(DEV, dtype)
        if impl not in ("torch", "liger"):
            mod = _fused(mod)
            mod.memory_efficient = impl.endswith("-memeff")  # keeps y, not x, for backward
        fn = mod
    elif op == "dropout":
        fn = (lambda t: torch.nn.functional.dropout(t, 0.1)) if impl == "torch" else (lambda t: F.dropout(t, 0.1))
    elif op == "dropout_add_layer_norm":
        h = shape[-1]
        res = torch.randn_like(x, requires_grad=x.requires_grad)
        w, b = torch.ones(h, device=DEV, dtype=dtype), torch.zeros(h, device=DEV, dtype=dtype)
        if impl == "torch":
            fn = lambda t: torch.nn.functional.layer_norm(torch.nn.functional.dropout(t, 0.1) + res, (h,), w, b)  # noqa: E731
        else:
            fn = lambda t: F.dropout_add_layer_norm(t, res, w, b, p=0.1)  # noqa: E731
    elif op.startswith("drop_block2d"):
        block = int(op.rsplit("_b", 1)[1])
        fn = ((lambda t: _torchvision_drop_block2d(t, 0.1, block)) if impl in ("torch", "torch-compile")
              else (lambda t: F.drop_block2d(t, 0.1, block)))
    elif op in BN_ACT_OPS:  # BatchNormAct2d against BatchNorm2d, (+ residual,) then the activation
        act = BN_ACT_OPS[op]
        mod = torch.nn.Sequential(torch.nn.BatchNorm2d(shape[1]), ACT_MODULES[act]()).to(DEV, dtype)
        if impl not in ("torch", "torch-compile"):
            mod = fusedtech.nn.convert_model(mod, fuse_activations=True)
            assert type(mod[0]).__name__ == "BatchNormAct2d"
        if "_add_" in op:
            res = torch.randn_like(x, requires_grad=x.requires_grad)
            bn, act_mod = mod[0], mod[-1]
            if impl in ("torch", "torch-compile"):
                fn = lambda t: act_mod(bn(t) + res)  # noqa: E731
            else:
                fn = lambda t: bn(t, res)  # noqa: E731 - BatchNormAct2d(x, residual)
        else:
            fn = mod
    elif op == "group_norm_silu":
        if impl == "liger":
            from liger_kernel.transformers import LigerGroupNorm
            norm = LigerGroupNorm(shape[1], 32, eps=1e-5, bias=True)
        else:
            norm = torch.nn.GroupNorm(32, shape[1])
        fn = torch.nn.Sequential(norm, torch.nn.SiLU()).to(DEV, dtype)
        if impl not in ("torch", "torch-compile", "liger"):
            fn = fusedtech.nn.convert_model(fn, fuse_activations=True)
            assert type(fn[0]).__name__ == "GroupNormAct"
    else:
        mod = torch.nn.BatchNorm2d(shape[1]).to(DEV, dtype)
        if impl not in ("torch", "torch-compile"):
            mod = _fused(mod)
        fn = mod
    if impl == "torch-compile":
        fn = torch.compile(fn)
    dy = torch.randn_like(x)

    stages = 2 if impl.endswith("-rowstages2") else None

    def run():
        with fusedtech.use_backend(backend), _ln_bwd_row_stages(stages):
            y = fn(x)
            if direction == "fwd+bwd":
                y.backward(dy)

    saved = _saved_bytes(fn, x) if direction == "fwd+bwd" else 0
    peak = None
    if GPU:  # memory a call needs above what exists before it (activations saved, temporaries)
        run()
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        run()
        peak = torch.cuda.max_memory_allocated() - base
    _common.measure(benchmark, run, dev=DEV, op=f"{label} {direction}", impl=impl, case="x".join(map(str, shape)),
                    dtype=dtype, bytes_moved=_factor(op, direction) * n, saved_bytes=saved, peak_bytes=peak)


def _torchvision_drop_block2d(x, p: float, block: int, eps: float = 1e-6):
    """torchvision.ops.drop_block2d's composition (torchvision is not a dependency): the baseline."""
    n, c, h, w = x.shape
    gamma = (p * h * w) / ((block ** 2) * ((h - block + 1) * (w - block + 1)))
    noise = torch.empty((n, c, h - block + 1, w - block + 1), dtype=x.dtype, device=x.device).bernoulli_(gamma)
    noise = torch.nn.functional.pad(noise, [block // 2] * 4, value=0)
    noise = 1 - torch.nn.functional.max_pool2d(noise, stride=(1, 1), kernel_size=(block, block), padding=block // 2)
    return x * noise * (noise.numel() / (eps + noise.sum()))


@contextlib.contextmanager
def _ln_bwd_row_stages(stages):
    """The Triton LayerNorm backward's row-prefetch depth for one case (None: the default)."""
    if stages is None:
        yield
        return
    from fusedtech.triton_kernels import layer_norm as kernels
    saved, kernels.BWD_ROW_STAGES = kernels.BWD_ROW_STAGES, stages
    try:
        yield
    finally:
        kernels.BWD_ROW_STAGES = saved


def _factor(op: str, direction: str) -> int:
    """Activation-sized tensors moved per call (see the module docstring)."""
    if "_add_" in op:  # BN + residual + act: x, residual in, out; backward dy in, dx, dresidual out
        return 3 if direction == "fwd" else 7
    if op == "dropout" or op.startswith("drop_block2d"):
        return 2 if direction == "fwd" else 4
    if op == "dropout_add_layer_norm":  # x, residual in, out (and the sum) out; backward dy, sum in, dx, dres out
        return 4 if direction == "fwd" else 8
    return 2 if direction == "fwd" else 5


NORM_CASES = [(op, impl, b, dt, (rows_for(h), h), d) for op in ("layer_norm", "rms_norm") for dt in DTYPES for h in HIDDEN
              for d in ("fwd", "fwd+bwd") for impl, b in _impls(op, h)]
# The memory-saving LayerNorm (recomputes xhat from the output): what its backward costs.
NORM_CASES += [("layer_norm", f"fusedtech-{b}-memeff", b, dt, (rows_for(h), h), "fwd+bwd")
               for dt in DTYPES for h in HIDDEN for b in _fused_backends()]
# GPU only: the Triton backward prefetching the next rows (tl.range num_stages=2) against the default.
NORM_CASES += [(op, "fusedtech-triton-rowstages2", "triton", dt, (rows_for(h), h), "fwd+bwd") for op in ("layer_norm", "rms_norm")
               for dt in DTYPES for h in HIDDEN if GPU]
DROPOUT_CASES = [("dropout", impl, b, dt, (rows_for(1024) * 1024,), d) for dt in DTYPES for d in ("fwd", "fwd+bwd")
                 for impl, b in _impls("dropout")]
DROP_BLOCK_SHAPES = GPU_DROP_BLOCK_SHAPES if GPU else [(32, 64, 16, 16)]
DROP_BLOCK_CASES = [(f"drop_block2d_b{block}", impl, b, dt, s, "fwd+bwd") for block in ((3, 7) if GPU else (3,))
                    for dt in DTYPES for s in DROP_BLOCK_SHAPES for impl, b in _impls("drop_block2d")]
BN_CASES = [("batch_norm", impl, b, dt, s, "fwd+bwd") for dt in DTYPES for s in BN_SHAPES for impl, b in _impls("batch_norm")]
# channels_last (NHWC) input, as a CIFAR loop with --channels-last feeds it: the Triton kernels walk
# elements in logical NCHW order, so their NHWC accesses are strided (the GPU number to watch).
BN_CASES += [("batch_norm_nhwc", impl, b, dt, s, "fwd+bwd") for dt in DTYPES for s in BN_SHAPES
             for impl, b in _impls("batch_norm")]
# BatchNormAct2d against torch's BN then the activation: ReLU (CIFAR ResNets), GELU (airbench), and
# the ResNet block's end, BN + residual + ReLU.
BN_ACT_OPS = {"batch_norm_relu": "relu", "batch_norm_gelu": "gelu", "batch_norm_add_relu": "relu"}
ACT_MODULES = {"relu": torch.nn.ReLU, "gelu": torch.nn.GELU}
BN_ACT_CASES = [(op, impl, b, dt, s, "fwd+bwd") for op in BN_ACT_OPS for dt in DTYPES for s in BN_SHAPES[:2]
                for impl, b in _impls("batch_norm")]
BN_ACT_CASES += [("batch_norm_gelu_nhwc", impl, b, dt, s, "fwd+bwd") for dt in DTYPES for s in BN_SHAPES[:2]
                 for impl, b in _impls("batch_norm")]
DAN_CASES = [("dropout_add_layer_norm", impl, b, dt, (rows_for(h), h), "fwd+bwd") for dt in DTYPES
             for h in ((1024, 4096) if GPU else HIDDEN[1:]) for impl, b in _impls("dropout_add_layer_norm")]
GN_CASES = [(op, impl, b, dt, s, d) for op in ("group_norm_silu", "group_norm_silu_nhwc") for dt in GN_DTYPES
            for s in GN_SHAPES for d in ("fwd", "fwd+bwd") for impl, b in _impls("group_norm_silu")
            if not (impl == "liger" and op.endswith("_nhwc"))]
# torch.compile of the torch modules (Inductor's generated kernels), on a GPU only: compiling on
# the CPU would dominate the short CPU run.
COMPILE_CASES = ([("batch_norm", "torch-compile", None, dt, s, "fwd+bwd") for dt in DTYPES for s in BN_SHAPES]
                 + [(op, "torch-compile", None, dt, BN_SHAPES[0], "fwd+bwd") for op in BN_ACT_OPS for dt in DTYPES]
                 + [("drop_block2d_b7", "torch-compile", None, dt, DROP_BLOCK_SHAPES[0], "fwd+bwd") for dt in DTYPES]
                 + [("group_norm_silu_nhwc", "torch-compile", None, torch.bfloat16, s, "fwd+bwd") for s in GN_SHAPES[:3]]
                 if GPU else [])
ALL = NORM_CASES + DROPOUT_CASES + DROP_BLOCK_CASES + BN_CASES + BN_ACT_CASES + DAN_CASES + GN_CASES + COMPILE_CASES


@pytest.mark.parametrize("op,impl,backend,dtype,shape,direction", ALL,
                         ids=[f"{c[0]}-{c[5]}-{c[1]}-{str(c[3])[6:]}-{'x'.join(map(str, c[4]))}" for c in ALL])
def test_nn_op(benchmark, op, impl, backend, dtype, shape, direction):
    _case(op, impl, backend, dtype, shape, direction, benchmark)


COPIES = sorted({(c[4], c[3], _factor(c[0], c[5])) for c in ALL}, key=str)


@pytest.mark.parametrize("shape,dtype,factor", COPIES, ids=[f"{'x'.join(map(str, c[0]))}-{str(c[1])[6:]}-{c[2]}" for c in COPIES])
def test_copy(benchmark, shape, dtype, factor):
    n = factor * torch.Size(shape).numel() * torch.tensor([], dtype=dtype).element_size()
    _common.measure(benchmark, _common.copy_fn(n, DEV), dev=DEV, op="copy", impl="copy", case="x".join(map(str, shape)),
                    dtype=dtype, bytes_moved=n)
