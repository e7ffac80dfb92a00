"""The fused Adagrad step as a torch.library op, so torch.compile can trace a step; it
mutates its lists in place and dispatches at run time through STEP, the implementation table."""
from __future__ import annotations

from typing import Optional

import torch

from .. import _backend
from ..reference import adagrad as reference
from ._multi_tensor import call, implementation

T = torch.Tensor
L = list[torch.Tensor]


def _triton():
    from ..triton_kernels import adagrad
    return adagrad


STEP = _backend.Implementations(
    "adagrad_step",
    cuda=lambda: torch.ops.fusedtech_C.adagrad_step_,
    cpu=lambda: torch.ops.fusedtech_C.adagrad_step_,
    triton=lambda: _triton().adagrad_step_,
    torch=lambda: reference.adagrad_step_)


@torch.library.custom_op("fusedtech::adagrad_step_", mutates_args=("params", "state_sums", "master_params"))
def _adagrad_op(params: L, grads: L, state_sums: L, master_params: L, steps: L, lr: float,
                lr_tensor: Optional[T], lr_decay: float, weight_decay: float, eps: float, maximize: bool,
                grad_scale: Optional[T], found_inf: Optional[T]) -> None:
    implementation(STEP, params[0].device, params)(
        params, grads, state_sums, master_params, steps, lr, lr_tensor, lr_decay, weight_decay, eps,
        maximize, grad_scale, found_inf)


_adagrad_op.register_fake(lambda *args: None)


def adagrad_step_(*args) -> None:
    call(_adagrad_op, STEP, *args)
