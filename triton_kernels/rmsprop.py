"""Multi-tensor RMSprop (plain, centered, momentum) in Triton: one launch per (device, dtype) group.
Same element math as csrc/include/fusedtech/rmsprop.h."""
from __future__ import annotations

import triton
import triton.language as tl

from .multi_tensor import (chunk_of, chunk_table, launch_scalars, load_param, pointer_table, live_end,
                           store_param, tl_dtype)
from .rounding import round_to

CHUNK = 2048


@triton.jit
def _rmsprop_kernel(ptrs, chunks, lr, lr_ptr, grad_scale_ptr, found_inf_ptr, alpha, one_minus_alpha, eps,
                    weight_decay, momentum, PARAM: tl.constexpr, STATE: tl.constexpr, HAS_MASTER: tl.constexpr,
                    CENTERED: tl.constexpr, MOMENTUM: tl.constexpr, HAS_WEIGHT_DECAY: tl.constexpr,
                    MAXIMIZE: tl.constexpr, HAS_LR_PTR: tl.constexpr, HAS_GRAD_SCALE: tl.constexpr,
                    HAS_FOUND_INF: tl.constexpr, BLOCK: tl.constexpr):
    row, begin, end = chunk_of(chunks, tl.program_id(0))
    base = ptrs + row * 6  # columns: param, grad, square_avg, grad_avg, momentum buffer, master
    g_ptr = tl.load(base + 1).to(tl.pointer_type(PARAM))
    sq_ptr = tl.load(base + 2).to(tl.pointer_type(STATE))
    if HAS_LR_PTR:
        lr = tl.load(lr_ptr)
    stop = live_end(begin, end, found_inf_ptr, HAS_FOUND_INF)
    if HAS_GRAD_SCALE:
        inv_scale = tl.div_rn(1.0, tl.load(grad_scale_ptr))
    for start in range(0, tl.cdiv(end - begin, BLOCK)):
        offs = begin + start * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
        mask = offs < stop
        p = load_param(base, 0, 5, offs, mask, PARAM, HAS_MASTER)
        g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        if HAS_GRAD_SCALE:
            g = g * inv_scale
        if MAXIMIZE:
            g = -g
        if HAS_WEIGHT_DECAY:
            g = g + weight_decay * p
        sq = tl.load(sq_ptr + offs, mask=mask, other=0.0).to(tl.float32) * alpha + one_minus_alpha * g * g
        tl.store(sq_ptr + offs, round_to(sq, STATE), mask=mask)
        if CENTERED:
            ga_ptr = tl.load(base + 3).to(tl.pointer_type(STATE))
            ga = tl.load(ga_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            if one_minus_alpha < 0.5:  # torch.lerp's two formulas
                ga = ga + one_minus_alpha * (g - ga)
            else:
                ga = g - (g - ga) * (1.0 - one_minus_alpha)
            tl.store(ga_ptr + offs, round_to(ga, STATE), mask=mask)
            avg = tl.sqrt_rn(sq + (-1.0 * ga) * ga)
        else:
            avg = tl.sqrt_rn(sq)
        avg = avg + eps
        if MOMENTUM:
            b_ptr = tl.load(base + 4).to(tl.pointer_type(STATE))
            buf = tl.load(b_ptr + offs, mask=mask, other=0.0).to(tl.float32) * momentum + tl.div_rn(g, avg)
            tl.store(b_ptr + offs, round_to(buf, STATE), mask=mask)
            p = p + (-lr) * buf
        else:
            p = p + tl.div_rn((-lr) * g, avg)
        store_param(base, 0, 5, offs, mask, p, PARAM, HAS_MASTER)


def rmsprop_step_(params, grads, square_avgs, grad_avgs, momentum_buffers, master_params, lr, lr_tensor, alpha,
                  eps, weight_decay, momentum, maximize, grad_scale, found_inf, *, chunk: int = CHUNK) -> None:
    if not params:
        return
    device = params[0].device
    ptrs = pointer_table([params, grads, square_avgs, grad_avgs, momentum_buffers, master_params], len(params), device,
                         ("params", "grads", "square_avgs", "grad_avgs?", "momentum_buffers?", "master_params?"))
    chunks = chunk_table([p.numel() for p in params], chunk, device)
    lr_ptr, gs_ptr, fi_ptr = launch_scalars(params[0], lr_tensor, grad_scale, found_inf)
    _rmsprop_kernel[(chunks.shape[0],)](
        ptrs, chunks, float(lr), lr_ptr, gs_ptr, fi_ptr, alpha, 1.0 - alpha, eps, weight_decay, momentum,
        PARAM=tl_dtype(params[0].dtype), STATE=tl_dtype(square_avgs[0].dtype), HAS_MASTER=bool(master_params),
        CENTERED=bool(grad_avgs), MOMENTUM=bool(momentum_buffers), HAS_WEIGHT_DECAY=weight_decay != 0,
        MAXIMIZE=bool(maximize), HAS_LR_PTR=lr_tensor is not None, HAS_GRAD_SCALE=grad_scale is not None,
        HAS_FOUND_INF=found_inf is not None, BLOCK=min(chunk, 1024))
