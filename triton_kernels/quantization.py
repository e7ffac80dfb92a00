"""Blockwise quantization of optimizer states in Triton: the oracle's rules
(fusedtech/reference/quantization.py, csrc/include/fusedtech/quantization.h), on 2-D tiles whose rows
are quantization blocks, so a block's absmax is a row reduction in registers. Also the standalone
quantize / dequantize launchers (checkpoint conversion, the bit-exactness tests)."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

QBLOCK = 256  # elements per absmax
ROWS = 4  # blocks per tile


@triton.jit
def dequantize(codes, table_ptr, absmax):
    """float32 values of a [rows, QBLOCK] tile of codes, absmax one value per row."""
    return tl.load(table_ptr + codes.to(tl.int32)) * absmax[:, None]


@triton.jit
def quantize(x, mids_ptr, BITS: tl.constexpr):
    """(codes int32, absmax per row) of a [rows, QBLOCK] float32 tile whose padding is 0."""
    has_nan = tl.max((x != x).to(tl.int32), axis=1)
    absmax = tl.where(has_nan > 0, float("nan"), tl.max(tl.abs(x), axis=1))
    # The floor is float32(1e-38), a subnormal: given by its bits (as a literal Triton would make it float64).
    floor = tl.full(absmax.shape, 0x006CE3EE, tl.uint32).to(tl.float32, bitcast=True)
    inverse = tl.div_rn(tl.full(absmax.shape, 1.0, tl.float32), tl.maximum(absmax, floor, propagate_nan=tl.PropagateNan.ALL))
    scaled = x * inverse[:, None]
    code = tl.zeros(x.shape, tl.int32)
    # How many midpoints lie below: BITS comparisons at power-of-two strides (NaN: none).
    for k in tl.static_range(BITS):
        code += tl.where(tl.load(mids_ptr + code + ((1 << (BITS - 1 - k)) - 1)) < scaled, 1 << (BITS - 1 - k), 0)
    return code, absmax


@triton.jit
def tile_offsets(begin, start, ROWS: tl.constexpr, QBLOCK: tl.constexpr):
    """Element offsets [ROWS, QBLOCK] of tile `start` of a chunk beginning at `begin` (a block boundary),
    and each row's block index."""
    rows = begin + start * (ROWS * QBLOCK) + tl.arange(0, ROWS).to(tl.int64) * QBLOCK
    return rows[:, None] + tl.arange(0, QBLOCK)[None, :], rows // QBLOCK


@triton.jit
def _quantize_kernel(x_ptr, codes_ptr, absmax_ptr, mids_ptr, n, DTYPE: tl.constexpr, ROWS: tl.constexpr,
                     QBLOCK: tl.constexpr):
    offs, blocks = tile_offsets(tl.program_id(0).to(tl.int64) * (ROWS * QBLOCK), 0, ROWS, QBLOCK)
    mask = offs < n
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    code, absmax = quantize(x, mids_ptr, 8)
    tl.store(codes_ptr + offs, code.to(tl.uint8), mask=mask)
    tl.store(absmax_ptr + blocks, absmax, mask=blocks * QBLOCK < n)


@triton.jit
def _dequantize_kernel(codes_ptr, absmax_ptr, table_ptr, out_ptr, n, ROWS: tl.constexpr, QBLOCK: tl.constexpr):
    offs, blocks = tile_offsets(tl.program_id(0).to(tl.int64) * (ROWS * QBLOCK), 0, ROWS, QBLOCK)
    mask = offs < n
    codes = tl.load(codes_ptr + offs, mask=mask, other=0)
    absmax = tl.load(absmax_ptr + blocks, mask=blocks * QBLOCK < n, other=0.0)
    tl.store(out_ptr + offs, dequantize(codes, table_ptr, absmax), mask=mask)


def _dense(t: torch.Tensor) -> bool:
    from fusedtech.reference.quantization import dense
    return dense(t)


def midpoints(table: torch.Tensor) -> torch.Tensor:
    return (table[:-1] + table[1:]) / 2


def _check(table: torch.Tensor, block: int, device) -> None:
    if table.dtype != torch.float32 or table.shape != (256,) or table.device != device:
        raise ValueError(f"fusedtech: quantization table must be 256 float32 values on {device}, got "
                         f"{table.dtype} of shape {tuple(table.shape)} on {table.device}")
    if block != QBLOCK:
        raise ValueError(f"fusedtech: quantization block must be {QBLOCK}, got {block}")


def quantize_blockwise(x: torch.Tensor, table: torch.Tensor, block: int):
    from .multi_tensor import tl_dtype
    _check(table, block, x.device)
    if not _dense(x):
        raise ValueError("fusedtech: quantize_blockwise x must be dense")
    codes = torch.empty_like(x, dtype=torch.uint8)
    n = x.numel()
    absmax = torch.empty(triton.cdiv(n, QBLOCK), dtype=torch.float32, device=x.device)
    if n:
        _quantize_kernel[(triton.cdiv(n, ROWS * QBLOCK),)](x, codes, absmax, midpoints(table), n,
                                                           DTYPE=tl_dtype(x.dtype), ROWS=ROWS, QBLOCK=QBLOCK)
    return codes, absmax


def dequantize_blockwise(codes: torch.Tensor, absmax: torch.Tensor, table: torch.Tensor, block: int):
    _check(table, block, codes.device)
    n = codes.numel()
    if codes.dtype != torch.uint8 or not _dense(codes):
        raise ValueError(f"fusedtech: dequantize_blockwise codes must be dense uint8, got {codes.dtype}")
    if absmax.dtype != torch.float32 or absmax.numel() != triton.cdiv(n, QBLOCK):
        raise ValueError(f"fusedtech: dequantize_blockwise absmax must be {triton.cdiv(n, QBLOCK)} float32 values, "
                         f"got {absmax.dtype} of shape {tuple(absmax.shape)}")
    out = torch.empty_like(codes, dtype=torch.float32)
    if n:
        _dequantize_kernel[(triton.cdiv(n, ROWS * QBLOCK),)](codes, absmax.contiguous(), table, out, n,
                                                             ROWS=ROWS, QBLOCK=QBLOCK)
    return out
