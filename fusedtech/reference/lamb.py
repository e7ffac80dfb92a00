"""LAMB oracle: torch_optimizer.Lamb's math (see csrc/include/fusedtech/lamb.h), in fp32 whatever
the storage dtype, plus apex's grad_averaging switch, a configurable trust-ratio clamp and timm's
bias_correction and trust_clip. Row i of `norms` gets what torch_optimizer keeps in its state for
params[i]: weight_norm, adam_norm and trust_ratio (as computed, before adam=True replaces it)."""
from __future__ import annotations

import math

import torch

from ._common import begin_step, finish_tensor, load_fp32


@torch.no_grad()
def lamb_step_(params, grads, exp_avgs, exp_avg_sqs, master_params, steps, norms, lr, lr_tensor, beta1, beta2, eps,
               weight_decay, clamp_lower, clamp_upper, debias, adam, grad_averaging, bias_correction, trust_clip,
               grad_scale, found_inf) -> None:
    skip, lr, inv_scale = begin_step(lr, lr_tensor, grad_scale, found_inf)
    if skip:
        return  # norms keep last step's values, as the moments do
    for i, param in enumerate(params):
        p, g = load_fp32(param, grads[i], master_params, i, inv_scale)
        m = exp_avgs[i].float().mul_(beta1).add_(g, alpha=(1 - beta1) if grad_averaging else 1.0)
        v = exp_avg_sqs[i].float().mul_(beta2).addcmul_(g, g, value=1 - beta2)
        exp_avgs[i].copy_(m)
        exp_avg_sqs[i].copy_(v)
        # The update direction is taken from the moments as stored (the kernels recompute it from
        # them in their last pass); for fp32 state this changes nothing.
        m, v = exp_avgs[i].float(), exp_avg_sqs[i].float()
        step = steps[i].item()
        step_size = lr * (math.sqrt(1 - beta2 ** step) / (1 - beta1 ** step)) if debias else lr
        weight_norm = torch.norm(p).clamp(clamp_lower, clamp_upper)
        if bias_correction:  # timm's order: (m / bc1) / (sqrt(v) / sqrt(bc2) + eps)
            u = (m / (1 - beta1 ** step)) / (v.sqrt() / math.sqrt(1 - beta2 ** step)).add(eps)
        else:
            u = m / v.sqrt().add(eps)
        if weight_decay != 0:
            u.add_(p, alpha=weight_decay)
        update_norm = torch.norm(u)
        if weight_norm == 0 or update_norm == 0:
            ratio = torch.tensor(1.0)
        else:
            ratio = weight_norm / update_norm
        if trust_clip:
            ratio = ratio.clamp(max=1.0)
        norms[i].copy_(torch.stack([weight_norm, update_norm, ratio.to(weight_norm.device)]))
        if adam:
            ratio = torch.tensor(1.0)
        p.add_(u, alpha=(-step_size * ratio).item())
        finish_tensor(param, p, master_params, i)
