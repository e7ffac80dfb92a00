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

from .multi_tensor import chunk_of, chunk_table, load_param, pointer_table, live_end, store_param_rounded, tl_dtype
from .quantization import QBLOCK, ROWS, dequantize, midpoints, quantize, tile_offsets
from .rounding import round_to

CHUNK = 2048  # elements per program
# Column of each operand in the pointer table.
P, G, M, V, VMAX, MASTER, STEP = range(7)


@triton.jit
def _tensor_scalars(hyper, lr, lr_ptr, step_ptr, HAS_LR_PTR: tl.constexpr):
    """(-lr / bias_correction1, sqrt(bias_correction2), 1 - lr * wd) of one tensor, in float64 like
    torch's Python-float bias corrections, from the tensor's step on the device."""
    if HAS_LR_PTR:
        lr = tl.load(lr_ptr)
    lr64 = tl.cast(lr, tl.float64)
    step = tl.load(step_ptr).to(tl.float64)
    bias_correction1 = 1.0 - tl.exp(step * tl.load(hyper + 0))  # hyper[0] = log(beta1)
    bias_correction2 = 1.0 - tl.exp(step * tl.load(hyper + 1))  # hyper[1] = log(beta2)
    neg_step_size = (-(lr64 / bias_correction1)).to(tl.float32)
    bias_correction2_sqrt = tl.sqrt(bias_correction2).to(tl.float32)
    decay_factor = (1.0 - lr64 * tl.load(hyper + 2)).to(tl.float32)  # hyper[2] = weight_decay
    return neg_step_size, bias_correction2_sqrt, decay_factor


@triton.jit
def _adam_update(p, g, m, v, vmax, neg_step_size, bias_correction2_sqrt, decay_factor, beta2, one_minus_beta1,
                 one_minus_beta2, eps, weight_decay, AMSGRAD: tl.constexpr, HAS_WEIGHT_DECAY: tl.constexpr,
                 DECOUPLED: tl.constexpr, MAXIMIZE: tl.constexpr):
    """adam.h's adam_update on fp32 blocks: (param, exp_avg, exp_avg_sq, max_exp_avg_sq)."""
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
        # NaN propagates into the running maximum, as torch.maximum does.
        vmax = tl.maximum(vmax, v, propagate_nan=tl.PropagateNan.ALL)
        second = vmax
    # IEEE sqrt and division (Triton's defaults are approximate) to agree with torch to rounding.
    denom = tl.div_rn(tl.sqrt_rn(second), bias_correction2_sqrt) + eps
    return p + tl.div_rn(neg_step_size * m, denom), m, v, vmax


@triton.jit
def _adam_kernel(ptrs, chunks, hyper, lr, lr_ptr, grad_scale_ptr, found_inf_ptr,
                 beta1, beta2, one_minus_beta1, one_minus_beta2, eps, weight_decay, seed,
                 PARAM: tl.constexpr, STATE: tl.constexpr, HAS_MASTER: tl.constexpr,
                 AMSGRAD: tl.constexpr, HAS_WEIGHT_DECAY: tl.constexpr, DECOUPLED: tl.constexpr, MAXIMIZE: tl.constexpr,
                 HAS_LR_PTR: tl.constexpr, HAS_GRAD_SCALE: tl.constexpr, HAS_FOUND_INF: tl.constexpr,
                 STOCHASTIC_ROUND: tl.constexpr, BLOCK: tl.constexpr):
    row, begin, end = chunk_of(chunks, tl.program_id(0))
    base = ptrs + row * 7
    g_ptr = tl.load(base + 1).to(tl.pointer_type(PARAM))
    m_ptr = tl.load(base + 2).to(tl.pointer_type(STATE))
    v_ptr = tl.load(base + 3).to(tl.pointer_type(STATE))
    step_ptr = tl.load(base + 6).to(tl.pointer_type(tl.float32))

    neg_step_size, bias_correction2_sqrt, decay_factor = _tensor_scalars(hyper, lr, lr_ptr, step_ptr, HAS_LR_PTR)

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
        vmax = v
        if AMSGRAD:
            vmax_ptr = tl.load(base + 4).to(tl.pointer_type(STATE))
            vmax = tl.load(vmax_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        p, m, v, vmax = _adam_update(p, g, m, v, vmax, neg_step_size, bias_correction2_sqrt, decay_factor, beta2,
                                     one_minus_beta1, one_minus_beta2, eps, weight_decay, AMSGRAD, HAS_WEIGHT_DECAY,
                                     DECOUPLED, MAXIMIZE)
        if AMSGRAD:
            tl.store(vmax_ptr + offs, round_to(vmax, STATE), mask=mask)
        store_param_rounded(base, 0, 5, offs, mask, p, row, tl.load(step_ptr), seed, PARAM, HAS_MASTER,
                            STOCHASTIC_ROUND)
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
               grad_scale, found_inf, stochastic_round_seed=None, *, chunk: int = CHUNK) -> None:
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
        _seed(stochastic_round_seed, params[0].dtype, bool(master_params)),
        PARAM=tl_dtype(params[0].dtype), STATE=tl_dtype(state_dtype), HAS_MASTER=bool(master_params),
        AMSGRAD=bool(amsgrad), HAS_WEIGHT_DECAY=weight_decay != 0, DECOUPLED=bool(decoupled), MAXIMIZE=bool(maximize),
        HAS_LR_PTR=lr_tensor is not None, HAS_GRAD_SCALE=grad_scale is not None,
        HAS_FOUND_INF=found_inf is not None, STOCHASTIC_ROUND=stochastic_round_seed is not None, BLOCK=block,
    )


def _seed(seed, param_dtype, has_master) -> int:
    """The kernels' seed argument (0 when rounding to nearest), checked as the C++ kernels check it."""
    if seed is None:
        return 0
    if param_dtype != torch.bfloat16 or has_master:
        raise RuntimeError(f"fusedtech: stochastic_round_seed is for bfloat16 parameters without master_params, got "
                           f"{param_dtype} parameters{' with master_params' if has_master else ''}")
    return int(seed)


# Columns of the quantized kernel's pointer table.
Q_P, Q_G, Q_M, Q_MA, Q_V, Q_VA, Q_VMAX, Q_VMAXA, Q_MASTER, Q_STEP = map(tl.constexpr, range(10))


@triton.jit
def _adam_quantized_kernel(ptrs, chunks, hyper, tables, lr, lr_ptr, grad_scale_ptr, found_inf_ptr,
                           beta1, beta2, one_minus_beta1, one_minus_beta2, eps, weight_decay, seed,
                           PARAM: tl.constexpr, HAS_MASTER: tl.constexpr, AMSGRAD: tl.constexpr,
                           HAS_WEIGHT_DECAY: tl.constexpr, DECOUPLED: tl.constexpr, MAXIMIZE: tl.constexpr,
                           HAS_LR_PTR: tl.constexpr, HAS_GRAD_SCALE: tl.constexpr, HAS_FOUND_INF: tl.constexpr,
                           STOCHASTIC_ROUND: tl.constexpr, ROWS: tl.constexpr, QBLOCK: tl.constexpr):
    """Adam over 8-bit states: each tile's rows are quantization blocks; dequantize, update in fp32,
    requantize with each row's new absmax, all in registers. tables: signed table, its midpoints,
    unsigned table, its midpoints (256 + 255 + 256 + 255 float32)."""
    row, begin, end = chunk_of(chunks, tl.program_id(0))
    base = ptrs + row * 10
    g_ptr = tl.load(base + Q_G).to(tl.pointer_type(PARAM))
    m_ptr = tl.load(base + Q_M).to(tl.pointer_type(tl.uint8))
    ma_ptr = tl.load(base + Q_MA).to(tl.pointer_type(tl.float32))
    v_ptr = tl.load(base + Q_V).to(tl.pointer_type(tl.uint8))
    va_ptr = tl.load(base + Q_VA).to(tl.pointer_type(tl.float32))
    step_ptr = tl.load(base + Q_STEP).to(tl.pointer_type(tl.float32))
    signed, signed_mids, unsigned, unsigned_mids = tables, tables + 256, tables + 511, tables + 767
    neg_step_size, bias_correction2_sqrt, decay_factor = _tensor_scalars(hyper, lr, lr_ptr, step_ptr, HAS_LR_PTR)
    stop = live_end(begin, end, found_inf_ptr, HAS_FOUND_INF)
    if HAS_GRAD_SCALE:
        inv_scale = tl.div_rn(1.0, tl.load(grad_scale_ptr))
    for start in range(0, tl.cdiv(end - begin, ROWS * QBLOCK)):
        offs, blocks = tile_offsets(begin, start, ROWS, QBLOCK)
        mask = offs < stop
        row_mask = blocks * QBLOCK < stop
        p = load_param(base, Q_P, Q_MASTER, offs, mask, PARAM, HAS_MASTER)
        g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        m = dequantize(tl.load(m_ptr + offs, mask=mask, other=0), signed,
                       tl.load(ma_ptr + blocks, mask=row_mask, other=0.0))
        # Lanes past the end read code 0, which is no zero in every table (-1 in E4M3's): zeroed, so
        # their square roots stay real.
        v = tl.where(mask, dequantize(tl.load(v_ptr + offs, mask=mask, other=0), unsigned,
                                      tl.load(va_ptr + blocks, mask=row_mask, other=0.0)), 0.0)
        if HAS_GRAD_SCALE:
            g = g * inv_scale
        vmax = v
        if AMSGRAD:
            vmax_ptr = tl.load(base + Q_VMAX).to(tl.pointer_type(tl.uint8))
            vmaxa_ptr = tl.load(base + Q_VMAXA).to(tl.pointer_type(tl.float32))
            vmax = tl.where(mask, dequantize(tl.load(vmax_ptr + offs, mask=mask, other=0), unsigned,
                                             tl.load(vmaxa_ptr + blocks, mask=row_mask, other=0.0)), 0.0)
        p, m, v, vmax = _adam_update(p, g, m, v, vmax, neg_step_size, bias_correction2_sqrt, decay_factor, beta2,
                                     one_minus_beta1, one_minus_beta2, eps, weight_decay, AMSGRAD, HAS_WEIGHT_DECAY,
                                     DECOUPLED, MAXIMIZE)
        store_param_rounded(base, Q_P, Q_MASTER, offs, mask, p, row, tl.load(step_ptr), seed, PARAM, HAS_MASTER,
                            STOCHASTIC_ROUND)
        # Padding (past the tensor's end) quantizes as 0: it never raises a block's absmax.
        m_code, m_absmax = quantize(tl.where(mask, m, 0.0), signed_mids, 8)
        tl.store(m_ptr + offs, m_code.to(tl.uint8), mask=mask)
        tl.store(ma_ptr + blocks, m_absmax, mask=row_mask)
        v_code, v_absmax = quantize(tl.where(mask, v, 0.0), unsigned_mids, 8)
        tl.store(v_ptr + offs, v_code.to(tl.uint8), mask=mask)
        tl.store(va_ptr + blocks, v_absmax, mask=row_mask)
        if AMSGRAD:
            vmax_code, vmax_absmax = quantize(tl.where(mask, vmax, 0.0), unsigned_mids, 8)
            tl.store(vmax_ptr + offs, vmax_code.to(tl.uint8), mask=mask)
            tl.store(vmaxa_ptr + blocks, vmax_absmax, mask=row_mask)


_tables_cache: dict = {}


def _tables(signed_table: torch.Tensor, unsigned_table: torch.Tensor) -> torch.Tensor:
    """The four lookup arrays of the quantized kernel in one device buffer (cached per table pair)."""
    key = (signed_table.data_ptr(), unsigned_table.data_ptr(), signed_table.device)
    hit = _tables_cache.get(key)
    if hit is None:
        for name, t in (("signed_table", signed_table), ("unsigned_table", unsigned_table)):
            if t.dtype != torch.float32 or t.shape != (256,):
                raise ValueError(f"fusedtech: adam_step_quantized {name} must be 256 float32 values, got "
                                 f"{t.dtype} of shape {tuple(t.shape)}")
        hit = _tables_cache[key] = torch.cat([signed_table, midpoints(signed_table), unsigned_table,
                                              midpoints(unsigned_table)]).contiguous()
    return hit


def adam_step_quantized_(params, grads, exp_avgs, exp_avg_absmaxes, exp_avg_sqs, exp_avg_sq_absmaxes,
                         max_exp_avg_sqs, max_exp_avg_sq_absmaxes, master_params, steps, signed_table,
                         unsigned_table, lr, lr_tensor, beta1, beta2, eps, weight_decay, decoupled, amsgrad,
                         maximize, grad_scale, found_inf, stochastic_round_seed=None, *, chunk: int = CHUNK) -> None:
    if not params:
        return
    device = params[0].device
    n = len(params)
    _check_absmax(params, exp_avg_absmaxes, "exp_avg_absmaxes")
    _check_absmax(params, exp_avg_sq_absmaxes, "exp_avg_sq_absmaxes")
    if amsgrad:
        _check_absmax(params, max_exp_avg_sq_absmaxes, "max_exp_avg_sq_absmaxes")
    ams = (lambda lst: lst) if amsgrad else (lambda lst: [])  # noqa: E731
    ptrs = pointer_table([params, grads, exp_avgs, exp_avg_absmaxes, exp_avg_sqs, exp_avg_sq_absmaxes,
                          ams(max_exp_avg_sqs), ams(max_exp_avg_sq_absmaxes), master_params, steps], n, device,
                         ("params", "grads", "exp_avgs", "exp_avg_absmaxes*", "exp_avg_sqs", "exp_avg_sq_absmaxes*",
                          "max_exp_avg_sqs?", "max_exp_avg_sq_absmaxes?*", "master_params?", "steps"))
    chunks = chunk_table([p.numel() for p in params], chunk, device)
    dummy = steps[0]
    lr_ptr = lr_tensor.to(device=device, dtype=torch.float32) if lr_tensor is not None else dummy
    _adam_quantized_kernel[(chunks.shape[0],)](
        ptrs, chunks, _hyper(beta1, beta2, weight_decay, device), _tables(signed_table, unsigned_table),
        float(lr), lr_ptr, grad_scale if grad_scale is not None else dummy,
        found_inf if found_inf is not None else dummy,
        beta1, beta2, 1.0 - beta1, 1.0 - beta2, eps, weight_decay,
        _seed(stochastic_round_seed, params[0].dtype, bool(master_params)),
        PARAM=tl_dtype(params[0].dtype), HAS_MASTER=bool(master_params), AMSGRAD=bool(amsgrad),
        HAS_WEIGHT_DECAY=weight_decay != 0, DECOUPLED=bool(decoupled), MAXIMIZE=bool(maximize),
        HAS_LR_PTR=lr_tensor is not None, HAS_GRAD_SCALE=grad_scale is not None,
        HAS_FOUND_INF=found_inf is not None, STOCHASTIC_ROUND=stochastic_round_seed is not None, ROWS=ROWS,
        QBLOCK=QBLOCK,
    )


def _check_absmax(params, absmaxes, name) -> None:
    if len(absmaxes) != len(params):
        raise RuntimeError(f"fusedtech: {name} has {len(absmaxes)} tensors, expected {len(params)}")
    for i, (p, a) in enumerate(zip(params, absmaxes)):
        blocks = -(-p.numel() // QBLOCK)
        if a.dtype != torch.float32 or a.numel() != blocks or not a.is_contiguous() or a.device != p.device:
            raise RuntimeError(f"fusedtech: {name}[{i}] must be a contiguous float32 tensor of {blocks} values on "
                               f"{p.device}, got {a.dtype} of shape {tuple(a.shape)} on {a.device}")
