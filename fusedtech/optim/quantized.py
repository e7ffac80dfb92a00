"""Checkpoints of optimizers with quantized states (``state_dtype="int8"`` or ``"fp8"``, named in each
param group): the state_dict keeps the
uint8 codes under the state's own key and the float32 scales under ``<key>_absmax``;
:func:`dequantize_state_dict` turns it into the full-precision state_dict torch.optim loads, and
:func:`from_bitsandbytes` reads a bitsandbytes 8-bit (or 32-bit) optimizer's per-parameter state."""
from __future__ import annotations

import copy

import torch

from ..ops import quantization
from ..reference import quantization as reference

# First moments and momenta take the signed map; the other states (second moments, sums) the unsigned one.
SIGNED_STATES = frozenset({"exp_avg", "momentum_buffer", "grad_avg"})
_GROUP_OPTIONS = ("state_dtype", "min_quantized_numel")


def dequantize_state_dict(state_dict: dict) -> dict:
    """A copy of `state_dict` (no tensor shared) with every quantized state in float32 and the quantization options
    dropped from its param groups: what ``torch.optim.Adam(...).load_state_dict`` takes."""
    out = {"state": {}, "param_groups": copy.deepcopy(state_dict["param_groups"])}
    formats = {pid: group.get("state_dtype") or "int8" for group in out["param_groups"] for pid in group["params"]}
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
                                                             signed=key in SIGNED_STATES,
                                                             state_dtype=formats.get(pid, "int8"))
                del new[key + "_absmax"]
        out["state"][pid] = new
    return out


# bitsandbytes' state_dict nests its quantization tensors under this key (to hide them from FSDP).
_BNB_WRAPPED = "__bnb_optimizer_quant_state__"


def from_bitsandbytes(saved: dict, p: torch.Tensor, keys: tuple[str, ...]):
    """Our state for parameter p from a bitsandbytes optimizer's saved state (None if it is not one):
    its state1 / state2 become keys[0] / keys[1]. bitsandbytes' blockwise 8-bit layout is ours (256
    elements a block over the contiguous parameter, codes into its dynamic maps, which equal ours): the
    codes and absmax are taken as they are when its maps are ours and the parameter is contiguous, else
    dequantized with its own map (our step then quantizes them). Its 32-bit states (tensors under its
    min_8bit_size) are full-precision states. Not translated: its percentile clipping and max_unorm
    state (gnorm_vec, unorm_vec), which our optimizers do not have."""
    inner = saved.get(_BNB_WRAPPED, saved)
    if not keys or not isinstance(inner, dict) or not torch.is_tensor(inner.get("state1")):
        return None
    step = saved.get("step", inner.get("step", 0))
    out = {"step": torch.tensor(float(step), dtype=torch.float32, device=p.device)}
    for index, key in enumerate(keys, start=1):
        state = inner.get(f"state{index}")
        if state is None:
            continue
        if state.dtype != torch.uint8:
            out[key] = state.to(device=p.device, dtype=torch.float32, copy=True).view(p.shape)
            continue
        qmap, absmax = inner[f"qmap{index}"].float().cpu(), inner[f"absmax{index}"].float()
        signed = key in SIGNED_STATES
        if torch.equal(qmap, reference.dynamic_map(signed)) and p.is_contiguous():
            out[key] = state.to(p.device, copy=True).view(p.shape)
            out[key + "_absmax"] = absmax.to(p.device, copy=True)
        else:
            flat = state.reshape(-1).long().cpu()
            values = qmap[flat] * absmax.cpu().repeat_interleave(quantization.BLOCK)[: flat.numel()]
            out[key] = values.view(p.shape).to(p.device)
    return out
