"""Backend dispatch shared by the multi-tensor optimizer ops."""
from __future__ import annotations

import importlib

import torch

from .. import _backend

IMPLEMENTED = ("cuda", "triton", "cpu", "torch")


def implementation(op_name: str, module: str, device: torch.device, tensors=None):
    """The function that runs `op_name` (e.g. "sgd_step_") on `device`: the compiled op for cuda/cpu,
    fusedtech.triton_kernels.<module>.<op_name> for triton, fusedtech.reference.<module> for torch.
    `tensors`: the list the op steps; on a GPU its size picks the automatic backend."""
    elements = sum(map(torch.Tensor.numel, tensors)) if tensors and device.type == "cuda" else None
    backend = _backend.select(op_name.rstrip("_"), device, IMPLEMENTED, elements)
    if backend in ("cuda", "cpu"):
        return getattr(torch.ops.fusedtech_C, op_name)
    package = "triton_kernels" if backend == "triton" else "reference"
    return getattr(importlib.import_module(f"fusedtech.{package}.{module}"), op_name)


def call(op, op_name: str, module: str, params, *args) -> None:
    """Eagerly, call the chosen backend directly (the custom-op wrapper costs tens of microseconds);
    under torch.compile go through the custom op so the step is traced."""
    if not params:
        return
    if torch.compiler.is_compiling():
        op(params, *args)
    else:
        implementation(op_name, module, params[0].device, params)(params, *args)
