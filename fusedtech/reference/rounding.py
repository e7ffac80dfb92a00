"""bf16 stochastic rounding of optimizer parameters (oracle; fusedtech/philox.h's bf16_bits_stochastic).

Element i (in memory order) of tensor t of a step's list, at step s, draws word i % 4 of the Philox4x32-10
block with key `seed` and counter (i // 4, s, t): the CPU and Triton kernels draw the same. The draw's top
16 bits are added to the float32 bits, which are then truncated to bf16: x rounds away from zero with
probability (|x| - |lower|) / (gap), so E[round(x)] = x.
"""
from __future__ import annotations

import torch

from .dropout import M32, philox4
from .quantization import memory_order


def draws(seed: int, numel: int, step: int, tensor: int, device) -> torch.Tensor:
    """The uint32 draws (as int64) of elements 0 .. numel - 1."""
    index = torch.arange(numel, dtype=torch.int64, device=device)
    words = torch.stack(philox4(seed, index // 4, step, tensor))
    return words.gather(0, (index % 4).unsqueeze(0)).squeeze(0)


def bf16_stochastic(x: torch.Tensor, draw: torch.Tensor) -> torch.Tensor:
    """float32 x (1-D) rounded to bf16 with the given draws."""
    bits = x.contiguous().view(torch.int32).to(torch.int64) & M32
    rounded = (bits + (draw >> 16)) >> 16
    rounded = torch.where(torch.isnan(x), (bits >> 16) | 0x40, rounded)
    return torch.where(rounded >= 0x8000, rounded - 0x10000, rounded).to(torch.int16).view(torch.bfloat16)


def store_stochastic_(param: torch.Tensor, value: torch.Tensor, seed: int, step: int, tensor: int) -> None:
    """param (bf16, dense) = value (float32, param's shape) rounded stochastically, in memory order."""
    if param.numel() == 0:
        return
    laid_out = torch.empty_like(param, dtype=torch.float32).copy_(value)  # param's strides: its memory order
    memory_order(param).copy_(bf16_stochastic(memory_order(laid_out), draws(seed, param.numel(), step, tensor,
                                                                            param.device)))
