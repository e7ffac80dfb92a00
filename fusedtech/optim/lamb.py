"""Fused LAMB. The default is a drop-in for ``torch_optimizer.Lamb`` (same arguments, defaults,
validation, param_groups and state keys), with options beyond it:

- ``trust_clamp=(lower, upper)``: the trust-ratio clamp phi(z) = min(max(z, lower), upper) applied
  to the weight norm (default ``(0, clamp_value)``, torch_optimizer's);
- ``exclude_bias_and_norm=True``: parameters with at most one dimension (biases, norm weights)
  get no weight decay and a trust ratio of 1;
- ``max_grad_norm``: apex FusedLAMB's global gradient-norm clipping (gradients divided by
  max(1, ||g|| / max_grad_norm) inside the fused pass; ``.grad`` is left untouched);
- ``grad_averaging`` (apex; default True): m = beta1 m + (1 - beta1) g, else m = beta1 m + g;
- ``master_weights``: fp32 master weights and states for fp16/bf16 parameters.

Launches per (device, dtype) bucket and step on CUDA: one to advance the steps, then pass 1
(moments and per-chunk norm partials), pass 2 (per-tensor trust ratios) and pass 3 (update);
``max_grad_norm`` adds one norm reduction per bucket. No per-tensor Python loop touches the data.
"""
from __future__ import annotations

import math

import torch

from ..ops.optimizers import lamb_step_
from ..nn.utils import get_total_norm
from . import _multi_tensor as mt

_STATE = ("exp_avg", "exp_avg_sq")


class LAMB(mt.FusedStepMixin, torch.optim.Optimizer):
    _fused_state = _STATE
    _torch_fallback = False  # no torch LAMB to hand float64/complex/sparse to: refused by name
    _fusedtech_attributes = ("clamp_value", "adam", "debias", "trust_clamp", "exclude_bias_and_norm", "max_grad_norm",
                             "grad_averaging")

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-6, weight_decay=0, clamp_value=10,
                 adam=False, debias=False, *, trust_clamp=None, exclude_bias_and_norm=False, max_grad_norm=None,
                 grad_averaging=True, master_weights=False):
        # torch_optimizer.Lamb's checks and messages.
        if lr <= 0.0:
            raise ValueError(f"Invalid learning rate: {lr}")
        if eps < 0.0:
            raise ValueError(f"Invalid epsilon value: {eps}")
        if not 0.0 <= betas[0] < 1.0:
            raise ValueError(f"Invalid beta parameter at index 0: {betas[0]}")
        if not 0.0 <= betas[1] < 1.0:
            raise ValueError(f"Invalid beta parameter at index 1: {betas[1]}")
        if weight_decay < 0:
            raise ValueError(f"Invalid weight_decay value: {weight_decay}")
        if clamp_value < 0.0:
            raise ValueError(f"Invalid clamp value: {clamp_value}")
        lower, upper = trust_clamp if trust_clamp is not None else (0.0, clamp_value)
        if not 0.0 <= lower <= upper:
            raise ValueError(f"Invalid trust_clamp: {trust_clamp}; need 0 <= lower <= upper")
        if max_grad_norm is not None and max_grad_norm <= 0:
            raise ValueError(f"Invalid max_grad_norm: {max_grad_norm}")
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))
        # Like torch_optimizer, these are attributes of the optimizer, not of a param group.
        self.clamp_value = clamp_value
        self.adam = adam
        self.debias = debias
        self.trust_clamp = (float(lower), float(upper))
        self.exclude_bias_and_norm = exclude_bias_and_norm
        self.max_grad_norm = max_grad_norm
        self.grad_averaging = grad_averaging
        self._fused_setup("LAMB", master_weights, False)

    def _clip_divisor(self, grad_scale):
        """apex's global clipping, max(1, ||g|| / max_grad_norm) of the unscaled gradients (None
        without gradients); the kernels divide by it with the gradient scale."""
        grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
        if not grads:
            return None
        total = get_total_norm(grads).float()
        if grad_scale is not None:
            total = total / grad_scale.to(total.device)
        return torch.clamp(total / self.max_grad_norm, min=1.0)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        clip = None
        for group in self._groups():
            beta1, beta2 = (float(b) for b in group["betas"])
            if any(mt.is_distributed(p) for p in group["params"]):
                raise NotImplementedError(
                    "fusedtech: LAMB does not support DTensor (FSDP2 / tensor-parallel) parameters yet: its trust "
                    "ratio needs each parameter's norm over all shards; the element-wise optimizers (Adam, AdamW, "
                    "SGD, RMSprop, Adagrad) do")
            for (device, _, _), b in self._buckets(group, _STATE).items():
                lr, lr_tensor = mt.lr_args(group["lr"], device)
                grad_scale, found_inf = mt.scaler_tensors(self, device)
                if self.max_grad_norm is not None:
                    if clip is None:  # once per step, before any pass unscales gradients
                        clip = self._clip_divisor(grad_scale)
                    grad_scale = clip.to(device) if grad_scale is None else grad_scale * clip.to(device)
                torch._foreach_add_(b.steps, 1)
                idx = list(range(len(b.params)))
                runs = [(idx, float(group["weight_decay"]), self.adam)]
                if self.exclude_bias_and_norm:
                    small = [i for i in idx if b.params[i].dim() <= 1]
                    runs = [([i for i in idx if b.params[i].dim() > 1], float(group["weight_decay"]), self.adam),
                            (small, 0.0, True)]
                for sel, weight_decay, adam in runs:
                    if not sel:
                        continue
                    pick = (lambda xs: [xs[i] for i in sel]) if len(sel) < len(idx) else (lambda xs: xs)
                    lamb_step_(pick(b.params), pick(b.grads), pick(b.states["exp_avg"]), pick(b.states["exp_avg_sq"]),
                               pick(b.masters) if b.masters else [], pick(b.steps), lr, lr_tensor, beta1, beta2,
                               float(group["eps"]), weight_decay, self.trust_clamp[0], self.trust_clamp[1],
                               bool(self.debias), bool(adam), bool(self.grad_averaging), grad_scale, found_inf)
                mt.undo_skipped_steps(b.steps, found_inf)
                mt.finish(b, self)
        return loss


FusedLAMB = LAMB
Lamb = LAMB  # the name torch_optimizer users know
