"""DropBlock in Triton (the oracle, fusedtech/reference/drop_block.py, states the mask). Four
launches: the block centres as bytes (one Philox draw each, the dropout draw of the centre's
index); the keep mask, each element OR-ing the centres of its block_size^2 window (byte loads that
hit the cache) and each program counting what it keeps; one program summing the counts into
scale = numel / (eps + kept); then output = x * scale where kept, the scale read from device memory
(no host synchronisation). The backward rebuilds the mask the same way from the seed (no count,
no scale), so the forward saves nothing input-sized."""
from __future__ import annotations

import struct

import torch
import triton
import triton.language as tl

from .dropout import block_draws
from .indexing import cdiv, divisor, fast_divmod, next_power_of_2
from .multi_tensor import tl_dtype
from .rounding import round_to

BLOCK = 1024


@triton.jit
def _centres_kernel(seed_ptr, centres_ptr, n, threshold, BLOCK: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    draws = block_draws(tl.load(seed_ptr), pid * BLOCK, BLOCK)
    tl.store(centres_ptr + offs, (draws.to(tl.int64) < threshold).to(tl.uint8), mask=offs < n)


@triton.jit
def _keep_kernel(centres_ptr, keep_ptr, counts_ptr, planes, C, H, W, W_m, W_1, W_2, stride_n, stride_c, stride_h,
                 stride_w, block_size, tiles_per_plane, PLANES: tl.constexpr, BLOCK: tl.constexpr):
    """A [PLANES, BLOCK] tile: BLOCK elements of each of PLANES (n, c) planes (several small planes
    per program, or one tile of a large one). Element (h, w) is kept unless a centre of its plane
    lies in [h - block_size + 1, h] x [w - block_size + 1, w]; keep is stored with the tensor's
    strides; the program counts its keeps. W comes as a divisor() tuple: no division per element."""
    pid = tl.program_id(0)
    group, tile = pid // tiles_per_plane, pid % tiles_per_plane
    plane = group.to(tl.int64) * PLANES + tl.arange(0, PLANES)[:, None]
    offs = tile * BLOCK + tl.arange(0, BLOCK)[None, :]
    live = (plane < planes) & (offs < H * W)
    h, w = fast_divmod(offs, W, W_m, W_1, W_2, False)  # offs < H * W < 2^32
    centre_h, centre_w = H - block_size + 1, W - block_size + 1
    centres = centres_ptr + plane * (centre_h * centre_w)
    dropped = tl.zeros([PLANES, BLOCK], dtype=tl.int1)
    for di in range(0, block_size):
        i = h - di
        row_ok = live & (i >= 0) & (i < centre_h)
        for dj in range(0, block_size):
            j = w - dj
            ok = row_ok & (j >= 0) & (j < centre_w)
            dropped = dropped | (tl.load(centres + i * centre_w + j, mask=ok, other=0) != 0)
    keep = live & ~dropped
    n, c = plane // C, plane % C
    address = n * stride_n + c * stride_c + h * stride_h + w * stride_w
    tl.store(keep_ptr + address, keep.to(tl.uint8), mask=live)
    tl.store(counts_ptr + pid, tl.sum(tl.sum(keep.to(tl.int32), axis=1), axis=0))


@triton.jit
def _apply_kernel(x_ptr, keep_ptr, scale_ptr, y_ptr, n, DTYPE: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    keep = tl.load(keep_ptr + offs, mask=mask, other=0) != 0
    y = x * tl.where(keep, tl.load(scale_ptr), 0.0)  # a dropped NaN stays NaN, as torchvision's x * mask
    tl.store(y_ptr + offs, round_to(y, DTYPE), mask=mask)


@triton.jit
def _scale_kernel(counts_ptr, programs, numel, eps_bits, scale_ptr, BLOCK: tl.constexpr):
    """scale = numel / (eps + kept) in float64 rounded once to float32, as the oracle's
    (numel / (eps + kept.double())).float(); kept is the sum of the keep programs' counts (exact in
    int64), eps arrives as its float64 bits (a float argument would be rounded to float32)."""
    kept = tl.zeros([BLOCK], dtype=tl.int64)
    for start in range(0, programs, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        kept += tl.load(counts_ptr + offs, mask=offs < programs, other=0).to(tl.int64)
    eps = tl.cast(eps_bits, tl.int64).to(tl.float64, bitcast=True)  # tl.cast: an argument of 1 is a constexpr
    tl.store(scale_ptr, (numel.to(tl.float64) / (eps + tl.sum(kept, axis=0).to(tl.float64))).to(tl.float32))


def _keep(x: torch.Tensor, seed: torch.Tensor, gamma: float, block_size: int):
    """(keep: uint8 with x's shape and strides, per-program kept counts or None for an empty x)."""
    from fusedtech.reference.drop_block import centre_threshold
    n, c, h, w = x.shape
    keep = torch.empty_like(x, dtype=torch.uint8)
    centre_count = n * c * (h - block_size + 1) * (w - block_size + 1)
    if x.numel() == 0:
        return keep, None
    centres = torch.empty(centre_count, dtype=torch.uint8, device=x.device)
    _centres_kernel[(cdiv(centre_count, BLOCK),)](seed, centres, centre_count, centre_threshold(gamma),
                                                         BLOCK=BLOCK)
    block = min(BLOCK, next_power_of_2(h * w))
    planes_per_program = BLOCK // block  # small planes share a program: about BLOCK elements each
    tiles = cdiv(h * w, block)
    programs = cdiv(n * c, planes_per_program) * tiles
    counts = torch.empty(programs, dtype=torch.int32, device=x.device)
    _keep_kernel[(programs,)](centres, keep, counts, n * c, c, h, *divisor(w), *keep.stride(), block_size, tiles,
                              PLANES=planes_per_program, BLOCK=block)
    return keep, counts


def drop_block_keep(x: torch.Tensor, seed: torch.Tensor, gamma: float, block_size: int):
    """(keep: uint8 with x's shape and strides, kept: int64 0-d count) for a dense 4-D x."""
    keep, counts = _keep(x, seed, gamma, block_size)
    return keep, (counts.sum() if counts is not None else torch.zeros((), dtype=torch.int64, device=x.device))


def drop_block_mask(x: torch.Tensor, seed: torch.Tensor, gamma: float, block_size: int) -> torch.Tensor:
    """The keep mask alone (what backward needs)."""
    return _keep(x, seed, gamma, block_size)[0]


def drop_block_keep_scale(x: torch.Tensor, seed: torch.Tensor, gamma: float, block_size: int, eps: float):
    """(keep, scale = numel / (eps + kept) as a 0-d float32 tensor): the count and the scale in one launch."""
    keep, counts = _keep(x, seed, gamma, block_size)
    scale = torch.zeros((), dtype=torch.float32, device=x.device)  # an empty x: 0 / eps
    if counts is not None:
        eps_bits = struct.unpack("<q", struct.pack("<d", eps))[0]
        _scale_kernel[(1,)](counts, counts.numel(), x.numel(), eps_bits, scale, BLOCK=BLOCK)
    return keep, scale


def drop_block_apply(x: torch.Tensor, keep: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x * scale where keep, else 0, over the storage of x and keep (dense, the same strides)."""
    y = torch.empty_like(x)
    if x.numel():
        _apply_kernel[(cdiv(x.numel(), BLOCK),)](x, keep, scale, y, x.numel(), DTYPE=tl_dtype(x.dtype),
                                                        BLOCK=BLOCK)
    return y
