"""Global-norm oracle: torch.linalg.vector_norm of the per-tensor norms, as clip_grad_norm_ does."""
from __future__ import annotations

import torch


def multi_tensor_norm(tensors, norm_type: float) -> torch.Tensor:
    norms = [torch.linalg.vector_norm(t.float(), norm_type) for t in tensors]
    return torch.linalg.vector_norm(torch.stack(norms), norm_type)
