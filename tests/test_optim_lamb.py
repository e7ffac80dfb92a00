"""Fused LAMB: parity with torch_optimizer.Lamb (what users of the technique call today) for its
arguments, with our oracle for the options it lacks, and the trust-ratio edge cases.

Tolerances: fp32 vs torch_optimizer after 20 steps atol 1e-6, rtol 1e-5 (our norms are one
fp64 (CPU) / fp32-partials (Triton, CUDA) reduction where torch.norm reduces its own way, which
moves the trust ratio in its last bits); fp16/bf16 kernel vs oracle: two ulps of the dtype.
"""
from __future__ import annotations

import copy

import pytest
import torch

import fusedtech
from fusedtech import optim
from conftest import cpu_backends
from optim_common import assert_close_params_and_state, clone, make_params, run, set_grads, _steps

torch_optimizer = pytest.importorskip("torch_optimizer", reason="torch-optimizer is not installed (pip install torch-optimizer)")

BACKENDS = cpu_backends()
FP32_TOL = dict(atol=1e-6, rtol=1e-5)
LOWP_TOL = {torch.float16: dict(atol=1e-3, rtol=2e-3), torch.bfloat16: dict(atol=2e-2, rtol=1.6e-2)}
THEIRS = [dict(), dict(lr=1e-2, weight_decay=0.1), dict(lr=1e-2, debias=True), dict(lr=5e-3, clamp_value=0.5),
          dict(lr=1e-2, adam=True, weight_decay=0.01), dict(lr=1e-2, betas=(0.8, 0.99), eps=1e-4, debias=True)]
OURS = [dict(lr=1e-2, trust_clamp=(0.5, 4.0)), dict(lr=1e-2, weight_decay=0.1, exclude_bias_and_norm=True),
        dict(lr=1e-2, max_grad_norm=5.0), dict(lr=1e-2, grad_averaging=False, debias=True)]


def _id(c):
    return ",".join(f"{k}={v}" for k, v in c.items()) or "default"


def _lamb_state_keys_match(ref, ref_params, ours, params):
    for a, b in zip(ref_params, params):
        if a in ref.state and ref.state[a]:
            for key in ("exp_avg", "exp_avg_sq"):
                torch.testing.assert_close(ours.state[b][key], ref.state[a][key], **FP32_TOL)
            assert float(ours.state[b]["step"]) == float(ref.state[a]["step"])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("config", THEIRS, ids=_id)
def test_matches_torch_optimizer_lamb(backend, config):
    params = make_params()
    ref_params = clone(params)
    ref = run(torch_optimizer.Lamb, ref_params, **config)
    ours = run(optim.LAMB, params, backend=backend, **config)
    for a, b in zip(ref_params, params):
        torch.testing.assert_close(b, a, **FP32_TOL)
    _lamb_state_keys_match(ref, ref_params, ours, params)


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "torch"])
@pytest.mark.parametrize("config", OURS + THEIRS[-2:], ids=_id)
def test_options_match_oracle(backend, config):
    params = make_params()
    ref_params = clone(params)
    ref = run(optim.LAMB, ref_params, backend="torch", **config)
    ours = run(optim.LAMB, params, backend=backend, **config)
    assert_close_params_and_state(ref, ref_params, ours, params, **FP32_TOL)


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "torch"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("master", [False, True])
def test_low_precision_matches_oracle(backend, dtype, master):
    params = make_params(dtype)
    ref_params = clone(params)
    config = dict(lr=1e-2, weight_decay=0.1, debias=True, master_weights=master)
    ref = run(optim.LAMB, ref_params, backend="torch", **config)
    ours = run(optim.LAMB, params, backend=backend, **config)
    assert_close_params_and_state(ref, ref_params, ours, params, **LOWP_TOL[dtype])


def test_oracle_options_mean_what_they_say():
    # exclude_bias_and_norm: 1-D tensors behave like adam=True, weight_decay=0.
    params = make_params()
    ref_params = clone(params)
    run(optim.LAMB, params, backend="torch", lr=1e-2, weight_decay=0.1, exclude_bias_and_norm=True)
    run(torch_optimizer.Lamb, ref_params, lr=1e-2, adam=True)
    for a, b in zip(ref_params, params):
        if b.dim() <= 1:
            torch.testing.assert_close(b, a, **FP32_TOL)
    # max_grad_norm: the same as torch_optimizer on gradients divided by max(1, ||g|| / max).
    params, ref_params = make_params(), make_params()
    ours = optim.LAMB(params, lr=1e-2, max_grad_norm=3.0)
    ref = torch_optimizer.Lamb(ref_params, lr=1e-2)
    for s in range(5):
        set_grads(params, s)
        set_grads(ref_params, s)
        total = torch.linalg.vector_norm(torch.cat([p.grad.flatten() for p in ref_params if p.grad is not None]))
        for p in ref_params:
            if p.grad is not None:
                p.grad = p.grad / max(1.0, total.item() / 3.0)
        ours.step()
        ref.step()
    for a, b in zip(ref_params, params):
        torch.testing.assert_close(b, a, **FP32_TOL)
        assert b.grad is None or not torch.equal(b.grad, a.grad) or b.numel() == 0  # .grad left untouched


@pytest.mark.parametrize("backend", BACKENDS)
def test_trust_ratio_edge_cases(backend):
    # Zero weights: ratio 1, so the step is lr * u. Zero gradients and no decay: u = 0, no change.
    zero_w = torch.nn.Parameter(torch.zeros(300))
    zero_w.grad = torch.randn(300)
    still = torch.nn.Parameter(torch.randn(50))
    still.grad = torch.zeros(50)
    ref_w, ref_still = clone([zero_w, still])
    ref_w.grad, ref_still.grad = zero_w.grad.clone(), still.grad.clone()
    before = still.detach().clone()
    opt = optim.LAMB([zero_w, still], lr=0.1)
    with fusedtech.use_backend(backend):
        opt.step()
    ref = torch_optimizer.Lamb([ref_w, ref_still], lr=0.1)
    ref.step()
    torch.testing.assert_close(zero_w, ref_w, **FP32_TOL)
    assert torch.equal(still, before)
    u = opt.state[zero_w]["exp_avg"] / (opt.state[zero_w]["exp_avg_sq"].sqrt() + 1e-6)
    torch.testing.assert_close(zero_w.detach(), -0.1 * u, **FP32_TOL)


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_weight_makes_the_tensors_step_nan_as_torch_optimizer(backend):
    # torch.clamp keeps a NaN norm, so the trust ratio and the whole tensor's step are NaN; a
    # min/max clamp dropped it (ratio 1: only the NaN element stayed NaN).
    w = torch.nn.Parameter(torch.tensor([float("nan"), 0.5, -0.2, 0.8]))
    w.grad = torch.tensor([0.1, -0.3, 0.2, 0.4])
    (ref_w,) = clone([w])
    ref_w.grad = w.grad.clone()
    with fusedtech.use_backend(backend):
        optim.LAMB([w], lr=0.1).step()
    torch_optimizer.Lamb([ref_w], lr=0.1).step()
    assert torch.isnan(ref_w).all() and torch.isnan(w).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_state_dict_round_trip_with_torch_optimizer(backend):
    p_theirs = make_params()
    theirs = run(torch_optimizer.Lamb, p_theirs, steps=5, lr=1e-2, weight_decay=0.1)
    p_ours = clone(p_theirs)
    ours = optim.LAMB(p_ours, lr=1e-2, weight_decay=0.1)
    ours.load_state_dict(copy.deepcopy(theirs.state_dict()))
    assert ours.state_dict()["param_groups"] == theirs.state_dict()["param_groups"]
    _steps(theirs, p_theirs, 5, start=5)
    _steps(ours, p_ours, 5, backend, start=5)
    for a, b in zip(p_theirs, p_ours):
        torch.testing.assert_close(b, a, **FP32_TOL)
    back = torch_optimizer.Lamb(clone(p_ours), lr=1e-2, weight_decay=0.1)
    back.load_state_dict(copy.deepcopy(ours.state_dict()))  # and the reverse loads


@pytest.mark.parametrize("backend", BACKENDS)
def test_grad_scaler_skip_changes_nothing(backend):
    params = make_params()
    opt = run(optim.LAMB, params, steps=2, backend=backend, lr=1e-2)
    before = [p.detach().clone() for p in params]
    steps = {p: opt.state[p]["step"].clone() for p in params if opt.state[p]}
    set_grads(params, 5)
    opt.grad_scale, opt.found_inf = torch.tensor(4.0), torch.tensor(1.0)
    with fusedtech.use_backend(backend):
        opt.step()
    assert all(torch.equal(p, b) for p, b in zip(params, before))
    assert all(torch.equal(opt.state[p]["step"], s) for p, s in steps.items())


def test_validation_messages_match_torch_optimizer():
    for bad in (dict(lr=0.0), dict(eps=-1.0), dict(betas=(1.0, 0.9)), dict(weight_decay=-1), dict(clamp_value=-1)):
        with pytest.raises(ValueError) as expected:
            torch_optimizer.Lamb(make_params(), **bad)
        with pytest.raises(ValueError, match=str(expected.value).replace("(", r"\(").replace(")", r"\)")):
            optim.LAMB(make_params(), **bad)
    assert optim.FusedLAMB is optim.LAMB


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_gpu_matches_oracle(backend, dtype):
    params = make_params(dtype, device="cuda") + [torch.nn.Parameter(torch.randn(200_000, device="cuda").to(dtype))
                                                  for _ in range(40)]
    ref_params = clone(params)
    config = dict(lr=1e-2, weight_decay=0.1, debias=True, max_grad_norm=10.0)
    ref = run(optim.LAMB, ref_params, backend="torch", **config)
    ours = run(optim.LAMB, params, backend=backend, **config)
    assert_close_params_and_state(ref, ref_params, ours, params, **(FP32_TOL if dtype == torch.float32 else LOWP_TOL[dtype]))


def test_lamb_is_also_importable_under_torch_optimizers_name():
    from fusedtech import optim
    assert optim.Lamb is optim.LAMB is optim.FusedLAMB


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_parameter_listed_twice_is_stepped_twice_in_turn_as_torch_optimizer(backend):
    # torch_optimizer.Lamb (and torch's base class, which warns) updates it once per listing, one
    # after the other: never both listings in one launch.
    g = torch.Generator().manual_seed(5)
    a, b = torch.nn.Parameter(torch.randn(40, 3, generator=g)), torch.nn.Parameter(torch.randn(7, generator=g))
    ref = clone([a, b])
    with pytest.warns(UserWarning, match="duplicate parameters"):
        opt = optim.LAMB([a, b, a], lr=1e-2, weight_decay=0.01)
    with pytest.warns(UserWarning, match="duplicate parameters"):
        ref_opt = torch_optimizer.Lamb([ref[0], ref[1], ref[0]], lr=1e-2, weight_decay=0.01)
    for _ in range(4):
        for p, r in zip((a, b), ref):
            p.grad = torch.randn(p.shape, generator=g)
            r.grad = p.grad.clone()
        with fusedtech.use_backend(backend):
            opt.step()
        ref_opt.step()
    for p, r in zip((a, b), ref):
        torch.testing.assert_close(p, r, **FP32_TOL)
