"""Dropout oracle: the Philox4x32-10 draw of csrc/include/fusedtech/philox.h (and Triton's
tl.randint4x) in plain torch integer ops; element i takes word i % 4 of block i // 4, then inverted dropout in fp32
(float64 for float64)."""
from __future__ import annotations

import torch

M32 = 0xFFFFFFFF


def _mul_parts(a: torch.Tensor, b: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(high, low) 32-bit words of a * b for a < 2^32 (int64 tensor) and a 32-bit constant b,
    without overflowing int64: b is split into 16-bit halves."""
    b_hi, b_lo = b >> 16, b & 0xFFFF
    lo_part = a * b_lo  # < 2^48
    hi_part = a * b_hi  # < 2^48
    high = (hi_part + (lo_part >> 16)) >> 16
    low = (lo_part + ((hi_part & 0xFFFF) << 16)) & M32
    return high & M32, low


def dropout_draws(seed: int, index: torch.Tensor) -> torch.Tensor:
    """Dropout's draw of element i: word i % 4 of the block at counter i // 4."""
    words = torch.stack(philox4(seed, index // 4))
    return words.gather(0, (index % 4).unsqueeze(0)).squeeze(0)


def philox4(seed: int, counter: torch.Tensor, c2: int = 0, c3: int = 0):
    """The four uint32 words (as int64) of the Philox4x32-10 block of each counter (tl.randint4x; with
    the upper counter words c2, c3, tl.philox)."""
    c0, c1 = counter & M32, (counter >> 32) & M32
    c2 = torch.full_like(c0, c2 & M32)
    c3 = torch.full_like(c0, c3 & M32)
    k0, k1 = seed & M32, (seed >> 32) & M32
    for _ in range(10):
        hi_b, lo_b = _mul_parts(c2, 0xCD9E8D57)
        hi_a, lo_a = _mul_parts(c0, 0xD2511F53)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0, k1 = (k0 + 0x9E3779B9) & M32, (k1 + 0xBB67AE85) & M32
    return c0, c1, c2, c3


def keep_mask(shape, p: float, seed: int, device) -> torch.Tensor:
    n = 1
    for s in shape:
        n *= s
    draws = dropout_draws(seed, torch.arange(n, device=device, dtype=torch.int64))
    return (draws >= min(int(p * 2 ** 32), 2 ** 32 - 1)).view(shape)


def dropout_apply(x: torch.Tensor, p: float, seed: torch.Tensor) -> torch.Tensor:
    mask = keep_mask(x.shape, p, int(seed.item()), x.device)
    acc = _math_dtype(x.dtype)
    scale = torch.tensor(1.0 / (1.0 - p), dtype=acc)
    # A product with the mask (not a select), as torch's input * mask / (1 - p): a dropped NaN or inf is NaN.
    return (x.to(acc) * torch.where(mask, scale, 0.0)).to(x.dtype)


def _math_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 math for fp32/fp16/bf16, float64 for float64 (as torch's dropout)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def dropout_add_norm_fwd(x, residual, weight, bias, p: float, eps: float, rms: bool, seed):
    """(out, pre-norm sum, mean, rstd): dropout(x) + residual (rounded to x's dtype, as stored),
    then the LayerNorm/RMSNorm oracle."""
    from .layer_norm import layer_norm_fwd
    acc = _math_dtype(x.dtype)
    s = (dropout_apply(x, p, seed).to(acc) + residual.to(acc)).to(x.dtype)
    out, mean, rstd = layer_norm_fwd(s, weight, bias, eps, rms)
    return out, s, mean, rstd
