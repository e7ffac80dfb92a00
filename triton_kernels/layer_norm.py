"""LayerNorm / RMSNorm forward and backward in Triton, one row per program (a tile of rows per
program for rows of SHORT_ROW elements or fewer).

Forward reads the row once when it fits in one block (hidden size up to MAX_BLOCK), else loops
over it twice (statistics, then normalisation): no hidden-size cap. Statistics are fp32 and saved
(mean, rstd). Backward gives dx per row and writes fp32 per-program partials of dweight/dbias,
summed afterwards in a fixed order: bit-identical gradients run to run, no atomics.
The @triton.jit helpers `_row_stats` and `_normalize` are what fused variants (dropout + add +
norm) call.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from .indexing import cdiv, next_power_of_2
from .rounding import round_to
from .multi_tensor import tl_dtype

MAX_BLOCK = 8192  # elements of a row held in registers at once
BWD_ROW_STAGES = 1  # software-pipelining depth of the backward's row loop (see _bwd_kernel)


@triton.jit
def _row_stats(x_row, n, eps, RMS: tl.constexpr, BLOCK: tl.constexpr):
    """(mean, rstd) of one row in fp32; a loop when the row is longer than BLOCK."""
    if RMS:
        mean = 0.0
    else:
        x0 = tl.load(x_row).to(tl.float32)  # the sum is of x - x[0] (see _shifted_mean)
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for start in range(0, n, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            acc += tl.where(cols < n, tl.load(x_row + cols, mask=cols < n, other=0.0).to(tl.float32) - x0, 0.0)
        mean = x0 + tl.sum(acc, axis=0) / n
    acc2 = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, n, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        x = tl.load(x_row + cols, mask=cols < n, other=0.0).to(tl.float32)
        d = tl.where(cols < n, x - mean, 0.0)
        acc2 += d * d
    rstd = 1.0 / tl.sqrt_rn(tl.sum(acc2, axis=0) / n + eps)
    return mean, rstd


@triton.jit
def _shifted_mean(x, x0, mask, n):
    """x0 + mean(x - x0) of a row, x0 its first element (as the cpu kernel's shifted sums):
    a constant row's mean comes out exact, where sum(x) / n rounds and x - mean is that rounding,
    which 1 / sqrt(var + eps) magnifies (a row of 30000.3 normalised to +-0.5 instead of 0)."""
    return x0 + tl.sum(tl.where(mask, x - x0, 0.0), axis=0) / n


@triton.jit
def _normalize(x, mean, rstd, w_ptr, b_ptr, cols, mask, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr):
    y = (x - mean) * rstd
    if HAS_WEIGHT:
        y = y * tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        y = y + tl.load(b_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    return y


@triton.jit
def _fwd_kernel(x_ptr, y_ptr, w_ptr, b_ptr, mean_ptr, rstd_ptr, n, eps, DTYPE: tl.constexpr, RMS: tl.constexpr,
                HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr, ONE_BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * n
    y_row = y_ptr + row * n
    if ONE_BLOCK:  # the whole row in registers: one read
        cols = tl.arange(0, BLOCK)
        mask = cols < n
        x = tl.load(x_row + cols, mask=mask, other=0.0).to(tl.float32)
        if RMS:
            mean = 0.0
        else:
            mean = _shifted_mean(x, tl.load(x_row).to(tl.float32), mask, n)
        d = tl.where(mask, x - mean, 0.0)
        rstd = 1.0 / tl.sqrt_rn(tl.sum(d * d, axis=0) / n + eps)
        y = _normalize(x, mean, rstd, w_ptr, b_ptr, cols, mask, HAS_WEIGHT, HAS_BIAS)
        tl.store(y_row + cols, round_to(y, DTYPE), mask=mask)
    else:
        mean, rstd = _row_stats(x_row, n, eps, RMS, BLOCK)
        for start in range(0, n, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            mask = cols < n
            x = tl.load(x_row + cols, mask=mask, other=0.0).to(tl.float32)
            y = _normalize(x, mean, rstd, w_ptr, b_ptr, cols, mask, HAS_WEIGHT, HAS_BIAS)
            tl.store(y_row + cols, round_to(y, DTYPE), mask=mask)
    tl.store(mean_ptr + row, mean)
    tl.store(rstd_ptr + row, rstd)


# Short rows (SHORT_ROW elements or fewer): a program per row would leave most of its threads idle
# (64 elements across 128 threads) and launch a program per 256 bytes; these kernels take a tile of
# ROWS rows x BLOCK columns (ROWS * BLOCK = ROW_TILE elements) and reduce each row along axis 1.
SHORT_ROW = 256
ROW_TILE = 2048


@triton.jit
def _normalize_rows(x, x0, r, cols, rmask, cmask, n, eps, w_ptr, b_ptr, y_ptr, mean_ptr, rstd_ptr,
                    DTYPE: tl.constexpr, RMS: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
                    ROWS: tl.constexpr):
    """Normalises a [ROWS, BLOCK] tile of rows r (masked elements of x zero; x0 each row's first
    element) along axis 1 and stores y, mean and rstd: the short-row kernels' shared tail (this
    one's and dropout + add + norm's)."""
    mask = rmask[:, None] & cmask[None, :]
    if RMS:
        mean = tl.zeros([ROWS], dtype=tl.float32)
    else:
        mean = x0 + tl.sum(tl.where(mask, x - x0[:, None], 0.0), axis=1) / n  # _shifted_mean, row by row
    d = tl.where(mask, x - mean[:, None], 0.0)
    rstd = 1.0 / tl.sqrt_rn(tl.sum(d * d, axis=1) / n + eps)
    y = d * rstd[:, None]
    if HAS_WEIGHT:
        y = y * tl.load(w_ptr + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
    if HAS_BIAS:
        y = y + tl.load(b_ptr + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + r[:, None] * n + cols[None, :], round_to(y, DTYPE), mask=mask)
    tl.store(mean_ptr + r, mean, mask=rmask)
    tl.store(rstd_ptr + r, rstd, mask=rmask)


@triton.jit
def _fwd_rows_kernel(x_ptr, y_ptr, w_ptr, b_ptr, mean_ptr, rstd_ptr, rows, n, eps, DTYPE: tl.constexpr,
                     RMS: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, ROWS: tl.constexpr,
                     BLOCK: tl.constexpr):
    """_fwd_kernel's one-block case for ROWS rows at once: each row reduced along axis 1."""
    r = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK)
    rmask = r < rows
    cmask = cols < n
    x = tl.load(x_ptr + r[:, None] * n + cols[None, :], mask=rmask[:, None] & cmask[None, :], other=0.0)
    x0 = tl.load(x_ptr + r * n, mask=rmask, other=0.0).to(tl.float32)
    _normalize_rows(x.to(tl.float32), x0, r, cols, rmask, cmask, n, eps, w_ptr, b_ptr, y_ptr, mean_ptr, rstd_ptr,
                    DTYPE, RMS, HAS_WEIGHT, HAS_BIAS, ROWS)


@triton.jit
def _xhat(x, mean, rstd, winv, b, RMS: tl.constexpr, FROM_OUTPUT: tl.constexpr, HAS_WEIGHT: tl.constexpr,
          HAS_BIAS: tl.constexpr):
    """The normalised input: from x and the statistics, or (FROM_OUTPUT, x is then the forward's
    output y) as (y - bias) * (1 / weight), the reciprocal taken once per column by the caller."""
    if FROM_OUTPUT:
        xhat = x
        if HAS_BIAS:
            xhat = xhat - b
        if HAS_WEIGHT:
            xhat = xhat * winv
    elif RMS:
        xhat = x * rstd
    else:
        xhat = (x - mean) * rstd
    return xhat


@triton.jit
def _bwd_coeffs_kernel(dy_ptr, x_ptr, w_ptr, b_ptr, mean_ptr, rstd_ptr, coeff_ptr, n, RMS: tl.constexpr,
                       HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, FROM_OUTPUT: tl.constexpr,
                       BLOCK: tl.constexpr):
    """Rows longer than one block: the row reductions c1 = mean(xhat * w*dy) and c2 = mean(w*dy),
    one read of the row, so that _bwd_kernel reads it once more instead of once per column block."""
    row = tl.program_id(0).to(tl.int64)
    mean = 0.0
    if not FROM_OUTPUT:
        mean = tl.load(mean_ptr + row)
    rstd = tl.load(rstd_ptr + row)
    c1acc = tl.zeros([BLOCK], dtype=tl.float32)
    c2acc = tl.zeros([BLOCK], dtype=tl.float32)
    for s in range(0, n, BLOCK):
        cc = s + tl.arange(0, BLOCK)
        mm = cc < n
        xx = tl.load(x_ptr + row * n + cc, mask=mm, other=0.0).to(tl.float32)
        gg = tl.load(dy_ptr + row * n + cc, mask=mm, other=0.0).to(tl.float32)
        winv = 1.0
        bb = 0.0
        if HAS_WEIGHT:
            ww = tl.load(w_ptr + cc, mask=mm, other=1.0).to(tl.float32)
            gg = gg * ww
            if FROM_OUTPUT:
                winv = 1.0 / ww
        if FROM_OUTPUT and HAS_BIAS:
            bb = tl.load(b_ptr + cc, mask=mm, other=0.0).to(tl.float32)
        xh = _xhat(xx, mean, rstd, winv, bb, RMS, FROM_OUTPUT, HAS_WEIGHT, HAS_BIAS)
        c1acc += tl.where(mm, xh * gg, 0.0)
        c2acc += gg
    tl.store(coeff_ptr + 2 * row, tl.sum(c1acc, axis=0) / n)
    tl.store(coeff_ptr + 2 * row + 1, tl.sum(c2acc, axis=0) / n)


@triton.jit
def _bwd_kernel(dy_ptr, x_ptr, w_ptr, b_ptr, mean_ptr, rstd_ptr, coeff_ptr, dx_ptr, dw_part_ptr, db_part_ptr, rows,
                n, rows_per_program, DTYPE: tl.constexpr, RMS: tl.constexpr, HAS_WEIGHT: tl.constexpr,
                HAS_BIAS: tl.constexpr, FROM_OUTPUT: tl.constexpr, BLOCK: tl.constexpr, ONE_BLOCK: tl.constexpr,
                ROW_STAGES: tl.constexpr):
    """Rows [pid * rows_per_program, ...): dx per row; this program's dweight/dbias partial
    (column block by column block when n > BLOCK). A row that fits one block is read once and its
    c1/c2 reduced in registers; a longer row takes them from _bwd_coeffs_kernel."""
    pid = tl.program_id(0)
    first = pid.to(tl.int64) * rows_per_program
    # The row range as the loop bound (no `if row < rows` in the body). ROW_STAGES > 1 makes Triton
    # prefetch the next rows through shared memory (cp.async in the PTX); 1 (no prefetch) stays the
    # default until a GPU measures the difference (bench_nn's "-rowstages2" rows).
    last = tl.minimum(first + rows_per_program, rows)
    for col0 in range(0, n, BLOCK):
        cols = col0 + tl.arange(0, BLOCK)
        cmask = cols < n
        winv = 1.0
        b = 0.0
        if HAS_WEIGHT:
            w = tl.load(w_ptr + cols, mask=cmask, other=1.0).to(tl.float32)
            if FROM_OUTPUT:
                winv = 1.0 / w
        if FROM_OUTPUT and HAS_BIAS:
            b = tl.load(b_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
        dw_acc = tl.zeros([BLOCK], dtype=tl.float32)
        db_acc = tl.zeros([BLOCK], dtype=tl.float32)
        for row in tl.range(first, last, num_stages=ROW_STAGES):
            mean = 0.0
            if not FROM_OUTPUT:
                mean = tl.load(mean_ptr + row)
            rstd = tl.load(rstd_ptr + row)
            x = tl.load(x_ptr + row * n + cols, mask=cmask, other=0.0).to(tl.float32)
            dy = tl.load(dy_ptr + row * n + cols, mask=cmask, other=0.0).to(tl.float32)
            xhat = _xhat(x, mean, rstd, winv, b, RMS, FROM_OUTPUT, HAS_WEIGHT, HAS_BIAS)
            if HAS_WEIGHT:
                wdy = dy * w
            else:
                wdy = dy
            if ONE_BLOCK:
                c1 = tl.sum(tl.where(cmask, xhat * wdy, 0.0), axis=0) / n
                c2 = tl.sum(wdy, axis=0) / n
            else:
                c1 = tl.load(coeff_ptr + 2 * row)
                c2 = tl.load(coeff_ptr + 2 * row + 1)
            if RMS:
                dx = (wdy - xhat * c1) * rstd
            else:
                dx = (wdy - (xhat * c1 + c2)) * rstd
            tl.store(dx_ptr + row * n + cols, round_to(dx, DTYPE), mask=cmask)
            dw_acc += tl.where(cmask, dy * xhat, 0.0)
            db_acc += dy
        if HAS_WEIGHT:
            tl.store(dw_part_ptr + pid * n + cols, dw_acc, mask=cmask)
        if HAS_BIAS:
            tl.store(db_part_ptr + pid * n + cols, db_acc, mask=cmask)


@triton.jit
def _bwd_rows_kernel(dy_ptr, x_ptr, w_ptr, b_ptr, mean_ptr, rstd_ptr, dx_ptr, dw_part_ptr, db_part_ptr, rows, n,
                     rows_per_program, DTYPE: tl.constexpr, RMS: tl.constexpr, HAS_WEIGHT: tl.constexpr,
                     HAS_BIAS: tl.constexpr, FROM_OUTPUT: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr):
    """_bwd_kernel for short rows: rows [pid * rows_per_program, ...) a ROWS x BLOCK tile at a time;
    the dweight/dbias partials accumulate per tile row and are summed over the tile once, at the end."""
    pid = tl.program_id(0)
    first = pid.to(tl.int64) * rows_per_program
    last = tl.minimum(first + rows_per_program, rows)
    cols = tl.arange(0, BLOCK)
    cmask = cols < n
    winv = 1.0
    b = 0.0
    if HAS_WEIGHT:
        w = tl.load(w_ptr + cols, mask=cmask, other=1.0).to(tl.float32)[None, :]
        if FROM_OUTPUT:
            winv = 1.0 / w
    if FROM_OUTPUT and HAS_BIAS:
        b = tl.load(b_ptr + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
    dw_acc = tl.zeros([ROWS, BLOCK], dtype=tl.float32)
    db_acc = tl.zeros([ROWS, BLOCK], dtype=tl.float32)
    for start in range(first, last, ROWS):
        r = start + tl.arange(0, ROWS).to(tl.int64)
        rmask = r < last
        mask = rmask[:, None] & cmask[None, :]
        addr = r[:, None] * n + cols[None, :]
        mean = 0.0
        if not FROM_OUTPUT:
            mean = tl.load(mean_ptr + r, mask=rmask, other=0.0)[:, None]
        rstd = tl.load(rstd_ptr + r, mask=rmask, other=0.0)[:, None]
        x = tl.load(x_ptr + addr, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + addr, mask=mask, other=0.0).to(tl.float32)
        xhat = tl.where(mask, _xhat(x, mean, rstd, winv, b, RMS, FROM_OUTPUT, HAS_WEIGHT, HAS_BIAS), 0.0)
        if HAS_WEIGHT:
            wdy = dy * w
        else:
            wdy = dy
        c1 = tl.sum(xhat * wdy, axis=1)[:, None] / n
        if RMS:
            dx = (wdy - xhat * c1) * rstd
        else:
            dx = (wdy - (xhat * c1 + tl.sum(wdy, axis=1)[:, None] / n)) * rstd
        tl.store(dx_ptr + addr, round_to(dx, DTYPE), mask=mask)
        dw_acc += dy * xhat
        db_acc += dy
    if HAS_WEIGHT:
        tl.store(dw_part_ptr + pid * n + cols, tl.sum(dw_acc, axis=0), mask=cmask)
    if HAS_BIAS:
        tl.store(db_part_ptr + pid * n + cols, tl.sum(db_acc, axis=0), mask=cmask)


def row_warps(block: int, per_thread: int, least: int = 1, most: int = 32) -> int:
    """Warps that give each thread about `per_thread` elements of a BLOCK-wide row (between `least`
    and `most`): what a kernel keeps per element then fits in registers without spilling
    (benchmarks/kernel_resources.py reports registers and spills per launch for sm_90)."""
    return min(max(block // (32 * per_thread), least), most)


def _block(n: int) -> tuple[int, bool]:
    block = min(next_power_of_2(max(n, 1)), MAX_BLOCK)
    return block, n <= block


def layer_norm_fwd(x, weight, bias, eps: float, rms: bool):
    rows, n = x.shape
    y = torch.empty_like(x)
    mean = torch.empty(rows, device=x.device, dtype=torch.float32)
    rstd = torch.empty(rows, device=x.device, dtype=torch.float32)
    if rows == 0 or n == 0:
        return y, mean.zero_(), rstd.zero_()
    block, one = _block(n)
    if block <= SHORT_ROW:
        tile_rows = ROW_TILE // block
        _fwd_rows_kernel[(cdiv(rows, tile_rows),)](x, y, weight if weight is not None else x,
                                                   bias if bias is not None else x, mean, rstd, rows, n, eps,
                                                   DTYPE=tl_dtype(x.dtype), RMS=rms, HAS_WEIGHT=weight is not None,
                                                   HAS_BIAS=bias is not None, ROWS=tile_rows, BLOCK=block)
        return y, mean, rstd
    _fwd_kernel[(rows,)](x, y, weight if weight is not None else x, bias if bias is not None else x, mean, rstd,
                         n, eps, DTYPE=tl_dtype(x.dtype), RMS=rms, HAS_WEIGHT=weight is not None,
                         HAS_BIAS=bias is not None, BLOCK=block, ONE_BLOCK=one)
    return y, mean, rstd


@functools.lru_cache(maxsize=None)
def bwd_programs(device: torch.device) -> int:
    """Backward programs to aim for: enough to fill the GPU (four per SM), few enough that the
    dweight/dbias partials stay small; a fixed function of the device and shape, so the summation
    order, hence the gradients' bits, never change between runs. A few in the interpreter."""
    if device.type != "cuda":
        return 4
    return 4 * torch.cuda.get_device_properties(device).multi_processor_count


def layer_norm_bwd(dy, x, weight, bias, mean, rstd, rms: bool, from_output: bool):
    rows, n = x.shape
    dx = torch.empty_like(x)
    block, one = _block(n)
    # Rows in whole tiles (short rows) or one at a time, spread over about bwd_programs programs.
    tile_rows = ROW_TILE // block if block <= SHORT_ROW else 1
    programs = max(1, min(cdiv(rows, tile_rows), bwd_programs(x.device)))
    rows_per_program = cdiv(cdiv(max(rows, 1), programs), tile_rows) * tile_rows
    programs = cdiv(max(rows, 1), rows_per_program)
    has_bias = bias is not None
    dw_part = torch.empty(programs, n, device=x.device, dtype=torch.float32) if weight is not None else None
    db_part = torch.empty(programs, n, device=x.device, dtype=torch.float32) if has_bias else None
    if rows and n:
        w = weight if weight is not None else x
        b = bias if has_bias else x
        flags = dict(RMS=rms, HAS_WEIGHT=weight is not None, HAS_BIAS=has_bias, FROM_OUTPUT=from_output)
        if block <= SHORT_ROW:
            _bwd_rows_kernel[(programs,)](dy, x, w, b, mean, rstd, dx, dw_part if dw_part is not None else dx,
                                          db_part if db_part is not None else dx, rows, n, rows_per_program,
                                          DTYPE=tl_dtype(x.dtype), ROWS=tile_rows, BLOCK=block,
                                          num_warps=4, **flags)
            return _finish_bwd(dx, dw_part, db_part)
        coeffs = mean  # unused when the row fits one block
        if not one:
            coeffs = torch.empty(rows, 2, device=x.device, dtype=torch.float32)
            _bwd_coeffs_kernel[(rows,)](dy, x, w, b, mean, rstd, coeffs, n, BLOCK=block,
                                        num_warps=row_warps(block, 16, 4), **flags)
        # Warps grow with the block so that x, dy, w and the two partials stay in registers.
        _bwd_kernel[(programs,)](dy, x, w, b, mean, rstd, coeffs, dx,
                                 dw_part if dw_part is not None else dx, db_part if db_part is not None else dx,
                                 rows, n, rows_per_program, DTYPE=tl_dtype(x.dtype), BLOCK=block, ONE_BLOCK=one,
                                 ROW_STAGES=BWD_ROW_STAGES, num_warps=row_warps(block, 8, most=16), **flags)
    else:
        for t in (dw_part, db_part):
            if t is not None:
                t.zero_()
    return _finish_bwd(dx, dw_part, db_part)


def _finish_bwd(dx, dw_part, db_part):
    """dx and the per-program partials summed in program order (fixed: the same bits every run)."""
    return dx, (dw_part.sum(0) if dw_part is not None else None), (db_part.sum(0) if db_part is not None else None)
