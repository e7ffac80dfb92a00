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
    prepared = lamb_directions(params, grads, exp_avgs, exp_avg_sqs, master_params, steps, lr, lr_tensor, beta1,
                               beta2, eps, weight_decay, grad_averaging, bias_correction, grad_scale, found_inf)
    if prepared is not None:  # (a skipped step: norms keep last step's values, as the moments do)
        lamb_apply(prepared, prepared.local_norms, params, master_params, norms, beta1, beta2, clamp_lower,
                   clamp_upper, debias, adam, trust_clip)


class Directions:
    """What LAMB's first half leaves for its second: each parameter's fp32 working copy, its update
    direction u, the step count, lr, and the [n, 2] float32 norms (||p||, ||u||) of what this
    process holds (a shard's, under FSDP2: the caller combines them across shards)."""

    def __init__(self, lr, work, directions, step_counts, local_norms):
        self.lr, self.work, self.directions, self.step_counts, self.local_norms = (
            lr, work, directions, step_counts, local_norms)


@torch.no_grad()
def lamb_directions(params, grads, exp_avgs, exp_avg_sqs, master_params, steps, lr, lr_tensor, beta1, beta2, eps,
                    weight_decay, grad_averaging, bias_correction, grad_scale, found_inf):
    """LAMB's first half: moments updated in place, the update direction
    u = m / (sqrt(v) + eps) + weight_decay p (timm's bias-corrected form with bias_correction) and
    the norms of p and u. None when GradScaler found an inf (nothing changes)."""
    skip, lr, inv_scale = begin_step(lr, lr_tensor, grad_scale, found_inf)
    if skip:
        return None
    work, directions, step_counts, local_norms = [], [], [], []
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
        if bias_correction:  # timm's order: (m / bc1) / (sqrt(v) / sqrt(bc2) + eps)
            u = (m / (1 - beta1 ** step)) / (v.sqrt() / math.sqrt(1 - beta2 ** step)).add(eps)
        else:
            u = m / v.sqrt().add(eps)
        if weight_decay != 0:
            u.add_(p, alpha=weight_decay)
        work.append(p)
        directions.append(u)
        step_counts.append(step)
        local_norms.append(torch.stack([torch.norm(p), torch.norm(u)]))
    stacked = torch.stack(local_norms) if local_norms else torch.zeros(0, 2)
    return Directions(lr, work, directions, step_counts, stacked)


@torch.no_grad()
def lamb_apply(prepared, full_norms, params, master_params, norms, beta1, beta2, clamp_lower, clamp_upper, debias,
               adam, trust_clip) -> None:
    """LAMB's second half, given each parameter's whole (||p||, ||u||) in `full_norms`: the trust
    ratio phi(||p||) / ||u|| (1 where either is 0; at most 1 with trust_clip; 1 applied with adam)
    and p -= step_size * ratio * u. Row i of `norms` gets weight_norm, adam_norm, trust_ratio."""
    for i, param in enumerate(params):
        p, u, step = prepared.work[i], prepared.directions[i], prepared.step_counts[i]
        step_size = prepared.lr * (math.sqrt(1 - beta2 ** step) / (1 - beta1 ** step)) if debias else prepared.lr
        weight_norm = full_norms[i, 0].to(p.device).clamp(clamp_lower, clamp_upper)
        update_norm = full_norms[i, 1].to(p.device)
        if weight_norm == 0 or update_norm == 0:
            ratio = torch.tensor(1.0, device=p.device)
        else:
            ratio = weight_norm / update_norm
        if trust_clip:
            ratio = ratio.clamp(max=1.0)
        norms[i].copy_(torch.stack([weight_norm, update_norm, ratio.to(weight_norm.device)]))
        if adam:
            ratio = torch.tensor(1.0)
        p.add_(u, alpha=(-step_size * ratio).item())
        finish_tensor(param, p, master_params, i)
