"""Adagrad oracle: torch.optim.Adagrad's single-tensor math, in fp32 whatever the storage dtype."""
from __future__ import annotations

import torch

from ._common import begin_step, finish_tensor, load_fp32


@torch.no_grad()
def adagrad_step_(params, grads, state_sums, master_params, steps, lr, lr_tensor, lr_decay, weight_decay,
                  eps, maximize, grad_scale, found_inf) -> None:
    skip, lr, inv_scale = begin_step(lr, lr_tensor, grad_scale, found_inf)
    if skip:
        return
    for i, param in enumerate(params):
        p, g = load_fp32(param, grads[i], master_params, i, inv_scale)
        if maximize:
            g = -g
        if weight_decay != 0:
            g = g.add(p, alpha=weight_decay)
        clr = lr / (1 + (steps[i].item() - 1) * lr_decay)
        s = state_sums[i].float().addcmul_(g, g, value=1)
        state_sums[i].copy_(s)
        std = s.sqrt().add_(eps)
        p.addcdiv_(g, std, value=-clr)
        finish_tensor(param, p, master_params, i)
