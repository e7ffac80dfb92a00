"""The fused LAMB step as a torch.library op, so torch.compile can trace a step; it
mutates its lists in place and dispatches at run time through STEP, the implementation table."""
from __future__ import annotations

from typing import Optional

import torch

from .. import _backend
from ..reference import lamb as reference
from ._multi_tensor import call, implementation

T = torch.Tensor
L = list[torch.Tensor]


def _triton():
    from ..triton_kernels import lamb
    return lamb


STEP = _backend.Implementations(
    "lamb_step",
    cuda=lambda: torch.ops.fusedtech_C.lamb_step_,
    cpu=lambda: torch.ops.fusedtech_C.lamb_step_,
    triton=lambda: _triton().lamb_step_,
    torch=lambda: reference.lamb_step_)


# norms: a float32 [len(params), 3] tensor the step writes, row i = (clamped weight norm, update
# norm, trust ratio) of params[i] (torch_optimizer's weight_norm, adam_norm, trust_ratio state).
@torch.library.custom_op("fusedtech::lamb_step_",
                         mutates_args=("params", "exp_avgs", "exp_avg_sqs", "master_params", "norms"))
def _lamb_op(params: L, grads: L, exp_avgs: L, exp_avg_sqs: L, master_params: L, steps: L, norms: T, lr: float,
             lr_tensor: Optional[T], beta1: float, beta2: float, eps: float, weight_decay: float, clamp_lower: float,
             clamp_upper: float, debias: bool, adam: bool, grad_averaging: bool, bias_correction: bool,
             trust_clip: bool, grad_scale: Optional[T], found_inf: Optional[T]) -> None:
    implementation(STEP, params[0].device, params)(
        params, grads, exp_avgs, exp_avg_sqs, master_params, steps, norms, lr, lr_tensor, beta1, beta2, eps,
        weight_decay, clamp_lower, clamp_upper, debias, adam, grad_averaging, bias_correction, trust_clip,
        grad_scale, found_inf)


_lamb_op.register_fake(lambda *args: None)


def lamb_step_(*args) -> None:
    call(_lamb_op, STEP, *args)
