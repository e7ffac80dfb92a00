"""Global 2-norm / inf-norm of a tensor list in Triton (clip_grad_norm_): one launch writes a
partial per chunk, then one reduction of the partials (deterministic, no atomics)."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .multi_tensor import chunk_table, pointer_table, tl_dtype

CHUNK = 4096


@triton.jit
def _norm_partials_kernel(ptrs, chunks, partials, DTYPE: tl.constexpr, INF: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    row = tl.load(chunks + pid * 3)
    begin = tl.load(chunks + pid * 3 + 1)
    end = tl.load(chunks + pid * 3 + 2)
    x_ptr = tl.load(ptrs + row).to(tl.pointer_type(DTYPE))
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, tl.cdiv(end - begin, BLOCK)):
        offs = begin + start * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
        x = tl.load(x_ptr + offs, mask=offs < end, other=0.0).to(tl.float32)
        if INF:
            a = tl.abs(x)
            acc = tl.where((a != a) | (a > acc), a, acc)  # NaN-propagating max
        else:
            acc = acc + x * x
    if INF:
        # A NaN anywhere makes the norm NaN, as in torch (spelled out: the GPU's max drops NaN).
        nans = tl.sum((acc != acc).to(tl.int32), axis=0)
        result = tl.where(nans > 0, float("nan"), tl.max(tl.where(acc != acc, 0.0, acc), axis=0))
    else:
        result = tl.sum(acc, axis=0)
    tl.store(partials + pid, result)


def multi_tensor_norm(tensors, norm_type: float, *, chunk: int = CHUNK) -> torch.Tensor:
    tensors = [t if t.is_contiguous() else t.contiguous() for t in tensors]
    device = tensors[0].device
    inf = norm_type == float("inf")
    ptrs = pointer_table([tensors], len(tensors), device, ("tensors",))
    chunks = chunk_table([t.numel() for t in tensors], chunk, device)
    partials = torch.zeros(chunks.shape[0], device=device, dtype=torch.float32)
    _norm_partials_kernel[(chunks.shape[0],)](ptrs, chunks, partials, DTYPE=tl_dtype(tensors[0].dtype), INF=inf,
                                              BLOCK=min(chunk, 1024))
    return partials.amax() if inf else partials.sum().sqrt()
