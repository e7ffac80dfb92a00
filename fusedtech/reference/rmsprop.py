"""RMSprop oracle: torch.optim.RMSprop's single-tensor math, in fp32 whatever the storage dtype."""
from __future__ import annotations

import torch

from ._common import begin_step, finish_tensor, load_fp32


@torch.no_grad()
def rmsprop_step_(params, grads, square_avgs, grad_avgs, momentum_buffers, master_params, lr, lr_tensor,
                  alpha, eps, weight_decay, momentum, maximize, grad_scale, found_inf) -> None:
    skip, lr, inv_scale = begin_step(lr, lr_tensor, grad_scale, found_inf)
    if skip:
        return
    for i, param in enumerate(params):
        p, g = load_fp32(param, grads[i], master_params, i, inv_scale)
        if maximize:
            g = -g
        if weight_decay != 0:
            g = g.add(p, alpha=weight_decay)
        sq = square_avgs[i].float().mul_(alpha).addcmul_(g, g, value=1 - alpha)
        square_avgs[i].copy_(sq)
        if grad_avgs:
            ga = grad_avgs[i].float().lerp_(g, 1 - alpha)
            grad_avgs[i].copy_(ga)
            avg = sq.addcmul(ga, ga, value=-1).sqrt_()
        else:
            avg = sq.sqrt()
        avg = avg.add_(eps)
        if momentum_buffers:
            buf = momentum_buffers[i].float().mul_(momentum).addcdiv_(g, avg)
            momentum_buffers[i].copy_(buf)
            p.add_(buf, alpha=-lr)
        else:
            p.addcdiv_(g, avg, value=-lr)
        finish_tensor(param, p, master_params, i)
