"""DTensor (FSDP2, tensor parallel) awareness, without requiring torch.distributed."""
from __future__ import annotations

try:
    from torch.distributed.tensor import DTensor
except ImportError:  # torch built without distributed
    DTensor = None


def is_distributed(t) -> bool:
    return DTensor is not None and isinstance(t, DTensor)


def local(t):
    """The shard this process holds of a DTensor (FSDP2's parameters, their gradients and the
    states made like them), else t itself. The element-wise optimizer steps update shards
    independently, so the kernels run on the local tensors, which share storage with the DTensors."""
    return t.to_local() if is_distributed(t) else t
