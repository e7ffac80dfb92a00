"""Dropout as torch.library ops: `fusedtech::dropout` (forward) whose backward is the same masked
scaling of the incoming gradient, regenerated from the saved one-element seed: no mask is kept."""
from __future__ import annotations

from typing import Optional

import torch

from .. import _backend
from ._eager import eager_fast_path, is_eager



def _triton():
    from ..triton_kernels import dropout
    return dropout


def _reference():
    from ..reference import dropout
    return dropout


APPLY = _backend.Implementations(
    "dropout",
    cuda=lambda: torch.ops.fusedtech_C.dropout_apply,
    cpu=lambda: torch.ops.fusedtech_C.dropout_apply,
    triton=lambda: _triton().dropout_apply,
    torch=lambda: _reference().dropout_apply)
DROPOUT_ADD_NORM = _backend.Implementations(
    "dropout_add_layer_norm",
    cuda=lambda: torch.ops.fusedtech_C.dropout_add_norm_fwd,
    cpu=lambda: torch.ops.fusedtech_C.dropout_add_norm_fwd,
    triton=lambda: _triton().dropout_add_norm_fwd,
    torch=lambda: _reference().dropout_add_norm_fwd)


def _apply(x, p, seed):
    return APPLY.pick(x.device, float64=x.dtype == torch.float64)(x, p, seed)


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
    fwd = DROPOUT_ADD_NORM.pick(x.device, float64=x.dtype == torch.float64)
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
