"""Fused Adagrad: a subclass of torch.optim.Adagrad (state created at construction, as torch
does) whose step() is one multi-tensor kernel call per (device, dtype) bucket."""
from __future__ import annotations

import torch

from ..ops.adagrad import adagrad_step_
from . import _multi_tensor as mt


class Adagrad(mt.FusedStepMixin, torch.optim.Adagrad):
    """Drop-in for torch.optim.Adagrad. Extra keyword: ``master_weights``. ``foreach`` and
    ``fused`` are accepted and ignored. Sparse gradients (and float64 or complex parameters) are
    stepped by torch.optim.Adagrad itself."""

    _fused_state = ("sum",)

    def __init__(self, params, lr=1e-2, lr_decay=0, weight_decay=0, initial_accumulator_value=0, eps=1e-10,
                 foreach=None, *, maximize=False, differentiable=False, fused=None, master_weights=False):
        if differentiable:
            self._fused_setup("Adagrad", master_weights, differentiable)
        super().__init__(params, lr, lr_decay, weight_decay, initial_accumulator_value, eps, maximize=maximize)
        self._fused_setup("Adagrad", master_weights, differentiable)
        if master_weights:  # torch created the sums in the parameter dtype; masters keep fp32 state
            for group in self.param_groups:
                for p in group["params"]:
                    if p.dtype in mt.LOW_PRECISION:
                        self.state[p]["sum"] = self.state[p]["sum"].float()

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self._groups():
            # State made after construction (add_param_group, a reset) starts as torch's does: from
            # the constructor's initial_accumulator_value, whatever the group says.
            init = self.defaults["initial_accumulator_value"]
            start = (lambda p, key: torch.full_like(p, init, memory_format=torch.preserve_format))  # noqa: E731
            for (device, _, _), b in self._buckets(group, ("sum",), initial_state=start).items():
                lr, lr_tensor = mt.lr_args(group["lr"], device)
                grad_scale, found_inf = mt.scaler_tensors(self, device)
                torch._foreach_add_(b.steps, 1)
                adagrad_step_(b.params, b.grads, b.states["sum"], b.masters, b.steps, lr, lr_tensor,
                              float(group["lr_decay"]), float(group["weight_decay"]), float(group["eps"]),
                              bool(group["maximize"]), grad_scale, found_inf)
                mt.undo_skipped_steps(b.steps, found_inf)
                mt.finish(b, self)
        self._step_unfused()  # float64/complex parameters, sparse gradients: torch's step
        return loss


FusedAdagrad = Adagrad
