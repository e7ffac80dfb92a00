"""BatchNorm as torch.library ops: `fusedtech::batch_norm_fwd` (normalises and returns the batch
statistics, from which update_running_stats updates the running ones exactly as torch does) with
autograd through
`fusedtech::batch_norm_bwd`. Backends: triton, cpu (C++) and torch (oracle). On CUDA tensors the
automatic choice is torch's native (cuDNN) batch_norm until the Triton kernels are measured faster
on a GPU (fusedtech.nn.functional); `use_backend("triton")` selects them."""
from __future__ import annotations

from typing import Optional

import torch

from .. import _backend
from ._eager import eager_fast_path, is_eager
from ..reference import batch_norm as reference
from .layer_norm import _as_dtype_of, as_float64



def _triton():
    from ..triton_kernels import batch_norm
    return batch_norm


STATS = _backend.Implementations(
    "batch_norm",
    cuda=lambda: torch.ops.fusedtech_C.batch_norm_stats,
    cpu=lambda: torch.ops.fusedtech_C.batch_norm_stats,
    triton=lambda: _triton().batch_norm_stats,
    torch=lambda: reference.batch_norm_stats)
APPLY = _backend.Implementations(
    "batch_norm",
    cuda=lambda: torch.ops.fusedtech_C.batch_norm_apply,
    cpu=lambda: torch.ops.fusedtech_C.batch_norm_apply,
    triton=lambda: _triton().batch_norm_apply,
    torch=lambda: reference.batch_norm_apply)
BWD = _backend.Implementations(
    "batch_norm",
    cuda=lambda: torch.ops.fusedtech_C.batch_norm_bwd,
    cpu=lambda: torch.ops.fusedtech_C.batch_norm_bwd,
    triton=lambda: _triton().batch_norm_bwd,
    torch=lambda: reference.batch_norm_bwd)
ACT_APPLY = _backend.Implementations(
    "batch_norm",
    cuda=lambda: torch.ops.fusedtech_C.batch_norm_act_apply,
    cpu=lambda: torch.ops.fusedtech_C.batch_norm_act_apply,
    triton=lambda: _triton().batch_norm_act_apply,
    torch=lambda: reference.batch_norm_act_apply)
ACT_BWD = _backend.Implementations(
    "batch_norm",
    cuda=lambda: torch.ops.fusedtech_C.batch_norm_act_bwd,
    cpu=lambda: torch.ops.fusedtech_C.batch_norm_act_bwd,
    triton=lambda: _triton().batch_norm_act_bwd,
    torch=lambda: reference.batch_norm_act_bwd)


def _pick(table, x: torch.Tensor):
    return table.pick(x.device, float64=x.dtype == torch.float64)


def _statistics(x, running_mean, running_var, training: bool, eps: float):
    """(mean, 1/sqrt(var + eps), variance for the running statistics): in training the batch's (the
    normalising variance is biased, the returned one unbiased; one op computes all three), in eval
    the running ones. fp32 (float64 for float64)."""
    if training:
        return _pick(STATS, x)(x, eps)
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    var = running_var.to(acc, copy=True)
    return running_mean.to(acc, copy=True), torch.rsqrt(var + eps), var


def _batch_norm_fwd(x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                   running_mean: Optional[torch.Tensor], running_var: Optional[torch.Tensor], training: bool,
                   eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(y, saved mean, saved 1/sqrt(var + eps), unbiased batch variance): batch statistics in training,
    the given running statistics (read only) in eval. Statistics are fp32 (float64 for float64)."""
    mean, invstd, var = _statistics(x, running_mean, running_var, training, eps)
    y = _pick(APPLY, x)(x, mean, invstd, weight, bias)
    return y, mean, invstd, var


batch_norm_fwd = torch.library.custom_op("fusedtech::batch_norm_fwd", _batch_norm_fwd, mutates_args=())


@batch_norm_fwd.register_fake
def _(x, weight, bias, running_mean, running_var, training, eps):
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    c = x.shape[1]
    return torch.empty_like(x), x.new_empty(c, dtype=acc), x.new_empty(c, dtype=acc), x.new_empty(c, dtype=acc)


def update_running_stats(running_mean, running_var, mean, unbiased, momentum: float) -> None:
    """torch's update, running = (1 - momentum) * running + momentum * batch statistic, with the
    unbiased batch variance (which the statistics op returns): two multi-tensor launches for fp32
    buffers (it was nine separate elementwise ops, most of a small BatchNorm's host time on a GPU).
    Not lerp: its end - (end - start) * (1 - w) form, taken for w >= 0.5, makes an infinite batch
    mean inf - inf = NaN where torch's running mean is inf."""
    with torch.no_grad():
        if running_mean.dtype == mean.dtype and running_var.dtype == unbiased.dtype:
            stats = [running_mean, running_var]
            torch._foreach_mul_(stats, 1.0 - momentum)
            torch._foreach_add_(stats, [mean, unbiased], alpha=momentum)
        else:  # low-precision buffers: blend in the statistics' precision, round once
            for running, batch in ((running_mean, mean), (running_var, unbiased)):
                running.copy_(running.to(batch.dtype) * (1.0 - momentum) + batch * momentum)


def _batch_norm_bwd(dy: torch.Tensor, x: torch.Tensor, weight: Optional[torch.Tensor], mean: torch.Tensor,
                    invstd: torch.Tensor, training: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _pick(BWD, x)(dy, x, weight, mean, invstd, training)


batch_norm_bwd = torch.library.custom_op("fusedtech::batch_norm_bwd", _batch_norm_bwd, mutates_args=())


@batch_norm_bwd.register_fake
def _(dy, x, weight, mean, invstd, training):
    return torch.empty_like(x), torch.empty_like(mean), torch.empty_like(mean)


def _setup_context(ctx, inputs, output):
    x, weight, bias, _, _, training, eps = inputs
    _, mean, invstd, _ = output
    ctx.save_for_backward(x, weight, mean, invstd)
    ctx.training, ctx.eps = training, eps
    ctx.dtypes = (weight.dtype if weight is not None else None, bias.dtype if bias is not None else None)


def _differentiable_grads(ctx, dy, x, weight, bias, mean, invstd, extra, has_residual, activation):
    """(dx, dweight, dbias, dresidual) as a differentiable graph, for backward under create_graph=True:
    the oracle's backward, in float64, on batch statistics recomputed from x with torch ops (in eval
    the running statistics are constants), so autograd records how the gradients depend on x."""
    f64 = as_float64
    xd = f64(x)
    if ctx.training:
        mean, invstd, _ = reference.batch_norm_stats(xd, ctx.eps)
    extra = extra if activation == 1 else f64(extra)  # ReLU's mask, or the residual
    dx, dw, db, dres = reference.batch_norm_act_bwd(f64(dy), xd, f64(weight), f64(bias), f64(mean), f64(invstd),
                                                    extra, has_residual, activation, ctx.training)
    return dx.to(x.dtype), dw, db, dres.to(x.dtype) if dres is not None else None


def _backward(ctx, dy, dmean, dinvstd, dvar):
    x, weight, mean, invstd = ctx.saved_tensors
    if is_eager(ctx) and torch.is_grad_enabled():  # create_graph=True: double backward
        dx, dw, db, _ = _differentiable_grads(ctx, dy, x, weight, None, mean, invstd, None, False, 0)
    else:
        dx, dw, db = (_batch_norm_bwd if is_eager(ctx) else batch_norm_bwd)(dy, x, weight, mean, invstd,
                                                                            ctx.training)
    wdt, bdt = ctx.dtypes
    return (dx, None if wdt is None else dw if dw.dtype == wdt else dw.to(wdt),
            None if bdt is None else db if db.dtype == bdt else db.to(bdt), None, None, None, None)


batch_norm_fwd.register_autograd(_backward, setup_context=_setup_context)
batch_norm = eager_fast_path("batch_norm", batch_norm_fwd, _batch_norm_fwd, _setup_context, _backward)


# ---- BatchNorm + residual add + activation ---------------------------------------------------
# Forward: out = act(bn(x) + residual) in one pass over x (and the residual). Nothing of bn(x) or
# the pre-activation is saved: ReLU keeps a 1-bit mask of where its output is positive (all its
# backward needs), written by the same pass; GELU and SiLU recompute the pre-activation from x and
# the statistics BatchNorm keeps anyway, plus the residual. torch's BN -> add -> act keeps x and a
# full activation for the act's backward. The backward is one op too: the gradient at the
# pre-activation is formed inside BatchNorm's backward passes (Triton) or in one pass before them (C++).
ACTIVATIONS = ("relu", "gelu", "silu", "none")
ACTIVATION_CODES = {"none": 0, "relu": 1, "gelu": 2, "silu": 3}  # the kernels' codes


def _activate(pre, activation):
    """torch's activation (what the CUDA default path composes with torch's BatchNorm)."""
    if activation == "relu":
        return torch.relu(pre)
    if activation == "gelu":
        return torch.nn.functional.gelu(pre)
    if activation == "silu":
        return torch.nn.functional.silu(pre)
    return pre


def _batch_norm_act_fwd(x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                        running_mean: Optional[torch.Tensor], running_var: Optional[torch.Tensor],
                        residual: Optional[torch.Tensor], training: bool, eps: float,
                        activation: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(out, saved mean, saved invstd, unbiased batch variance, ReLU's packed mask or an empty tensor)."""
    mean, invstd, var = _statistics(x, running_mean, running_var, training, eps)
    out, bits = _pick(ACT_APPLY, x)(x, mean, invstd, weight, bias, residual,
                                                 ACTIVATION_CODES[activation])
    return out, mean, invstd, var, bits


batch_norm_act_fwd = torch.library.custom_op("fusedtech::batch_norm_act_fwd", _batch_norm_act_fwd, mutates_args=())


@batch_norm_act_fwd.register_fake
def _(x, weight, bias, running_mean, running_var, residual, training, eps, activation):
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    c = x.shape[1]
    nbits = (x.numel() + 7) // 8 if activation == "relu" else 0
    return (torch.empty_like(x), x.new_empty(c, dtype=acc), x.new_empty(c, dtype=acc), x.new_empty(c, dtype=acc),
            x.new_empty(nbits, dtype=torch.uint8))


def _batch_norm_act_bwd(dy: torch.Tensor, x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                        mean: torch.Tensor, invstd: torch.Tensor, extra: Optional[torch.Tensor], has_residual: bool,
                        activation: int, training: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx, dweight, dbias, dresidual: an empty tensor without a residual)."""
    dx, dw, db, dres = _pick(ACT_BWD, x)(dy, x, weight, bias, mean, invstd, extra, has_residual,
                                                      activation, training)
    return dx, dw, db, dres if dres is not None else x.new_empty(0)


batch_norm_act_bwd = torch.library.custom_op("fusedtech::batch_norm_act_bwd", _batch_norm_act_bwd, mutates_args=())


@batch_norm_act_bwd.register_fake
def _(dy, x, weight, bias, mean, invstd, extra, has_residual, activation, training):
    return (torch.empty_like(x), torch.empty_like(mean), torch.empty_like(mean),
            torch.empty_like(x) if has_residual else x.new_empty(0))


def _act_setup_context(ctx, inputs, output):
    x, weight, bias, _, _, residual, training, eps, activation = inputs
    _, mean, invstd, _, bits = output
    ctx.training, ctx.activation, ctx.has_residual = training, ACTIVATION_CODES[activation], residual is not None
    ctx.eps = eps
    ctx.save_for_backward(x, weight, bias, mean, invstd, bits if activation == "relu" else residual)


def _act_backward(ctx, dy, dmean, dinvstd, dvar, dbits):
    x, weight, bias, mean, invstd, extra = ctx.saved_tensors
    if is_eager(ctx) and torch.is_grad_enabled():  # create_graph=True: double backward
        dx, dw, db, dres = _differentiable_grads(ctx, dy, x, weight, bias, mean, invstd, extra, ctx.has_residual,
                                                 ctx.activation)
    else:
        dx, dw, db, dres = (_batch_norm_act_bwd if is_eager(ctx) else batch_norm_act_bwd)(
            dy, x, weight, bias, mean, invstd, extra, ctx.has_residual, ctx.activation, ctx.training)
    return (dx, _as_dtype_of(dw, weight), _as_dtype_of(db, bias), None, None, dres if ctx.has_residual else None,
            None, None, None)


batch_norm_act_fwd.register_autograd(_act_backward, setup_context=_act_setup_context)
batch_norm_act = eager_fast_path("batch_norm_act", batch_norm_act_fwd, _batch_norm_act_fwd, _act_setup_context,
                                 _act_backward)
