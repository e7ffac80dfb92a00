"""Fused SGD, RMSprop and Adagrad against torch.optim and against our oracles.

Tolerances (documented here, never loosened to make a test pass):
- float32 vs torch.optim (single-tensor path) after 20 steps: atol 1e-5, rtol 1e-5. Same
  operation order; torch's CPU kernels contract a + alpha * b into an FMA where ours round twice
  (seen: one ulp of values up to ~20 after 20 SGD steps at lr 0.1, i.e. ~2e-6).
- float16 / bfloat16, kernel vs our oracle: two ulps of the storage dtype (fp16 rtol 2e-3,
  bf16 rtol 1.6e-2) plus atol 1e-3 / 2e-2; states stored in the low-precision dtype can round
  one ulp apart and carry it into the parameter.
"""
from __future__ import annotations

import copy
import io

import pytest
import torch

import fusedtech
from fusedtech import optim
from conftest import cpu_backends
from optim_common import (assert_close_params_and_state, assert_compiled_step_matches_eager,
                          clone, make_params, run, set_grads, _steps)

BACKENDS = cpu_backends()
FP32_TOL = dict(atol=1e-5, rtol=1e-5)
LOWP_TOL = {torch.float16: dict(atol=1e-3, rtol=2e-3), torch.bfloat16: dict(atol=2e-2, rtol=1.6e-2)}

# (torch class, fused class, configs): the OptimizerInfo of this file.
INFOS = [
    (torch.optim.SGD, optim.SGD, [dict(lr=0.05), dict(lr=0.05, momentum=0.9), dict(lr=0.05, momentum=0.9, dampening=0.3),
                                  dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.1),
                                  dict(lr=0.05, momentum=0.5, weight_decay=0.05, maximize=True),
                                  dict(lr=torch.tensor(0.02), momentum=0.9)]),
    (torch.optim.RMSprop, optim.RMSprop, [dict(), dict(centered=True), dict(momentum=0.9), dict(weight_decay=0.1),
                                          dict(lr=3e-3, alpha=0.9, centered=True, momentum=0.5, weight_decay=0.05,
                                               maximize=True)]),
    (torch.optim.Adagrad, optim.Adagrad, [dict(), dict(lr_decay=0.05), dict(initial_accumulator_value=0.5),
                                          dict(lr=0.05, lr_decay=0.01, weight_decay=0.1, eps=1e-6, maximize=True)]),
]
CASES = [(t, f, c) for t, f, cs in INFOS for c in cs]


def _id(case):
    t, _, c = case
    return t.__name__ + "-" + (",".join(f"{k}={v}" for k, v in c.items()) or "default")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", CASES, ids=[_id(c) for c in CASES])
def test_fp32_matches_torch(backend, case):
    torch_cls, fused_cls, config = case
    params = make_params()
    ref_params = clone(params)
    ref = run(torch_cls, ref_params, foreach=False, **copy.deepcopy(config))
    fused = run(fused_cls, params, backend=backend, **copy.deepcopy(config))
    assert_close_params_and_state(ref, ref_params, fused, params, **FP32_TOL)


LOWP_CASES = [(t, f, cs[-1]) for t, f, cs in INFOS]


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "torch"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", LOWP_CASES, ids=[_id(c) for c in LOWP_CASES])
def test_low_precision_kernel_matches_oracle(backend, dtype, case):
    _, fused_cls, config = case
    config = {k: (v.item() if isinstance(v, torch.Tensor) else v) for k, v in config.items()}
    params = make_params(dtype)
    ref_params = clone(params)
    ref = run(fused_cls, ref_params, backend="torch", **config)
    fused = run(fused_cls, params, backend=backend, **config)
    assert_close_params_and_state(ref, ref_params, fused, params, **LOWP_TOL[dtype])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("info", INFOS, ids=[i[0].__name__ for i in INFOS])
def test_master_weights(backend, info):
    _, fused_cls, configs = info
    config = {k: v for k, v in configs[-1].items() if not isinstance(v, torch.Tensor)}
    params = make_params(torch.bfloat16)
    opt = run(fused_cls, params, backend=backend, master_weights=True, **config)
    exact = [torch.nn.Parameter(p.detach().float()) for p in make_params(torch.bfloat16)]
    exact_opt = fused_cls(exact, **config)
    for s in range(20):
        set_grads(params, s)
        for pe, p in zip(exact, params):
            pe.grad = None if p.grad is None else p.grad.float()
        with fusedtech.use_backend(backend):  # same backend: same rounding, so only storage differs
            exact_opt.step()
    for pe, p in zip(exact, params):
        if p not in opt.state or not opt.state[p]:
            continue
        master = opt.state[p]["master_param"]
        torch.testing.assert_close(master, pe.detach(), **FP32_TOL)
        assert torch.equal(p, master.to(torch.bfloat16))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("info", INFOS, ids=[i[0].__name__ for i in INFOS])
def test_state_dict_round_trip_with_torch(backend, info):
    torch_cls, fused_cls, configs = info
    config = {k: v for k, v in configs[-1].items() if not isinstance(v, torch.Tensor)}
    p_torch = make_params()
    t_opt = run(torch_cls, p_torch, steps=5, foreach=False, **config)
    buf = io.BytesIO()
    torch.save(t_opt.state_dict(), buf)
    buf.seek(0)
    p_ours = clone(p_torch)
    f_opt = fused_cls(p_ours, **config)
    f_opt.load_state_dict(torch.load(buf, weights_only=True))
    _steps(t_opt, p_torch, 5, start=5)
    _steps(f_opt, p_ours, 5, backend, start=5)
    assert_close_params_and_state(t_opt, p_torch, f_opt, p_ours, **FP32_TOL)

    p_ours = make_params()
    f_opt = run(fused_cls, p_ours, steps=5, backend=backend, **config)
    sd = f_opt.state_dict()
    p_torch = clone(p_ours)
    t_opt = torch_cls(p_torch, foreach=False, **config)
    t_opt.load_state_dict(copy.deepcopy(sd))
    assert t_opt.state_dict()["param_groups"] == sd["param_groups"]
    _steps(t_opt, p_torch, 5, start=5)
    _steps(f_opt, p_ours, 5, backend, start=5)
    assert_close_params_and_state(t_opt, p_torch, f_opt, p_ours, **FP32_TOL)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("info", INFOS, ids=[i[0].__name__ for i in INFOS])
def test_grad_scaler_skip_changes_nothing(backend, info):
    _, fused_cls, configs = info
    config = {k: v for k, v in configs[-1].items() if not isinstance(v, torch.Tensor)}
    params = make_params()
    opt = run(fused_cls, params, steps=2, backend=backend, **config)
    before = [p.detach().clone() for p in params]
    state_before = {p: {k: v.clone() for k, v in opt.state[p].items()} for p in params if p in opt.state}
    set_grads(params, 9)
    opt.grad_scale, opt.found_inf = torch.tensor(64.0), torch.tensor(1.0)
    with fusedtech.use_backend(backend):
        opt.step()
    del opt.grad_scale, opt.found_inf
    assert all(torch.equal(p, b) for p, b in zip(params, before))
    for p, st in state_before.items():
        assert opt.state[p].keys() == st.keys()
        for k, v in st.items():
            assert torch.equal(opt.state[p][k], v), k


@pytest.mark.parametrize("backend", BACKENDS)
def test_sgd_first_step_buffer_is_the_gradient(backend):
    """torch clones the (decayed, maximized) gradient into a new momentum buffer; a step skipped
    by GradScaler creates none."""
    params = make_params()
    # dampening 0.5: a buffer wrongly updated from zeros would hold half the gradient.
    opt = optim.SGD(params, lr=0.1, momentum=0.9, dampening=0.5, weight_decay=0.1, maximize=True)
    set_grads(params, 0)
    opt.grad_scale, opt.found_inf = torch.tensor(2.0), torch.tensor(1.0)
    with fusedtech.use_backend(backend):
        opt.step()
    assert all("momentum_buffer" not in opt.state[p] for p in params)
    del opt.grad_scale, opt.found_inf
    expected = {p: (-p.grad).add(p.detach(), alpha=0.1) for p in params if p.grad is not None}
    with fusedtech.use_backend(backend):
        opt.step()
    for p, e in expected.items():
        # Equal up to whether g + wd * p is fused into one FMA (torch's CPU add) or rounded twice.
        torch.testing.assert_close(opt.state[p]["momentum_buffer"], e, atol=1e-7, rtol=1e-6)


def test_sgd_momentum_buffer_replaced_by_the_user_is_used():
    # Steady-state steps reuse last step's buffer list; a buffer the user swaps in (as torch's
    # SGD would read it from state) must still be the one updated.
    g = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(5, 3, generator=g)), torch.nn.Parameter(torch.randn(7, generator=g))]
    ref = clone(params)
    opt, ref_opt = optim.SGD(params, lr=0.1, momentum=0.9), torch.optim.SGD(ref, lr=0.1, momentum=0.9)
    for step in range(4):
        for p, r in zip(params, ref):  # every parameter has a gradient every step: the cached path
            p.grad = torch.randn(p.shape, generator=g)
            r.grad = p.grad.clone()
        if step == 2:
            for o in (opt, ref_opt):
                for p in o.state:
                    o.state[p]["momentum_buffer"] = torch.ones_like(p)
        opt.step(), ref_opt.step()
    for p, r in zip(params, ref):
        torch.testing.assert_close(p, r, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(opt.state[p]["momentum_buffer"], ref_opt.state[r]["momentum_buffer"],
                                   atol=1e-6, rtol=1e-6)


RESET_INFOS = INFOS + [(torch.optim.Adam, optim.Adam, [dict(), dict(lr=1e-2, amsgrad=True)]),
                       (torch.optim.AdamW, optim.AdamW, [dict(), dict(lr=1e-2, weight_decay=0.1)])]


@pytest.mark.parametrize("info", RESET_INFOS, ids=[i[0].__name__ for i in RESET_INFOS])
@pytest.mark.parametrize("reset", ["clear", "replace", "one-parameter", "one-tensor"])
def test_state_reset_by_the_user_starts_over(info, reset):
    # Steady-state steps reuse buckets that hold the state; clearing optimizer.state or assigning a
    # new mapping (a common "reset the optimizer"), or resetting one parameter's state or one state
    # tensor, must take effect as it does for torch.
    from collections import defaultdict
    torch_cls, fused_cls, configs = info
    g = torch.Generator().manual_seed(1)
    params = [torch.nn.Parameter(torch.randn(4, 3, generator=g)), torch.nn.Parameter(torch.randn(6, generator=g))]
    ref = clone(params)
    config = configs[1]
    opt, ref_opt = fused_cls(params, **config), torch_cls(ref, **config)
    for step in range(5):
        for p, r in zip(params, ref):
            p.grad = torch.randn(p.shape, generator=g)
            r.grad = p.grad.clone()
        opt.step(), ref_opt.step()
        if step == 2:
            for o in (opt, ref_opt):
                first = o.param_groups[0]["params"][0]
                if reset == "clear":
                    o.state.clear()
                elif reset == "replace":
                    o.state = defaultdict(dict)
                elif reset == "one-parameter":
                    o.state[first] = {}
                else:  # a new tensor of the same values: later steps must update it, not the old one
                    key = next(k for k in sorted(o.state[first]) if k != "step")
                    o.state[first][key] = o.state[first][key].clone()
    assert_close_params_and_state(ref_opt, ref, opt, params, **FP32_TOL)
    assert opt.state_dict()["state"].keys() == ref_opt.state_dict()["state"].keys()


@pytest.mark.parametrize("info", RESET_INFOS, ids=[i[0].__name__ for i in RESET_INFOS])
def test_add_param_group_and_stateless_parameters_as_torch(info):
    # A group added after construction gets its state as torch makes it (Adagrad's initial
    # accumulator value included); SGD without momentum keeps no state entry at all.
    torch_cls, fused_cls, configs = info
    config = dict(initial_accumulator_value=0.5) if torch_cls is torch.optim.Adagrad else configs[-1]
    g = torch.Generator().manual_seed(2)
    first, second = [torch.nn.Parameter(torch.randn(5, generator=g))], [torch.nn.Parameter(torch.randn(3, 2, generator=g))]
    ref_first, ref_second = clone(first), clone(second)
    opt, ref_opt = fused_cls(first, **config), torch_cls(ref_first, **config)
    for step in range(4):
        if step == 2:
            opt.add_param_group({"params": second}), ref_opt.add_param_group({"params": ref_second})
        for p, r in zip(first + second, ref_first + ref_second):
            p.grad = torch.randn(p.shape, generator=g)
            r.grad = p.grad.clone()
        opt.step(), ref_opt.step()
    assert_close_params_and_state(ref_opt, ref_first + ref_second, opt, first + second, **FP32_TOL)
    assert opt.state_dict()["state"].keys() == ref_opt.state_dict()["state"].keys()
    plain = optim.SGD(first, lr=0.1)
    plain.step()
    assert plain.state_dict()["state"] == {} and len(plain.state) == 0


def _mixed_model(sparse: bool):
    """An embedding (sparse gradients if asked), a float64 Linear, an fp32 vector, a complex one."""
    torch.manual_seed(0)
    return (torch.nn.Embedding(10, 4, sparse=sparse), torch.nn.Linear(4, 3).double(),
            torch.nn.Parameter(torch.randn(5)), torch.nn.Parameter(torch.randn(3, dtype=torch.complex64)))


def _mixed_steps(opt_cls, config, sparse, steps=4, scale=None, found_inf=None):
    emb, lin, w, c = _mixed_model(sparse)
    params = [emb.weight, lin.weight, lin.bias, w, c]
    opt = opt_cls(params, **config)
    for _ in range(steps):
        opt.zero_grad()
        loss = lin(emb(torch.tensor([1, 3, 3, 7])).double()).sum() + w.square().sum() + c.abs().square().sum()
        (loss * (scale or 1.0)).backward()
        if scale is not None:  # what GradScaler hands a fused step: scaled gradients, scale and inf flag
            opt.grad_scale, opt.found_inf = torch.tensor(float(scale)), torch.tensor(float(found_inf))
        opt.step()
        opt.__dict__.pop("grad_scale", None), opt.__dict__.pop("found_inf", None)
    return params, opt


@pytest.mark.parametrize("info", RESET_INFOS, ids=[i[0].__name__ for i in RESET_INFOS])
@pytest.mark.parametrize("scaled", [False, True])
def test_float64_complex_and_sparse_parameters_are_stepped_as_torch(info, scaled):
    # What the kernels do not take (float64, complex, sparse gradients where torch takes them) is
    # stepped by the torch class itself, after the fused buckets: the same results, state and
    # state_dict as torch; under GradScaler unscaled first (and skipped with the step).
    torch_cls, fused_cls, configs = info
    sparse = torch_cls in (torch.optim.SGD, torch.optim.Adagrad)
    # The richest config torch runs here (its weight decay refuses sparse gradients).
    config = next(c for c in reversed(configs) if not any(map(torch.is_tensor, c.values()))
                  and not (sparse and c.get("weight_decay")))
    ref_params, ref_opt = _mixed_steps(torch_cls, config, sparse)
    params, opt = _mixed_steps(fused_cls, config, sparse, scale=8.0 if scaled else None, found_inf=0)
    assert_close_params_and_state(ref_opt, ref_params, opt, params, atol=1e-5, rtol=1e-5)
    assert opt.state_dict()["state"].keys() == ref_opt.state_dict()["state"].keys()
    if scaled:  # inf steps change nothing, the torch-stepped parameters included
        skipped, _ = _mixed_steps(fused_cls, config, sparse, steps=2, scale=8.0, found_inf=1)
        emb, lin, w, c = _mixed_model(sparse)
        assert all(torch.equal(a, b) for a, b in zip(skipped, (emb.weight, lin.weight, lin.bias, w, c)))


ALL_FUSED = [(fused_cls, configs[-1]) for _, fused_cls, configs in RESET_INFOS] + [(optim.LAMB, dict(
    lr=1e-2, weight_decay=0.1, trust_clamp=(0.5, 4.0), max_grad_norm=5.0, exclude_bias_and_norm=True))]


def _plain_config(config):
    return {k: v for k, v in config.items() if not torch.is_tensor(v)}


@pytest.mark.parametrize("fused_cls,config", ALL_FUSED, ids=[c.__name__ + str(i) for i, (c, _) in enumerate(ALL_FUSED)])
@pytest.mark.parametrize("how", ["deepcopy", "torch.save"])
def test_a_copied_optimizer_trains_on_as_the_original(fused_cls, config, how):
    # torch's Optimizer pickles only defaults, state and param_groups: the fused step's own
    # attributes (and LAMB's options) must survive a deepcopy or torch.save of the optimizer.
    params = make_params()
    opt = run(fused_cls, params, steps=3, **_plain_config(config))
    if how == "deepcopy":
        params2, opt2 = copy.deepcopy((params, opt))
    else:
        buffer = io.BytesIO()
        torch.save((params, opt), buffer)
        buffer.seek(0)
        params2, opt2 = torch.load(buffer, weights_only=False)
    _steps(opt, params, 3, start=3)
    _steps(opt2, params2, 3, start=3)
    assert_close_params_and_state(opt, params, opt2, params2, atol=0, rtol=0)
    assert opt2._step_supports_amp_scaling and repr(opt2) == repr(opt)


@pytest.mark.parametrize("fused_cls,config", ALL_FUSED, ids=[c.__name__ + str(i) for i, (c, _) in enumerate(ALL_FUSED)])
def test_grad_scaler_leaves_gradients_unscaled_as_torch(fused_cls, config):
    # After scaler.step(opt), .grad holds the unscaled gradient with torch's optimizers (GradScaler
    # unscales first, or torch's fused kernels unscale in place): code that reads it then (logging)
    # must see the same.
    g = torch.Generator().manual_seed(4)
    p = torch.nn.Parameter(torch.randn(5, 3, generator=g))
    x = torch.randn(7, 5, generator=g)
    opt = fused_cls([p], **_plain_config(config))
    scaler = torch.amp.GradScaler("cpu", init_scale=64.0)
    scaler.scale((x @ p).square().sum()).backward()
    q = p.detach().clone().requires_grad_()
    (x @ q).square().sum().backward()
    scaler.step(opt)
    scaler.update()
    torch.testing.assert_close(p.grad, q.grad, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("info", RESET_INFOS, ids=[i[0].__name__ for i in RESET_INFOS])
def test_gradient_strides_may_differ_on_size_one_dims(backend, info):
    # A 1x1 conv's weight gradient after a permuted input comes back strided (64, 1, 64, 64) for a
    # parameter strided (64, 1, 1, 1): the same memory order, which torch's optimizers take.
    torch_cls, fused_cls, configs = info
    config = _plain_config(configs[-1])
    g = torch.Generator().manual_seed(5)
    w = torch.nn.Parameter(torch.randn(128, 64, 1, 1, generator=g))
    (ref,) = clone([w])
    opt, ref_opt = fused_cls([w], **config), torch_cls([ref], **config)
    for _ in range(3):
        grad = torch.randn(8192, generator=g)
        w.grad = grad.clone().as_strided((128, 64, 1, 1), (64, 1, 64, 64))
        ref.grad = grad.clone().view(128, 64, 1, 1)
        with fusedtech.use_backend(backend):
            opt.step()
        ref_opt.step()
    assert_close_params_and_state(ref_opt, [ref], opt, [w], **FP32_TOL)


@pytest.mark.parametrize("info", RESET_INFOS, ids=[i[0].__name__ for i in RESET_INFOS])
def test_steady_steps_reuse_the_buckets(info, monkeypatch):
    # The checks that let a step reuse last step's buckets (state, strides) must pass in steady
    # state, or every step would rebuild them (plain SGD, which keeps no state, included).
    from fusedtech.optim import _multi_tensor as mt
    torch_cls, fused_cls, configs = info
    builds = []
    real = mt._collect
    monkeypatch.setattr(mt, "_collect", lambda *a, **k: builds.append(1) or real(*a, **k))
    for config in configs[:2]:
        # Dense parameters (a non-dense one is stepped through a copy, and rebuilds by design).
        params = [torch.nn.Parameter(torch.randn(5, 3)), torch.nn.Parameter(torch.randn(6, 4).t()),
                  torch.nn.Parameter(torch.randn(7))]
        opt = fused_cls(params, **_plain_config(config))
        for step in range(6):
            for p in params:
                p.grad = torch.randn_like(p)
            opt.step()
            if step == 2:
                builds.clear()
        assert not builds, (config, len(builds))


def test_torch_step_hooks_run_once_with_torch_stepped_parameters():
    # A torch.optim.Adam instance puts torch's hook wrapper on torch.optim.Adam.step; handing
    # parameters to that step must not run the fused optimizer's hooks a second time.
    torch.optim.Adam([torch.nn.Parameter(torch.randn(2))])
    calls = []
    p = torch.nn.Parameter(torch.randn(3, dtype=torch.float64))
    opt = optim.Adam([p, torch.nn.Parameter(torch.randn(3))])
    opt.register_step_pre_hook(lambda *a: calls.append("pre"))
    opt.register_step_post_hook(lambda *a: calls.append("post"))
    for q in opt.param_groups[0]["params"]:
        q.grad = torch.ones_like(q)
    opt.step()
    assert calls == ["pre", "post"] and opt.state[p]["step"].item() == 1


def test_lamb_refuses_what_its_kernels_do_not_take():
    p = torch.nn.Parameter(torch.randn(3, dtype=torch.float64))
    p.grad = torch.randn(3, dtype=torch.float64)
    with pytest.raises(TypeError, match="LAMB supports float32, float16 and bfloat16 parameters"):
        optim.LAMB([p]).step()


@pytest.mark.parametrize("info", INFOS, ids=[i[0].__name__ for i in INFOS])
def test_defaults_repr_and_validation_match_torch(info):
    torch_cls, fused_cls, _ = info
    t, f = torch_cls(make_params()), fused_cls(make_params())
    assert t.defaults == f.defaults and repr(t) == repr(f)
    assert f._step_supports_amp_scaling
    assert isinstance(f, torch_cls)
    for bad in (dict(lr=-1.0), dict(weight_decay=-1.0)):
        with pytest.raises(ValueError) as expected:
            torch_cls(make_params(), **bad)
        with pytest.raises(ValueError, match=str(expected.value)):
            fused_cls(make_params(), **bad)
    with pytest.raises(ValueError, match="differentiable"):
        fused_cls(make_params(), differentiable=True)
    if torch_cls is torch.optim.RMSprop:  # torch's RMSprop refuses sparse gradients; its words
        p = torch.nn.Parameter(torch.randn(3, 2))
        p.grad = torch.randn(3, 2).to_sparse()
        with pytest.raises(RuntimeError, match="sparse"):
            fused_cls([p]).step()


def test_aliases_and_namespace():
    assert optim.FusedSGD is optim.SGD and optim.FusedRMSprop is optim.RMSprop and optim.FusedAdagrad is optim.Adagrad
    for name in ("Adam", "AdamW", "SGD", "RMSprop", "Adagrad"):
        assert name in optim.FUSED


@pytest.mark.parametrize("info", INFOS, ids=[i[0].__name__ for i in INFOS])
def test_compiled_step_matches_eager(info):
    _, fused_cls, configs = info
    config = {k: v for k, v in configs[-1].items() if not isinstance(v, torch.Tensor)}
    assert_compiled_step_matches_eager(lambda params: fused_cls(params, **config))


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", LOWP_CASES, ids=[_id(c) for c in LOWP_CASES])
def test_gpu_matches_oracle(backend, dtype, case):
    _, fused_cls, config = case
    config = {k: (v.item() if isinstance(v, torch.Tensor) else v) for k, v in config.items()}
    params = make_params(dtype, device="cuda") + [torch.nn.Parameter(torch.randn(70_000, device="cuda").to(dtype))
                                                  for _ in range(40)]
    ref_params = clone(params)
    ref = run(fused_cls, ref_params, backend="torch", **config)
    fused = run(fused_cls, params, backend=backend, **config)
    tol = FP32_TOL if dtype == torch.float32 else LOWP_TOL[dtype]
    assert_close_params_and_state(ref, ref_params, fused, params, **tol)


def test_sgd_resumes_a_checkpoint_whose_momentum_buffer_is_none_as_torch():
    # torch 1.x's SGD wrote momentum_buffer None for parameters without one yet; torch makes the
    # buffer again (a copy of the gradient) on the next step.
    p, ref = torch.nn.Parameter(torch.randn(4, 3)), None
    ref = torch.nn.Parameter(p.detach().clone())
    opt, ref_opt = optim.SGD([p], lr=0.1, momentum=0.9), torch.optim.SGD([ref], lr=0.1, momentum=0.9)
    saved = ref_opt.state_dict()
    saved["state"] = {0: {"momentum_buffer": None}}
    opt.load_state_dict(copy.deepcopy(saved)), ref_opt.load_state_dict(copy.deepcopy(saved))
    for step in range(3):
        p.grad = torch.randn(4, 3, generator=torch.Generator().manual_seed(step))
        ref.grad = p.grad.clone()
        opt.step(), ref_opt.step()
    assert_close_params_and_state(ref_opt, [ref], opt, [p], **FP32_TOL)


def test_adagrad_group_added_later_starts_from_the_constructors_accumulator_as_torch():
    # torch starts a late group's sum from the constructor's initial_accumulator_value, whatever
    # the group's own says.
    g = torch.Generator().manual_seed(3)
    first, second = torch.nn.Parameter(torch.randn(4, generator=g)), torch.nn.Parameter(torch.randn(3, generator=g))
    ref_first, ref_second = clone([first, second])
    opt = optim.Adagrad([first], lr=0.1, initial_accumulator_value=3.5)
    ref_opt = torch.optim.Adagrad([ref_first], lr=0.1, initial_accumulator_value=3.5)
    opt.add_param_group({"params": [second], "initial_accumulator_value": 5.0})
    ref_opt.add_param_group({"params": [ref_second], "initial_accumulator_value": 5.0})
    for step in range(3):
        for p, r in ((first, ref_first), (second, ref_second)):
            p.grad = torch.randn(p.shape, generator=g)
            r.grad = p.grad.clone()
        opt.step(), ref_opt.step()
    assert_close_params_and_state(ref_opt, [ref_first, ref_second], opt, [first, second], **FP32_TOL)


DUPLICATE_CASES = [(torch.optim.SGD, optim.SGD, dict(lr=0.05, momentum=0.9, nesterov=True)),
                   (torch.optim.RMSprop, optim.RMSprop, dict(lr=1e-2, centered=True, momentum=0.5)),
                   (torch.optim.Adagrad, optim.Adagrad, dict(lr=0.1)),
                   (torch.optim.Adam, optim.Adam, dict(lr=1e-2, amsgrad=True)),
                   (torch.optim.AdamW, optim.AdamW, dict(lr=1e-2, weight_decay=0.1))]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", DUPLICATE_CASES, ids=[c[0].__name__ for c in DUPLICATE_CASES])
@pytest.mark.parametrize("scaled", [False, True])
def test_a_parameter_listed_twice_is_stepped_twice_in_turn_as_torch(backend, case, scaled):
    # torch warns and updates it once per listing, one after the other; one launch holding it twice
    # would race (two chunks on the same memory) and count the step twice before either update.
    torch_cls, fused_cls, config = case
    g = torch.Generator().manual_seed(4)
    a, b, c = (torch.nn.Parameter(torch.randn(*s, generator=g)) for s in ((300,), (7, 5), (3,)))
    ref = clone([a, b, c])
    with pytest.warns(UserWarning, match="duplicate parameters"):
        opt = fused_cls([a, b, a, c, a], **config)
    with pytest.warns(UserWarning, match="duplicate parameters"):
        ref_opt = torch_cls([ref[0], ref[1], ref[0], ref[2], ref[0]], foreach=False, **config)
    for step in range(4):
        for p, r in zip((a, b, c), ref):
            p.grad = torch.randn(p.shape, generator=g)
            r.grad = p.grad.clone()
        if scaled:  # what GradScaler hands a fused step: gradients scaled by 1024 and the scale
            for p in (a, b, c):
                p.grad.mul_(1024.0)
            opt.grad_scale, opt.found_inf = torch.tensor(1024.0), torch.tensor(0.0)
        with fusedtech.use_backend(backend):
            opt.step()
        ref_opt.step()
        opt.__dict__.pop("grad_scale", None), opt.__dict__.pop("found_inf", None)
        if scaled:  # the gradients are left unscaled, once, as torch's
            for p, r in zip((a, b, c), ref):
                torch.testing.assert_close(p.grad, r.grad, **FP32_TOL)
    assert_close_params_and_state(ref_opt, ref, opt, [a, b, c], **FP32_TOL)
