"""bf16 stochastic rounding inside the fused Adam/AdamW steps (``bf16_stochastic_round=True``).

Tolerances (written down, never loosened to pass):
- the rounding itself is unbiased: the mean of 2^20 roundings of one value is within 5 standard errors
  of it (the standard error of a two-point distribution with the measured probability);
- kernel vs oracle: both draw the same Philox words (tested equal), and their fp32 updates agree to
  rounding, so a parameter may land on the other bf16 neighbour only where the fp32 values differ
  across a rounding threshold: at most 0.1% of the elements, by one bf16 ulp.
"""
from __future__ import annotations

import io

import pytest
import torch

import fusedtech
from fusedtech import optim
from fusedtech.reference import rounding as reference
from conftest import cpu_backends
from optim_common import _steps, clone, make_params, run, set_grads

BACKENDS = cpu_backends()
KERNEL_BACKENDS = [b for b in BACKENDS if b != "torch"]
BF16_ULP_AT_ONE = 2.0 ** -7


def _assert_nearly_identical(a_params, b_params):
    differing = total = 0
    for a, b in zip(a_params, b_params):
        assert a.dtype == b.dtype == torch.bfloat16
        diff = (a.float() - b.float()).abs()
        ulp = torch.maximum(a.float().abs(), b.float().abs()) * 2.0 ** -7 + 1e-30
        assert torch.all(diff <= ulp * 1.0001), (diff.max(), a.shape)
        differing += int((a != b).sum())
        total += a.numel()
    assert differing <= 0.001 * max(total, 1), f"{differing} of {total} differ"


@pytest.mark.parametrize("x", [1.0 + 2.0 ** -9, -3.0 - 0.3 * 2.0 ** -6, 1e-3 * (1 + 0.7 * 2.0 ** -7)])
def test_stochastic_rounding_is_unbiased(x):
    n = 1 << 20
    values = torch.full((n,), x, dtype=torch.float32)
    rounded = reference.bf16_stochastic(values, reference.draws(12345, n, step=3, tensor=0, device="cpu")).float()
    below, above = sorted(set(rounded.tolist()))
    assert below < x < above  # only the two neighbours come out
    p = (rounded == above).double().mean().item()
    assert abs(p - (x - below) / (above - below)) < 5 * ((p * (1 - p) / n) ** 0.5) + 1e-12
    standard_error = (above - below) * (p * (1 - p) / n) ** 0.5
    assert abs(rounded.double().mean().item() - x) <= 5 * standard_error


def test_special_values_round_as_themselves():
    specials = torch.tensor([0.0, -0.0, float("inf"), float("-inf"), float("nan"), 1.0, -2.0])
    draws = torch.full((specials.numel(),), 0xFFFFFFFF, dtype=torch.int64)  # the largest draw
    rounded = reference.bf16_stochastic(specials, draws)
    assert torch.isnan(rounded[4])
    assert torch.equal(rounded[[0, 1, 2, 3, 5, 6]].float(), specials[[0, 1, 2, 3, 5, 6]])
    assert torch.signbit(rounded[1])


@pytest.mark.parametrize("backend", BACKENDS)
def test_updates_below_bf16_resolution_move_the_weights_only_when_rounded_stochastically(backend):
    """Adam's step is about lr per element: 1e-4 is an eighth of bf16's gap at 1.0 (2^-7 = 0.0078),
    so rounding to nearest keeps every weight at 1.0, and stochastic rounding moves them by
    lr * steps on average."""
    steps, lr = 100, 1e-4
    moved = {}
    for stochastic in (False, True):
        torch.manual_seed(0)
        w = torch.nn.Parameter(torch.ones(8192, dtype=torch.bfloat16))
        opt = optim.Adam([w], lr=lr, bf16_stochastic_round=stochastic)
        for _ in range(steps):
            w.grad = torch.ones_like(w)  # Adam's update is then lr exactly, every step
            with fusedtech.use_backend(backend):
                opt.step()
        moved[stochastic] = (1.0 - w.float()).mean().item()
    assert moved[False] == 0.0
    # Each element's walk is a sum of unbiased roundings: mean lr * steps, standard error below
    # 2^-7 * sqrt(steps / 8192).
    assert abs(moved[True] - lr * steps) < 5 * BF16_ULP_AT_ONE * (steps / 8192) ** 0.5


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("cls,kw", [(optim.AdamW, {}), (optim.Adam, dict(amsgrad=True, weight_decay=0.1)),
                                    (optim.AdamW8bit, dict(min_quantized_numel=0)),
                                    (optim.AdamWFp8, dict(min_quantized_numel=0))],
                         ids=["AdamW", "Adam-amsgrad-wd", "AdamW8bit", "AdamWFp8"])
def test_kernels_round_as_the_oracle(backend, cls, kw):
    params = make_params(torch.bfloat16)
    ref_params = clone(params)
    torch.manual_seed(7)
    ref = run(cls, ref_params, steps=10, backend="torch", lr=1e-2, bf16_stochastic_round=True, **kw)
    torch.manual_seed(7)
    fused = run(cls, params, steps=10, backend=backend, lr=1e-2, bf16_stochastic_round=True, **kw)
    assert fused.param_groups[0]["stochastic_round_seed"] == ref.param_groups[0]["stochastic_round_seed"]
    _assert_nearly_identical(ref_params, params)


@pytest.mark.parametrize("backend", BACKENDS)
def test_stochastic_rounding_differs_from_nearest_and_leaves_float32_alone(backend):
    bf16 = [torch.nn.Parameter(torch.randn(4000, dtype=torch.bfloat16))]
    fp32 = [torch.nn.Parameter(torch.randn(300))]
    runs = {}
    for stochastic in (False, True):
        params = clone(bf16) + clone(fp32)
        run(optim.AdamW, params, steps=5, backend=backend, lr=1e-3, bf16_stochastic_round=stochastic)
        runs[stochastic] = params
    assert not torch.equal(runs[True][0], runs[False][0])
    assert torch.equal(runs[True][1], runs[False][1])


@pytest.mark.parametrize("backend", BACKENDS)
def test_runs_are_reproducible_from_torch_manual_seed_and_resume_bit_identically(backend):
    def fresh(seed):
        torch.manual_seed(seed)
        return optim.AdamW(params := clone(start), lr=1e-2, bf16_stochastic_round=True), params

    start = make_params(torch.bfloat16)
    (a, pa), (b, pb), (c, pc) = fresh(1), fresh(1), fresh(2)
    for opt, params in ((a, pa), (b, pb), (c, pc)):
        _steps(opt, params, 4, backend)
    assert all(torch.equal(x, y) for x, y in zip(pa, pb))
    assert not all(torch.equal(x, y) for x, y in zip(pa, pc))

    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    buf.seek(0)
    resumed_params = clone(pa)
    torch.manual_seed(99)  # the resumed optimizer draws another seed, and the checkpoint's replaces it
    resumed = optim.AdamW(resumed_params, lr=1e-2, bf16_stochastic_round=True)
    resumed.load_state_dict(torch.load(buf, weights_only=True))
    _steps(a, pa, 4, backend, start=4)
    _steps(resumed, resumed_params, 4, backend, start=4)
    assert all(torch.equal(x, y) for x, y in zip(pa, resumed_params))


def test_master_weights_and_stochastic_rounding_are_alternatives():
    with pytest.raises(ValueError, match="bf16_stochastic_round"):
        optim.AdamW(make_params(torch.bfloat16), bf16_stochastic_round=True, master_weights=True)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_kernels_refuse_a_seed_for_other_parameters(backend):
    from fusedtech.ops.adam import adam_step_
    p = [torch.zeros(8)]
    with fusedtech.use_backend(backend), pytest.raises(RuntimeError, match="stochastic_round_seed"):
        adam_step_(p, [torch.ones(8)], [torch.zeros(8)], [torch.zeros(8)], [], [], [torch.ones(())], 1e-3, None,
                   0.9, 0.999, 1e-8, 0.0, False, False, False, None, None, stochastic_round_seed=5)


def test_compiled_stochastic_step_matches_eager():
    def make(ps):
        torch.manual_seed(3)
        return optim.AdamW(ps, lr=1e-2, bf16_stochastic_round=True)

    p1, p2 = make_params(torch.bfloat16), make_params(torch.bfloat16)
    o1, o2 = make(p1), make(p2)

    @torch.compile(backend="aot_eager")
    def compiled_step():
        o2.step()

    for s in range(3):
        set_grads(p1, s)
        set_grads(p2, s)
        o1.step()
        compiled_step()
    assert all(torch.equal(a, b) for a, b in zip(p1, p2))


def test_grad_scaler_skip_leaves_bf16_weights_untouched():
    params = make_params(torch.bfloat16)
    opt = run(optim.AdamW, params, steps=2, lr=1e-2, bf16_stochastic_round=True)
    before = [p.detach().clone() for p in params]
    set_grads(params, 5)
    opt.grad_scale, opt.found_inf = torch.tensor(4.0), torch.tensor(1.0)
    opt.step()
    assert all(torch.equal(p, b) for p, b in zip(params, before))


@pytest.mark.gpu
def test_gpu_stochastic_rounding_matches_the_oracle():
    params = [torch.nn.Parameter(p.detach().cuda()) for p in make_params(torch.bfloat16)]
    ref_params = clone(params)
    torch.manual_seed(7)
    ref = run(optim.AdamW, ref_params, steps=10, backend="torch", lr=1e-2, bf16_stochastic_round=True)
    torch.manual_seed(7)
    fused = run(optim.AdamW, params, steps=10, lr=1e-2, bf16_stochastic_round=True)  # auto: Triton (no CUDA C++ rounding)
    assert fused.param_groups[0]["stochastic_round_seed"] == ref.param_groups[0]["stochastic_round_seed"]
    _assert_nearly_identical(ref_params, params)
