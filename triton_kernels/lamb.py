"""Multi-tensor LAMB in Triton: three launches per (device, dtype) group (see
csrc/include/fusedtech/lamb.h): moments + per-chunk norm partials; per-tensor trust ratio (one
program per tensor, partials summed in a fixed order: deterministic), which also writes the
tensor's (clamped weight norm, update norm, trust ratio) row of `norms`; update."""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .multi_tensor import (chunk_of, chunk_table, launch_scalars, load_param, pointer_table, live_end,
                           store_param, tensor_chunk_ranges, tl_dtype)
from .rounding import round_to

CHUNK = 2048
# Pointer-table columns.
P, G, M, V, MASTER, STEP = range(6)


@triton.jit
def _bias_corrections(base, log_betas, BIAS_CORRECTION: tl.constexpr):
    """(bc1, sqrt(bc2)) of the tensor whose pointer-table row is `base`, in fp64 rounded to fp32
    (lamb_correction in lamb.h); (1, 1) without bias_correction, where dividing by them is exact."""
    if BIAS_CORRECTION:
        step = tl.load(tl.load(base + 5).to(tl.pointer_type(tl.float32))).to(tl.float64)  # the STEP column
        bc1 = (1.0 - tl.exp(step * tl.load(log_betas + 0))).to(tl.float32)
        sqrt_bc2 = tl.sqrt(1.0 - tl.exp(step * tl.load(log_betas + 1))).to(tl.float32)
    else:
        bc1 = 1.0
        sqrt_bc2 = 1.0
    return bc1, sqrt_bc2


@triton.jit
def _direction(p, m, v, bc1, sqrt_bc2, eps, weight_decay, HAS_WEIGHT_DECAY: tl.constexpr,
               BIAS_CORRECTION: tl.constexpr):
    """u from the stored moments (lamb_direction in lamb.h), in passes 1 and 3 alike."""
    if BIAS_CORRECTION:
        u = tl.div_rn(tl.div_rn(m, bc1), tl.div_rn(tl.sqrt_rn(v), sqrt_bc2) + eps)
    else:
        u = tl.div_rn(m, tl.sqrt_rn(v) + eps)
    if HAS_WEIGHT_DECAY:
        u = u + weight_decay * p
    return u


@triton.jit
def _lamb_moments_kernel(ptrs, chunks, partials, grad_scale_ptr, found_inf_ptr, log_betas, beta1, beta2, grad_coef,
                         one_minus_beta2, eps, weight_decay, PARAM: tl.constexpr, STATE: tl.constexpr,
                         HAS_MASTER: tl.constexpr, HAS_WEIGHT_DECAY: tl.constexpr, HAS_GRAD_SCALE: tl.constexpr,
                         HAS_FOUND_INF: tl.constexpr, BIAS_CORRECTION: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)  # also this program's slot in `partials`
    row, begin, end = chunk_of(chunks, pid)
    base = ptrs + row * 6
    bc1, sqrt_bc2 = _bias_corrections(base, log_betas, BIAS_CORRECTION)
    g_ptr = tl.load(base + 1).to(tl.pointer_type(PARAM))
    m_ptr = tl.load(base + 2).to(tl.pointer_type(STATE))
    v_ptr = tl.load(base + 3).to(tl.pointer_type(STATE))
    stop = live_end(begin, end, found_inf_ptr, HAS_FOUND_INF)
    if HAS_GRAD_SCALE:
        inv_scale = tl.div_rn(1.0, tl.load(grad_scale_ptr))
    wsq = tl.zeros([BLOCK], dtype=tl.float32)
    usq = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, tl.cdiv(end - begin, BLOCK)):
        offs = begin + start * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
        mask = offs < stop
        p = load_param(base, 0, 4, offs, mask, PARAM, HAS_MASTER)
        g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        if HAS_GRAD_SCALE:
            g = g * inv_scale
        m = tl.load(m_ptr + offs, mask=mask, other=0.0).to(tl.float32) * beta1 + grad_coef * g
        v = tl.load(v_ptr + offs, mask=mask, other=0.0).to(tl.float32) * beta2 + one_minus_beta2 * g * g
        tl.store(m_ptr + offs, round_to(m, STATE), mask=mask)
        tl.store(v_ptr + offs, round_to(v, STATE), mask=mask)
        # u from the stored (rounded) moments, exactly as pass 3 will recompute it.
        m = round_to(m, STATE).to(tl.float32)
        v = round_to(v, STATE).to(tl.float32)
        u = tl.where(mask, _direction(p, m, v, bc1, sqrt_bc2, eps, weight_decay, HAS_WEIGHT_DECAY, BIAS_CORRECTION),
                     0.0)
        wsq += p * p
        usq += u * u
    tl.store(partials + pid * 2, tl.sum(wsq, axis=0))
    tl.store(partials + pid * 2 + 1, tl.sum(usq, axis=0))


@triton.jit
def _lamb_ratio_kernel(ptrs, ranges, partials, neg_steps, norms, found_inf_ptr, lr, lr_ptr, log_betas, clamp_lower,
                       clamp_upper, HAS_LR_PTR: tl.constexpr, DEBIAS: tl.constexpr, ADAM: tl.constexpr,
                       TRUST_CLIP: tl.constexpr, HAS_FOUND_INF: tl.constexpr, BLOCK: tl.constexpr):
    t = tl.program_id(0)
    first = tl.load(ranges + t * 2)
    count = tl.load(ranges + t * 2 + 1)
    wsq = tl.zeros([BLOCK], dtype=tl.float32)
    usq = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, tl.cdiv(count, BLOCK)):
        k = start * BLOCK + tl.arange(0, BLOCK)
        mask = k < count
        wsq += tl.load(partials + (first + k) * 2, mask=mask, other=0.0)
        usq += tl.load(partials + (first + k) * 2 + 1, mask=mask, other=0.0)
    # A NaN norm stays NaN through the clamp (torch.clamp's rule): the whole tensor's step is NaN,
    # as torch_optimizer's.
    w = tl.minimum(tl.maximum(tl.sqrt_rn(tl.sum(wsq, axis=0)), clamp_lower, propagate_nan=tl.PropagateNan.ALL),
                   clamp_upper, propagate_nan=tl.PropagateNan.ALL)
    un = tl.sqrt_rn(tl.sum(usq, axis=0))
    if HAS_LR_PTR:
        lr = tl.load(lr_ptr)
    step_size = tl.cast(lr, tl.float64)
    if DEBIAS:
        step = tl.load(tl.load(ptrs + t * 6 + 5).to(tl.pointer_type(tl.float32))).to(tl.float64)
        bc1 = 1.0 - tl.exp(step * tl.load(log_betas + 0))
        bc2 = 1.0 - tl.exp(step * tl.load(log_betas + 1))
        step_size = step_size * (tl.sqrt(bc2) / bc1)
    ratio = tl.where((w == 0.0) | (un == 0.0), 1.0, tl.div_rn(w, tl.where(un == 0.0, 1.0, un)))
    if TRUST_CLIP:  # torch.clamp(max=1): a NaN stays NaN
        ratio = tl.where(ratio > 1.0, 1.0, ratio)
    # A skipped step (found_inf) keeps last step's norms: its partials are zeros, not the norms.
    if HAS_FOUND_INF:
        live = tl.load(found_inf_ptr) == 0
        w = tl.where(live, w, tl.load(norms + t * 3))
        un = tl.where(live, un, tl.load(norms + t * 3 + 1))
        ratio = tl.where(live, ratio, tl.load(norms + t * 3 + 2))
    tl.store(norms + t * 3, w)
    tl.store(norms + t * 3 + 1, un)
    tl.store(norms + t * 3 + 2, ratio)
    if ADAM:
        ratio = 1.0
    tl.store(neg_steps + t, (-step_size).to(tl.float32) * ratio)


@triton.jit
def _lamb_update_kernel(ptrs, chunks, neg_steps, found_inf_ptr, log_betas, eps, weight_decay, PARAM: tl.constexpr,
                        STATE: tl.constexpr, HAS_MASTER: tl.constexpr, HAS_WEIGHT_DECAY: tl.constexpr,
                        HAS_FOUND_INF: tl.constexpr, BIAS_CORRECTION: tl.constexpr, BLOCK: tl.constexpr):
    row, begin, end = chunk_of(chunks, tl.program_id(0))
    base = ptrs + row * 6
    bc1, sqrt_bc2 = _bias_corrections(base, log_betas, BIAS_CORRECTION)
    m_ptr = tl.load(base + 2).to(tl.pointer_type(STATE))
    v_ptr = tl.load(base + 3).to(tl.pointer_type(STATE))
    neg_step = tl.load(neg_steps + row)
    stop = live_end(begin, end, found_inf_ptr, HAS_FOUND_INF)
    for start in range(0, tl.cdiv(end - begin, BLOCK)):
        offs = begin + start * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
        mask = offs < stop
        p = load_param(base, 0, 4, offs, mask, PARAM, HAS_MASTER)
        m = tl.load(m_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        v = tl.load(v_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        u = _direction(p, m, v, bc1, sqrt_bc2, eps, weight_decay, HAS_WEIGHT_DECAY, BIAS_CORRECTION)
        store_param(base, 0, 4, offs, mask, p + neg_step * u, PARAM, HAS_MASTER)


def lamb_step_(params, grads, exp_avgs, exp_avg_sqs, master_params, steps, norms, lr, lr_tensor, beta1, beta2, eps,
               weight_decay, clamp_lower, clamp_upper, debias, adam, grad_averaging, bias_correction, trust_clip,
               grad_scale, found_inf, *, chunk: int = CHUNK) -> None:
    if not params:
        return
    device = params[0].device
    if (norms.dtype != torch.float32 or norms.shape != (len(params), 3) or not norms.is_contiguous()
            or norms.device != device):
        raise RuntimeError(f"fusedtech: lamb_step norms must be a contiguous float32 [{len(params)}, 3] tensor on "
                           f"{device}, got {norms.dtype} {tuple(norms.shape)} on {norms.device}")
    numels = [p.numel() for p in params]
    ptrs = pointer_table([params, grads, exp_avgs, exp_avg_sqs, master_params, steps], len(params), device,
                         ("params", "grads", "exp_avgs", "exp_avg_sqs", "master_params?", "steps"))
    chunks = chunk_table(numels, chunk, device)
    ranges = tensor_chunk_ranges(numels, chunk, device)
    lr_ptr, gs_ptr, fi_ptr = launch_scalars(params[0], lr_tensor, grad_scale, found_inf)
    partials = torch.zeros(chunks.shape[0], 2, device=device, dtype=torch.float32)
    neg_steps = torch.empty(len(params), device=device, dtype=torch.float32)
    log_betas = torch.tensor([math.log(beta1) if beta1 > 0 else -math.inf, math.log(beta2) if beta2 > 0 else -math.inf],
                             dtype=torch.float64, device=device)
    kinds = dict(PARAM=tl_dtype(params[0].dtype), STATE=tl_dtype(exp_avgs[0].dtype), HAS_MASTER=bool(master_params),
                 HAS_WEIGHT_DECAY=weight_decay != 0, HAS_FOUND_INF=found_inf is not None,
                 BIAS_CORRECTION=bool(bias_correction), BLOCK=min(chunk, 1024))
    _lamb_moments_kernel[(chunks.shape[0],)](
        ptrs, chunks, partials, gs_ptr, fi_ptr, log_betas, beta1, beta2, (1.0 - beta1) if grad_averaging else 1.0,
        1.0 - beta2, eps, weight_decay, HAS_GRAD_SCALE=grad_scale is not None, **kinds)
    _lamb_ratio_kernel[(len(params),)](
        ptrs, ranges, partials, neg_steps, norms, fi_ptr, float(lr), lr_ptr, log_betas, clamp_lower, clamp_upper,
        HAS_LR_PTR=lr_tensor is not None, DEBIAS=bool(debias), ADAM=bool(adam), TRUST_CLIP=bool(trust_clip),
        HAS_FOUND_INF=found_inf is not None, BLOCK=256)
    _lamb_update_kernel[(chunks.shape[0],)](ptrs, chunks, neg_steps, fi_ptr, log_betas, eps, weight_decay, **kinds)
