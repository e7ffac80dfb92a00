"""BatchNorm over dim 1 of (N, C, *) in Triton, NCHW or channels_last through one strided
(N, C, S) view: per-channel statistics (each channel split into slices over enough programs to fill
a GPU; in a slice each lane keeps its own Welford count, mean and M2, merged once at the end, and the
slices are merged in order with Chan's parallel-variance formula: one read, deterministic), the
normalisation, and the backward (per-slice sums of dy and dy * xhat, summed in order, then dx)."""
from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl

from .indexing import cdiv, divisor, fast_divmod, needs_wide, next_power_of_2
from .multi_tensor import tl_dtype
from .rounding import round_to

BLOCK = 1024
# Sizes S and C reach the kernels as divisor() tuples (size, magic, shift1, shift2): every element's
# logical index is split by fast_divmod (triton_kernels/indexing.py), not by a division.


@triton.jit
def _chan_merge(count_a, mean_a, m2_a, count_b, mean_b, m2_b):
    """(count, mean, M2) of two sets merged (Chan et al.'s parallel variance); either set may be
    empty (count 0). Every statistics kernel merges with this: tl.reduce over lanes, then slices."""
    count = count_a + count_b
    frac = tl.where(count > 0.0, count_b / tl.maximum(count, 1.0), 0.0)
    delta = mean_b - mean_a
    # An infinite mean on either side is the merged one (mean_a + mean_b: inf + finite = inf, inf +
    # -inf = NaN, as torch's sum), where mean_a + delta * frac would be inf - inf = NaN; that side's
    # M2 is already NaN.
    infinite = (tl.abs(mean_a) == float("inf")) | (tl.abs(mean_b) == float("inf"))
    mean = tl.where(infinite, mean_a + mean_b, mean_a + delta * frac)
    # (delta * frac) * (delta * count_a): an empty side gives 0 * finite, where delta * delta can
    # overflow (|mean| > 1.8e19) and make inf * 0 = NaN of a channel torch normalises.
    return count, mean, m2_a + m2_b + (delta * frac) * (delta * count_a)


@triton.jit
def _welford_lanes(count, mean, m2, x, mask, rstep):
    """One Welford step per lane (masked lanes unchanged). Only a slice's last step can be partial,
    so every active lane holds the same count: rstep = 1 / that count is one scalar, not a division
    per element."""
    count += mask.to(tl.float32)
    delta = tl.where(mask, x - mean, 0.0)
    # A lane's mean once infinite stays so (torch's sum: inf + finite = inf, inf + -inf = NaN), where
    # the Welford step makes it inf - inf = NaN; its M2 turned NaN when the infinity came in.
    stuck = (tl.abs(mean) == float("inf")) & mask
    mean = tl.where(stuck, mean + x, mean + delta * rstep)
    return count, mean, m2 + delta * (x - mean)


@triton.jit
def _stats_kernel(x_ptr, part_ptr, NS, S, S_m, S_1, S_2, sN, sC, sS, CHUNK, SPLIT, WIDE: tl.constexpr,
                  BLOCK: tl.constexpr):
    """Program (c, p): count, mean and M2 of channel c over its p-th slice of CHUNK elements. No
    reduction in the loop (a block-wide one per step stalled every load behind a barrier): each lane
    updates its own statistics, merged once at the end."""
    c = tl.program_id(0).to(tl.int64)
    p = tl.program_id(1).to(tl.int64)
    begin = p * CHUNK
    end = tl.minimum(begin + CHUNK, NS)
    count = tl.zeros([BLOCK], dtype=tl.float32)
    mean = tl.zeros([BLOCK], dtype=tl.float32)
    m2 = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(begin, end, BLOCK):
        j = start + tl.arange(0, BLOCK).to(tl.int64)
        mask = j < end
        n, s = fast_divmod(j, S, S_m, S_1, S_2, WIDE)  # j-th element of the channel: (n, s)
        x = tl.load(x_ptr + n * sN + c * sC + s * sS, mask=mask, other=0.0).to(tl.float32)
        rstep = 1.0 / ((start - begin) // BLOCK + 1).to(tl.float32)
        count, mean, m2 = _welford_lanes(count, mean, m2, x, mask, rstep)
    count, mean, m2 = tl.reduce((count, mean, m2), 0, _chan_merge)
    out = part_ptr + (c * SPLIT + p) * 3
    tl.store(out, count)
    tl.store(out + 1, mean)
    tl.store(out + 2, m2)


@triton.jit
def _stats_combine_kernel(part_ptr, mean_ptr, invstd_ptr, unbiased_ptr, SPLIT, eps):
    """Channel c: its SPLIT partials merged in order (Chan's formula again): deterministic. Writes
    the mean, 1 / sqrt(biased variance + eps) and the unbiased variance (the running variance's)."""
    c = tl.program_id(0).to(tl.int64)
    count = 0.0
    mean = 0.0
    m2 = 0.0
    for p in range(0, SPLIT):
        part = part_ptr + (c * SPLIT + p) * 3
        count, mean, m2 = _chan_merge(count, mean, m2, tl.load(part), tl.load(part + 1), tl.load(part + 2))
    var = m2 / count
    tl.store(mean_ptr + c, mean)
    tl.store(invstd_ptr + c, tl.math.div_rn(1.0, tl.sqrt_rn(var + eps)))
    tl.store(unbiased_ptr + c, tl.where(count > 1.0, m2 / tl.maximum(count - 1.0, 1.0), var))


# Activations after BatchNorm (and an optional residual add), by the codes of
# fusedtech.ops.batch_norm.ACTIVATION_CODES (0 none, 1 relu, 2 gelu, 3 silu), as the C++ kernels.


@triton.jit
def _activate(pre, ACT: tl.constexpr):
    if ACT == 1:
        return tl.maximum(pre, 0.0)
    elif ACT == 2:  # exact GELU, x Phi(x)
        return 0.5 * pre * (1.0 + tl.erf(pre * 0.7071067811865476))
    elif ACT == 3:
        return pre * tl.sigmoid(pre)
    else:
        return pre


@triton.jit
def _grad_pre(g, x, k, addr, mask, mean, invstd, w, b, bits_ptr, res_ptr, ACT: tl.constexpr, LOAD_RES: tl.constexpr):
    """The gradient at the pre-activation bn(x) + residual: ReLU reads its bit (logical element k);
    GELU and SiLU recompute the pre-activation exactly as the forward did."""
    if ACT == 1:
        byte = tl.load(bits_ptr + k // 8, mask=mask, other=0).to(tl.int32)
        return tl.where(((byte >> (k % 8).to(tl.int32)) & 1) != 0, g, 0.0)
    elif ACT >= 2:
        pre = (x - mean) * invstd * w + b
        if LOAD_RES:
            pre += tl.load(res_ptr + addr, mask=mask, other=0.0).to(tl.float32)
        if ACT == 2:
            cdf = 0.5 * (1.0 + tl.erf(pre * 0.7071067811865476))
            return g * (cdf + pre * tl.exp(-0.5 * pre * pre) * 0.3989422804014327)
        else:
            sig = tl.sigmoid(pre)
            return g * (sig * (1.0 + pre * (1.0 - sig)))
    else:
        return g


@triton.jit
def _apply_kernel(x_ptr, y_ptr, mean_ptr, invstd_ptr, w_ptr, b_ptr, res_ptr, bits_ptr, total, C, C_m, C_1, C_2, S,
                  S_m, S_1, S_2, sN, sC, sS, DTYPE: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
                  HAS_RES: tl.constexpr, ACT: tl.constexpr, WIDE: tl.constexpr, BLOCK: tl.constexpr):
    """y = act(bn(x) + residual); for ReLU also bit k % 8 of bits[k // 8] = y[k] > 0 (logical order k)."""
    k = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)  # logical (n, c, s) order
    mask = k < total
    ns, s = fast_divmod(k, S, S_m, S_1, S_2, WIDE)
    n, c = fast_divmod(ns, C, C_m, C_1, C_2, WIDE)
    addr = n * sN + c * sC + s * sS
    x = tl.load(x_ptr + addr, mask=mask, other=0.0).to(tl.float32)
    y = (x - tl.load(mean_ptr + c, mask=mask, other=0.0)) * tl.load(invstd_ptr + c, mask=mask, other=0.0)
    if HAS_WEIGHT:
        y = y * tl.load(w_ptr + c, mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        y = y + tl.load(b_ptr + c, mask=mask, other=0.0).to(tl.float32)
    if HAS_RES:
        y = y + tl.load(res_ptr + addr, mask=mask, other=0.0).to(tl.float32)
    out = round_to(_activate(y, ACT), DTYPE)
    tl.store(y_ptr + addr, out, mask=mask)
    if ACT == 1:  # the mask ReLU's backward needs (torch's: output > 0), 8 elements a byte
        on = ((out > 0) & mask).to(tl.int32)
        byte = tl.sum(tl.reshape(on, (BLOCK // 8, 8)) << tl.arange(0, 8)[None, :], axis=1)
        i = tl.program_id(0).to(tl.int64) * (BLOCK // 8) + tl.arange(0, BLOCK // 8)
        tl.store(bits_ptr + i, byte.to(tl.uint8), mask=i < (total + 7) // 8)


@triton.jit
def _bwd_reduce_kernel(dy_ptr, x_ptr, mean_ptr, invstd_ptr, w_ptr, b_ptr, res_ptr, bits_ptr, part_ptr, NS, S, S_m,
                       S_1, S_2, sN, sC, sS, CHUNK, SPLIT, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
                       LOAD_RES: tl.constexpr, ACT: tl.constexpr, WIDE: tl.constexpr, BLOCK: tl.constexpr):
    """Program (c, p): sums of g and g * xhat over channel c's p-th slice, into part[0|1, c, p], where g
    is the gradient at the pre-activation (dy itself without an activation)."""
    c = tl.program_id(0).to(tl.int64)
    p = tl.program_id(1).to(tl.int64)
    C = tl.num_programs(0)
    begin = p * CHUNK
    end = tl.minimum(begin + CHUNK, NS)
    mean = tl.load(mean_ptr + c)
    invstd = tl.load(invstd_ptr + c)
    w = tl.load(w_ptr + c).to(tl.float32) if HAS_WEIGHT else 1.0
    b = tl.load(b_ptr + c).to(tl.float32) if HAS_BIAS else 0.0
    acc_dy = tl.zeros([BLOCK], dtype=tl.float32)
    acc_dyx = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(begin, end, BLOCK):
        j = start + tl.arange(0, BLOCK).to(tl.int64)
        mask = j < end
        n, s = fast_divmod(j, S, S_m, S_1, S_2, WIDE)  # j-th element of the channel: (n, s)
        addr = n * sN + c * sC + s * sS
        k = n * (C * S) + c * S + s
        x = tl.load(x_ptr + addr, mask=mask, other=0.0).to(tl.float32)
        g = tl.load(dy_ptr + addr, mask=mask, other=0.0).to(tl.float32)
        g = _grad_pre(g, x, k, addr, mask, mean, invstd, w, b, bits_ptr, res_ptr, ACT, LOAD_RES)
        acc_dy += g
        acc_dyx += tl.where(mask, g * (x - mean) * invstd, 0.0)
    tl.store(part_ptr + c * SPLIT + p, tl.sum(acc_dy, axis=0))
    tl.store(part_ptr + (C + c) * SPLIT + p, tl.sum(acc_dyx, axis=0))


@triton.jit
def _bwd_apply_kernel(dy_ptr, x_ptr, dx_ptr, dres_ptr, mean_ptr, invstd_ptr, w_ptr, b_ptr, res_ptr, bits_ptr,
                      sum_dy_ptr, sum_dy_xhat_ptr, total, C, C_m, C_1, C_2, S, S_m, S_1, S_2, sN, sC, sS, count,
                      DTYPE: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, LOAD_RES: tl.constexpr,
                      WRITE_DRES: tl.constexpr, ACT: tl.constexpr, TRAINING: tl.constexpr, WIDE: tl.constexpr,
                      BLOCK: tl.constexpr):
    k = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = k < total
    ns, s = fast_divmod(k, S, S_m, S_1, S_2, WIDE)
    n, c = fast_divmod(ns, C, C_m, C_1, C_2, WIDE)
    addr = n * sN + c * sC + s * sS
    x = tl.load(x_ptr + addr, mask=mask, other=0.0).to(tl.float32)
    mean = tl.load(mean_ptr + c, mask=mask, other=0.0)
    invstd = tl.load(invstd_ptr + c, mask=mask, other=0.0)
    w = tl.load(w_ptr + c, mask=mask, other=0.0).to(tl.float32) if HAS_WEIGHT else 1.0
    b = tl.load(b_ptr + c, mask=mask, other=0.0).to(tl.float32) if HAS_BIAS else 0.0
    g = tl.load(dy_ptr + addr, mask=mask, other=0.0).to(tl.float32)
    g = _grad_pre(g, x, k, addr, mask, mean, invstd, w, b, bits_ptr, res_ptr, ACT, LOAD_RES)
    if WRITE_DRES:  # the residual's gradient is the pre-activation's
        tl.store(dres_ptr + addr, round_to(g, DTYPE), mask=mask)
    scale = invstd * w
    if TRAINING:
        xhat = (x - mean) * invstd
        mean_dy = tl.load(sum_dy_ptr + c, mask=mask, other=0.0) / count
        mean_dyx = tl.load(sum_dy_xhat_ptr + c, mask=mask, other=0.0) / count
        dx = scale * (g - mean_dy - xhat * mean_dyx)
    else:
        dx = scale * g
    tl.store(dx_ptr + addr, round_to(dx, DTYPE), mask=mask)


# ---- channels_last (NHWC) ---------------------------------------------------------------------
# A dense channels_last input is an (R = N*S, C) row-major matrix. The kernels above walk elements
# in logical (n, c, s) order, which reads it with a stride of C elements: a sector per element on a
# GPU. These walk [rows, channels] tiles with the channels contiguous. Their partial sums have the
# layout of the kernels above (the combine and apply steps are shared); ReLU's mask keeps its
# logical-order bits (bit k of the mask is logical element k on every backend): a tile writes a
# byte per (channel, 8 rows), which is 8 logical neighbours when S % 8 == 0 (else the logical-order
# apply kernel runs).


@triton.jit
def _stats_rows_kernel(x_ptr, part_ptr, R, C, CHUNK, SPLIT, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """Program (channel block, p): count, mean and M2 of each channel over rows [p CHUNK, (p+1) CHUNK)."""
    c = tl.program_id(0).to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C)
    p = tl.program_id(1).to(tl.int64)
    cmask = c < C
    begin = p * CHUNK
    end = tl.minimum(begin + CHUNK, R)
    count = tl.zeros([BLOCK_R, BLOCK_C], dtype=tl.float32)
    mean = tl.zeros([BLOCK_R, BLOCK_C], dtype=tl.float32)
    m2 = tl.zeros([BLOCK_R, BLOCK_C], dtype=tl.float32)
    for start in range(begin, end, BLOCK_R):  # as _stats_kernel: a Welford step per tile element
        r = start + tl.arange(0, BLOCK_R).to(tl.int64)
        mask = (r < end)[:, None] & cmask[None, :]
        x = tl.load(x_ptr + r[:, None] * C + c[None, :], mask=mask, other=0.0).to(tl.float32)
        rstep = 1.0 / ((start - begin) // BLOCK_R + 1).to(tl.float32)
        count, mean, m2 = _welford_lanes(count, mean, m2, x, mask, rstep)
    count, mean, m2 = tl.reduce((count, mean, m2), 0, _chan_merge)
    out = part_ptr + (c * SPLIT + p) * 3
    tl.store(out, count, mask=cmask)
    tl.store(out + 1, mean, mask=cmask)
    tl.store(out + 2, m2, mask=cmask)


@triton.jit
def _apply_rows_kernel(x_ptr, y_ptr, mean_ptr, invstd_ptr, w_ptr, b_ptr, res_ptr, bits_ptr, R, C, S, S_m, S_1, S_2,
                       DTYPE: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr,
                       ACT: tl.constexpr, WIDE: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """y = act(bn(x) + residual) over a [rows, channels] tile; for ReLU (S % 8 == 0) the mask bytes."""
    r = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    c = tl.program_id(1).to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = c < C
    mask = (r < R)[:, None] & cmask[None, :]
    addr = r[:, None] * C + c[None, :]
    x = tl.load(x_ptr + addr, mask=mask, other=0.0).to(tl.float32)
    mean = tl.load(mean_ptr + c, mask=cmask, other=0.0)
    invstd = tl.load(invstd_ptr + c, mask=cmask, other=0.0)
    y = (x - mean[None, :]) * invstd[None, :]
    if HAS_WEIGHT:
        y = y * tl.load(w_ptr + c, mask=cmask, other=0.0).to(tl.float32)[None, :]
    if HAS_BIAS:
        y = y + tl.load(b_ptr + c, mask=cmask, other=0.0).to(tl.float32)[None, :]
    if HAS_RES:
        y = y + tl.load(res_ptr + addr, mask=mask, other=0.0).to(tl.float32)
    out = round_to(_activate(y, ACT), DTYPE)
    tl.store(y_ptr + addr, out, mask=mask)
    if ACT == 1:  # rows 8g .. 8g+7 are s .. s+7 of one image: bit t of the byte at logical element k
        on = ((out > 0) & mask).to(tl.int32)
        byte = tl.sum(tl.reshape(on, (BLOCK_R // 8, 8, BLOCK_C)) << tl.arange(0, 8)[None, :, None], axis=1)
        first = tl.program_id(0).to(tl.int64) * BLOCK_R + 8 * tl.arange(0, BLOCK_R // 8)
        n, s = fast_divmod(first, S, S_m, S_1, S_2, WIDE)
        k = (n * C * S + s)[:, None] + (c * S)[None, :]
        tl.store(bits_ptr + k // 8, byte.to(tl.uint8), mask=(first < R)[:, None] & cmask[None, :])


@triton.jit
def _relu_bits_rows(bits_ptr, first, c, mask, C, S, S_m, S_1, S_2, WIDE: tl.constexpr, BLOCK_R: tl.constexpr,
                    BLOCK_C: tl.constexpr):
    """ReLU's kept-bits of a [BLOCK_R, BLOCK_C] tile whose first row is a multiple of 8 (S % 8 == 0):
    rows 8g .. 8g+7 are 8 logical neighbours, one mask byte per (8 rows, channel), as
    _apply_rows_kernel wrote it; a byte load and a division per 8 elements instead of per element."""
    first8 = first + 8 * tl.arange(0, BLOCK_R // 8).to(tl.int64)
    n, s = fast_divmod(first8, S, S_m, S_1, S_2, WIDE)
    byte_at = (n * C * S + s)[:, None] // 8 + (c * (S // 8))[None, :]
    rows8 = tl.max(tl.reshape(mask.to(tl.int32), (BLOCK_R // 8, 8, BLOCK_C)), axis=1) != 0
    byte = tl.load(bits_ptr + byte_at, mask=rows8, other=0).to(tl.int32)
    on = (byte[:, None, :] >> tl.arange(0, 8)[None, :, None]) & 1
    return tl.reshape(on, (BLOCK_R, BLOCK_C)) != 0


@triton.jit
def _bwd_reduce_rows_kernel(dy_ptr, x_ptr, mean_ptr, invstd_ptr, w_ptr, b_ptr, res_ptr, bits_ptr, part_ptr, R, C, S,
                            S_m, S_1, S_2, CHUNK, SPLIT, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
                            LOAD_RES: tl.constexpr, ACT: tl.constexpr, BYTE_ROWS: tl.constexpr, WIDE: tl.constexpr,
                            BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """Program (channel block, p): per channel, sums of g and g * xhat over rows [p CHUNK, (p+1) CHUNK)."""
    c = tl.program_id(0).to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C)
    p = tl.program_id(1).to(tl.int64)
    cmask = c < C
    begin = p * CHUNK
    end = tl.minimum(begin + CHUNK, R)
    mean = tl.load(mean_ptr + c, mask=cmask, other=0.0)[None, :]
    invstd = tl.load(invstd_ptr + c, mask=cmask, other=0.0)[None, :]
    w = tl.load(w_ptr + c, mask=cmask, other=0.0).to(tl.float32)[None, :] if HAS_WEIGHT else 1.0
    b = tl.load(b_ptr + c, mask=cmask, other=0.0).to(tl.float32)[None, :] if HAS_BIAS else 0.0
    acc_dy = tl.zeros([BLOCK_R, BLOCK_C], dtype=tl.float32)
    acc_dyx = tl.zeros([BLOCK_R, BLOCK_C], dtype=tl.float32)
    for start in range(begin, end, BLOCK_R):
        r = start + tl.arange(0, BLOCK_R).to(tl.int64)
        mask = (r < end)[:, None] & cmask[None, :]
        addr = r[:, None] * C + c[None, :]
        x = tl.load(x_ptr + addr, mask=mask, other=0.0).to(tl.float32)
        g = tl.load(dy_ptr + addr, mask=mask, other=0.0).to(tl.float32)
        if ACT == 1 and BYTE_ROWS:
            g = tl.where(_relu_bits_rows(bits_ptr, start, c, mask, C, S, S_m, S_1, S_2, WIDE, BLOCK_R, BLOCK_C), g, 0.0)
        else:
            n, s = fast_divmod(r, S, S_m, S_1, S_2, WIDE)
            k = (n * C * S + s)[:, None] + (c * S)[None, :]
            g = _grad_pre(g, x, k, addr, mask, mean, invstd, w, b, bits_ptr, res_ptr, ACT, LOAD_RES)
        acc_dy += g
        acc_dyx += tl.where(mask, g * (x - mean) * invstd, 0.0)
    tl.store(part_ptr + c * SPLIT + p, tl.sum(acc_dy, axis=0), mask=cmask)
    tl.store(part_ptr + (C + c) * SPLIT + p, tl.sum(acc_dyx, axis=0), mask=cmask)


@triton.jit
def _bwd_apply_rows_kernel(dy_ptr, x_ptr, dx_ptr, dres_ptr, mean_ptr, invstd_ptr, w_ptr, b_ptr, res_ptr, bits_ptr,
                           sum_dy_ptr, sum_dy_xhat_ptr, R, C, S, S_m, S_1, S_2, count, DTYPE: tl.constexpr,
                           HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, LOAD_RES: tl.constexpr,
                           WRITE_DRES: tl.constexpr, ACT: tl.constexpr, BYTE_ROWS: tl.constexpr,
                           TRAINING: tl.constexpr, WIDE: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    r = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    c = tl.program_id(1).to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = c < C
    mask = (r < R)[:, None] & cmask[None, :]
    addr = r[:, None] * C + c[None, :]
    x = tl.load(x_ptr + addr, mask=mask, other=0.0).to(tl.float32)
    mean = tl.load(mean_ptr + c, mask=cmask, other=0.0)[None, :]
    invstd = tl.load(invstd_ptr + c, mask=cmask, other=0.0)[None, :]
    w = tl.load(w_ptr + c, mask=cmask, other=0.0).to(tl.float32)[None, :] if HAS_WEIGHT else 1.0
    b = tl.load(b_ptr + c, mask=cmask, other=0.0).to(tl.float32)[None, :] if HAS_BIAS else 0.0
    g = tl.load(dy_ptr + addr, mask=mask, other=0.0).to(tl.float32)
    if ACT == 1 and BYTE_ROWS:
        first = tl.program_id(0).to(tl.int64) * BLOCK_R
        g = tl.where(_relu_bits_rows(bits_ptr, first, c, mask, C, S, S_m, S_1, S_2, WIDE, BLOCK_R, BLOCK_C), g, 0.0)
    else:
        n, s = fast_divmod(r, S, S_m, S_1, S_2, WIDE)
        k = (n * C * S + s)[:, None] + (c * S)[None, :]
        g = _grad_pre(g, x, k, addr, mask, mean, invstd, w, b, bits_ptr, res_ptr, ACT, LOAD_RES)
    if WRITE_DRES:
        tl.store(dres_ptr + addr, round_to(g, DTYPE), mask=mask)
    scale = invstd * w
    if TRAINING:
        xhat = (x - mean) * invstd
        mean_dy = tl.load(sum_dy_ptr + c, mask=cmask, other=0.0)[None, :] / count
        mean_dyx = tl.load(sum_dy_xhat_ptr + c, mask=cmask, other=0.0)[None, :] / count
        dx = scale * (g - mean_dy - xhat * mean_dyx)
    else:
        dx = scale * g
    tl.store(dx_ptr + addr, round_to(dx, DTYPE), mask=mask)


def _rows_layout(C: int, S: int, strides) -> bool:
    """True for a dense channels_last input (an (N*S, C) row-major matrix) with C > 1 and S > 1."""
    sN, sC, sS = strides
    return C > 1 and S > 1 and sC == 1 and sS == C and sN == S * C


@functools.lru_cache(maxsize=1024)
def _tile(C: int) -> tuple[int, int]:
    """(BLOCK_R, BLOCK_C): up to 128 channels, 2048 elements a tile, rows a multiple of 8."""
    block_c = min(next_power_of_2(C), 128)
    return max(8, 2048 // block_c), block_c


@functools.lru_cache(maxsize=1024)
def _split_rows(R: int, C: int) -> tuple[int, int, int, int]:
    """(BLOCK_R, BLOCK_C, row slices, rows per slice: a multiple of BLOCK_R), about TARGET_PROGRAMS programs."""
    block_r, block_c = _tile(C)
    split = max(1, min(cdiv(R, block_r), cdiv(TARGET_PROGRAMS, cdiv(C, block_c))))
    chunk = cdiv(cdiv(R, split), block_r) * block_r
    return block_r, block_c, cdiv(R, chunk), chunk


# (shape, strides) -> (copy first?, N, C, S, (sN, sC, sS)): the layout is worked out once per
# shape and strides (a few us of Python, three times per BatchNorm forward+backward otherwise).
_views: dict = {}


def _view(x: torch.Tensor):
    """(x, N, C, S, strides) with the trailing dims one uniformly strided run (else a contiguous copy)."""
    key = (x.shape, x.stride())
    layout = _views.get(key)
    if layout is None:
        ok = x.dim() <= 2 or all(x.size(d) == 1 or x.stride(d) == x.stride(d + 1) * x.size(d + 1)
                                 for d in range(2, x.dim() - 1))
        copy = not ok or not (x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last))
        y = torch.empty(x.shape, device="meta") if copy else x  # a contiguous copy's strides
        S = 1
        for d in range(2, y.dim()):
            S *= y.size(d)
        layout = (copy, y.size(0), y.size(1), S, (y.stride(0), y.stride(1), y.stride(-1) if y.dim() > 2 else 1))
        if len(_views) < 4096:
            _views[key] = layout
    if layout[0]:
        x = x.contiguous()
    return (x,) + layout[1:]


# Programs to aim for: a few per SM of an H100 (132), so that few channels with many elements
# each (64 x 512*32*32 in a CIFAR ResNet) still fill the GPU. A fixed function of the shape: the
# statistics' summation order, hence their bits, never change between runs.
TARGET_PROGRAMS = 4 * 132


@functools.lru_cache(maxsize=1024)
def _split(NS: int, C: int) -> tuple[int, int]:
    """(slices per channel, elements per slice: a multiple of BLOCK)."""
    split = max(1, min(cdiv(NS, BLOCK), cdiv(TARGET_PROGRAMS, max(C, 1))))
    chunk = cdiv(cdiv(NS, split), BLOCK) * BLOCK
    return cdiv(NS, chunk), chunk


def batch_norm_stats(x, eps: float):
    """(mean, 1 / sqrt(biased variance + eps), unbiased variance) per channel, in two launches."""
    x, N, C, S, (sN, sC, sS) = _view(x)
    mean, invstd, unbiased = (torch.empty(C, device=x.device, dtype=torch.float32) for _ in range(3))
    if C and N * S:
        if _rows_layout(C, S, (sN, sC, sS)):
            block_r, block_c, split, chunk = _split_rows(N * S, C)
            part = torch.empty(C, split, 3, device=x.device, dtype=torch.float32)
            _stats_rows_kernel[(cdiv(C, block_c), split)](x, part, N * S, C, chunk, split, BLOCK_R=block_r,
                                                                 BLOCK_C=block_c)
        else:
            split, chunk = _split(N * S, C)
            part = torch.empty(C, split, 3, device=x.device, dtype=torch.float32)
            _stats_kernel[(C, split)](x, part, N * S, *divisor(S), sN, sC, sS, chunk, split, WIDE=needs_wide(N * S),
                                      BLOCK=BLOCK)
        _stats_combine_kernel[(C,)](part, mean, invstd, unbiased, split, eps)
    else:  # an empty batch: zero statistics, as the other backends
        mean.zero_(), invstd.fill_(1.0 / math.sqrt(eps)), unbiased.zero_()
    return mean, invstd, unbiased


def _like(t, x):
    """t laid out with x's strides (the kernels walk both through one view)."""
    return t if t.stride() == x.stride() else torch.empty_like(x).copy_(t)


def batch_norm_act_apply(x, mean, invstd, weight, bias, residual, activation: int):
    """(act(bn(x) + residual), ReLU's packed mask: 8 logical elements a byte, empty otherwise)."""
    x, N, C, S, (sN, sC, sS) = _view(x)
    y = torch.empty_like(x)
    total = x.numel()
    bits = torch.empty((total + 7) // 8 if activation == 1 else 0, device=x.device, dtype=torch.uint8)
    if residual is not None:
        residual = _like(residual, x)
    if not total:
        return y, bits
    args = (x, y, mean.float(), invstd.float(), weight if weight is not None else x, bias if bias is not None else x,
            residual if residual is not None else x, bits if activation == 1 else x)
    flags = dict(DTYPE=tl_dtype(x.dtype), HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None,
                 HAS_RES=residual is not None, ACT=activation, WIDE=needs_wide(total))
    if _rows_layout(C, S, (sN, sC, sS)) and (activation != 1 or S % 8 == 0):
        block_r, block_c = _tile(C)
        _apply_rows_kernel[(cdiv(N * S, block_r), cdiv(C, block_c))](
            *args, N * S, C, *divisor(S), BLOCK_R=block_r, BLOCK_C=block_c, **flags)
    else:
        _apply_kernel[(cdiv(total, BLOCK),)](*args, total, *divisor(C), *divisor(S), sN, sC, sS, BLOCK=BLOCK,
                                                    **flags)
    return y, bits


def batch_norm_apply(x, mean, invstd, weight, bias):
    return batch_norm_act_apply(x, mean, invstd, weight, bias, None, 0)[0]


def batch_norm_act_bwd(dy, x, weight, bias, mean, invstd, extra, has_residual: bool, activation: int, training: bool):
    """(dx, dweight, dbias, dresidual or None). extra: ReLU's packed mask, or the residual GELU and
    SiLU recompute the pre-activation with (None without one)."""
    x, N, C, S, (sN, sC, sS) = _view(x)
    dy = _like(dy, x)
    load_res = activation >= 2 and extra is not None
    if load_res:
        extra = _like(extra, x)
    dx = torch.empty_like(x)
    dres = torch.empty_like(x) if has_residual else None
    mean, invstd = mean.float(), invstd.float()
    w, b = weight if weight is not None else x, bias if bias is not None else x
    res, bits = (extra, x) if load_res else (x, extra if activation == 1 else x)
    flags = dict(HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None, LOAD_RES=load_res, ACT=activation)
    if x.numel() and _rows_layout(C, S, (sN, sC, sS)):
        wide = needs_wide(x.numel())
        byte_rows = activation == 1 and S % 8 == 0  # ReLU's mask as _apply_rows_kernel wrote it (else per element)
        block_r, block_c, split, chunk = _split_rows(N * S, C)
        part = torch.empty(2, C, split, device=x.device, dtype=torch.float32)
        _bwd_reduce_rows_kernel[(cdiv(C, block_c), split)](
            dy, x, mean, invstd, w, b, res, bits, part, N * S, C, *divisor(S), chunk, split, WIDE=wide,
            BYTE_ROWS=byte_rows, BLOCK_R=block_r, BLOCK_C=block_c, **flags)
        # Slices summed in a fixed order (deterministic), into two tensors: they become dbias and
        # dweight, outputs of one op that may not alias each other.
        sum_dy, sum_dy_xhat = part[0].sum(-1), part[1].sum(-1)
        _bwd_apply_rows_kernel[(cdiv(N * S, block_r), cdiv(C, block_c))](
            dy, x, dx, dres if has_residual else x, mean, invstd, w, b, res, bits, sum_dy, sum_dy_xhat, N * S, C,
            *divisor(S), float(N * S), DTYPE=tl_dtype(x.dtype), WRITE_DRES=has_residual, TRAINING=bool(training),
            BYTE_ROWS=byte_rows, WIDE=wide, BLOCK_R=block_r, BLOCK_C=block_c, **flags)
    elif x.numel():
        split, chunk = _split(N * S, C)
        part = torch.empty(2, C, split, device=x.device, dtype=torch.float32)
        _bwd_reduce_kernel[(C, split)](dy, x, mean, invstd, w, b, res, bits, part, N * S, *divisor(S), sN, sC, sS,
                                       chunk, split, WIDE=needs_wide(x.numel()), BLOCK=BLOCK, **flags)
        # Slices summed in a fixed order (deterministic), into two tensors: they become dbias and
        # dweight, outputs of one op that may not alias each other.
        sum_dy, sum_dy_xhat = part[0].sum(-1), part[1].sum(-1)
        _bwd_apply_kernel[(cdiv(x.numel(), BLOCK),)](
            dy, x, dx, dres if has_residual else x, mean, invstd, w, b, res, bits, sum_dy, sum_dy_xhat, x.numel(),
            *divisor(C), *divisor(S), sN, sC, sS, float(N * S), DTYPE=tl_dtype(x.dtype), WRITE_DRES=has_residual,
            TRAINING=bool(training), WIDE=needs_wide(x.numel()), BLOCK=BLOCK, **flags)
    else:  # an empty batch: zero gradients (two tensors: they become dweight and dbias)
        sum_dy, sum_dy_xhat = (torch.zeros(C, device=x.device, dtype=torch.float32) for _ in range(2))
    return dx, sum_dy_xhat, sum_dy, dres


def batch_norm_bwd(dy, x, weight, mean, invstd, training: bool):
    return batch_norm_act_bwd(dy, x, weight, None, mean, invstd, None, False, 0, training)[:3]
