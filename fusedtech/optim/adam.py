"""Fused Adam and AdamW: subclasses of torch.optim.Adam / AdamW, so constructor arguments,
defaults, validation messages, param_groups, state_dict and repr are torch's own; only step()
is replaced by one fused multi-tensor kernel call per (device, dtype) bucket."""
from __future__ import annotations

import inspect

import torch

from ..ops import quantization
from ..ops.adam import adam_step_, adam_step_quantized_
from . import _multi_tensor as mt

_STATE = ("exp_avg", "exp_avg_sq")
# torch.optim.Adam took decoupled_weight_decay in 2.7; older releases only have AdamW for it.
_TORCH_HAS_DECOUPLED = "decoupled_weight_decay" in inspect.signature(torch.optim.Adam.__init__).parameters


class _FusedAdamStep(mt.FusedStepMixin):
    """step() for Adam-family optimizers."""

    _fused_state = _STATE + ("max_exp_avg_sq",)
    _bitsandbytes_states = _STATE  # bitsandbytes' Adam8bit / AdamW8bit (and 32-bit) checkpoints load

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        decoupled_default = isinstance(self, torch.optim.AdamW)
        for index, group in enumerate(self._groups()):
            amsgrad = group["amsgrad"]
            keys = _STATE + (("max_exp_avg_sq",) if amsgrad else ())
            # The first moment takes the signed 8-bit map, the second moments the unsigned one.
            quantized = self._quantized(group, tuple((k, k == "exp_avg") for k in keys))
            buckets = self._buckets(group, keys, quantized=quantized)
            beta1, beta2 = (float(b) for b in group["betas"])
            for (device, dtype, state_format), b in buckets.items():
                lr, lr_tensor = mt.lr_args(group["lr"], device)
                grad_scale, found_inf = mt.scaler_tensors(self, device)
                torch._foreach_add_(b.steps, 1)
                hyper = (lr, lr_tensor, beta1, beta2, float(group["eps"]), float(group["weight_decay"]),
                         bool(group.get("decoupled_weight_decay", decoupled_default)), amsgrad,
                         bool(group["maximize"]), grad_scale, found_inf)
                seed = self._stochastic_round_seed(group, index, dtype, b)
                if state_format in mt.QUANTIZED_STATE_DTYPES:
                    s = b.states
                    adam_step_quantized_(b.params, b.grads, s["exp_avg"], s["exp_avg_absmax"], s["exp_avg_sq"],
                                         s["exp_avg_sq_absmax"], s["max_exp_avg_sq"] if amsgrad else [],
                                         s["max_exp_avg_sq_absmax"] if amsgrad else [], b.masters, b.steps,
                                         quantization.table(True, device, state_format),
                                         quantization.table(False, device, state_format), *hyper,
                                         stochastic_round_seed=seed)
                else:
                    adam_step_(b.params, b.grads, b.states["exp_avg"], b.states["exp_avg_sq"],
                               b.states["max_exp_avg_sq"] if amsgrad else [], b.masters, b.steps, *hyper,
                               stochastic_round_seed=seed)
                mt.undo_skipped_steps(b.steps, found_inf)
                mt.finish(b, self)
        self._step_unfused()  # float64/complex parameters, sparse gradients: torch's step
        return loss


class Adam(_FusedAdamStep, torch.optim.Adam):
    """Drop-in for torch.optim.Adam with a fused multi-tensor step.

    Extra keywords: ``master_weights`` keeps fp32 copies of fp16/bf16 parameters (and fp32 states)
    and updates them inside the fused step; ``state_dtype="int8"`` keeps exp_avg / exp_avg_sq (and
    max_exp_avg_sq) as blockwise 8-bit codes of tensors with at least ``min_quantized_numel`` elements
    (see :class:`Adam8bit`), ``state_dtype="fp8"`` as blockwise E4M3 (see :class:`AdamFp8`); ``bf16_stochastic_round=True`` rounds bf16 parameters stochastically
    (unbiased: updates below bf16's resolution still move the weights on average) instead of to
    nearest, an alternative to fp32 master weights. ``foreach`` and ``fused`` are accepted and ignored.
    """

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0, amsgrad=False, *,
                 foreach=None, maximize=False, capturable=False, differentiable=False, fused=None,
                 decoupled_weight_decay=False, master_weights=False, state_dtype=None,
                 min_quantized_numel=mt.MIN_QUANTIZED_NUMEL, bf16_stochastic_round=False):
        if differentiable:
            self._fused_setup("Adam", master_weights, differentiable)
        extra = {"decoupled_weight_decay": decoupled_weight_decay} if _TORCH_HAS_DECOUPLED else {}
        super().__init__(params, lr, betas, eps, weight_decay, amsgrad, maximize=maximize,
                         capturable=capturable, **extra)
        if not _TORCH_HAS_DECOUPLED:
            for group in self.param_groups:
                group.setdefault("decoupled_weight_decay", decoupled_weight_decay)
        self._fused_setup("Adam", master_weights, differentiable, state_dtype, min_quantized_numel,
                          bf16_stochastic_round)


class AdamW(_FusedAdamStep, torch.optim.AdamW):
    """Drop-in for torch.optim.AdamW (decoupled weight decay) with a fused multi-tensor step."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, amsgrad=False, *,
                 maximize=False, foreach=None, capturable=False, differentiable=False, fused=None,
                 master_weights=False, state_dtype=None, min_quantized_numel=mt.MIN_QUANTIZED_NUMEL,
                 bf16_stochastic_round=False):
        if differentiable:
            self._fused_setup("AdamW", master_weights, differentiable)
        super().__init__(params, lr, betas, eps, weight_decay, amsgrad, maximize=maximize,
                         capturable=capturable)
        self._fused_setup("AdamW", master_weights, differentiable, state_dtype, min_quantized_numel,
                          bf16_stochastic_round)


class Adam8bit(Adam):
    """Adam with blockwise 8-bit states (bitsandbytes' Adam8bit format): ``Adam(..., state_dtype="int8")``.

    ``state["exp_avg"]`` holds uint8 codes of the signed 8-bit dynamic map, ``state["exp_avg_sq"]``
    (and ``max_exp_avg_sq``) codes of the unsigned one, laid out like the parameter; each has a
    float32 ``<key>_absmax`` with one scale per 256 elements in memory order (value = map[code] *
    absmax). Tensors with fewer than ``min_quantized_numel`` elements keep torch's states. The step
    dequantizes, updates in fp32 and requantizes in one kernel call per bucket. A torch (full
    precision) checkpoint loads and is quantized; :func:`fusedtech.optim.dequantize_state_dict` gives
    one torch.optim.Adam loads. 2 bytes of state per element instead of 8.
    """

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0, amsgrad=False, *,
                 min_quantized_numel=mt.MIN_QUANTIZED_NUMEL, **kwargs):
        super().__init__(params, lr, betas, eps, weight_decay, amsgrad, state_dtype="int8",
                         min_quantized_numel=min_quantized_numel, **kwargs)


class AdamW8bit(AdamW):
    """AdamW with blockwise 8-bit states: ``AdamW(..., state_dtype="int8")`` (see :class:`Adam8bit`)."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, amsgrad=False, *,
                 min_quantized_numel=mt.MIN_QUANTIZED_NUMEL, **kwargs):
        super().__init__(params, lr, betas, eps, weight_decay, amsgrad, state_dtype="int8",
                         min_quantized_numel=min_quantized_numel, **kwargs)


class AdamFp8(Adam):
    """Adam with blockwise FP8 (E4M3) states, as torchao's AdamFp8: ``Adam(..., state_dtype="fp8")``.

    Both moments are E4M3 numbers times a float32 scale per 256 elements (absmax / 448): the uint8
    codes in ``state["exp_avg"]`` / ``state["exp_avg_sq"]`` are ranks into E4M3's sorted finite values
    (``fusedtech.reference.quantization.e4m3_bits`` gives their float8_e4m3fn bits), the scales'
    absmax under ``<key>_absmax``, as :class:`Adam8bit` keeps its codes. 2 bytes of state per element.
    """

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0, amsgrad=False, *,
                 min_quantized_numel=mt.MIN_QUANTIZED_NUMEL, **kwargs):
        super().__init__(params, lr, betas, eps, weight_decay, amsgrad, state_dtype="fp8",
                         min_quantized_numel=min_quantized_numel, **kwargs)


class AdamWFp8(AdamW):
    """AdamW with blockwise FP8 (E4M3) states: ``AdamW(..., state_dtype="fp8")`` (see :class:`AdamFp8`)."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, amsgrad=False, *,
                 min_quantized_numel=mt.MIN_QUANTIZED_NUMEL, **kwargs):
        super().__init__(params, lr, betas, eps, weight_decay, amsgrad, state_dtype="fp8",
                         min_quantized_numel=min_quantized_numel, **kwargs)


FusedAdam = Adam
FusedAdamW = AdamW
