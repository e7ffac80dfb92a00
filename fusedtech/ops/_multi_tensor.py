"""Backend dispatch shared by the multi-tensor optimizer ops."""
from __future__ import annotations

import importlib

import torch

from .. import _backend

IMPLEMENTED = ("cuda", "triton", "cpu", "torch")


def implementation(op_name: str, module: str, device: torch.device):
    """The function that runs `op_name` (e.g. "sgd_step_") on `device`: the compiled op for cuda/cpu,
    fusedtech.triton_kernels.<module>.<op_name> for triton, fusedtech.reference.<module> for torch."""
    backend = _backend.select(op_name.rstrip("_"), device, IMPLEMENTED)
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
        implementation(op_name, module, params[0].device)(params, *args)
