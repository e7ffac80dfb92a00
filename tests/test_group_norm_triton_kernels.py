"""The Triton GroupNorm kernels (fusedtech.triton_kernels.group_norm) called directly, against the
oracle (fusedtech.reference.group_norm): forward (y, mean, rstd) and backward (dx, dweight, dbias)
in both layouts they read in place, every activation, with and without weight and bias, sizes of 1,
partial tiles, groups split over several programs, and the low-precision types. Without a GPU the
kernels run under TRITON_INTERPRET=1 (set by conftest.py before triton is imported): small shapes.

Tolerances: fp32 1e-5 (atol and rtol); fp16 / bf16 outputs against the oracle computed in fp32 from
the same rounded inputs, within about one rounding of it (1e-3 fp16, 1e-2 bf16)."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from fusedtech.reference import group_norm as oracle  # noqa: E402
from fusedtech.triton_kernels import group_norm as gk  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL32 = dict(atol=1e-5, rtol=1e-5)
TOL_LOW = {torch.float16: dict(atol=1e-3, rtol=1e-3), torch.bfloat16: dict(atol=1e-2, rtol=1e-2)}
CL, CL3D, NCHW = torch.channels_last, torch.channels_last_3d, torch.contiguous_format

# (shape, groups, memory format)
CASES = [((2, 6, 5, 7), 3, NCHW), ((3, 4), 2, NCHW), ((2, 8, 3, 3, 3), 8, NCHW), ((2, 8, 3, 3, 3), 8, CL3D),
         ((2, 4, 3, 3), 2, CL), ((1, 1, 2), 1, NCHW), ((2, 5, 1), 5, NCHW),
         # partial tiles: 37 positions; 3 channels a group in a tile of 4 (channels-last)
         ((2, 6, 37), 2, NCHW), ((1, 6, 37, 1), 3, CL), ((2, 12, 5, 3), 4, CL)]
IDS = [f"{'x'.join(map(str, s))}-G{g}-{str(f)[6:]}" for s, g, f in CASES]
ACTIVATIONS = {"none": 0, "relu": 1, "gelu": 2, "silu": 3}


def _inputs(shape, groups, fmt, dtype=torch.float32, affine=True, seed=0, loc=0.0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=g) + loc).to(dtype).contiguous(memory_format=fmt).to(DEVICE)
    dy = torch.randn(shape, generator=g).to(dtype).contiguous(memory_format=fmt).to(DEVICE)
    c = shape[1]
    w = (torch.randn(c, generator=g) + 1).to(DEVICE) if affine else None
    b = torch.randn(c, generator=g).to(DEVICE) if affine else None
    return x, dy, w, b


def _check_forward(x, w, b, groups, act, tol=TOL32):
    y, mean, rstd = gk.group_norm_fwd(x, w, b, groups, 1e-5, act)
    y_ref, mean_ref, rstd_ref = oracle.group_norm_fwd(x.float(), w, b, groups, 1e-5, act)
    torch.testing.assert_close(y, y_ref.to(x.dtype), **tol)
    torch.testing.assert_close(mean, mean_ref, **TOL32)
    torch.testing.assert_close(rstd, rstd_ref, **TOL32)
    assert y.dtype == x.dtype and y.stride() == x.stride()
    assert mean.dtype == rstd.dtype == torch.float32 and mean.shape == rstd.shape == (x.shape[0], groups)
    return mean, rstd


def _check_backward(dy, x, w, b, groups, act, tol=TOL32):
    mean, rstd = oracle.group_norm_stats(x.float(), groups, 1e-5)
    dx, dw, db = gk.group_norm_bwd(dy, x, w, b, mean, rstd, groups, act)
    dx_ref, dw_ref, db_ref = oracle.group_norm_bwd(dy.float(), x.float(), w, b, mean, rstd, groups, act)
    torch.testing.assert_close(dx, dx_ref.to(x.dtype), **tol)
    torch.testing.assert_close(dw, dw_ref, **TOL32)
    torch.testing.assert_close(db, db_ref, **TOL32)
    assert dx.dtype == x.dtype and dx.stride() == x.stride()
    assert dw.dtype == db.dtype == torch.float32 and dw.shape == db.shape == (x.shape[1],)


@pytest.mark.parametrize("affine", [True, False], ids=["affine", "plain"])
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("shape,groups,fmt", CASES, ids=IDS)
def test_triton_group_norm_forward_matches_the_oracle(shape, groups, fmt, activation, affine):
    x, _, w, b = _inputs(shape, groups, fmt, affine=affine)
    _check_forward(x, w, b, groups, ACTIVATIONS[activation])


@pytest.mark.parametrize("affine", [True, False], ids=["affine", "plain"])
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("shape,groups,fmt", CASES, ids=IDS)
def test_triton_group_norm_backward_matches_the_oracle(shape, groups, fmt, activation, affine):
    x, dy, w, b = _inputs(shape, groups, fmt, affine=affine)
    _check_backward(dy, x, w, b, groups, ACTIVATIONS[activation])


def test_triton_group_norm_weight_without_bias_and_bias_without_weight_match_the_oracle():
    x, dy, w, b = _inputs((2, 6, 5, 7), 3, CL)
    for weight, bias in ((w, None), (None, b)):
        _check_forward(x, weight, bias, 3, 3)
        _check_backward(dy, x, weight, bias, 3, 3)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape,groups,fmt", [CASES[0], CASES[3], CASES[9]], ids=[IDS[0], IDS[3], IDS[9]])
def test_triton_group_norm_half_types_are_within_one_rounding_of_the_fp32_oracle(shape, groups, fmt, dtype):
    x, dy, w, b = _inputs(shape, groups, fmt, dtype=dtype)
    for act in (0, 3):
        _check_forward(x, w, b, groups, act, TOL_LOW[dtype])
        _check_backward(dy, x, w, b, groups, act, TOL_LOW[dtype])


@pytest.mark.parametrize("fmt", [NCHW, CL], ids=["NCHW", "channels_last"])
def test_triton_group_norm_splits_a_large_group_over_programs_and_still_matches_the_oracle(monkeypatch, fmt):
    # Small tiles and few target programs: each group's 241 positions go to several programs
    # (SPLIT > 1), each looping over several tiles, the last slice and its last tile partial.
    monkeypatch.setattr(gk, "TILE", 16)
    monkeypatch.setattr(gk, "ROW_LANES", 8)
    monkeypatch.setattr(gk, "TARGET_PROGRAMS", 12)
    x, dy, w, b = _inputs((1, 8, 241, 1), 2, fmt, seed=3)
    tile, _, _, _, split, chunk, _ = gk._setup(x, 2)[-1]
    assert split > 1 and chunk > tile["BLOCK_S"] and 241 % chunk % tile["BLOCK_S"]
    _check_forward(x, w, b, 2, 2)
    _check_backward(dy, x, w, b, 2, 2)


def test_triton_group_norm_splits_a_2048_position_group_with_the_default_tiles():
    x, dy, w, b = _inputs((1, 4, 2048), 1, NCHW, seed=4)
    assert gk._setup(x, 1)[-1][4] > 1
    _check_forward(x, w, b, 1, 1)
    _check_backward(dy, x, w, b, 1, 1)


@pytest.mark.parametrize("fmt", [NCHW, CL], ids=["NCHW", "channels_last"])
def test_triton_group_norm_statistics_stay_accurate_when_the_mean_is_100_stds(monkeypatch, fmt):
    # E[x^2] - E[x]^2 would lose ~13 of fp32's 24 bits here. The outputs inherit the mean's own
    # rounding (an ulp of 100 times rstd * w), as the fp32 oracle's do: against float64, ours are
    # within twice the fp32 oracle's error.
    monkeypatch.setattr(gk, "TARGET_PROGRAMS", 8)  # partials merged as well as lanes
    x, dy, w, b = _inputs((2, 4, 16, 20), 2, fmt, seed=5, loc=100.0)
    y, mean, rstd = gk.group_norm_fwd(x, w, b, 2, 1e-5, 0)
    y64, mean64, rstd64 = oracle.group_norm_fwd(x.double(), w, b, 2, 1e-5, 0)
    torch.testing.assert_close(mean.double(), mean64, atol=0, rtol=1e-6)
    torch.testing.assert_close(rstd.double(), rstd64, atol=0, rtol=1e-5)
    y32 = oracle.group_norm_fwd(x, w, b, 2, 1e-5, 0)[0]
    grads = gk.group_norm_bwd(dy, x, w, b, mean, rstd, 2, 0)
    grads64 = oracle.group_norm_bwd(dy.double(), x.double(), w, b, mean64, rstd64, 2, 0)
    grads32 = oracle.group_norm_bwd(dy, x, w, b, *oracle.group_norm_stats(x, 2, 1e-5), 2, 0)
    for ours, exact, fp32 in zip((y,) + grads, (y64,) + grads64, (y32,) + grads32):
        error, fp32_error = (ours.double() - exact).abs().max(), (fp32.double() - exact).abs().max()
        assert error <= 2 * fp32_error + 1e-6 * exact.abs().max(), (error, fp32_error)


def test_triton_group_norm_groups_of_one_element_have_zero_variance():
    x, dy, w, b = _inputs((3, 6, 1), 6, NCHW, seed=6)
    _, mean, rstd = gk.group_norm_fwd(x, w, b, 6, 1e-5, 0)
    torch.testing.assert_close(mean, x[:, :, 0])
    torch.testing.assert_close(rstd, torch.full_like(rstd, 1e-5).rsqrt())
    _check_backward(dy, x, w, b, 6, 0)


def test_triton_group_norm_of_an_empty_batch_is_empty_with_zero_parameter_gradients():
    x, dy, w, b = _inputs((0, 4, 3, 3), 2, CL)
    y, mean, rstd = gk.group_norm_fwd(x, w, b, 2, 1e-5, 1)
    assert y.shape == x.shape and mean.shape == rstd.shape == (0, 2)
    dx, dw, db = gk.group_norm_bwd(dy, x, w, b, mean, rstd, 2, 1)
    assert dx.shape == x.shape and torch.equal(dw, torch.zeros(4, device=DEVICE)) and torch.equal(db, dw)


def test_triton_group_norm_reads_both_layouts_in_place():
    for shape, fmt in (((2, 8, 3, 3), CL), ((2, 8, 3, 3, 3), CL3D), ((2, 8, 3, 3), NCHW), ((2, 8), NCHW)):
        x = torch.randn(shape).contiguous(memory_format=fmt)
        assert gk._view(x)[0] is x
    x = torch.randn(2, 8, 3, 3).transpose(2, 3)  # neither layout: one contiguous copy
    assert gk._view(x)[0].is_contiguous()


def test_triton_group_norm_is_bitwise_deterministic():
    x, dy, w, b = _inputs((2, 8, 6, 6), 4, CL, seed=7)

    def run():
        y, mean, rstd = gk.group_norm_fwd(x, w, b, 4, 1e-5, 3)
        return (y, mean, rstd) + gk.group_norm_bwd(dy, x, w, b, mean, rstd, 4, 3)

    for a, c in zip(run(), run()):
        assert torch.equal(a, c)
