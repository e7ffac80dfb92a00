"""Fused LAMB. The default is a drop-in for ``torch_optimizer.Lamb`` (same arguments, defaults,
validation, param_groups and state keys), with options beyond it:

- ``trust_clamp=(lower, upper)``: the trust-ratio clamp phi(z) = min(max(z, lower), upper) applied
  to the weight norm (default ``(0, clamp_value)``, torch_optimizer's);
- ``exclude_bias_and_norm=True``: parameters with at most one dimension (biases, norm weights)
  get no weight decay and a trust ratio of 1;
- ``max_grad_norm``: apex FusedLAMB's global gradient-norm clipping (gradients divided by
  max(1, ||g|| / max_grad_norm) inside the fused pass; ``.grad`` is left untouched);
- ``grad_averaging`` (apex, timm; default True): m = beta1 m + (1 - beta1) g, else m = beta1 m + g;
- ``bias_correction`` (timm; default False): the update direction from bias-corrected moments,
  u = (m / (1 - beta1^t)) / (sqrt(v) / sqrt(1 - beta2^t) + eps) + wd p (``debias`` instead scales
  the step after the trust ratio, as torch_optimizer);
- ``always_adapt`` (timm; default True, torch_optimizer's behaviour): False applies the trust ratio
  only in param groups with weight_decay != 0 (a ratio of 1 elsewhere);
- ``trust_clip`` (timm's LAMBC; default False): the trust ratio clamped to at most 1;
- ``master_weights``: fp32 master weights and states for fp16/bf16 parameters.

timm's default ``timm.optim.Lamb(params, lr)`` is
``LAMB(params, lr, weight_decay=0.01, bias_correction=True, always_adapt=False,
trust_clamp=(0, math.inf), max_grad_norm=1.0)`` (timm clamps no weight norm; its eps and betas are
the defaults here too); its ``trust_clip=True`` and ``grad_averaging=False`` are the options of the
same names. timm's ``caution`` and ``decoupled_decay`` have no equivalent here.

State per parameter, as torch_optimizer's: ``step``, ``exp_avg``, ``exp_avg_sq``, and from the last
step that changed the parameter, ``weight_norm`` (phi(||p||) of the weights before the update),
``adam_norm`` (||u||, weight decay included) and ``trust_ratio`` (phi(||p||) / ||u||, 1 where
either is 0, after ``trust_clip``), as 0-dim float32 tensors on the parameter's device.
``trust_ratio`` is the ratio as computed, also where the step applies 1 instead (``adam=True``,
as torch_optimizer stores it; ``always_adapt=False`` without weight decay; with
``exclude_bias_and_norm``, the 1-D parameters, whose norms are those of their decay-free update).
A step GradScaler skips (found_inf) leaves them unchanged; before a parameter's first step they
read 0, 0, 1. They are views of one float32 [n, 3] tensor per kernel call that the kernels write in
pass 2 (no extra pass over the data, no per-parameter work on the host), updated in place: copy
one to keep its value.

Under FSDP2 (DTensor parameters, sharded or replicated over a device mesh) each tensor's ||p|| and
||u|| are summed over the processes holding its shards, for all tensors in one all-reduce per step,
so the trust ratios and the steps are single-process LAMB's; that path runs the oracle's two halves
(fusedtech/reference/lamb.py) on the local shards, in torch ops, not the fused kernels.

Launches per (device, dtype) bucket and step on CUDA: one to advance the steps, then pass 1
(moments and per-chunk norm partials), pass 2 (per-tensor trust ratios and norms) and pass 3
(update); ``max_grad_norm`` adds one norm reduction per bucket. No per-tensor Python loop touches
the data.
"""
from __future__ import annotations

import torch

from ..ops.lamb import lamb_step_
from ..reference.lamb import lamb_apply, lamb_directions
from ..nn.utils import get_total_norm
from . import _multi_tensor as mt

_STATE = ("exp_avg", "exp_avg_sq")
_NORMS = ("weight_norm", "adam_norm", "trust_ratio")  # the columns of the kernels' norms output
_NORMS_BEFORE_FIRST_STEP = (0.0, 0.0, 1.0)


class LAMB(mt.FusedStepMixin, torch.optim.Optimizer):
    _fused_state = _STATE
    _torch_fallback = False  # no torch LAMB to hand float64/complex/sparse to: refused by name
    _fusedtech_attributes = ("clamp_value", "adam", "debias", "trust_clamp", "exclude_bias_and_norm", "max_grad_norm",
                             "grad_averaging", "bias_correction", "always_adapt", "trust_clip")
    # Class-level defaults: an optimizer pickled before these options existed steps as it did.
    bias_correction, always_adapt, trust_clip = False, True, False

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-6, weight_decay=0, clamp_value=10,
                 adam=False, debias=False, *, trust_clamp=None, exclude_bias_and_norm=False, max_grad_norm=None,
                 grad_averaging=True, bias_correction=False, always_adapt=True, trust_clip=False,
                 master_weights=False):
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
        self.bias_correction = bool(bias_correction)
        self.always_adapt = bool(always_adapt)
        self.trust_clip = bool(trust_clip)
        self._fused_setup("LAMB", master_weights, False)

    def load_state_dict(self, state_dict):
        super().load_state_dict(state_dict)
        # torch's load casts every state tensor but step to its parameter's dtype, and
        # torch_optimizer stores a trust ratio of 1 as the int: the norms are float32 tensors
        # whatever the parameter (the next step copies them into its norms tensor).
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        for pid, p in zip(saved_ids, params):
            saved, state = state_dict["state"].get(pid) or {}, self.state.get(p) or {}
            for key in _NORMS:
                if key in state:
                    value = saved.get(key, state[key])
                    state[key] = (value.detach().to(device=p.device, dtype=torch.float32, copy=True)
                                  if torch.is_tensor(value) else
                                  torch.tensor(float(value), dtype=torch.float32, device=p.device))

    def _runs(self, b):
        """The kernel calls of a bucket: (indices or None for all, excluded from decay and trust
        ratio, norms tensor). Made when collect() builds the bucket (the first step, after a
        load_state_dict, a change of which parameters have gradients), kept with it after: the
        state's weight_norm / adam_norm / trust_ratio are views of the norms tensors' rows, holding
        the values they had (a loaded checkpoint's included) until the kernels overwrite them."""
        cached = b.__dict__.get("lamb_runs")
        if cached is not None and cached[0] == self.exclude_bias_and_norm:
            return cached[1]
        idx = list(range(len(b.params)))
        sels = [(idx, False)]
        if self.exclude_bias_and_norm:
            sels = [([i for i in idx if b.params[i].dim() > 1], False), ([i for i in idx if b.params[i].dim() <= 1], True)]
        device = b.params[0].device
        runs = [(sel if len(sel) < len(idx) else None, excluded, _norms_tensor([b.state_dicts[i] for i in sel], device))
                for sel, excluded in sels if sel]
        b.lamb_runs = (self.exclude_bias_and_norm, runs)
        return runs

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
        # DTensor buckets: their kernel calls' first halves, finished after one all-reduce of norms
        sharded_runs, sharded_buckets = [], []
        for group in self._groups():
            beta1, beta2 = (float(b) for b in group["betas"])
            for (device, _, _), b in self._buckets(group, _STATE).items():
                lr, lr_tensor = mt.lr_args(group["lr"], device)
                grad_scale, found_inf = mt.scaler_tensors(self, device)
                if self.max_grad_norm is not None:
                    if clip is None:  # once per step, before any pass unscales gradients
                        clip = self._clip_divisor(grad_scale)
                    grad_scale = clip.to(device) if grad_scale is None else grad_scale * clip.to(device)
                torch._foreach_add_(b.steps, 1)
                decay = float(group["weight_decay"])
                # always_adapt=False (timm): no trust ratio in a group without weight decay.
                adam = bool(self.adam) or (not self.always_adapt and decay == 0)
                for sel, excluded, norms in self._runs(b):
                    pick = (lambda xs: [xs[i] for i in sel]) if sel is not None else (lambda xs: xs)
                    moments = (pick(b.params), pick(b.grads), pick(b.states["exp_avg"]), pick(b.states["exp_avg_sq"]),
                               pick(b.masters) if b.masters else [], pick(b.steps))
                    if b.distributed:
                        prepared = lamb_directions(*moments, lr, lr_tensor, beta1, beta2, float(group["eps"]),
                                                   0.0 if excluded else decay, bool(self.grad_averaging),
                                                   self.bias_correction, grad_scale, found_inf)
                        sharded_runs.append((prepared, moments, norms, pick(b.originals), beta1, beta2,
                                             adam or excluded))
                        continue
                    lamb_step_(*moments, norms, lr, lr_tensor, beta1, beta2, float(group["eps"]),
                               0.0 if excluded else decay, self.trust_clamp[0], self.trust_clamp[1],
                               bool(self.debias), adam or excluded, bool(self.grad_averaging),
                               self.bias_correction, self.trust_clip, grad_scale, found_inf)
                if b.distributed:
                    sharded_buckets.append((b, found_inf))
                    continue
                mt.undo_skipped_steps(b.steps, found_inf)
                mt.finish(b, self)
        if sharded_runs:
            self._finish_sharded(sharded_runs)
        for b, found_inf in sharded_buckets:
            mt.undo_skipped_steps(b.steps, found_inf)
            mt.finish(b, self)
        return loss

    def _finish_sharded(self, runs):
        """LAMB's second half for DTensor (FSDP2, tensor-parallel) parameters: each tensor's
        ||p||^2 and ||u||^2 summed over the processes its shards are split across, for all
        tensors of the step in one all-reduce per process group, then the same trust ratio and
        update single-process LAMB computes. Every process takes part, also one that GradScaler
        told to skip (its contribution is zero and it applies nothing), so none waits alone."""
        squares = []
        for prepared, moments, *_ in runs:
            n = len(moments[0])
            local = (prepared.local_norms if prepared is not None
                     else torch.zeros(n, 2, device=moments[0][0].device if n else "cpu"))
            squares.append(local.float().square())
        total = torch.cat(squares)
        groups = {_shard_groups(p) for *_, originals, _, _, _ in runs for p in originals}
        if len(groups) != 1:
            raise NotImplementedError("fusedtech: LAMB's DTensor parameters must all be sharded over the same "
                                      f"process groups (found {len(groups)} different ones)")
        for process_group in next(iter(groups)):
            torch.distributed.all_reduce(total, group=process_group)
        full = total.sqrt()
        offset = 0
        for prepared, moments, norms, _, beta1, beta2, adam in runs:
            n = len(moments[0])
            if prepared is not None:
                lamb_apply(prepared, full[offset:offset + n], moments[0], moments[4], norms, beta1, beta2,
                           self.trust_clamp[0], self.trust_clamp[1], bool(self.debias), adam, self.trust_clip)
            offset += n


def _shard_groups(p) -> tuple:
    """The process groups over which DTensor p is split (mesh dimensions it is Shard()ed on; a
    Replicate() dimension holds whole copies and adds nothing to the norm)."""
    from torch.distributed.tensor import Replicate, Shard
    groups = []
    for dim, placement in enumerate(p.placements):
        if isinstance(placement, Shard):
            groups.append(p.device_mesh.get_group(dim))
        elif not isinstance(placement, Replicate):
            raise NotImplementedError(f"fusedtech: LAMB takes DTensor parameters that are sharded or replicated, "
                                      f"got placement {placement} (a partial sum)")
    return tuple(groups)


def _norms_tensor(state_dicts: list, device: torch.device) -> torch.Tensor:
    """A float32 [len(state_dicts), 3] tensor holding each state's weight_norm, adam_norm and
    trust_ratio (0, 0, 1 where absent; torch_optimizer may have stored a Python number), whose
    rows' elements then become those state entries."""
    host = [list(_NORMS_BEFORE_FIRST_STEP) for _ in state_dicts]
    slots, loaded = [], []
    for j, state in enumerate(state_dicts):
        for k, key in enumerate(_NORMS):
            value = state.get(key)
            if torch.is_tensor(value):
                slots.append(3 * j + k)
                loaded.append(value.detach().reshape(()).to(device=device, dtype=torch.float32))
            elif value is not None:
                host[j][k] = float(value)
    norms = torch.tensor(host, dtype=torch.float32, device=device)
    if loaded:
        norms.view(-1).index_copy_(0, torch.tensor(slots, device=device), torch.stack(loaded))
    for state, row in zip(state_dicts, norms):
        state.update(zip(_NORMS, row.unbind(0)))
    return norms


FusedLAMB = LAMB
Lamb = LAMB  # the name torch_optimizer users know
