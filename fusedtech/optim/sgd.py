"""Fused SGD (momentum, dampening, Nesterov): a subclass of torch.optim.SGD whose step() is one
multi-tensor kernel call per (device, dtype) bucket (two on the step that creates momentum
buffers, which start as an exact copy of the gradient, as in torch)."""
from __future__ import annotations

import operator

import torch

from ..ops.sgd import sgd_step_
from . import _multi_tensor as mt


class SGD(mt.FusedStepMixin, torch.optim.SGD):
    """Drop-in for torch.optim.SGD. Extra keyword: ``master_weights`` (fp32 master copies and
    momentum buffers for fp16/bf16 parameters). ``foreach`` and ``fused`` are accepted and ignored."""

    _fused_state = ("momentum_buffer",)

    def __init__(self, params, lr=1e-3, momentum=0, dampening=0, weight_decay=0, nesterov=False, *,
                 maximize=False, foreach=None, differentiable=False, fused=None, master_weights=False):
        if differentiable:
            self._fused_setup("SGD", master_weights, differentiable)
        super().__init__(params, lr, momentum, dampening, weight_decay, nesterov, maximize=maximize)
        self._fused_setup("SGD", master_weights, differentiable)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        # Buffers made by this step: a parameter listed again in its group starts over from its
        # gradient, as torch's SGD does (it reads every listing's buffer before the first update).
        created: set = set()
        for group in self._groups():
            momentum = float(group["momentum"])
            buckets = self._buckets(group, (), with_step=False)
            for (device, _, state_dtype), b in buckets.items():
                lr, lr_tensor = mt.lr_args(group["lr"], device)
                grad_scale, found_inf = mt.scaler_tensors(self, device)
                # Parameters whose momentum buffer exists, and those whose buffer this step creates.
                runs = [(b.params, b.grads, b.masters, [], False, [])]
                cached = b.momentum_buffers if momentum != 0 else None
                if cached is not None and all(map(operator.is_, mt.state_tensors(b, "momentum_buffer"), cached)):
                    # Steady state: every buffer exists and is the one laid out last step.
                    runs = [(b.params, b.grads, b.masters, cached, False, [])]
                elif momentum != 0:
                    have, new = [], []
                    for i, p in enumerate(b.originals):
                        # None: a checkpoint of torch 1.x's SGD; torch makes the buffer again, as for a new one.
                        fresh = self.state[p].get("momentum_buffer") is None or id(p) in created
                        (new if fresh else have).append(i)
                    runs = []
                    for idx, first in ((have, False), (new, True)):
                        if not idx:
                            continue
                        if first:
                            for i in idx:
                                created.add(id(b.originals[i]))
                                # Made like the parameter itself when it is a DTensor (FSDP2),
                                # so that the state is one too, as torch's SGD keeps it.
                                like = b.originals[i] if mt.is_distributed(b.originals[i]) else b.params[i]
                                self.state[b.originals[i]]["momentum_buffer"] = torch.empty_like(
                                    like, dtype=state_dtype)
                        bufs = [mt.matching_state(self.state[b.originals[i]], "momentum_buffer", b.params[i],
                                                  state_dtype) for i in idx]
                        runs.append(([b.params[i] for i in idx], [b.grads[i] for i in idx],
                                     [b.masters[i] for i in idx] if b.masters else [], bufs, first, idx))
                        if not first and not new:
                            b.momentum_buffers = bufs
                for params, grads, masters, bufs, first, idx in runs:
                    sgd_step_(params, grads, bufs, masters, lr, lr_tensor, momentum, float(group["dampening"]),
                              float(group["weight_decay"]), bool(group["nesterov"]), bool(group["maximize"]),
                              first, grad_scale, found_inf)
                    if first and found_inf is not None and found_inf.item():
                        # A skipped first step creates no buffer (for torch the step never ran);
                        # the one host sync of this optimizer, on buffer-creating steps only.
                        for i in idx:
                            del self.state[b.originals[i]]["momentum_buffer"]
                mt.finish(b, self)
        self._step_unfused()  # float64/complex parameters, sparse gradients: torch's step
        return loss


FusedSGD = SGD
