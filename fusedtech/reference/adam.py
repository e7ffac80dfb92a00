"""Adam/AdamW oracle. Same operation order as torch.optim.Adam's single-tensor path; math in fp32
whatever the storage dtype (as the kernels do), one rounding to the storage dtype at the end."""
from __future__ import annotations

import math

import torch

from . import quantization, rounding


@torch.no_grad()
def adam_step_(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, master_params, steps,
               lr, lr_tensor, beta1, beta2, eps, weight_decay, decoupled, amsgrad, maximize,
               grad_scale, found_inf, stochastic_round_seed=None) -> None:
    if found_inf is not None and found_inf.item() != 0:
        return
    if lr_tensor is not None:
        lr = lr_tensor.item()
    inv_scale = None if grad_scale is None else torch.tensor(1.0 / grad_scale.item(), dtype=torch.float32)
    for i, param in enumerate(params):
        step = steps[i].item()
        bias_correction1 = 1 - beta1 ** step
        bias_correction2_sqrt = math.sqrt(1 - beta2 ** step)
        step_size = lr / bias_correction1

        p = (master_params[i] if master_params else param).float().clone()
        g = grads[i].float()
        if inv_scale is not None:
            g = g * inv_scale
        if maximize:
            g = -g
        if weight_decay != 0:
            if decoupled:
                p.mul_(1 - lr * weight_decay)
            else:
                g = g.add(p, alpha=weight_decay)
        m = exp_avgs[i].float().lerp_(g, 1 - beta1)
        v = exp_avg_sqs[i].float().mul_(beta2).addcmul_(g, g, value=1 - beta2)
        if amsgrad:
            vmax = torch.maximum(max_exp_avg_sqs[i].float(), v)
            max_exp_avg_sqs[i].copy_(vmax)
            denom = (vmax.sqrt() / bias_correction2_sqrt).add_(eps)
        else:
            denom = (v.sqrt() / bias_correction2_sqrt).add_(eps)
        p.addcdiv_(m, denom, value=-step_size)

        if master_params:
            master_params[i].copy_(p)
        if stochastic_round_seed is not None:
            rounding.store_stochastic_(param, p, stochastic_round_seed, int(step), i)
        else:
            param.copy_(p)
        exp_avgs[i].copy_(m)
        exp_avg_sqs[i].copy_(v)


@torch.no_grad()
def adam_step_quantized_(params, grads, exp_avgs, exp_avg_absmaxes, exp_avg_sqs, exp_avg_sq_absmaxes,
                         max_exp_avg_sqs, max_exp_avg_sq_absmaxes, master_params, steps, signed_table,
                         unsigned_table, lr, lr_tensor, beta1, beta2, eps, weight_decay, decoupled, amsgrad,
                         maximize, grad_scale, found_inf, stochastic_round_seed=None) -> None:
    """Adam with blockwise-quantized states: dequantize, the fp32 step above, requantize each state
    with its blocks' new absmax (reference/quantization.py)."""
    if found_inf is not None and found_inf.item() != 0:
        return
    tables = ((exp_avgs, exp_avg_absmaxes, signed_table), (exp_avg_sqs, exp_avg_sq_absmaxes, unsigned_table))
    if amsgrad:
        tables += ((max_exp_avg_sqs, max_exp_avg_sq_absmaxes, unsigned_table),)
    states = [[quantization.dequantize_blockwise(c, a, table) for c, a in zip(codes, absmax)]
              for codes, absmax, table in tables]
    adam_step_(params, grads, states[0], states[1], states[2] if amsgrad else [], master_params, steps, lr,
               lr_tensor, beta1, beta2, eps, weight_decay, decoupled, amsgrad, maximize, grad_scale, None,
               stochastic_round_seed)
    for (codes, absmax, table), values in zip(tables, states):
        for c, a, x in zip(codes, absmax, values):
            quantization.quantize_blockwise_(x, c, a, table)
