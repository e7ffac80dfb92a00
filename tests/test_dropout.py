"""Fused dropout: inverted-dropout statistics, the backward reusing exactly the forward's mask
without storing it, reproducibility from torch's generator, and the same mask on every backend
(the C++ Philox and Triton's tl.randint are the same generator, checked bit for bit here).

No tolerances: masks and scaled values are compared exactly; the kept fraction is checked against
a 6-sigma binomial bound.
"""
from __future__ import annotations

import math

import pytest
import torch

import fusedtech
from fusedtech.nn import functional as F
from fusedtech.ops.dropout import dropout_apply
from conftest import cpu_backends

BACKENDS = cpu_backends()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_statistics_and_exact_scaling(backend, p):
    n = 200_000 if backend != "triton" else 50_000  # the interpreter is slow
    x = torch.rand(n) + 0.5  # no zeros, so a zero output means dropped
    with fusedtech.use_backend(backend):
        y = F.dropout(x, p)
    kept = y != 0
    frac = kept.float().mean().item()
    assert abs(frac - (1 - p)) < 6 * math.sqrt(p * (1 - p) / n)
    scale = torch.tensor(1.0 / (1.0 - p), dtype=torch.float32)
    assert torch.equal(y[kept], x[kept] * scale)
    assert abs(y.mean().item() - x.mean().item()) < 0.05


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_backward_uses_the_forward_mask(backend, dtype):
    x = (torch.rand(7, 131) + 0.5).to(dtype).requires_grad_()
    dy = torch.randn(7, 131).to(dtype)
    with fusedtech.use_backend(backend):
        y = F.dropout(x, 0.4)
        (dx,) = torch.autograd.grad(y, x, dy)
    mask = y != 0
    expected = torch.where(mask, (dy.float() * torch.tensor(1 / 0.6, dtype=torch.float32)), 0.0).to(dtype)
    assert torch.equal(dx, expected)


def test_same_mask_on_every_backend():
    x = torch.randn(5000)
    outs = {}
    for backend in BACKENDS:
        torch.manual_seed(1234)
        with fusedtech.use_backend(backend):
            outs[backend] = F.dropout(x, 0.25)
    first = next(iter(outs.values()))
    assert all(torch.equal(first, o) for o in outs.values()), list(outs)


def test_philox_matches_tritons_generator():
    pytest.importorskip("triton")
    if "triton" not in BACKENDS:
        pytest.skip("Triton does not run here")
    import triton
    import triton.language as tl
    from fusedtech.reference.dropout import philox4

    @triton.jit
    def _draw(out, seed, n, BLOCK: tl.constexpr):
        offs = tl.arange(0, BLOCK).to(tl.int64) + (1 << 33)  # counters past 2^32 use the high word
        r0, r1, r2, r3 = tl.randint4x(seed, offs)
        keep = tl.arange(0, BLOCK) < n
        tl.store(out + tl.arange(0, BLOCK), r0, mask=keep)
        tl.store(out + BLOCK + tl.arange(0, BLOCK), r1, mask=keep)
        tl.store(out + 2 * BLOCK + tl.arange(0, BLOCK), r2, mask=keep)
        tl.store(out + 3 * BLOCK + tl.arange(0, BLOCK), r3, mask=keep)

    out = torch.empty(4, 256, dtype=torch.int32)
    seed = 0x1234_5678_9ABC
    _draw[(1,)](out, seed, 256, BLOCK=256)
    ours = torch.stack(philox4(seed, torch.arange(256, dtype=torch.int64) + (1 << 33)))
    assert torch.equal(out.to(torch.int64) & 0xFFFFFFFF, ours)


@pytest.mark.parametrize("n", [1, 3, 4, 5, 1023, 1025, 4099])
def test_mask_of_element_i_is_word_i_mod_4_of_block_i_div_4(n):
    # The layout every backend shares (checked against the oracle's per-element draw): each backend's
    # mask of a tensor of n elements equals the oracle's, partial groups of four included.
    from fusedtech.reference.dropout import dropout_draws, keep_mask
    seed = 987654321
    draws = dropout_draws(seed, torch.arange(n))
    assert torch.equal(keep_mask((n,), 0.5, seed, "cpu"), draws >= 2 ** 31)
    x = torch.ones(n)
    for backend in BACKENDS:
        with fusedtech.use_backend(backend):
            y = dropout_apply(x, 0.5, torch.tensor([seed]))
        assert torch.equal(y != 0, draws >= 2 ** 31), backend


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_mask_is_saved_for_backward(backend):
    x = torch.randn(64, 64, requires_grad=True)
    saved = []
    with fusedtech.use_backend(backend), torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        F.dropout(x, 0.5).sum().backward()
    assert all(t.numel() < x.numel() for t in saved), [t.shape for t in saved]
    assert sum(t.numel() * t.element_size() for t in saved) <= 8  # the int64 seed


def test_reproducible_and_advancing():
    x = torch.randn(4096)
    torch.manual_seed(7)
    a, b = F.dropout(x, 0.5), F.dropout(x, 0.5)
    torch.manual_seed(7)
    a2 = F.dropout(x, 0.5)
    torch.manual_seed(8)
    c = F.dropout(x, 0.5)
    assert torch.equal(a, a2)
    assert not torch.equal(a, b)  # consecutive calls draw new seeds
    assert not torch.equal(a, c)


def test_edge_cases_match_torch():
    x = torch.randn(3, 4)
    assert F.dropout(x, 0.0) is x
    assert F.dropout(x, 0.7, training=False) is x
    x[0, 0] = float("nan")
    ours, theirs = x.clone().requires_grad_(), x.clone().requires_grad_()
    y1, t1 = F.dropout(ours, 1.0), torch.nn.functional.dropout(theirs, 1.0)
    assert torch.equal(y1.nan_to_num(7.0), t1.nan_to_num(7.0))  # zeros, NaN kept as torch keeps it
    y1.sum().backward()
    t1.sum().backward()
    assert torch.equal(ours.grad, theirs.grad)
    x = torch.randn(3, 4)
    y = x.clone()
    out = F.dropout(y, 0.5, inplace=True)
    assert out is y
    assert F.dropout(torch.empty(0), 0.5).shape == (0,)
    with pytest.raises(ValueError, match="between 0 and 1"):
        F.dropout(x, 1.5)
    nc = torch.randn(6, 8).t()
    assert F.dropout(nc, 0.5).shape == nc.shape


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", ["channels_last", "transposed"])
def test_dense_layouts_keep_their_strides(backend, layout):
    # As torch's dropout: the output has the input's strides; the mask runs in storage order.
    x = torch.rand(2, 6, 3, 5) + 0.5 if layout == "channels_last" else torch.rand(9, 14) + 0.5  # no zeros
    x = x.to(memory_format=torch.channels_last) if layout == "channels_last" else x.t()
    x.requires_grad_()
    dy = torch.randn_like(x)
    with fusedtech.use_backend(backend):
        y = F.dropout(x, 0.4)
        (dx,) = torch.autograd.grad(y, x, dy)
    assert y.stride() == torch.nn.functional.dropout(x, 0.4).stride() == x.stride()
    kept, scale = y != 0, torch.tensor(1 / 0.6, dtype=torch.float32)
    assert torch.equal(y[kept], (x * scale)[kept])
    assert torch.equal(dx, torch.where(kept, dy * scale, torch.zeros_like(dy)))


@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_func_grad_uses_the_forward_mask(backend):
    x = torch.rand(6, 7) + 0.5
    with fusedtech.use_backend(backend):
        torch.manual_seed(3)
        dx = torch.func.grad(lambda t: (F.dropout(t, 0.3) * t).sum())(x)  # d/dt (mask * t^2 / 0.7)
        torch.manual_seed(3)
        y = F.dropout(x, 0.3)
    scale = torch.tensor(1 / 0.7, dtype=torch.float32)
    assert torch.equal(dx != 0, y != 0)
    torch.testing.assert_close(dx, torch.where(y != 0, x * scale + y, 0.0))


def test_convert_model_keeps_a_dropouts_hooks_and_attributes():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Dropout(0.5))
    seen = []
    model[1].register_forward_hook(lambda m, i, o: seen.append(o.shape))
    model[1].tag = "kept"
    fusedtech.nn.convert_model(model)
    assert isinstance(model[1], fusedtech.nn.Dropout) and model[1].tag == "kept"
    model(torch.randn(2, 4))
    assert seen == [torch.Size([2, 4])]


def test_module_and_convert_model():
    t = torch.nn.Dropout(0.3)
    f = fusedtech.nn.Dropout(0.3)
    assert repr(t) == repr(f) and isinstance(f, torch.nn.Dropout)
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Dropout(0.2)).eval()
    fusedtech.nn.convert_model(model)
    assert type(model[1]) is fusedtech.nn.Dropout and not model[1].training and model[1].p == 0.2
    x = torch.randn(2, 4)
    assert torch.equal(model(x), model[0](x))


def test_opcheck_and_compile():
    if "cpu" not in BACKENDS:
        pytest.skip("cpu extension not built")
    from fusedtech.ops.dropout import dropout_apply
    x = torch.randn(5, 7, requires_grad=True)
    torch.library.opcheck(dropout_apply, (x, 0.3, torch.tensor([42])))
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), fusedtech.nn.Dropout(0.5))
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    out = compiled(torch.randn(4, 8))
    out.sum().backward()
    assert out.shape == (4, 8) and model[0].weight.grad is not None


def test_triton_kernel_compiles_for_sm80_sm90():
    import triton.language as tl
    from aot import compile_for_gpus
    from fusedtech.triton_kernels.dropout import _dropout_kernel
    compile_for_gpus(_dropout_kernel, {"x_ptr": "*bf16", "y_ptr": "*bf16", "seed_ptr": "*i64", "n": "i64",
                                       "threshold": "u32", "scale": "fp32"}, dict(DTYPE=tl.bfloat16, BLOCK=1024))


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_gpu_same_mask_as_cpu(backend):
    x = torch.randn(100_000)
    seed = torch.tensor([99])
    from fusedtech.ops.dropout import dropout_apply
    with fusedtech.use_backend("cpu"):
        cpu = dropout_apply(x, 0.3, seed)
    with fusedtech.use_backend(backend):
        gpu = dropout_apply(x.cuda(), 0.3, seed.cuda()).cpu()
    assert torch.equal(cpu, gpu)


def _unfused(x, r, w, b, p, seed, rms):
    from fusedtech.reference.dropout import keep_mask
    mask = keep_mask(x.shape, p, int(seed), x.device)
    s = torch.where(mask, x * torch.tensor(1 / (1 - p), dtype=torch.float32), 0.0) + r
    n = (x.shape[-1],)
    return (torch.nn.functional.rms_norm(s, n, w, 1e-5) if rms else torch.nn.functional.layer_norm(s, n, w, b, 1e-5)), s


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("rms", [False, True])
# Rows of 256 or fewer run a tile of rows per program ((300, 20): five tiles, the last partial),
# longer rows one row per program ((3, 300)).
@pytest.mark.parametrize("shape", [(4, 33), (2, 3, 128), (300, 20), (3, 300)], ids=str)
def test_dropout_add_layer_norm_equals_unfused_torch(backend, rms, shape):
    g = torch.Generator().manual_seed(0)
    x, r, dout, ds = (torch.randn(shape, generator=g) for _ in range(4))
    w, b = torch.randn(shape[-1], generator=g), (None if rms else torch.randn(shape[-1], generator=g))
    leaves = [t.clone().requires_grad_() for t in (x, r, w)] + ([b.clone().requires_grad_()] if b is not None else [])
    torch.manual_seed(5)
    seed = fusedtech.ops.dropout.new_seed(torch.device("cpu")).item()
    torch.manual_seed(5)
    with fusedtech.use_backend(backend):
        out, s = F.dropout_add_layer_norm(leaves[0], leaves[1], leaves[2], leaves[3] if b is not None else None,
                                          p=0.2, eps=1e-5, rms=rms, return_residual=True)
        grads = torch.autograd.grad([out, s], leaves, [dout, ds])
    ref_leaves = [t.clone().requires_grad_() for t in (x, r, w)] + ([b.clone().requires_grad_()] if b is not None else [])
    ref_out, ref_s = _unfused(*ref_leaves[:3], ref_leaves[3] if b is not None else None, 0.2, seed, rms)
    ref_grads = torch.autograd.grad([ref_out, ref_s], ref_leaves, [dout, ds])
    torch.testing.assert_close(s, ref_s, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-5)
    for a, c in zip(grads, ref_grads):
        torch.testing.assert_close(a, c, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("used", ["out", "sum"])
def test_dropout_add_layer_norm_one_output_used(backend, used):
    # Eager gradients are not materialised: the output that is not used gets None in backward.
    g = torch.Generator().manual_seed(1)
    x, r, w, b = (torch.randn(*s, generator=g) for s in ((3, 16), (3, 16), (16,), (16,)))
    leaves = [t.clone().requires_grad_() for t in (x, r, w, b)]
    ref_leaves = [t.clone().requires_grad_() for t in (x, r, w, b)]
    torch.manual_seed(3)
    seed = fusedtech.ops.dropout.new_seed(torch.device("cpu")).item()
    torch.manual_seed(3)
    with fusedtech.use_backend(backend):
        out, s = F.dropout_add_layer_norm(*leaves, p=0.3, return_residual=True)
    ref_out, ref_s = _unfused(*ref_leaves, 0.3, seed, False)
    pick = 0 if used == "out" else 1
    ((out, s)[pick] * 3).sum().backward()
    ((ref_out, ref_s)[pick] * 3).sum().backward()
    for a, c in zip(leaves, ref_leaves):
        if c.grad is None:
            assert a.grad is None or not a.grad.any()
        else:
            torch.testing.assert_close(a.grad, c.grad, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("rows,n", [(5, 33), (130, 33), (3, 257)], ids=str)
def test_dropout_add_norm_sum_is_the_oracles_bit_for_bit(backend, dtype, rows, n):
    # Rows of 33 (257): Philox blocks of four straddle rows. The sum is rounded exactly as the oracle
    # rounds it (dropout output first, then the add), so it matches bit for bit. (130, 33): tiles of
    # 32 rows (short-row kernel), the last partial; (3, 257): one row per program.
    from fusedtech.ops.dropout import _dan_impl, new_seed
    from fusedtech.reference.dropout import dropout_add_norm_fwd as oracle
    g = torch.Generator().manual_seed(7)
    x, r = (torch.randn(rows, n, generator=g).to(dtype) for _ in range(2))
    w, b = torch.randn(n, generator=g).to(dtype), torch.randn(n, generator=g).to(dtype)
    seed = new_seed(torch.device("cpu"))
    with fusedtech.use_backend(backend):
        out, s, mean, rstd = _dan_impl(x, r, w, b, 0.3, 1e-5, False, seed)
    ref_out, ref_s, ref_mean, ref_rstd = oracle(x, r, w, b, 0.3, 1e-5, False, seed)
    assert torch.equal(s, ref_s)
    torch.testing.assert_close(mean, ref_mean, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(rstd, ref_rstd, atol=1e-5, rtol=1e-5)
    tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]  # about one ulp at unit scale
    torch.testing.assert_close(out.float(), ref_out.float(), atol=tol, rtol=tol)


@pytest.mark.parametrize("backend", BACKENDS)
def test_dropout_add_layer_norm_saves_only_the_sum_and_statistics(backend):
    x, r = torch.randn(16, 64, requires_grad=True), torch.randn(16, 64, requires_grad=True)
    w, b = torch.randn(64, requires_grad=True), torch.randn(64, requires_grad=True)
    sizes = []
    with fusedtech.use_backend(backend), torch.autograd.graph.saved_tensors_hooks(
            lambda t: sizes.append(t.numel()) or t, lambda t: t):
        F.dropout_add_layer_norm(x, r, w, b, p=0.5).sum().backward()
    assert sum(1 for n in sizes if n == x.numel()) == 1  # the pre-norm sum; no mask, no copy of x
    assert x.grad is not None and r.grad is not None


def test_dropout_add_norm_kernel_compiles():
    import triton.language as tl
    from aot import compile_for_gpus
    from fusedtech.triton_kernels.dropout import _dropout_add_norm_kernel
    sig = {"x_ptr": "*bf16", "res_ptr": "*bf16", "w_ptr": "*bf16", "b_ptr": "*bf16", "out_ptr": "*bf16", "sum_ptr": "*bf16",
           "mean_ptr": "*fp32", "rstd_ptr": "*fp32", "seed_ptr": "*i64", "n": "i32", "eps": "fp32", "threshold": "u32",
           "scale": "fp32"}
    compile_for_gpus(_dropout_add_norm_kernel, sig, dict(DTYPE=tl.bfloat16, RMS=False, HAS_WEIGHT=True, HAS_BIAS=True,
                                                          BLOCK=4096))
    from fusedtech.triton_kernels.dropout import _dropout_add_norm_rows_kernel
    for rms, rows, block in ((False, 16, 128), (True, 2048, 1)):
        compile_for_gpus(_dropout_add_norm_rows_kernel, dict(sig, rows="i64"),
                         dict(DTYPE=tl.bfloat16, RMS=rms, HAS_WEIGHT=True, HAS_BIAS=not rms, ROWS=rows, BLOCK=block))


@pytest.mark.parametrize("rms", [False, True])
def test_dropout_add_layer_norm_module(rms):
    m = fusedtech.nn.DropoutAddLayerNorm(32, p=0.1, rms=rms)
    with torch.no_grad():
        m.weight.uniform_(0.5, 1.5)
    x, r = torch.randn(4, 32), torch.randn(4, 32)

    def norm(t):
        if rms:
            return torch.nn.functional.rms_norm(t, (32,), m.weight, m.eps)
        return torch.nn.functional.layer_norm(t, (32,), m.weight, m.bias, m.eps)

    torch.manual_seed(2)
    seed = fusedtech.ops.dropout.new_seed(torch.device("cpu"))
    torch.manual_seed(2)
    out, s = m(x, r, return_residual=True)  # training: the mask of the seed drawn here
    dropped = dropout_apply(x, 0.1, seed)
    torch.testing.assert_close(s, dropped + r, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(out, norm(dropped + r), atol=1e-5, rtol=1e-5)
    m.eval()
    torch.testing.assert_close(m(x, r), norm(x + r), atol=1e-5, rtol=1e-5)
    out, s = m(x, r, return_residual=True)
    torch.testing.assert_close(s, x + r)
    assert repr(m) == f"DropoutAddLayerNorm(32, p=0.1, eps=1e-05, rms={rms})"
    with pytest.raises(ValueError, match="between 0 and 1"):
        fusedtech.nn.DropoutAddLayerNorm(8, p=1.5)
    assert repr(fusedtech.nn.DropoutAddLayerNorm(8, elementwise_affine=False)).startswith("DropoutAddLayerNorm(8,")


@pytest.mark.parametrize("backend", BACKENDS)
def test_dropout_add_layer_norm_edges_match_the_composition(backend):
    g = torch.Generator().manual_seed(4)
    x, r, w, b = (torch.randn(*shape, generator=g) for shape in ((3, 8), (3, 8), (8,), (8,)))
    with fusedtech.use_backend(backend):
        # Eval (and p = 0) draws nothing from torch's generator, as torch's dropout.
        state = torch.get_rng_state()
        evaluated = F.dropout_add_layer_norm(x, r, w, b, 0.5, training=False)
        assert torch.equal(torch.get_rng_state(), state)
        torch.testing.assert_close(evaluated, torch.nn.functional.layer_norm(x + r, (8,), w, b), atol=1e-5, rtol=1e-5)
        # p = 1 drops all of x: norm(residual); residual None: norm(dropout(x)) (here p = 0).
        torch.testing.assert_close(F.dropout_add_layer_norm(x, r, w, b, 1.0),
                                   torch.nn.functional.layer_norm(r, (8,), w, b), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(F.dropout_add_layer_norm(x, None, w, b, 0.0),
                                   torch.nn.functional.layer_norm(x, (8,), w, b), atol=1e-5, rtol=1e-5)
        # A residual of another dtype: the sum in the promoted type, as dropout(x) + residual.
        out, s = F.dropout_add_layer_norm(x.bfloat16(), r, w, b, 0.0, return_residual=True)
        assert out.dtype == s.dtype == torch.float32
        torch.testing.assert_close(s, x.bfloat16().float() + r)
        for bad, match in (((torch.ones(3), b), "weight must have shape"), ((w, torch.zeros(16)), "bias must have shape"),
                           ((w.view(1, 8), b), "weight must have shape")):
            with pytest.raises(RuntimeError, match=match):
                F.dropout_add_layer_norm(x, r, *bad, 0.1)
        with pytest.raises(RuntimeError, match="normalises the last dimension"):
            F.dropout_add_layer_norm(torch.randn(4, 0), torch.randn(4, 0), None, None, 0.1)
        with pytest.raises(RuntimeError, match="normalises the last dimension"):
            F.dropout_add_layer_norm(torch.tensor(1.0), torch.tensor(2.0), None, None, 0.1)
        with pytest.raises(ValueError, match="between 0 and 1"):
            F.dropout_add_layer_norm(x, r, w, b, 1.5, training=False)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("rows,n", [(300, 3), (2, 300)])  # a tile of short rows; one row a program
def test_dropout_add_layer_norm_constant_rows_give_the_bias(backend, rows, n):
    # The shifted mean (as layer_norm's): a constant sum of large magnitude normalises to 0, not to
    # its mean's rounding error over sqrt(eps).
    w, b = torch.rand(n) + 0.5, torch.randn(n)
    x, r = torch.full((rows, n), 20000.25), torch.full((rows, n), 10000.05)
    with fusedtech.use_backend(backend):
        out = F.dropout_add_layer_norm(x, r, w, b, 0.0)
    assert torch.equal(out, b.expand(rows, n))


@pytest.mark.parametrize("backend", [b for b in ("torch", "cpu") if b in BACKENDS])
@pytest.mark.parametrize("rms", [False, True])
def test_dropout_add_layer_norm_gradgradcheck(backend, rms):
    # Double backward: the norm's backward is recorded with torch ops, the dropout's is itself.
    g = torch.Generator().manual_seed(6)
    leaves = [torch.randn(*shape, generator=g, dtype=torch.float64).requires_grad_()
              for shape in ((3, 8), (3, 8), (8,), (8,))]

    def fn(x, r, w, b):
        torch.manual_seed(9)
        return F.dropout_add_layer_norm(x, r, w, b, 0.3, rms=rms, return_residual=True)

    with fusedtech.use_backend(backend):
        assert torch.autograd.gradgradcheck(fn, leaves)


@pytest.mark.parametrize("backend", [b for b in ("torch", "cpu") if b in cpu_backends()])
def test_dropout_gradgradcheck_with_a_fixed_seed(backend):
    # The backward is the same masked scaling, itself differentiable when create_graph records it;
    # without create_graph it runs the kernel with no autograd node (the same mask either way).
    from fusedtech.ops.dropout import dropout
    x = torch.randn(5, 7, dtype=torch.float64, requires_grad=True)
    seed = torch.tensor([1234], dtype=torch.int64)
    with fusedtech.use_backend(backend):
        assert torch.autograd.gradcheck(lambda t: dropout(t, 0.3, seed), (x,))
        assert torch.autograd.gradgradcheck(lambda t: dropout(t, 0.3, seed), (x,))
        dy = torch.randn(5, 7, dtype=torch.float64, requires_grad=True)  # dx depends on dy only
        (plain,) = torch.autograd.grad(dropout(x, 0.3, seed), x, dy)
        (recorded,) = torch.autograd.grad(dropout(x, 0.3, seed), x, dy, create_graph=True)
    assert not plain.requires_grad and recorded.requires_grad
    assert torch.equal(plain, recorded.detach())


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("n", [33, 1024, 5000])
def test_gpu_dropout_add_norm_matches_the_oracle(backend, dtype, n):
    # The same mask and the same rounding of the sum as the oracle (bit for bit); the normalised
    # output within about one ulp; the backward (LayerNorm's, then dropout's) against the CPU's.
    from fusedtech.ops.dropout import _dan_impl, new_seed
    from fusedtech.reference.dropout import dropout_add_norm_fwd as oracle
    g = torch.Generator().manual_seed(11)
    rows = 300 if n <= 256 else 7  # short rows: several tiles of rows, the last partial
    x, r = (torch.randn(rows, n, generator=g).to(dtype) for _ in range(2))
    w, b = torch.randn(n, generator=g).to(dtype), torch.randn(n, generator=g).to(dtype)
    seed = new_seed(torch.device("cpu"))
    with fusedtech.use_backend(backend):
        out, s, mean, rstd = _dan_impl(x.cuda(), r.cuda(), w.cuda(), b.cuda(), 0.3, 1e-5, False, seed.cuda())
    ref_out, ref_s, ref_mean, ref_rstd = oracle(x, r, w, b, 0.3, 1e-5, False, seed)
    assert torch.equal(s.cpu(), ref_s)
    torch.testing.assert_close(mean.cpu(), ref_mean, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(rstd.cpu(), ref_rstd, atol=1e-5, rtol=1e-5)
    tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]
    torch.testing.assert_close(out.cpu().float(), ref_out.float(), atol=tol, rtol=tol)


# ---- non-finite values at dropped positions: a product with the mask, as torch -----------------

def _non_finite(shape):
    """NaN, +inf and -inf in turn: a dropped element is NaN (0 * inf) for torch, never 0."""
    x = torch.full(shape, float("nan"))
    x.view(-1)[1::3] = float("inf")
    x.view(-1)[2::3] = -float("inf")
    return x


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_dropped_nan_and_inf_come_out_nan_forward_and_backward_as_torch(backend, dtype):
    x = _non_finite((3, 257)).to(dtype).requires_grad_()
    dy = _non_finite((3, 257)).to(dtype)
    expected_y = torch.nn.functional.dropout(x, 0.5)
    (expected_dx,) = torch.autograd.grad(expected_y, x, dy)
    assert not (expected_y == 0).any() and not (expected_dx == 0).any()  # torch's contract
    with fusedtech.use_backend(backend):
        y = F.dropout(x, 0.5)
        (dx,) = torch.autograd.grad(y, x, dy)
    dropped = torch.isnan(y) & ~torch.isnan(x)
    assert dropped.any()  # some infinities were dropped
    assert not (y == 0).any() and not (dx == 0).any()
    kept = ~torch.isnan(y)
    assert torch.equal(y[kept], x[kept]) and torch.equal(torch.isnan(dx), torch.isnan(y) | torch.isnan(dy))


def _first_dropped(p, shape, seed_from):
    """The index of the first dropped element of each row for the seed dropout draws after
    torch.manual_seed(seed_from) (new_seed: one randint from torch's generator)."""
    from fusedtech.reference.dropout import keep_mask
    torch.manual_seed(seed_from)
    seed = int(torch.randint(0, 2 ** 62, (1,), dtype=torch.int64).item())
    keep = keep_mask(shape, p, seed, "cpu")
    return [int((~keep[r]).nonzero()[0]) for r in range(shape[0])]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("rms", [False, True])
def test_dropout_add_norm_row_with_a_dropped_nan_is_nan_as_torchs_composition(backend, rms):
    shape, p = (4, 40), 0.3
    x, res = torch.randn(shape), torch.randn(shape)
    cols = _first_dropped(p, shape, 7)
    x[0, cols[0]], x[1, cols[1]] = float("nan"), float("nan")  # only at dropped positions
    w, b = torch.rand(40) + 0.5, torch.randn(40)
    torch.manual_seed(7)
    with fusedtech.use_backend(backend):
        out = F.dropout_add_layer_norm(x, res, w, None if rms else b, p=p, rms=rms)
    s = torch.nn.functional.dropout(x, p) + res  # torch's composition (its own mask): rows 0 and 1 NaN
    ref = (torch.nn.functional.rms_norm(s, (40,), w) if rms else torch.nn.functional.layer_norm(s, (40,), w, b))
    assert torch.isnan(ref[:2]).all() and torch.isnan(out[:2]).all()
    assert torch.isfinite(out[2:]).all()
