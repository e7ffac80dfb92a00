"""The fused SGD, RMSprop, Adagrad and LAMB steps as torch.library ops, so torch.compile can trace a step.
(Adam/AdamW: ops/adam.py.) Each op mutates its lists in place and dispatches at run time."""
from __future__ import annotations

from typing import Optional

import torch

from ._multi_tensor import call, implementation

T = torch.Tensor
L = list[torch.Tensor]


@torch.library.custom_op("fusedtech::sgd_step_", mutates_args=("params", "momentum_buffers", "master_params"))
def _sgd_op(params: L, grads: L, momentum_buffers: L, master_params: L, lr: float, lr_tensor: Optional[T],
            momentum: float, dampening: float, weight_decay: float, nesterov: bool, maximize: bool,
            first_step: bool, grad_scale: Optional[T], found_inf: Optional[T]) -> None:
    implementation("sgd_step_", "sgd", params[0].device, params)(
        params, grads, momentum_buffers, master_params, lr, lr_tensor, momentum, dampening, weight_decay,
        nesterov, maximize, first_step, grad_scale, found_inf)


@torch.library.custom_op("fusedtech::rmsprop_step_",
                         mutates_args=("params", "square_avgs", "grad_avgs", "momentum_buffers", "master_params"))
def _rmsprop_op(params: L, grads: L, square_avgs: L, grad_avgs: L, momentum_buffers: L, master_params: L,
                lr: float, lr_tensor: Optional[T], alpha: float, eps: float, weight_decay: float,
                momentum: float, maximize: bool, grad_scale: Optional[T], found_inf: Optional[T]) -> None:
    implementation("rmsprop_step_", "rmsprop", params[0].device, params)(
        params, grads, square_avgs, grad_avgs, momentum_buffers, master_params, lr, lr_tensor, alpha, eps,
        weight_decay, momentum, maximize, grad_scale, found_inf)


@torch.library.custom_op("fusedtech::adagrad_step_", mutates_args=("params", "state_sums", "master_params"))
def _adagrad_op(params: L, grads: L, state_sums: L, master_params: L, steps: L, lr: float,
                lr_tensor: Optional[T], lr_decay: float, weight_decay: float, eps: float, maximize: bool,
                grad_scale: Optional[T], found_inf: Optional[T]) -> None:
    implementation("adagrad_step_", "adagrad", params[0].device, params)(
        params, grads, state_sums, master_params, steps, lr, lr_tensor, lr_decay, weight_decay, eps,
        maximize, grad_scale, found_inf)


# norms: a float32 [len(params), 3] tensor the step writes, row i = (clamped weight norm, update
# norm, trust ratio) of params[i] (torch_optimizer's weight_norm, adam_norm, trust_ratio state).
@torch.library.custom_op("fusedtech::lamb_step_",
                         mutates_args=("params", "exp_avgs", "exp_avg_sqs", "master_params", "norms"))
def _lamb_op(params: L, grads: L, exp_avgs: L, exp_avg_sqs: L, master_params: L, steps: L, norms: T, lr: float,
             lr_tensor: Optional[T], beta1: float, beta2: float, eps: float, weight_decay: float, clamp_lower: float,
             clamp_upper: float, debias: bool, adam: bool, grad_averaging: bool, bias_correction: bool,
             trust_clip: bool, grad_scale: Optional[T], found_inf: Optional[T]) -> None:
    implementation("lamb_step_", "lamb", params[0].device, params)(
        params, grads, exp_avgs, exp_avg_sqs, master_params, steps, norms, lr, lr_tensor, beta1, beta2, eps,
        weight_decay, clamp_lower, clamp_upper, debias, adam, grad_averaging, bias_correction, trust_clip,
        grad_scale, found_inf)


for _op in (_sgd_op, _rmsprop_op, _adagrad_op, _lamb_op):
    _op.register_fake(lambda *args: None)


def sgd_step_(*args) -> None:
    call(_sgd_op, "sgd_step_", "sgd", *args)


def rmsprop_step_(*args) -> None:
    call(_rmsprop_op, "rmsprop_step_", "rmsprop", *args)


def adagrad_step_(*args) -> None:
    call(_adagrad_op, "adagrad_step_", "adagrad", *args)


def lamb_step_(*args) -> None:
    call(_lamb_op, "lamb_step_", "lamb", *args)
