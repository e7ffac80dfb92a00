"""Fused GroupNorm, GroupNormAct and InstanceNorm1d/2d/3d against torch's modules: forward, backward
(input, weight, bias), running statistics, memory formats, errors, compile, on every CPU backend
(the reference, the C++ kernels, Triton under the interpreter).

Tolerances: fp32 atol 1e-5, rtol 1e-5 (our statistics are fp32 Welford, torch's CPU kernel
accumulates its own way); fp16/bf16 are compared with a float64 computation and our error must be
within twice torch's own error in that dtype plus 2e-3 (fp16) / 1.6e-2 (bf16), about two ulps at
unit scale (as for BatchNorm and LayerNorm).
"""
from __future__ import annotations

import copy

import pytest
import torch

import fusedtech
from conftest import cpu_backends
from fusedtech.nn import functional as FF
from fusedtech.ops import group_norm as ops

BACKENDS = cpu_backends()
TOL32 = dict(atol=1e-5, rtol=1e-5)
ATOL = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
ACTS = {"none": lambda t: t, "relu": torch.relu, "gelu": torch.nn.functional.gelu, "silu": torch.nn.functional.silu}

# (shape, groups): odd sizes, one group, one channel per group, groups of one element (C/G = 1, H*W = 1
# with N > 1), no spatial dims, 1-d and 3-d spatial, a spatial size that leaves a partial tile.
SHAPES = [((2, 6, 5, 7), 3), ((3, 4), 2), ((2, 8, 3, 3, 3), 8), ((2, 4, 3, 3), 1), ((4, 5, 1, 1), 5),
          ((1, 3, 37), 3), ((2, 12, 4, 6), 4), ((2, 1, 9), 1)]


def _ids(case):
    shape, groups = case
    return f"{'x'.join(map(str, shape))}-G{groups}"


def _memory_formats(shape):
    return {4: [None, torch.channels_last], 5: [None, torch.channels_last_3d]}.get(len(shape), [None])


LAYOUTS = [(c, f) for c in SHAPES for f in _memory_formats(c[0])]


def _grads(fn, x, params, dy):
    x = x.detach().clone().requires_grad_()
    y = fn(x)
    grads = torch.autograd.grad(y, [x] + [p for p in params if p is not None], dy)
    return y, grads


def _assert_matches_torch(ours, torchs, exact):
    """Within TOL32 of torch's, or else no further from the float64 result than torch's is (a group
    of one element: torch's x * (rstd w) - mean * (rstd w) form leaves rounding errors times
    1 / sqrt(eps) where (x - mean) is exactly 0)."""
    try:
        torch.testing.assert_close(ours, torchs, **TOL32)
    except AssertionError:
        err, ref = ((t.double() - exact).abs().max().item() for t in (ours, torchs))
        assert err <= ref, f"ours {err} from float64, torch's {ref}"


def _affine(c, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = (torch.rand(c, generator=g) + 0.5).to(dtype).requires_grad_()
    b = torch.randn(c, generator=g).to(dtype).requires_grad_()
    return w, b


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case,memory_format", LAYOUTS,
                         ids=[_ids(c) + ("-channels_last" if f else "") for c, f in LAYOUTS])
@pytest.mark.parametrize("affine", [True, False])
def test_group_norm_matches_torch_forward_and_backward(backend, case, memory_format, affine):
    shape, groups = case
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g) * 3 + 1
    if memory_format is not None:
        x = x.contiguous(memory_format=memory_format)
    dy = torch.randn(shape, generator=g)
    w, b = _affine(shape[1]) if affine else (None, None)
    yt, gt = _grads(lambda t: torch.nn.functional.group_norm(t, groups, w, b, 1e-5), x, (w, b), dy)
    with fusedtech.use_backend(backend):
        yf, gf = _grads(lambda t: FF.group_norm(t, groups, w, b, 1e-5), x, (w, b), dy)
    wd, bd = (None, None) if w is None else (w.detach().double().requires_grad_(), b.detach().double().requires_grad_())
    ye, ge = _grads(lambda t: torch.nn.functional.group_norm(t, groups, wd, bd, 1e-5), x.double(), (wd, bd), dy.double())
    for ours, torchs, exact in zip((yf,) + gf, (yt,) + gt, (ye,) + ge):
        _assert_matches_torch(ours, torchs, exact)
    if memory_format is not None:  # the input's memory format, as torch's
        assert yf.is_contiguous(memory_format=memory_format) and gf[0].is_contiguous(memory_format=memory_format)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("activation", ["silu", "gelu", "relu", "none"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_group_norm_act_is_group_norm_then_the_activation(backend, activation, channels_last):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 8, 5, 3, generator=g)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    dy = torch.randn(2, 8, 5, 3, generator=g)
    w, b = _affine(8, seed=3)
    ref = lambda t: ACTS[activation](torch.nn.functional.group_norm(t, 4, w, b))  # noqa: E731
    yt, gt = _grads(ref, x, (w, b), dy)
    with fusedtech.use_backend(backend):
        yf, gf = _grads(lambda t: FF.group_norm_act(t, 4, w, b, activation=activation), x, (w, b), dy)
    torch.testing.assert_close(yf, yt, **TOL32)
    for a, e in zip(gf, gt):
        torch.testing.assert_close(a, e, **TOL32)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("activation", ["none", "silu"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_low_precision_within_twice_torchs_error(backend, dtype, activation, channels_last):
    g = torch.Generator().manual_seed(1)
    shape = (2, 8, 6, 5)
    x = (torch.randn(shape, generator=g) * 2 + 1).to(dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    dy = torch.randn(shape, generator=g).to(dtype)
    w, b = _affine(8, dtype, seed=4)
    act = ACTS[activation]
    we, be = w.detach().double().requires_grad_(), b.detach().double().requires_grad_()
    ye, ge = _grads(lambda t: act(torch.nn.functional.group_norm(t, 4, we, be)), x.double(), (we, be), dy.double())
    yt, gt = _grads(lambda t: act(torch.nn.functional.group_norm(t, 4, w, b)), x, (w, b), dy)
    with fusedtech.use_backend(backend):
        yf, gf = _grads(lambda t: FF.group_norm_act(t, 4, w, b, activation=activation), x, (w, b), dy)
    assert yf.dtype == dtype and all(a.dtype == dtype for a in gf)
    for ours, torchs, exact in zip((yf,) + gf, (yt,) + gt, (ye,) + ge):
        scale = max(exact.abs().max().item(), 1.0)
        err, ref = (ours.double() - exact).abs().max().item(), (torchs.double() - exact).abs().max().item()
        assert err <= 2 * ref + ATOL[dtype] * scale, (err, ref)


@pytest.mark.parametrize("backend", BACKENDS)
def test_statistics_stay_exact_far_from_zero(backend):
    """mean / std = 100: a one-pass E[x^2] - E[x]^2 in fp32 loses most digits of the variance here."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 4, 16, 16, generator=g) + 100.0
    with fusedtech.use_backend(backend):
        _, mean, rstd = ops.group_norm(x, None, None, 2, 1e-5, 0)
    xd = x.double().reshape(2, 2, -1)
    var, mean_e = torch.var_mean(xd, dim=-1, correction=0)
    torch.testing.assert_close(rstd.double(), torch.rsqrt(var + 1e-5), atol=0, rtol=1e-5)
    torch.testing.assert_close(mean.double(), mean_e, atol=0, rtol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_batch_and_strided_input_like_torch(backend):
    w, b = _affine(4)
    for x in (torch.randn(0, 4, 3, 3), torch.randn(2, 8, 6, 5)[:, ::2, 1:, ::2], torch.randn(2, 5, 4, 4).transpose(2, 3)[:, :4]):
        dy = torch.randn(x.shape)
        yt, gt = _grads(lambda t: torch.nn.functional.group_norm(t, 2, w, b), x, (w, b), dy)
        with fusedtech.use_backend(backend):
            yf, gf = _grads(lambda t: FF.group_norm(t, 2, w, b), x, (w, b), dy)
        assert yf.shape == yt.shape
        torch.testing.assert_close(yf, yt, **TOL32)
        for a, e in zip(gf, gt):
            torch.testing.assert_close(a, e, **TOL32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_backward_is_bitwise_deterministic(backend):
    g = torch.Generator().manual_seed(6)
    x = torch.randn(3, 8, 9, 7, generator=g).contiguous(memory_format=torch.channels_last)
    dy = torch.randn(3, 8, 9, 7, generator=g)
    w, b = _affine(8)
    with fusedtech.use_backend(backend):
        runs = [_grads(lambda t: FF.group_norm_act(t, 2, w, b, activation="silu"), x, (w, b), dy) for _ in range(2)]
    for a, e in zip((runs[0][0],) + runs[0][1], (runs[1][0],) + runs[1][1]):
        assert torch.equal(a, e)


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b in ("torch", "cpu")])  # Triton: no fp64 kernels
@pytest.mark.parametrize("activation", ["none", "silu", "gelu"])
def test_gradcheck_and_gradgradcheck_float64(backend, activation):
    x = torch.randn(2, 4, 3, 2, dtype=torch.float64, requires_grad=True)
    w = (torch.rand(4, dtype=torch.float64) + 0.5).requires_grad_()
    b = torch.randn(4, dtype=torch.float64, requires_grad=True)
    fn = lambda x, w, b: FF.group_norm_act(x, 2, w, b, activation=activation)  # noqa: E731
    with fusedtech.use_backend(backend):
        assert torch.autograd.gradcheck(fn, (x, w, b))
        assert torch.autograd.gradgradcheck(fn, (x, w, b))


@pytest.mark.parametrize("backend", BACKENDS)
def test_double_backward_matches_torch(backend):
    """A gradient penalty through GroupNorm + SiLU, in fp32: its gradient as torch's."""
    g = torch.Generator().manual_seed(7)
    x = torch.randn(2, 6, 4, 3, generator=g)

    def penalty(fn, w, b):
        xx = x.clone().requires_grad_()
        (gx,) = torch.autograd.grad(fn(xx, w, b).pow(2).sum(), xx, create_graph=True)
        return torch.autograd.grad(gx.pow(2).sum(), (xx, w, b))

    w, b = _affine(6)
    expected = penalty(lambda t, w, b: torch.nn.functional.silu(torch.nn.functional.group_norm(t, 3, w, b)), w, b)
    with fusedtech.use_backend(backend):
        ours = penalty(lambda t, w, b: FF.group_norm_act(t, 3, w, b, activation="silu"), w, b)
    for a, e in zip(ours, expected):
        torch.testing.assert_close(a, e, atol=1e-4, rtol=1e-4)


def _instance_cases():
    return [(torch.nn.InstanceNorm1d, fusedtech.nn.InstanceNorm1d, (3, 4, 7)),
            (torch.nn.InstanceNorm1d, fusedtech.nn.InstanceNorm1d, (4, 7)),  # unbatched (C, L)
            (torch.nn.InstanceNorm2d, fusedtech.nn.InstanceNorm2d, (2, 3, 5, 6)),
            (torch.nn.InstanceNorm3d, fusedtech.nn.InstanceNorm3d, (2, 3, 2, 3, 4))]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", _instance_cases(), ids=lambda c: f"{c[0].__name__}{c[2]}")
@pytest.mark.parametrize("affine,track,momentum", [(False, False, 0.1), (True, True, 0.1), (True, True, None),
                                                   (False, True, 0.3)])
def test_instance_norm_matches_torch_over_steps_then_eval(backend, case, affine, track, momentum):
    torch_cls, fused_cls, shape = case
    t = torch_cls(shape[-2] if len(shape) == 2 else shape[1], affine=affine, track_running_stats=track,
                  momentum=momentum)
    f = fused_cls(t.num_features, affine=affine, track_running_stats=track, momentum=momentum)
    if affine:
        with torch.no_grad():
            t.weight.uniform_(0.5, 2), t.bias.uniform_(-1, 1)
    f.load_state_dict(t.state_dict())
    g = torch.Generator().manual_seed(8)
    for _ in range(3):
        x = torch.randn(shape, generator=g) * 2 + 0.5
        dy = torch.randn(shape, generator=g)
        yt, gt = _grads(t, x, list(t.parameters()), dy)
        with fusedtech.use_backend(backend):
            yf, gf = _grads(f, x, list(f.parameters()), dy)
        torch.testing.assert_close(yf, yt, **TOL32)
        for a, e in zip(gf, gt):
            torch.testing.assert_close(a, e, **TOL32)
    for name, buf in t.named_buffers():
        torch.testing.assert_close(dict(f.named_buffers())[name], buf, **TOL32)
    t.eval(), f.eval()
    x = torch.randn(shape, generator=g)
    with fusedtech.use_backend(backend):
        torch.testing.assert_close(f(x), t(x), **TOL32)


def _module_db_inputs():
    """PyTorch's own ModuleInfo inputs for GroupNorm and InstanceNorm1d/2d/3d."""
    common_modules = pytest.importorskip("torch.testing._internal.common_modules")
    fused = {torch.nn.GroupNorm: fusedtech.nn.GroupNorm, torch.nn.InstanceNorm1d: fusedtech.nn.InstanceNorm1d,
             torch.nn.InstanceNorm2d: fusedtech.nn.InstanceNorm2d, torch.nn.InstanceNorm3d: fusedtech.nn.InstanceNorm3d}
    cases = []
    for info in common_modules.module_db:
        if info.module_cls not in fused:
            continue
        for training in (True, False):
            for i, inp in enumerate(info.module_inputs_func(info, device="cpu", dtype=torch.float32,
                                                            requires_grad=True, training=training)):
                cases.append(pytest.param(info.module_cls, fused[info.module_cls], inp, training,
                                          id=f"{info.module_cls.__name__}-{'train' if training else 'eval'}-{i}"))
    return cases


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "triton"] + ["triton"] * ("triton" in BACKENDS))
def test_pytorchs_module_info_inputs_match_torch(backend):
    cases = _module_db_inputs()
    assert len(cases) >= 8
    for param in cases:
        torch_cls, fused_cls, inp, training = param.values
        args, kwargs = inp.constructor_input.args, inp.constructor_input.kwargs
        t = torch_cls(*args, **kwargs).train(training)
        f = fused_cls(*args, **kwargs).train(training)
        with torch.no_grad():
            for p in t.parameters():
                p.uniform_(0.5, 1.5)
        f.load_state_dict(t.state_dict())
        xs = [a.detach().clone() for a in inp.forward_input.args]
        xt = [a.clone().requires_grad_() for a in xs]
        xf = [a.clone().requires_grad_() for a in xs]
        yt = t(*xt, **inp.forward_input.kwargs)
        with fusedtech.use_backend(backend):
            yf = f(*xf, **inp.forward_input.kwargs)
            torch.testing.assert_close(yf, yt, **TOL32, msg=lambda m: f"{param.id}: {m}")
            dy = torch.randn_like(yt)
            gf = torch.autograd.grad(yf, xf + list(f.parameters()), dy)
        gt = torch.autograd.grad(yt, xt + list(t.parameters()), dy)
        for a, e in zip(gf, gt):
            torch.testing.assert_close(a, e, **TOL32, msg=lambda m: f"{param.id}: {m}")
        for name, buf in t.named_buffers():
            torch.testing.assert_close(dict(f.named_buffers())[name], buf, **TOL32)


def test_modules_are_drop_ins():
    for torch_m, fused_m in ((torch.nn.GroupNorm(4, 8, eps=1e-3), fusedtech.nn.GroupNorm(4, 8, eps=1e-3)),
                             (torch.nn.GroupNorm(2, 6, affine=False), fusedtech.nn.GroupNorm(2, 6, affine=False)),
                             (torch.nn.InstanceNorm2d(5, affine=True, track_running_stats=True),
                              fusedtech.nn.InstanceNorm2d(5, affine=True, track_running_stats=True))):
        assert repr(fused_m) == repr(torch_m)
        assert list(fused_m.state_dict()) == list(torch_m.state_dict())
        fused_m.load_state_dict(torch_m.state_dict())
        torch_m.load_state_dict(fused_m.state_dict())
    act = fusedtech.nn.GroupNormAct(32, 64)
    assert list(act.state_dict()) == list(torch.nn.GroupNorm(32, 64).state_dict()) and act.activation == "silu"
    assert "activation=silu" in repr(act) and fusedtech.nn.GroupNormAct(1, 2, activation=None).activation == "none"
    with pytest.raises(ValueError, match="num_channels .6. must be divisible by num_groups .4."):
        fusedtech.nn.GroupNorm(4, 6)
    with pytest.raises(ValueError, match="activation must be"):
        fusedtech.nn.GroupNormAct(2, 4, activation="tanh")


def test_errors_are_torchs_and_name_the_argument():
    x = torch.randn(2, 6, 3)
    with pytest.raises(RuntimeError, match="divisible by num_groups"):
        FF.group_norm(x, 4)
    with pytest.raises(RuntimeError, match="Expected weight to be a vector of size equal to the number of channels"):
        FF.group_norm(x, 3, torch.ones(5))
    with pytest.raises(RuntimeError, match="Expected bias to be a vector"):
        FF.group_norm(x, 3, torch.ones(6), torch.ones(2))
    with pytest.raises(RuntimeError, match="Expected at least 2 dimensions"):
        FF.group_norm(torch.randn(4), 2)
    with pytest.raises(RuntimeError, match="Expected HxW to be greater than 0"):
        FF.group_norm(torch.randn(2, 4, 0), 2)
    with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
        FF.group_norm(torch.randn(1, 2, 1), 2)
    with pytest.raises(TypeError, match="input must be a real floating-point tensor"):
        FF.group_norm(torch.ones(2, 4, 3, dtype=torch.int64), 2)
    with pytest.raises(TypeError, match="weight must be a real floating-point tensor"):
        FF.group_norm(x, 3, torch.ones(6, dtype=torch.complex64))
    with pytest.raises(ValueError, match="activation must be one of"):
        FF.group_norm_act(x, 3, activation="tanh")
    with pytest.raises(ValueError, match="Expected more than 1 spatial element when training"):
        FF.instance_norm(torch.randn(2, 3, 1))
    with pytest.raises(ValueError, match="expected 3D or 4D input"):  # torch's module checks, inherited
        fusedtech.nn.InstanceNorm2d(3)(torch.randn(2, 3))


def test_compiled_kernels_refuse_bad_layouts_by_name():
    if "cpu" not in BACKENDS:
        pytest.skip("the cpu extension is not built")
    cpu = torch.ops.fusedtech_C
    x = torch.randn(2, 4, 3, 3)
    with pytest.raises(RuntimeError, match="num_groups"):
        cpu.group_norm_fwd(x, None, None, 3, 1e-5, 0)
    with pytest.raises(RuntimeError, match="weight"):
        cpu.group_norm_fwd(x, torch.ones(3), None, 2, 1e-5, 0)
    with pytest.raises(RuntimeError, match="input must be contiguous or channels_last"):
        cpu.group_norm_fwd(x.transpose(2, 3), None, None, 2, 1e-5, 0)


@pytest.mark.parametrize("activation", [0, 3])
def test_opcheck(activation):
    x = torch.randn(2, 4, 3, 3, requires_grad=True)
    w, b = _affine(4)
    torch.library.opcheck(ops.group_norm_fwd, (x, w, b, 2, 1e-5, activation))
    xc = torch.randn(2, 4, 3, 3).contiguous(memory_format=torch.channels_last).requires_grad_()
    torch.library.opcheck(ops.group_norm_fwd, (xc, w, b, 2, 1e-5, activation))
    with torch.no_grad():
        y, mean, rstd = ops.group_norm_fwd(x, w, b, 2, 1e-5, activation)
    torch.library.opcheck(ops.group_norm_bwd, (torch.randn_like(y), x.detach(), w.detach(), b.detach(), mean, rstd, 2,
                                               activation))


def test_compile_fullgraph_matches_eager():
    m = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), fusedtech.nn.GroupNormAct(4, 8),
                            fusedtech.nn.InstanceNorm2d(8, affine=True), fusedtech.nn.GroupNorm(2, 8))
    x = torch.randn(2, 3, 6, 6)
    eager = m(x)
    compiled = torch.compile(m, fullgraph=True, backend="aot_eager")(x)
    torch.testing.assert_close(compiled, eager, atol=0, rtol=0)
    compiled.sum().backward()


class _ResnetBlock(torch.nn.Module):
    """A diffusion UNet's residual block (diffusers' ResnetBlock2D): GroupNorm -> SiLU -> conv twice,
    plus a 1x1 shortcut."""

    def __init__(self, c_in, c_out, groups=4):
        super().__init__()
        self.norm1, self.nonlinearity = torch.nn.GroupNorm(groups, c_in), torch.nn.SiLU()
        self.conv1 = torch.nn.Conv2d(c_in, c_out, 3, padding=1)
        self.norm2 = torch.nn.GroupNorm(groups, c_out)
        self.act2, self.dropout = torch.nn.SiLU(), torch.nn.Dropout(0.0)
        self.conv2 = torch.nn.Conv2d(c_out, c_out, 3, padding=1)
        self.shortcut = torch.nn.Conv2d(c_in, c_out, 1)

    def forward(self, x):
        h = self.conv1(self.nonlinearity(self.norm1(x)))
        h = self.conv2(self.dropout(self.act2(self.norm2(h))))
        return self.shortcut(x) + h


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_convert_model_folds_a_diffusion_resnet_block(channels_last):
    torch.manual_seed(9)
    model = torch.nn.Sequential(_ResnetBlock(8, 16), torch.nn.GroupNorm(4, 16), torch.nn.SiLU(),
                                torch.nn.Conv2d(16, 4, 1), torch.nn.InstanceNorm2d(4, affine=True))
    fused = copy.deepcopy(model)
    fused, report = fusedtech.nn.convert_model(fused, fuse_activations=True, return_report=True)
    # the Sequential's pair, and the block's two pairs its forward calls in a row
    assert report["replaced"].get("GroupNorm+SiLU") == 3, report
    assert all(isinstance(m, fusedtech.nn.GroupNormAct) for m in (fused[0].norm1, fused[0].norm2, fused[1]))
    assert isinstance(fused[4], fusedtech.nn.InstanceNorm2d)
    assert list(fused.state_dict()) == list(model.state_dict())
    x = torch.randn(2, 8, 6, 6)
    if channels_last:
        model, fused, x = model.to(memory_format=torch.channels_last), fused.to(memory_format=torch.channels_last), \
            x.contiguous(memory_format=torch.channels_last)
    yt, yf = model(x), fused(x)
    torch.testing.assert_close(yf, yt, **TOL32)
    yt.square().sum().backward(), yf.square().sum().backward()
    for (name, a), (_, e) in zip(fused.named_parameters(), model.named_parameters()):
        torch.testing.assert_close(a.grad, e.grad, atol=1e-4, rtol=1e-4, msg=lambda m: f"{name}: {m}")


def test_a_shared_activation_is_reported_not_folded():
    """diffusers' ResnetBlock2D calls one `nonlinearity` module after both norms (and on the time
    embedding): no single placeholder can stand for it, so both norms stay plain and the report says why."""
    block = _ResnetBlock(4, 4, groups=2)
    block.act2 = block.nonlinearity
    model, report = fusedtech.nn.convert_model(copy.deepcopy(block), fuse_activations=True, return_report=True)
    assert "GroupNorm+SiLU" not in report["replaced"] and report["replaced"]["GroupNorm"] == 2
    assert any("more than once" in s["reason"] for s in report["skipped"]), report
    x = torch.randn(2, 4, 5, 5)
    torch.testing.assert_close(model(x), block(x), **TOL32)


def test_every_implementation_table_entry_resolves():
    for table in (ops.FORWARD, ops.BACKWARD):
        for backend in table.implemented:
            if fusedtech._backend.why_unavailable(backend, "cpu") is None or backend == "torch":
                assert callable(table.entries[backend]())


_AOT_CHILD = """
import json, sys, torch
from benchmarks.kernel_resources import record_group_norm, recording
cases = [((2, 64, 5, 7), 32, torch.contiguous_format), ((2, 64, 5, 7), 32, torch.channels_last),
         ((2, 6, 3, 3, 3), 6, torch.channels_last_3d), ((1, 4, 1), 1, torch.contiguous_format)]
out = {}
for capability in (80, 90):
    with recording(capability) as rec:
        record_group_norm(rec, cases, [torch.bfloat16, torch.float32], activations=(0, 3))
    out[capability] = sorted({(r.kernel, r.regs > 0) for r in rec.launches})
print(json.dumps(out))
"""


def test_triton_kernels_compile_for_sm80_and_sm90():
    """Every GroupNorm kernel, launched as the JIT specialises it, compiled to cubin for both GPUs
    (in a child process: the kernels must be Triton's JIT functions, not the interpreter's)."""
    import json
    import os
    import subprocess
    import sys
    pytest.importorskip("triton")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([root] + [p for p in sys.path if p]))
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run([sys.executable, "-c", _AOT_CHILD], cwd=root, env=env, capture_output=True, text=True,
                          timeout=1200)
    if proc.returncode != 0 and "cuobjdump" in proc.stderr:
        pytest.skip("this Triton ships no cuobjdump to read cubins with")
    assert proc.returncode == 0, proc.stderr[-4000:]
    compiled = json.loads(proc.stdout.strip().splitlines()[-1])
    kernels = {"_stats_kernel", "_stats_combine_kernel", "_apply_kernel", "_bwd_reduce_kernel", "_bwd_combine_kernel",
               "_bwd_apply_kernel"}
    for capability in ("80", "90"):
        assert {k for k, ok in compiled[capability] if ok} == kernels, compiled[capability]


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("activation", ["none", "silu", "gelu", "relu"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("case", [((2, 320, 64, 64), 32), ((3, 40, 7, 9), 8), ((8, 64, 1, 1), 64), ((2, 6, 5, 1), 1)],
                         ids=_ids)
def test_gpu_group_norm_act_matches_torch(backend, dtype, activation, channels_last, case):
    """On a GPU, each compiled backend against torch's GroupNorm then the activation, judged as on
    the CPU: fp32 within TOL32 of torch's (or nearer float64), fp16/bf16 within twice torch's error."""
    shape, groups = case
    g = torch.Generator().manual_seed(11)
    x = (torch.randn(shape, generator=g) * 2 + 1).to("cuda", dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    dy = torch.randn(shape, generator=g).to("cuda", dtype)
    w, b = (t.detach().cuda().requires_grad_() for t in _affine(shape[1], dtype, seed=12))
    act = ACTS[activation]
    we, be = w.detach().double().requires_grad_(), b.detach().double().requires_grad_()
    ye, ge = _grads(lambda t: act(torch.nn.functional.group_norm(t, groups, we, be)), x.double(), (we, be), dy.double())
    yt, gt = _grads(lambda t: act(torch.nn.functional.group_norm(t, groups, w, b)), x, (w, b), dy)
    with fusedtech.use_backend(backend):
        yf, gf = _grads(lambda t: FF.group_norm_act(t, groups, w, b, activation=activation), x, (w, b), dy)
    if channels_last:
        assert yf.is_contiguous(memory_format=torch.channels_last)
    for ours, torchs, exact in zip((yf,) + gf, (yt,) + gt, (ye,) + ge):
        if dtype == torch.float32:
            _assert_matches_torch(ours, torchs, exact)
        else:
            scale = max(exact.abs().max().item(), 1.0)
            err, ref = (ours.double() - exact).abs().max().item(), (torchs.double() - exact).abs().max().item()
            assert err <= 2 * ref + ATOL[dtype] * scale, (err, ref)


def test_the_backward_runs_on_the_backend_the_forward_was_given():
    """use_backend() is a ContextVar that autograd's device threads need not see: the eager backward
    takes the backend the forward chose, also when backward() runs outside the block."""
    if "cpu" not in BACKENDS:
        pytest.skip("the cpu extension is not built")
    calls = []
    original = ops.BACKWARD.entries["torch"]

    def recording():
        fn = original()
        return lambda *args: calls.append("torch") or fn(*args)

    ops.BACKWARD.entries["torch"] = recording
    ops.BACKWARD._picked.clear()
    try:
        x = torch.randn(2, 4, 3, requires_grad=True)
        with fusedtech.use_backend("torch"):
            y = FF.group_norm(x, 2)
        y.sum().backward()  # outside the block: the automatic choice would be cpu
    finally:
        ops.BACKWARD.entries["torch"] = original
        ops.BACKWARD._picked.clear()
    assert calls == ["torch"]


def test_autocast_keeps_torchs_output_dtype_on_cpu():
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(2, 4, 3, 3).to(dtype)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            expected = torch.nn.functional.group_norm(x, 2, torch.ones(4), torch.zeros(4))
            ours = FF.group_norm(x, 2, torch.ones(4), torch.zeros(4))
            inst = FF.instance_norm(x)
        assert ours.dtype == expected.dtype == dtype and inst.dtype == torch.nn.functional.instance_norm(x).dtype
        torch.testing.assert_close(ours, expected, atol=1.6e-2 if dtype == torch.bfloat16 else 1e-5, rtol=1e-2)
