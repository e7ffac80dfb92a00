"""Dropout as torch.library ops: `fusedtech::dropout` (forward) whose backward is the same masked
scaling of the incoming gradient, regenerated from the saved one-element seed: no mask is kept."""
from __future__ import annotations

import importlib
from typing import Optional

import torch

from .. import _backend
from ._eager import eager_fast_path, is_eager

IMPLEMENTED = ("cuda", "triton", "cpu", "torch")
FUSED_NORM_IMPLEMENTED = IMPLEMENTED  # dropout + add + norm


def _apply(x, p, seed):
    return _backend.implementation("dropout", x.device, IMPLEMENTED, "dropout", "dropout_apply",
                                   float64=x.dtype == torch.float64)(x, p, seed)


def _dropout_apply(x: torch.Tensor, p: float, seed: torch.Tensor) -> torch.Tensor:
    """dropout(x) with the mask of `seed`: out-of-place, x's shape and dtype, contiguous."""
    return _apply(x, p, seed)


dropout_apply = torch.library.custom_op("fusedtech::dropout_apply", _dropout_apply, mutates_args=())


@dropout_apply.register_fake
def _(x, p, seed):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _setup_context(ctx, inputs, output):
    _, p, seed = inputs
    ctx.p = p
    ctx.save_for_backward(seed)  # one int64: the whole of what backward needs


def _backward(ctx, dy):
    (seed,) = ctx.saved_tensors
    # Differentiable (double backward works) when the graph of the backward is being recorded;
    # otherwise (create_graph=False: grad mode is off) the kernel directly, without an autograd node.
    if not is_eager(ctx):
        apply = dropout_apply
    else:
        apply = dropout if torch.is_grad_enabled() else _apply
    return apply(dy.contiguous(), ctx.p, seed), None, None


dropout_apply.register_autograd(_backward, setup_context=_setup_context)
dropout = eager_fast_path("dropout", dropout_apply, _dropout_apply, _setup_context, _backward)


# ---- dropout + residual add + LayerNorm/RMSNorm ---------------------------------------------
# Saves the pre-norm sum (which LayerNorm's backward needs and the next block uses as its residual)
# and the row statistics: no mask, no copy of x.

def _dan_impl(x, residual, weight, bias, p, eps, rms, seed):
    fwd = _backend.implementation("dropout_add_layer_norm", x.device, FUSED_NORM_IMPLEMENTED, "dropout",
                                  "dropout_add_norm_fwd", float64=x.dtype == torch.float64)
    return fwd(x, residual, weight, bias, p, eps, rms, seed)


def _dropout_add_norm(x: torch.Tensor, residual: torch.Tensor, weight: Optional[torch.Tensor],
                      bias: Optional[torch.Tensor], p: float, eps: float, rms: bool,
                      seed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(norm(dropout(x) + residual), the sum, mean, rstd) for 2-D contiguous (rows, n) inputs."""
    out, s, mean, rstd = _dan_impl(x, residual, weight, bias, p, eps, rms, seed)
    return out, s, mean, rstd


dropout_add_norm = torch.library.custom_op("fusedtech::dropout_add_norm", _dropout_add_norm, mutates_args=())


@dropout_add_norm.register_fake
def _(x, residual, weight, bias, p, eps, rms, seed):
    rows, acc = x.shape[0], torch.float64 if x.dtype == torch.float64 else torch.float32  # statistics' dtype
    return torch.empty_like(x), torch.empty_like(x), x.new_empty(rows, dtype=acc), x.new_empty(rows, dtype=acc)


def _dan_setup_context(ctx, inputs, output):
    _, _, weight, bias, p, eps, rms, seed = inputs
    _, s, mean, rstd = output
    ctx.save_for_backward(s, weight, bias, mean, rstd, seed)
    ctx.p, ctx.rms, ctx.eps = p, rms, eps


def _dan_backward(ctx, dout, dsum, dmean, drstd):
    from .layer_norm import _as_dtype_of, _layer_norm_bwd, differentiable_grads, layer_norm_bwd
    s, weight, bias, mean, rstd, seed = ctx.saved_tensors
    eager = is_eager(ctx)
    if dout is None:  # only the sum was used (eager gradients are not materialised)
        dout = torch.zeros_like(s)
    if eager and torch.is_grad_enabled():  # create_graph=True: the norm's backward as a graph
        ds, dw, db = differentiable_grads(s, weight, bias, dout, ctx.eps, ctx.rms)
    else:
        ds, dw, db = (_layer_norm_bwd if eager else layer_norm_bwd)(dout, s, weight, bias, mean, rstd, ctx.rms,
                                                                    False)
    if dsum is not None:  # the sum is also an output (the next residual)
        ds = ds + dsum
    if not eager:
        apply = dropout_apply
    else:
        apply = dropout if torch.is_grad_enabled() else _apply
    return (apply(ds.contiguous(), ctx.p, seed), ds, _as_dtype_of(dw, weight), _as_dtype_of(db, bias),
            None, None, None, None)


dropout_add_norm.register_autograd(_dan_backward, setup_context=_dan_setup_context)
dropout_add_layer_norm = eager_fast_path("dropout_add_layer_norm", dropout_add_norm, _dropout_add_norm,
                                         _dan_setup_context, _dan_backward, differentiable=2)


def new_seed(device: torch.device) -> torch.Tensor:
    """A fresh 62-bit seed drawn from torch's default generator for `device` (so torch.manual_seed
    reproduces runs); it stays on the device: no host synchronisation."""
    return torch.randint(0, 2 ** 62, (1,), device=device, dtype=torch.int64)


# ---- DropBlock --------------------------------------------------------------------------------
# Each backend builds the keep mask from (seed, gamma, block_size) and counts what it keeps, then
# scales: output = x * keep * numel / (eps + kept). Backward rebuilds the mask from the saved seed,
# so only the seed and the one-element scale are kept (torch's composition keeps an input-sized mask).
DROP_BLOCK_IMPLEMENTED = ("cuda", "triton", "cpu", "torch")


class _CppDropBlock:
    """The compiled (CPU and CUDA) ops in the backends' interface: the op counts what it keeps, the
    scale is formed here in float64 on the tensors' device (CPU tensors: a few scalar ops, no launch;
    CUDA: a few one-element launches, no host synchronisation)."""

    @staticmethod
    def drop_block_keep_scale(x, seed, gamma, block_size, eps):
        from ..reference.drop_block import scale_of
        keep, kept = torch.ops.fusedtech_C.drop_block_keep(x, seed, gamma, block_size)
        return keep, scale_of(x.numel(), kept, eps, x.dtype)

    @staticmethod
    def drop_block_mask(x, seed, gamma, block_size):
        return torch.ops.fusedtech_C.drop_block_keep(x, seed, gamma, block_size)[0]

    @staticmethod
    def drop_block_apply(x, keep, scale):
        return torch.ops.fusedtech_C.drop_block_apply(x, keep, scale)


def _drop_block_backend(x):
    """The object with drop_block_keep_scale, drop_block_mask and drop_block_apply for x's device."""
    backend = _backend.select("drop_block2d", x.device, DROP_BLOCK_IMPLEMENTED, float64=x.dtype == torch.float64)
    if backend in ("cpu", "cuda"):  # the compiled ops, which dispatch on the device
        return _CppDropBlock
    package = "triton_kernels" if backend == "triton" else "reference"
    return importlib.import_module(f"fusedtech.{package}.drop_block")


def _dense_format(x: torch.Tensor) -> torch.memory_format:
    """The format the kernels run x in: channels_last if x is stored so, else contiguous."""
    channels_last = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    return torch.channels_last if channels_last else torch.contiguous_format


def _drop_block_fwd(x: torch.Tensor, seed: torch.Tensor, gamma: float, block_size: int,
                    eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(DropBlock of x with the block mask of `seed`, the normalisation factor as a 0-d fp32 tensor;
    float64 for float64 x)."""
    x = x.contiguous(memory_format=_dense_format(x))
    impl = _drop_block_backend(x)
    keep, scale = impl.drop_block_keep_scale(x, seed, gamma, block_size, eps)  # on the device: no host sync
    return impl.drop_block_apply(x, keep, scale), scale


drop_block_fwd = torch.library.custom_op("fusedtech::drop_block2d", _drop_block_fwd, mutates_args=())


@drop_block_fwd.register_fake
def _(x, seed, gamma, block_size, eps):
    from ..reference.drop_block import scale_dtype
    return torch.empty_like(x, memory_format=_dense_format(x)), x.new_empty((), dtype=scale_dtype(x.dtype))


def _drop_block_bwd(dy: torch.Tensor, seed: torch.Tensor, scale: torch.Tensor, gamma: float,
                    block_size: int) -> torch.Tensor:
    dy = dy.contiguous(memory_format=_dense_format(dy))
    impl = _drop_block_backend(dy)
    return impl.drop_block_apply(dy, impl.drop_block_mask(dy, seed, gamma, block_size), scale)


drop_block_bwd = torch.library.custom_op("fusedtech::drop_block2d_bwd", _drop_block_bwd, mutates_args=())


@drop_block_bwd.register_fake
def _(dy, seed, scale, gamma, block_size):
    return torch.empty_like(dy, memory_format=_dense_format(dy))


def _db_setup_context(ctx, inputs, output):
    _, seed, gamma, block_size, _ = inputs
    ctx.gamma, ctx.block_size = gamma, block_size
    ctx.save_for_backward(seed, output[1])  # one int64 and one float: all backward needs


def _db_backward(ctx, dy, dscale):
    seed, scale = ctx.saved_tensors
    bwd = _drop_block_bwd if is_eager(ctx) else drop_block_bwd
    return bwd(dy, seed, scale, ctx.gamma, ctx.block_size), None, None, None, None


drop_block_fwd.register_autograd(_db_backward, setup_context=_db_setup_context)
drop_block = eager_fast_path("drop_block2d", drop_block_fwd, _drop_block_fwd, _db_setup_context, _db_backward)
