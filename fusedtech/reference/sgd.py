"""SGD oracle: torch.optim.SGD's single-tensor math, in fp32 whatever the storage dtype."""
from __future__ import annotations

import torch

from ._common import begin_step, finish_tensor, load_fp32


@torch.no_grad()
def sgd_step_(params, grads, momentum_buffers, master_params, lr, lr_tensor, momentum, dampening,
              weight_decay, nesterov, maximize, first_step, grad_scale, found_inf) -> None:
    skip, lr, inv_scale = begin_step(lr, lr_tensor, grad_scale, found_inf)
    if skip:
        return
    for i, param in enumerate(params):
        p, g = load_fp32(param, grads[i], master_params, i, inv_scale)
        if maximize:
            g = -g
        if weight_decay != 0:
            g = g.add(p, alpha=weight_decay)
        if momentum_buffers:
            buf = g.clone() if first_step else momentum_buffers[i].float().mul_(momentum).add_(g, alpha=1 - dampening)
            momentum_buffers[i].copy_(buf)
            g = g.add(buf, alpha=momentum) if nesterov else buf
        p.add_(g, alpha=-lr)
        finish_tensor(param, p, master_params, i)
