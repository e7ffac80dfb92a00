"""Blockwise quantization of optimizer states (oracle).

A state tensor is stored as one code per element (an index into a sorted table of 2**bits values in
[-1, 1]) and one float32 absmax per block of BLOCK consecutive elements, in the tensor's memory order:
value = code_table[code] * absmax. Quantizing a block divides by its absmax (as x * (1 / absmax),
absmax clamped below at 1e-38 so an all-zero block stays zero) and takes the nearest table entry;
a value exactly between two entries takes the lower one (the count of midpoints below it, which is
``torch.bucketize``'s rule and bitsandbytes'). A NaN in a block makes its absmax NaN, so the whole
block reads back NaN: a non-finite state is never silently zeroed.

The 8-bit tables are the dynamic (tree) maps of Dettmers, "8-Bit Approximations for Parallelism in
Deep Learning" (2015), as bitsandbytes builds them: each decade 10**-k (k = 6..0) holds linearly
spaced fractions, more of them in the larger decades; signed for first moments, unsigned (twice the
resolution on [0, 1]) for second moments. Built the same way here (float32 linspace, midpoints and
products), they are bitsandbytes' tables bit for bit, so its checkpoints'
codes mean the same values.

The FP8 table (``state_dtype="fp8"``, both moments, as torchao's AdamWFp8) holds the values of E4M3
(torch.float8_e4m3fn) scaled to [-1, 1]: a block's values are E4M3 numbers times absmax / 448. A code
is a value's rank among E4M3's 253 finite values (0 is -448, 126 is zero, 252 is 448), so the same
sorted-table search quantizes it: the nearest E4M3 value of x * 448 / absmax (up to the float32
rounding of the scaled table). :func:`e4m3_bits` gives the float8_e4m3fn bit pattern of each code.
"""
from __future__ import annotations

import functools

import torch

BLOCK = 256
_ABSMAX_FLOOR = 1e-38


@functools.lru_cache(maxsize=None)
def dynamic_map(signed: bool) -> torch.Tensor:
    """The 256 sorted float32 values of the 8-bit dynamic map (CPU; do not modify)."""
    values = [0.0, 1.0]
    for level in range(7):
        fractions = torch.linspace(0.1, 1, (2 ** level if signed else 2 ** (level + 1)) + 1, dtype=torch.float32)
        means = (fractions[:-1] + fractions[1:]) / 2.0
        scale = 10.0 ** (level - 6)
        values += (scale * means).tolist()  # a float32 product, as bitsandbytes forms it
        if signed:
            values += (-scale * means).tolist()
    table = torch.tensor(sorted(values), dtype=torch.float32)
    assert table.numel() == 256
    return table


@functools.lru_cache(maxsize=None)
def e4m3_map() -> torch.Tensor:
    """The 256 sorted float32 entries of the FP8 table: E4M3's 253 finite values (one zero) / 448,
    then three +inf no value quantizes to (their midpoints are inf: a table of 256, as the kernels
    take; CPU; do not modify)."""
    values = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(torch.float8_e4m3fn).float()
    finite = sorted(set(values[torch.isfinite(values)].tolist()))  # NaN (0x7F, 0xFF) out, -0 == 0
    table = torch.tensor(finite, dtype=torch.float32) / 448.0
    assert table.numel() == 253
    return torch.cat([table, torch.full((3,), float("inf"))])


def e4m3_bits(codes: torch.Tensor) -> torch.Tensor:
    """The torch.float8_e4m3fn bit patterns (uint8) of FP8-table codes: rank r < 126 is the negative
    value 0xFE - r, rank r >= 126 the non-negative value r - 126."""
    c = codes.to(torch.int16)
    return torch.where(c < 126, 0xFE - c, c - 126).to(torch.uint8)


QUANTIZED_STATE_DTYPES = ("int8", "fp8")


def code_table(state_dtype: str, signed: bool) -> torch.Tensor:
    """The table of a quantized state format: 8-bit dynamic maps (signed for first moments) or E4M3's."""
    if state_dtype == "int8":
        return dynamic_map(signed)
    if state_dtype == "fp8":
        return e4m3_map()
    raise ValueError(f"fusedtech: a quantized state_dtype is one of {QUANTIZED_STATE_DTYPES}, got {state_dtype!r}")


def midpoints(table: torch.Tensor) -> torch.Tensor:
    """The decision boundaries between neighbouring table entries, in float32."""
    return (table[:-1] + table[1:]) / 2


def _in_memory_order(t: torch.Tensor) -> torch.Tensor:
    order = sorted(range(t.dim()), key=lambda d: (t.stride(d), t.size(d)), reverse=True)
    return t.permute(order)


def dense(t: torch.Tensor) -> bool:
    """Its elements fill their storage span, in some dim order (what the kernels walk as flat memory)."""
    return t.numel() == 0 or _in_memory_order(t).is_contiguous()


def memory_order(t: torch.Tensor) -> torch.Tensor:
    """A 1-D view of a dense tensor in the order its elements sit in memory (the kernels' order)."""
    if t.dim() == 0:
        return t.reshape(1)
    view = _in_memory_order(t)
    if not view.is_contiguous():
        raise ValueError("fusedtech: a quantized state must be dense (no gaps or overlaps in memory)")
    return view.reshape(-1)


def blocks_of(numel: int, block: int = BLOCK) -> int:
    return -(-numel // block)


def quantize_blockwise(x: torch.Tensor, table: torch.Tensor, block: int = BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes uint8 shaped and laid out like x, absmax float32 [blocks]) of a dense tensor x."""
    codes = torch.empty_like(x, dtype=torch.uint8)
    absmax = torch.empty(blocks_of(x.numel(), block), dtype=torch.float32, device=x.device)
    quantize_blockwise_(x, codes, absmax, table, block)
    return codes, absmax


def quantize_blockwise_(x: torch.Tensor, codes: torch.Tensor, absmax: torch.Tensor, table: torch.Tensor,
                        block: int = BLOCK) -> None:
    """Quantize x into the given codes and absmax (in place)."""
    flat = memory_order(x).float()
    n = flat.numel()
    if n == 0:
        return
    padded = torch.zeros(blocks_of(n, block) * block, dtype=torch.float32, device=flat.device)
    padded[:n] = flat
    rows = padded.view(-1, block)
    amax = rows.abs().amax(dim=1)  # NaN-propagating, as the kernels' maximum
    inverse = 1.0 / amax.clamp(min=_ABSMAX_FLOOR)
    scaled = (rows * inverse[:, None]).view(-1)[:n]
    mids = midpoints(table.to(flat.device))
    q = torch.bucketize(scaled, mids)  # count of midpoints below: the lower entry on a tie
    q = torch.where(torch.isnan(scaled), 0, q)  # NaN compares below nothing (its block reads NaN)
    memory_order(codes).copy_(q.to(torch.uint8))
    absmax.copy_(amax)


def dequantize_blockwise(codes: torch.Tensor, absmax: torch.Tensor, table: torch.Tensor,
                         block: int = BLOCK) -> torch.Tensor:
    """float32 values shaped and laid out like codes."""
    out = torch.empty_like(codes, dtype=torch.float32)
    n = codes.numel()
    if n == 0:
        return out
    flat = memory_order(codes).long()
    scale = absmax.to(torch.float32).repeat_interleave(block)[:n]
    memory_order(out).copy_(table.to(codes.device)[flat] * scale)
    return out
