"""DropBlock (torchvision.ops.drop_block2d's semantics) as torch.library ops: `fusedtech::drop_block2d`
(the output and its normalisation factor, a 0-d fp32 tensor, float64 for float64 input) with autograd
through `fusedtech::drop_block2d_bwd`, which rebuilds the block mask from the saved one-element seed:
only the seed and the scale are kept, no mask. The kernels run contiguous NCHW and channels_last input
in that format; other strides are made contiguous first. `drop_block` is what eager code calls
(ops/_eager.py: the same kernels without the custom-op cost)."""
from __future__ import annotations

import torch

from .. import _backend
from ._eager import eager_fast_path, is_eager


# ---- DropBlock --------------------------------------------------------------------------------
# Each backend builds the keep mask from (seed, gamma, block_size) and counts what it keeps, then
# scales: output = x * keep * numel / (eps + kept). Backward rebuilds the mask from the saved seed,
# so only the seed and the one-element scale are kept (torch's composition keeps an input-sized mask).
class _CppDropBlock:
    """The compiled (CPU and CUDA) ops in the backends' interface: the op counts what it keeps, the
    scale is formed here in float64 on the tensors' device (CPU tensors: a few scalar ops, no launch;
    CUDA: a few one-element launches, no host synchronisation)."""

    @staticmethod
    def drop_block_keep_scale(x, seed, gamma, block_size, eps):
        from ..reference.drop_block import scale_of
        keep, kept = torch.ops.fusedtech_C.drop_block_keep(x, seed, gamma, block_size)
        return keep, scale_of(x.numel(), kept, eps, x.dtype)

    @staticmethod
    def drop_block_mask(x, seed, gamma, block_size):
        return torch.ops.fusedtech_C.drop_block_keep(x, seed, gamma, block_size)[0]

    @staticmethod
    def drop_block_apply(x, keep, scale):
        return torch.ops.fusedtech_C.drop_block_apply(x, keep, scale)


def _triton_drop_block():
    from ..triton_kernels import drop_block
    return drop_block


def _reference_drop_block():
    from ..reference import drop_block
    return drop_block


# Each entry: the namespace with drop_block_keep_scale, drop_block_mask and drop_block_apply.
DROP_BLOCK = _backend.Implementations(
    "drop_block2d",
    cuda=lambda: _CppDropBlock,
    cpu=lambda: _CppDropBlock,
    triton=_triton_drop_block,
    torch=_reference_drop_block)


def _drop_block_backend(x):
    return DROP_BLOCK.pick(x.device, float64=x.dtype == torch.float64)


def _dense_format(x: torch.Tensor) -> torch.memory_format:
    """The format the kernels run x in: channels_last if x is stored so, else contiguous."""
    channels_last = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    return torch.channels_last if channels_last else torch.contiguous_format


def _drop_block_fwd(x: torch.Tensor, seed: torch.Tensor, gamma: float, block_size: int,
                    eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(DropBlock of x with the block mask of `seed`, the normalisation factor as a 0-d fp32 tensor;
    float64 for float64 x)."""
    x = x.contiguous(memory_format=_dense_format(x))
    impl = _drop_block_backend(x)
    keep, scale = impl.drop_block_keep_scale(x, seed, gamma, block_size, eps)  # on the device: no host sync
    return impl.drop_block_apply(x, keep, scale), scale


drop_block_fwd = torch.library.custom_op("fusedtech::drop_block2d", _drop_block_fwd, mutates_args=())


@drop_block_fwd.register_fake
def _(x, seed, gamma, block_size, eps):
    from ..reference.drop_block import scale_dtype
    return torch.empty_like(x, memory_format=_dense_format(x)), x.new_empty((), dtype=scale_dtype(x.dtype))


def _drop_block_bwd(dy: torch.Tensor, seed: torch.Tensor, scale: torch.Tensor, gamma: float,
                    block_size: int) -> torch.Tensor:
    dy = dy.contiguous(memory_format=_dense_format(dy))
    impl = _drop_block_backend(dy)
    return impl.drop_block_apply(dy, impl.drop_block_mask(dy, seed, gamma, block_size), scale)


drop_block_bwd = torch.library.custom_op("fusedtech::drop_block2d_bwd", _drop_block_bwd, mutates_args=())


@drop_block_bwd.register_fake
def _(dy, seed, scale, gamma, block_size):
    return torch.empty_like(dy, memory_format=_dense_format(dy))


def _db_setup_context(ctx, inputs, output):
    _, seed, gamma, block_size, _ = inputs
    ctx.gamma, ctx.block_size = gamma, block_size
    ctx.save_for_backward(seed, output[1])  # one int64 and one float: all backward needs


def _db_backward(ctx, dy, dscale):
    seed, scale = ctx.saved_tensors
    bwd = _drop_block_bwd if is_eager(ctx) else drop_block_bwd
    return bwd(dy, seed, scale, ctx.gamma, ctx.block_size), None, None, None, None


drop_block_fwd.register_autograd(_db_backward, setup_context=_db_setup_context)
drop_block = eager_fast_path("drop_block2d", drop_block_fwd, _drop_block_fwd, _db_setup_context, _db_backward)
