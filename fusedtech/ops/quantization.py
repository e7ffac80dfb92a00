"""Blockwise quantize / dequantize of one dense tensor (fusedtech/reference/quantization.py's format):
what converting a checkpoint between full-precision and quantized optimizer states runs."""
from __future__ import annotations

import torch

from .. import _backend
from ..reference import quantization as reference

BLOCK = reference.BLOCK


def _triton():
    from ..triton_kernels import quantization
    return quantization


QUANTIZE = _backend.Implementations(
    "quantize_blockwise",
    cuda=lambda: torch.ops.fusedtech_C.quantize_blockwise,
    cpu=lambda: torch.ops.fusedtech_C.quantize_blockwise,
    triton=lambda: _triton().quantize_blockwise,
    torch=lambda: reference.quantize_blockwise)

DEQUANTIZE = _backend.Implementations(
    "dequantize_blockwise",
    cuda=lambda: torch.ops.fusedtech_C.dequantize_blockwise,
    cpu=lambda: torch.ops.fusedtech_C.dequantize_blockwise,
    triton=lambda: _triton().dequantize_blockwise,
    torch=lambda: reference.dequantize_blockwise)

_device_tables: dict = {}


def table(signed: bool, device, state_dtype: str = "int8") -> torch.Tensor:
    """The table of a quantized state format on `device`, cached: the 8-bit dynamic map (signed: first
    moments; unsigned: second moments) or, for "fp8", E4M3's (both)."""
    key = (state_dtype, signed, torch.device(device))
    hit = _device_tables.get(key)
    if hit is None:
        hit = _device_tables[key] = reference.code_table(state_dtype, signed).to(device)
    return hit


def quantize_blockwise(x: torch.Tensor, *, signed: bool, state_dtype: str = "int8") -> tuple[torch.Tensor, torch.Tensor]:
    """(uint8 codes laid out like x, float32 absmax per block of 256) of a dense tensor."""
    if x.is_sparse or not x.is_floating_point():
        raise TypeError(f"fusedtech: quantize_blockwise takes a dense floating-point tensor, got {x.dtype}"
                        f"{' (sparse)' if x.is_sparse else ''}")
    if not reference.dense(x):
        x = x.contiguous()
    if x.dtype == torch.float64:
        x = x.float()
    return QUANTIZE.pick(x.device)(x, table(signed, x.device, state_dtype), BLOCK)


def dequantize_blockwise(codes: torch.Tensor, absmax: torch.Tensor, *, signed: bool,
                         state_dtype: str = "int8") -> torch.Tensor:
    """float32 values laid out like codes."""
    return DEQUANTIZE.pick(codes.device)(codes, absmax, table(signed, codes.device, state_dtype), BLOCK)
