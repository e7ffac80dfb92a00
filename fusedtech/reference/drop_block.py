"""DropBlock oracle (torchvision.ops.drop_block2d's semantics with a Philox mask). Block centres
live on the (H - b + 1) x (W - b + 1) grid of each (n, c) plane; centre k of the flattened
(N, C, H - b + 1, W - b + 1) grid is set when its dropout draw (reference/dropout.py) is below
floor(gamma * 2^32). Element (h, w) is dropped when a centre lies in [h - b + 1, h] x [w - b + 1, w]:
torchvision's pad-then-max-pool puts the block below and to the right of its centre."""
from __future__ import annotations

import torch

from .dropout import dropout_draws


def centre_threshold(gamma: float) -> int:
    """A centre is set when its 32-bit draw is below this (2^32 when gamma is 1: every centre)."""
    return int(gamma * 2 ** 32)


def drop_block_keep(x: torch.Tensor, seed: torch.Tensor, gamma: float, block_size: int):
    """(keep: bool with x's shape and strides, True where DropBlock keeps the element; kept: int64
    0-d count)."""
    n, c, h, w = x.shape
    b = block_size
    if x.numel() == 0:  # max_pool2d refuses zero channels
        return torch.empty_like(x, dtype=torch.bool), torch.zeros((), dtype=torch.int64, device=x.device)
    index = torch.arange(n * c * (h - b + 1) * (w - b + 1), device=x.device, dtype=torch.int64)
    centres = dropout_draws(int(seed.item()), index) < centre_threshold(gamma)
    centres = centres.view(n, c, h - b + 1, w - b + 1).float()
    dropped = torch.nn.functional.max_pool2d(torch.nn.functional.pad(centres, [b - 1] * 4), b, stride=1)
    keep = torch.empty_like(x, dtype=torch.bool).copy_(dropped == 0)  # x's strides, as the kernels write it
    return keep, keep.sum()


def drop_block_apply(x: torch.Tensor, keep: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x * (scale where keep, else 0): the product in fp32 (fp64 for fp64 x), rounded once to x's
    dtype; a product, as torchvision's x * mask * scale, so a dropped NaN or inf is NaN."""
    xf = x.to(torch.promote_types(x.dtype, torch.float32))
    return (xf * torch.where(keep.bool(), scale.to(xf.dtype), 0.0)).to(x.dtype)


def drop_block_mask(x: torch.Tensor, seed: torch.Tensor, gamma: float, block_size: int) -> torch.Tensor:
    return drop_block_keep(x, seed, gamma, block_size)[0]


def scale_dtype(dtype: torch.dtype) -> torch.dtype:
    """The scale's dtype: float32, float64 for float64 inputs (torchvision's is x's dtype)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def scale_of(numel: int, kept: torch.Tensor, eps: float, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """numel / (eps + kept) computed in float64 and rounded once to a 0-d tensor of scale_dtype(dtype)."""
    return (numel / (eps + kept.double())).to(scale_dtype(dtype))


def drop_block_keep_scale(x: torch.Tensor, seed: torch.Tensor, gamma: float, block_size: int, eps: float):
    keep, kept = drop_block_keep(x, seed, gamma, block_size)
    return keep, scale_of(x.numel(), kept, eps, x.dtype)
