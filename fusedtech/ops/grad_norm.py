"""The global norm of a tensor list as a torch.library op (clip_grad_norm_'s one reduction)."""
from __future__ import annotations

import torch

from .. import _backend
from ..reference import grad_norm as reference
from ._multi_tensor import implementation


def _triton():
    from ..triton_kernels import grad_norm
    return grad_norm


NORM = _backend.Implementations(
    "multi_tensor_norm",
    cuda=lambda: torch.ops.fusedtech_C.multi_tensor_norm,
    cpu=lambda: torch.ops.fusedtech_C.multi_tensor_norm,
    triton=lambda: _triton().multi_tensor_norm,
    torch=lambda: reference.multi_tensor_norm)


@torch.library.custom_op("fusedtech::multi_tensor_norm", mutates_args=())
def multi_tensor_norm(tensors: list[torch.Tensor], norm_type: float) -> torch.Tensor:
    """0-d float32: the 2-norm or inf-norm of all elements of `tensors` (one device, one dtype)."""
    return implementation(NORM, tensors[0].device)(tensors, norm_type)


@multi_tensor_norm.register_fake
def _(tensors, norm_type):
    return tensors[0].new_empty((), dtype=torch.float32)
