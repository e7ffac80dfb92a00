"""Fused BatchNorm1d/2d: subclasses of torch's, so arguments, defaults, buffers, state_dict keys,
train/eval behaviour and repr are torch's own; forward() runs fusedtech.nn.functional.batch_norm
with the same running-statistics bookkeeping as torch (momentum=None: cumulative average)."""
from __future__ import annotations

import torch

from . import functional as F
from .normalization import share_state


class _FusedBatchNorm:
    def forward(self, input: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(input)
        factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        use_batch_stats = self.training or (self.running_mean is None and self.running_var is None)
        track = not self.training or self.track_running_stats
        return F.batch_norm(input, self.running_mean if track else None, self.running_var if track else None,
                            self.weight, self.bias, use_batch_stats, factor, self.eps)

    @classmethod
    def from_torch(cls, module):
        return share_state(cls, module)


class BatchNorm1d(_FusedBatchNorm, torch.nn.BatchNorm1d):
    """Drop-in for torch.nn.BatchNorm1d."""


class BatchNorm2d(_FusedBatchNorm, torch.nn.BatchNorm2d):
    """Drop-in for torch.nn.BatchNorm2d (NCHW and channels_last, fp32/fp16/bf16)."""


FusedBatchNorm1d = BatchNorm1d
FusedBatchNorm2d = BatchNorm2d
