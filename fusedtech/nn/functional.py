"""Fused counterparts of ``torch.nn.functional``."""
from __future__ import annotations

import math

import torch

from ..ops.dropout import dropout_apply, new_seed
from ..ops.layer_norm import layer_norm_fwd


def _norm(input, normalized_shape, weight, bias, eps, rms):
    shape = tuple(normalized_shape) if not isinstance(normalized_shape, int) else (normalized_shape,)
    if tuple(input.shape[input.dim() - len(shape):]) != shape:
        raise RuntimeError(f"fusedtech: input of shape {tuple(input.shape)} does not end in normalized_shape {shape}")
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and tuple(t.shape) != shape:
            raise RuntimeError(f"fusedtech: {name} has shape {tuple(t.shape)}, expected normalized_shape {shape}")
        if t is not None and t.device != input.device:
            raise RuntimeError(f"fusedtech: {name} is on {t.device} but input is on {input.device}")
    n = math.prod(shape)
    # A copy only when the input is not contiguous: the kernels walk rows of n contiguous elements.
    x2 = input.reshape(-1, n)
    if not x2.is_contiguous():
        x2 = x2.contiguous()
    w = weight.reshape(n) if weight is not None else None
    b = bias.reshape(n) if bias is not None else None
    y, _, _ = layer_norm_fwd(x2, w, b, float(eps), rms)
    return y.view(input.shape)


def layer_norm(input, normalized_shape, weight=None, bias=None, eps: float = 1e-5):
    """torch.nn.functional.layer_norm, fused (fp32 statistics, one pass per row)."""
    return _norm(input, normalized_shape, weight, bias, eps, rms=False)


def rms_norm(input, normalized_shape, weight=None, eps=None):
    """torch.nn.functional.rms_norm, fused; eps=None means torch.finfo(input.dtype).eps, as torch."""
    if eps is None:
        eps = torch.finfo(input.dtype).eps
    return _norm(input, normalized_shape, weight, None, eps, rms=True)


def dropout(input, p: float = 0.5, training: bool = True, inplace: bool = False):
    """torch.nn.functional.dropout, fused: the mask is a Philox stream from a seed drawn from
    torch's generator, regenerated in backward (nothing of the input's size is saved)."""
    if p < 0.0 or p > 1.0:
        raise ValueError(f"dropout probability has to be between 0 and 1, but got {p}")
    if not training or p == 0.0:
        return input
    if p == 1.0:
        return input.zero_() if inplace else torch.zeros_like(input)
    out = dropout_apply(input, float(p), new_seed(input.device)).view(input.shape)
    if inplace:
        return input.copy_(out)
    return out
