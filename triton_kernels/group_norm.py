"""GroupNorm (+ activation) over (N, C, *) in Triton, read in place through one strided (N, C, S)
view: contiguous NCHW (sC = S, sS = 1) or channels-last (sC = 1, sS = C).

Every kernel walks [BLOCK_S positions, GPB groups, BCG channels of a group] tiles of one sample
(addresses n sN + s sS + c sC). The tile's shape follows the layout, so that its contiguous axis is
long: positions for NCHW, whole groups side by side for channels-last (a group there is only C / G
contiguous channels at each position); Triton's JIT specialises the stride equal to 1 as a constant,
which tells its coalescing which axis that is.

Forward: Welford statistics of x - (the group's first element), one set per lane, over slices of
positions (a large group is split over several programs), merged in a fixed order with Chan's
formula into mean and rstd [N, G], then the normalisation: x is read twice. Backward: per-(channel, n, slice) sums of dz and dz * xhat (the
dweight and dbias partials, summed in a fixed order), the two per-group coefficients from them, then
dx: x and dy are read twice. No atomics anywhere: bit-identical results run to run."""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from .batch_norm import _activate, _chan_merge, _welford_lanes
from .indexing import cdiv, next_power_of_2
from .multi_tensor import tl_dtype
from .rounding import round_to

TILE = 1024  # elements of a tile (8 a thread at 4 warps)
ROW_LANES = 256  # channels-last: channels of a tile's row (whole groups side by side when they fit)
# Statistics / backward-sum programs to aim for: a few per SM of an H100 (132). A fixed function of
# the shape, so the summation order, hence the bits, never change between runs.
TARGET_PROGRAMS = 4 * 132


@triton.jit
def _channels(n, gb, cb, G, Cg, sN, sC, WIDE: tl.constexpr, GPB: tl.constexpr, BCG: tl.constexpr):
    """(sample + channel offsets [GPB, BCG], channel [GPB, BCG], valid [GPB, BCG], group [GPB]) of the
    tile's channels: groups gb GPB .. + GPB, channels cb BCG .. + BCG of each."""
    g = gb * GPB + tl.arange(0, GPB)
    cc = cb * BCG + tl.arange(0, BCG)
    c = g[:, None] * Cg + cc[None, :]
    valid = (g < G)[:, None] & (cc < Cg)[None, :]
    if WIDE:
        return n.to(tl.int64) * sN + c.to(tl.int64) * sC, c, valid, g
    else:
        return n * sN + c * sC, c, valid, g


@triton.jit
def _positions(s0, S_end, sS, WIDE: tl.constexpr, BLOCK_S: tl.constexpr):
    """(offsets [BLOCK_S, 1, 1], valid [BLOCK_S, 1, 1]) of positions s0 .. s0 + BLOCK_S."""
    s = s0 + tl.arange(0, BLOCK_S)
    valid = (s < S_end)[:, None, None]
    if WIDE:
        return s.to(tl.int64)[:, None, None] * sS, valid
    else:
        return s[:, None, None] * sS, valid


@triton.jit
def _shift(x_ptr, n, g, Cg, sN, sC):
    """The first element of group g of sample n (0 where not finite), fp32. The statistics are of
    x - shift, so that their rounding errors scale with the group's spread, not its mean: a group of
    100 + N(0, 1) keeps its mean to about an ulp, where every merge of unshifted statistics rounds at
    the mean's scale."""
    first = tl.load(x_ptr + n.to(tl.int64) * sN + g.to(tl.int64) * Cg * sC).to(tl.float32)
    return tl.where(tl.abs(first) < float("inf"), first, 0.0)


@triton.jit
def _act_grad(g, pre, ACT: tl.constexpr):
    """The gradient at the pre-activation from the output's gradient g (the oracle's formulas)."""
    if ACT == 1:
        return tl.where(pre > 0.0, g, 0.0)
    elif ACT == 2:
        cdf = 0.5 * (1.0 + tl.erf(pre * 0.7071067811865476))
        return g * (cdf + pre * tl.exp(-0.5 * pre * pre) * 0.3989422804014327)
    elif ACT == 3:
        sig = tl.sigmoid(pre)
        return g * (sig * (1.0 + pre * (1.0 - sig)))
    else:
        return g


@triton.jit
def _stats_kernel(x_ptr, part_ptr, S, G, Cg, sN, sC, sS, GB, CB, CHUNK, SPLIT, PLANE, WIDE: tl.constexpr,
                  BLOCK_S: tl.constexpr, GPB: tl.constexpr, BCG: tl.constexpr):
    """Program (n, gb, cb, p): count, mean and M2 of each of its GPB groups over channel block cb
    and positions [p CHUNK, (p + 1) CHUNK), into part[0|1|2, n, g, cb, p]. Each lane keeps its own
    Welford statistics (no reduction in the loop), merged once at the end; all of x - shift."""
    pid = tl.program_id(0).to(tl.int64) if WIDE else tl.program_id(0)  # WIDE: positions too may pass 2^31
    p = pid % SPLIT
    cb = (pid // SPLIT) % CB
    gb = (pid // (SPLIT * CB)) % GB
    n = pid // (SPLIT * CB * GB)
    coff, c, cvalid, g = _channels(n, gb, cb, G, Cg, sN, sC, WIDE, GPB, BCG)
    shift = _shift(x_ptr, n, tl.where(g < G, g, 0), Cg, sN, sC)[None, :, None]
    begin = p * CHUNK
    end = tl.minimum(begin + CHUNK, S)
    count = tl.zeros([BLOCK_S, GPB, BCG], dtype=tl.float32)
    mean = tl.zeros([BLOCK_S, GPB, BCG], dtype=tl.float32)
    m2 = tl.zeros([BLOCK_S, GPB, BCG], dtype=tl.float32)
    for start in range(begin, end, BLOCK_S):
        soff, svalid = _positions(start, end, sS, WIDE, BLOCK_S)
        mask = svalid & cvalid[None, :, :]
        x = tl.load(x_ptr + soff + coff[None, :, :], mask=mask, other=0.0).to(tl.float32) - shift
        rstep = 1.0 / ((start - begin) // BLOCK_S + 1).to(tl.float32)  # only the last step is partial
        count, mean, m2 = _welford_lanes(count, mean, m2, x, mask, rstep)
    count, mean, m2 = tl.reduce((count, mean, m2), 0, _chan_merge)
    count, mean, m2 = tl.reduce((count, mean, m2), 1, _chan_merge)
    at = ((n * G + g).to(tl.int64) * CB + cb) * SPLIT + p
    gvalid = g < G
    tl.store(part_ptr + at, count, mask=gvalid)
    tl.store(part_ptr + PLANE + at, mean, mask=gvalid)
    tl.store(part_ptr + 2 * PLANE + at, m2, mask=gvalid)


@triton.jit
def _stats_combine_kernel(x_ptr, part_ptr, mean_ptr, rstd_ptr, G, Cg, sN, sC, K, PLANE, eps, BLOCK_K: tl.constexpr):
    """Group r = n G + g: its K partials merged in a fixed order (lane-wise, then a tree), Chan's
    formula throughout (accurate when |mean| >> std, unlike E[x^2] - E[x]^2); the shift added back."""
    r = tl.program_id(0).to(tl.int64)
    count = tl.zeros([BLOCK_K], dtype=tl.float32)
    mean = tl.zeros([BLOCK_K], dtype=tl.float32)
    m2 = tl.zeros([BLOCK_K], dtype=tl.float32)
    for i in range(0, K, BLOCK_K):
        k = i + tl.arange(0, BLOCK_K)
        mask = k < K
        at = part_ptr + r * K + k
        count, mean, m2 = _chan_merge(count, mean, m2, tl.load(at, mask=mask, other=0.0),
                                      tl.load(at + PLANE, mask=mask, other=0.0),
                                      tl.load(at + 2 * PLANE, mask=mask, other=0.0))
    count, mean, m2 = tl.reduce((count, mean, m2), 0, _chan_merge)
    tl.store(mean_ptr + r, _shift(x_ptr, r // G, r % G, Cg, sN, sC) + mean)
    tl.store(rstd_ptr + r, tl.math.div_rn(1.0, tl.sqrt_rn(m2 / count + eps)))


@triton.jit
def _apply_kernel(x_ptr, y_ptr, mean_ptr, rstd_ptr, w_ptr, b_ptr, S, G, Cg, sN, sC, sS, SB, GB, CB,
                  DTYPE: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, ACT: tl.constexpr,
                  WIDE: tl.constexpr, BLOCK_S: tl.constexpr, GPB: tl.constexpr, BCG: tl.constexpr):
    """y = act((x - mean) rstd w + b) over one tile: program (n, sb, gb, cb)."""
    pid = tl.program_id(0).to(tl.int64) if WIDE else tl.program_id(0)
    cb = pid % CB
    gb = (pid // CB) % GB
    sb = (pid // (CB * GB)) % SB
    n = pid // (CB * GB * SB)
    coff, c, cvalid, g = _channels(n, gb, cb, G, Cg, sN, sC, WIDE, GPB, BCG)
    soff, svalid = _positions(sb * BLOCK_S, S, sS, WIDE, BLOCK_S)
    mask = svalid & cvalid[None, :, :]
    x = tl.load(x_ptr + soff + coff[None, :, :], mask=mask, other=0.0).to(tl.float32)
    mean = tl.load(mean_ptr + n * G + g, mask=g < G, other=0.0)[None, :, None]
    rstd = tl.load(rstd_ptr + n * G + g, mask=g < G, other=0.0)[None, :, None]
    y = (x - mean) * rstd
    if HAS_WEIGHT:
        y = y * tl.load(w_ptr + c, mask=cvalid, other=0.0).to(tl.float32)[None, :, :]
    if HAS_BIAS:
        y = y + tl.load(b_ptr + c, mask=cvalid, other=0.0).to(tl.float32)[None, :, :]
    tl.store(y_ptr + soff + coff[None, :, :], round_to(_activate(y, ACT), DTYPE), mask=mask)


@triton.jit
def _bwd_reduce_kernel(dy_ptr, x_ptr, mean_ptr, rstd_ptr, w_ptr, b_ptr, part_ptr, N, S, G, Cg, sN, sC, sS, GB, CB,
                       CHUNK, SPLIT, PLANE, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, ACT: tl.constexpr,
                       WIDE: tl.constexpr, BLOCK_S: tl.constexpr, GPB: tl.constexpr, BCG: tl.constexpr):
    """Program (n, gb, cb, p): per channel, sums of dz and dz * xhat over positions [p CHUNK,
    (p + 1) CHUNK), into part[0|1, c, n, p]; dz is the gradient at the pre-activation."""
    pid = tl.program_id(0).to(tl.int64) if WIDE else tl.program_id(0)
    p = pid % SPLIT
    cb = (pid // SPLIT) % CB
    gb = (pid // (SPLIT * CB)) % GB
    n = pid // (SPLIT * CB * GB)
    coff, c, cvalid, g = _channels(n, gb, cb, G, Cg, sN, sC, WIDE, GPB, BCG)
    mean = tl.load(mean_ptr + n * G + g, mask=g < G, other=0.0)[None, :, None]
    rstd = tl.load(rstd_ptr + n * G + g, mask=g < G, other=0.0)[None, :, None]
    w = tl.load(w_ptr + c, mask=cvalid, other=0.0).to(tl.float32)[None, :, :] if HAS_WEIGHT else 1.0
    b = tl.load(b_ptr + c, mask=cvalid, other=0.0).to(tl.float32)[None, :, :] if HAS_BIAS else 0.0
    begin = p * CHUNK
    end = tl.minimum(begin + CHUNK, S)
    acc_dz = tl.zeros([BLOCK_S, GPB, BCG], dtype=tl.float32)
    acc_dzx = tl.zeros([BLOCK_S, GPB, BCG], dtype=tl.float32)
    for start in range(begin, end, BLOCK_S):
        soff, svalid = _positions(start, end, sS, WIDE, BLOCK_S)
        mask = svalid & cvalid[None, :, :]
        x = tl.load(x_ptr + soff + coff[None, :, :], mask=mask, other=0.0).to(tl.float32)
        dz = tl.load(dy_ptr + soff + coff[None, :, :], mask=mask, other=0.0).to(tl.float32)
        xhat = (x - mean) * rstd
        if ACT != 0:
            dz = _act_grad(dz, xhat * w + b, ACT)
        dz = tl.where(mask, dz, 0.0)
        acc_dz += dz
        acc_dzx += dz * xhat
    at = (c.to(tl.int64) * N + n) * SPLIT + p
    tl.store(part_ptr + at, tl.sum(acc_dz, axis=0), mask=cvalid)
    tl.store(part_ptr + PLANE + at, tl.sum(acc_dzx, axis=0), mask=cvalid)


@triton.jit
def _bwd_combine_kernel(part_ptr, w_ptr, coef_ptr, N, G, Cg, SPLIT, PLANE, count, HAS_WEIGHT: tl.constexpr,
                        BLOCK_K: tl.constexpr):
    """Group r = n G + g: c1 = mean of w dz xhat and c2 = mean of w dz over the group, from its
    channels' partials (fixed order), into coef[0|1, r]."""
    r = tl.program_id(0)
    n = r // G
    g = r % G
    acc1 = tl.zeros([BLOCK_K], dtype=tl.float32)
    acc2 = tl.zeros([BLOCK_K], dtype=tl.float32)
    for i in range(0, Cg * SPLIT, BLOCK_K):
        k = i + tl.arange(0, BLOCK_K)
        mask = k < Cg * SPLIT
        c = g * Cg + k // SPLIT
        at = (c.to(tl.int64) * N + n) * SPLIT + k % SPLIT
        w = tl.load(w_ptr + c, mask=mask, other=0.0).to(tl.float32) if HAS_WEIGHT else 1.0
        acc1 += w * tl.load(part_ptr + PLANE + at, mask=mask, other=0.0)
        acc2 += w * tl.load(part_ptr + at, mask=mask, other=0.0)
    tl.store(coef_ptr + r, tl.sum(acc1, axis=0) / count)
    tl.store(coef_ptr + N * G + r, tl.sum(acc2, axis=0) / count)


@triton.jit
def _bwd_apply_kernel(dy_ptr, x_ptr, dx_ptr, mean_ptr, rstd_ptr, w_ptr, b_ptr, coef_ptr, N, S, G, Cg, sN, sC, sS, SB,
                      GB, CB, DTYPE: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
                      ACT: tl.constexpr, WIDE: tl.constexpr, BLOCK_S: tl.constexpr, GPB: tl.constexpr,
                      BCG: tl.constexpr):
    """dx = (w dz - (xhat c1 + c2)) rstd over one tile: program (n, sb, gb, cb)."""
    pid = tl.program_id(0).to(tl.int64) if WIDE else tl.program_id(0)
    cb = pid % CB
    gb = (pid // CB) % GB
    sb = (pid // (CB * GB)) % SB
    n = pid // (CB * GB * SB)
    coff, c, cvalid, g = _channels(n, gb, cb, G, Cg, sN, sC, WIDE, GPB, BCG)
    soff, svalid = _positions(sb * BLOCK_S, S, sS, WIDE, BLOCK_S)
    mask = svalid & cvalid[None, :, :]
    x = tl.load(x_ptr + soff + coff[None, :, :], mask=mask, other=0.0).to(tl.float32)
    dz = tl.load(dy_ptr + soff + coff[None, :, :], mask=mask, other=0.0).to(tl.float32)
    r = n * G + g
    mean = tl.load(mean_ptr + r, mask=g < G, other=0.0)[None, :, None]
    rstd = tl.load(rstd_ptr + r, mask=g < G, other=0.0)[None, :, None]
    c1 = tl.load(coef_ptr + r, mask=g < G, other=0.0)[None, :, None]
    c2 = tl.load(coef_ptr + N * G + r, mask=g < G, other=0.0)[None, :, None]
    w = tl.load(w_ptr + c, mask=cvalid, other=0.0).to(tl.float32)[None, :, :] if HAS_WEIGHT else 1.0
    b = tl.load(b_ptr + c, mask=cvalid, other=0.0).to(tl.float32)[None, :, :] if HAS_BIAS else 0.0
    xhat = (x - mean) * rstd
    if ACT != 0:
        dz = _act_grad(dz, xhat * w + b, ACT)
    dx = (w * dz - (xhat * c1 + c2)) * rstd
    tl.store(dx_ptr + soff + coff[None, :, :], round_to(dx, DTYPE), mask=mask)


# ---- launchers ----------------------------------------------------------------------------------

_CHANNELS_LAST = {4: torch.channels_last, 5: torch.channels_last_3d}


def _view(x: torch.Tensor):
    """(x, N, C, S, (sN, sC, sS)): x as an (N, C, S) view, made contiguous unless it is contiguous or
    channels-last already. The strides are the layout's own (a size-1 dim's stride may be anything)."""
    N, C, S = x.shape[0], x.shape[1], 1
    for d in x.shape[2:]:
        S *= d
    fmt = _CHANNELS_LAST.get(x.dim())
    if not x.is_contiguous() and fmt is not None and x.is_contiguous(memory_format=fmt):
        return x, N, C, S, (S * C, 1, C)
    return x.contiguous(), N, C, S, (C * S, S, 1)


@functools.lru_cache(maxsize=1024)
def _plan(N: int, C: int, S: int, G: int, channels_last: bool, tile: int, row_lanes: int, target: int):
    """Tile (BLOCK_S, GPB, BCG), its counts (SB position blocks, GB group blocks, CB channel blocks of a
    group), the statistics' split (SPLIT slices of CHUNK positions) and WIDE (64-bit offsets)."""
    Cg = C // G
    if channels_last:  # whole groups side by side along the contiguous channels, as many rows as fit
        bcg = min(next_power_of_2(Cg), row_lanes)
        gpb = min(next_power_of_2(G), max(1, row_lanes // bcg)) if bcg >= Cg else 1
        block_s = min(next_power_of_2(S), max(1, tile // (gpb * bcg)))
    else:  # long runs of positions, then the next channels (contiguous after them) of the group
        block_s = min(next_power_of_2(S), tile)
        bcg = min(next_power_of_2(Cg), max(1, tile // block_s))
        gpb = min(next_power_of_2(G), max(1, tile // (block_s * bcg))) if bcg >= Cg else 1
    gb, cb, sb = cdiv(G, gpb), cdiv(Cg, bcg), cdiv(S, block_s)
    split = max(1, min(sb, cdiv(target, N * gb * cb)))
    chunk = cdiv(cdiv(S, split), block_s) * block_s
    split = cdiv(S, chunk)
    # The largest offset any lane forms, padding lanes included (their accesses are masked off).
    sN, sC, sS = (S * C, 1, C) if channels_last else (C * S, S, 1)
    reach = (N - 1) * sN + ((gb * gpb - 1) * Cg + cb * bcg - 1) * sC + (sb * block_s - 1) * sS
    return dict(BLOCK_S=block_s, GPB=gpb, BCG=bcg), sb, gb, cb, split, chunk, reach >= 2 ** 31


def _setup(x, num_groups: int):
    x, N, C, S, strides = _view(x)
    if C % num_groups:
        raise ValueError(f"fusedtech: GroupNorm needs channels ({C}) divisible by num_groups ({num_groups})")
    channels_last = strides[1] == 1 and C > 1 and S > 1
    plan = _plan(max(N, 1), C, max(S, 1), num_groups, channels_last, TILE, ROW_LANES, TARGET_PROGRAMS)
    return x, N, C, S, strides, plan


def group_norm_fwd(x, weight, bias, num_groups: int, eps: float, activation: int):
    """(act((x - mean) rstd weight + bias) in x's dtype and memory format, mean, rstd [N, G] fp32)."""
    x, N, C, S, (sN, sC, sS), (tile, SB, GB, CB, split, chunk, wide) = _setup(x, num_groups)
    G = num_groups
    y = torch.empty_like(x)
    mean = torch.empty(N, G, device=x.device, dtype=torch.float32)
    rstd = torch.empty(N, G, device=x.device, dtype=torch.float32)
    if not N * S:  # no elements: an empty group has mean 0 and variance 0 (the oracle's)
        mean.zero_(), rstd.fill_(eps).rsqrt_()
        return y, mean, rstd
    K = CB * split
    part = torch.empty(3, N * G * K, device=x.device, dtype=torch.float32)
    _stats_kernel[(N * GB * CB * split,)](x, part, S, G, C // G, sN, sC, sS, GB, CB, chunk, split, N * G * K,
                                          WIDE=wide, **tile)
    _stats_combine_kernel[(N * G,)](x, part, mean, rstd, G, C // G, sN, sC, K, N * G * K, eps,
                                    BLOCK_K=min(next_power_of_2(K), 256))
    _apply_kernel[(N * SB * GB * CB,)](
        x, y, mean, rstd, weight if weight is not None else x, bias if bias is not None else x, S, G, C // G, sN, sC,
        sS, SB, GB, CB, DTYPE=tl_dtype(x.dtype), HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None,
        ACT=activation, WIDE=wide, **tile)
    return y, mean, rstd


def group_norm_bwd(dy, x, weight, bias, mean, rstd, num_groups: int, activation: int):
    """(dx in x's dtype and memory format, dweight, dbias: fp32 [C])."""
    x, N, C, S, (sN, sC, sS), (tile, SB, GB, CB, split, chunk, wide) = _setup(x, num_groups)
    G = num_groups
    if dy.stride() != x.stride():  # the kernels read both through x's view
        dy = torch.empty_like(x).copy_(dy)
    dx = torch.empty_like(x)
    part = (torch.empty if N * S else torch.zeros)(2, C, N, split, device=x.device, dtype=torch.float32)
    if N * S:
        mean, rstd = mean.float().contiguous(), rstd.float().contiguous()
        w, b = weight if weight is not None else x, bias if bias is not None else x
        flags = dict(HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None, ACT=activation, WIDE=wide, **tile)
        plane = C * N * split
        _bwd_reduce_kernel[(N * GB * CB * split,)](dy, x, mean, rstd, w, b, part, N, S, G, C // G, sN, sC, sS, GB, CB,
                                                   chunk, split, plane, **flags)
        coef = torch.empty(2, N, G, device=x.device, dtype=torch.float32)
        _bwd_combine_kernel[(N * G,)](part, w, coef, N, G, C // G, split, plane, float(C // G * S),
                                      HAS_WEIGHT=weight is not None,
                                      BLOCK_K=min(next_power_of_2(C // G * split), 256))
        _bwd_apply_kernel[(N * SB * GB * CB,)](dy, x, dx, mean, rstd, w, b, coef, N, S, G, C // G, sN, sC, sS, SB, GB,
                                               CB, DTYPE=tl_dtype(x.dtype), **flags)
    # Over n and the slices, in a fixed order (deterministic); two tensors, as two outputs may not alias.
    return dx, part[1].reshape(C, -1).sum(-1), part[0].reshape(C, -1).sum(-1)
