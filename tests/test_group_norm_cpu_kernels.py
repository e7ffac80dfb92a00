"""The compiled CPU GroupNorm kernels (torch.ops.fusedtech_C.group_norm_fwd / group_norm_bwd, called
directly) against the oracle, fusedtech/reference/group_norm.py.

Tolerances: fp32 atol = rtol = 1e-5 against the oracle on the same input; float64 1e-12; fp16 / bf16
outputs within one rounding of the oracle run in fp32 on the upcast input and then rounded (atol =
rtol = 1e-3 for fp16, 1e-2 for bf16), their fp32 statistics and weight gradients at fp32's 1e-5.
"""
from __future__ import annotations

import pytest
import torch

import fusedtech
from fusedtech.reference import group_norm as ref

pytestmark = pytest.mark.skipif("cpu" not in fusedtech.available_backends("cpu"),
                                reason="the C++ cpu extension is not built")
ops = torch.ops.fusedtech_C

CL = torch.channels_last
CL3D = torch.channels_last_3d
# (shape, groups, memory format)
CASES = [((2, 6, 5, 7), 3, None), ((3, 4), 2, None), ((2, 8, 3, 3, 3), 8, None), ((2, 8, 3, 3, 3), 8, CL3D),
         ((2, 4, 3, 3), 2, CL), ((1, 1, 2), 1, None), ((2, 5, 1), 5, None),
         ((2, 320, 16, 16), 32, None), ((2, 320, 16, 16), 32, CL)]
TOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2, torch.float64: 1e-12}
ACTIVATIONS = {0: "none", 1: "relu", 2: "gelu", 3: "silu"}


def _ids(case):
    shape, groups, fmt = case
    return f"{tuple(shape)}-G{groups}" + ("" if fmt is None else "-" + str(fmt).split(".")[-1])


def _inputs(shape, fmt, dtype, affine, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=g, dtype=torch.float64) * 2 + 0.5).to(dtype)
    dy = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)
    if fmt is not None:
        x, dy = x.contiguous(memory_format=fmt), dy.contiguous(memory_format=fmt)
    c = shape[1]
    w = torch.randn(c, generator=g, dtype=torch.float64).to(dtype) if affine != "none" else None
    b = torch.randn(c, generator=g, dtype=torch.float64).to(dtype) if affine == "weight+bias" else None
    return x, w, b, dy


def _up(t):
    return None if t is None else t.float()


def _close(actual, expected, tol):
    torch.testing.assert_close(actual, expected, atol=tol, rtol=tol)


@pytest.mark.parametrize("case", CASES, ids=[_ids(c) for c in CASES])
@pytest.mark.parametrize("dtype", list(TOL), ids=str)
@pytest.mark.parametrize("act", list(ACTIVATIONS), ids=ACTIVATIONS.get)
@pytest.mark.parametrize("affine", ["weight+bias", "weight", "none"])
def test_forward_and_backward_match_the_oracle(case, dtype, act, affine):
    shape, groups, fmt = case
    x, w, b, dy = _inputs(shape, fmt, dtype, affine)
    y, mean, rstd = ops.group_norm_fwd(x, w, b, groups, 1e-5, act)
    dx, dw, db = ops.group_norm_bwd(dy, x, w, b, mean, rstd, groups, act)
    assert y.dtype == dx.dtype == dtype and y.stride() == dx.stride() == x.stride()
    stat = torch.float64 if dtype == torch.float64 else torch.float32
    assert mean.dtype == rstd.dtype == dw.dtype == db.dtype == stat
    assert mean.shape == rstd.shape == (shape[0], groups) and dw.shape == db.shape == (shape[1],)
    tol = TOL[dtype]
    if dtype in (torch.float32, torch.float64):
        ry, rmean, rrstd = ref.group_norm_fwd(x, w, b, groups, 1e-5, act)
        rdx, rdw, rdb = ref.group_norm_bwd(dy, x, w, b, mean, rstd, groups, act)
        for ours, theirs in zip((y, mean, rstd, dx, dw, db), (ry, rmean, rrstd, rdx, rdw, rdb)):
            _close(ours, theirs, tol)
        return
    # fp16 / bf16: the fp32 oracle on the upcast input, its outputs rounded to the dtype; both
    # backwards from our statistics, so that the comparison is of the backward alone.
    ry, rmean, rrstd = ref.group_norm_fwd(x.float(), _up(w), _up(b), groups, 1e-5, act)
    rdx, rdw, rdb = ref.group_norm_bwd(dy.float(), x.float(), _up(w), _up(b), mean, rstd, groups, act)
    _close(y, ry.to(dtype), tol)
    _close(dx, rdx.to(dtype), tol)
    for ours, theirs in zip((mean, rstd, dw, db), (rmean, rrstd, rdw, rdb)):
        _close(ours, theirs, TOL[torch.float32])


@pytest.mark.parametrize("shape,groups,fmt", [((2, 64, 32, 32), 4, None), ((2, 64, 32, 32), 4, CL),
                                              ((1, 1, 100000), 1, None)], ids=["NCHW", "channels_last", "one-group"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_rstd_stays_accurate_when_the_mean_is_100_standard_deviations(shape, groups, fmt, dtype):
    g = torch.Generator().manual_seed(1)
    x = (100 + torch.randn(shape, generator=g)).to(dtype)
    if fmt is not None:
        x = x.contiguous(memory_format=fmt)
    _, mean, rstd = ops.group_norm_fwd(x, None, None, groups, 1e-5, 0)
    _, rmean, rrstd = ref.group_norm_fwd(x.double(), None, None, groups, 1e-5, 0)
    torch.testing.assert_close(rstd.double(), rrstd, rtol=1e-5, atol=0)
    torch.testing.assert_close(mean.double(), rmean, rtol=1e-7, atol=0)


@pytest.fixture
def restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


# Many groups (one task per group), few large groups (pieces in parallel: three groups are one task
# each on one thread, pieces on two), one long run, channels_last rows.
@pytest.mark.parametrize("shape,groups,fmt", [((2, 320, 16, 16), 32, None), ((1, 3, 50, 50), 3, None),
                                              ((1, 1, 20000), 1, None), ((2, 320, 16, 16), 32, CL),
                                              ((2, 64, 8, 8, 8), 8, CL3D)],
                         ids=["many-groups", "three-groups", "one-run", "channels_last", "channels_last_3d"])
@pytest.mark.parametrize("act", [0, 3], ids=ACTIVATIONS.get)
def test_results_are_bitwise_the_same_on_one_and_two_threads(restore_threads, shape, groups, fmt, act):
    x, w, b, dy = _inputs(shape, fmt, torch.float32, "weight+bias", seed=2)
    results = []
    for threads in (1, 2):
        torch.set_num_threads(threads)
        y, mean, rstd = ops.group_norm_fwd(x, w, b, groups, 1e-5, act)
        results.append((y, mean, rstd) + tuple(ops.group_norm_bwd(dy, x, w, b, mean, rstd, groups, act)))
    for one, two in zip(*results):
        assert torch.equal(one, two)


@pytest.mark.parametrize("fmt", [None, CL], ids=["NCHW", "channels_last"])
def test_an_empty_batch_gives_empty_outputs_and_zero_weight_gradients(fmt):
    x = torch.randn(0, 6, 4, 4)
    if fmt is not None:
        x = x.contiguous(memory_format=fmt)
    w, b = torch.randn(6), torch.randn(6)
    y, mean, rstd = ops.group_norm_fwd(x, w, b, 3, 1e-5, 3)
    assert y.shape == x.shape and mean.shape == rstd.shape == (0, 3)
    dx, dw, db = ops.group_norm_bwd(torch.empty_like(x), x, w, b, mean, rstd, 3, 3)
    assert dx.shape == x.shape and torch.equal(dw, torch.zeros(6)) and torch.equal(db, torch.zeros(6))


def test_bad_arguments_are_refused_with_a_message_naming_them():
    x, w = torch.randn(2, 4, 3, 3), torch.ones(4)
    y, mean, rstd = ops.group_norm_fwd(x, w, w, 2, 1e-5, 0)
    fwd = [((x, w, w, 3, 1e-5, 0), "num_groups must divide the 4 channels"),
           ((torch.randn(2, 4, 0), None, None, 2, 1e-5, 0), "spatial size of at least 1"),
           ((x.transpose(2, 3), None, None, 2, 1e-5, 0), "contiguous or channels_last"),
           ((x[:, :, :, ::2], None, None, 2, 1e-5, 0), "contiguous or channels_last"),
           ((torch.randn(4), None, None, 2, 1e-5, 0), r"input must be \(N, C, \*\)"),
           ((x.int(), None, None, 2, 1e-5, 0), "input must be float32, float16, bfloat16 or float64"),
           ((x, torch.ones(3), None, 2, 1e-5, 0), "weight has 3 elements, expected 4"),
           ((x, None, torch.ones(5), 2, 1e-5, 0), "bias has 5 elements, expected 4"),
           ((x, None, None, 2, 1e-5, 4), "activation code must be 0..3, got 4")]
    for args, message in fwd:
        with pytest.raises(RuntimeError, match=message):
            ops.group_norm_fwd(*args)
    bwd = [((y.contiguous(memory_format=CL), x, w, w, mean, rstd, 2, 0), r"grad \(dy\) must have the input's strides"),
           ((y.double(), x, w, w, mean, rstd, 2, 0), r"grad \(dy\) is Double"),
           ((y[:1], x, w, w, mean, rstd, 2, 0), r"grad \(dy\) is Float \[1, 4, 3, 3\]"),
           ((y, x, w, w, mean[:1], rstd, 2, 0), "mean must be Float"),
           ((y, x, w, w, mean, rstd.double(), 2, 0), "rstd must be Float"),
           ((y, x, torch.ones(3), w, mean, rstd, 2, 0), "weight has 3 elements"),
           ((y, x, w, w, mean, rstd, 2, -1), "activation code")]
    for args, message in bwd:
        with pytest.raises(RuntimeError, match=message):
            ops.group_norm_bwd(*args)
