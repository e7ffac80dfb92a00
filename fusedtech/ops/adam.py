"""The fused Adam/AdamW step as a torch.library op, so torch.compile can trace an optimizer step."""
from __future__ import annotations

from typing import Optional

import torch

from .. import _backend
from ..reference import adam as reference
from ._multi_tensor import call, implementation


def _triton():
    from ..triton_kernels import adam
    return adam


STEP = _backend.Implementations(
    "adam_step",
    cuda=lambda: torch.ops.fusedtech_C.adam_step_,
    cpu=lambda: torch.ops.fusedtech_C.adam_step_,
    triton=lambda: _triton().adam_step_,
    torch=lambda: reference.adam_step_)
# bf16 stochastic rounding: the CUDA C++ kernel has none (it refuses a seed); Triton takes those steps on a GPU.
STEP_STOCHASTIC_ROUND = _backend.Implementations(
    "adam_step",
    cpu=lambda: torch.ops.fusedtech_C.adam_step_,
    triton=lambda: _triton().adam_step_,
    torch=lambda: reference.adam_step_)


@torch.library.custom_op(
    "fusedtech::adam_step_",
    mutates_args=("params", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs", "master_params"),
)
def _adam_step_op(
    params: list[torch.Tensor], grads: list[torch.Tensor], exp_avgs: list[torch.Tensor],
    exp_avg_sqs: list[torch.Tensor], max_exp_avg_sqs: list[torch.Tensor],
    master_params: list[torch.Tensor], steps: list[torch.Tensor], lr: float,
    lr_tensor: Optional[torch.Tensor], beta1: float, beta2: float, eps: float,
    weight_decay: float, decoupled: bool, amsgrad: bool, maximize: bool,
    grad_scale: Optional[torch.Tensor], found_inf: Optional[torch.Tensor], stochastic_round_seed: Optional[int] = None,
) -> None:
    table = STEP if stochastic_round_seed is None else STEP_STOCHASTIC_ROUND
    implementation(table, params[0].device, params)(
        params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, master_params, steps, lr, lr_tensor, beta1,
        beta2, eps, weight_decay, decoupled, amsgrad, maximize, grad_scale, found_inf, stochastic_round_seed)


@_adam_step_op.register_fake
def _(*args) -> None:
    return None


def adam_step_(*args, stochastic_round_seed: Optional[int] = None) -> None:
    """One Adam/AdamW step over a bucket; `stochastic_round_seed` (an int) rounds bf16 parameters
    stochastically (fusedtech/reference/rounding.py) instead of to nearest."""
    call(_adam_step_op, STEP if stochastic_round_seed is None else STEP_STOCHASTIC_ROUND, *args,
         stochastic_round_seed)


STEP_QUANTIZED = _backend.Implementations(
    "adam_step_quantized",
    cuda=lambda: torch.ops.fusedtech_C.adam_step_quantized_,
    cpu=lambda: torch.ops.fusedtech_C.adam_step_quantized_,
    triton=lambda: _triton().adam_step_quantized_,
    torch=lambda: reference.adam_step_quantized_)
STEP_QUANTIZED_STOCHASTIC_ROUND = _backend.Implementations(  # as STEP_STOCHASTIC_ROUND
    "adam_step_quantized",
    cpu=lambda: torch.ops.fusedtech_C.adam_step_quantized_,
    triton=lambda: _triton().adam_step_quantized_,
    torch=lambda: reference.adam_step_quantized_)


@torch.library.custom_op(
    "fusedtech::adam_step_quantized_",
    mutates_args=("params", "exp_avgs", "exp_avg_absmaxes", "exp_avg_sqs", "exp_avg_sq_absmaxes", "max_exp_avg_sqs",
                  "max_exp_avg_sq_absmaxes", "master_params"),
)
def _adam_step_quantized_op(
    params: list[torch.Tensor], grads: list[torch.Tensor], exp_avgs: list[torch.Tensor],
    exp_avg_absmaxes: list[torch.Tensor], exp_avg_sqs: list[torch.Tensor], exp_avg_sq_absmaxes: list[torch.Tensor],
    max_exp_avg_sqs: list[torch.Tensor], max_exp_avg_sq_absmaxes: list[torch.Tensor],
    master_params: list[torch.Tensor], steps: list[torch.Tensor], signed_table: torch.Tensor,
    unsigned_table: torch.Tensor, lr: float, lr_tensor: Optional[torch.Tensor], beta1: float, beta2: float,
    eps: float, weight_decay: float, decoupled: bool, amsgrad: bool, maximize: bool,
    grad_scale: Optional[torch.Tensor], found_inf: Optional[torch.Tensor], stochastic_round_seed: Optional[int] = None,
) -> None:
    table = STEP_QUANTIZED if stochastic_round_seed is None else STEP_QUANTIZED_STOCHASTIC_ROUND
    implementation(table, params[0].device, params)(
        params, grads, exp_avgs, exp_avg_absmaxes, exp_avg_sqs, exp_avg_sq_absmaxes, max_exp_avg_sqs,
        max_exp_avg_sq_absmaxes, master_params, steps, signed_table, unsigned_table, lr, lr_tensor, beta1, beta2,
        eps, weight_decay, decoupled, amsgrad, maximize, grad_scale, found_inf, stochastic_round_seed)


@_adam_step_quantized_op.register_fake
def _(*args) -> None:
    return None


def adam_step_quantized_(*args, stochastic_round_seed: Optional[int] = None) -> None:
    """Adam over blockwise 8-bit states (fusedtech/reference/quantization.py): one call per bucket."""
    call(_adam_step_quantized_op, STEP_QUANTIZED if stochastic_round_seed is None else STEP_QUANTIZED_STOCHASTIC_ROUND,
         *args, stochastic_round_seed)
