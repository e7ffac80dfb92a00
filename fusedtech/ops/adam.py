"""The fused Adam/AdamW step as a torch.library op, so torch.compile can trace an optimizer step."""
from __future__ import annotations

from typing import Optional

import torch

from .. import _backend
from ..reference import adam as reference

IMPLEMENTED = ("cuda", "triton", "cpu", "torch")


def _impl(backend: str):
    if backend in ("cuda", "cpu"):
        return torch.ops.fusedtech_C.adam_step_
    if backend == "triton":
        from ..triton_kernels import adam as triton_adam
        return triton_adam.adam_step_
    return reference.adam_step_


def adam_step_eager(params, *args) -> None:
    if not params:
        return
    backend = _backend.select("adam_step", params[0].device, IMPLEMENTED)
    _impl(backend)(params, *args)


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
    adam_step_eager(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, master_params, steps, lr,
                    lr_tensor, beta1, beta2, eps, weight_decay, decoupled, amsgrad, maximize,
                    grad_scale, found_inf)


@_adam_step_op.register_fake
def _(*args) -> None:
    return None


def adam_step_(*args) -> None:
    """Eagerly, call the chosen backend directly (the custom-op wrapper costs tens of microseconds
    a call); under torch.compile, go through the op so the step is traced."""
    if torch.compiler.is_compiling():
        _adam_step_op(*args)
    else:
        adam_step_eager(*args)
