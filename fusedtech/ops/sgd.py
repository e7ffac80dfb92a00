"""The fused SGD (momentum, Nesterov) step as a torch.library op, so torch.compile can trace a step; it
mutates its lists in place and dispatches at run time through STEP, the implementation table."""
from __future__ import annotations

from typing import Optional

import torch

from .. import _backend
from ..reference import sgd as reference
from ._multi_tensor import call, implementation

T = torch.Tensor
L = list[torch.Tensor]


def _triton():
    from ..triton_kernels import sgd
    return sgd


STEP = _backend.Implementations(
    "sgd_step",
    cuda=lambda: torch.ops.fusedtech_C.sgd_step_,
    cpu=lambda: torch.ops.fusedtech_C.sgd_step_,
    triton=lambda: _triton().sgd_step_,
    torch=lambda: reference.sgd_step_)


@torch.library.custom_op("fusedtech::sgd_step_", mutates_args=("params", "momentum_buffers", "master_params"))
def _sgd_op(params: L, grads: L, momentum_buffers: L, master_params: L, lr: float, lr_tensor: Optional[T],
            momentum: float, dampening: float, weight_decay: float, nesterov: bool, maximize: bool,
            first_step: bool, grad_scale: Optional[T], found_inf: Optional[T]) -> None:
    implementation(STEP, params[0].device, params)(
        params, grads, momentum_buffers, master_params, lr, lr_tensor, momentum, dampening, weight_decay,
        nesterov, maximize, first_step, grad_scale, found_inf)


_sgd_op.register_fake(lambda *args: None)


def sgd_step_(*args) -> None:
    call(_sgd_op, STEP, *args)
