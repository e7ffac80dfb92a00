"""Inverted dropout in Triton with the mask drawn by tl.randint(seed, element index) (Philox4x32-10;
csrc/include/fusedtech/philox.h is the same generator in C++): the backward regenerates it, so no
mask is stored. An element is dropped when its 32-bit draw is below floor(p * 2^32)."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .multi_tensor import tl_dtype
from .rounding import round_to

BLOCK = 1024


@triton.jit
def _dropout_kernel(x_ptr, y_ptr, seed_ptr, n, threshold, scale, DTYPE: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    seed = tl.load(seed_ptr)
    r = tl.randint(seed, offs).to(tl.uint32, bitcast=True)
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    y = tl.where(r >= threshold, x * scale, 0.0)
    tl.store(y_ptr + offs, round_to(y, DTYPE), mask=mask)


def threshold(p: float) -> int:
    return min(int(p * 2 ** 32), 2 ** 32 - 1)


def dropout_apply(x: torch.Tensor, p: float, seed: torch.Tensor) -> torch.Tensor:
    x = x.contiguous()
    y = torch.empty_like(x)
    n = x.numel()
    if n:
        _dropout_kernel[(triton.cdiv(n, BLOCK),)](x, y, seed, n, threshold(p), 1.0 / (1.0 - p),
                                                  DTYPE=tl_dtype(x.dtype), BLOCK=BLOCK)
    return y
