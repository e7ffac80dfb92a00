"""Shared by the optimizer tests: awkward parameter lists, seeded gradients, run/compare helpers."""
from __future__ import annotations

import torch

import fusedtech


def make_params(dtype=torch.float32, device="cpu", seed=0):
    """Tensors of awkward shapes: empty ones at the start, middle and end, a 1-element one, a
    transposed (dense, permuted) one, a strided non-dense view, and one that spans several
    Triton/CPU chunks with a partial last chunk."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape):
        return torch.randn(*shape, generator=g).to(dtype)

    tensors = [r(0), r(17, 33), r(33), r(0, 4), r(1), r(8, 6).t(), r(10, 12)[:, ::3], r(5000), r(3, 4, 5), r(0)]
    return [torch.nn.Parameter(t.to(device)) for t in tensors]


def set_grads(params, step, none_every=3):
    g = torch.Generator().manual_seed(1000 + step)
    for i, p in enumerate(params):
        grad = torch.randn(p.shape, generator=g).to(p.dtype).to(p.device)
        # Some parameters have no gradient on some steps: they must be skipped, step included.
        p.grad = None if (i + step) % none_every == 0 and i % 2 == 1 else grad


def run(opt_cls, params, steps=20, backend=None, start=0, **kw):
    opt = opt_cls(params, **kw)
    _steps(opt, params, steps, backend, start)
    return opt


def _steps(opt, params, steps, backend=None, start=0):
    if params and isinstance(params[0], dict):
        params = [p for g in params for p in g["params"]]
    for s in range(start, start + steps):
        set_grads(params, s)
        with fusedtech.use_backend(backend):
            opt.step()


def clone(params):
    return [torch.nn.Parameter(p.detach().clone()) for p in params]


def assert_close_params_and_state(ref_opt, ref_params, opt, params, **tol):
    for p_ref, p in zip(ref_params, params):
        torch.testing.assert_close(p, p_ref, **tol)
        s_ref, s = ref_opt.state[p_ref], opt.state[p]
        assert set(s_ref) <= set(s), (set(s_ref), set(s))
        for key in s_ref:
            torch.testing.assert_close(s[key].cpu(), s_ref[key].cpu(), **tol, msg=lambda m: f"state {key}: {m}")




def assert_compiled_step_matches_eager(make_optimizer, steps=3):
    """torch.compile (aot_eager) of step() traces the step's fusedtech custom op: parameters and
    state equal eager's bit for bit."""
    p1, p2 = make_params(), make_params()
    o1, o2 = make_optimizer(p1), make_optimizer(p2)

    @torch.compile(backend="aot_eager")
    def compiled_step():
        o2.step()

    for s in range(steps):
        set_grads(p1, s)
        set_grads(p2, s)
        o1.step()
        compiled_step()
    assert_close_params_and_state(o1, p1, o2, p2, atol=0, rtol=0)
