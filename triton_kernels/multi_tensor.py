"""Tensor tables for multi-tensor Triton kernels: one launch covers every tensor of a list.

A launch gets two int64 tables: per tensor, the addresses of its operands (one column per list:
param, grad, states...); per program, the chunk it owns (tensor row, first element, end). Kernels
cast a table entry to a typed pointer. Both tables are cached: parameters and optimizer states keep
their storage across steps, so after the first step a table is rebuilt only when an address moves
(a new .grad allocation, typically) and uploaded to the device once per change.
"""
from __future__ import annotations

from collections import OrderedDict

import torch

_CACHE_SIZE = 8
_ptr_cache: OrderedDict = OrderedDict()
_chunk_cache: OrderedDict = OrderedDict()


def _remember(cache: OrderedDict, key, value):
    cache[key] = value
    if len(cache) > _CACHE_SIZE:
        cache.popitem(last=False)
    return value


def _upload(rows, device) -> torch.Tensor:
    table = torch.tensor(rows, dtype=torch.int64)
    if device.type == "cpu":
        return table
    return table.pin_memory().to(device, non_blocking=True)


def pointer_table(lists: list[list[torch.Tensor]], n: int, device: torch.device) -> torch.Tensor:
    """[n, len(lists)] int64 addresses; an empty list gives a column of zeros (an unused operand)."""
    cols = [[t.data_ptr() for t in lst] if lst else [0] * n for lst in lists]
    key = (device, tuple(tuple(c) for c in cols))
    hit = _ptr_cache.get(key)
    if hit is not None:
        _ptr_cache.move_to_end(key)
        return hit
    return _remember(_ptr_cache, key, _upload(list(map(list, zip(*cols))), device))


def chunk_table(numels: list[int], chunk: int, device: torch.device) -> torch.Tensor:
    """[programs, 3] int64 rows (tensor row, begin, end); empty tensors get no program."""
    key = (device, chunk, tuple(numels))
    hit = _chunk_cache.get(key)
    if hit is not None:
        _chunk_cache.move_to_end(key)
        return hit
    rows = [[t, b, min(n, b + chunk)] for t, n in enumerate(numels) for b in range(0, n, chunk)]
    if not rows:
        rows = [[0, 0, 0]]
    return _remember(_chunk_cache, key, _upload(rows, device))


def tensor_chunk_ranges(numels: list[int], chunk: int, device: torch.device) -> torch.Tensor:
    """[tensors, 2] int64 rows (first program of the tensor in chunk_table's order, program count)."""
    key = (device, chunk, tuple(numels), "ranges")
    hit = _chunk_cache.get(key)
    if hit is not None:
        return hit
    rows, first = [], 0
    for n in numels:
        count = (n + chunk - 1) // chunk
        rows.append([first, count])
        first += count
    return _remember(_chunk_cache, key, _upload(rows, device))


_DTYPES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}


def tl_dtype(dtype: torch.dtype):
    import triton.language as tl
    if dtype not in _DTYPES:
        raise TypeError(f"fusedtech: Triton kernels take float32, float16 or bfloat16 tensors, got {dtype}")
    return getattr(tl, _DTYPES[dtype])


def launch_scalars(like: torch.Tensor, lr_tensor, grad_scale, found_inf):
    """Pointers for the optional scalar operands; an absent one passes a placeholder the kernel
    never reads (its HAS_* flag is off)."""
    lr_ptr = lr_tensor.to(device=like.device, dtype=torch.float32) if lr_tensor is not None else like
    return lr_ptr, grad_scale if grad_scale is not None else like, found_inf if found_inf is not None else like
