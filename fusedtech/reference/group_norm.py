"""GroupNorm oracle over (N, C, *) in G groups of C / G channels, with the activation after it
(codes as BatchNorm's: 0 none, 1 relu, 2 gelu, 3 silu). InstanceNorm is the case G = C.
Statistics in fp32 (float64 for float64 input), biased variance; the output keeps x's memory format."""
from __future__ import annotations

import torch


def _acc(x):
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _per_channel(t, x):
    return t.view([1, -1] + [1] * (x.dim() - 2))


def _groups(t, num_groups: int):
    """t (N, C, *) as (N, G, elements of a group): explicit sizes, as N may be 0."""
    return t.reshape(t.shape[0], num_groups, t[0].numel() // num_groups if t.shape[0] else 0)


def _xhat(xf, mean, rstd, num_groups: int):
    """(x - mean) * rstd with the [N, G] statistics spread over each group's channels and positions."""
    xg = _groups(xf, num_groups)
    return ((xg - mean[..., None].to(xf.dtype)) * rstd[..., None].to(xf.dtype)).reshape(xf.shape)


def _pre_activation(xf, mean, rstd, weight, bias, num_groups: int):
    y = _xhat(xf, mean, rstd, num_groups)
    if weight is not None:
        y = y * _per_channel(weight.to(xf.dtype), xf)
    if bias is not None:
        y = y + _per_channel(bias.to(xf.dtype), xf)
    return y


def activate(pre, activation: int):
    return {0: lambda t: t, 1: torch.relu, 2: torch.nn.functional.gelu, 3: torch.nn.functional.silu}[activation](pre)


def activation_grad(g, pre, activation: int):
    """The gradient at the pre-activation, from the output's gradient g (ops autograd can differentiate
    again, for double backward)."""
    if activation == 1:
        return torch.where(pre > 0, g, torch.zeros_like(g))
    if activation == 2:
        cdf = 0.5 * (1.0 + torch.erf(pre * 0.7071067811865476))
        return g * (cdf + pre * torch.exp(-0.5 * pre * pre) * 0.3989422804014327)
    if activation == 3:
        sig = torch.sigmoid(pre)
        return g * (sig * (1 + pre * (1 - sig)))
    return g


def _like(y, x):
    """y (logical shape of x) in x's dtype and memory format."""
    return torch.empty_like(x).copy_(y)


def group_norm_stats(x, num_groups: int, eps: float):
    """(mean, 1 / sqrt(biased variance + eps)), each [N, G] in fp32 (float64 for float64). A group
    of no elements (an empty spatial size) has mean 0 and variance 0, as torch's."""
    n = x.shape[0]
    xg = _groups(x.to(_acc(x)), num_groups)
    if xg.shape[-1] == 0 or n == 0:
        mean = var = xg.new_zeros(n, num_groups)
    else:
        var, mean = torch.var_mean(xg, dim=-1, correction=0)
    return mean, torch.rsqrt(var + eps)


def group_norm_fwd(x, weight, bias, num_groups: int, eps: float, activation: int):
    """(act(group_norm(x) * weight + bias) in x's dtype and memory format, mean, rstd)."""
    mean, rstd = group_norm_stats(x, num_groups, eps)
    pre = _pre_activation(x.to(_acc(x)), mean, rstd, weight, bias, num_groups)
    return _like(activate(pre, activation), x), mean, rstd


def group_norm_bwd(dy, x, weight, bias, mean, rstd, num_groups: int, activation: int):
    """(dx in x's dtype and memory format, dweight, dbias): the per-channel sums in fp32 (float64),
    always [C] (the glue drops them without a weight / bias). The pre-activation is recomputed from
    x and the saved statistics."""
    acc = _acc(x)
    n, c = x.shape[0], x.shape[1]
    xf, g = x.to(acc), dy.to(acc)
    if activation:
        g = activation_grad(g, _pre_activation(xf, mean, rstd, weight, bias, num_groups), activation)
    xhat = _xhat(xf, mean, rstd, num_groups)
    dims = [0] + list(range(2, x.dim()))
    dweight, dbias = (g * xhat).sum(dims), g.sum(dims)
    wg = g * _per_channel(weight.to(acc), x) if weight is not None else g
    count = x.numel() // max(n * num_groups, 1)
    wg3, xhat3 = _groups(wg, num_groups), _groups(xhat, num_groups)
    c1 = (wg3 * xhat3).sum(-1, keepdim=True) / max(count, 1)
    c2 = wg3.sum(-1, keepdim=True) / max(count, 1)
    dx = (wg3 - (xhat3 * c1 + c2)) * rstd[..., None].to(acc)
    return _like(dx.reshape(x.shape), x), dweight.reshape(c), dbias.reshape(c)
