"""LayerNorm / RMSNorm as torch.library ops: `fusedtech::layer_norm_fwd` (y, mean, rstd: fp32, or
float64 for float64 input)
with autograd through `fusedtech::layer_norm_bwd` (dx, dweight, dbias). Both take a contiguous
(..., n) input, normalised over its last dimension, and hand the kernels its (rows, n) view: the
reshapes happen inside the op, so autograd records no view nodes around it (each costs host time
in backward). `layer_norm` is what eager code calls (ops/_eager.py: the same kernels without the
custom-op cost)."""
from __future__ import annotations

import math
from typing import Optional

import torch

from .. import _backend
from ._eager import eager_fast_path, is_eager
from ..reference.layer_norm import stat_dtype



def _triton():
    from ..triton_kernels import layer_norm
    return layer_norm


def _reference():
    from ..reference import layer_norm
    return layer_norm


FORWARD = _backend.Implementations(
    "layer_norm",
    cuda=lambda: torch.ops.fusedtech_C.layer_norm_fwd,
    cpu=lambda: torch.ops.fusedtech_C.layer_norm_fwd,
    triton=lambda: _triton().layer_norm_fwd,
    torch=lambda: _reference().layer_norm_fwd)
BACKWARD = _backend.Implementations(
    "layer_norm",
    cuda=lambda: torch.ops.fusedtech_C.layer_norm_bwd,
    cpu=lambda: torch.ops.fusedtech_C.layer_norm_bwd,
    triton=lambda: _triton().layer_norm_bwd,
    torch=lambda: _reference().layer_norm_bwd)


def _pick(table, x: torch.Tensor):
    return table.pick(x.device, float64=x.dtype == torch.float64)


def _rows(t: torch.Tensor, n: int) -> torch.Tensor:
    return t if t.dim() == 2 else t.view(-1, n)


def _like(y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """y (rows, n) in x's shape; detached, so that autograd does not take the op's output for a view
    (in-place ops on it, as an inplace ReLU after the norm, would be refused)."""
    return y if y.dim() == x.dim() else y.view(x.shape).detach()


def _layer_norm_fwd(x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor], eps: float,
                    rms: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    y, mean, rstd = _pick(FORWARD, x)(_rows(x, x.shape[-1]), weight, bias, eps, rms)
    return _like(y, x), mean, rstd


layer_norm_fwd = torch.library.custom_op("fusedtech::layer_norm_fwd", _layer_norm_fwd, mutates_args=())


@layer_norm_fwd.register_fake
def _(x, weight, bias, eps, rms):
    rows, acc = math.prod(x.shape[:-1]), stat_dtype(x.dtype)
    return torch.empty_like(x), x.new_empty(rows, dtype=acc), x.new_empty(rows, dtype=acc)


def _layer_norm_bwd(dy: torch.Tensor, x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                    mean: torch.Tensor, rstd: torch.Tensor, rms: bool,
                    from_output: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx, dweight, dbias); dbias when a bias is given. from_output: x is the forward's output and
    the kernels recover xhat from it with the weight and bias (mean is not read)."""
    n = x.shape[-1]
    dx, dw, db = _pick(BACKWARD, x)(_rows(dy.contiguous(), n), _rows(x, n), weight, bias, mean, rstd,
                                                   rms, from_output)
    # Absent gradients come back as (distinct) empty tensors: an op's outputs may not alias.
    acc = stat_dtype(x.dtype)
    return (_like(dx, x), dw if dw is not None else x.new_empty(0, dtype=acc),
            db if db is not None else x.new_empty(0, dtype=acc))


layer_norm_bwd = torch.library.custom_op("fusedtech::layer_norm_bwd", _layer_norm_bwd, mutates_args=())


@layer_norm_bwd.register_fake
def _(dy, x, weight, bias, mean, rstd, rms, from_output):
    n, acc = x.shape[-1], stat_dtype(x.dtype)
    return (torch.empty_like(x), x.new_empty(n if weight is not None else 0, dtype=acc),
            x.new_empty(n if bias is not None else 0, dtype=acc))


def _setup_context(ctx, inputs, output):
    x, weight, bias, eps, rms = inputs
    _, mean, rstd = output
    ctx.save_for_backward(x, weight, bias, mean, rstd)
    ctx.rms, ctx.eps = rms, eps


def as_float64(t):
    """t in float64 (None stays None): the double-backward compositions compute in it."""
    return t.to(torch.float64) if t is not None else None


def differentiable_grads(x, weight, bias, dy, eps: float, rms: bool):
    """(dx, dweight, dbias) as a differentiable graph, for backward under create_graph=True (a gradient
    penalty, a Hessian-vector product): the kernels' backward is not itself differentiable, so the
    oracle's backward runs on statistics recomputed from x with torch ops, all recorded by autograd.
    (Not autograd.grad of a recomputed forward: when x is a saved output, as dropout+add+LayerNorm's
    sum, that would also differentiate through the op that made x, re-entering this backward.)"""
    from ..reference.layer_norm import layer_norm_bwd as reference_bwd
    from ..reference.layer_norm import layer_norm_fwd as reference_fwd
    f64 = as_float64  # float64 throughout: a composition of torch ops rounds more than a fused kernel
    n = x.shape[-1]
    x2 = f64(x.reshape(-1, n))
    _, mean, rstd = reference_fwd(x2, None, None, eps, rms)
    dx, dw, db = reference_bwd(f64(dy.reshape(-1, n)), x2, f64(weight), f64(bias), mean, rstd, rms, False)
    return dx.to(x.dtype).view(x.shape), dw, db


def _as_dtype_of(g, like):
    """g in like's dtype (None without like); no call when it already is (each is host time)."""
    if like is None or g is None:
        return None
    return g if g.dtype == like.dtype else g.to(like.dtype)


def _grads(ctx, weight, bias, dx, dw, db):
    """The op's gradients for (x, weight, bias, eps, rms): dweight/dbias in the parameters' dtypes."""
    return dx, _as_dtype_of(dw, weight), _as_dtype_of(db, bias), None, None


def _backward(ctx, dy, dmean, drstd):
    x, weight, bias, mean, rstd = ctx.saved_tensors
    if torch.is_grad_enabled() and is_eager(ctx):  # create_graph=True: double backward
        return (*differentiable_grads(x, weight, bias, dy, ctx.eps, ctx.rms), None, None)
    bwd = _layer_norm_bwd if is_eager(ctx) else layer_norm_bwd
    return _grads(ctx, weight, bias, *bwd(dy, x, weight, bias, mean, rstd, ctx.rms, False))


layer_norm_fwd.register_autograd(_backward, setup_context=_setup_context)
layer_norm = eager_fast_path("layer_norm", layer_norm_fwd, _layer_norm_fwd, _setup_context, _backward)


# ---- memory-saving variant --------------------------------------------------------------------
# Saves the output y instead of the input x (with the weight, bias and rstd); the backward kernels
# recover xhat = (y - bias) / weight as they read y (from_output), as apex's memory_efficient
# LayerNorm does: the same passes over memory as the plain backward. It pays when the next layer
# keeps y anyway (a Linear saves its input): then x need not be kept at all.
# A weight with a zero loses those columns of xhat: nn.functional then keeps the input and calls
# the plain op. xhat is recovered from y as stored, so in fp16/bf16 it carries y's rounding
# (forward outputs are identical).

def _layer_norm_fwd_recompute(x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                              eps: float, rms: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _layer_norm_fwd(x, weight, bias, eps, rms)


layer_norm_fwd_recompute = torch.library.custom_op("fusedtech::layer_norm_fwd_recompute", _layer_norm_fwd_recompute,
                                                   mutates_args=())


@layer_norm_fwd_recompute.register_fake
def _(x, weight, bias, eps, rms):
    rows, acc = math.prod(x.shape[:-1]), stat_dtype(x.dtype)
    return torch.empty_like(x), x.new_empty(rows, dtype=acc), x.new_empty(rows, dtype=acc)


def _recompute_setup_context(ctx, inputs, output):
    _, weight, bias, _, rms = inputs
    y, _, rstd = output
    ctx.save_for_backward(y, weight, bias, rstd)
    ctx.rms = rms


def _recompute_backward(ctx, dy, dmean, drstd):
    y, weight, bias, rstd = ctx.saved_tensors
    if torch.is_grad_enabled() and is_eager(ctx):
        # Double backward needs the input, which this variant did not keep.
        raise RuntimeError("fusedtech: LayerNorm with memory_efficient=True does not support double backward "
                           "(create_graph=True); use memory_efficient=False")
    bwd = _layer_norm_bwd if is_eager(ctx) else layer_norm_bwd
    # mean is not read from the output: rstd stands in for it.
    return _grads(ctx, weight, bias, *bwd(dy, y, weight, bias, rstd, rstd, ctx.rms, True))


layer_norm_fwd_recompute.register_autograd(_recompute_backward, setup_context=_recompute_setup_context)
layer_norm_recompute = eager_fast_path("layer_norm_recompute", layer_norm_fwd_recompute, _layer_norm_fwd_recompute,
                                       _recompute_setup_context, _recompute_backward)
