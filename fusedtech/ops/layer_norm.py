"""LayerNorm / RMSNorm as torch.library ops: `fusedtech::layer_norm_fwd` (y, mean, rstd: fp32, or
float64 for float64 input)
with autograd through `fusedtech::layer_norm_bwd` (dx, dweight, dbias). Both take a 2-D
contiguous (rows, n) input; fusedtech.nn.functional reshapes any leading shape to it.
`layer_norm` is what eager code calls (ops/_eager.py: the same kernels without the custom-op cost)."""
from __future__ import annotations

import importlib
from typing import Optional

import torch

from .. import _backend
from ._eager import eager_fast_path, is_eager
from ..reference.layer_norm import stat_dtype

IMPLEMENTED = ("cuda", "triton", "cpu", "torch")


def _impl(name: str, device):
    backend = _backend.select("layer_norm", device, IMPLEMENTED)
    if backend in ("cuda", "cpu"):
        return getattr(torch.ops.fusedtech_C, name)
    package = "triton_kernels" if backend == "triton" else "reference"
    return getattr(importlib.import_module(f"fusedtech.{package}.layer_norm"), name)


def _layer_norm_fwd(x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor], eps: float,
                    rms: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    y, mean, rstd = _impl("layer_norm_fwd", x.device)(x, weight, bias, eps, rms)
    return y, mean, rstd


layer_norm_fwd = torch.library.custom_op("fusedtech::layer_norm_fwd", _layer_norm_fwd, mutates_args=())


@layer_norm_fwd.register_fake
def _(x, weight, bias, eps, rms):
    rows, acc = x.shape[0], stat_dtype(x.dtype)
    return torch.empty_like(x), x.new_empty(rows, dtype=acc), x.new_empty(rows, dtype=acc)


def _layer_norm_bwd(dy: torch.Tensor, x: torch.Tensor, weight: Optional[torch.Tensor], mean: torch.Tensor,
                    rstd: torch.Tensor, rms: bool, has_bias: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    dx, dw, db = _impl("layer_norm_bwd", x.device)(dy.contiguous(), x, weight, mean, rstd, rms, has_bias)
    # Absent gradients come back as (distinct) empty tensors: an op's outputs may not alias.
    acc = stat_dtype(x.dtype)
    return (dx, dw if dw is not None else x.new_empty(0, dtype=acc), db if db is not None else x.new_empty(0, dtype=acc))


layer_norm_bwd = torch.library.custom_op("fusedtech::layer_norm_bwd", _layer_norm_bwd, mutates_args=())


@layer_norm_bwd.register_fake
def _(dy, x, weight, mean, rstd, rms, has_bias):
    n, acc = x.shape[1], stat_dtype(x.dtype)
    return (torch.empty_like(x), x.new_empty(n if weight is not None else 0, dtype=acc),
            x.new_empty(n if has_bias else 0, dtype=acc))


def _setup_context(ctx, inputs, output):
    x, weight, bias, eps, rms = inputs
    _, mean, rstd = output
    ctx.save_for_backward(x, weight, mean, rstd)
    ctx.rms = rms
    ctx.has_bias = bias is not None
    ctx.dtypes = (weight.dtype if weight is not None else None, bias.dtype if bias is not None else None)


def _backward(ctx, dy, dmean, drstd):
    x, weight, mean, rstd = ctx.saved_tensors
    bwd = _layer_norm_bwd if is_eager(ctx) else layer_norm_bwd
    dx, dw, db = bwd(dy, x, weight, mean, rstd, ctx.rms, ctx.has_bias)
    wdt, bdt = ctx.dtypes
    return (dx, dw.to(wdt) if weight is not None else None, db.to(bdt) if ctx.has_bias else None, None, None)


layer_norm_fwd.register_autograd(_backward, setup_context=_setup_context)
layer_norm = eager_fast_path("layer_norm", layer_norm_fwd, _layer_norm_fwd, _setup_context, _backward)
