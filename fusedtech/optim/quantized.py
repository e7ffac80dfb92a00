"""Checkpoints of optimizers with quantized states (``state_dtype="int8"``): the state_dict keeps the
uint8 codes under the state's own key and the float32 scales under ``<key>_absmax``;
:func:`dequantize_state_dict` turns it into the full-precision state_dict torch.optim loads."""
from __future__ import annotations

import copy

import torch

from ..ops import quantization

# First moments and momenta take the signed map; the other states (second moments, sums) the unsigned one.
SIGNED_STATES = frozenset({"exp_avg", "momentum_buffer", "grad_avg"})
_GROUP_OPTIONS = ("state_dtype", "min_quantized_numel")


def dequantize_state_dict(state_dict: dict) -> dict:
    """A copy of `state_dict` (no tensor shared) with every quantized state in float32 and the quantization options
    dropped from its param groups: what ``torch.optim.Adam(...).load_state_dict`` takes."""
    out = {"state": {}, "param_groups": copy.deepcopy(state_dict["param_groups"])}
    for group in out["param_groups"]:
        for key in _GROUP_OPTIONS:
            group.pop(key, None)
    for pid, state in state_dict["state"].items():
        # Tensors copied, not shared: torch's load_state_dict keeps a loaded `step` tensor as it is,
        # and two optimizers stepping one tensor would each count the other's steps.
        new = {key: value.clone() if torch.is_tensor(value) else copy.deepcopy(value) for key, value in state.items()}
        for key, codes in state.items():
            absmax = state.get(key + "_absmax")
            if torch.is_tensor(codes) and codes.dtype == torch.uint8 and torch.is_tensor(absmax):
                new[key] = quantization.dequantize_blockwise(codes, absmax.float().contiguous(),
                                                             signed=key in SIGNED_STATES)
                del new[key + "_absmax"]
        out["state"][pid] = new
    return out
