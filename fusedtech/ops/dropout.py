"""Dropout as torch.library ops: `fusedtech::dropout` (forward) whose backward is the same masked
scaling of the incoming gradient, regenerated from the saved one-element seed: no mask is kept."""
from __future__ import annotations

import importlib

import torch

from .. import _backend

IMPLEMENTED = ("triton", "cpu", "torch")


def _apply(x, p, seed):
    backend = _backend.select("dropout", x.device, IMPLEMENTED)
    if backend == "cpu":
        return torch.ops.fusedtech_C.dropout_apply(x, p, seed)
    package = "triton_kernels" if backend == "triton" else "reference"
    return importlib.import_module(f"fusedtech.{package}.dropout").dropout_apply(x, p, seed)


@torch.library.custom_op("fusedtech::dropout_apply", mutates_args=())
def dropout_apply(x: torch.Tensor, p: float, seed: torch.Tensor) -> torch.Tensor:
    """dropout(x) with the mask of `seed`: out-of-place, x's shape and dtype, contiguous."""
    return _apply(x, p, seed)


@dropout_apply.register_fake
def _(x, p, seed):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _setup_context(ctx, inputs, output):
    _, p, seed = inputs
    ctx.p = p
    ctx.save_for_backward(seed)  # one int64: the whole of what backward needs


def _backward(ctx, dy):
    (seed,) = ctx.saved_tensors
    return dropout_apply(dy.contiguous(), ctx.p, seed), None, None


dropout_apply.register_autograd(_backward, setup_context=_setup_context)


def new_seed(device: torch.device) -> torch.Tensor:
    """A fresh 62-bit seed drawn from torch's default generator for `device` (so torch.manual_seed
    reproduces runs); it stays on the device: no host synchronisation."""
    return torch.randint(0, 2 ** 62, (1,), device=device, dtype=torch.int64)
