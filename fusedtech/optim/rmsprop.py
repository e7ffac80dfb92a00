"""Fused RMSprop (plain, centered, momentum): a subclass of torch.optim.RMSprop whose step() is
one multi-tensor kernel call per (device, dtype) bucket."""
from __future__ import annotations

import torch

from ..ops.rmsprop import rmsprop_step_
from . import _multi_tensor as mt


class RMSprop(mt.FusedStepMixin, torch.optim.RMSprop):
    """Drop-in for torch.optim.RMSprop. Extra keyword: ``master_weights``. ``foreach`` is accepted
    and ignored."""

    _fused_state = ("square_avg", "grad_avg", "momentum_buffer")

    def __init__(self, params, lr=1e-2, alpha=0.99, eps=1e-8, weight_decay=0, momentum=0, centered=False,
                 capturable=False, foreach=None, maximize=False, differentiable=False, master_weights=False):
        if differentiable:
            self._fused_setup("RMSprop", master_weights, differentiable)
        super().__init__(params, lr, alpha, eps, weight_decay, momentum, centered, capturable=capturable,
                         maximize=maximize)
        self._fused_setup("RMSprop", master_weights, differentiable)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self._groups():
            momentum, centered = float(group["momentum"]), bool(group["centered"])
            keys = ("square_avg",) + (("momentum_buffer",) if momentum > 0 else ()) + (("grad_avg",) if centered else ())
            for (device, _, _), b in self._buckets(group, keys).items():
                lr, lr_tensor = mt.lr_args(group["lr"], device)
                grad_scale, found_inf = mt.scaler_tensors(self, device)
                torch._foreach_add_(b.steps, 1)
                rmsprop_step_(b.params, b.grads, b.states["square_avg"], b.states["grad_avg"] if centered else [],
                              b.states["momentum_buffer"] if momentum > 0 else [], b.masters, lr, lr_tensor,
                              float(group["alpha"]), float(group["eps"]), float(group["weight_decay"]), momentum,
                              bool(group["maximize"]), grad_scale, found_inf)
                mt.undo_skipped_steps(b.steps, found_inf)
                mt.finish(b, self)
        self._step_unfused()  # float64/complex parameters, sparse gradients: torch's step
        return loss


FusedRMSprop = RMSprop
