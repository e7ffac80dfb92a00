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
import triton
import triton.language as tl

from .rounding import round_bf16_stochastic, round_to, stochastic_round_draws

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


def pointer_table(lists: list[list[torch.Tensor]], n: int, device: torch.device, names: tuple) -> torch.Tensor:
    """[n, len(lists)] int64 addresses; an empty list gives a column of zeros (an unused operand,
    allowed where its name in `names` ends in '?'). The first list holds the parameters (or the
    tensors); the kernels read every other list (but 'steps', one-element, and those whose name ends
    in '*', which their launcher checks: a quantized state's absmax) element for element with it, so a
    new table is checked for that first: a wrong list would be read out of bounds."""
    for lst, name in zip(lists, names):
        if len(lst) != n and (lst or "?" not in name):
            raise RuntimeError(f"fusedtech: {name.strip('?*')} has {len(lst)} tensors, expected {n}")
    cols = [[t.data_ptr() for t in lst] if lst else [0] * n for lst in lists]
    key = (device, tuple(tuple(c) for c in cols))
    hit = _ptr_cache.get(key)
    if hit is not None:
        _ptr_cache.move_to_end(key)
        return hit
    _check_lists(lists, names, device)
    return _remember(_ptr_cache, key, _upload(list(map(list, zip(*cols))), device))


def _check_lists(lists, names, device) -> None:
    """One dtype per list (the kernel takes one), on `device`; every list but steps laid out as the
    first (same numels and strides: the kernels index them with one flat offset); grads of the
    parameters' dtype, master_params float32, steps one float32 element."""
    first = lists[0]
    numels = list(map(torch.Tensor.numel, first))
    for lst, name in zip(lists, names):
        own_layout, name = "*" in name, name.strip("?*")
        if not lst:
            continue
        dtypes, devices = set(map(_dtype, lst)), set(map(_device, lst))
        if len(dtypes) != 1 or devices != {device}:
            raise RuntimeError(f"fusedtech: {name} must hold tensors of one dtype on {device}, got "
                             f"{sorted(map(str, dtypes))} on {sorted(map(str, devices))}")
        dtype = dtypes.pop()
        expected = {"grads": first[0].dtype, "master_params": torch.float32, "steps": torch.float32}.get(name)
        if expected is not None and dtype != expected:
            raise RuntimeError(f"fusedtech: {name} must be {expected}, got {dtype}")
        if own_layout:
            continue
        if name == "steps":
            if set(map(torch.Tensor.numel, lst)) != {1}:
                raise RuntimeError("fusedtech: steps must hold one-element tensors")
        elif list(map(torch.Tensor.numel, lst)) != numels or not all(map(_same_order, lst, first)):
            raise RuntimeError(f"fusedtech: {name} must match {names[0]} tensor for tensor in shape and strides")


_dtype, _device = (lambda t: t.dtype), (lambda t: t.device)


def _same_order(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Elements in the same memory order: strides agree wherever a dim has more than one element."""
    return a.shape == b.shape and all(sa == sb for n, sa, sb in zip(a.shape, a.stride(), b.stride()) if n > 1)


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


@triton.jit
def chunk_of(chunks, pid):
    """(tensor row, first element, end) of program pid's chunk in a chunk_table."""
    return tl.load(chunks + pid * 3), tl.load(chunks + pid * 3 + 1), tl.load(chunks + pid * 3 + 2)


@triton.jit
def live_end(begin, end, found_inf_ptr, HAS_FOUND_INF: tl.constexpr):
    """Where the chunk's live elements end: `end`, or `begin` when GradScaler found inf/nan (then the
    step changes nothing). A bound rather than a scalar flag and-ed into the block mask: the same
    instructions on a GPU, and Triton 3.9's interpreter refuses a mask made by and-ing a block with a
    scalar (it widens the bools to integers)."""
    if HAS_FOUND_INF:
        end = tl.where(tl.load(found_inf_ptr) == 0, end, begin)
    return end


@triton.jit
def load_param(base, col_param, col_master, offs, mask, PARAM: tl.constexpr, HAS_MASTER: tl.constexpr):
    """The fp32 working value of a parameter: its fp32 master copy, or the parameter upcast."""
    if HAS_MASTER:
        return tl.load(tl.load(base + col_master).to(tl.pointer_type(tl.float32)) + offs, mask=mask, other=0.0)
    return tl.load(tl.load(base + col_param).to(tl.pointer_type(PARAM)) + offs, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def store_param(base, col_param, col_master, offs, mask, p, PARAM: tl.constexpr, HAS_MASTER: tl.constexpr):
    if HAS_MASTER:
        tl.store(tl.load(base + col_master).to(tl.pointer_type(tl.float32)) + offs, p, mask=mask)
    tl.store(tl.load(base + col_param).to(tl.pointer_type(PARAM)) + offs, round_to(p, PARAM), mask=mask)


@triton.jit
def store_param_rounded(base, col_param, col_master, offs, mask, p, row, step, seed, PARAM: tl.constexpr,
                        HAS_MASTER: tl.constexpr, STOCHASTIC_ROUND: tl.constexpr):
    """store_param, or for bf16 parameters without masters rounded stochastically (rounding.py)."""
    if STOCHASTIC_ROUND:
        draw = stochastic_round_draws(seed, offs, step, row)
        tl.store(tl.load(base + col_param).to(tl.pointer_type(tl.bfloat16)) + offs, round_bf16_stochastic(p, draw),
                 mask=mask)
    else:
        store_param(base, col_param, col_master, offs, mask, p, PARAM, HAS_MASTER)


def launch_scalars(like: torch.Tensor, lr_tensor, grad_scale, found_inf):
    """Pointers for the optional scalar operands; an absent one passes a placeholder the kernel
    never reads (its HAS_* flag is off)."""
    lr_ptr = lr_tensor.to(device=like.device, dtype=torch.float32) if lr_tensor is not None else like
    return lr_ptr, grad_scale if grad_scale is not None else like, found_inf if found_inf is not None else like
