"""fusedtech.nn.utils.clip_grad_norm_ against torch.nn.utils.clip_grad_norm_.

Tolerances: the total norm is one reduction over all elements (fp64 partials on the CPU, fp32
block partials in Triton/CUDA) where torch takes the norm of per-tensor norms: fp32 rtol 1e-5;
for fp16/bf16 gradients, whose norm torch returns in the gradient dtype, one ulp of that dtype
(rtol 1e-3 / 8e-3). Scaled gradients: one ulp more (fp32 1e-5, fp16 2e-3, bf16 1.6e-2), since a
coefficient differing in its last bit can move the rounding of a low-precision product.
"""
from __future__ import annotations

import math

import pytest
import torch

import fusedtech
from fusedtech.nn.utils import clip_grad_norm_, clip_grad_value_, get_total_norm
from conftest import cpu_backends

BACKENDS = cpu_backends()
RTOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}
GRAD_RTOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def params_with_grads(dtype=torch.float32, scale=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = [(17, 33), (1,), (9000,), (8, 6), (3, 4, 5)]
    ps = [torch.nn.Parameter(torch.randn(s, generator=g).to(dtype)) for s in shapes]
    for p in ps:
        p.grad = (torch.randn(p.shape, generator=g) * scale).to(dtype)
    ps[3].grad = ps[3].grad.t().contiguous().t()  # a non-contiguous gradient
    return ps


def twin(ps):
    qs = [torch.nn.Parameter(p.detach().clone()) for p in ps]
    for p, q in zip(ps, qs):
        q.grad = p.grad.clone()
    return qs


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("norm_type", [2.0, math.inf, "inf"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("max_norm", [0.5, 1e6])  # clipping and not clipping
def test_matches_torch(backend, norm_type, dtype, max_norm):
    ps = params_with_grads(dtype)
    qs = twin(ps)
    expected = torch.nn.utils.clip_grad_norm_(ps, max_norm, norm_type)
    with fusedtech.use_backend(backend):
        total = clip_grad_norm_(qs, max_norm, norm_type)
    assert total.dtype == expected.dtype and total.shape == expected.shape
    torch.testing.assert_close(total, expected, rtol=RTOL[dtype], atol=0)
    for p, q in zip(ps, qs):
        torch.testing.assert_close(q.grad, p.grad, rtol=GRAD_RTOL[dtype], atol=1e-7)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("norm_type", [2.0, math.inf])
def test_mixed_dtypes_and_generator_input(backend, norm_type):
    ps = params_with_grads(torch.float32) + params_with_grads(torch.bfloat16, seed=1)
    qs = twin(ps)
    expected = torch.nn.utils.clip_grad_norm_(iter(ps), 1.0, norm_type)
    with fusedtech.use_backend(backend):
        total = clip_grad_norm_(iter(qs), 1.0, norm_type)
    torch.testing.assert_close(total, expected, rtol=RTOL[torch.bfloat16], atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("norm_type", [2.0, math.inf])
def test_non_finite_gradients(backend, bad, norm_type):
    ps = params_with_grads()
    ps[2].grad[123] = bad
    qs = twin(ps)
    expected = torch.nn.utils.clip_grad_norm_(ps, 1.0, norm_type)
    with fusedtech.use_backend(backend):
        total = clip_grad_norm_(qs, 1.0, norm_type)
    assert torch.equal(total.isnan(), expected.isnan()) and torch.equal(total.isinf(), expected.isinf())
    with fusedtech.use_backend(backend), pytest.raises(RuntimeError, match="non-finite"):
        clip_grad_norm_(twin(ps), 1.0, norm_type, error_if_nonfinite=True)


def test_cpu_partials_do_not_overflow():
    # Squares of ~1e19 overflow fp32 (torch's own clip_grad_norm_ returns inf here); the CPU
    # kernel's fp64 partials give the true norm, as computed in float64.
    if "cpu" not in BACKENDS:
        pytest.skip("cpu extension not built")
    ps = params_with_grads(scale=1e18)
    truth = torch.linalg.vector_norm(torch.cat([p.grad.double().flatten() for p in ps])).float()
    with fusedtech.use_backend("cpu"):
        total = clip_grad_norm_(ps, 1.0)
    assert torch.isfinite(total)
    torch.testing.assert_close(total, truth, rtol=1e-6, atol=0)


def test_no_gradients_and_other_norm_orders():
    p = torch.nn.Parameter(torch.randn(3))
    assert clip_grad_norm_([p], 1.0).item() == 0.0
    ps = params_with_grads()
    qs = twin(ps)
    expected = torch.nn.utils.clip_grad_norm_(ps, 1.0, 1.0)  # the 1-norm goes through torch
    torch.testing.assert_close(clip_grad_norm_(qs, 1.0, 1.0), expected)
    torch.testing.assert_close(get_total_norm([q.grad for q in qs], 2.0),
                               torch.nn.utils.get_total_norm([p.grad for p in ps], 2.0), rtol=1e-5, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtypes", [(torch.float64,), (torch.float32, torch.float64), (torch.complex64,)], ids=str)
def test_float64_and_complex_gradients_as_torch(backend, dtypes):
    # The kernels accumulate in fp32: float64 and complex gradients take torch's own path, so the
    # result is torch's to the last bit (an fp32 norm would be off by ~1e-8 relative).
    g = torch.Generator().manual_seed(3)
    ps = [torch.nn.Parameter(torch.randn(7, 5, generator=g).to(dtypes[i % len(dtypes)])) for i in range(4)]
    for p in ps:
        p.grad = torch.randn(p.shape, generator=g).to(p.dtype) * 3
    qs = twin(ps)
    expected = torch.nn.utils.clip_grad_norm_(ps, 1.0)
    with fusedtech.use_backend(backend):
        total = clip_grad_norm_(qs, 1.0)
    assert total.dtype == expected.dtype and torch.equal(total, expected)
    assert all(torch.equal(p.grad, q.grad) for p, q in zip(ps, qs))


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_norm_past_float_range_is_inf_as_torch(backend):
    ps = [torch.nn.Parameter(torch.zeros(2))]
    ps[0].grad = torch.full((2,), 3e38)
    qs = twin(ps)
    expected = torch.nn.utils.clip_grad_norm_(ps, 1.0)
    with fusedtech.use_backend(backend):
        total = clip_grad_norm_(qs, 1.0)
    assert torch.isinf(expected) and torch.isinf(total)
    assert torch.equal(qs[0].grad, ps[0].grad)


def test_clip_grads_with_norm_and_the_other_names_as_torch():
    from fusedtech.nn import utils
    ps = params_with_grads()
    qs, rs = twin(ps), twin(ps)
    total = torch.nn.utils.get_total_norm([p.grad for p in ps])
    torch.nn.utils.clip_grads_with_norm_(ps, 2.0, total)
    utils.clip_grads_with_norm_(qs, 2.0, total)
    assert all(torch.equal(p.grad, q.grad) for p, q in zip(ps, qs))
    torch.testing.assert_close(utils.clip_grad_norm(rs, 2.0), total, rtol=1e-5, atol=0)
    for p, r in zip(ps, rs):
        torch.testing.assert_close(r.grad, p.grad, rtol=1e-5, atol=1e-7)


def test_clip_grad_value_matches_torch():
    ps = params_with_grads()
    qs = twin(ps)
    torch.nn.utils.clip_grad_value_(ps, 0.3)
    clip_grad_value_(qs, 0.3)
    assert all(torch.equal(p.grad, q.grad) for p, q in zip(ps, qs))


def test_deterministic():
    ps = params_with_grads(scale=3.0)
    a = get_total_norm([p.grad for p in ps])
    b = get_total_norm([p.grad for p in ps])
    assert torch.equal(a, b)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("norm_type", [2.0, math.inf])
def test_gpu_matches_torch(backend, norm_type):
    ps = [torch.nn.Parameter(torch.randn(n, device="cuda")) for n in (1, 70_000, 3_000_000)] * 15
    for p in ps:
        p.grad = torch.randn_like(p)
    qs = twin(ps)
    expected = torch.nn.utils.clip_grad_norm_(ps, 1.0, norm_type)
    with fusedtech.use_backend(backend):
        total = clip_grad_norm_(qs, 1.0, norm_type)
    torch.testing.assert_close(total, expected, rtol=1e-5, atol=0)
