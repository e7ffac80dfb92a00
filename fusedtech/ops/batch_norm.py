"""BatchNorm as torch.library ops: `fusedtech::batch_norm_fwd` (normalises and returns the batch
statistics, from which update_running_stats updates the running ones exactly as torch does) with
autograd through
`fusedtech::batch_norm_bwd`. Backends: triton, cpu (C++) and torch (oracle). On CUDA tensors the
automatic choice is torch's native (cuDNN) batch_norm until the Triton kernels are measured faster
on a GPU (fusedtech.nn.functional); `use_backend("triton")` selects them."""
from __future__ import annotations

import importlib
from typing import Optional

import torch

from .. import _backend
from ._eager import eager_fast_path, is_eager

IMPLEMENTED = ("triton", "cpu", "torch")


def _impl(name: str, device):
    backend = _backend.select("batch_norm", device, IMPLEMENTED)
    if backend == "cpu":
        return getattr(torch.ops.fusedtech_C, name)
    package = "triton_kernels" if backend == "triton" else "reference"
    return getattr(importlib.import_module(f"fusedtech.{package}.batch_norm"), name)


def _batch_norm_fwd(x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                   running_mean: Optional[torch.Tensor], running_var: Optional[torch.Tensor], training: bool,
                   eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(y, saved mean, saved 1/sqrt(var + eps), biased batch variance): batch statistics in training,
    the given running statistics (read only) in eval. Statistics are fp32 (float64 for float64)."""
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    if training:
        mean, var = _impl("batch_norm_stats", x.device)(x)
    else:
        mean, var = running_mean.to(acc, copy=True), running_var.to(acc, copy=True)
    invstd = torch.rsqrt(var + eps)
    y = _impl("batch_norm_apply", x.device)(x, mean, invstd, weight, bias)
    return y, mean, invstd, var


batch_norm_fwd = torch.library.custom_op("fusedtech::batch_norm_fwd", _batch_norm_fwd, mutates_args=())


@batch_norm_fwd.register_fake
def _(x, weight, bias, running_mean, running_var, training, eps):
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    c = x.shape[1]
    return torch.empty_like(x), x.new_empty(c, dtype=acc), x.new_empty(c, dtype=acc), x.new_empty(c, dtype=acc)


def update_running_stats(running_mean, running_var, mean, var, count: int, momentum: float) -> None:
    """torch's update: momentum * batch statistic + (1 - momentum) * running one, with the unbiased
    batch variance."""
    with torch.no_grad():
        unbiased = var * (count / (count - 1)) if count > 1 else var
        running_mean.copy_(momentum * mean + (1 - momentum) * running_mean)
        running_var.copy_(momentum * unbiased + (1 - momentum) * running_var)


def _batch_norm_bwd(dy: torch.Tensor, x: torch.Tensor, weight: Optional[torch.Tensor], mean: torch.Tensor,
                    invstd: torch.Tensor, training: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _impl("batch_norm_bwd", x.device)(dy, x, weight, mean, invstd, training)


batch_norm_bwd = torch.library.custom_op("fusedtech::batch_norm_bwd", _batch_norm_bwd, mutates_args=())


@batch_norm_bwd.register_fake
def _(dy, x, weight, mean, invstd, training):
    return torch.empty_like(x), torch.empty_like(mean), torch.empty_like(mean)


def _setup_context(ctx, inputs, output):
    x, weight, bias, _, _, training, _ = inputs
    _, mean, invstd, _ = output
    ctx.save_for_backward(x, weight, mean, invstd)
    ctx.training = training
    ctx.dtypes = (weight.dtype if weight is not None else None, bias.dtype if bias is not None else None)


def _backward(ctx, dy, dmean, dinvstd, dvar):
    x, weight, mean, invstd = ctx.saved_tensors
    dx, dw, db = (_batch_norm_bwd if is_eager(ctx) else batch_norm_bwd)(dy, x, weight, mean, invstd, ctx.training)
    wdt, bdt = ctx.dtypes
    return (dx, dw.to(wdt) if wdt is not None else None, db.to(bdt) if bdt is not None else None,
            None, None, None, None)


batch_norm_fwd.register_autograd(_backward, setup_context=_setup_context)
batch_norm = eager_fast_path("batch_norm", batch_norm_fwd, _batch_norm_fwd, _setup_context, _backward)


# ---- BatchNorm + residual add + activation ---------------------------------------------------
# Forward: out = act(bn(x) + residual). Nothing of bn(x) or the pre-activation is saved: ReLU
# keeps a 1-bit mask of where the pre-activation was positive (all its backward needs); GELU and
# SiLU recompute the pre-activation from x and the statistics BatchNorm keeps anyway, plus the
# residual. torch's BN -> add -> act keeps x and a full activation for the act's backward.
ACTIVATIONS = ("relu", "gelu", "silu", "none")


def _activate(pre, activation):
    if activation == "relu":
        return torch.relu(pre)
    if activation == "gelu":
        return torch.nn.functional.gelu(pre)
    if activation == "silu":
        return torch.nn.functional.silu(pre)
    return pre


def _activation_grad(dy, pre, activation):
    if activation == "relu":
        return torch.where(pre > 0, dy, torch.zeros_like(dy))
    if activation == "gelu":
        return torch.ops.aten.gelu_backward(dy, pre)
    if activation == "silu":
        return torch.ops.aten.silu_backward(dy, pre)
    return dy


def _batch_norm_act_fwd(x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                       running_mean: Optional[torch.Tensor], running_var: Optional[torch.Tensor],
                       residual: Optional[torch.Tensor], training: bool, eps: float,
                       activation: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    y, mean, invstd, var = _batch_norm_fwd(x, weight, bias, running_mean, running_var, training, eps)
    pre = y if residual is None else y + residual
    return _activate(pre, activation), mean, invstd, var


batch_norm_act_fwd = torch.library.custom_op("fusedtech::batch_norm_act_fwd", _batch_norm_act_fwd, mutates_args=())


@batch_norm_act_fwd.register_fake
def _(x, weight, bias, running_mean, running_var, residual, training, eps, activation):
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    c = x.shape[1]
    return torch.empty_like(x), x.new_empty(c, dtype=acc), x.new_empty(c, dtype=acc), x.new_empty(c, dtype=acc)


def _batch_norm_apply(x: torch.Tensor, mean: torch.Tensor, invstd: torch.Tensor, weight: Optional[torch.Tensor],
                      bias: Optional[torch.Tensor]) -> torch.Tensor:
    """The normalisation alone (what the activation backward recomputes)."""
    return _impl("batch_norm_apply", x.device)(x, mean, invstd, weight, bias)


batch_norm_apply = torch.library.custom_op("fusedtech::batch_norm_apply", _batch_norm_apply, mutates_args=())


@batch_norm_apply.register_fake
def _(x, mean, invstd, weight, bias):
    return torch.empty_like(x)


_BITS = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8)


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """bool tensor -> uint8, 8 elements a byte (in memory order of the flattened tensor)."""
    flat = mask.reshape(-1)
    flat = torch.nn.functional.pad(flat.to(torch.uint8), (0, (-flat.numel()) % 8))
    return (flat.view(-1, 8) * _BITS.to(mask.device)).sum(1, dtype=torch.uint8)


def unpack_bits(packed: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    bits = (packed[:, None] & _BITS.to(packed.device)) != 0
    return bits.reshape(-1)[:like.numel()].view(like.shape)


def _act_setup_context(ctx, inputs, output):
    x, weight, bias, _, _, residual, training, _, activation = inputs
    out, mean, invstd, _ = output
    ctx.training, ctx.activation, ctx.has_residual = training, activation, residual is not None
    if activation == "relu":
        ctx.save_for_backward(x, weight, bias, mean, invstd, pack_bits(out > 0))
    else:
        ctx.save_for_backward(x, weight, bias, mean, invstd, residual)


def _act_backward(ctx, dy, dmean, dinvstd, dvar):
    x, weight, bias, mean, invstd, extra = ctx.saved_tensors
    eager = is_eager(ctx)
    if ctx.activation == "relu":
        dpre = torch.where(unpack_bits(extra, dy), dy, torch.zeros_like(dy))
    else:
        y = (_batch_norm_apply if eager else batch_norm_apply)(x, mean, invstd, weight, bias)  # recomputed, not saved
        pre = y if extra is None else y + extra
        dpre = _activation_grad(dy, pre, ctx.activation)
    dx, dw, db = (_batch_norm_bwd if eager else batch_norm_bwd)(dpre, x, weight, mean, invstd, ctx.training)
    return (dx, dw.to(weight.dtype) if weight is not None else None, db.to(bias.dtype) if bias is not None else None,
            None, None, dpre if ctx.has_residual else None, None, None, None)


batch_norm_act_fwd.register_autograd(_act_backward, setup_context=_act_setup_context)
batch_norm_act = eager_fast_path("batch_norm_act", batch_norm_act_fwd, _batch_norm_act_fwd, _act_setup_context,
                                 _act_backward)
