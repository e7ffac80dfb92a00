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


def batch_norm_stats(x, eps: float):
    """(mean, 1 / sqrt(biased variance + eps), unbiased variance) per channel: what normalising and
    the running variance take; zero statistics for an empty batch."""
    xf = x.to(_acc(x))
    if x.numel() == 0:
        mean, var, unbiased = (xf.new_zeros(x.shape[1]) for _ in range(3))
    else:
        mean, var = xf.mean(_dims(x)), xf.var(_dims(x), unbiased=False)
        count = x.numel() // x.shape[1]
        unbiased = var * (count / (count - 1)) if count > 1 else var
    return mean, torch.rsqrt(var + eps), unbiased


def batch_norm_apply(x, mean, invstd, weight, bias):
    return _pre_activation(x, mean, invstd, weight, bias, None).to(x.dtype)


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


# ---- BatchNorm + residual add + activation (activation codes: 0 none, 1 relu, 2 gelu, 3 silu) ----
_BITS = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8)


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """bool tensor -> uint8, 8 elements a byte, in logical (row-major) order whatever the layout."""
    flat = mask.reshape(-1)
    flat = torch.nn.functional.pad(flat.to(torch.uint8), (0, (-flat.numel()) % 8))
    return (flat.view(-1, 8) * _BITS.to(mask.device)).sum(1, dtype=torch.uint8)


def unpack_bits(packed: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """The bool mask, laid out like `like` (so that what it selects keeps like's memory format)."""
    bits = (packed[:, None] & _BITS.to(packed.device)) != 0
    return torch.empty_like(like, dtype=torch.bool).copy_(bits.reshape(-1)[:like.numel()].view(like.shape))


def _pre_activation(x, mean, invstd, weight, bias, residual):
    xf = x.to(_acc(x))
    y = (xf - _per_channel(mean.to(xf.dtype), x)) * _per_channel(invstd.to(xf.dtype), x)
    if weight is not None:
        y = y * _per_channel(weight.to(xf.dtype), x)
    if bias is not None:
        y = y + _per_channel(bias.to(xf.dtype), x)
    return y if residual is None else y + residual.to(xf.dtype)


def batch_norm_act_apply(x, mean, invstd, weight, bias, residual, activation: int):
    """(act(bn(x) + residual) in x's dtype, ReLU's packed mask of output > 0 (empty otherwise))."""
    pre = _pre_activation(x, mean, invstd, weight, bias, residual)
    act = {0: lambda t: t, 1: torch.relu, 2: torch.nn.functional.gelu, 3: torch.nn.functional.silu}[activation]
    y = act(pre).to(x.dtype)
    bits = pack_bits(y > 0) if activation == 1 else torch.empty(0, dtype=torch.uint8, device=x.device)
    return y, bits


def batch_norm_act_bwd(dy, x, weight, bias, mean, invstd, extra, has_residual: bool, activation: int, training: bool):
    """(dx, dweight, dbias, dresidual or None); extra: ReLU's packed mask, or the residual."""
    g = dy.to(_acc(x))
    if activation == 1:
        g = torch.where(unpack_bits(extra, dy), g, torch.zeros_like(g))
    elif activation >= 2:
        pre = _pre_activation(x, mean, invstd, weight, bias, extra)
        if activation == 2:
            g = torch.ops.aten.gelu_backward(g, pre)
        else:  # aten's silu_backward formula, in ops that autograd differentiates (it has no double backward)
            sig = torch.sigmoid(pre)
            g = g * sig * (1 + pre * (1 - sig))
    dx, dw, db = batch_norm_bwd(g, x, weight, mean, invstd, training)
    # A copy even where g is dy (no activation, x's dtype): an op's outputs may not alias its inputs.
    return dx, dw, db, g.to(x.dtype, copy=True) if has_residual else None
