"""GroupNorm (and InstanceNorm: one channel per group) with the activation after it, as torch.library
ops: `fusedtech::group_norm_fwd` (y, mean, rstd: [N, G] in fp32, float64 for float64) with autograd
through `fusedtech::group_norm_bwd` (dx, dweight, dbias). The kernels read contiguous NCHW and
channels_last input in place and write the input's memory format; other strides are made
contiguous first. The backward recomputes the pre-activation from x and the saved statistics, so
nothing but x is kept. `group_norm` is what eager code calls (ops/_eager.py)."""
from __future__ import annotations

from typing import Optional

import torch

from .. import _backend
from ..reference import group_norm as reference
from ._eager import eager_fast_path, is_eager
from .layer_norm import _as_dtype_of, as_float64

ACTIVATION_CODES = {"none": 0, "relu": 1, "gelu": 2, "silu": 3}  # the kernels' codes, as BatchNorm's


def _triton():
    from ..triton_kernels import group_norm
    return group_norm


FORWARD = _backend.Implementations(
    "group_norm",
    cuda=lambda: torch.ops.fusedtech_C.group_norm_fwd,
    cpu=lambda: torch.ops.fusedtech_C.group_norm_fwd,
    triton=lambda: _triton().group_norm_fwd,
    torch=lambda: reference.group_norm_fwd)
BACKWARD = _backend.Implementations(
    "group_norm",
    cuda=lambda: torch.ops.fusedtech_C.group_norm_bwd,
    cpu=lambda: torch.ops.fusedtech_C.group_norm_bwd,
    triton=lambda: _triton().group_norm_bwd,
    torch=lambda: reference.group_norm_bwd)


def _channels_last(x: torch.Tensor):
    return {4: torch.channels_last, 5: torch.channels_last_3d}.get(x.dim())


def in_kernel_layout(x: torch.Tensor) -> torch.Tensor:
    """x as the kernels read it: contiguous, or channels_last / channels_last_3d (a copy otherwise)."""
    if x.is_contiguous():
        return x
    fmt = _channels_last(x)
    if fmt is not None and x.is_contiguous(memory_format=fmt):
        return x
    return x.contiguous()


def _as_layout_of(dy: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """dy with x's layout (the kernels index both with x's strides)."""
    if x.is_contiguous():
        return dy.contiguous()
    return dy.contiguous(memory_format=_channels_last(x))


def _group_norm_fwd(x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor], num_groups: int,
                    eps: float, activation: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    x = in_kernel_layout(x)
    return FORWARD.pick(x.device, float64=x.dtype == torch.float64)(x, weight, bias, num_groups, eps, activation)


group_norm_fwd = torch.library.custom_op("fusedtech::group_norm_fwd", _group_norm_fwd, mutates_args=())


@group_norm_fwd.register_fake
def _(x, weight, bias, num_groups, eps, activation):
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    n = x.shape[0]
    return torch.empty_like(in_kernel_layout(x)), x.new_empty(n, num_groups, dtype=acc), x.new_empty(n, num_groups, dtype=acc)


def _group_norm_bwd(dy: torch.Tensor, x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                    mean: torch.Tensor, rstd: torch.Tensor, num_groups: int,
                    activation: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx, dweight, dbias): the per-channel sums always (fp32, float64 for float64)."""
    kernel = BACKWARD.pick(x.device, float64=x.dtype == torch.float64)
    return kernel(_as_layout_of(dy, x), x, weight, bias, mean, rstd, num_groups, activation)


group_norm_bwd = torch.library.custom_op("fusedtech::group_norm_bwd", _group_norm_bwd, mutates_args=())


@group_norm_bwd.register_fake
def _(dy, x, weight, bias, mean, rstd, num_groups, activation):
    c = x.shape[1]
    return torch.empty_like(x), mean.new_empty(c), mean.new_empty(c)


def _setup_context(ctx, inputs, output):
    x, weight, bias, num_groups, eps, activation = inputs
    _, mean, rstd = output
    # The x the kernels read (a copy for strided input), so that backward does not copy it again.
    ctx.save_for_backward(in_kernel_layout(x), weight, bias, mean, rstd)
    ctx.num_groups, ctx.eps, ctx.activation = num_groups, eps, activation
    # The backend is chosen here, in the forward's context: use_backend() is a ContextVar, which
    # autograd's device threads (a CUDA backward) do not see.
    ctx.kernel = BACKWARD.pick(x.device, float64=x.dtype == torch.float64) if is_eager(ctx) else None


def _differentiable_grads(ctx, dy, x, weight, bias):
    """(dx, dweight, dbias) as a differentiable graph, for backward under create_graph=True: the
    oracle's backward in float64 on statistics recomputed from x with torch ops, so autograd records
    how the gradients depend on x."""
    xd = as_float64(x)
    mean, rstd = reference.group_norm_stats(xd, ctx.num_groups, ctx.eps)
    dx, dw, db = reference.group_norm_bwd(as_float64(dy), xd, as_float64(weight), as_float64(bias), mean, rstd,
                                          ctx.num_groups, ctx.activation)
    return dx.to(x.dtype), dw, db


def _backward(ctx, dy, dmean, drstd):
    x, weight, bias, mean, rstd = ctx.saved_tensors
    if is_eager(ctx) and torch.is_grad_enabled():  # create_graph=True: double backward
        dx, dw, db = _differentiable_grads(ctx, dy, x, weight, bias)
    else:
        if is_eager(ctx):
            dx, dw, db = ctx.kernel(_as_layout_of(dy, x), x, weight, bias, mean, rstd, ctx.num_groups, ctx.activation)
        else:
            dx, dw, db = group_norm_bwd(dy, x, weight, bias, mean, rstd, ctx.num_groups, ctx.activation)
    return dx, _as_dtype_of(dw, weight), _as_dtype_of(db, bias), None, None, None


group_norm_fwd.register_autograd(_backward, setup_context=_setup_context)
group_norm = eager_fast_path("group_norm", group_norm_fwd, _group_norm_fwd, _setup_context, _backward)
