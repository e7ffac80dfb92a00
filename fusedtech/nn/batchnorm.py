"""Fused BatchNorm1d/2d: subclasses of torch's, so arguments, defaults, buffers, state_dict keys,
train/eval behaviour and repr are torch's own; forward() runs fusedtech.nn.functional.batch_norm
with the same running-statistics bookkeeping as torch (momentum=None: cumulative average)."""
from __future__ import annotations

import torch

from . import functional as F
from .normalization import FoldsActivation, share_state


class _FusedBatchNorm:
    def _bookkeeping(self, input):
        """torch's: (momentum factor, use batch statistics, running buffers to pass)."""
        self._check_input_dim(input)
        factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        use_batch_stats = self.training or (self.running_mean is None and self.running_var is None)
        track = not self.training or self.track_running_stats
        return factor, use_batch_stats, (self.running_mean if track else None), (self.running_var if track else None)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        factor, use_batch, rm, rv = self._bookkeeping(input)
        return F.batch_norm(input, rm, rv, self.weight, self.bias, use_batch, factor, self.eps)

    @classmethod
    def from_torch(cls, module):
        return share_state(cls, module)


class BatchNorm1d(_FusedBatchNorm, torch.nn.BatchNorm1d):
    """Drop-in for torch.nn.BatchNorm1d."""


class BatchNorm2d(_FusedBatchNorm, torch.nn.BatchNorm2d):
    """Drop-in for torch.nn.BatchNorm2d (NCHW and channels_last, fp32/fp16/bf16)."""


class BatchNormAct2d(FoldsActivation, _FusedBatchNorm, torch.nn.BatchNorm2d):
    """BatchNorm2d, an optional residual add and an activation ("relu", "gelu", "silu" or "none") in
    one op: forward(x, residual=None) = act(bn(x) + residual). Same parameters, buffers and
    state_dict keys as torch.nn.BatchNorm2d; backward recomputes the pre-activation instead of
    saving it."""

    def __init__(self, num_features, activation: str = "relu", eps=1e-5, momentum=0.1, affine=True,
                 track_running_stats=True, device=None, dtype=None):
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype)
        if activation not in ("relu", "gelu", "silu", "none"):
            raise ValueError(f"activation must be 'relu', 'gelu', 'silu' or 'none', got {activation!r}")
        self.activation = activation

    def forward(self, input: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        return self._normalize(input, self.activation if self.fold_intact() else "none", residual)

    def _normalize(self, input, activation, residual=None):
        factor, use_batch, rm, rv = self._bookkeeping(input)
        return F.batch_norm_act(input, rm, rv, self.weight, self.bias, use_batch, factor, self.eps,
                                activation, residual)

    def extra_repr(self):
        return super().extra_repr() + f", activation={self.activation}"

    @classmethod
    def from_batch_norm(cls, bn: torch.nn.BatchNorm2d, activation: str) -> "BatchNormAct2d":
        new = share_state(cls, bn)
        new.activation = activation
        return new


FusedBatchNorm1d = BatchNorm1d
FusedBatchNorm2d = BatchNorm2d
