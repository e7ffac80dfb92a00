"""Inverted dropout in Triton with the mask drawn by Philox4x32-10 (tl.randint4x; csrc/include/
fusedtech/philox.h is the same generator in C++): element i takes word i % 4 of the block at counter
i // 4. The backward regenerates it, so no mask is stored. An element is dropped when its 32-bit
draw is below floor(p * 2^32)."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .indexing import cdiv, next_power_of_2
from .layer_norm import ROW_TILE, SHORT_ROW, _normalize_rows, _shifted_mean, row_warps
from .multi_tensor import tl_dtype
from .rounding import round_to

BLOCK = 1024


@triton.jit
def draws_for(seed, idx):
    """Dropout's draw for arbitrary element indices: word idx % 4 of the Philox block idx // 4."""
    r0, r1, r2, r3 = tl.randint4x(seed, idx // 4)
    w = idx % 4
    r = tl.where(w == 0, r0, tl.where(w == 1, r1, tl.where(w == 2, r2, r3)))
    return r.to(tl.uint32, bitcast=True)


@triton.jit
def block_draws(seed, first, BLOCK: tl.constexpr):
    """The draws of elements first .. first + BLOCK - 1 (first a multiple of 4): one Philox block
    per four consecutive elements, the four words of block j, interleaved, are the draws of
    elements 4j .. 4j+3 (join twice then flatten puts word 2a+b at position 2a+b)."""
    r0, r1, r2, r3 = tl.randint4x(seed, first // 4 + tl.arange(0, BLOCK // 4))
    return tl.reshape(tl.join(tl.join(r0, r2), tl.join(r1, r3)), [BLOCK]).to(tl.uint32, bitcast=True)


@triton.jit
def _dropout_kernel(x_ptr, y_ptr, seed_ptr, n, threshold, scale, DTYPE: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    r = block_draws(tl.load(seed_ptr), pid * BLOCK, BLOCK)
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    y = x * tl.where(r >= threshold, scale, 0.0)  # a product, not a select: a dropped NaN stays NaN, as torch's
    tl.store(y_ptr + offs, round_to(y, DTYPE), mask=mask)


def threshold(p: float) -> int:
    return min(int(p * 2 ** 32), 2 ** 32 - 1)


def dropout_apply(x: torch.Tensor, p: float, seed: torch.Tensor) -> torch.Tensor:
    x = x.contiguous()
    y = torch.empty_like(x)
    n = x.numel()
    if n:
        _dropout_kernel[(cdiv(n, BLOCK),)](x, y, seed, n, threshold(p), 1.0 / (1.0 - p),
                                                  DTYPE=tl_dtype(x.dtype), BLOCK=BLOCK)
    return y


@triton.jit
def _dropped_sum(x_ptr, res_ptr, idx, mask, seed, threshold, scale, DTYPE: tl.constexpr):
    """dropout(x) + residual at elements idx, in fp32 as stored: rounded as torch's composition
    rounds, the dropout output to x's dtype, then the sum (the next residual, what is normalised)."""
    keep = draws_for(seed, idx) >= threshold
    x = tl.load(x_ptr + idx, mask=mask, other=0.0).to(tl.float32)
    dropped = round_to(x * tl.where(keep, scale, 0.0), DTYPE).to(tl.float32)
    s = dropped + tl.load(res_ptr + idx, mask=mask, other=0.0).to(tl.float32)
    return round_to(s, DTYPE).to(tl.float32)


@triton.jit
def _dropout_add_norm_kernel(x_ptr, res_ptr, w_ptr, b_ptr, out_ptr, sum_ptr, mean_ptr, rstd_ptr, seed_ptr, n, eps,
                             threshold, scale, DTYPE: tl.constexpr, RMS: tl.constexpr, HAS_WEIGHT: tl.constexpr,
                             HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr):
    """One row: s = dropout(x) + residual (mask from (seed, flat element index)), stored for the
    next residual and for backward; then LayerNorm/RMSNorm of s. The row stays in registers."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n
    idx = row * n + cols
    seed = tl.load(seed_ptr)
    s = _dropped_sum(x_ptr, res_ptr, idx, mask, seed, threshold, scale, DTYPE)
    tl.store(sum_ptr + idx, round_to(s, DTYPE), mask=mask)
    if RMS:
        mean = 0.0
    else:  # the shifted mean (layer_norm's _shifted_mean), the row's first sum computed again alone
        mean = _shifted_mean(s, _dropped_sum(x_ptr, res_ptr, row * n, True, seed, threshold, scale, DTYPE), mask, n)
    d = tl.where(mask, s - mean, 0.0)
    rstd = 1.0 / tl.sqrt_rn(tl.sum(d * d, axis=0) / n + eps)
    y = d * rstd
    if HAS_WEIGHT:
        y = y * tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        y = y + tl.load(b_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + idx, round_to(y, DTYPE), mask=mask)
    tl.store(mean_ptr + row, mean)
    tl.store(rstd_ptr + row, rstd)


@triton.jit
def _dropout_add_norm_rows_kernel(x_ptr, res_ptr, w_ptr, b_ptr, out_ptr, sum_ptr, mean_ptr, rstd_ptr, seed_ptr, rows,
                                  n, eps, threshold, scale, DTYPE: tl.constexpr, RMS: tl.constexpr,
                                  HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, ROWS: tl.constexpr,
                                  BLOCK: tl.constexpr):
    """_dropout_add_norm_kernel for short rows (as layer_norm's _fwd_rows_kernel): ROWS rows a
    program, the same draws, roundings and statistics per row."""
    r = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK)
    rmask = r < rows
    cmask = cols < n
    mask = rmask[:, None] & cmask[None, :]
    idx = r[:, None] * n + cols[None, :]
    seed = tl.load(seed_ptr)
    s = _dropped_sum(x_ptr, res_ptr, idx, mask, seed, threshold, scale, DTYPE)
    tl.store(sum_ptr + idx, round_to(s, DTYPE), mask=mask)
    s0 = _dropped_sum(x_ptr, res_ptr, r * n, rmask, seed, threshold, scale, DTYPE)  # each row's first sum
    _normalize_rows(s, s0, r, cols, rmask, cmask, n, eps, w_ptr, b_ptr, out_ptr, mean_ptr, rstd_ptr, DTYPE, RMS,
                    HAS_WEIGHT, HAS_BIAS, ROWS)


MAX_FUSED_ROW = 16384


def dropout_add_norm_fwd(x, residual, weight, bias, p: float, eps: float, rms: bool, seed):
    """(out, pre-norm sum, mean, rstd) for 2-D contiguous x and residual."""
    rows, n = x.shape
    if n > MAX_FUSED_ROW:  # long rows: dropout + add here, then the split-row LayerNorm kernels
        from .layer_norm import layer_norm_fwd
        s = (dropout_apply(x, p, seed).float() + residual.float()).to(x.dtype)
        out, mean, rstd = layer_norm_fwd(s, weight, bias, eps, rms)
        return out, s, mean, rstd
    out, s = torch.empty_like(x), torch.empty_like(x)
    mean = torch.empty(rows, device=x.device, dtype=torch.float32)
    rstd = torch.empty(rows, device=x.device, dtype=torch.float32)
    if rows and n:
        block = next_power_of_2(n)
        flags = dict(DTYPE=tl_dtype(x.dtype), RMS=rms, HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None)
        if block <= SHORT_ROW:  # a tile of rows per program, as layer_norm's short rows
            tile_rows = ROW_TILE // block
            _dropout_add_norm_rows_kernel[(cdiv(rows, tile_rows),)](
                x, residual, weight if weight is not None else x, bias if bias is not None else x, out, s, mean, rstd,
                seed, rows, n, eps, threshold(p), 1.0 / (1.0 - p), ROWS=tile_rows, BLOCK=block, **flags)
            return out, s, mean, rstd
        _dropout_add_norm_kernel[(rows,)](x, residual, weight if weight is not None else x, bias if bias is not None else x,
                                          out, s, mean, rstd, seed, n, eps, threshold(p), 1.0 / (1.0 - p),
                                          BLOCK=block, num_warps=row_warps(block, 16, 4), **flags)
    return out, s, mean, rstd
