"""Drop-in modules for ``torch.nn``: fused LayerNorm / RMSNorm (BatchNorm and dropout land here
as they are built), ``functional`` and ``utils`` counterparts."""
from . import functional, utils  # noqa: F401
from .batchnorm import (BatchNorm1d, BatchNorm2d, BatchNormAct2d, FusedBatchNorm1d,  # noqa: F401
                        FusedBatchNorm2d)
from .convert import convert_model  # noqa: F401
from .dropout import DropBlock2d, Dropout, DropoutAddLayerNorm, FusedDropout  # noqa: F401
from .normalization import (FusedLayerNorm, FusedRMSNorm, GroupNorm, GroupNormAct, InstanceNorm1d,  # noqa: F401
                            InstanceNorm2d, InstanceNorm3d, LayerNorm, LayerNorm2d, RMSNorm)
from .adapters import TimmBatchNormAct2d, TimmGroupNormAct, TransformersRMSNorm  # noqa: F401
