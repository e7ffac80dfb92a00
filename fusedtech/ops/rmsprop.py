"""The fused RMSprop step as a torch.library op, so torch.compile can trace a step; it
mutates its lists in place and dispatches at run time through STEP, the implementation table."""
from __future__ import annotations

from typing import Optional

import torch

from .. import _backend
from ..reference import rmsprop as reference
from ._multi_tensor import call, implementation

T = torch.Tensor
L = list[torch.Tensor]


def _triton():
    from ..triton_kernels import rmsprop
    return rmsprop


STEP = _backend.Implementations(
    "rmsprop_step",
    cuda=lambda: torch.ops.fusedtech_C.rmsprop_step_,
    cpu=lambda: torch.ops.fusedtech_C.rmsprop_step_,
    triton=lambda: _triton().rmsprop_step_,
    torch=lambda: reference.rmsprop_step_)


@torch.library.custom_op("fusedtech::rmsprop_step_",
                         mutates_args=("params", "square_avgs", "grad_avgs", "momentum_buffers", "master_params"))
def _rmsprop_op(params: L, grads: L, square_avgs: L, grad_avgs: L, momentum_buffers: L, master_params: L,
                lr: float, lr_tensor: Optional[T], alpha: float, eps: float, weight_decay: float,
                momentum: float, maximize: bool, grad_scale: Optional[T], found_inf: Optional[T]) -> None:
    implementation(STEP, params[0].device, params)(
        params, grads, square_avgs, grad_avgs, momentum_buffers, master_params, lr, lr_tensor, alpha, eps,
        weight_decay, momentum, maximize, grad_scale, found_inf)


_rmsprop_op.register_fake(lambda *args: None)


def rmsprop_step_(*args) -> None:
    call(_rmsprop_op, STEP, *args)
