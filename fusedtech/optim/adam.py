"""Fused Adam and AdamW: subclasses of torch.optim.Adam / AdamW, so constructor arguments,
defaults, validation messages, param_groups, state_dict and repr are torch's own; only step()
is replaced by one fused multi-tensor kernel call per (device, dtype) bucket."""
from __future__ import annotations

import inspect

import torch

from ..ops.adam import adam_step_
from . import _multi_tensor as mt

_STATE = ("exp_avg", "exp_avg_sq")
# torch.optim.Adam took decoupled_weight_decay in 2.7; older releases only have AdamW for it.
_TORCH_HAS_DECOUPLED = "decoupled_weight_decay" in inspect.signature(torch.optim.Adam.__init__).parameters


class _FusedAdamStep(mt.FusedStepMixin):
    """step() for Adam-family optimizers."""

    _fused_state = _STATE + ("max_exp_avg_sq",)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        decoupled_default = isinstance(self, torch.optim.AdamW)
        for group in self._groups():
            amsgrad = group["amsgrad"]
            keys = _STATE + (("max_exp_avg_sq",) if amsgrad else ())
            buckets = self._buckets(group, keys)
            beta1, beta2 = (float(b) for b in group["betas"])
            for (device, _, _), b in buckets.items():
                lr, lr_tensor = mt.lr_args(group["lr"], device)
                grad_scale, found_inf = mt.scaler_tensors(self, device)
                torch._foreach_add_(b.steps, 1)
                adam_step_(b.params, b.grads, b.states["exp_avg"], b.states["exp_avg_sq"],
                           b.states["max_exp_avg_sq"] if amsgrad else [], b.masters, b.steps,
                           lr, lr_tensor, beta1, beta2, float(group["eps"]), float(group["weight_decay"]),
                           bool(group.get("decoupled_weight_decay", decoupled_default)), amsgrad,
                           bool(group["maximize"]), grad_scale, found_inf)
                mt.undo_skipped_steps(b.steps, found_inf)
                mt.finish(b, self)
        self._step_unfused()  # float64/complex parameters, sparse gradients: torch's step
        return loss


class Adam(_FusedAdamStep, torch.optim.Adam):
    """Drop-in for torch.optim.Adam with a fused multi-tensor step.

    Extra keyword: ``master_weights`` keeps fp32 copies of fp16/bf16 parameters (and fp32 states)
    and updates them inside the fused step. ``foreach`` and ``fused`` are accepted and ignored.
    """

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0, amsgrad=False, *,
                 foreach=None, maximize=False, capturable=False, differentiable=False, fused=None,
                 decoupled_weight_decay=False, master_weights=False):
        if differentiable:
            self._fused_setup("Adam", master_weights, differentiable)
        extra = {"decoupled_weight_decay": decoupled_weight_decay} if _TORCH_HAS_DECOUPLED else {}
        super().__init__(params, lr, betas, eps, weight_decay, amsgrad, maximize=maximize,
                         capturable=capturable, **extra)
        if not _TORCH_HAS_DECOUPLED:
            for group in self.param_groups:
                group.setdefault("decoupled_weight_decay", decoupled_weight_decay)
        self._fused_setup("Adam", master_weights, differentiable)


class AdamW(_FusedAdamStep, torch.optim.AdamW):
    """Drop-in for torch.optim.AdamW (decoupled weight decay) with a fused multi-tensor step."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, amsgrad=False, *,
                 maximize=False, foreach=None, capturable=False, differentiable=False, fused=None,
                 master_weights=False):
        if differentiable:
            self._fused_setup("AdamW", master_weights, differentiable)
        super().__init__(params, lr, betas, eps, weight_decay, amsgrad, maximize=maximize,
                         capturable=capturable)
        self._fused_setup("AdamW", master_weights, differentiable)


FusedAdam = Adam
FusedAdamW = AdamW
