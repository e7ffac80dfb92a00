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
    grad_scale: Optional[torch.Tensor], found_inf: Optional[torch.Tensor],
) -> None:
    implementation(STEP, params[0].device, params)(
        params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, master_params, steps, lr, lr_tensor, beta1,
        beta2, eps, weight_decay, decoupled, amsgrad, maximize, grad_scale, found_inf)


@_adam_step_op.register_fake
def _(*args) -> None:
    return None


def adam_step_(*args) -> None:
    call(_adam_step_op, STEP, *args)


STEP_QUANTIZED = _backend.Implementations(
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
    grad_scale: Optional[torch.Tensor], found_inf: Optional[torch.Tensor],
) -> None:
    implementation(STEP_QUANTIZED, params[0].device, params)(
        params, grads, exp_avgs, exp_avg_absmaxes, exp_avg_sqs, exp_avg_sq_absmaxes, max_exp_avg_sqs,
        max_exp_avg_sq_absmaxes, master_params, steps, signed_table, unsigned_table, lr, lr_tensor, beta1, beta2,
        eps, weight_decay, decoupled, amsgrad, maximize, grad_scale, found_inf)


@_adam_step_quantized_op.register_fake
def _(*args) -> None:
    return None


def adam_step_quantized_(*args) -> None:
    """Adam over blockwise 8-bit states (fusedtech/reference/quantization.py): one call per bucket."""
    call(_adam_step_quantized_op, STEP_QUANTIZED, *args)
