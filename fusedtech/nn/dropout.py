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
        new = cls(module.p, module.inplace)
        new.train(module.training)
        return new


FusedDropout = Dropout
