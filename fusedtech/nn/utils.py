"""Fused counterparts of ``torch.nn.utils``: clip_grad_norm_ computes the global norm with one
multi-tensor reduction per (device, dtype) group (torch computes one norm per tensor, then the
norm of those), then scales every gradient with one foreach multiply per group."""
from __future__ import annotations

import functools
import math

import torch

from .._distributed import is_distributed
from ..ops.grad_norm import NORM, multi_tensor_norm
from ..ops._multi_tensor import implementation


_FUSED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _groups(tensors):
    groups: dict = {}
    for t in tensors:
        groups.setdefault((t.device, t.dtype), []).append(t)
    return groups


def _norm(tensors, norm_type):
    if torch.compiler.is_compiling():
        return multi_tensor_norm(tensors, norm_type)
    return implementation(NORM, tensors[0].device)(tensors, norm_type)


@torch.no_grad()
def get_total_norm(tensors, norm_type: float = 2.0, error_if_nonfinite: bool = False, foreach=None) -> torch.Tensor:
    """Drop-in for torch.nn.utils.get_total_norm (2-norm and inf-norm fused; other orders: torch's)."""
    tensors = [tensors] if isinstance(tensors, torch.Tensor) else list(tensors)
    norm_type = float(norm_type)
    if not tensors:
        return torch.tensor(0.0)
    if norm_type not in (2.0, math.inf) or any(t.is_sparse or is_distributed(t) or t.dtype not in _FUSED_DTYPES
                                                for t in tensors):
        # Other orders, sparse gradients, float64/complex gradients (the kernels accumulate in
        # fp32) and DTensors (FSDP2: the norm spans every process's shard, which torch's
        # implementation reduces) take torch's path.
        return torch.nn.utils.get_total_norm(tensors, norm_type, error_if_nonfinite, foreach)
    first_device = tensors[0].device
    norms = [_norm([t for t in group if t.numel()] or group[:1], norm_type).to(first_device)
             for group in _groups(tensors).values()]
    total = torch.linalg.vector_norm(torch.stack(norms), norm_type)
    # torch's total has the (promoted) dtype of the per-tensor norms, i.e. of the gradients.
    total = total.to(functools.reduce(torch.promote_types, (t.dtype for t in tensors)))
    if error_if_nonfinite and torch.logical_or(total.isnan(), total.isinf()):
        raise RuntimeError(
            f"The total norm of order {norm_type} for gradients from "
            "`parameters` is non-finite, so it cannot be clipped. To disable "
            "this error and scale the gradients by the non-finite norm anyway, "
            "set `error_if_nonfinite=False`")
    return total


@torch.no_grad()
def clip_grad_norm_(parameters, max_norm: float, norm_type: float = 2.0, error_if_nonfinite: bool = False,
                    foreach=None) -> torch.Tensor:
    """Drop-in for torch.nn.utils.clip_grad_norm_: same arguments, same returned total norm,
    gradients scaled in place by min(max_norm / (total + 1e-6), 1) with no host synchronisation."""
    parameters = [parameters] if isinstance(parameters, torch.Tensor) else list(parameters)
    grads = [p.grad for p in parameters if p.grad is not None]
    if any(is_distributed(g) for g in grads):
        return torch.nn.utils.clip_grad_norm_(parameters, max_norm, norm_type, error_if_nonfinite, foreach)
    total = get_total_norm(grads, norm_type, error_if_nonfinite, foreach)
    _scale(grads, max_norm, total)
    return total


def _scale(grads, max_norm, total_norm) -> None:
    """Every gradient times min(max_norm / (total_norm + 1e-6), 1): one foreach multiply per
    (device, dtype) group, no host synchronisation."""
    if not grads:
        return
    clamped = torch.clamp(float(max_norm) / (total_norm + 1e-6), max=1.0)
    for (device, _), group in _groups(grads).items():
        torch._foreach_mul_(group, clamped.to(device))


@torch.no_grad()
def clip_grads_with_norm_(parameters, max_norm: float, total_norm: torch.Tensor, foreach=None) -> None:
    """Drop-in for torch.nn.utils.clip_grads_with_norm_ (scales the .grad of each parameter by
    min(max_norm / (total_norm + 1e-6), 1)), one foreach multiply per (device, dtype) group."""
    parameters = [parameters] if isinstance(parameters, torch.Tensor) else list(parameters)
    grads = [p.grad for p in parameters if p.grad is not None]
    if any(is_distributed(g) for g in grads):
        return torch.nn.utils.clip_grads_with_norm_(parameters, max_norm, total_norm, foreach)
    _scale(grads, max_norm, total_norm)


def clip_grad_norm(parameters, max_norm: float, norm_type: float = 2.0, error_if_nonfinite: bool = False,
                   foreach=None) -> torch.Tensor:
    """torch.nn.utils.clip_grad_norm (deprecated there for clip_grad_norm_), fused."""
    return clip_grad_norm_(parameters, max_norm, norm_type, error_if_nonfinite, foreach)


def clip_grad_value_(parameters, clip_value: float, foreach=None) -> None:
    """torch.nn.utils.clip_grad_value_ itself: it already clamps every gradient with one foreach
    launch per (device, dtype) group, which is what a fused kernel would do."""
    return torch.nn.utils.clip_grad_value_(parameters, clip_value, foreach=foreach)
