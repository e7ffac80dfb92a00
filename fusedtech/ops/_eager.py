"""The eager fast path of the autograd ops. A torch.library custom op costs tens of microseconds of
Python per call and again per backward (measured: dropout forward+backward 121 us against torch's
31 us on a small CPU tensor), which on a GPU is longer than the kernels. So an eager call runs the
implementation inside a plain torch.autograd.Function with the op's own setup_context and backward;
under torch.compile the custom op runs, so the graph holds one traceable node with its fake kernel."""
from __future__ import annotations

import torch


def eager_fast_path(name: str, op, impl, setup_context, backward, differentiable: int = 1):
    """A callable with op's signature: `op` while compiling, else impl under autograd.Function.
    The Function's ctx carries `eager = True` so that backward can call implementations directly.
    Of a tuple of outputs only the first `differentiable` carry gradients; the rest (statistics,
    masks) are marked non-differentiable, and no zero gradients are made for them: backward gets
    None there (the engine would otherwise allocate and fill a zero tensor per output per call)."""

    def setup(ctx, inputs, out):
        ctx.eager = True
        setup_context(ctx, inputs, out)
        if isinstance(out, tuple) and len(out) > differentiable:
            ctx.mark_non_differentiable(*out[differentiable:])
        ctx.set_materialize_grads(False)
        ctx.inputs = len(inputs)

    def forward(ctx, *args):
        out = impl(*args)
        setup(ctx, args, out)
        return out

    def eager_backward(ctx, *grads):
        if all(g is None for g in grads[:differentiable]):  # no gradient reached the outputs
            return (None,) * ctx.inputs
        return backward(ctx, *grads)

    # Built with its name (not renamed after): autograd names the backward node class when the
    # Function class is created, and profiles show "<name>_eager" / "<name>_eagerBackward".
    _Eager = type(f"{name}_eager", (torch.autograd.Function,),
                  {"forward": staticmethod(forward), "backward": staticmethod(eager_backward)})

    # Under torch.func transforms (torch.func.grad of a model using these ops) a Function must take
    # no ctx in forward and have a setup_context: the same steps in that form. Not the default: its
    # apply costs ~17 us more per call (measured on a small LayerNorm, 35 -> 52 us forward+backward).
    _Functorch = type(f"{name}_eager", (torch.autograd.Function,),
                      {"forward": staticmethod(impl), "setup_context": staticmethod(setup),
                       "backward": staticmethod(eager_backward)})
    in_transform = getattr(torch._C._functorch, "peek_interpreter_stack", lambda: None)

    def call(*args):
        if torch.compiler.is_compiling():
            return op(*args)
        if in_transform() is not None:
            return _Functorch.apply(*args)
        return _Eager.apply(*args)

    call.__name__ = name
    return call


def is_eager(ctx) -> bool:
    return getattr(ctx, "eager", False)
