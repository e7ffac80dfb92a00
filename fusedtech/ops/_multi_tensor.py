"""Dispatch shared by the multi-tensor ops: a table's pick, sized by the list on a GPU."""
from __future__ import annotations

import torch

from .. import _backend


def implementation(table: _backend.Implementations, device: torch.device, tensors=None):
    """The function of `table` that runs on `device`; `tensors`: the list the op steps (on a GPU its
    size picks the automatic backend)."""
    elements = sum(map(torch.Tensor.numel, tensors)) if tensors and device.type == "cuda" else None
    return table.pick(device, elements)


def call(op, table: _backend.Implementations, params, *args) -> None:
    """Eagerly, call the chosen backend directly (the custom-op wrapper costs tens of microseconds);
    under torch.compile go through the custom op so the step is traced."""
    if not params:
        return
    if torch.compiler.is_compiling():
        op(params, *args)
    else:
        implementation(table, params[0].device, params)(params, *args)
