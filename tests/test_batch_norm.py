"""Fused BatchNorm1d/2d against torch.nn.BatchNorm1d/2d: forward, backward (input, weight, bias),
running statistics over several training steps and then eval, on every CPU backend.

Tolerances: fp32 atol 1e-5, rtol 1e-5 (our statistics are double, torch's CPU kernel accumulates
its own way); fp16/bf16 are compared with a float64 computation and our error must be within
twice torch's own error in that dtype plus 2e-3 (fp16) / 1.6e-2 (bf16), about two ulps at unit scale.
"""
from __future__ import annotations

import copy

import pytest
import torch

import fusedtech
from conftest import cpu_backends

BACKENDS = cpu_backends()
TOL32 = dict(atol=1e-5, rtol=1e-5)
ATOL = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
CASES = [(torch.nn.BatchNorm1d, fusedtech.nn.BatchNorm1d, (8, 5)), (torch.nn.BatchNorm1d, fusedtech.nn.BatchNorm1d, (4, 3, 7)),
         (torch.nn.BatchNorm2d, fusedtech.nn.BatchNorm2d, (3, 4, 5, 6)), (torch.nn.BatchNorm2d, fusedtech.nn.BatchNorm2d, (2, 3, 1, 1)),
         # More than one Triton block per channel: statistics and gradient sums split into slices, the last partial.
         (torch.nn.BatchNorm2d, fusedtech.nn.BatchNorm2d, (5, 3, 17, 19)), (torch.nn.BatchNorm1d, fusedtech.nn.BatchNorm1d, (3000, 2))]


def _ids(c):
    return f"{c[0].__name__}{c[2]}"


LAYOUTS = [(c, cl) for c in CASES for cl in ((False, True) if len(c[2]) == 4 else (False,))]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case,channels_last", LAYOUTS, ids=[_ids(c) + ("-channels_last" if cl else "") for c, cl in LAYOUTS])
@pytest.mark.parametrize("affine,track,momentum", [(True, True, 0.1), (False, True, None), (True, False, 0.1)])
def test_matches_torch_over_steps_then_eval(backend, case, channels_last, affine, track, momentum):
    torch_cls, fused_cls, shape = case
    t = torch_cls(shape[1], affine=affine, track_running_stats=track, momentum=momentum)
    f = fused_cls(shape[1], affine=affine, track_running_stats=track, momentum=momentum)
    g = torch.Generator().manual_seed(0)
    for step in range(4):
        x = torch.randn(shape, generator=g) * 3 + 1
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        dy = torch.randn(shape, generator=g)
        xt, xf = x.clone().requires_grad_(), x.clone().requires_grad_()
        yt = t(xt)
        with fusedtech.use_backend(backend):
            yf = f(xf)
            gf = torch.autograd.grad(yf, [xf] + list(f.parameters()), dy)
        gt = torch.autograd.grad(yt, [xt] + list(t.parameters()), dy)
        torch.testing.assert_close(yf, yt, **TOL32)
        for a, b in zip(gf, gt):
            torch.testing.assert_close(a, b, **TOL32)
        if channels_last:
            assert yf.is_contiguous(memory_format=torch.channels_last)
    for name, buf in t.named_buffers():
        torch.testing.assert_close(dict(f.named_buffers())[name], buf, **TOL32)
    t.eval(), f.eval()
    x = torch.randn(shape, generator=g)
    with fusedtech.use_backend(backend):
        torch.testing.assert_close(f(x), t(x), **TOL32)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_low_precision_within_twice_torchs_error(backend, dtype):
    g = torch.Generator().manual_seed(1)
    x = (torch.randn(6, 4, 5, 5, generator=g) * 2).to(dtype)
    dy = torch.randn(6, 4, 5, 5, generator=g).to(dtype)
    exact_m = torch.nn.BatchNorm2d(4).double()
    xe = x.double().requires_grad_()
    ye = exact_m(xe)
    (ge,) = torch.autograd.grad(ye, xe, dy.double())
    f = fusedtech.nn.BatchNorm2d(4).to(dtype)
    xf = x.clone().requires_grad_()
    with fusedtech.use_backend(backend):
        yf = f(xf)
        (gf,) = torch.autograd.grad(yf, xf, dy)
    try:
        t = torch.nn.BatchNorm2d(4).to(dtype)
        xt = x.clone().requires_grad_()
        yt = t(xt)
        (gt,) = torch.autograd.grad(yt, xt, dy)
        ref = [(yt.double() - ye).abs().max().item(), (gt.double() - ge).abs().max().item()]
    except RuntimeError:  # torch's CPU kernel lacks this dtype: judge against float64 alone
        ref = [0.0, 0.0]
    ours = [(yf.double() - ye).abs().max().item(), (gf.double() - ge).abs().max().item()]
    for o, r in zip(ours, ref):
        assert o <= 2 * r + ATOL[dtype], (ours, ref)


def test_one_value_per_channel_in_training_is_refused_like_torch():
    x = torch.randn(1, 3)
    with pytest.raises(ValueError) as expected:
        torch.nn.BatchNorm1d(3)(x)
    with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
        fusedtech.nn.BatchNorm1d(3)(x)
    for backend in BACKENDS:  # N*H*W = 1 is fine in eval: the running statistics normalise
        t = torch.nn.BatchNorm2d(3).eval()
        with torch.no_grad():
            t.running_mean.uniform_(-1, 1), t.running_var.uniform_(0.5, 2), t.weight.uniform_(0.5, 2)
        m = fusedtech.nn.BatchNorm2d(3).eval()
        m.load_state_dict(t.state_dict())
        one = torch.randn(1, 3, 1, 1)
        with fusedtech.use_backend(backend):
            torch.testing.assert_close(m(one), t(one), **TOL32)
    assert "Expected more than 1 value per channel" in str(expected.value)


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b in ("torch", "cpu")])  # Triton: no fp64 kernels
def test_gradcheck_float64(backend):
    m = fusedtech.nn.BatchNorm2d(3).double()
    x = torch.randn(2, 3, 2, 3, dtype=torch.float64, requires_grad=True)
    with fusedtech.use_backend(backend):
        assert torch.autograd.gradcheck(lambda x, w, b: torch.nn.functional.relu(m(x)) * 1.0, (x, m.weight, m.bias))


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b in ("torch", "cpu")])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("activation", [None, "relu", "gelu", "silu", "none"])
def test_gradcheck_and_gradgradcheck_float64(backend, training, activation):
    # Double backward (a gradient penalty) is torch's BatchNorm's too; with a residual for the act.
    g = torch.Generator().manual_seed(3)
    x, r = (torch.randn(3, 2, 2, 3, dtype=torch.float64, generator=g, requires_grad=True) for _ in range(2))
    w, b = (torch.randn(2, dtype=torch.float64, generator=g, requires_grad=True) for _ in range(2))
    rm, rv = torch.randn(2, dtype=torch.float64, generator=g), torch.rand(2, dtype=torch.float64, generator=g) + 0.5
    F = fusedtech.nn.functional
    if activation is None:
        fn, inputs = (lambda x, w, b: F.batch_norm(x, rm, rv, w, b, training)), (x, w, b)
    else:
        fn, inputs = (lambda x, w, b, r: F.batch_norm_act(x, rm, rv, w, b, training, activation=activation,
                                                          residual=r)), (x, w, b, r)
    with fusedtech.use_backend(backend):
        assert torch.autograd.gradcheck(fn, inputs)
        assert torch.autograd.gradgradcheck(fn, inputs)


@pytest.mark.parametrize("backend", BACKENDS)
def test_double_backward_matches_torch(backend):
    g = torch.Generator().manual_seed(4)
    x, w, b = torch.randn(4, 3, 2, 3, generator=g), torch.randn(3, generator=g), torch.randn(3, generator=g)

    def penalty(fn, x, w, b):
        x, w = x.clone().requires_grad_(), w.clone().requires_grad_()
        (gx,) = torch.autograd.grad(fn(x, w, b).pow(3).sum(), x, create_graph=True)
        return torch.autograd.grad(gx.square().sum(), (x, w))

    with fusedtech.use_backend(backend):
        ours = penalty(lambda x, w, b: fusedtech.nn.functional.batch_norm(x, None, None, w, b, True), x, w, b)
    exact = penalty(lambda x, w, b: torch.nn.functional.batch_norm(x, None, None, w, b, True), x.double(), w.double(),
                    b.double())
    theirs = penalty(lambda x, w, b: torch.nn.functional.batch_norm(x, None, None, w, b, True), x, w, b)
    for o, t, e in zip(ours, theirs, exact):
        scale = e.abs().max().item()
        err, budget = (o.double() - e).abs().max().item() / scale, (t.double() - e).abs().max().item() / scale
        assert err <= 2 * budget + 1e-5, (err, budget)


@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_func_grad_matches_torch(backend):
    g = torch.Generator().manual_seed(7)
    x, w = torch.randn(4, 3, 2, 3, generator=g), torch.randn(3, generator=g)
    F = fusedtech.nn.functional
    with fusedtech.use_backend(backend):
        ours = torch.func.grad(lambda x, w: F.batch_norm_act(x, None, None, w, None, True, activation="gelu")
                               .pow(2).sum(), argnums=(0, 1))(x, w)
    theirs = torch.func.grad(lambda x, w: torch.nn.functional.gelu(torch.nn.functional.batch_norm(
        x, None, None, w, None, True)).pow(2).sum(), argnums=(0, 1))(x, w)
    for o, t in zip(ours, theirs):
        torch.testing.assert_close(o, t, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_weight_and_bias(backend):
    # Per-channel vectors that are views (w[::2], an expanded scalar) are read by their strides.
    g = torch.Generator().manual_seed(5)
    x = torch.randn(3, 4, 2, 3, generator=g, requires_grad=True)
    for w, b in ((torch.randn(8, generator=g)[::2], torch.randn(8, generator=g)[1::2]),
                 (torch.tensor([2.0]).expand(4), torch.tensor([0.5]).expand(4))):
        with fusedtech.use_backend(backend):
            ours = fusedtech.nn.functional.batch_norm(x, None, None, w, b, True)
            (dx,) = torch.autograd.grad(ours.pow(2).sum(), x)
        theirs = torch.nn.functional.batch_norm(x, None, None, w, b, True)
        (tdx,) = torch.autograd.grad(theirs.pow(2).sum(), x)
        torch.testing.assert_close(ours, theirs, **TOL32)
        torch.testing.assert_close(dx, tdx, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_argument_errors_like_torchs(backend):
    F, x = fusedtech.nn.functional, torch.randn(4, 3)
    with fusedtech.use_backend(backend):
        for fn in (F.batch_norm, F.batch_norm_act):
            with pytest.raises(ValueError, match="must either both be None or neither be None"):
                fn(x, torch.zeros(3), None, training=True)
            with pytest.raises(RuntimeError, match="running_mean must be defined in evaluation mode"):
                fn(x, None, None, training=False)
        with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
            F.batch_norm(torch.randn(1, 0, 1), None, None, training=True)  # torch's count ignores C
        for fn in (F.batch_norm, F.batch_norm_act):
            with pytest.raises(TypeError, match="floating-point input, got torch.int64"):
                fn(torch.arange(12).view(4, 3), None, None, training=True)
    with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
        torch.nn.functional.batch_norm(torch.randn(1, 0, 1), None, None, training=True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_batch_norm_act_residual_of_another_dtype_promotes(backend):
    # As bn(x) + residual: a bf16 input with an fp32 residual gives an fp32 output.
    g = torch.Generator().manual_seed(6)
    x, r = torch.randn(4, 3, 2, 2, generator=g).bfloat16(), torch.randn(4, 3, 2, 2, generator=g)
    with fusedtech.use_backend(backend):
        out = fusedtech.nn.functional.batch_norm_act(x, None, None, training=True, activation="relu", residual=r)
    expected = torch.relu(torch.nn.functional.batch_norm(x.float(), None, None, training=True) + r)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, expected, **TOL32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_deterministic(backend):
    x = torch.randn(16, 8, 9, 9, requires_grad=True)
    m = fusedtech.nn.BatchNorm2d(8)
    dy = torch.randn_like(x)
    with fusedtech.use_backend(backend):
        a = torch.autograd.grad(m(x), [x, m.weight], dy)
        b = torch.autograd.grad(m(x), [x, m.weight], dy)
    assert all(torch.equal(u, v) for u, v in zip(a, b))


def test_opcheck_and_compile():
    from fusedtech.ops.batch_norm import batch_norm_bwd, batch_norm_fwd
    x = torch.randn(4, 3, 5, requires_grad=True)
    w, b = torch.randn(3, requires_grad=True), torch.randn(3, requires_grad=True)
    torch.library.opcheck(batch_norm_fwd, (x, w, b, None, None, True, 1e-5))
    torch.library.opcheck(batch_norm_fwd, (x, w, b, torch.zeros(3), torch.ones(3), False, 1e-5))
    _, mean, invstd, _ = batch_norm_fwd(x.detach(), w.detach(), b.detach(), None, None, True, 1e-5)
    torch.library.opcheck(batch_norm_bwd, (torch.randn(4, 3, 5), x.detach(), w.detach(), mean, invstd, True))
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), fusedtech.nn.BatchNorm2d(4), torch.nn.ReLU())
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    out = compiled(torch.randn(2, 3, 8, 8))
    out.sum().backward()
    assert model[1].num_batches_tracked.item() == 1 and model[1].weight.grad is not None


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("channels_last", [False, True])
def test_opcheck_on_every_backend(backend, channels_last):
    # The ops' outputs may not alias one another (dweight and dbias were views of one sum on the
    # Triton backend), whichever backend implements them.
    from fusedtech.ops.batch_norm import batch_norm_act_bwd, batch_norm_act_fwd, batch_norm_bwd, batch_norm_fwd
    g = torch.Generator().manual_seed(2)
    x, r, dy = (torch.randn(4, 3, 4, 2, generator=g) for _ in range(3))
    if channels_last:
        x, r, dy = (t.contiguous(memory_format=torch.channels_last) for t in (x, r, dy))
    w, b = torch.randn(3, generator=g), torch.randn(3, generator=g)
    with fusedtech.use_backend(backend):
        torch.library.opcheck(batch_norm_fwd, (x, w, b, None, None, True, 1e-5))
        _, mean, invstd, _ = batch_norm_fwd(x, w, b, None, None, True, 1e-5)
        torch.library.opcheck(batch_norm_bwd, (dy, x, w, mean, invstd, True))
        torch.library.opcheck(batch_norm_act_fwd, (x, w, b, None, None, r, True, 1e-5, "relu"))
        _, mean, invstd, _, bits = batch_norm_act_fwd(x, w, b, None, None, r, True, 1e-5, "relu")
        torch.library.opcheck(batch_norm_act_bwd, (dy, x, w, b, mean, invstd, bits, True, 1, True))
        torch.library.opcheck(batch_norm_act_bwd, (dy, x, w, b, mean, invstd, r, True, 2, True))


def test_convert_model_on_a_small_cnn():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.ReLU(), torch.nn.Flatten(),
                                torch.nn.Linear(8 * 6 * 6, 10), torch.nn.BatchNorm1d(10), torch.nn.Dropout(0.0))
    reference = copy.deepcopy(model)  # the torch modules, kept unconverted
    keys = model.state_dict().keys()
    _, report = fusedtech.nn.convert_model(model, return_report=True)
    assert report["replaced"] == {"BatchNorm2d": 1, "BatchNorm1d": 1, "Dropout": 1}
    assert model.state_dict().keys() == keys
    x = torch.randn(4, 3, 8, 8)
    y1, y2 = model(x), reference(x)
    torch.testing.assert_close(y1, y2, **TOL32)
    # Not y.sum(): after a training BatchNorm its gradient upstream is zero up to rounding, and any
    # backward would pass. A random projection gives the parameters gradients of order one (but
    # for the biases in front of a BatchNorm, which it cancels: zero up to rounding for torch too).
    dy = torch.randn(y1.shape, generator=torch.Generator().manual_seed(1))
    y1.backward(dy), y2.backward(dy)
    for (name, a), b in zip(model.named_parameters(), reference.parameters()):
        assert name in ("0.bias", "4.bias") or b.grad.abs().max() > 0.1, name
        torch.testing.assert_close(a.grad, b.grad, atol=1e-5, rtol=1e-4)
    model.load_state_dict(torch.nn.Sequential(*[copy.deepcopy(m) for m in reference]).state_dict())
    model.eval(), reference.eval()
    torch.testing.assert_close(model(x), reference(x), **TOL32)


@pytest.mark.parametrize("make", [lambda: torch.nn.BatchNorm2d(5), lambda: torch.nn.LayerNorm(7), lambda: torch.nn.Dropout(0.2)],
                         ids=["BatchNorm2d", "LayerNorm", "Dropout"])
def test_convert_model_replaces_a_bare_module(make):
    # The model may itself be the module to replace: it comes back fused, sharing its parameters.
    module = make()
    converted, report = fusedtech.nn.convert_model(module, return_report=True)
    assert converted is not module and type(converted).__module__.startswith("fusedtech.nn")
    assert report["replaced"] == {type(module).__name__: 1}
    assert converted.state_dict().keys() == module.state_dict().keys()
    for a, b in zip(converted.parameters(), module.parameters()):
        assert a is b


def test_triton_kernels_compile_for_sm80_sm90():
    import triton.language as tl
    from aot import compile_for_gpus
    from fusedtech.triton_kernels import batch_norm as k
    # Sizes come as divisor() tuples (size, magic, shift1, shift2), split with multiply-high unless WIDE.
    size_S = {"S": "i32", "S_m": "u32", "S_1": "i32", "S_2": "i32"}
    size_C = {"C": "i32", "C_m": "u32", "C_1": "i32", "C_2": "i32"}
    view = {**size_S, "sN": "i64", "sC": "i64", "sS": "i64"}
    compile_for_gpus(k._stats_kernel, {"x_ptr": "*bf16", "part_ptr": "*fp32", "NS": "i64", **view, "CHUNK": "i64",
                                       "SPLIT": "i64"}, dict(WIDE=False, BLOCK=1024))
    compile_for_gpus(k._stats_combine_kernel, {"part_ptr": "*fp32", "mean_ptr": "*fp32", "invstd_ptr": "*fp32",
                                               "unbiased_ptr": "*fp32", "SPLIT": "i64", "eps": "fp32"}, {})
    per_channel = {"mean_ptr": "*fp32", "invstd_ptr": "*fp32"}
    # channels_last: [rows, channels] tiles (64 channels: 32 rows a tile; 128+: 16)
    rows = {"R": "i64", "C": "i32"}
    compile_for_gpus(k._stats_rows_kernel, {"x_ptr": "*bf16", "part_ptr": "*fp32", **rows, "CHUNK": "i64",
                                            "SPLIT": "i64"}, dict(BLOCK_R=32, BLOCK_C=64))
    # ReLU's mask read a byte per 8 rows (S % 8 == 0, BYTE_ROWS) and a bit per element (any S).
    for act, has_res, tile, byte_rows in ((0, False, (32, 64), False), (1, True, (16, 128), True),
                                          (1, False, (32, 64), False), (2, True, (32, 64), False),
                                          (3, False, (256, 8), False)):
        block = dict(BLOCK_R=tile[0], BLOCK_C=tile[1])
        compiled = compile_for_gpus(
            k._apply_rows_kernel, {"x_ptr": "*bf16", "y_ptr": "*bf16", **per_channel, "w_ptr": "*bf16",
                                   "b_ptr": "*bf16", "res_ptr": "*bf16", "bits_ptr": "*u8", **rows, **size_S},
            dict(DTYPE=tl.bfloat16, HAS_WEIGHT=True, HAS_BIAS=True, HAS_RES=has_res, ACT=act, WIDE=False, **block))
        flags = dict(HAS_WEIGHT=True, HAS_BIAS=True, LOAD_RES=has_res and act >= 2, ACT=act, BYTE_ROWS=byte_rows,
                     WIDE=False)
        compiled += compile_for_gpus(
            k._bwd_reduce_rows_kernel, {"dy_ptr": "*bf16", "x_ptr": "*bf16", **per_channel, "w_ptr": "*bf16",
                                        "b_ptr": "*bf16", "res_ptr": "*bf16", "bits_ptr": "*u8", "part_ptr": "*fp32",
                                        **rows, **size_S, "CHUNK": "i64", "SPLIT": "i64"}, dict(**block, **flags))
        compiled += compile_for_gpus(
            k._bwd_apply_rows_kernel, {"dy_ptr": "*fp16", "x_ptr": "*fp16", "dx_ptr": "*fp16", "dres_ptr": "*fp16",
                                       **per_channel, "w_ptr": "*fp16", "b_ptr": "*fp16", "res_ptr": "*fp16",
                                       "bits_ptr": "*u8", "sum_dy_ptr": "*fp32", "sum_dy_xhat_ptr": "*fp32", **rows,
                                       **size_S, "count": "fp32"},
            dict(DTYPE=tl.float16, WRITE_DRES=has_res, TRAINING=True, **block, **flags))
        assert not any("div.s64" in c.asm["ptx"] or "rem.s64" in c.asm["ptx"] for c in compiled)
    for act, has_res, wide in ((0, False, False), (1, True, False), (2, False, True), (3, True, False)):
        compiled = compile_for_gpus(
            k._apply_kernel, {"x_ptr": "*bf16", "y_ptr": "*bf16", **per_channel, "w_ptr": "*bf16", "b_ptr": "*bf16",
                              "res_ptr": "*bf16", "bits_ptr": "*u8", "total": "i64", **size_C, **view},
            dict(DTYPE=tl.bfloat16, HAS_WEIGHT=True, HAS_BIAS=True, HAS_RES=has_res, ACT=act, WIDE=wide, BLOCK=1024))
        # Below 2^32 elements no index is divided by a runtime size (a long emulated routine).
        assert all(("div.s64" in c.asm["ptx"] or "rem.s64" in c.asm["ptx"]) == wide for c in compiled)
        flags = dict(HAS_WEIGHT=True, HAS_BIAS=act != 3, LOAD_RES=has_res and act >= 2, ACT=act, WIDE=wide)
        compile_for_gpus(k._bwd_reduce_kernel, {"dy_ptr": "*fp32", "x_ptr": "*fp32", **per_channel, "w_ptr": "*fp32",
                                                "b_ptr": "*fp32", "res_ptr": "*fp32", "bits_ptr": "*u8",
                                                "part_ptr": "*fp32", "NS": "i64", **view, "CHUNK": "i64", "SPLIT": "i64"},
                         dict(BLOCK=1024, **flags))
        compile_for_gpus(k._bwd_apply_kernel, {"dy_ptr": "*fp16", "x_ptr": "*fp16", "dx_ptr": "*fp16", "dres_ptr": "*fp16",
                                               **per_channel, "w_ptr": "*fp16", "b_ptr": "*fp16", "res_ptr": "*fp16",
                                               "bits_ptr": "*u8", "sum_dy_ptr": "*fp32", "sum_dy_xhat_ptr": "*fp32",
                                               "total": "i64", **size_C, **view, "count": "fp32"},
                         dict(DTYPE=tl.float16, WRITE_DRES=has_res, TRAINING=True, BLOCK=1024, **flags))


@pytest.mark.gpu
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_gpu_triton_matches_torch(channels_last, dtype):
    t, f = torch.nn.BatchNorm2d(64).cuda(), fusedtech.nn.BatchNorm2d(64).cuda()
    x = torch.randn(32, 64, 16, 16, device="cuda")
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with fusedtech.use_backend("triton"):
        y = f(x.to(dtype))
    torch.testing.assert_close(y.float(), t(x), atol=1.6e-2 if dtype == torch.bfloat16 else 1e-5, rtol=1e-2)


ACTS = {"relu": torch.nn.ReLU(), "gelu": torch.nn.GELU(), "silu": torch.nn.SiLU()}


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("activation,with_residual", [(None, False), ("relu", False), ("relu", True), ("gelu", True),
                                                      ("silu", False)])
def test_gpu_forward_backward_within_twice_torchs_error(backend, channels_last, dtype, activation, with_residual):
    # The Triton and the CUDA C++ kernels, forward and backward, against a float64 computation;
    # torch's own CUDA BatchNorm (+ add + activation) in the same
    # dtype sets the error budget: ours within twice torch's plus about one ulp at unit scale.
    g = torch.Generator(device="cuda").manual_seed(0)
    shape = (16, 48, 13, 11)  # 2288 elements per channel: several Triton blocks, a partial last one
    x, r, dy = ((torch.randn(shape, device="cuda", generator=g) * 2 + 0.5).to(dtype) for _ in range(3))
    if channels_last:
        x, r, dy = (t.contiguous(memory_format=torch.channels_last) for t in (x, r, dy))
    act = ACTS[activation] if activation else torch.nn.Identity()

    def run(bn, fused, xs, rs, dys):
        xg, rg = xs.clone().requires_grad_(), rs.clone().requires_grad_()
        y = bn(xg, rg if with_residual else None) if fused else act(bn(xg) + (rg if with_residual else 0))
        inputs = [xg, bn.weight, bn.bias] + ([rg] if with_residual else [])
        return [y, *torch.autograd.grad(y, inputs, dys)], bn

    exact, exact_bn = run(torch.nn.BatchNorm2d(48).cuda().double(), False, x.double(), r.double(), dy.double())
    fused_cls = (lambda c: fusedtech.nn.BatchNormAct2d(c, activation=activation)) if activation else fusedtech.nn.BatchNorm2d
    with fusedtech.use_backend(backend):
        if activation or with_residual:
            ours, ours_bn = run(fused_cls(48).cuda().to(dtype), True, x, r, dy)
        else:
            ours, ours_bn = run(fused_cls(48).cuda().to(dtype), False, x, r, dy)
    ref, _ = run(torch.nn.BatchNorm2d(48).cuda().to(dtype), False, x, r, dy)
    atol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]
    for name, o, t, e in zip(["y", "dx", "dweight", "dbias", "dresidual"], ours, ref, exact):
        err, budget = (o.double() - e).abs().max().item(), (t.double() - e).abs().max().item()
        scale = max(1.0, e.abs().max().item()) if name in ("dweight", "dbias") else 1.0  # sums over 2288 x 16
        assert err <= 2 * budget + atol * scale, (name, err, budget)
    torch.testing.assert_close(ours_bn.running_var.double(), exact_bn.running_var, atol=atol, rtol=1e-2)
    if channels_last:
        assert ours[0].is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("activation", list(ACTS))
@pytest.mark.parametrize("with_residual", [False, True])
@pytest.mark.parametrize("channels_last", [False, True])
def test_batch_norm_act_matches_unfused_torch(backend, activation, with_residual, channels_last):
    g = torch.Generator().manual_seed(3)
    x, r, dy = (torch.randn(3, 4, 5, 6, generator=g) for _ in range(3))
    if channels_last:
        x, r = x.contiguous(memory_format=torch.channels_last), r.contiguous(memory_format=torch.channels_last)
    bn, fused = torch.nn.BatchNorm2d(4), fusedtech.nn.BatchNormAct2d(4, activation=activation)
    xa, xb, ra, rb = (t.clone().requires_grad_() for t in (x, x, r, r))
    ya = ACTS[activation](bn(xa) + (ra if with_residual else 0))
    with fusedtech.use_backend(backend):
        yb = fused(xb, rb if with_residual else None)
        gb = torch.autograd.grad(yb, [xb, fused.weight, fused.bias] + ([rb] if with_residual else []), dy)
    ga = torch.autograd.grad(ya, [xa, bn.weight, bn.bias] + ([ra] if with_residual else []), dy)
    torch.testing.assert_close(yb, ya, **TOL32)
    for a, b in zip(gb, ga):
        torch.testing.assert_close(a, b, **TOL32)
    torch.testing.assert_close(fused.running_var, bn.running_var, **TOL32)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("activation", list(ACTS))
def test_batch_norm_act_odd_shape_no_affine_then_eval(backend, activation):
    # 315 elements: the ReLU mask's last byte is partial; no weight/bias; eval uses running stats.
    g = torch.Generator().manual_seed(4)
    x, r, dy = (torch.randn(3, 5, 7, 3, generator=g) for _ in range(3))
    bn, fused = torch.nn.BatchNorm2d(5, affine=False), fusedtech.nn.BatchNormAct2d(5, activation=activation, affine=False)
    for training in (True, False):
        bn.train(training), fused.train(training)
        xa, xb, ra, rb = (t.clone().requires_grad_() for t in (x, x, r, r))
        ya = ACTS[activation](bn(xa) + ra)
        with fusedtech.use_backend(backend):
            yb = fused(xb, rb)
            gb = torch.autograd.grad(yb, [xb, rb], dy)
        ga = torch.autograd.grad(ya, [xa, ra], dy)
        torch.testing.assert_close(yb, ya, **TOL32)
        for a, b in zip(gb, ga):
            torch.testing.assert_close(a, b, **TOL32)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("activation", list(ACTS))
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_batch_norm_act_low_precision_within_twice_torchs_error(backend, activation, dtype):
    g = torch.Generator().manual_seed(5)
    x, r, dy = ((torch.randn(6, 4, 5, 5, generator=g) * 2).to(dtype) for _ in range(3))

    def grads(bn, x, r, dy, fused):
        xg, rg = x.clone().requires_grad_(), r.clone().requires_grad_()
        y = bn(xg, rg) if fused else ACTS[activation](bn(xg) + rg)
        return [y, *torch.autograd.grad(y, [xg, rg], dy)]

    exact = grads(torch.nn.BatchNorm2d(4).double(), x.double(), r.double(), dy.double(), False)
    with fusedtech.use_backend(backend):
        ours = grads(fusedtech.nn.BatchNormAct2d(4, activation=activation).to(dtype), x, r, dy, True)
    try:
        ref = [(a.double() - e).abs().max().item() for a, e in zip(grads(torch.nn.BatchNorm2d(4).to(dtype), x, r, dy, False), exact)]
    except RuntimeError:  # torch's CPU kernels lack this dtype: judge against float64 alone
        ref = [0.0] * 3
    err = [(a.double() - e).abs().max().item() for a, e in zip(ours, exact)]
    for o, rr in zip(err, ref):
        assert o <= 2 * rr + ATOL[dtype], (err, ref)


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("shape", [(3, 5, 7, 3), (3, 5, 4, 4), (2, 33, 8, 2)], ids=str)  # S % 8: 5, 0, 0
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_batch_norm_act_relu_mask_is_the_same_on_every_backend(channels_last, shape, dtype):
    # Forward and backward may run on different backends (backward runs outside use_backend): the
    # packed mask is in logical element order everywhere, and the backward of each reads it so.
    from fusedtech.ops.batch_norm import ACT_APPLY, ACT_BWD, _pick  # the implementation tables the ops use
    g = torch.Generator().manual_seed(6)
    x, dy = torch.randn(shape, generator=g).to(dtype), torch.randn(shape, generator=g).to(dtype)
    if channels_last:
        x, dy = x.contiguous(memory_format=torch.channels_last), dy.contiguous(memory_format=torch.channels_last)
    c = shape[1]
    mean, invstd = torch.randn(c, generator=g) * 0.1, torch.rand(c, generator=g) + 0.5
    w, b = torch.randn(c, generator=g), torch.randn(c, generator=g)
    outs, grads = {}, {}
    for backend in BACKENDS:
        with fusedtech.use_backend(backend):
            outs[backend] = _pick(ACT_APPLY, x)(x, mean, invstd, w, b, None, 1)
            bwd = _pick(ACT_BWD, x)
            bits = outs["torch"][1] if "torch" in outs else outs[backend][1]
            grads[backend] = (bwd(dy, x, w, b, mean, invstd, bits, True, 1, True),  # with a residual: dres = masked dy
                              bwd(dy, x, w, b, mean, invstd, bits, False, 1, True))
    tol = TOL32 if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    expected_dres = torch.where(outs["torch"][0] > 0, dy, 0)
    for backend, (y, bits) in outs.items():
        assert bits.dtype == torch.uint8 and bits.numel() == (x.numel() + 7) // 8
        assert torch.equal(bits, outs["torch"][1]), backend
        torch.testing.assert_close(y, outs["torch"][0], **tol)
        with_res, without = grads[backend]
        assert torch.equal(with_res[3], expected_dres), backend  # the masked gradient is exact
        for a, e in zip(with_res[:3] + without[:3], grads["torch"][0][:3] + grads["torch"][1][:3]):
            torch.testing.assert_close(a, e, **tol)
    assert outs["torch"][1].any()


class _Launches:
    """Stands in for a Triton kernel and counts its launches."""

    def __init__(self, kernel):
        self.kernel, self.count = kernel, 0

    def __getitem__(self, grid):
        self.count += 1
        return self.kernel[grid]


@pytest.mark.skipif("triton" not in BACKENDS, reason="the Triton backend does not run here")
@pytest.mark.parametrize("shape", [(3, 130, 4, 4), (5, 3, 7, 7), (2, 64, 3, 5), (33, 8, 2, 4)], ids=str)
@pytest.mark.parametrize("activation,with_residual", [("none", False), ("relu", True), ("gelu", True), ("silu", False)])
def test_triton_channels_last_walks_row_tiles(monkeypatch, shape, activation, with_residual):
    # A dense channels_last input runs the [rows, channels] tile kernels (coalesced on a GPU), ReLU's
    # logical-order mask included when S % 8 == 0; results match the oracle's.
    from fusedtech.ops.batch_norm import ACT_APPLY, ACT_BWD, ACTIVATION_CODES, STATS, _pick
    from fusedtech.triton_kernels import batch_norm as k
    names = ("_stats_rows_kernel", "_apply_rows_kernel", "_bwd_reduce_rows_kernel", "_bwd_apply_rows_kernel")
    counters = {name: _Launches(getattr(k, name)) for name in names}
    for name, counter in counters.items():
        monkeypatch.setattr(k, name, counter)
    g = torch.Generator().manual_seed(9)
    x, r, dy = (torch.randn(shape, generator=g).contiguous(memory_format=torch.channels_last) for _ in range(3))
    c, act = shape[1], ACTIVATION_CODES[activation]
    w, b = torch.randn(c, generator=g), torch.randn(c, generator=g)
    res = r if with_residual else None
    results = {}
    for backend in ("torch", "triton"):
        with fusedtech.use_backend(backend):
            mean, invstd, unbiased = _pick(STATS, x)(x, 1e-5)
            y, bits = _pick(ACT_APPLY, x)(x, mean, invstd, w, b, res, act)
            extra = bits if act == 1 else res
            grads = _pick(ACT_BWD, x)(dy, x, w, b, mean, invstd, extra, with_residual, act, True)
        results[backend] = (mean, invstd, unbiased, y, bits) + tuple(t for t in grads if t is not None)
    for ours, oracle in zip(results["triton"], results["torch"]):
        if ours.dtype == torch.uint8:
            assert torch.equal(ours, oracle)
        else:
            torch.testing.assert_close(ours, oracle, **TOL32)
    assert results["triton"][3].is_contiguous(memory_format=torch.channels_last)
    relu_falls_back = act == 1 and (shape[2] * shape[3]) % 8 != 0
    assert counters["_stats_rows_kernel"].count == 1 and counters["_bwd_reduce_rows_kernel"].count == 1
    assert counters["_bwd_apply_rows_kernel"].count == 1
    assert counters["_apply_rows_kernel"].count == (0 if relu_falls_back else 1)


def test_batch_norm_act_opcheck():
    from fusedtech.ops.batch_norm import batch_norm_act_bwd, batch_norm_act_fwd
    x, r, dy = torch.randn(4, 3, 5), torch.randn(4, 3, 5), torch.randn(4, 3, 5)
    w, b = torch.randn(3), torch.randn(3)
    for backend in [b for b in BACKENDS if b in ("torch", "cpu")]:
        with fusedtech.use_backend(backend):
            for act in ("relu", "gelu", "silu", "none"):
                torch.library.opcheck(batch_norm_act_fwd, (x, w, b, None, None, r, True, 1e-5, act))
                _, mean, invstd, _, bits = batch_norm_act_fwd(x, w, b, None, None, r, True, 1e-5, act)
                code = {"none": 0, "relu": 1, "gelu": 2, "silu": 3}[act]
                torch.library.opcheck(batch_norm_act_bwd, (dy, x, w, b, mean, invstd, bits if act == "relu" else r,
                                                           True, code, True))


@pytest.mark.parametrize("backend", BACKENDS)
def test_batch_norm_act_saves_less_than_the_unfused_composition(backend):
    x = torch.randn(8, 16, 10, 10, requires_grad=True)
    r = torch.randn(8, 16, 10, 10)

    def saved_bytes(fn):
        sizes = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: sizes.append(t.numel() * t.element_size()) or t, lambda t: t):
            fn()
        return sum(sizes)

    bn, act = torch.nn.BatchNorm2d(16), torch.nn.ReLU()
    unfused = saved_bytes(lambda: act(bn(x) + r))
    fused = fusedtech.nn.BatchNormAct2d(16)
    with fusedtech.use_backend(backend):
        ours = saved_bytes(lambda: fused(x, r))
    # x, a 1-bit mask and the statistics, where torch keeps x and the ReLU output.
    assert ours <= unfused - 0.85 * x.numel() * x.element_size(), (ours, unfused)
    gelu = fusedtech.nn.BatchNormAct2d(16, activation="gelu")
    with fusedtech.use_backend(backend):
        ours_gelu = saved_bytes(lambda: gelu(x))  # no residual: x and the statistics only
    assert ours_gelu <= unfused - 0.95 * x.numel() * x.element_size()


def test_convert_model_fuses_activations_and_keeps_keys():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.GELU(),
                                torch.nn.Conv2d(8, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.SiLU())
    ref = copy.deepcopy(model)
    keys = model.state_dict().keys()
    _, report = fusedtech.nn.convert_model(model, fuse_activations=True, return_report=True)
    assert report["replaced"] == {"BatchNorm2d+GELU": 1, "BatchNorm2d+SiLU": 1}
    assert isinstance(model[1], fusedtech.nn.BatchNormAct2d) and isinstance(model[2], torch.nn.Identity)
    assert model.state_dict().keys() == keys
    x = torch.randn(2, 3, 10, 10)
    torch.testing.assert_close(model(x), ref(x), **TOL32)
    model.load_state_dict(ref.state_dict())
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    compiled(x).sum().backward()
    assert model[1].weight.grad is not None


def test_folded_activation_survives_a_later_swap_of_the_norm():
    # The usual DDP step after convert_model: SyncBatchNorm.convert_sync_batchnorm makes a plain
    # SyncBatchNorm of the BatchNormAct2d; the activation comes back where it was folded.
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU())
    ref = copy.deepcopy(model).eval()
    fusedtech.nn.convert_model(model, fuse_activations=True)
    model.eval()
    x = torch.randn(2, 3, 6, 6)
    torch.testing.assert_close(model(x), ref(x), **TOL32)
    model[1] = torch.nn.BatchNorm2d(4).eval()  # what convert_sync_batchnorm does, without a process group
    model[1].load_state_dict(ref[1].state_dict())
    assert (model(x) >= 0).all()
    torch.testing.assert_close(model(x), ref(x), **TOL32)
    for clone in (copy.deepcopy(model), torch.nn.Sequential(*model)):
        torch.testing.assert_close(clone(x), ref(x), **TOL32)
    # Replacing the placeholder (by the identity, another activation): the norm stops activating.
    for act in (torch.nn.Identity(), torch.nn.Tanh()):
        swapped = copy.deepcopy(ref)
        fusedtech.nn.convert_model(swapped, fuse_activations=True)
        swapped.eval()
        swapped[2], ref_swapped = act, torch.nn.Sequential(ref[0], ref[1], act)
        torch.testing.assert_close(swapped(x), ref_swapped(x), **TOL32)
    # include names the classes to convert: folding is BatchNorm2d's.
    other = torch.nn.Sequential(torch.nn.BatchNorm2d(4), torch.nn.ReLU(), torch.nn.LayerNorm(6))
    _, report = fusedtech.nn.convert_model(other, include={torch.nn.LayerNorm}, fuse_activations=True,
                                          return_report=True)
    assert report["replaced"] == {"LayerNorm": 1} and type(other[0]) is torch.nn.BatchNorm2d


def _torch_and_fused(c):
    t = torch.nn.BatchNorm2d(c) if c else None
    f = fusedtech.nn.BatchNorm2d(c)
    f.load_state_dict(t.state_dict())
    return t, f


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", ["sliced", "grad-channels_last", "transposed-2d"])
def test_non_contiguous_input_and_grad(backend, layout):
    g = torch.Generator().manual_seed(1)
    if layout == "transposed-2d":  # (N, C) stored as (C, N): channels are not contiguous
        t, f = torch.nn.BatchNorm1d(5), fusedtech.nn.BatchNorm1d(5)
        x = (torch.randn(5, 9, generator=g) * 2 + 1).t()
        dy = torch.randn(9, 5, generator=g)
    else:
        t, f = _torch_and_fused(4)
        x = (torch.randn(3, 4, 7, 12, generator=g) * 2 + 1)[:, :, 1:, ::2]  # no uniform stride over H, W
        dy = torch.randn(x.shape, generator=g)
        if layout == "grad-channels_last":
            x = x.contiguous()
            dy = dy.contiguous(memory_format=torch.channels_last)
    assert not (x.is_contiguous() and dy.is_contiguous())
    xt, xf = x.clone().requires_grad_(), x.clone().requires_grad_()
    yt = t(xt)
    gt = torch.autograd.grad(yt, [xt, t.weight, t.bias], dy)
    with fusedtech.use_backend(backend):
        yf = f(xf)
        gf = torch.autograd.grad(yf, [xf, f.weight, f.bias], dy)
    torch.testing.assert_close(yf, yt, **TOL32)
    for a, b in zip(gf, gt):
        torch.testing.assert_close(a, b, **TOL32)
    torch.testing.assert_close(f.running_var, t.running_var, **TOL32)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(0, 3, 4, 4), (2, 3, 0, 4)])
@pytest.mark.parametrize("training", [True, False])
def test_empty_batch_like_torch(backend, shape, training):
    t, f = _torch_and_fused(3)
    t.running_mean.fill_(0.5), f.running_mean.fill_(0.5)
    t.train(training), f.train(training)
    xt, xf = torch.randn(shape, requires_grad=True), torch.randn(shape, requires_grad=True)
    yt = t(xt)
    gt = torch.autograd.grad(yt.sum(), [xt, t.weight, t.bias])
    with fusedtech.use_backend(backend):
        yf = f(xf)
        gf = torch.autograd.grad(yf.sum(), [xf, f.weight, f.bias])
    assert yf.shape == yt.shape
    for a, b in zip(gf, gt):
        torch.testing.assert_close(a, b)
    for name, buf in t.named_buffers():  # an empty batch leaves the running statistics alone
        torch.testing.assert_close(dict(f.named_buffers())[name], buf)


@pytest.mark.skipif("cpu" not in BACKENDS, reason="the C++ cpu extension is not built")
@pytest.mark.parametrize("channels_last", [False, True])
def test_cpu_kernel_same_bits_whatever_the_thread_count(channels_last):
    # Row sums are cut into chunks fixed by the shape, not by the threads: 1 and 2 threads agree.
    x = torch.randn(64, 8, 9, 9) * 3 + 1
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    dy = torch.randn_like(x)
    m = fusedtech.nn.BatchNorm2d(8)
    results, threads = [], torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            xr = x.clone().requires_grad_()
            with fusedtech.use_backend("cpu"):
                y = m(xr)
                results.append((y, *torch.autograd.grad(y, [xr, m.weight, m.bias], dy)))
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(a, b) for a, b in zip(*results))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("wrong", ["running_mean", "running_var", "weight", "bias"])
def test_per_channel_arguments_of_the_wrong_size_raise_like_torch(backend, training, wrong):
    # Every backend's kernels index these by channel: a wrong size must be torch's error, not a read
    # past the end.
    x = torch.randn(2, 3, 4, 4)
    args = {"running_mean": torch.zeros(3), "running_var": torch.ones(3), "weight": torch.ones(3), "bias": torch.zeros(3)}
    args[wrong] = torch.ones(4)
    with pytest.raises(RuntimeError) as expected:
        torch.nn.functional.batch_norm(x, training=training, **args)
    with fusedtech.use_backend(backend), pytest.raises(RuntimeError, match=f"^{wrong} should contain 3 elements not 4"):
        fusedtech.nn.functional.batch_norm(x, training=training, **args)
    assert str(expected.value).startswith(f"{wrong} should contain 3 elements not 4")


@pytest.mark.skipif("cpu" not in BACKENDS, reason="the C++ cpu extension is not built")
def test_batch_norm_act_kernel_errors_name_the_argument():
    ops = torch.ops.fusedtech_C
    x, mean, invstd = torch.randn(2, 3, 4, 4), torch.zeros(3), torch.ones(3)
    with pytest.raises(RuntimeError, match="residual has shape"):
        ops.batch_norm_act_apply(x, mean, invstd, None, None, torch.randn(2, 3, 4, 5), 1)
    with pytest.raises(RuntimeError, match="activation code must be 0..3"):
        ops.batch_norm_act_apply(x, mean, invstd, None, None, None, 7)
    with pytest.raises(RuntimeError, match="ReLU backward needs the forward's packed mask"):
        ops.batch_norm_act_bwd(x, x, None, None, mean, invstd, None, False, 1, True)
    with pytest.raises(RuntimeError, match="batch_norm weight has 4 elements, expected 3"):
        ops.batch_norm_apply(x, mean, invstd, torch.ones(4), None)
    with pytest.raises(RuntimeError, match="batch_norm invstd has 2 elements, expected 3"):
        ops.batch_norm_bwd(x, x, None, mean, torch.ones(2), True)
    with pytest.raises(RuntimeError, match="residual has shape"):  # GELU's backward recomputes with it
        ops.batch_norm_act_bwd(x, x, None, None, mean, invstd, torch.randn(1, 3, 4, 4), True, 2, True)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", ["large_mean", "outlier_first", "constant_channel"])
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last], ids=["nchw", "nhwc"])
def test_statistics_of_hard_channels(backend, case, memory_format):
    # Channels whose variance a one-pass sum of squares would lose to cancellation (mean 1e4, std
    # 1e-2: in fp32 it would come out wrong by orders of magnitude), whose first element (the CPU
    # kernel's shift) is an outlier, or that are constant. With momentum 1 the running statistics
    # are the batch's: within TOL32 of float64 ones, as torch's are.
    g = torch.Generator().manual_seed(5)
    x = torch.randn(6, 3, 5, 5, generator=g, dtype=torch.float64)
    if case == "large_mean":
        x = 1e4 + 1e-2 * x
    elif case == "outlier_first":
        x[0, :, 0, 0] = 1e4
    else:
        x[:, 1] = 7.25
    x = x.float().contiguous(memory_format=memory_format)
    ours, ref = fusedtech.nn.BatchNorm2d(3, momentum=1.0), torch.nn.BatchNorm2d(3, momentum=1.0)
    with fusedtech.use_backend(backend):
        ours(x)
    ref(x)
    exact_mean, exact_var = x.double().mean((0, 2, 3)), x.double().var((0, 2, 3), unbiased=True)
    for got, theirs, exact in ((ours.running_mean, ref.running_mean, exact_mean),
                               (ours.running_var, ref.running_var, exact_var)):
        torch.testing.assert_close(theirs.double(), exact, **TOL32)  # the tolerance holds for torch
        torch.testing.assert_close(got.double(), exact, **TOL32)


# (backend, device): every CPU backend, and on a GPU the Triton and CUDA C++ kernels (the CUDA
# launcher took the last dim's stride as the step too).
SIZE_ONE_CASES = [(b, "cpu") for b in BACKENDS] + [pytest.param(b, "cuda", marks=pytest.mark.gpu)
                                                   for b in ("triton", "cuda")]


@pytest.mark.parametrize("backend,device", SIZE_ONE_CASES)
@pytest.mark.parametrize("make", [lambda: torch.randn(2, 8, 1, 16).transpose(2, 3),
                                  lambda: torch.randn(2, 16, 8).transpose(1, 2).unsqueeze(-1)],
                         ids=["contiguous-last-dim-1-stride-16", "channels-last-last-dim-1"])
def test_a_size_one_last_dim_with_any_stride(backend, device, make):
    # torch counts both inputs contiguous (resp. channels_last) whatever the size-1 last dim's stride:
    # the spatial step must come from the dims with extent (the last dim's stride, 16, would read
    # past the end; in the second, channels would overlap). The reference runs on a contiguous copy:
    # torch 2.14's own CPU batch_norm backward gets the second input wrong (dx off by up to 4.3
    # against the decomposed formula in float64; ours agrees with it to 1e-15).
    x = make().to(device).requires_grad_()
    dy = torch.randn(x.shape, device=device)
    ref_x = x.detach().contiguous().requires_grad_()
    ref = torch.nn.functional.batch_norm(ref_x, None, None, training=True)
    ref.backward(dy)
    with fusedtech.use_backend(backend):
        y = fusedtech.nn.functional.batch_norm(x, None, None, training=True)
        y.backward(dy)
    torch.testing.assert_close(y, ref, **TOL32)
    torch.testing.assert_close(x.grad, ref_x.grad, **TOL32)


def test_convert_model_returns_the_model_so_it_chains_like_torchs_converters():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU())
    converted = fusedtech.nn.convert_model(model)
    assert converted is model and type(model[1]) is fusedtech.nn.BatchNorm2d
    # The habit from apex and nn.SyncBatchNorm.convert_sync_batchnorm: the result is a module.
    assert fusedtech.nn.convert_model(model)(torch.randn(1, 3, 5, 5)).shape == (1, 4, 3, 3)


class _ScaledLayerNorm(torch.nn.LayerNorm):
    def forward(self, x):
        return 2 * super().forward(x)


class _PlainLayerNormSubclass(torch.nn.LayerNorm):
    pass


class CustomRMSNorm(torch.nn.Module):
    def __init__(self, n):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(n))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * self.weight


def test_convert_model_reports_each_norm_it_leaves_alone_with_the_reason(capsys):
    model = torch.nn.Sequential(torch.nn.LayerNorm(6), _ScaledLayerNorm(6), _PlainLayerNormSubclass(6), CustomRMSNorm(6),
                                torch.nn.BatchNorm2d(6), torch.nn.Linear(6, 6))
    x = torch.randn(2, 6)
    before = model[1:4](x)
    _, report = fusedtech.nn.convert_model(model, include={torch.nn.LayerNorm}, verbose=True, return_report=True)
    assert report["replaced"] == {"LayerNorm": 1}
    reasons = {s["module"]: (s["type"], s["reason"]) for s in report["skipped"]}
    assert set(reasons) == {"1", "2", "3", "4"}  # the Linear is no norm: not listed
    assert "overriding forward" in reasons["1"][1] and "exact torch class" in reasons["2"][1]
    assert reasons["3"] == ("CustomRMSNorm", "no fused drop-in for this class")
    assert reasons["4"] == ("BatchNorm2d", "not in include")
    # Skipped modules are untouched.
    assert type(model[1]) is _ScaledLayerNorm and type(model[3]) is CustomRMSNorm
    torch.testing.assert_close(model[1:4](x), before, rtol=0, atol=0)
    table = capsys.readouterr().out
    for name, (cls, reason) in reasons.items():
        assert f"{name} ({cls})" in table and reason in table
    assert "LayerNorm" in table and "replaced" in table


def test_convert_model_reports_a_gelu_it_cannot_fold():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.GELU(approximate="tanh"))
    _, report = fusedtech.nn.convert_model(model, fuse_activations=True, return_report=True)
    assert report["replaced"] == {"BatchNorm2d": 1} and type(model[2]) is torch.nn.GELU
    assert [(s["module"], s["type"]) for s in report["skipped"]] == [("2", "GELU")]
    assert "tanh" in report["skipped"][0]["reason"]


@pytest.mark.parametrize("backend", BACKENDS)
def test_training_with_a_non_finite_channel_gives_nan_as_torch(backend):
    x = torch.randn(4, 3, 5, 5)
    x[1, 0, 2, 2] = float("inf")
    x[2, 1, 0, 3] = float("nan")
    ref, ours = torch.nn.BatchNorm2d(3), fusedtech.nn.BatchNorm2d(3)
    with fusedtech.use_backend(backend):
        y = ours(x)
    yr = ref(x)
    assert torch.equal(y.isnan(), yr.isnan())
    torch.testing.assert_close(y[:, 2], yr[:, 2], **TOL32)
    assert torch.equal(ours.running_var.isnan(), ref.running_var.isnan())


@pytest.mark.parametrize("backend", BACKENDS)
def test_eval_input_gradient_does_not_read_the_input(backend):
    x = torch.randn(4, 3, 5, 5)
    x[1, 0, 2, 2] = float("inf")
    x[2, 1, 0, 3] = float("nan")
    ref, ours = torch.nn.BatchNorm2d(3).eval(), fusedtech.nn.BatchNorm2d(3).eval()
    xr, xo = x.clone().requires_grad_(), x.clone().requires_grad_()
    g = torch.randn_like(x)
    ref(xr).backward(g)
    with fusedtech.use_backend(backend):
        ours(xo).backward(g)
    assert xr.grad.isfinite().all()
    torch.testing.assert_close(xo.grad, xr.grad, **TOL32)


@pytest.mark.parametrize("act", [False, True])
def test_eps_that_torch_refuses_is_refused_with_torchs_words(act):
    F = fusedtech.nn.functional
    x, rm, rv = torch.randn(4, 3, 5, 5), torch.zeros(3), torch.ones(3)
    call = (lambda **kw: F.batch_norm_act(x, rm, rv, **kw)) if act else (lambda **kw: F.batch_norm(x, rm, rv, **kw))
    for eps in (0.0, -1e-5):
        with pytest.raises(ValueError, match="eps must be positive during training"):
            call(training=True, eps=eps)
    with pytest.raises(ValueError, match="eps must be non-negative"):
        call(training=False, eps=-1e-5)
    y = call(training=False, eps=0.0)  # allowed in eval, as torch
    assert torch.isfinite(y).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", ["hw_transposed", "batch_channel_swapped", "channels_last", "3d_channels_inner"])
def test_output_layout_is_torchs_for_permuted_dense_inputs(backend, layout):
    # torch's batch_norm keeps channels_last and gives every other layout back contiguous (code
    # .view()s its output).
    base = torch.randn(4, 3, 6, 5)
    x = {"hw_transposed": base.transpose(2, 3), "batch_channel_swapped": base.permute(1, 0, 2, 3).contiguous().permute(1, 0, 2, 3),
         "channels_last": base.to(memory_format=torch.channels_last),
         "3d_channels_inner": torch.randn(4, 7, 3).transpose(1, 2)}[layout]
    c = x.shape[1]
    with fusedtech.use_backend(backend):
        y = fusedtech.nn.functional.batch_norm(x, torch.zeros(c), torch.ones(c), training=True)
    yr = torch.nn.functional.batch_norm(x, torch.zeros(c), torch.ones(c), training=True)
    assert y.stride() == yr.stride(), (y.stride(), yr.stride())
    torch.testing.assert_close(y, yr, **TOL32)
    if layout != "channels_last":
        y.view(-1)  # what broke on the input's strides
