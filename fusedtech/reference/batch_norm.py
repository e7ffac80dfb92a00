"""BatchNorm oracle over dim 1 of (N, C, *): statistics in fp32 (float64 for float64 input), the
same three primitives as the kernels (statistics, normalisation, backward)."""
from __future__ import annotations

import torch


def _acc(x):
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _dims(x):
    return [0] + list(range(2, x.dim()))


def _per_channel(t, x):
    return t.view([1, -1] + [1] * (x.dim() - 2))


def batch_norm_stats(x):
    """(mean, biased variance) per channel; zeros for an empty batch."""
    xf = x.to(_acc(x))
    if x.numel() == 0:
        return xf.new_zeros(x.shape[1]), xf.new_zeros(x.shape[1])
    return xf.mean(_dims(x)), xf.var(_dims(x), unbiased=False)


def batch_norm_apply(x, mean, invstd, weight, bias):
    xf = x.to(_acc(x))
    y = (xf - _per_channel(mean.to(xf.dtype), x)) * _per_channel(invstd.to(xf.dtype), x)
    if weight is not None:
        y = y * _per_channel(weight.to(xf.dtype), x)
    if bias is not None:
        y = y + _per_channel(bias.to(xf.dtype), x)
    return y.to(x.dtype)


def batch_norm_bwd(dy, x, weight, mean, invstd, training: bool):
    acc = _acc(x)
    xf, g = x.to(acc), dy.to(acc)
    xhat = (xf - _per_channel(mean.to(acc), x)) * _per_channel(invstd.to(acc), x)
    sum_dy, sum_dy_xhat = g.sum(_dims(x)), (g * xhat).sum(_dims(x))
    k = invstd.to(acc) * (weight.to(acc) if weight is not None else 1.0)
    if training:
        count = x.numel() // max(x.shape[1], 1)
        dx = _per_channel(k, x) * (g - _per_channel(sum_dy / count, x) - xhat * _per_channel(sum_dy_xhat / count, x))
    else:
        dx = _per_channel(k, x) * g
    return dx.to(x.dtype), sum_dy_xhat, sum_dy
