"""Fused LAMB: parity with torch_optimizer.Lamb (what users of the technique call today) for its
arguments, with our oracle for the options it lacks, and the trust-ratio edge cases.

Tolerances: fp32 vs torch_optimizer (and timm) after 20 steps atol 1e-6, rtol 1e-5 (our norms are
one fp64 (CPU) / fp32-partials (Triton, CUDA) reduction where torch.norm reduces its own way, which
moves the trust ratio in its last bits); fp16/bf16 kernel vs oracle: two ulps of the dtype.
"""
from __future__ import annotations

import copy
import math

import pytest
import torch

import fusedtech
from fusedtech import optim
from conftest import cpu_backends
from optim_common import (assert_close_params_and_state, assert_compiled_step_matches_eager,
                          clone, make_params, run, set_grads, _steps)

torch_optimizer = pytest.importorskip("torch_optimizer", reason="torch-optimizer is not installed (pip install torch-optimizer)")

BACKENDS = cpu_backends()
FP32_TOL = dict(atol=1e-6, rtol=1e-5)
LOWP_TOL = {torch.float16: dict(atol=1e-3, rtol=2e-3), torch.bfloat16: dict(atol=2e-2, rtol=1.6e-2)}
THEIRS = [dict(), dict(lr=1e-2, weight_decay=0.1), dict(lr=1e-2, debias=True), dict(lr=5e-3, clamp_value=0.5),
          dict(lr=1e-2, adam=True, weight_decay=0.01), dict(lr=1e-2, betas=(0.8, 0.99), eps=1e-4, debias=True)]
OURS = [dict(lr=1e-2, trust_clamp=(0.5, 4.0)), dict(lr=1e-2, weight_decay=0.1, exclude_bias_and_norm=True),
        dict(lr=1e-2, max_grad_norm=5.0), dict(lr=1e-2, grad_averaging=False, debias=True),
        dict(lr=1e-2, bias_correction=True, trust_clip=True, weight_decay=0.1, debias=True),
        dict(lr=1e-2, always_adapt=False), dict(lr=1e-2, weight_decay=0.1, trust_clip=True, exclude_bias_and_norm=True)]
# timm.optim.Lamb(params, lr)'s defaults, in our keywords (the recipe in fusedtech/optim/lamb.py's docstring).
TIMM_DEFAULT = dict(weight_decay=0.01, bias_correction=True, always_adapt=False, trust_clamp=(0.0, math.inf),
                    max_grad_norm=1.0)
# timm's options, each with the same name and value on both sides, on top of its defaults.
TIMM_CONFIGS = [dict(), dict(trust_clip=True), dict(weight_decay=0.0), dict(weight_decay=0.0, always_adapt=True),
                dict(weight_decay=0.1, grad_averaging=False, max_grad_norm=None, bias_correction=False),
                dict(betas=(0.8, 0.99), eps=1e-4, max_grad_norm=50.0, trust_clip=True)]


def _id(c):
    return ",".join(f"{k}={v}" for k, v in c.items()) or "default"


NORMS = ("weight_norm", "adam_norm", "trust_ratio")


def _norms(state):
    """weight_norm, adam_norm, trust_ratio of a state as a float32 tensor (torch_optimizer stores a
    trust ratio of 1 as the Python int)."""
    return torch.tensor([float(state[k]) for k in NORMS])


def _assert_norms_close(ours_state, ref_state, **tol):
    for key in NORMS:
        assert torch.is_tensor(ours_state[key]) and ours_state[key].dim() == 0, key
        assert ours_state[key].dtype == torch.float32, (key, ours_state[key].dtype)
    torch.testing.assert_close(_norms(ours_state), _norms(ref_state), **tol)


def _lamb_state_keys_match(ref, ref_params, ours, params):
    for a, b in zip(ref_params, params):
        if a in ref.state and ref.state[a]:
            for key in ("exp_avg", "exp_avg_sq"):
                torch.testing.assert_close(ours.state[b][key], ref.state[a][key], **FP32_TOL)
            assert float(ours.state[b]["step"]) == float(ref.state[a]["step"])
            _assert_norms_close(ours.state[b], ref.state[a], **FP32_TOL)


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
    norms = {p: _norms(opt.state[p]) for p in params if opt.state[p]}
    set_grads(params, 5)
    opt.grad_scale, opt.found_inf = torch.tensor(4.0), torch.tensor(1.0)
    with fusedtech.use_backend(backend):
        opt.step()
    assert all(torch.equal(p, b) for p, b in zip(params, before))
    assert all(torch.equal(opt.state[p]["step"], s) for p, s in steps.items())
    assert all(torch.equal(_norms(opt.state[p]), n) for p, n in norms.items())


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


# ---- torch_optimizer's weight_norm / adam_norm / trust_ratio state -------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("config", THEIRS, ids=_id)
def test_weight_norm_adam_norm_and_trust_ratio_are_torch_optimizers_after_every_step(backend, config):
    params = make_params()
    ref_params = clone(params)
    ours, ref = optim.LAMB(params, **config), torch_optimizer.Lamb(ref_params, **config)
    for s in range(6):
        set_grads(params, s)
        set_grads(ref_params, s)
        with fusedtech.use_backend(backend):
            ours.step()
        ref.step()
        for a, b in zip(ref_params, params):
            if ref.state[a]:
                _assert_norms_close(ours.state[b], ref.state[a], **FP32_TOL)
                assert ours.state[b]["weight_norm"].device == b.device
            else:  # no gradient yet: no state, as torch_optimizer
                assert not ours.state.get(b)


@pytest.mark.parametrize("backend", BACKENDS)
def test_norms_stay_live_across_checkpoints_from_and_to_torch_optimizer(backend):
    # A torch_optimizer checkpoint's values are there at once and the next steps overwrite them;
    # our checkpoint takes torch_optimizer on as we go on.
    config = dict(lr=1e-2, weight_decay=0.1)
    p_theirs = make_params()
    theirs = run(torch_optimizer.Lamb, p_theirs, steps=5, **config)
    p_ours = clone(p_theirs)
    ours = optim.LAMB(p_ours, **config)
    ours.load_state_dict(copy.deepcopy(theirs.state_dict()))
    live = [(a, b) for a, b in zip(p_theirs, p_ours) if theirs.state[a]]
    for a, b in live:
        _assert_norms_close(ours.state[b], theirs.state[a], atol=0, rtol=0)
    loaded = [_norms(ours.state[b]) for _, b in live]
    for s in range(5, 9):
        set_grads(p_theirs, s)
        set_grads(p_ours, s)
        with fusedtech.use_backend(backend):
            ours.step()
        theirs.step()
        for a, b in live:
            _assert_norms_close(ours.state[b], theirs.state[a], **FP32_TOL)
    assert all(not torch.equal(_norms(ours.state[b]), n) for (_, b), n in zip(live, loaded) if b.numel())
    p_back = clone(p_ours)
    back = torch_optimizer.Lamb(p_back, **config)
    back.load_state_dict(copy.deepcopy(ours.state_dict()))
    for s in range(9, 13):
        set_grads(p_back, s)
        set_grads(p_ours, s)
        with fusedtech.use_backend(backend):
            ours.step()
        back.step()
    for a, b in zip(p_back, p_ours):
        torch.testing.assert_close(b, a, **FP32_TOL)
        if back.state[a]:
            _assert_norms_close(ours.state[b], back.state[a], **FP32_TOL)
            torch.testing.assert_close(ours.state[b]["exp_avg"], back.state[a]["exp_avg"], **FP32_TOL)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("master", [False, True])
def test_norms_are_float32_for_low_precision_parameters_and_come_back_float32_from_a_checkpoint(dtype, master):
    # torch's load_state_dict casts state to the parameter's dtype; the norms come back as saved.
    params = make_params(dtype)
    opt = run(optim.LAMB, params, steps=3, lr=1e-2, weight_decay=0.1, master_weights=master)
    again = optim.LAMB(clone(params), lr=1e-2, weight_decay=0.1, master_weights=master)
    again.load_state_dict(copy.deepcopy(opt.state_dict()))
    for p, q in zip(params, again.param_groups[0]["params"]):
        if opt.state[p]:
            for key in NORMS:
                assert opt.state[p][key].dtype == torch.float32 and opt.state[p][key].dim() == 0
            _assert_norms_close(again.state[q], opt.state[p], atol=0, rtol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_skipped_first_step_leaves_the_norms_of_no_step(backend):
    # GradScaler's inf step creates the state (step 0) and writes nothing: (0, 0, 1), the norms of
    # zero weights, until a step counts.
    params = make_params()
    set_grads(params, 0)
    opt = optim.LAMB(params, lr=1e-2)
    opt.grad_scale, opt.found_inf = torch.tensor(2.0), torch.tensor(1.0)
    with fusedtech.use_backend(backend):
        opt.step()
    stepped = [p for p in params if p.grad is not None]
    for p in stepped:
        assert torch.equal(_norms(opt.state[p]), torch.tensor([0.0, 0.0, 1.0]))
    del opt.grad_scale, opt.found_inf
    with fusedtech.use_backend(backend):
        opt.step()
    assert all(float(opt.state[p]["weight_norm"]) > 0 for p in stepped if p.numel())


@pytest.mark.parametrize("backend", BACKENDS)
def test_excluded_parameters_report_their_decay_free_norms_as_torch_optimizer_with_adam(backend):
    # exclude_bias_and_norm: the 1-D parameters step as torch_optimizer's adam=True without weight
    # decay, and report what it stores then: the norms of that update and the ratio it did not apply.
    params = make_params()
    ref_params = clone(params)
    ours = optim.LAMB(params, lr=1e-2, weight_decay=0.1, exclude_bias_and_norm=True)
    small = torch_optimizer.Lamb([p for p in ref_params if p.dim() <= 1], lr=1e-2, adam=True)
    big = torch_optimizer.Lamb([p for p in ref_params if p.dim() > 1], lr=1e-2, weight_decay=0.1)
    for s in range(5):
        set_grads(params, s)
        set_grads(ref_params, s)
        with fusedtech.use_backend(backend):
            ours.step()
        small.step()
        big.step()
    for a, b in zip(ref_params, params):
        torch.testing.assert_close(b, a, **FP32_TOL)
        ref = (small if a.dim() <= 1 else big).state[a]
        if ref:
            _assert_norms_close(ours.state[b], ref, **FP32_TOL)


def test_steady_steps_update_the_norms_in_place_without_rebuilding_them(monkeypatch):
    # The state entries are views of the kernels' output: made once with the buckets, then each
    # step writes them and the host does nothing per parameter for them.
    from fusedtech.optim import lamb as lamb_module
    builds = []
    real = lamb_module._norms_tensor
    monkeypatch.setattr(lamb_module, "_norms_tensor", lambda *a: builds.append(1) or real(*a))
    params = [torch.nn.Parameter(torch.randn(5, 3)), torch.nn.Parameter(torch.randn(7)),
              torch.nn.Parameter(torch.randn(6, 4).t())]
    opt = optim.LAMB(params, lr=1e-2, weight_decay=0.1, exclude_bias_and_norm=True)
    for _ in range(2):  # (the second step rebuilds the buckets once: the state they hold exists now)
        for p in params:
            p.grad = torch.randn_like(p)
        opt.step()
    assert len(builds) == 4  # one norms tensor per kernel call (decayed, excluded) per build
    entries = [[opt.state[p][k] for k in NORMS] for p in params]
    values = [_norms(opt.state[p]) for p in params]
    for _ in range(3):
        for p in params:
            p.grad = torch.randn_like(p)
        opt.step()
    assert len(builds) == 4
    assert all(a is b for e, p in zip(entries, params) for a, b in zip(e, [opt.state[p][k] for k in NORMS]))
    assert all(not torch.equal(_norms(opt.state[p]), v) for p, v in zip(params, values))


def test_compiled_step_matches_eager_norms_included():
    """torch.compile traces the step through the fusedtech::lamb_step_ custom op, norms output included."""
    config = dict(lr=1e-2, weight_decay=0.1, bias_correction=True, trust_clip=True, max_grad_norm=5.0)
    assert_compiled_step_matches_eager(lambda params: optim.LAMB(params, **config))


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "triton"])
def test_lamb_step_op_passes_opcheck_and_writes_the_norms(backend):
    # (Under the interpreter, opcheck's fake-tensor runs would reach Triton; see DESIGN.md.)
    from fusedtech.ops.lamb import _lamb_op
    g = torch.Generator().manual_seed(3)
    params = [torch.randn(5, 3, generator=g), torch.randn(7, generator=g), torch.randn(0)]

    def args():
        return (params, [torch.randn(p.shape, generator=g) for p in params], [torch.zeros_like(p) for p in params],
                [torch.zeros_like(p) for p in params], [], [torch.tensor(1.0) for _ in params], torch.zeros(3, 3),
                1e-2, None, 0.9, 0.999, 1e-6, 0.1, 0.0, 10.0, True, False, True, True, True, None, None)

    before = [p.clone() for p in params]
    with fusedtech.use_backend(backend):
        torch.library.opcheck(_lamb_op, args())
        for p, b in zip(params, before):
            p.copy_(b)
        a = args()
        _lamb_op(*a)
    norms = a[6]
    for i, p in enumerate(before[:2]):
        torch.testing.assert_close(norms[i, 0], torch.linalg.vector_norm(p), **FP32_TOL)
        assert 0 < norms[i, 2] <= 1.0  # trust_clip
    assert norms[2].tolist() == [0.0, 0.0, 1.0]


# ---- timm's Lamb -----------------------------------------------------------------------------------


def _timm_lamb():
    return pytest.importorskip("timm.optim", reason="timm is not installed (pip install timm)").Lamb


def _timm_run(backend, config, foreach=False, steps=10):
    params = make_params()
    ref_params = clone(params)
    ref = _timm_lamb()(ref_params, lr=1e-2, foreach=foreach, **config)
    ours = optim.LAMB(params, lr=1e-2, **{**TIMM_DEFAULT, **config})
    for s in range(steps):
        # Every parameter gets a gradient every step: timm's bias correction counts the group's steps.
        g = torch.Generator().manual_seed(100 + s)
        for p, r in zip(params, ref_params):
            r.grad = torch.randn(p.shape, generator=g)
            p.grad = r.grad.clone()
        with fusedtech.use_backend(backend):
            ours.step()
        ref.step()
    for a, b in zip(ref_params, params):
        torch.testing.assert_close(b, a, **FP32_TOL)
        for key in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(ours.state[b][key], ref.state[a][key], **FP32_TOL)
    return ours, params


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("config", TIMM_CONFIGS, ids=_id)
def test_matches_timm_lamb_with_the_documented_keywords(backend, config):
    _timm_run(backend, config)


def test_matches_timms_multi_tensor_lamb_too():
    # timm's foreach path (its default on GPUs) folds the bias corrections into the step's scalars.
    _timm_run("cpu", dict(), foreach=True)


def test_timm_modes_mean_what_they_say():
    # trust_clip: no stored (or applied) ratio above 1; always_adapt=False without weight decay:
    # the ratio is still computed and stored, the step is Adam's (timm's match says so).
    ours, params = _timm_run("cpu", dict(trust_clip=True), steps=3)
    assert max(float(ours.state[p]["trust_ratio"]) for p in params) == 1.0
    unclipped, params = _timm_run("cpu", dict(), steps=3)
    assert max(float(unclipped.state[p]["trust_ratio"]) for p in params) > 1.0
    ours, params = _timm_run("cpu", dict(weight_decay=0.0), steps=3)
    assert any(float(ours.state[p]["trust_ratio"]) != 1.0 for p in params)


def test_the_defaults_stay_torch_optimizers():
    opt = optim.LAMB(make_params())
    assert (opt.bias_correction, opt.always_adapt, opt.trust_clip, opt.max_grad_norm) == (False, True, False, None)
    assert opt.defaults == torch_optimizer.Lamb(make_params()).defaults
