"""Property-based differential fuzzing (hypothesis) of fusedtech against torch.

Drawn: shapes with 0 rows, size-1, odd, partial-tile and long (1025, 2049) rows; views (contiguous,
transposed, ``[..., ::2]``, one row expanded, channels_last); float32, float16, bfloat16, float64 (not
on Triton: no float64 kernels); weight/bias present or None (strided views too); which inputs require
grad; values N(mean, std) with |mean| / std <= 35 (LOC_SCALE says why), NaN, +-inf, +-1e30, +-1e-40
(denormal in fp32/bf16) and 0 at random positions; constant rows or channels. Incoming gradients are
N(0, 1) with NaN, +-inf, 0, +-1e-40: the tolerances are for unit scale, and the backward being linear
in them, a larger one (1e30) only scales both sides' rounding noise (an RMSNorm over one element: its
d/dx is eps-small, and every fp32 result, torch's included, is noise).

On "cpu" (C++ kernels) and, with a quarter of the examples (not shrunk), on "triton" (interpreted):
- F.layer_norm / F.rms_norm (memory_efficient too: its error held to the oracle's, which recovers xhat
  from the rounded output as it does), F.batch_norm (training, eval, running stats) vs
  torch.nn.functional, forward and backward. Where the float64 result is NaN or +-inf ours is the
  same (or, where torch's in this dtype differs too, an overflow, the same as torch's); elsewhere our
  largest error against float64 is at most twice torch's own in the same dtype plus ATOL[dtype]
  (test_layer_norm.py's rule), per row (channel for BatchNorm; whole tensor for weight/bias grads and
  running stats), in units of max(1, |exact|) so that a 1e30 neither masks nor fails the rest of its
  row. Output strides (of dims of size > 1) are torch's. Gradients where float64 torch's is not
  finite (an infinite incoming gradient: undefined) need only be non-finite in ours. The float64
  reference takes dense parameters: torch's CPU batch_norm backward misreads a strided weight.
- F.dropout, F.drop_block2d vs the pure-torch oracle (use_backend("torch")) under one torch.manual_seed:
  bit for bit, NaN positions included, forward and backward; dropout gives NaN for NaN, +-inf or NaN
  (dropped) for +-inf, else 0 or exactly x * scale.
- F.dropout_add_layer_norm vs the oracle: the pre-norm sum bit for bit; the output and gradients by
  the rule above against the oracle in float64.
- fusedtech.optim.{SGD, Adam, AdamW, RMSprop, Adagrad} vs torch.optim (foreach=False), fp32, on "torch"
  and "cpu": 1-3 param groups of random valid hyperparameters, no gradient for some parameters on some
  steps, a group added late, a parameter listed twice, StepLR, GradScaler-style scaled and skipped
  (found_inf) steps, the two classes' checkpoints swapped mid-run; params and state within atol = rtol
  = 1e-5 (test_optim_others.py's fp32 tolerance).
- Bad arguments, in a subprocess (a crash fails the test, not the run): each call raises TypeError,
  ValueError, RuntimeError or NotImplementedError whose message names the argument.
The last tests are the smallest cases of what this fuzzing found, kept as regression tests.

Budget: deadline=None, derandomize=True, database=None and a fixed seed per test. Profile
"fusedtech-fuzz" (CI): 40 examples a test on cpu/torch, 10 on triton; FUSEDTECH_FUZZ=deep selects
"fusedtech-fuzz-deep": 400 and 100. Measured on a 2-core machine: whole file ~25 s in CI, ~2 min deep.
"""
from __future__ import annotations

import copy
import math
import os
import re
import subprocess
import sys
import warnings
import zlib

import pytest
import torch
from hypothesis import HealthCheck, Phase, given, seed, settings, strategies as st

import fusedtech
from fusedtech import optim
from fusedtech.nn import functional as F
from conftest import cpu_backends

BACKENDS = cpu_backends()
# NaN and inf inputs make the Triton interpreter's numpy warn ("invalid value encountered in ...").
pytestmark = pytest.mark.filterwarnings("ignore:.*encountered in:RuntimeWarning")
settings.register_profile("fusedtech-fuzz", deadline=None, derandomize=True, database=None, max_examples=40,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("fusedtech-fuzz-deep", settings.get_profile("fusedtech-fuzz"), max_examples=400)
PROFILE = settings.get_profile("fusedtech-fuzz" + ("-deep" if os.environ.get("FUSEDTECH_FUZZ") == "deep" else ""))
TRITON_SHARE = 4
# Triton's interpreter (3.8) flushes bf16 subnormals cast to fp32 and misrounds fp32 subnormals cast to
# bf16 (a GPU's casts do not): no subnormal is drawn for a bf16 tensor that interpreted Triton runs.
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
# test_layer_norm.py's; float64's reference is torch's own float64 result, so ours may differ from it
# by the rounding of an ill-conditioned row (mean 1000, std 0.01: ~1e-11): 1e-9 still fails a float32 step.
ATOL = {torch.float32: 5e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2, torch.float64: 1e-9}
FLOATS = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
SPECIALS = [float("nan"), float("inf"), -float("inf"), 1e30, -1e30, 1e-40, -1e-40, 0.0]
CONSTANTS = [7.25, 30000.3, 0.0, 1e-40]  # the value of a constant row / channel
# (mean, std) of the normal values: |mean| / std <= 35. Rows of mean 1000 and std 1 or less make every
# fp32 result's error a few roundings of the mean, whose ratio between two implementations is heavy-
# tailed (ours is median 0.4-1x torch's, but up to 9x on rows of two): the dedicated tests below take them.
LOC_SCALE = st.sampled_from([(0.0, 1.0), (0.5, 2.0), (0.0, 1e-2), (0.0, 30.0), (1000.0, 30.0)])
ROWS = [1, 2, 3, 5, 8, 33, 127, 129, 257, 1025, 2049]  # partial tiles, one row a program, split rows
LEAD = [1, 2, 3, 5, 7, 1, 2, 3, 0]  # leading sizes, one in nine empty
VIEWS = ("contiguous", "transpose", "step", "expand", "channels_last")
PARAM_VIEWS = ("contiguous", "step", "expand")
CAP = {"cpu": 8192, "triton": 2100}  # elements of a drawn input


def _fuzz(backend, strategy, check):
    """check(backend, case) on the profile's number of drawn cases (a quarter on triton, unshrunk)."""
    if backend not in BACKENDS:
        pytest.skip(f"the {backend} backend does not run here")
    triton = backend == "triton"

    @seed(zlib.crc32(os.environ.get("PYTEST_CURRENT_TEST", "").split(" ")[0].encode()))
    @settings(PROFILE, max_examples=max(1, PROFILE.max_examples // (TRITON_SHARE if triton else 1)),
              phases=[Phase.explicit, Phase.reuse, Phase.generate] + ([] if triton else [Phase.shrink]))
    @given(case=strategy)
    def run(case):
        check(backend, case)

    run()


def _dtypes(backend):
    return FLOATS[:3] if backend == "triton" else FLOATS


@st.composite
def _shape(draw, min_dims, max_dims, cap):
    n = draw(st.sampled_from(ROWS))
    dims = draw(st.lists(st.sampled_from(LEAD), min_size=min_dims - 1, max_size=max_dims - 1))
    while math.prod(dims) * n > cap:
        dims[dims.index(max(dims))] //= 2
    return tuple(dims) + (n,)


@st.composite
def _values(draw, shape, dtype, backend, views=VIEWS, specials=True, grad=False):
    """A tensor's recipe, small enough that a falsifying example prints as its reproducer."""
    fits = {"transpose": len(shape) >= 2, "channels_last": len(shape) == 4}
    frac = st.floats(0, 1, exclude_max=True)
    subnormal = not (backend == "triton" and INTERPRETED and dtype == torch.bfloat16)
    values, constants = ([v for v in vs if (subnormal or abs(v) != 1e-40) and not (grad and abs(v) == 1e30)]
                         for vs in (SPECIALS, CONSTANTS))
    loc, scale = (0.0, 1.0) if grad else draw(LOC_SCALE)
    return dict(shape=shape, dtype=dtype, view=draw(st.sampled_from([v for v in views if fits.get(v, True)])),
                seed=draw(st.integers(0, 2 ** 16)), loc=loc, scale=scale,
                specials=draw(st.lists(st.tuples(frac, st.sampled_from(values)), max_size=3 if specials else 0)),
                constant=draw(st.none() | st.tuples(frac, st.sampled_from(constants)))
                if specials and not grad else None)


def _make(spec, constant_dim=-1):
    """A recipe's tensor: seeded normal values, the specials, a constant row (constant_dim -1) or
    channel (1), in the recipe's dtype, laid out as its view."""
    if spec is None:
        return None
    shape = spec["shape"]
    v = torch.randn(shape, generator=torch.Generator().manual_seed(spec["seed"]), dtype=torch.float64)
    v = v * spec["scale"] + spec["loc"]
    if v.numel():
        for frac, value in spec["specials"]:
            v.view(-1)[int(frac * v.numel())] = value
        if spec["constant"] is not None:
            rows = v.view(-1, shape[-1]) if constant_dim == -1 else v.transpose(0, 1)
            rows[int(spec["constant"][0] * rows.shape[0])] = spec["constant"][1]
    v, view = v.to(spec["dtype"]), spec["view"]
    if view == "transpose":
        return v.transpose(-1, -2).contiguous().transpose(-1, -2)
    if view == "step":
        base = torch.full(shape[:-1] + (2 * shape[-1],), 77.0, dtype=v.dtype)
        base[..., ::2] = v
        return base[..., ::2]
    if view == "expand":  # every entry along dim 0 is the first one's memory
        return v[:1].expand(shape)
    return v.contiguous(memory_format=torch.channels_last) if view == "channels_last" else v


def _run(fn, tensors, wants, dy):
    """[fn(*tensors)] + the gradients of <fn(...), dy> with respect to the tensors wanted."""
    ts = [None if t is None else t.detach().requires_grad_(bool(w)) for t, w in zip(tensors, wants)]
    y = fn(*ts)
    need = [t for t in ts if t is not None and t.requires_grad]
    return [y] + (list(torch.autograd.grad(y, need, dy)) if need else [])


def _seeded(backend, manual_seed, fn, *args):
    torch.manual_seed(manual_seed)
    with fusedtech.use_backend(backend):
        return fn(*args)


def _strides(t):
    """The strides that carry layout: of the dims of size > 1 (none for an empty tensor)."""
    return [s for n, s in zip(t.shape, t.stride()) if n > 1] if t.numel() else []


def _double(t):
    """The float64 reference's copy, dense: torch's CPU batch_norm backward reads a strided weight
    as if it were dense (found here: dx of w = base[::2] used base[1]), so the exact result takes
    dense parameters (test_batch_norm_with_a_strided_weight_has_its_dense_copys_gradients)."""
    return None if t is None else t.double().contiguous()


def _grad_names(names, tensors, wants):
    return [n for n, t, w in zip(names, tensors, wants) if t is not None and w]


def _assert_within_rule(name, ours, theirs, exact, dtype, rows=None, undefined=False):
    """The module docstring's rule: non-finite exact results reproduced, else per row of rows(t) (one
    row by default) our largest error <= 2 * torch's own + ATOL[dtype], in units of max(1, |exact|).
    undefined (gradients): where float64 torch's is not finite, any non-finite value of ours (an
    infinite incoming gradient makes the gradient undefined: torch's NaN is its formula's inf - inf,
    its own float32 and float64 disagree on a sign, ours may come out +-inf from another order)."""
    rows = rows or (lambda t: t.reshape(1, -1))
    assert ours.shape == theirs.shape and ours.dtype == theirs.dtype, (name, ours.shape, ours.dtype, theirs.dtype)
    o, t, e = ours.detach().double(), theirs.detach().double(), exact.detach().double()
    finite = e.isfinite()

    def same(a, b):  # NaN-aware equality
        return (a == b) | (a.isnan() & b.isnan())

    bad = ~finite & ~same(o, e) & ~(~same(t, e) & same(o, t))
    if undefined:
        bad &= o.isfinite()
    assert not bad.any(), (f"{name}: {o[bad][:4].tolist()} where float64 gives {e[bad][:4].tolist()}, "
                           f"torch {t[bad][:4].tolist()}")
    if o.numel() == 0:
        return

    def err(a):  # NaN or inf where the exact result is finite: an infinite error
        relative = ((a - e).abs() / e.abs().clamp(min=1.0)).nan_to_num(nan=math.inf)
        return rows(torch.where(finite, relative, 0.0)).amax(-1)

    ours_err, torch_err = err(o), err(t)
    bad = (ours_err > 2 * torch_err + ATOL[dtype]).nonzero().flatten()
    assert not len(bad), (f"{name}: row {int(bad[0])} error {ours_err[bad[0]].item():.3g} > 2 * torch's "
                          f"{torch_err[bad[0]].item():.3g} + {ATOL[dtype]}")


def _bits_equal(a, b):
    """Bit for bit, NaN positions included (NaN payloads aside)."""
    ints = {8: torch.int64, 4: torch.int32, 2: torch.int16}[a.element_size()]
    a, b = a.detach().contiguous(), b.detach().contiguous()
    return (a.shape == b.shape and a.dtype == b.dtype and torch.equal(a.isnan(), b.isnan())
            and torch.equal(a.view(ints)[~a.isnan()], b.view(ints)[~b.isnan()]))


# ---- LayerNorm / RMSNorm -------------------------------------------------------------------------

@st.composite
def _norm_cases(draw, backend, rms):
    shape, dtype = draw(_shape(1, 4, CAP[backend])), draw(st.sampled_from(_dtypes(backend)))
    k = draw(st.integers(1, min(2, len(shape))))
    # fp16/bf16 inputs may have fp32 parameters (torch's CPU norms refuse other mixes)
    pdtype = draw(st.sampled_from([dtype, torch.float32])) if dtype in (torch.float16, torch.bfloat16) else dtype
    param = st.none() | _values(shape[-k:], pdtype, backend, PARAM_VIEWS, specials=False)
    w, b = draw(param), None if rms else draw(param)
    if w is None and b is not None:  # (torch's CPU backward refuses an fp32 bias alone for fp16/bf16 x)
        b["dtype"] = dtype
    return dict(x=draw(_values(shape, dtype, backend)), k=k, w=w, b=b,
                dy=draw(_values(shape, dtype, backend, ("contiguous",), grad=True)),
                eps=draw(st.sampled_from([1e-5, 1e-6, 1e-3] + ([None] if rms else []))),
                memory_efficient=draw(st.booleans()),
                wants=draw(st.tuples(*[st.booleans()] * 3)))


def _check_norm(backend, case, rms):
    x, w, b, dy = (_make(case[k]) for k in ("x", "w", "b", "dy"))
    shape, eps, me = tuple(x.shape[-case["k"]:]), case["eps"], case["memory_efficient"]
    if rms:
        ours_fn = lambda x, w, b: F.rms_norm(x, shape, w, eps, memory_efficient=me)  # noqa: E731
        torch_fn = lambda x, w, b: torch.nn.functional.rms_norm(x, shape, w, eps)  # noqa: E731
    else:
        ours_fn = lambda x, w, b: F.layer_norm(x, shape, w, b, eps, memory_efficient=me)  # noqa: E731
        torch_fn = lambda x, w, b: torch.nn.functional.layer_norm(x, shape, w, b, eps)  # noqa: E731
    def run_ours(backend, tensors):
        with fusedtech.use_backend(backend), warnings.catch_warnings():
            warnings.filterwarnings("ignore", "fusedtech: LayerNorm/RMSNorm memory_efficient")
            return _run(ours_fn, tensors, case["wants"], dy)

    ours = run_ours(backend, [x, w, b])
    # memory_efficient recovers xhat from the output as stored, (y - b) / w: its backward carries y's
    # rounding by design (large where |b| >> |w xhat|), so the error to match is that of the same
    # algorithm in torch ops, the oracle's, not of torch's op that keeps x.
    theirs = run_ours("torch", [x, w, b]) if me else _run(torch_fn, [x, w, b], case["wants"], dy)
    exact = _run(torch_fn, [x.double(), _double(w), _double(b)], case["wants"], dy.double())
    assert _strides(ours[0]) == _strides(torch_fn(x, w, b)), (ours[0].stride(), torch_fn(x, w, b).stride())
    n = math.prod(shape)
    for name, o, t, e in zip(["y"] + _grad_names(("dx", "dw", "db"), (x, w, b), case["wants"]), ours, theirs, exact):
        _assert_within_rule(name, o, t, e, x.dtype, (lambda t: t.reshape(-1, n)) if name in ("y", "dx") else None,
                            undefined=name != "y")


@pytest.mark.filterwarnings("ignore:Mismatch dtype between input and weight")  # torch's rms_norm
@pytest.mark.parametrize("backend", ["cpu", "triton"])
@pytest.mark.parametrize("rms", [False, True], ids=["layer_norm", "rms_norm"])
def test_layer_norm_and_rms_norm_match_torch_on_random_shapes_views_and_values(backend, rms):
    _fuzz(backend, _norm_cases(backend, rms), lambda backend, case: _check_norm(backend, case, rms))


# ---- BatchNorm -----------------------------------------------------------------------------------

@st.composite
def _batch_norm_cases(draw, backend):
    sizes = [draw(st.sampled_from([0, 1, 2, 3, 5, 8])), draw(st.sampled_from([1, 2, 3, 7, 16]))]
    sizes += draw(st.lists(st.sampled_from([1, 2, 3, 5, 9]), max_size=3))
    while math.prod(sizes) > CAP[backend] // 4:
        sizes[sizes.index(max(sizes))] //= 2
    shape, dtype = tuple(sizes), draw(st.sampled_from(_dtypes(backend)))
    pdtype = draw(st.sampled_from([dtype, torch.float32])) if dtype in (torch.float16, torch.bfloat16) else dtype
    param = st.none() | _values(shape[1:2], pdtype, backend, ("contiguous", "step"), specials=False)
    training = draw(st.booleans())
    return dict(x=draw(_values(shape, dtype, backend)), w=draw(param), b=draw(param), training=training,
                running=(not training) or draw(st.booleans()), pdtype=pdtype, stats_seed=draw(st.integers(0, 99)),
                momentum=draw(st.sampled_from([0.0, 0.1, 0.5, 1.0])), eps=draw(st.sampled_from([1e-5, 1e-3, 0.1])),
                dy=draw(_values(shape, dtype, backend, ("contiguous",), grad=True)),
                wants=draw(st.tuples(*[st.booleans()] * 3)))


def _check_batch_norm(backend, case):
    x, w, b, dy = _make(case["x"], constant_dim=1), _make(case["w"]), _make(case["b"]), _make(case["dy"])
    c, training = x.shape[1], case["training"]
    g = torch.Generator().manual_seed(case["stats_seed"])
    stats = (torch.randn(c, generator=g), torch.rand(c, generator=g) * 2) if case["running"] else (None, None)
    runs = {k: [None if s is None else s.to(torch.float64 if k == "exact" else case["pdtype"]) for s in stats]
            for k in ("ours", "theirs", "exact")}  # updated in place by each call

    def fn(f, key):
        return lambda x, w, b: f(x, *runs[key], w, b, training, case["momentum"], case["eps"])

    if training and x.shape[0] * math.prod(x.shape[2:]) == 1:
        for f in (F.batch_norm, torch.nn.functional.batch_norm):
            with pytest.raises(ValueError, match="more than 1 value per channel"), fusedtech.use_backend(backend):
                f(x, None, None, w, b, True)
        return
    with fusedtech.use_backend(backend):
        ours = _run(fn(F.batch_norm, "ours"), [x, w, b], case["wants"], dy)
    theirs = _run(fn(torch.nn.functional.batch_norm, "theirs"), [x, w, b], case["wants"], dy)
    exact = _run(fn(torch.nn.functional.batch_norm, "exact"), [x.double(), _double(w), _double(b)], case["wants"],
                 dy.double())
    assert _strides(ours[0]) == _strides(theirs[0]), (ours[0].stride(), theirs[0].stride())
    for name, o, t, e in zip(["y"] + _grad_names(("dx", "dw", "db"), (x, w, b), case["wants"]), ours, theirs, exact):
        channels = lambda t: t.transpose(0, 1).reshape(c, -1)  # noqa: E731
        _assert_within_rule(name, o, t, e, x.dtype, channels if name in ("y", "dx") else None, undefined=name != "y")
    for name, o, t, e in zip(("running_mean", "running_var"), *runs.values()):
        if o is not None:
            _assert_within_rule(name, o, t, e, x.dtype)


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_batch_norm_matches_torch_in_training_and_eval_with_running_stats(backend):
    _fuzz(backend, _batch_norm_cases(backend), _check_batch_norm)


# ---- dropout, DropBlock, dropout + add + LayerNorm: the oracle's masks, bit for bit ----------------

P = st.sampled_from([0.0, 0.1, 0.5, 0.9, 1.0]) | st.floats(0, 1)


@st.composite
def _dropout_cases(draw, backend):
    shape, dtype = draw(_shape(1, 4, CAP[backend])), draw(st.sampled_from(_dtypes(backend)))
    x = draw(_values(shape, dtype, backend))
    return dict(x=x, dy=draw(_values(shape, dtype, backend, ("contiguous",), grad=True)), p=draw(P),
                seed=draw(st.integers(0, 2 ** 31)), grad=draw(st.booleans()),
                inplace=x["view"] != "expand" and draw(st.booleans()))


def _check_dropout(backend, case):
    x, dy, p = _make(case["x"]), _make(case["dy"]), case["p"]
    if case["inplace"]:
        inputs = {b: x.clone() for b in (backend, "torch")}
        outs = {b: _seeded(b, case["seed"], F.dropout, t, p, True, True) for b, t in inputs.items()}
        assert all(outs[b] is inputs[b] for b in outs) and _bits_equal(outs[backend], outs["torch"])
    ours, oracle = (_seeded(b, case["seed"], _run, lambda t: F.dropout(t, p), [x], [case["grad"]], dy)
                    for b in (backend, "torch"))
    assert all(_bits_equal(o, r) for o, r in zip(ours, oracle))
    y = ours[0]
    assert _strides(y) == _strides(torch.nn.functional.dropout(x, p)), (y.stride(), x.stride())
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    scaled = (x.to(acc) * torch.tensor(1 / (1 - p) if p < 1 else 0.0, dtype=acc)).to(x.dtype)
    assert (y.isnan() == x.isnan())[~x.isinf()].all()  # NaN for NaN, never for a finite input
    assert ((y == x) | y.isnan())[x.isinf()].all()  # +-inf kept, or dropped: inf * 0 = NaN
    assert ((y == 0) | (y == scaled))[x.isfinite()].all()


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_dropout_is_bit_identical_to_the_oracle_and_gives_zero_or_the_scaled_input(backend):
    _fuzz(backend, _dropout_cases(backend), _check_dropout)


@st.composite
def _drop_block_cases(draw, backend):
    h, w = draw(st.sampled_from([1, 2, 3, 5, 8, 13])), draw(st.sampled_from([1, 2, 3, 5, 8, 13, 33]))
    shape = (draw(st.sampled_from([0, 1, 2, 3])), draw(st.sampled_from([1, 2, 5])), h, w)
    dtype = draw(st.sampled_from(_dtypes(backend)))
    return dict(x=draw(_values(shape, dtype, backend)),
                dy=draw(_values(shape, dtype, backend, ("contiguous",), grad=True)),
                p=draw(P), block=draw(st.sampled_from([b for b in (1, 3, 5, 7) if b <= min(h, w) or min(h, w) % 2])),
                seed=draw(st.integers(0, 2 ** 31)), grad=draw(st.booleans()))


def _check_drop_block(backend, case):
    x, dy = _make(case["x"]), _make(case["dy"])
    fn = lambda t: F.drop_block2d(t, case["p"], case["block"])  # noqa: E731
    ours, oracle = (_seeded(b, case["seed"], _run, fn, [x], [case["grad"]], dy) for b in (backend, "torch"))
    assert all(_bits_equal(o, r) and _strides(o) == _strides(r) for o, r in zip(ours, oracle))
    y = ours[0]  # a product with the mask: NaN stays NaN, a finite input never becomes NaN
    assert y[x.isnan()].isnan().all() and not y[x.isfinite()].isnan().any()


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_drop_block_is_bit_identical_to_the_oracle_forward_and_backward(backend):
    _fuzz(backend, _drop_block_cases(backend), _check_drop_block)


@st.composite
def _dropout_add_norm_cases(draw, backend):
    shape, dtype = draw(_shape(1, 3, CAP[backend])), draw(st.sampled_from(_dtypes(backend)))
    rdtype = draw(st.sampled_from([dtype, torch.float32]))
    param = st.none() | _values(shape[-1:], dtype, backend, PARAM_VIEWS, specials=False)
    dout = _values(shape, torch.promote_types(dtype, rdtype), backend, ("contiguous",), grad=True)
    return dict(x=draw(_values(shape, dtype, backend)), residual=draw(st.none() | _values(shape, rdtype, backend)),
                w=draw(param), b=draw(param), rms=draw(st.booleans()), p=draw(P), training=draw(st.booleans()),
                seed=draw(st.integers(0, 2 ** 31)), douts=[draw(dout), draw(dout)],
                wants=draw(st.tuples(*[st.booleans()] * 4)))


def _check_dropout_add_norm(backend, case):
    x, r, w, b = (_make(case[k]) for k in ("x", "residual", "w", "b"))
    douts, n, total = [_make(d) for d in case["douts"]], x.shape[-1], x.numel()

    def run(backend, tensors, douts):  # (out, pre-norm sum) as one flat tensor
        def fn(*leaves):
            return torch.cat([t.reshape(-1) for t in F.dropout_add_layer_norm(
                *leaves, p=case["p"], training=case["training"], rms=case["rms"], return_residual=True)])
        dout = torch.cat([d.reshape(-1) for d in douts])
        return _seeded(backend, case["seed"], _run, fn, tensors, case["wants"], dout)

    ours, oracle = run(backend, [x, r, w, b], douts), run("torch", [x, r, w, b], douts)
    exact = run("torch", [_double(t) for t in (x, r, w, b)], [d.double() for d in douts])
    assert _bits_equal(ours[0][total:], oracle[0][total:]), "the pre-norm sum"
    names = ["out"] + _grad_names(("dx", "dresidual", "dw", "db"), (x, r, w, b), case["wants"])
    for name, o, t, e in zip(names, ours, oracle, exact):
        o, t, e = (v[:total] if name == "out" else v for v in (o, t, e))
        rows = (lambda t: t.reshape(-1, n)) if name in ("out", "dx", "dresidual") else None
        _assert_within_rule(name, o, t, e, x.dtype, rows, undefined=name != "out")


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_dropout_add_layer_norm_matches_the_oracle_within_layer_norm_tolerance(backend):
    _fuzz(backend, _dropout_add_norm_cases(backend), _check_dropout_add_norm)


# ---- optimizers --------------------------------------------------------------------------------

PARAM_SHAPES = ["0", "1", "7", "33", "5x3", "t4x6", "s8x6"]  # empty, one element, transposed, strided


@st.composite
def _hyper(draw, name):
    """Hyperparameters within torch's valid ranges."""
    h = dict(lr=draw(st.floats(1e-4, 0.1)), weight_decay=draw(st.sampled_from([0.0, 1e-2, 0.1])),
             maximize=draw(st.booleans()))
    if name == "SGD":
        h["momentum"] = draw(st.sampled_from([0.0, 0.5, 0.9]))
        h["dampening"] = draw(st.sampled_from([0.0, 0.3])) if h["momentum"] else 0.0
        h["nesterov"] = bool(h["momentum"] and not h["dampening"] and draw(st.booleans()))
    elif name in ("Adam", "AdamW"):
        h.update(betas=(draw(st.sampled_from([0.0, 0.5, 0.9])), draw(st.sampled_from([0.9, 0.99, 0.999]))),
                 eps=draw(st.sampled_from([1e-8, 1e-6, 1e-3])), amsgrad=draw(st.booleans()))
    elif name == "RMSprop":
        h.update(alpha=draw(st.sampled_from([0.5, 0.9, 0.99])), eps=draw(st.sampled_from([1e-8, 1e-6])),
                 momentum=draw(st.sampled_from([0.0, 0.5, 0.9])), centered=draw(st.booleans()))
    else:
        h.update(lr_decay=draw(st.sampled_from([0.0, 0.01, 0.1])), eps=draw(st.sampled_from([1e-10, 1e-6])),
                 initial_accumulator_value=draw(st.sampled_from([0.0, 0.1, 1.0])))
    return h


@st.composite
def _optimizer_cases(draw, name):
    shapes = st.lists(st.sampled_from(PARAM_SHAPES), min_size=1, max_size=3)
    groups = [(draw(_hyper(name)), draw(shapes)) for _ in range(draw(st.integers(1, 3)))]
    steps = draw(st.integers(3, 8))
    return dict(groups=groups, steps=steps, seed=draw(st.integers(0, 2 ** 16)),
                late=draw(st.integers(1, steps - 1)) if len(groups) > 1 and draw(st.booleans()) else None,
                duplicate=draw(st.none() | st.integers(0, 2)),  # which parameter of group 0 is listed twice
                frozen=draw(st.sampled_from([0.0, 0.3])), scheduler=draw(st.booleans()),
                modes=draw(st.lists(st.sampled_from(["plain", "scaled", "inf"]), min_size=steps, max_size=steps)),
                scale=draw(st.sampled_from([2.0 ** -4, 2.0 ** 10, 2.0 ** 16])),
                checkpoint=draw(st.none() | st.integers(1, steps - 1)))


def _param(code, g):
    if code[0] in "ts":
        t = torch.randn(int(code[1]), int(code[3]), generator=g)
        return torch.nn.Parameter(t.t() if code[0] == "t" else t[:, ::2])
    return torch.nn.Parameter(torch.randn([int(s) for s in code.split("x")], generator=g))


def _fresh(state):
    """No state, or one no step has counted yet: a found_inf step may leave a fresh state (step 0,
    zeros), as torch's own fused=True optimizers do; it steps on exactly as none would."""
    return not state or ("step" in state and float(state["step"]) == 0)


def _assert_same_training_state(ref, ref_params, opt, params):
    for r, p in zip(ref_params, params):
        torch.testing.assert_close(p, r, atol=1e-5, rtol=1e-5)
        sr, so = ref.state.get(r, {}), opt.state.get(p, {})
        if _fresh(sr) or _fresh(so):
            assert _fresh(sr) and _fresh(so), (dict(sr), dict(so))
            continue
        assert set(sr) <= set(so), (set(sr), set(so))
        for key in sr:
            torch.testing.assert_close(so[key], sr[key], atol=1e-5, rtol=1e-5, msg=lambda m: f"state {key}: {m}")
    keys = [{i for i, s in o.state_dict()["state"].items() if not _fresh(s)} for o in (opt, ref)]
    assert keys[0] == keys[1], keys


def _check_optimizer(backend, case, name):
    torch_cls, fused_cls = getattr(torch.optim, name), getattr(optim, name)
    hypers, g = [h for h, _ in case["groups"]], torch.Generator().manual_seed(case["seed"])
    ours = [[_param(code, g) for code in codes] for _, codes in case["groups"]]
    theirs = [[torch.nn.Parameter(p.detach().clone()) for p in ps] for ps in ours]

    def make(cls, params, count, **kw):
        groups = [dict(hypers[i], params=list(params[i])) for i in range(count)]
        if case["duplicate"] is not None:  # torch warns and steps it once per listing
            groups[0]["params"].append(groups[0]["params"][case["duplicate"] % len(groups[0]["params"])])
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            opt = cls(groups, **hypers[0], **kw)
        assert (case["duplicate"] is not None) == any("duplicate parameters" in str(w.message) for w in seen), cls
        return opt

    def schedule(opt, old=None):
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
        if old is not None:
            sched.load_state_dict(old.state_dict())
        return sched

    first = len(hypers) - (case["late"] is not None)
    opt, ref = make(fused_cls, ours, first), make(torch_cls, theirs, first, foreach=False)
    scheds = [schedule(opt), schedule(ref)] if case["scheduler"] else []
    for step, mode in enumerate(case["modes"]):
        if step == case["late"]:
            opt.add_param_group(dict(hypers[-1], params=ours[-1]))
            ref.add_param_group(dict(hypers[-1], params=theirs[-1]))
        if step == case["checkpoint"]:  # torch's checkpoint into ours and ours into torch's, mid-run
            count = len(opt.param_groups)
            new_opt, new_ref = make(fused_cls, ours, count), make(torch_cls, theirs, count, foreach=False)
            new_opt.load_state_dict(copy.deepcopy(ref.state_dict()))
            new_ref.load_state_dict(copy.deepcopy(opt.state_dict()))
            opt, ref = new_opt, new_ref
            scheds = [schedule(opt, scheds[0]), schedule(ref, scheds[1])] if scheds else []
        gg = torch.Generator().manual_seed(case["seed"] * 31 + step)
        for p, r in zip(*(sum(ps[:len(o.param_groups)], []) for ps, o in ((ours, opt), (theirs, ref)))):
            grad = torch.randn(p.shape, generator=gg)
            frozen = torch.rand((), generator=gg).item() < case["frozen"]
            r.grad = None if frozen else grad
            p.grad = None if frozen else grad * (case["scale"] if mode != "plain" else 1.0)
        if mode != "plain":  # what GradScaler hands a fused step: scaled gradients, the scale, the inf flag
            opt.grad_scale, opt.found_inf = torch.tensor(case["scale"]), torch.tensor(float(mode == "inf"))
        with fusedtech.use_backend(backend):
            opt.step()
        opt.__dict__.pop("grad_scale", None), opt.__dict__.pop("found_inf", None)
        if mode != "inf":  # GradScaler skips torch's step
            ref.step()
        if mode == "scaled":  # left unscaled, once, as torch's
            assert all(p.grad is None or torch.equal(p.grad, r.grad) for p, r in zip(sum(ours, []), sum(theirs, [])))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # (lr_scheduler.step() before optimizer.step(), after a skipped step)
            for s in scheds:
                s.step()
    _assert_same_training_state(ref, sum(theirs, []), opt, sum(ours, []))
    assert [g["lr"] for g in opt.param_groups] == [g["lr"] for g in ref.param_groups]


@pytest.mark.parametrize("backend", ["torch", "cpu"])
@pytest.mark.parametrize("name", ["SGD", "Adam", "AdamW", "RMSprop", "Adagrad"])
def test_optimizer_matches_torch_over_random_groups_schedules_scaled_steps_and_checkpoints(backend, name):
    _fuzz(backend, _optimizer_cases(name), lambda backend, case: _check_optimizer(backend, case, name))


# ---- bad arguments, in a subprocess: a crash fails the test instead of ending the run ---------------

_BAD_CALLS = r'''
import re, sys, warnings
import torch, fusedtech
from fusedtech import optim
from fusedtech.nn import functional as F
warnings.simplefilter("ignore")
x, x4, one, c64, i64 = torch.randn(4, 6), torch.randn(2, 3, 5, 5), torch.ones(6), torch.complex64, torch.int64
bn, bna, ln, rms, dan = F.batch_norm, F.batch_norm_act, F.layer_norm, F.rms_norm, F.dropout_add_layer_norm


def param():
    return torch.nn.Parameter(torch.randn(3, 2))


def step(cls, grad=None, dtype=torch.float32):
    p = torch.nn.Parameter(torch.randn(3, 2).to(dtype))
    p.grad = torch.randn(3, 2).to(dtype) if grad is None else grad
    cls([p]).step()


NN = [  # (call, a pattern its message must match (the argument), the call)
    ("layer_norm, integer weight", r"\bweight\b", lambda: ln(x, (6,), one.to(i64))),
    ("layer_norm, complex weight", r"\bweight\b", lambda: ln(x, (6,), one.to(c64))),
    ("layer_norm, complex bias", r"\bbias\b", lambda: ln(x, (6,), one, one.to(c64))),
    ("layer_norm, weight of 5 for rows of 6", r"\bweight\b", lambda: ln(x, (6,), torch.ones(5))),
    ("layer_norm, bias of 7 for rows of 6", r"\bbias\b", lambda: ln(x, (6,), one, torch.ones(7))),
    ("layer_norm, weight on another device", r"\bweight\b", lambda: ln(x, (6,), torch.ones(6, device="meta"))),
    ("layer_norm, integer input", r"\binput\b", lambda: ln(x.to(i64), (6,))),
    ("layer_norm, complex input", r"\binput\b", lambda: ln(x.to(c64), (6,))),
    ("layer_norm, normalized_shape (5,) for rows of 6", "normalized_shape", lambda: ln(x, (5,))),
    ("layer_norm, normalized_shape None", "normalized_shape", lambda: ln(x, None)),
    ("rms_norm, complex weight", r"\bweight\b", lambda: rms(x, (6,), one.to(c64))),
    ("rms_norm, integer input", r"\binput\b", lambda: rms(x.to(i64), (6,))),
    ("batch_norm, training with eps=0", r"\beps\b", lambda: bn(x, None, None, training=True, eps=0.0)),
    ("batch_norm, eval with eps<0", r"\beps\b", lambda: bn(x, one * 0, one, training=False, eps=-1.0)),
    ("batch_norm, running_mean of 5 for 6 channels", "running_mean", lambda: bn(x, torch.zeros(5), one, training=True)),
    ("batch_norm, running_var without running_mean", "running_mean", lambda: bn(x, None, one, training=True)),
    ("batch_norm, eval without running statistics", "running_mean", lambda: bn(x, None, None, training=False)),
    ("batch_norm, complex weight", r"\bweight\b", lambda: bn(x, None, None, one.to(c64), training=True)),
    ("batch_norm, weight of 5 for 6 channels", r"\bweight\b", lambda: bn(x, None, None, torch.ones(5), training=True)),
    ("batch_norm, integer running_mean", "running_mean", lambda: bn(x, one.to(i64), one, training=True)),
    ("batch_norm, integer input", r"\binput\b", lambda: bn(x.to(i64), None, None, training=True)),
    ("batch_norm, 1-d input", r"\binput\b", lambda: bn(one, None, None, training=True)),
    ("batch_norm, one value per channel in training", r"\binput\b", lambda: bn(x[:1], None, None, training=True)),
    ("batch_norm_act, activation 'tanh'", "activation", lambda: bna(x, None, None, training=True, activation="tanh")),
    ("batch_norm_act, residual of another shape", "residual", lambda: bna(x, None, None, None, None, True, residual=x[:, :5])),
    ("dropout, p=1.5", "probability", lambda: F.dropout(x, 1.5)),
    ("dropout, p=nan", "probability", lambda: F.dropout(x, float("nan"))),
    ("dropout, integer input", r"\binput\b", lambda: F.dropout(x.to(i64), 0.5)),
    ("dropout, bool input", r"\binput\b", lambda: F.dropout(x > 0, 0.5)),
    ("dropout, complex input (torch's CPU dropout refuses it)", r"\binput\b", lambda: F.dropout(x.to(c64), 0.5)),
    ("drop_block2d, p=1.5", "probability", lambda: F.drop_block2d(x4, 1.5, 3)),
    ("drop_block2d, 3-d input", r"\binput\b", lambda: F.drop_block2d(x4[0], 0.1, 3)),
    ("drop_block2d, even block_size", r"\bblock", lambda: F.drop_block2d(x4, 0.1, 2)),
    ("drop_block2d, block_size=-1", r"\bblock", lambda: F.drop_block2d(x4, 0.1, -1)),
    ("drop_block2d, integer input", r"\binput\b", lambda: F.drop_block2d(x4.to(i64), 0.1, 3)),
    ("dropout_add_layer_norm, p=2", "probability", lambda: dan(x, x, p=2.0)),
    ("dropout_add_layer_norm, residual of another shape", "residual", lambda: dan(x, x[:, :5])),
    ("dropout_add_layer_norm, weight of 5 for rows of 6", r"\bweight\b", lambda: dan(x, x, torch.ones(5))),
    ("dropout_add_layer_norm, complex weight", r"\bweight\b", lambda: dan(x, x, one.to(c64))),
    ("dropout_add_layer_norm, integer x", r"\bx\b|\binput\b", lambda: dan(x.to(i64), x.to(i64))),
]
OPTIM = [
    ("LAMB, sparse gradient", "sparse", lambda: step(optim.LAMB, grad=torch.randn(3, 2).to_sparse())),
    ("LAMB, float64 parameter", "param", lambda: step(optim.LAMB, dtype=torch.float64)),
    ("LAMB, complex parameter", "complex", lambda: step(optim.LAMB, dtype=c64)),
    ("LAMB, trust_clamp (2, 1)", "trust_clamp", lambda: optim.LAMB([param()], trust_clamp=(2.0, 1.0))),
    ("LAMB, max_grad_norm=0", "max_grad_norm", lambda: optim.LAMB([param()], max_grad_norm=0)),
    ("LAMB, clamp_value<0", "clamp", lambda: optim.LAMB([param()], clamp_value=-1.0)),
    ("LAMB, betas[1]=1", "beta", lambda: optim.LAMB([param()], betas=(0.9, 1.0))),
    ("SGD, nesterov without momentum", "nesterov", lambda: optim.SGD([param()], lr=0.1, nesterov=True)),
    ("SGD, momentum<0", "momentum", lambda: optim.SGD([param()], lr=0.1, momentum=-0.5)),
    ("Adam, betas[0]=1", "beta", lambda: optim.Adam([param()], betas=(1.0, 0.9))),
    ("RMSprop, alpha<0", "alpha", lambda: optim.RMSprop([param()], alpha=-1.0)),
    ("Adagrad, lr_decay<0", "lr_decay", lambda: optim.Adagrad([param()], lr_decay=-1.0)),
    ("Adagrad, initial_accumulator_value<0", "initial_accumulator_value",
     lambda: optim.Adagrad([param()], initial_accumulator_value=-1.0)),
    ("a parameter in two groups", "parameter group",
     lambda: (lambda p: optim.Adam([dict(params=[p]), dict(params=[p])]))(param())),
] + [(f"{n}, sparse gradient", "sparse", lambda n=n: step(getattr(optim, n), grad=torch.randn(3, 2).to_sparse()))
     for n in ("Adam", "AdamW", "RMSprop")
] + [(f"{n}, {kw}", word, lambda n=n, kw=kw: getattr(optim, n)([param()], **kw))
     for n in ("SGD", "Adam", "AdamW", "RMSprop", "Adagrad", "LAMB")
     for word, kw in (("learning rate", dict(lr=-1.0)), ("weight_decay", dict(weight_decay=-1.0)),
                      ("epsilon", dict(eps=-1.0)), ("differentiable", dict(differentiable=True)))
     if not (n == "SGD" and "eps" in kw) and not (n == "LAMB" and "differentiable" in kw)]

failed = 0
for backend in fusedtech.available_backends("cpu"):
    for what, word, call in globals()[sys.argv[1]]:
        try:
            with fusedtech.use_backend(backend):
                call()
            verdict = "no exception"
        except (TypeError, ValueError, RuntimeError, NotImplementedError) as e:
            message = (str(e).splitlines() or [""])[0]
            verdict = None if re.search(word, message, re.I) else f"{type(e).__name__} not naming {word!r}: {message}"
        except BaseException as e:  # noqa: B036 - any other exception fails too
            verdict = f"{type(e).__name__}: {e}"
        failed += verdict is not None
        print(("ok  " if verdict is None else "BAD ") + f"[{backend}] {what}" + (f": {verdict}" if verdict else ""))
sys.exit(1 if failed else 0)
'''


@pytest.mark.parametrize("calls", ["NN", "OPTIM"], ids=["norms_dropout_batch_norm", "optimizers"])
def test_bad_arguments_raise_an_error_naming_the_argument_on_every_backend(calls):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    done = subprocess.run([sys.executable, "-c", _BAD_CALLS, calls], cwd=root, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, f"exit status {done.returncode}\n{done.stdout}\n{done.stderr[-3000:]}"
    assert len(re.findall(r"^ok  \[", done.stdout, re.M)) >= 10, done.stdout  # the calls did run


# ---- the smallest cases of what the fuzzing found, kept as regression tests ---------------------

ALL = [b for b in ("cpu", "triton", "torch") if b in BACKENDS]


@pytest.mark.parametrize("backend", ALL)
def test_rms_norm_keeps_a_channels_last_layout_as_torch(backend):
    x = torch.randn(2, 3, 4, 5).contiguous(memory_format=torch.channels_last)
    with fusedtech.use_backend(backend):
        y = F.rms_norm(x, (5,), torch.ones(5), 1e-6)
    assert y.stride() == torch.nn.functional.rms_norm(x, (5,), torch.ones(5), 1e-6).stride() == x.stride()


@pytest.mark.parametrize("backend", ALL)
def test_layer_norm_gradient_of_an_infinite_incoming_gradient_is_not_finite_where_torchs_is_nan(backend):
    # Undefined either way: torch's NaN is its formula's inf - inf, ours is -inf where its order
    # gives one (the rule's `undefined`); a finite value would be the silent wrong answer.
    x, dy = torch.tensor([[-1.0, -1.0, 0.5]]), torch.tensor([[float("inf"), 0.5, -1.0]])
    with fusedtech.use_backend(backend):
        (dx,) = _run(lambda t: F.layer_norm(t, (3,)), [x], [True], dy)[1:]
    (tdx,) = _run(lambda t: torch.nn.functional.layer_norm(t, (3,)), [x], [True], dy)[1:]
    assert tdx.isnan().all() and not dx.isfinite().any(), dx


@pytest.mark.parametrize("backend", ALL)
def test_batch_norm_with_a_strided_weight_has_its_dense_copys_gradients(backend):
    # torch's own CPU backward reads a strided weight as if dense (dx of channel 1 used base[1] = 77);
    # ours takes the weight's values.
    x = torch.randn(4, 2, 3, requires_grad=True)
    base = torch.full((4,), 77.0)
    base[::2] = torch.tensor([1.5, -0.3])
    dy = torch.randn(4, 2, 3)
    with fusedtech.use_backend(backend):
        (dx,) = torch.autograd.grad(F.batch_norm(x, None, None, base[::2], None, True), x, dy)
    (expected,) = torch.autograd.grad(torch.nn.functional.batch_norm(x, None, None, base[::2].contiguous(), None, True),
                                      x, dy)
    torch.testing.assert_close(dx, expected, atol=1e-5, rtol=1e-5)  # test_batch_norm.py's fp32 tolerance


@pytest.mark.parametrize("backend", ALL)
def test_batch_norm_running_mean_of_a_channel_holding_inf_is_inf_as_torch(backend):
    x, rm, trm = torch.tensor([[float("inf")], [0.5]]), torch.zeros(1), torch.zeros(1)
    with fusedtech.use_backend(backend):
        F.batch_norm(x, rm, torch.ones(1), None, None, True, 0.1, 1e-5)
    torch.nn.functional.batch_norm(x, trm, torch.ones(1), None, None, True, 0.1, 1e-5)
    assert trm.item() == float("inf") and rm.item() == float("inf"), rm


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("training", [False, True])
@pytest.mark.parametrize("x", [1000 + 0.01 * torch.randn(256, 4, generator=torch.Generator().manual_seed(2)),
                               torch.tensor([[1e30], [1.0], [2.0], [3.0]])], ids=["mean-1000-std-0.01", "1e30"])
def test_batch_norm_of_a_large_mean_or_value_is_within_twice_torchs_error(backend, training, x):
    # x * (w invstd) + (b - mean w invstd) rounds at |mean| invstd (1e5 here), (x - mean) * invstd does
    # not; a variance of 1e59 overflows float32 (torch's CPU kernel sums in double).
    stats = (None, None) if training else (x.double().mean(0).float(), x.double().var(0).float())
    with fusedtech.use_backend(backend):
        ours = F.batch_norm(x, *stats, training=training)
    exact = torch.nn.functional.batch_norm(x.double(), *(_double(s) for s in stats), training=training)
    _assert_within_rule("y", ours, torch.nn.functional.batch_norm(x, *stats, training=training), exact, x.dtype)
