"""Fused LayerNorm and RMSNorm modules: subclasses of torch's, so constructor arguments, defaults,
attributes, parameters, state_dict keys and repr are torch's own; only forward() changes."""
from __future__ import annotations

import torch

from . import functional as F


def share_state(cls, module):
    """An instance of fused class `cls` sharing `module`'s parameters, buffers, device, dtype and
    train/eval mode (what convert_model uses)."""
    new = cls.__new__(cls)
    new.__dict__ = module.__dict__.copy()
    new._parameters = dict(module._parameters)
    new._buffers = dict(module._buffers)
    new._modules = dict(module._modules)
    return new


class LayerNorm(torch.nn.LayerNorm):
    """Drop-in for torch.nn.LayerNorm (fused forward and backward, fp32 statistics). Extra keyword
    memory_efficient=True keeps the output instead of the input for backward (in eager mode, while
    the weight has no exact zero; else the input): it saves the input's memory when the next layer
    keeps the output anyway."""

    memory_efficient = False

    def __init__(self, *args, memory_efficient: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.memory_efficient = memory_efficient

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(input, self.normalized_shape, self.weight, self.bias, self.eps,
                            memory_efficient=self.memory_efficient)

    @classmethod
    def from_torch(cls, module: torch.nn.LayerNorm) -> "LayerNorm":
        return share_state(cls, module)


class LayerNorm2d(torch.nn.LayerNorm):
    """LayerNorm over the channels of an (N, C, H, W) input (ConvNeXt's; timm.layers.LayerNorm2d):
    normalized_shape is (C,), the input is read as its (N, H, W, C) permutation, and the output has
    the strides that permutation back gives (channels_last memory), as timm's computes it."""

    def __init__(self, num_channels: int, eps: float = 1e-6, affine: bool = True, **kwargs):
        super().__init__(num_channels, eps=eps, elementwise_affine=affine, **kwargs)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if input.dim() != 4:
            raise RuntimeError(f"fusedtech: LayerNorm2d expects a 4-d (N, C, H, W) input, got {input.dim()}-d")
        y = F.layer_norm(input.permute(0, 2, 3, 1), self.normalized_shape, self.weight, self.bias, self.eps)
        return y.permute(0, 3, 1, 2)

    @classmethod
    def from_torch(cls, module: torch.nn.LayerNorm) -> "LayerNorm2d":
        return share_state(cls, module)


class RMSNorm(torch.nn.RMSNorm):
    """Drop-in for torch.nn.RMSNorm (eps=None means float32's epsilon, float64's for float64 input,
    as torch computes it); memory_efficient as for LayerNorm."""

    memory_efficient = False

    def __init__(self, *args, memory_efficient: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.memory_efficient = memory_efficient

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, self.normalized_shape, self.weight, self.eps, memory_efficient=self.memory_efficient)

    @classmethod
    def from_torch(cls, module: torch.nn.RMSNorm) -> "RMSNorm":
        return share_state(cls, module)


class FoldsActivation:
    """A norm + activation module that convert_model(fuse_activations=True) may have folded an
    activation into (BatchNormAct2d, GroupNormAct)."""

    def fold_intact(self) -> bool:
        """False once the activation folded in here, or an identity that stood between, was
        replaced where it stood: then this module only normalises and the activation's placeholder
        applies the activation again."""
        folded = self.__dict__.get("_folded_from")
        return folded is None or all(owner._modules.get(name) is module for owner, name, module in folded)


class GroupNorm(torch.nn.GroupNorm):
    """Drop-in for torch.nn.GroupNorm (fp32 Welford statistics; NCHW and channels_last in place)."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return F.group_norm(input, self.num_groups, self.weight, self.bias, self.eps)

    @classmethod
    def from_torch(cls, module: torch.nn.GroupNorm) -> "GroupNorm":
        return share_state(cls, module)


class GroupNormAct(FoldsActivation, torch.nn.GroupNorm):
    """GroupNorm and the activation after it ("silu", "gelu", "relu" or None) in one op, as the
    GroupNorm -> SiLU of a diffusion UNet's blocks: the same parameters and state_dict keys as
    torch.nn.GroupNorm; backward recomputes the pre-activation instead of saving it."""

    def __init__(self, num_groups: int, num_channels: int, eps: float = 1e-5, affine: bool = True,
                 activation: str | None = "silu", device=None, dtype=None):
        super().__init__(num_groups, num_channels, eps, affine, device, dtype)
        if activation not in ("silu", "gelu", "relu", "none", None):
            raise ValueError(f"activation must be 'silu', 'gelu', 'relu' or None, got {activation!r}")
        self.activation = activation or "none"

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return F.group_norm_act(input, self.num_groups, self.weight, self.bias, self.eps,
                                self.activation if self.fold_intact() else "none")

    def extra_repr(self):
        return super().extra_repr() + f", activation={self.activation}"

    @classmethod
    def from_group_norm(cls, module: torch.nn.GroupNorm, activation: str) -> "GroupNormAct":
        new = share_state(cls, module)
        new.activation = activation
        return new


class _FusedInstanceNorm:
    # torch's _InstanceNorm.forward does the checks (dimensions, channel count, unbatched input)
    # and calls this with what F.instance_norm takes.
    def _apply_instance_norm(self, input):
        return F.instance_norm(input, self.running_mean, self.running_var, self.weight, self.bias,
                               self.training or not self.track_running_stats,
                               self.momentum if self.momentum is not None else 0.0, self.eps)

    @classmethod
    def from_torch(cls, module):
        return share_state(cls, module)


class InstanceNorm1d(_FusedInstanceNorm, torch.nn.InstanceNorm1d):
    """Drop-in for torch.nn.InstanceNorm1d."""


class InstanceNorm2d(_FusedInstanceNorm, torch.nn.InstanceNorm2d):
    """Drop-in for torch.nn.InstanceNorm2d (NCHW and channels_last)."""


class InstanceNorm3d(_FusedInstanceNorm, torch.nn.InstanceNorm3d):
    """Drop-in for torch.nn.InstanceNorm3d."""


FusedLayerNorm = LayerNorm
FusedRMSNorm = RMSNorm
