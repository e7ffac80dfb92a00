"""Fused LayerNorm / RMSNorm, forward and backward, against torch.nn.functional.layer_norm /
rms_norm and our oracle, on every backend that runs here.

Tolerances: each result is compared with a float64 computation; our error must be no larger
than twice torch's own error in the same dtype plus an atol: fp32 5e-5 (rstd, up to
1/sqrt(eps) ~ 316 for degenerate rows, multiplies the rounding of x - mean), fp16 2e-3,
bf16 1.6e-2 (about two ulps at unit scale).
"""
from __future__ import annotations

import pytest
import torch

import fusedtech
from fusedtech.nn import functional as F
from conftest import cpu_backends

BACKENDS = cpu_backends()
ATOL = {torch.float32: 5e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# (5000, 3) and (4, 25, 200): short rows in several ROWS x BLOCK tiles per program, the last tile
# of a program partial (triton_kernels/layer_norm.py's _fwd_rows_kernel / _bwd_rows_kernel).
SHAPES = [(4, 1), (3, 3), (2, 5, 4), (7, 127), (2, 3, 1024), (1, 2, 3, 67), (5000, 3), (4, 25, 200)]


def _run(fn, x, w, b, dy):
    x = x.detach().requires_grad_()
    w = w.detach().requires_grad_() if w is not None else None
    b = b.detach().requires_grad_() if b is not None else None
    y = fn(x, w, b)
    inputs = [t for t in (x, w, b) if t is not None]
    grads = torch.autograd.grad(y, inputs, dy)
    return [y] + list(grads)


def _check(ours, torchs, exact, dtype):
    for o, t, e in zip(ours, torchs, exact):
        assert o.dtype == t.dtype and o.shape == t.shape
        err = (o.double() - e).abs().max().item()
        ref_err = (t.double() - e).abs().max().item()
        assert err <= 2 * ref_err + ATOL[dtype], (err, ref_err)


def _case(shape, dtype, affine, bias, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=g) * 2 + 0.5).to(dtype)
    n = shape[-1]
    w = (torch.randn(n, generator=g)).to(dtype) if affine else None
    b = (torch.randn(n, generator=g)).to(dtype) if affine and bias else None
    dy = torch.randn(shape, generator=g).to(dtype)
    return x, w, b, dy


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("affine,bias", [(True, True), (True, False), (False, False)])
def test_layer_norm_matches_torch(backend, dtype, shape, affine, bias):
    x, w, b, dy = _case(shape, dtype, affine, bias)
    n = (shape[-1],)
    torch_fn = lambda x, w, b: torch.nn.functional.layer_norm(x, n, w, b, 1e-5)  # noqa: E731
    with fusedtech.use_backend(backend):
        ours = _run(lambda x, w, b: F.layer_norm(x, n, w, b, 1e-5), x, w, b, dy)
    exact = _run(torch_fn, x.double(), w.double() if w is not None else None, b.double() if b is not None else None,
                 dy.double())
    _check(ours, _run(torch_fn, x, w, b, dy), exact, dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("affine", [True, False])
def test_rms_norm_matches_torch(backend, dtype, shape, affine):
    x, w, _, dy = _case(shape, dtype, affine, False)
    n = (shape[-1],)
    torch_fn = lambda x, w, b: torch.nn.functional.rms_norm(x, n, w, 1e-6)  # noqa: E731
    with fusedtech.use_backend(backend):
        ours = _run(lambda x, w, b: F.rms_norm(x, n, w, 1e-6), x, w, None, dy)
    exact = _run(torch_fn, x.double(), w.double() if w is not None else None, None, dy.double())
    _check(ours, _run(torch_fn, x, w, None, dy), exact, dtype)


@pytest.mark.parametrize("backend", BACKENDS)
def test_long_rows_take_the_split_path(backend):
    # Rows longer than the Triton block (8192) loop over the row; the CPU has no block limit.
    x, w, b, dy = _case((3, 20_000), torch.float32, True, True)
    with fusedtech.use_backend(backend):
        ours = _run(lambda x, w, b: F.layer_norm(x, (20_000,), w, b), x, w, b, dy)
    torch_fn = lambda x, w, b: torch.nn.functional.layer_norm(x, (20_000,), w, b)  # noqa: E731
    exact = _run(torch_fn, x.double(), w.double(), b.double(), dy.double())
    _check(ours, _run(torch_fn, x, w, b, dy), exact, torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_input_and_grad(backend):
    x, w, b, dy = _case((6, 40), torch.float32, True, True)
    xt = x.t().contiguous().t()  # same values, column-major
    dyt = dy.t().contiguous().t()
    with fusedtech.use_backend(backend):
        ours = _run(lambda x, w, b: F.layer_norm(x, (40,), w, b), xt, w, b, dyt)
    ref = _run(lambda x, w, b: torch.nn.functional.layer_norm(x, (40,), w, b), x, w, b, dy)
    for o, r in zip(ours, ref):
        torch.testing.assert_close(o, r, atol=ATOL[torch.float32], rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_input(backend):
    x = torch.randn(0, 16, requires_grad=True)
    ln = fusedtech.nn.LayerNorm(16)
    with fusedtech.use_backend(backend):
        y = ln(x)
        y.sum().backward()
    assert y.shape == (0, 16) and x.grad.shape == (0, 16)
    assert torch.equal(ln.weight.grad, torch.zeros(16))


@pytest.mark.skipif("cpu" not in BACKENDS, reason="the C++ cpu extension is not built")
def test_kernel_errors_name_the_argument():
    # The compiled ops called directly (the functional layer checks first): the checks shared with
    # the CUDA launchers in csrc/checks.h, which read weight, bias and the statistics by index.
    ops, x = torch.ops.fusedtech_C, torch.randn(4, 6)
    with pytest.raises(RuntimeError, match="weight has 5 elements, expected 6"):
        ops.layer_norm_fwd(x, torch.ones(5), None, 1e-5, False)
    with pytest.raises(RuntimeError, match="bias has 7 elements, expected 6"):
        ops.layer_norm_fwd(x, None, torch.ones(7), 1e-5, False)
    with pytest.raises(RuntimeError, match="contiguous 2-D"):
        ops.layer_norm_fwd(x.t(), None, None, 1e-5, False)
    y, mean, rstd = ops.layer_norm_fwd(x, None, None, 1e-5, False)
    with pytest.raises(RuntimeError, match="grad has shape"):
        ops.layer_norm_bwd(y[:3], x, None, None, mean, rstd, False, False)
    with pytest.raises(RuntimeError, match="rstd must hold 4 values"):
        ops.layer_norm_bwd(y, x, None, None, mean, rstd[:3], False, False)
    with pytest.raises(RuntimeError, match="mean must hold 4 values"):
        ops.layer_norm_bwd(y, x, None, None, mean[:2], rstd, False, False)
    ops.layer_norm_bwd(y, x, None, None, mean[:2], rstd, True, False)  # RMSNorm reads no mean


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("rms", [False, True])
def test_rows_of_no_elements_like_torch(backend, rms):
    x = torch.randn(4, 3, 0, requires_grad=True)
    fused, ref = (fusedtech.nn.RMSNorm(0), torch.nn.RMSNorm(0)) if rms else (fusedtech.nn.LayerNorm(0), torch.nn.LayerNorm(0))
    with fusedtech.use_backend(backend):
        y = fused(x)
        (gx,) = torch.autograd.grad(y.sum(), [x])
    assert y.shape == ref(x).shape == (4, 3, 0) and gx.shape == x.shape


@pytest.mark.parametrize("backend", BACKENDS)
def test_backward_is_bitwise_deterministic(backend):
    x, w, b, dy = _case((64, 300), torch.float32, True, True)
    with fusedtech.use_backend(backend):
        first = _run(lambda x, w, b: F.layer_norm(x, (300,), w, b), x, w, b, dy)
        second = _run(lambda x, w, b: F.layer_norm(x, (300,), w, b), x, w, b, dy)
    assert all(torch.equal(a, c) for a, c in zip(first, second))


@pytest.mark.parametrize("backend", [b for b in ("torch", "cpu") if b in BACKENDS])
@pytest.mark.parametrize("rms", [False, True])
# Double backward (gradient penalties, Hessian-vector products) is torch's op's too.
@pytest.mark.parametrize("check", [torch.autograd.gradcheck, torch.autograd.gradgradcheck], ids=lambda c: c.__name__)
def test_gradcheck_and_gradgradcheck_float64(backend, rms, check):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 7, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.randn(7, dtype=torch.float64, generator=g, requires_grad=True)
    b = torch.randn(7, dtype=torch.float64, generator=g, requires_grad=True)
    with fusedtech.use_backend(backend):
        if rms:
            assert check(lambda x, w: F.rms_norm(x, (7,), w, 1e-6), (x, w))
        else:
            assert check(lambda x, w, b: F.layer_norm(x, (7,), w, b), (x, w, b))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("rms", [False, True])
def test_double_backward_matches_torch(backend, rms):
    # A gradient penalty: d/d(x, w) of |d loss / dx|^2, against torch's op in float32.
    x, w, b, _ = _case((4, 2, 9), torch.float32, True, not rms)

    def penalty(fn, x, w, b):
        x, w = x.clone().requires_grad_(), w.clone().requires_grad_()
        y = fn(x, w, b)
        (gx,) = torch.autograd.grad(y.pow(3).sum(), x, create_graph=True)
        return torch.autograd.grad(gx.square().sum(), (x, w))

    if rms:
        ours_fn, torch_fn = (lambda x, w, b: F.rms_norm(x, (9,), w, 1e-5)), \
            (lambda x, w, b: torch.nn.functional.rms_norm(x, (9,), w, 1e-5))
    else:
        ours_fn, torch_fn = (lambda x, w, b: F.layer_norm(x, (9,), w, b)), \
            (lambda x, w, b: torch.nn.functional.layer_norm(x, (9,), w, b))
    with fusedtech.use_backend(backend):
        ours = penalty(ours_fn, x, w, b)
    exact = penalty(torch_fn, x.double(), w.double(), b.double() if b is not None else None)
    theirs = penalty(torch_fn, x, w, b)
    _check(ours, theirs, exact, torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_func_grad_matches_torch(backend):
    # torch.func.grad of a function using the norm (functorch refuses the custom op's own autograd).
    x, w, b, _ = _case((3, 2, 9), torch.float32, True, True)
    with fusedtech.use_backend(backend):
        ours = torch.func.grad(lambda x, w: F.layer_norm(x, (9,), w, b).pow(3).sum(), argnums=(0, 1))(x, w)
    exact = torch.func.grad(lambda x, w: torch.nn.functional.layer_norm(x, (9,), w, b.double()).pow(3).sum(),
                            argnums=(0, 1))(x.double(), w.double())
    theirs = torch.func.grad(lambda x, w: torch.nn.functional.layer_norm(x, (9,), w, b).pow(3).sum(),
                             argnums=(0, 1))(x, w)
    _check(ours, theirs, exact, torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("rms", [False, True])
def test_strided_weight_and_bias(backend, rms):
    # Views as parameters (an expanded scalar, every other element) are read by their strides.
    g = torch.Generator().manual_seed(8)
    x = torch.randn(3, 4, generator=g, requires_grad=True)
    for w, b in ((torch.tensor([2.0]).expand(4), torch.tensor([0.5]).expand(4)),
                 (torch.randn(8, generator=g)[::2], torch.randn(8, generator=g)[1::2])):
        fn = (lambda m, x: m.rms_norm(x, (4,), w, 1e-5)) if rms else (lambda m, x: m.layer_norm(x, (4,), w, b))
        with fusedtech.use_backend(backend):
            ours = fn(F, x)
            (dx,) = torch.autograd.grad(ours.pow(2).sum(), x)
        theirs = fn(torch.nn.functional, x)
        (tdx,) = torch.autograd.grad(theirs.pow(2).sum(), x)
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(dx, tdx, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(600, 3), (2, 300), (1, 70000)], ids=str)  # row tiles, one row, split rows
def test_constant_rows_with_a_large_offset_give_the_bias(backend, shape):
    w, b = torch.rand(shape[1]) + 0.5, torch.randn(shape[1])
    x = torch.full(shape, 30000.3)
    with fusedtech.use_backend(backend):
        y = F.layer_norm(x, (shape[1],), w, b)
    assert torch.equal(torch.nn.functional.layer_norm(x, (shape[1],), w, b), b.expand(shape))
    assert torch.equal(y, b.expand(shape))


def test_memory_efficient_refuses_double_backward():
    x, w = torch.randn(3, 8, requires_grad=True), torch.rand(8) + 0.5
    y = F.layer_norm(x, (8,), w, memory_efficient=True)
    with pytest.raises(RuntimeError, match="memory_efficient=True does not support double backward"):
        torch.autograd.grad(y.pow(3).sum(), x, create_graph=True)


def test_modules_are_drop_ins():
    for torch_cls, ours_cls, kw in ((torch.nn.LayerNorm, fusedtech.nn.LayerNorm, dict(bias=False)),
                                    (torch.nn.RMSNorm, fusedtech.nn.RMSNorm, dict(eps=1e-5))):
        t, f = torch_cls((4, 6), **kw), ours_cls((4, 6), **kw)
        assert repr(t) == repr(f) and t.state_dict().keys() == f.state_dict().keys()
        with torch.no_grad():
            t.weight.uniform_()
        f.load_state_dict(t.state_dict())
        x = torch.randn(3, 4, 6)
        torch.testing.assert_close(f(x), t(x), atol=1e-5, rtol=1e-5)
        c = ours_cls.from_torch(t)
        assert c.weight is t.weight and isinstance(c, torch_cls)
        torch.testing.assert_close(c(x), t(x), atol=1e-5, rtol=1e-5)
    assert fusedtech.nn.FusedLayerNorm is fusedtech.nn.LayerNorm and fusedtech.nn.FusedRMSNorm is fusedtech.nn.RMSNorm


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape,normalized", [((2, 5, 8), (8,)), ((6, 8), (8,)), ((2, 3, 4), (3, 4))], ids=str)
def test_output_takes_in_place_ops_and_statistics_need_no_grad(backend, shape, normalized):
    # The op reshapes inside itself: its output is no autograd view, so an in-place activation
    # after the norm works as after torch's; the saved statistics are not differentiable outputs.
    from fusedtech.ops.layer_norm import layer_norm as layer_norm_op
    g = torch.Generator().manual_seed(0)
    x, dy = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    w, b = torch.randn(normalized, generator=g), torch.randn(normalized, generator=g)
    ours, ref = [[t.clone().requires_grad_() for t in (x, w, b)] for _ in range(2)]
    with fusedtech.use_backend(backend):
        y = F.layer_norm(ours[0], normalized, ours[1], ours[2]).relu_()
        y.backward(dy)
        _, mean, rstd = layer_norm_op(ours[0].view(-1, 8) if len(normalized) == 1 else ours[0].reshape(-1, 12),
                                      ours[1].reshape(-1), ours[2].reshape(-1), 1e-5, False)
    assert not mean.requires_grad and not rstd.requires_grad
    torch.nn.functional.layer_norm(ref[0], normalized, ref[1], ref[2]).relu_().backward(dy)
    for a, c in zip(ours, ref):
        torch.testing.assert_close(a.grad, c.grad, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES + [torch.float64], ids=str)
def test_rms_norm_eps_none_is_torchs(dtype):
    # torch takes eps=None as the epsilon of the type it computes in: float32 for fp16/bf16 inputs
    # (not the input's much larger finfo eps). Small inputs (mean square ~1e-6) show the difference.
    x = torch.randn(5, 64, generator=torch.Generator().manual_seed(0)).mul(1e-3).to(dtype)
    ours, theirs = fusedtech.nn.RMSNorm(64, dtype=dtype)(x), torch.nn.RMSNorm(64, dtype=dtype)(x)
    exact = torch.nn.functional.rms_norm(x.double(), (64,), eps=torch.finfo(torch.float32).eps
                                         if dtype != torch.float64 else None)
    _check([ours.detach()], [theirs.detach()], [exact], dtype if dtype != torch.float64 else torch.float32)


def test_errors_name_the_argument():
    with pytest.raises(RuntimeError, match="normalized_shape"):
        F.layer_norm(torch.randn(3, 5), (4,))
    with pytest.raises(RuntimeError, match="weight"):
        F.layer_norm(torch.randn(3, 5), (5,), torch.randn(4))
    with fusedtech.use_backend("cuda"), pytest.raises(fusedtech.BackendUnavailableError):
        F.layer_norm(torch.randn(3, 5), (5,))
    for backend in BACKENDS:
        with fusedtech.use_backend(backend):
            with pytest.raises(RuntimeError, match="normalized_shape must have at least one dimension"):
                F.layer_norm(torch.randn(2, 6), ())
            with pytest.raises(TypeError, match="normalized_shape must be an int or a sequence of ints"):
                F.layer_norm(torch.randn(2, 6), None)
            for fn in (F.layer_norm, F.rms_norm):
                with pytest.raises(TypeError, match="floating-point input, got torch.int64"):
                    fn(torch.arange(12).view(2, 6), (6,))


@pytest.mark.parametrize("rms", [False, True])
def test_opcheck(rms):
    if "cpu" not in BACKENDS:
        pytest.skip("cpu extension not built")
    from fusedtech.ops.layer_norm import layer_norm_bwd, layer_norm_fwd
    x, w, b = torch.randn(4, 9, requires_grad=True), torch.randn(9, requires_grad=True), torch.randn(9, requires_grad=True)
    torch.library.opcheck(layer_norm_fwd, (x, w, None if rms else b, 1e-5, rms))
    bias = None if rms else b.detach()
    y, mean, rstd = layer_norm_fwd(x.detach(), w.detach(), bias, 1e-5, rms)
    torch.library.opcheck(layer_norm_bwd, (torch.randn(4, 9), x.detach(), w.detach(), bias, mean, rstd, rms, False))
    # From the output (memory_efficient's backward): y in x's place.
    torch.library.opcheck(layer_norm_bwd, (torch.randn(4, 9), y, w.detach(), bias, mean, rstd, rms, True))


def test_compile_fullgraph_no_graph_break():
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), fusedtech.nn.LayerNorm(16), torch.nn.GELU(),
                                torch.nn.Linear(16, 16), fusedtech.nn.RMSNorm(16))
    x = torch.randn(4, 8)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x), model(x))
    compiled(x).sum().backward()
    assert model[1].weight.grad is not None


def _away_from_zero_case(shape, seed=0):
    # memory_efficient recovers xhat = (y - b) / w: the weight must have no zero, so keep it in [0.5, 1.5].
    g = torch.Generator().manual_seed(seed)
    n = shape[-1]
    return (torch.randn(shape, generator=g) * 2 + 0.5, torch.rand(n, generator=g) + 0.5, torch.randn(n, generator=g),
            torch.randn(shape, generator=g))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(4, 1), (7, 127), (2, 3, 1024), (3, 9000)], ids=str)
@pytest.mark.parametrize("rms", [False, True])
def test_memory_efficient_matches_torch(backend, shape, rms):
    x, w, b, dy = _away_from_zero_case(shape)
    n = (shape[-1],)
    if rms:
        b = None
        torch_fn = lambda x, w, b: torch.nn.functional.rms_norm(x, n, w, 1e-6)  # noqa: E731
        ours_fn = lambda x, w, b: F.rms_norm(x, n, w, 1e-6, memory_efficient=True)  # noqa: E731
        plain_fn = lambda x, w, b: F.rms_norm(x, n, w, 1e-6)  # noqa: E731
    else:
        torch_fn = lambda x, w, b: torch.nn.functional.layer_norm(x, n, w, b, 1e-5)  # noqa: E731
        ours_fn = lambda x, w, b: F.layer_norm(x, n, w, b, 1e-5, memory_efficient=True)  # noqa: E731
        plain_fn = lambda x, w, b: F.layer_norm(x, n, w, b, 1e-5)  # noqa: E731
    with fusedtech.use_backend(backend):
        ours, plain = _run(ours_fn, x, w, b, dy), _run(plain_fn, x, w, b, dy)
    assert torch.equal(ours[0], plain[0])  # the same forward kernel: only what is saved differs
    exact = _run(torch_fn, x.double(), w.double(), b.double() if b is not None else None, dy.double())
    _check(ours, _run(torch_fn, x, w, b, dy), exact, torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(4, 1), (5, 3), (7, 127), (3, 9000)], ids=str)
@pytest.mark.parametrize("rms,affine,bias", [(False, True, True), (False, True, False), (False, False, False),
                                             (True, True, False), (True, False, False)])
def test_memory_efficient_every_dtype_and_affine(backend, dtype, shape, rms, affine, bias):
    # The backward recovers xhat from y as stored: in fp16/bf16 it carries y's rounding, and must
    # still be within the dtype's tolerance of the exact gradients (as the plain backward is).
    x, w, b, dy = (t.to(dtype) for t in _away_from_zero_case(shape))
    w, b = (w if affine else None), (b if bias else None)
    n = (shape[-1],)
    if rms:
        torch_fn = lambda x, w, b: torch.nn.functional.rms_norm(x, n, w, 1e-6)  # noqa: E731
        ours_fn = lambda x, w, b: F.rms_norm(x, n, w, 1e-6, memory_efficient=True)  # noqa: E731
    else:
        torch_fn = lambda x, w, b: torch.nn.functional.layer_norm(x, n, w, b, 1e-5)  # noqa: E731
        ours_fn = lambda x, w, b: F.layer_norm(x, n, w, b, 1e-5, memory_efficient=True)  # noqa: E731
    with fusedtech.use_backend(backend):
        ours = _run(ours_fn, x, w, b, dy)
    double = lambda t: t.double() if t is not None else None  # noqa: E731
    exact = _run(torch_fn, x.double(), double(w), double(b), dy.double())
    _check(ours, _run(torch_fn, x, w, b, dy), exact, dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(5, 3), (33, 127), (3, 9000)], ids=str)
@pytest.mark.parametrize("rms", [False, True])
def test_backward_from_output_matches_the_oracle(backend, dtype, shape, rms):
    # The kernels' from-output backward against the oracle's, given the same y and statistics: the
    # same math in fp32, so they differ by the order of the row and column sums only (dx to a unit
    # in the last place of its dtype; dweight/dbias, fp32 sums over the rows, to 1e-5 relative).
    from fusedtech.ops.layer_norm import _layer_norm_bwd, _layer_norm_fwd
    from fusedtech.reference.layer_norm import layer_norm_bwd as oracle_bwd
    x, w, b, dy = (t.to(dtype) for t in _away_from_zero_case(shape))
    b = None if rms else b
    y, mean, rstd = _layer_norm_fwd(x, w, b, 1e-5, rms)
    with fusedtech.use_backend(backend):
        dx, dw, db = _layer_norm_bwd(dy, y, w, b, rstd, rstd, rms, True)
    rdx, rdw, rdb = oracle_bwd(dy, y, w, b, mean, rstd, rms, True)
    ulp = {torch.float32: 2e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}[dtype]
    torch.testing.assert_close(dx, rdx, rtol=ulp, atol=ulp * rdx.abs().max().item())
    torch.testing.assert_close(dw, rdw, rtol=1e-5, atol=1e-5 * rdw.abs().max().item())
    if b is not None:
        torch.testing.assert_close(db, rdb, rtol=1e-5, atol=1e-5 * rdb.abs().max().item())
    else:
        assert db.numel() == 0


@pytest.mark.parametrize("backend", [b for b in ("torch", "cpu") if b in BACKENDS])
def test_memory_efficient_gradcheck_float64(backend):
    x, w, b, _ = (t.double().requires_grad_() for t in _away_from_zero_case((3, 7)))
    with fusedtech.use_backend(backend):
        assert torch.autograd.gradcheck(lambda x, w, b: F.layer_norm(x, (7,), w, b, memory_efficient=True), (x, w, b))
        assert torch.autograd.gradcheck(lambda x, w: F.rms_norm(x, (7,), w, 1e-6, memory_efficient=True), (x, w))


def _saved_bytes(model, x):
    """Bytes of the distinct activation storages autograd keeps for backward (a tensor saved twice
    counts once; parameters exist anyway and do not count)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in params:
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x).sum().backward()
    return sum(seen.values())


def test_memory_efficient_saves_the_input_when_the_next_layer_keeps_the_output():
    # Linear -> LayerNorm -> Linear: the second Linear saves LayerNorm's output, so keeping it
    # (rather than LayerNorm's input) frees one activation: rows x hidden x 4 bytes here.
    rows, hidden = 64, 256
    x = torch.randn(rows, 32)
    sizes = {}
    for efficient in (False, True):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(32, hidden), fusedtech.nn.LayerNorm(hidden, memory_efficient=efficient),
                                    torch.nn.Linear(hidden, 8))
        sizes[efficient] = _saved_bytes(model, x)
    assert sizes[False] - sizes[True] >= rows * hidden * 4, sizes


def test_memory_efficient_opcheck_and_compile():
    if "cpu" not in BACKENDS:
        pytest.skip("cpu extension not built")
    from fusedtech.ops.layer_norm import layer_norm_fwd_recompute
    x, w, b, _ = _away_from_zero_case((4, 9))
    torch.library.opcheck(layer_norm_fwd_recompute, (x.requires_grad_(), w.requires_grad_(), b.requires_grad_(), 1e-5, False))
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), fusedtech.nn.LayerNorm(16, memory_efficient=True), torch.nn.Linear(16, 4))
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    inp = torch.randn(4, 8)
    torch.testing.assert_close(compiled(inp), model(inp))
    compiled(inp).sum().backward()
    assert model[1].weight.grad is not None


def test_triton_kernels_compile_for_sm80_sm90():
    import triton.language as tl
    from aot import compile_for_gpus
    from fusedtech.triton_kernels import layer_norm as k
    for one, block in ((True, 1024), (False, 8192)):
        compile_for_gpus(k._fwd_kernel, {"x_ptr": "*bf16", "y_ptr": "*bf16", "w_ptr": "*bf16", "b_ptr": "*bf16",
                                          "mean_ptr": "*fp32", "rstd_ptr": "*fp32", "n": "i32", "eps": "fp32"},
                         dict(DTYPE=tl.bfloat16, RMS=False, HAS_WEIGHT=True, HAS_BIAS=True, BLOCK=block, ONE_BLOCK=one))
    # (one block, block, row stages, from the output: memory_efficient's backward)
    for one, block, stages, from_output in ((True, 1024, 1, False), (False, 8192, 1, False), (True, 4096, 2, False),
                                            (True, 1024, 1, True), (False, 8192, 1, True)):
        compiled = compile_for_gpus(k._bwd_kernel, {"dy_ptr": "*fp32", "x_ptr": "*fp32", "w_ptr": "*fp32", "b_ptr": "*fp32",
                                          "mean_ptr": "*fp32", "rstd_ptr": "*fp32", "coeff_ptr": "*fp32", "dx_ptr": "*fp32",
                                          "dw_part_ptr": "*fp32", "db_part_ptr": "*fp32", "rows": "i32", "n": "i32",
                                          "rows_per_program": "i32"},
                         dict(DTYPE=tl.float32, RMS=not one, HAS_WEIGHT=True, HAS_BIAS=one, FROM_OUTPUT=from_output,
                              BLOCK=block, ONE_BLOCK=one, ROW_STAGES=stages))
        # Two stages: loads of the next row's iteration go through cp.async. Without the JIT's alignment
        # hints (this compile has none) only the statistics qualify; test_triton_launches.py checks that
        # the rows themselves are staged at the aligned shapes a GPU launch sees.
        assert all(("cp.async" in c.asm["ptx"]) == (stages > 1) for c in compiled)
    # Short rows: a ROWS x BLOCK tile a program (1 x 2048 down to 2048 x 1 elements).
    for rows, block, rms, from_output in ((16, 128, False, False), (2048, 1, True, False), (8, 256, False, True)):
        compile_for_gpus(k._fwd_rows_kernel, {"x_ptr": "*bf16", "y_ptr": "*bf16", "w_ptr": "*bf16", "b_ptr": "*bf16",
                                              "mean_ptr": "*fp32", "rstd_ptr": "*fp32", "rows": "i64", "n": "i32",
                                              "eps": "fp32"},
                         dict(DTYPE=tl.bfloat16, RMS=rms, HAS_WEIGHT=True, HAS_BIAS=not rms, ROWS=rows, BLOCK=block))
        compile_for_gpus(k._bwd_rows_kernel, {"dy_ptr": "*fp16", "x_ptr": "*fp16", "w_ptr": "*fp32", "b_ptr": "*fp32",
                                              "mean_ptr": "*fp32", "rstd_ptr": "*fp32", "dx_ptr": "*fp16",
                                              "dw_part_ptr": "*fp32", "db_part_ptr": "*fp32", "rows": "i64", "n": "i32",
                                              "rows_per_program": "i64"},
                         dict(DTYPE=tl.float16, RMS=rms, HAS_WEIGHT=True, HAS_BIAS=not rms, FROM_OUTPUT=from_output,
                              ROWS=rows, BLOCK=block))
    for from_output in (False, True):
        compile_for_gpus(k._bwd_coeffs_kernel, {"dy_ptr": "*bf16", "x_ptr": "*bf16", "w_ptr": "*bf16", "b_ptr": "*bf16",
                                                "mean_ptr": "*fp32", "rstd_ptr": "*fp32", "coeff_ptr": "*fp32", "n": "i32"},
                         dict(RMS=False, HAS_WEIGHT=True, HAS_BIAS=True, FROM_OUTPUT=from_output, BLOCK=8192))


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n", [3, 128, 512, 4096, 70_000])  # 3, 128: the short-row (tile of rows) kernels
def test_gpu_matches_torch(backend, dtype, n):
    x, w, b, dy = (t.cuda() for t in _case((64, n), dtype, True, True))
    with fusedtech.use_backend(backend):
        ours = _run(lambda x, w, b: F.layer_norm(x, (n,), w, b), x, w, b, dy)
    torch_fn = lambda x, w, b: torch.nn.functional.layer_norm(x, (n,), w, b)  # noqa: E731
    exact = _run(torch_fn, x.double(), w.double(), b.double(), dy.double())
    _check(ours, _run(torch_fn, x, w, b, dy), exact, dtype)


def test_convert_model_swaps_norms_in_place():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.LayerNorm(8), torch.nn.Sequential(torch.nn.RMSNorm(8)),
                                torch.nn.BatchNorm1d(8)).eval()
    x = torch.randn(5, 6)
    before, keys = model(x), model.state_dict().keys()
    converted, report = fusedtech.nn.convert_model(model, return_report=True)
    assert converted is model
    assert type(model[1]) is fusedtech.nn.LayerNorm and type(model[2][0]) is fusedtech.nn.RMSNorm
    assert type(model[3]) is fusedtech.nn.BatchNorm1d
    assert report["replaced"] == {"LayerNorm": 1, "RMSNorm": 1, "BatchNorm1d": 1}
    assert model.state_dict().keys() == keys and not model.training
    torch.testing.assert_close(model(x), before, atol=1e-5, rtol=1e-5)


def _mixed_case(device, backend, dtype, rms):
    # fp16/bf16 activations with fp32 parameters (as a model under autocast feeds a norm): outputs
    # and dx in the input's dtype, dweight/dbias in the parameters', within the dtype's tolerance.
    x, _, _, dy = _case((6, 300), dtype, False, False)
    g = torch.Generator().manual_seed(1)
    w, b = torch.randn(300, generator=g), (None if rms else torch.randn(300, generator=g))
    x, w, dy = x.to(device), w.to(device), dy.to(device)
    b = b.to(device) if b is not None else None
    if rms:
        torch_fn = lambda x, w, b: torch.nn.functional.rms_norm(x, (300,), w, 1e-6)  # noqa: E731
        ours_fn = lambda x, w, b: F.rms_norm(x, (300,), w, 1e-6)  # noqa: E731
    else:
        torch_fn = lambda x, w, b: torch.nn.functional.layer_norm(x, (300,), w, b)  # noqa: E731
        ours_fn = lambda x, w, b: F.layer_norm(x, (300,), w, b)  # noqa: E731
    with fusedtech.use_backend(backend):
        ours = _run(ours_fn, x, w, b, dy)
    exact = _run(torch_fn, x.double(), w.double(), b.double() if b is not None else None, dy.double())
    _check(ours, _run(torch_fn, x, w, b, dy), exact, dtype)


@pytest.mark.filterwarnings("ignore:Mismatch dtype between input and weight")  # torch's rms_norm, the reference
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("rms", [False, True])
def test_low_precision_input_with_fp32_parameters(backend, dtype, rms):
    _mixed_case("cpu", backend, dtype, rms)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("rms", [False, True])
def test_gpu_low_precision_input_with_fp32_parameters(backend, dtype, rms):
    _mixed_case("cuda", backend, dtype, rms)


@pytest.mark.filterwarnings("ignore:Mismatch dtype between input and weight")  # torch's rms_norm, the reference
@pytest.mark.parametrize("rms", [False, True])
def test_autocast_on_cpu_keeps_torchs_dtype(rms):
    # torch's CPU autocast leaves the norms in the input's dtype: so do we.
    lin = torch.nn.Linear(8, 16)
    fused, ref = (fusedtech.nn.RMSNorm(16), torch.nn.RMSNorm(16)) if rms else (fusedtech.nn.LayerNorm(16),
                                                                              torch.nn.LayerNorm(16))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        h = lin(torch.randn(4, 8))
        ours, theirs = fused(h), ref(h)
    assert h.dtype == torch.bfloat16 and ours.dtype == theirs.dtype


@pytest.mark.parametrize("rms", [False, True])
def test_autocast_policy_casts_low_precision_norm_inputs_to_fp32(monkeypatch, rms):
    # The CUDA policy (norms in fp32, output fp32, as torch's autocast): exercised here by giving the
    # CPU the same policy; float64 is not eligible for autocast and stays float64.
    monkeypatch.setitem(F._AUTOCAST_NORM_DTYPE, "cpu", torch.float32)
    x, w = torch.randn(4, 16).bfloat16(), torch.rand(16) + 0.5
    fn = (lambda t, w: F.rms_norm(t, (16,), w, 1e-6)) if rms else (lambda t, w: F.layer_norm(t, (16,), w))  # noqa: E731
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = fn(x, w)
        y64 = fn(x.double(), w.double())
    assert y.dtype == torch.float32 and y64.dtype == torch.float64
    torch.testing.assert_close(y, fn(x.float(), w), rtol=0, atol=0)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("rms", [False, True])
def test_gpu_autocast_output_dtype_is_torchs(backend, rms):
    lin = torch.nn.Linear(8, 16).cuda()
    fused, ref = (fusedtech.nn.RMSNorm(16), torch.nn.RMSNorm(16)) if rms else (fusedtech.nn.LayerNorm(16),
                                                                              torch.nn.LayerNorm(16))
    fused, ref = fused.cuda(), ref.cuda()
    with fusedtech.use_backend(backend), torch.autocast("cuda", dtype=torch.bfloat16):
        h = lin(torch.randn(4, 8, device="cuda"))
        ours, theirs = fused(h), ref(h)
    assert ours.dtype == theirs.dtype == torch.float32
    torch.testing.assert_close(ours, theirs, atol=ATOL[torch.float32], rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", ["large_mean", "outlier_first", "constant_rows", "constant_rows_large"])
def test_statistics_of_hard_rows(backend, case):
    # Rows whose variance a one-pass sum of squares would lose to cancellation (mean 1e4, std 1e-2),
    # whose first element (the kernels' shift) is an outlier, or that are constant (variance 0):
    # 7.25 sums exactly; 30000.3 does not, and sum / n would leave x - mean = its rounding error,
    # normalised to +-0.5 by 1 / sqrt(eps) where torch gives the bias.
    g = torch.Generator().manual_seed(3)
    x = torch.randn(6, 300, generator=g, dtype=torch.float64)
    if case == "large_mean":
        x = 1e4 + 1e-2 * x
    elif case == "outlier_first":
        x[:, 0] = 1e4
    elif case == "constant_rows":
        x = torch.full((6, 300), 7.25, dtype=torch.float64)
    else:
        x = torch.full((6, 300), 30000.3, dtype=torch.float64)
    x = x.float()
    w, b, dy = torch.randn(300, generator=g), torch.randn(300, generator=g), torch.randn(6, 300, generator=g)
    torch_fn = lambda x, w, b: torch.nn.functional.layer_norm(x, (300,), w, b)  # noqa: E731
    with fusedtech.use_backend(backend):
        ours = _run(lambda x, w, b: F.layer_norm(x, (300,), w, b), x, w, b, dy)
    exact = _run(torch_fn, x.double(), w.double(), b.double(), dy.double())
    _check(ours, _run(torch_fn, x, w, b, dy), exact, torch.float32)


@pytest.mark.parametrize("backend", cpu_backends())
def test_a_row_holding_inf_or_nan_normalizes_to_nan_as_torch(backend):
    x = torch.randn(4, 9)
    x[1, 3] = float("inf")
    x[2, 5] = float("nan")
    ours = fusedtech.nn.LayerNorm(9)
    with fusedtech.use_backend(backend):
        y = ours(x)
    yr = torch.nn.functional.layer_norm(x, (9,), ours.weight, ours.bias)
    assert torch.equal(y.isnan(), yr.isnan())
    torch.testing.assert_close(y[[0, 3]], yr[[0, 3]], atol=1e-5, rtol=1e-5)


FLOAT64_BACKENDS = [b for b in cpu_backends() if b != "triton"]  # the Triton kernels take no float64
NON_FINITE_CASES = [(b, d) for b in cpu_backends() for d in (torch.float32, torch.float64)
                    if d == torch.float32 or b in FLOAT64_BACKENDS]


@pytest.mark.parametrize("backend,dtype", NON_FINITE_CASES, ids=str)
@pytest.mark.parametrize("rms", [False, True])
def test_non_finite_and_overflowing_rows_are_nan_or_match_torch(backend, rms, dtype):
    # +-inf and NaN: what torch gives, NaN for NaN. float64 values whose squares overflow (|x| >
    # 1e154): an infinite variance (root mean square), so the output is torch's (the bias), never
    # a large finite value.
    x = torch.randn(5, 9, dtype=dtype)
    x[1, 3] = float("inf")
    x[2, 5] = float("nan")
    x[3, 0] = -float("inf")
    if dtype == torch.float64:
        x[4] = torch.linspace(-3e154, 4e154, 9, dtype=dtype)
    w = torch.rand(9, dtype=dtype) + 0.5
    with fusedtech.use_backend(backend):
        y = F.rms_norm(x, (9,), w, 1e-6) if rms else F.layer_norm(x, (9,), w)
    yr = (torch.nn.functional.rms_norm(x, (9,), w, 1e-6) if rms else torch.nn.functional.layer_norm(x, (9,), w))
    assert torch.isnan(y[2]).all() and torch.isnan(yr[2]).all()
    for r in (1, 3, 4) if dtype == torch.float64 else (1, 3):
        finite = torch.isfinite(yr[r])
        assert torch.equal(torch.isfinite(y[r]), finite), (r, y[r], yr[r])  # no large finite value for NaN
        torch.testing.assert_close(y[r][finite], yr[r][finite], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(y[0], yr[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("rms", [False, True])
def test_memory_efficient_with_a_zero_in_the_weight_keeps_the_input_and_matches_torch(backend, rms):
    # A weight reaching exactly zero (pruning, zero init) leaves no trace of xhat in the output
    # there: the input is kept for that call, and the gradients are torch's, not NaN.
    x = torch.randn(6, 10, requires_grad=True)
    w = (torch.rand(10) + 0.5).requires_grad_()
    with torch.no_grad():
        w[[2, 7]] = 0.0
    b = torch.randn(10, requires_grad=True)
    dy = torch.randn(6, 10)
    args = (x, w) if rms else (x, w, b)
    with fusedtech.use_backend(backend), pytest.warns(UserWarning, match="exact zero"):
        y = F.rms_norm(x, (10,), w, 1e-6, memory_efficient=True) if rms else \
            F.layer_norm(x, (10,), w, b, memory_efficient=True)
    grads = torch.autograd.grad(y, args, dy)
    yr = torch.nn.functional.rms_norm(x, (10,), w, 1e-6) if rms else torch.nn.functional.layer_norm(x, (10,), w, b)
    ref = torch.autograd.grad(yr, args, dy)
    torch.testing.assert_close(y, yr, atol=1e-5, rtol=1e-5)
    for g, r in zip(grads, ref):
        assert torch.isfinite(g).all()
        torch.testing.assert_close(g, r, atol=1e-5, rtol=1e-5)


def test_complex_weight_or_bias_is_refused_by_name():
    x = torch.randn(3, 4)
    with pytest.raises(TypeError, match="weight must be a real floating-point tensor"):
        F.layer_norm(x, (4,), torch.ones(4, dtype=torch.complex64))
    with pytest.raises(TypeError, match="bias must be a real floating-point tensor"):
        F.layer_norm(x, (4,), torch.ones(4), torch.zeros(4, dtype=torch.complex64))
    with pytest.raises(TypeError, match="weight must be a real floating-point tensor"):
        F.rms_norm(x, (4,), torch.ones(4, dtype=torch.int64))
    with pytest.raises(TypeError, match="weight must be a real floating-point tensor"):
        F.dropout_add_layer_norm(x, x, torch.ones(4, dtype=torch.complex64))


@pytest.mark.parametrize("backend,dtype", [(b, d) for b in cpu_backends()
                                           for d in (torch.float32, torch.float16, torch.bfloat16, torch.float64)
                                           if d != torch.float64 or b in FLOAT64_BACKENDS], ids=str)
@pytest.mark.parametrize("memory_efficient", [False, True])
def test_layer_norm_over_one_element_has_exactly_zero_input_gradient(backend, dtype, memory_efficient):
    # x - mean is exactly 0 over one element, so dx is exactly 0 (rstd = 1/sqrt(eps) magnifies any
    # rounding in the backward's terms; the exact answer is 0, as torch's float64 gives).
    x = torch.randn(7, 1, dtype=dtype, requires_grad=True)
    w = (torch.rand(1) + 0.5).to(dtype).requires_grad_()
    dy = torch.randn(7, 1, dtype=dtype)
    with fusedtech.use_backend(backend):
        y = F.layer_norm(x, (1,), w, None, memory_efficient=memory_efficient)
        dx, dw = torch.autograd.grad(y, (x, w), dy)
    assert torch.equal(y, torch.zeros_like(y))
    assert torch.equal(dx, torch.zeros_like(dx)), dx
    assert torch.equal(dw, torch.zeros_like(dw))
