"""Fused counterparts of ``torch.nn.functional``."""
from __future__ import annotations

import math

import torch

import warnings

from .. import _backend
# The ops' eager fast paths (custom ops while torch.compile traces): see fusedtech/ops/_eager.py.
from ..ops.batch_norm import ACTIVATIONS, update_running_stats
from ..ops.batch_norm import batch_norm as batch_norm_fwd
from ..ops.batch_norm import batch_norm_act as batch_norm_act_fwd
from ..ops.drop_block import drop_block
from ..ops.dropout import dropout as dropout_apply
from ..ops.dropout import dropout_add_layer_norm as dropout_add_norm
from ..ops.dropout import new_seed
from ..ops.group_norm import ACTIVATION_CODES as GROUP_NORM_ACTIVATIONS
from ..ops.group_norm import group_norm as group_norm_fwd
from ..ops.layer_norm import layer_norm as layer_norm_fwd
from ..ops.layer_norm import layer_norm_recompute


# The dtype torch's own layer_norm / rms_norm run in under autocast, by device type: its CUDA policy
# casts the norms to float32 (ATen's autocast fp32 list, rms_norm included since it exists); its CPU
# policy leaves them in the input's dtype. A static table (not a probe) so torch.compile traces it.
_AUTOCAST_NORM_DTYPE = {"cuda": torch.float32}
_LOW_PRECISION = (torch.float16, torch.bfloat16)  # what autocast casts (float64 is not eligible)


def _dense(t):
    """t contiguous (no copy when it is): the kernels read weights and biases densely, so a strided
    one (an expanded scalar, w[::2]) would be read wrongly."""
    return t.contiguous() if t is not None else None


def _norm(input, normalized_shape, weight, bias, eps, rms, memory_efficient=False):
    dtype = _AUTOCAST_NORM_DTYPE.get(input.device.type)
    if dtype is not None and input.dtype in _LOW_PRECISION and torch.is_autocast_enabled(input.device.type):
        # Drop-in under autocast: torch casts the norm's fp16/bf16 arguments to fp32 on a GPU and
        # returns fp32 (a model's residual stream keeps that precision); so do we.
        input = input.to(dtype)
        weight = weight.to(dtype) if weight is not None and weight.dtype in _LOW_PRECISION else weight
        bias = bias.to(dtype) if bias is not None and bias.dtype in _LOW_PRECISION else bias
    try:
        shape = (normalized_shape,) if isinstance(normalized_shape, int) else tuple(normalized_shape)
    except TypeError:
        raise TypeError(f"fusedtech: normalized_shape must be an int or a sequence of ints, got "
                        f"{normalized_shape!r}") from None
    if not shape:
        raise RuntimeError("fusedtech: normalized_shape must have at least one dimension, got ()")
    if not (input.is_floating_point() and not input.is_complex()):
        raise TypeError(f"fusedtech: the norms take a floating-point input, got {input.dtype}")
    if input.shape[input.dim() - len(shape):] != shape:
        raise RuntimeError(f"fusedtech: input of shape {tuple(input.shape)} does not end in normalized_shape {shape}")
    for name, t in (("weight", weight), ("bias", bias)):
        if t is None:
            continue
        _check_real(name, t)
        if t.shape != shape:
            raise RuntimeError(f"fusedtech: {name} has shape {tuple(t.shape)}, expected normalized_shape {shape}")
        if t.device != input.device:
            raise RuntimeError(f"fusedtech: {name} is on {t.device} but input is on {input.device}")
    weight, bias = _dense(weight), _dense(bias)
    if (memory_efficient and weight is not None and torch.is_grad_enabled()
            and any(t is not None and t.requires_grad for t in (input, weight, bias)) and _weight_has_zero(weight)):
        memory_efficient = False  # xhat = (y - b) / w is lost where w = 0: keep the input instead
    n = math.prod(shape)
    if n == 0:  # rows of no elements: nothing to normalise, torch's op gives the empty result and grads
        if rms:
            return torch.nn.functional.rms_norm(input, shape, weight, eps)
        return torch.nn.functional.layer_norm(input, shape, weight, bias, eps)
    # The op normalises over the last dimension of a contiguous input: a copy only when the input
    # is not contiguous, reshapes (autograd view nodes) only for a normalized_shape of several dims.
    x = input if input.is_contiguous() else input.contiguous()
    if len(shape) != 1:
        x = x.reshape(-1, n)
        weight = weight.reshape(n) if weight is not None else None
        bias = bias.reshape(n) if bias is not None else None
    y, _, _ = (layer_norm_recompute if memory_efficient else layer_norm_fwd)(x, weight, bias, float(eps), rms)
    y = y if y.shape == input.shape else y.view(input.shape)
    if rms and not input.is_contiguous() and not torch.compiler.is_compiling():
        # torch's rms_norm is a composition of elementwise ops whose output layout TensorIterator
        # picks from every operand (channels_last stays channels_last, a transposed matrix does not):
        # torch's own composition on meta tensors of the same strides says which (layer_norm's is
        # always contiguous).
        like = torch.nn.functional.rms_norm(
            torch.empty_strided(input.shape, input.stride(), dtype=input.dtype, device="meta"), shape,
            None if weight is None else torch.empty(shape, dtype=weight.dtype, device="meta"), eps)
        if like.stride() != y.stride():
            y = torch.empty_strided(y.shape, like.stride(), dtype=y.dtype, device=y.device).copy_(y)
    return y


def _check_real(name: str, t: torch.Tensor) -> None:
    """A complex (or integer) tensor is refused by name: the kernels take real floating-point ones (an
    integer input reached a kernel's dispatch error, a complex weight or input lost its imaginary part)."""
    if not t.is_floating_point():
        raise TypeError(f"fusedtech: {name} must be a real floating-point tensor, got {t.dtype}")


def _weight_has_zero(weight: torch.Tensor) -> bool:
    """Whether memory_efficient must keep the input after all: a weight with an exact zero (pruning,
    zero init, decay to zero in bf16) leaves no trace of xhat in y there, and the backward would be
    NaN. Under torch.compile always: the check is data-dependent (a graph break), so the compiled
    graph keeps the input; eager code pays one read of the weight (a host sync on a GPU)."""
    if torch.compiler.is_compiling():
        return True
    with torch.no_grad():
        zero = bool((weight == 0).any())
    if zero:  # (shown once per call site by Python's default warning filter)
        warnings.warn("fusedtech: LayerNorm/RMSNorm memory_efficient=True keeps the input for backward while "
                      "its weight has an exact zero (xhat cannot be recovered from the output there)", stacklevel=3)
    return zero


def layer_norm(input, normalized_shape, weight=None, bias=None, eps: float = 1e-5, *, memory_efficient: bool = False):
    """torch.nn.functional.layer_norm, fused (fp32 statistics, one pass per row). memory_efficient:
    keep the output instead of the input for backward (see fusedtech/ops/layer_norm.py), in eager
    mode and while the weight has no exact zero; otherwise the input is kept."""
    return _norm(input, normalized_shape, weight, bias, eps, rms=False, memory_efficient=memory_efficient)


def rms_norm(input, normalized_shape, weight=None, eps=None, *, memory_efficient: bool = False):
    """torch.nn.functional.rms_norm, fused; eps=None means the epsilon of the type the norm computes
    in, as torch: float32's for fp16/bf16 inputs, the input's own for float32/float64."""
    if eps is None:  # (an integer input is refused by name in _norm)
        eps = torch.finfo(torch.float64 if input.dtype == torch.float64 else torch.float32).eps
    return _norm(input, normalized_shape, weight, None, eps, rms=True, memory_efficient=memory_efficient)


def dropout(input, p: float = 0.5, training: bool = True, inplace: bool = False):
    """torch.nn.functional.dropout, fused: the mask is a Philox stream from a seed drawn from
    torch's generator, regenerated in backward (nothing of the input's size is saved)."""
    if not 0.0 <= p <= 1.0:  # (NaN too)
        raise ValueError(f"dropout probability has to be between 0 and 1, but got {p}")
    if not training or p == 0.0:
        return input
    _check_real("dropout's input", input)
    if p == 1.0:  # as torch: input * 0, so the output has a gradient (zeros) and NaN stays NaN
        return input.mul_(0) if inplace else input * 0
    # A dense layout other than row-major (channels_last, a transpose) runs in its storage order
    # and keeps its strides, as torch's dropout does: a permuted view, no copy.
    order = _storage_order(input)
    x = input if order is None else input.permute(order)
    out = dropout_apply(x, float(p), new_seed(input.device)).view(x.shape)
    if order is not None:
        out = out.permute(sorted(range(len(order)), key=order.__getitem__))
    if inplace:
        return input.copy_(out)
    return out


def _storage_order(t: torch.Tensor):
    """The permutation that makes a non-contiguous but dense tensor contiguous, or None (contiguous,
    or not dense: then the op copies)."""
    if t.is_contiguous() or t.dim() < 2:
        return None
    order = sorted(range(t.dim()), key=lambda d: (-t.stride(d), d))
    permuted = t.permute(order)
    return order if permuted.is_contiguous() else None


_warned_native_bn = set()


def batch_norm(input, running_mean, running_var, weight=None, bias=None, training: bool = False,
               momentum: float = 0.1, eps: float = 1e-5):
    """torch.nn.functional.batch_norm, fused (fp32 statistics, NCHW and channels_last alike, running
    statistics updated exactly as torch does). On CUDA tensors the automatic choice is torch's own
    (cuDNN) batch_norm, with one warning, until fusedtech's Triton kernels (use_backend("triton"))
    are measured faster on a GPU: they take one program per channel for the statistics."""
    _check_batch(input, training, running_mean, running_var, eps)
    if input.device.type != "cpu" and _backend.requested_backend() is None:
        if input.device.type not in _warned_native_bn:
            _warned_native_bn.add(input.device.type)
            warnings.warn("fusedtech: BatchNorm on GPU tensors uses torch's native batch_norm unless "
                          "use_backend('triton') asks for fusedtech's Triton kernels (not yet measured faster)",
                          stacklevel=2)
        return torch.nn.functional.batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps)
    if input.dim() < 2:
        raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")
    return _batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps)


def _check_batch(input, training, running_mean, running_var, eps):
    """torch's checks and words."""
    if training and not eps > 0:  # a constant channel would divide by zero (or by a negative)
        raise ValueError(f"batch_norm eps must be positive during training, but got {eps}")
    if not eps >= 0:
        raise ValueError(f"batch_norm eps must be non-negative, but got {eps}")
    if (running_mean is None) != (running_var is None):
        raise ValueError("running_mean and running_var must either both be None or neither be None")
    if training:
        size = input.size()
        values = size[0] * math.prod(size[2:]) if input.dim() > 1 else 0  # per channel, whatever C is
        if values == 1:
            raise ValueError(f"Expected more than 1 value per channel when training, got input size {size}")


def _batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps, activation=None,
                residual=None):
    if not input.is_floating_point():
        raise TypeError(f"fusedtech: batch_norm takes a floating-point input, got {input.dtype}")
    if not training and (running_mean is None or running_var is None):
        raise RuntimeError("running_mean must be defined in evaluation mode")
    c = input.shape[1]
    for name, t in (("running_mean", running_mean), ("running_var", running_var), ("weight", weight), ("bias", bias)):
        if t is not None and t.numel() != c:  # torch's check and words; the kernels index by channel
            raise RuntimeError(f"{name} should contain {c} elements not {t.numel()}")
        if t is not None:
            _check_real(name, t)
    weight, bias = _dense(weight), _dense(bias)
    if not _bn_layout_kept(input):  # torch's output is then contiguous (code may .view() it)
        input = input.contiguous()
    rm, rv = (None, None) if training else (running_mean, running_var)
    if activation is None:
        y, mean, _, var = batch_norm_fwd(input, weight, bias, rm, rv, training, float(eps))
    else:
        if residual is not None and residual.shape != input.shape:
            raise RuntimeError(f"fusedtech: residual has shape {tuple(residual.shape)} but input has {tuple(input.shape)}")
        if residual is not None and residual.dtype != input.dtype:  # as bn(input) + residual: the promoted type
            dtype = torch.promote_types(input.dtype, residual.dtype)
            input, residual = input.to(dtype), residual.to(dtype)
        y, mean, _, var, _ = batch_norm_act_fwd(input, weight, bias, rm, rv, residual, training, float(eps), activation)
    # An empty batch has no statistics: torch leaves the running ones as they are.
    if training and running_mean is not None and running_var is not None and input.numel() > 0:
        update_running_stats(running_mean, running_var, mean, var, float(momentum))
    return y


def _bn_layout_kept(t: torch.Tensor) -> bool:
    """The layouts torch's batch_norm gives its output: contiguous, channels_last (4-d) and
    channels_last_3d (5-d); any other (a transpose of H and W, a permuted 3-d input) comes out
    contiguous."""
    return (t.is_contiguous() or (t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last))
            or (t.dim() == 5 and t.is_contiguous(memory_format=torch.channels_last_3d)))


def batch_norm_act(input, running_mean, running_var, weight=None, bias=None, training: bool = False,
                   momentum: float = 0.1, eps: float = 1e-5, activation: str = "relu", residual=None):
    """act(batch_norm(input) + residual) in one op whose backward recomputes the pre-activation
    (nothing but what BatchNorm needs, and the residual, is saved). activation: relu, gelu, silu, none."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"fusedtech: activation must be one of {ACTIVATIONS}, got {activation!r}")
    _check_batch(input, training, running_mean, running_var, eps)
    if input.device.type != "cpu" and _backend.requested_backend() is None:
        y = batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps)
        from ..ops.batch_norm import _activate
        return _activate(y if residual is None else y + residual, activation)
    return _batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps, activation, residual)


def dropout_add_layer_norm(x, residual, weight=None, bias=None, p: float = 0.1, eps: float = 1e-5,
                           training: bool = True, rms: bool = False, return_residual: bool = False):
    """norm(dropout(x) + residual) over the last dimension, in one kernel on the Triton backend
    (LayerNorm, or RMSNorm with rms=True; a bias given with rms=True is added after the scaling).
    With return_residual, also returns the pre-norm sum (the next block's residual). residual=None
    normalises dropout(x); a residual of another dtype gives the sum and output in the promoted
    type, as dropout(x) + residual would. Backward regenerates the dropout mask; only the sum and
    the row statistics are saved."""
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"dropout probability has to be between 0 and 1, but got {p}")
    _check_real("x", x)
    if residual is not None:
        _check_real("residual", residual)
    if residual is None:  # a first block: norm(dropout(x)); the kernels take a residual of zeros
        residual = torch.zeros_like(x)
    if x.shape != residual.shape:
        raise RuntimeError(f"fusedtech: residual has shape {tuple(residual.shape)} but x has {tuple(x.shape)}")
    if x.dim() == 0 or x.shape[-1] == 0:
        raise RuntimeError(f"fusedtech: dropout_add_layer_norm normalises the last dimension of x, which has "
                           f"shape {tuple(x.shape)}")
    n = x.shape[-1]
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None:
            _check_real(name, t)
        if t is not None and (t.shape != (n,) or t.device != x.device):
            raise RuntimeError(f"fusedtech: {name} must have shape ({n},) on {x.device}, got shape "
                               f"{tuple(t.shape)} on {t.device}")
    weight, bias = _dense(weight), _dense(bias)
    if x.dtype != residual.dtype:  # as dropout(x) + residual: the sum (and the output) in the promoted type
        dtype = torch.promote_types(x.dtype, residual.dtype)
        x, residual = x.to(dtype), residual.to(dtype)
    p = float(p) if training else 0.0
    if p == 1.0:  # every element of x dropped: x * 0, as torch's dropout (NaN stays NaN)
        x, p = x * 0, 0.0
    # No draw from the generator when nothing is dropped (eval, p = 0), as torch's dropout.
    seed = new_seed(x.device) if p > 0.0 else _no_seed(x.device)
    x2, r2 = x.reshape(-1, n).contiguous(), residual.reshape(-1, n).contiguous()
    out, s, _, _ = dropout_add_norm(x2, r2, weight, bias, p, float(eps), rms, seed)
    out, s = out.view(x.shape), s.view(x.shape)
    return (out, s) if return_residual else out


def _no_seed(device: torch.device) -> torch.Tensor:
    """The seed argument where no mask is drawn (never read by the kernels at p = 0)."""
    return torch.zeros(1, dtype=torch.int64, device=device)


def drop_block2d(input, p: float, block_size: int, inplace: bool = False, eps: float = 1e-6, training: bool = True,
                 block_mask=None):
    """torchvision.ops.drop_block2d's semantics: block seeds with probability
    gamma = p H W / (block^2 (H - block + 1)(W - block + 1)), grown to block x block squares, output
    scaled by numel / (eps + kept). The block centres are Philox draws seeded from torch's generator
    for the device (fusedtech/reference/drop_block.py states the mask); `block_mask` (1 = keep)
    replaces them, for tests. Backward regenerates the mask from the seed: nothing input-sized is
    saved."""
    if not 0.0 <= p <= 1.0:  # (NaN too)
        raise ValueError(f"drop probability has to be between 0 and 1, but got {p}.")
    if input.dim() != 4:
        raise ValueError(f"input should be 4 dimensional. Got {input.dim()} dimensions.")
    if not training or p == 0.0:
        return input
    if not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size should be a positive odd integer. Got {block_size!r}.")
    _check_real("drop_block2d's input", input)
    n, c, h, w = input.shape
    block_size = min(block_size, w, h)
    if block_size % 2 == 0:
        raise ValueError(f"block size should be odd. Got {block_size} which is even.")
    if block_mask is not None:  # a given mask (tests): torch's composition, which keeps the mask
        block_mask = block_mask.to(input.dtype)
        scale = block_mask.numel() / (eps + block_mask.sum())
        if inplace:
            return input.mul_(block_mask).mul_(scale)
        return input * block_mask * scale
    gamma = (p * h * w) / ((block_size ** 2) * ((h - block_size + 1) * (w - block_size + 1)))
    out, _ = drop_block(input, new_seed(input.device), float(gamma), int(block_size), float(eps))
    return input.copy_(out) if inplace else out


def _group_norm(input, num_groups, weight, bias, eps, activation, channels="channels"):
    """torch's checks and words, then the op: act(group_norm(input)) in one pass."""
    if activation not in GROUP_NORM_ACTIVATIONS:
        raise ValueError(f"fusedtech: activation must be one of {tuple(GROUP_NORM_ACTIVATIONS)}, got {activation!r}")
    if input.dim() < 2:
        raise RuntimeError(f"Expected at least 2 dimensions for input tensor but received {input.dim()}")
    _check_real("input", input)
    n, c = input.shape[0], input.shape[1]
    if not isinstance(num_groups, int) or num_groups < 1 or c % num_groups != 0:
        raise RuntimeError(f"Expected number of channels in input to be divisible by num_groups, but got input of "
                           f"shape {list(input.shape)} and num_groups={num_groups}")
    for name, t in (("weight", weight), ("bias", bias)):
        if t is None:
            continue
        _check_real(name, t)
        if t.numel() != c:
            raise RuntimeError(f"Expected {name} to be a vector of size equal to the number of {channels} in input, "
                               f"but got {name} of shape {list(t.shape)} and input of shape {list(input.shape)}")
        if t.device != input.device:
            raise RuntimeError(f"fusedtech: {name} is on {t.device} but input is on {input.device}")
    spatial = math.prod(input.shape[2:])
    if spatial == 0:
        raise RuntimeError(f"Expected HxW to be greater than 0, got {spatial}")
    dtype = _AUTOCAST_NORM_DTYPE.get(input.device.type)
    if dtype is not None and input.dtype in _LOW_PRECISION and torch.is_autocast_enabled(input.device.type):
        input = input.to(dtype)  # torch's GPU autocast runs group_norm in fp32 (ATen's fp32 list)
    weight = _dense(weight).reshape(c) if weight is not None else None
    bias = _dense(bias).reshape(c) if bias is not None else None
    y, _, _ = group_norm_fwd(input, weight, bias, num_groups, float(eps), GROUP_NORM_ACTIVATIONS[activation])
    return y


def group_norm(input, num_groups: int, weight=None, bias=None, eps: float = 1e-5):
    """torch.nn.functional.group_norm, fused: Welford statistics in fp32 per (sample, group), NCHW and
    channels_last read in place and written in the input's memory format."""
    if input.dim() >= 2 and isinstance(num_groups, int) and num_groups > 0:
        # torch's: more than one value to normalise over in all (N * C / G * spatial)
        size = list(input.shape)
        if input.shape[0] * input.shape[1] // num_groups * math.prod(size[2:]) == 1:
            raise ValueError(f"Expected more than 1 value per channel when training, got input size "
                             f"{torch.Size([size[0] * size[1] // num_groups, num_groups] + size[2:])}")
    return _group_norm(input, num_groups, weight, bias, eps, "none")


def group_norm_act(input, num_groups: int, weight=None, bias=None, eps: float = 1e-5, activation: str = "silu"):
    """act(group_norm(input)) in one op (activation: silu, gelu, relu or none), the activation applied
    in fp32 before the one rounding; backward recomputes the pre-activation from the input and the
    statistics (nothing else is saved)."""
    return _group_norm(input, num_groups, weight, bias, eps, activation)


def instance_norm(input, running_mean=None, running_var=None, weight=None, bias=None, use_input_stats: bool = True,
                  momentum: float = 0.1, eps: float = 1e-5):
    """torch.nn.functional.instance_norm, fused: with use_input_stats, GroupNorm with one channel per
    group (and the running statistics, when given, updated as torch does: each blended with the batch
    mean of the per-instance means and unbiased variances); without, the running statistics normalise
    (BatchNorm's eval path)."""
    size = input.size()
    if use_input_stats and input.dim() >= 2 and math.prod(size[2:]) == 1:
        raise ValueError(f"Expected more than 1 spatial element when training, got input size {size}")
    if (running_mean is None) != (running_var is None):
        raise ValueError("running_mean and running_var must either both be None or neither be None")
    if not use_input_stats:
        if running_mean is None:
            raise RuntimeError("Expected running_mean and running_var to be defined when use_input_stats is false")
        return batch_norm(input, running_mean, running_var, weight, bias, False, momentum, eps)
    c = input.shape[1] if input.dim() >= 2 else 0
    for name, t in (("running_mean", running_mean), ("running_var", running_var)):
        if t is not None and t.numel() != c:
            raise RuntimeError(f"{name} should contain {c} elements not {t.numel()}")
    y = _group_norm(input, c, weight, bias, eps, "none", channels="channels (features)")
    if running_mean is not None and input.shape[0] > 0:
        with torch.no_grad():  # torch's: per-instance statistics, averaged over the batch, then blended
            xs = input.detach().reshape(input.shape[0], c, -1).to(torch.float64 if input.dtype == torch.float64
                                                                   else torch.float32)
            var, mean = torch.var_mean(xs, dim=-1, correction=1)
            update_running_stats(running_mean, running_var, mean.mean(0), var.mean(0), float(momentum))
    return y
