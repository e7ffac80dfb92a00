"""Multi-tensor Adagrad in Triton: one launch per (device, dtype) group. Same element math as
csrc/include/fusedtech/adagrad.h; the decayed learning rate is computed per program from the
tensor's step, on the device (no host synchronisation)."""
from __future__ import annotations

import triton
import triton.language as tl

from .multi_tensor import (chunk_of, chunk_table, launch_scalars, load_param, pointer_table, live_end,
                           store_param, tl_dtype)
from .rounding import round_to

CHUNK = 2048


@triton.jit
def _adagrad_kernel(ptrs, chunks, lr, lr_ptr, grad_scale_ptr, found_inf_ptr, lr_decay, eps, weight_decay,
                    PARAM: tl.constexpr, STATE: tl.constexpr, HAS_MASTER: tl.constexpr,
                    HAS_WEIGHT_DECAY: tl.constexpr, MAXIMIZE: tl.constexpr, HAS_LR_PTR: tl.constexpr,
                    HAS_GRAD_SCALE: tl.constexpr, HAS_FOUND_INF: tl.constexpr, BLOCK: tl.constexpr):
    row, begin, end = chunk_of(chunks, tl.program_id(0))
    base = ptrs + row * 5  # columns: param, grad, sum, master, step
    g_ptr = tl.load(base + 1).to(tl.pointer_type(PARAM))
    s_ptr = tl.load(base + 2).to(tl.pointer_type(STATE))
    step = tl.load(tl.load(base + 4).to(tl.pointer_type(tl.float32)))
    if HAS_LR_PTR:
        lr = tl.load(lr_ptr)
    # -lr / (1 + (step - 1) * lr_decay) in float64, as torch computes it in Python floats.
    neg_clr = (-(tl.cast(lr, tl.float64) / (1.0 + (step.to(tl.float64) - 1.0) * tl.cast(lr_decay, tl.float64)))).to(tl.float32)
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
        s = tl.load(s_ptr + offs, mask=mask, other=0.0).to(tl.float32) + 1.0 * g * g
        tl.store(s_ptr + offs, round_to(s, STATE), mask=mask)
        store_param(base, 0, 3, offs, mask, p + tl.div_rn(neg_clr * g, tl.sqrt_rn(s) + eps), PARAM, HAS_MASTER)


def adagrad_step_(params, grads, state_sums, master_params, steps, lr, lr_tensor, lr_decay, weight_decay, eps,
                  maximize, grad_scale, found_inf, *, chunk: int = CHUNK) -> None:
    if not params:
        return
    device = params[0].device
    ptrs = pointer_table([params, grads, state_sums, master_params, steps], len(params), device,
                         ("params", "grads", "state_sums", "master_params?", "steps"))
    chunks = chunk_table([p.numel() for p in params], chunk, device)
    lr_ptr, gs_ptr, fi_ptr = launch_scalars(params[0], lr_tensor, grad_scale, found_inf)
    _adagrad_kernel[(chunks.shape[0],)](
        ptrs, chunks, float(lr), lr_ptr, gs_ptr, fi_ptr, lr_decay, eps, weight_decay,
        PARAM=tl_dtype(params[0].dtype), STATE=tl_dtype(state_sums[0].dtype), HAS_MASTER=bool(master_params),
        HAS_WEIGHT_DECAY=weight_decay != 0, MAXIMIZE=bool(maximize), HAS_LR_PTR=lr_tensor is not None,
        HAS_GRAD_SCALE=grad_scale is not None, HAS_FOUND_INF=found_inf is not None, BLOCK=min(chunk, 1024))
