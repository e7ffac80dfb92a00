"""Backend dispatch shared by the multi-tensor optimizer ops."""
from __future__ import annotations

import torch

from .. import _backend

IMPLEMENTED = ("cuda", "triton", "cpu", "torch")


def implementation(op_name: str, module: str, device: torch.device, tensors=None):
    """The function that runs `op_name` (e.g. "sgd_step_") on `device`: the compiled op for cuda/cpu,
    fusedtech.triton_kernels.<module>.<op_name> for triton, fusedtech.reference.<module> for torch.
    `tensors`: the list the op steps; on a GPU its size picks the automatic backend."""
    elements = sum(map(torch.Tensor.numel, tensors)) if tensors and device.type == "cuda" else None
    return _backend.implementation(op_name.rstrip("_"), device, IMPLEMENTED, module, op_name, elements)


def call(op, op_name: str, module: str, params, *args) -> None:
    """Eagerly, call the chosen backend directly (the custom-op wrapper costs tens of microseconds);
    under torch.compile go through the custom op so the step is traced."""
    if not params:
        return
    if torch.compiler.is_compiling():
        op(params, *args)
    else:
        implementation(op_name, module, params[0].device, params)(params, *args)
