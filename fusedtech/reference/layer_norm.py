"""LayerNorm / RMSNorm oracle over the last dimension of a 2-D (rows, n) view: fp32 statistics and
math for fp32/fp16/bf16 inputs (float64 for float64 inputs, so gradcheck can run), as the kernels
do; also the `torch` backend."""
from __future__ import annotations

import torch


def layer_norm_fwd(x, weight, bias, eps: float, rms: bool):
    """(y in x's dtype, mean [rows] (zeros for RMSNorm), rstd [rows]), statistics in stat_dtype(x)."""
    xf = x.to(stat_dtype(x.dtype))
    if rms:
        mean = torch.zeros(x.shape[0], device=x.device, dtype=xf.dtype)
        rstd = torch.rsqrt(xf.square().mean(dim=1) + eps)
        xhat = xf * rstd[:, None]
    else:
        # The mean of x - x[0], plus x[0] (the kernels' shifted sum): exact for a constant row,
        # whose plain sum / n rounds (x - mean is then that rounding, times 1 / sqrt(eps)).
        shift = xf[:, :1]
        mean = shift[:, 0] + (xf - shift).mean(dim=1)
        var = (xf - mean[:, None]).square().mean(dim=1)
        rstd = torch.rsqrt(var + eps)
        xhat = (xf - mean[:, None]) * rstd[:, None]
    y = xhat
    if weight is not None:
        y = y * weight.to(xf.dtype)
    if bias is not None:
        y = y + bias.to(xf.dtype)
    return y.to(x.dtype), mean, rstd


def stat_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def xhat_from_output(y, weight, bias, acc):
    """The normalised input recovered from the output, xhat = (y - bias) * (1 / weight), in acc: the
    memory-saving backward's input (it keeps y, not x). The kernels take each column's reciprocal
    once and multiply, as here. A zero in the weight loses that column (inf or nan): documented."""
    xhat = y.to(acc)
    if bias is not None:
        xhat = xhat - bias.to(acc)
    if weight is not None:
        xhat = xhat * weight.to(acc).reciprocal()
    return xhat


def layer_norm_bwd(dy, x, weight, bias, mean, rstd, rms: bool, from_output: bool):
    """(dx in x's dtype, dweight or None, dbias (when a bias is given) or None, in the statistics
    dtype). from_output: x is the forward's output y and xhat comes from it (mean is not read)."""
    acc = stat_dtype(x.dtype)
    xf, dyf = x.to(acc), dy.to(acc)
    if from_output:
        xhat = xhat_from_output(x, weight, bias, acc)
    else:
        xhat = (xf if rms else xf - mean[:, None]) * rstd[:, None]
    wdy = dyf * weight.to(acc) if weight is not None else dyf
    n = x.shape[1]
    c1 = (xhat * wdy).sum(dim=1, keepdim=True) / n
    if rms:
        dx = (wdy - xhat * c1) * rstd[:, None]
    else:
        c2 = wdy.sum(dim=1, keepdim=True) / n
        dx = (wdy - (xhat * c1 + c2)) * rstd[:, None]
    dweight = (dyf * xhat).sum(dim=0) if weight is not None else None
    dbias = dyf.sum(dim=0) if bias is not None else None
    return dx.to(x.dtype), dweight, dbias
