"""Multi-tensor SGD (momentum, dampening, Nesterov) in Triton: one launch per (device, dtype) group.
Same element math as csrc/include/fusedtech/sgd.h."""
from __future__ import annotations

import triton
import triton.language as tl

from .multi_tensor import (chunk_of, chunk_table, launch_scalars, load_param, pointer_table, live_end,
                           store_param, tl_dtype)
from .rounding import round_to

CHUNK = 2048  # elements per program


@triton.jit
def _sgd_kernel(ptrs, chunks, lr, lr_ptr, grad_scale_ptr, found_inf_ptr, momentum, one_minus_dampening,
                weight_decay, PARAM: tl.constexpr, STATE: tl.constexpr, HAS_MASTER: tl.constexpr,
                MOMENTUM: tl.constexpr, FIRST_STEP: tl.constexpr, NESTEROV: tl.constexpr,
                HAS_WEIGHT_DECAY: tl.constexpr, MAXIMIZE: tl.constexpr, HAS_LR_PTR: tl.constexpr,
                HAS_GRAD_SCALE: tl.constexpr, HAS_FOUND_INF: tl.constexpr, BLOCK: tl.constexpr):
    row, begin, end = chunk_of(chunks, tl.program_id(0))
    base = ptrs + row * 4  # columns: param, grad, momentum buffer, master
    g_ptr = tl.load(base + 1).to(tl.pointer_type(PARAM))
    if HAS_LR_PTR:
        lr = tl.load(lr_ptr)
    stop = live_end(begin, end, found_inf_ptr, HAS_FOUND_INF)
    if HAS_GRAD_SCALE:
        inv_scale = tl.div_rn(1.0, tl.load(grad_scale_ptr))
    for start in range(0, tl.cdiv(end - begin, BLOCK)):
        offs = begin + start * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
        mask = offs < stop
        p = load_param(base, 0, 3, offs, mask, PARAM, HAS_MASTER)
        g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        if HAS_GRAD_SCALE:
            g = g * inv_scale
        if MAXIMIZE:
            g = -g
        if HAS_WEIGHT_DECAY:
            g = g + weight_decay * p
        if MOMENTUM:
            b_ptr = tl.load(base + 2).to(tl.pointer_type(STATE))
            if FIRST_STEP:
                buf = g
            else:
                buf = tl.load(b_ptr + offs, mask=mask, other=0.0).to(tl.float32) * momentum + one_minus_dampening * g
            tl.store(b_ptr + offs, round_to(buf, STATE), mask=mask)
            if NESTEROV:
                g = g + momentum * buf
            else:
                g = buf
        store_param(base, 0, 3, offs, mask, p + (-lr) * g, PARAM, HAS_MASTER)


def sgd_step_(params, grads, momentum_buffers, master_params, lr, lr_tensor, momentum, dampening, weight_decay,
              nesterov, maximize, first_step, grad_scale, found_inf, *, chunk: int = CHUNK) -> None:
    if not params:
        return
    device = params[0].device
    ptrs = pointer_table([params, grads, momentum_buffers, master_params], len(params), device,
                         ("params", "grads", "momentum_buffers?", "master_params?"))
    chunks = chunk_table([p.numel() for p in params], chunk, device)
    lr_ptr, gs_ptr, fi_ptr = launch_scalars(params[0], lr_tensor, grad_scale, found_inf)
    state_dtype = momentum_buffers[0].dtype if momentum_buffers else params[0].dtype
    _sgd_kernel[(chunks.shape[0],)](
        ptrs, chunks, float(lr), lr_ptr, gs_ptr, fi_ptr, momentum, 1.0 - dampening, weight_decay,
        PARAM=tl_dtype(params[0].dtype), STATE=tl_dtype(state_dtype), HAS_MASTER=bool(master_params),
        MOMENTUM=bool(momentum_buffers), FIRST_STEP=bool(first_step), NESTEROV=bool(nesterov),
        HAS_WEIGHT_DECAY=weight_decay != 0, MAXIMIZE=bool(maximize), HAS_LR_PTR=lr_tensor is not None,
        HAS_GRAD_SCALE=grad_scale is not None, HAS_FOUND_INF=found_inf is not None, BLOCK=min(chunk, 1024))
