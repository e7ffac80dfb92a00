"""Multi-tensor Adam/AdamW step in Triton: one launch per (device, dtype) group.

Same element math as csrc/include/fusedtech/adam.h. Bias corrections are computed per program
from the tensor's step in float64 (1 - beta^step loses most of its digits in float32 at small
steps), so the step never leaves the device and no host synchronisation happens.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .multi_tensor import chunk_of, chunk_table, load_param, pointer_table, live_end, store_param, tl_dtype
from .rounding import round_to

CHUNK = 2048  # elements per program
# Column of each operand in the pointer table.
P, G, M, V, VMAX, MASTER, STEP = range(7)


@triton.jit
def _adam_kernel(ptrs, chunks, hyper, lr, lr_ptr, grad_scale_ptr, found_inf_ptr,
                 beta1, beta2, one_minus_beta1, one_minus_beta2, eps, weight_decay,
                 PARAM: tl.constexpr, STATE: tl.constexpr, HAS_MASTER: tl.constexpr,
                 AMSGRAD: tl.constexpr, HAS_WEIGHT_DECAY: tl.constexpr, DECOUPLED: tl.constexpr, MAXIMIZE: tl.constexpr,
                 HAS_LR_PTR: tl.constexpr, HAS_GRAD_SCALE: tl.constexpr, HAS_FOUND_INF: tl.constexpr,
                 BLOCK: tl.constexpr):
    row, begin, end = chunk_of(chunks, tl.program_id(0))
    base = ptrs + row * 7
    g_ptr = tl.load(base + 1).to(tl.pointer_type(PARAM))
    m_ptr = tl.load(base + 2).to(tl.pointer_type(STATE))
    v_ptr = tl.load(base + 3).to(tl.pointer_type(STATE))
    step_ptr = tl.load(base + 6).to(tl.pointer_type(tl.float32))

    # Per-tensor scalars, in float64 like torch's Python-float bias corrections.
    if HAS_LR_PTR:
        lr = tl.load(lr_ptr)
    lr64 = tl.cast(lr, tl.float64)
    step = tl.load(step_ptr).to(tl.float64)
    bias_correction1 = 1.0 - tl.exp(step * tl.load(hyper + 0))  # hyper[0] = log(beta1)
    bias_correction2 = 1.0 - tl.exp(step * tl.load(hyper + 1))  # hyper[1] = log(beta2)
    neg_step_size = (-(lr64 / bias_correction1)).to(tl.float32)
    bias_correction2_sqrt = tl.sqrt(bias_correction2).to(tl.float32)
    decay_factor = (1.0 - lr64 * tl.load(hyper + 2)).to(tl.float32)  # hyper[2] = weight_decay

    stop = live_end(begin, end, found_inf_ptr, HAS_FOUND_INF)
    if HAS_GRAD_SCALE:
        inv_scale = tl.div_rn(1.0, tl.load(grad_scale_ptr))

    for start in range(0, tl.cdiv(end - begin, BLOCK)):
        offs = begin + start * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
        mask = offs < stop
        p = load_param(base, 0, 5, offs, mask, PARAM, HAS_MASTER)  # columns P and MASTER
        g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        m = tl.load(m_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        v = tl.load(v_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        if HAS_GRAD_SCALE:
            g = g * inv_scale
        if MAXIMIZE:
            g = -g
        if HAS_WEIGHT_DECAY:
            if DECOUPLED:
                p = p * decay_factor
            else:
                g = g + weight_decay * p
        # torch.lerp's formula for a weight below 0.5 (1 - beta1 always is for beta1 > 0.5).
        if one_minus_beta1 < 0.5:
            m = m + one_minus_beta1 * (g - m)
        else:
            m = g - (g - m) * (1.0 - one_minus_beta1)
        v = v * beta2 + one_minus_beta2 * g * g
        second = v
        if AMSGRAD:
            vmax_ptr = tl.load(base + 4).to(tl.pointer_type(STATE))
            # NaN propagates into the running maximum, as torch.maximum does.
            vmax = tl.maximum(tl.load(vmax_ptr + offs, mask=mask, other=0.0).to(tl.float32), v,
                              propagate_nan=tl.PropagateNan.ALL)
            tl.store(vmax_ptr + offs, round_to(vmax, STATE), mask=mask)
            second = vmax
        # IEEE sqrt and division (Triton's defaults are approximate) to agree with torch to rounding.
        denom = tl.div_rn(tl.sqrt_rn(second), bias_correction2_sqrt) + eps
        p = p + tl.div_rn(neg_step_size * m, denom)
        store_param(base, 0, 5, offs, mask, p, PARAM, HAS_MASTER)
        tl.store(m_ptr + offs, round_to(m, STATE), mask=mask)
        tl.store(v_ptr + offs, round_to(v, STATE), mask=mask)


_hyper_cache: dict = {}


def _hyper(beta1: float, beta2: float, weight_decay: float, device) -> torch.Tensor:
    key = (beta1, beta2, weight_decay, device)
    if key not in _hyper_cache:
        log1 = math.log(beta1) if beta1 > 0 else -math.inf
        log2 = math.log(beta2) if beta2 > 0 else -math.inf
        _hyper_cache[key] = torch.tensor([log1, log2, weight_decay], dtype=torch.float64, device=device)
    return _hyper_cache[key]


def adam_step_(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, master_params, steps,
               lr, lr_tensor, beta1, beta2, eps, weight_decay, decoupled, amsgrad, maximize,
               grad_scale, found_inf, *, chunk: int = CHUNK) -> None:
    if not params:
        return
    device = params[0].device
    n = len(params)
    ptrs = pointer_table([params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs if amsgrad else [],
                          master_params, steps], n, device,
                         ("params", "grads", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs?", "master_params?", "steps"))
    chunks = chunk_table([p.numel() for p in params], chunk, device)
    state_dtype = exp_avgs[0].dtype
    block = min(chunk, 1024)
    dummy = steps[0]
    lr_ptr = lr_tensor.to(device=device, dtype=torch.float32) if lr_tensor is not None else dummy
    _adam_kernel[(chunks.shape[0],)](
        ptrs, chunks, _hyper(beta1, beta2, weight_decay, device), float(lr), lr_ptr,
        grad_scale if grad_scale is not None else dummy,
        found_inf if found_inf is not None else dummy,
        beta1, beta2, 1.0 - beta1, 1.0 - beta2, eps, weight_decay,
        PARAM=tl_dtype(params[0].dtype), STATE=tl_dtype(state_dtype), HAS_MASTER=bool(master_params),
        AMSGRAD=bool(amsgrad), HAS_WEIGHT_DECAY=weight_decay != 0, DECOUPLED=bool(decoupled), MAXIMIZE=bool(maximize),
        HAS_LR_PTR=lr_tensor is not None, HAS_GRAD_SCALE=grad_scale is not None,
        HAS_FOUND_INF=found_inf is not None, BLOCK=block,
    )
