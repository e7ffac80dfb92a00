"""What every optimizer oracle does around its math (GradScaler, Tensor lr, fp32 working copies)."""
from __future__ import annotations

import torch


def begin_step(lr, lr_tensor, grad_scale, found_inf):
    """(skip, lr as float, 1/grad_scale as an fp32 tensor or None), like the kernels read them."""
    skip = found_inf is not None and found_inf.item() != 0
    if lr_tensor is not None:
        lr = lr_tensor.item()
    inv = None if grad_scale is None else torch.tensor(1.0 / grad_scale.item(), dtype=torch.float32)
    return skip, lr, inv


def load_fp32(param, grad, master_params, i, inv_scale):
    p = (master_params[i] if master_params else param).float().clone()
    g = grad.float()
    if inv_scale is not None:
        g = g * inv_scale.to(g.device)
    return p, g


def finish_tensor(param, p, master_params, i):
    if master_params:
        master_params[i].copy_(p)
    param.copy_(p)
