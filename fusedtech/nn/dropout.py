"""Fused Dropout module: a subclass of torch.nn.Dropout (same arguments, repr, train/eval)."""
from __future__ import annotations

import torch

from . import functional as F


class Dropout(torch.nn.Dropout):
    """Drop-in for torch.nn.Dropout that stores no mask for backward."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return F.dropout(input, self.p, self.training, self.inplace)

    @classmethod
    def from_torch(cls, module: torch.nn.Dropout) -> "Dropout":
        """The fused module sharing module's state, hooks and attributes (as the norms convert)."""
        from .normalization import share_state
        return share_state(cls, module)


FusedDropout = Dropout


class DropoutAddLayerNorm(torch.nn.Module):
    """norm(dropout(x) + residual): LayerNorm (or RMSNorm with rms=True) over the last dimension,
    its weight and bias as torch.nn.LayerNorm names them. forward(x, residual, return_residual=False)."""

    def __init__(self, hidden_size: int, p: float = 0.1, eps: float = 1e-5, elementwise_affine: bool = True,
                 bias: bool = True, rms: bool = False, device=None, dtype=None):
        super().__init__()
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"dropout probability has to be between 0 and 1, but got {p}")
        self.normalized_shape = (hidden_size,)
        self.p, self.eps, self.rms = p, eps, rms
        factory = dict(device=device, dtype=dtype)
        self.weight = torch.nn.Parameter(torch.ones(hidden_size, **factory)) if elementwise_affine else None
        self.bias = torch.nn.Parameter(torch.zeros(hidden_size, **factory)) if elementwise_affine and bias and not rms else None

    def forward(self, x, residual, return_residual: bool = False):
        return F.dropout_add_layer_norm(x, residual, self.weight, self.bias, self.p, self.eps, self.training,
                                        self.rms, return_residual)

    def extra_repr(self):
        return f"{self.normalized_shape[0]}, p={self.p}, eps={self.eps}, rms={self.rms}"


class DropBlock2d(torch.nn.Module):
    """torchvision.ops.DropBlock2d's semantics (p, block_size, inplace, eps): block seeds drawn from
    a Philox stream seeded from torch's generator, grown into blocks, output rescaled by
    numel / (eps + kept)."""

    def __init__(self, p: float, block_size: int, inplace: bool = False, eps: float = 1e-6):
        super().__init__()
        self.p, self.block_size, self.inplace, self.eps = p, block_size, inplace, eps

    def forward(self, input):
        return F.drop_block2d(input, self.p, self.block_size, self.inplace, self.eps, self.training)

    def extra_repr(self):
        return f"p={self.p}, block_size={self.block_size}, inplace={self.inplace}"
