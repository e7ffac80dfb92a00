"""Fused Adam / AdamW against torch.optim.Adam / AdamW and against our pure-PyTorch oracle.

Tolerances (documented here, never loosened to make a test pass):
- float32, any backend vs torch.optim (single-tensor path) after 20 steps: atol 1e-6, rtol 1e-5.
  Both compute in fp32 with the same operation order; what remains is FMA contraction and
  vectorised lerp inside torch's CPU kernels (seen: a few 1e-8 absolute).
- float16 / bfloat16, kernel vs our oracle (same fp32 math, one rounding per stored value):
  two units in the last place of the storage dtype (fp16 rtol 2e-3, bf16 rtol 1.6e-2) plus atol
  1e-3 / 1e-2, since a one-ulp difference in a rounded state can carry one more ulp into the param.
- float16 / bfloat16 vs torch.optim: torch rounds after every op, we round once; both are compared
  with an fp32 run and our error must be no larger than twice torch's plus one ulp of the dtype.
"""
from __future__ import annotations

import copy
import io
import itertools

import pytest
import torch

import fusedtech
from fusedtech import optim
from fusedtech.reference import adam as reference
from conftest import cpu_backends
from optim_common import (assert_close_params_and_state, assert_compiled_step_matches_eager,
                          clone, make_params, run, set_grads, _steps)

BACKENDS = cpu_backends()
FP32_TOL = dict(atol=1e-6, rtol=1e-5)
LOWP_TOL = {torch.float16: dict(atol=1e-3, rtol=2e-3), torch.bfloat16: dict(atol=1e-2, rtol=1.6e-2)}
ULP = {torch.float16: 2.0 ** -10, torch.bfloat16: 2.0 ** -7}
PAIRS = [(torch.optim.Adam, optim.Adam), (torch.optim.AdamW, optim.AdamW)]


CONFIGS = [
    dict(),
    dict(lr=1e-2, weight_decay=0.1),
    dict(lr=1e-2, amsgrad=True),
    dict(lr=3e-3, maximize=True, weight_decay=0.05),
    dict(lr=1e-2, betas=(0.8, 0.99), eps=1e-6, amsgrad=True, weight_decay=0.01),
    dict(lr=torch.tensor(5e-3)),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("pair", PAIRS, ids=lambda p: p[0].__name__)
@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()) or "default")
def test_fp32_matches_torch(backend, pair, config):
    torch_cls, fused_cls = pair
    params = make_params()
    ref_params = clone(params)
    ref = run(torch_cls, ref_params, foreach=False, **copy.deepcopy(config))
    fused = run(fused_cls, params, backend=backend, **copy.deepcopy(config))
    assert_close_params_and_state(ref, ref_params, fused, params, **FP32_TOL)


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "torch"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("config", [dict(lr=1e-2), dict(lr=1e-2, amsgrad=True, weight_decay=0.1, maximize=True)],
                         ids=["default", "amsgrad-wd-max"])
@pytest.mark.parametrize("fused_cls", [optim.Adam, optim.AdamW], ids=lambda c: c.__name__)
def test_low_precision_kernel_matches_oracle(backend, dtype, config, fused_cls):
    params = make_params(dtype)
    ref_params = clone(params)
    ref = run(fused_cls, ref_params, backend="torch", **config)
    fused = run(fused_cls, params, backend=backend, **config)
    assert_close_params_and_state(ref, ref_params, fused, params, **LOWP_TOL[dtype])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_low_precision_no_worse_than_torch(backend, dtype):
    exact_params = make_params(torch.float32)
    params = make_params(dtype)
    torch_params = clone(params)
    # The fp32 run sees the same (rounded) gradients as the low-precision runs.
    exact = optim.AdamW(exact_params, lr=1e-2)
    fused = optim.AdamW(params, lr=1e-2)
    ref = torch.optim.AdamW(torch_params, lr=1e-2, foreach=False)
    for s in range(20):
        set_grads(params, s)
        set_grads(torch_params, s)
        for pe, p in zip(exact_params, params):
            pe.grad = None if p.grad is None else p.grad.float()
        exact.step()
        with fusedtech.use_backend(backend):
            fused.step()
        ref.step()
    for pe, p, pt in zip(exact_params, params, torch_params):
        if pe.numel() == 0:
            continue
        ours = (p.float() - pe).abs().max().item()
        theirs = (pt.float() - pe).abs().max().item()
        assert ours <= 2 * theirs + ULP[dtype] * pe.abs().max().item(), (ours, theirs)


@pytest.mark.parametrize("backend", BACKENDS)
def test_param_groups_and_mixed_dtypes(backend):
    a, b = make_params(torch.float32, seed=1), make_params(torch.bfloat16, seed=2)
    groups = [dict(params=a, lr=1e-2, weight_decay=0.1), dict(params=b, lr=3e-3, amsgrad=True)]
    ref_groups = [dict(g, params=clone(g["params"])) for g in groups]
    ref = run(optim.AdamW, ref_groups, backend="torch")
    fused = run(optim.AdamW, groups, backend=backend)
    assert_close_params_and_state(ref, ref_groups[0]["params"], fused, a, **FP32_TOL)
    assert_close_params_and_state(ref, ref_groups[1]["params"], fused, b, **LOWP_TOL[torch.bfloat16])


@pytest.mark.parametrize("backend", BACKENDS)
def test_many_tensors_need_several_launches(backend):
    # 70 tensors exceed one CUDA launch's 32-tensor table; chunk boundaries fall mid-tensor.
    g = torch.Generator().manual_seed(3)
    params = [torch.nn.Parameter(torch.randn(n, generator=g)) for n in itertools.islice(itertools.cycle([1, 7, 300, 0, 65]), 70)]
    ref_params = clone(params)
    ref = run(torch.optim.Adam, ref_params, steps=3, foreach=False, lr=1e-2)
    fused = run(optim.Adam, params, steps=3, backend=backend, lr=1e-2)
    assert_close_params_and_state(ref, ref_params, fused, params, **FP32_TOL)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_master_weights(backend, dtype):
    params = make_params(dtype)
    opt = run(optim.AdamW, params, backend=backend, lr=1e-2, master_weights=True)
    for p in params:
        if p.grad is None and p.numel() == 0:
            continue
        st = opt.state[p]
        assert st["master_param"].dtype == torch.float32 and st["exp_avg"].dtype == torch.float32
        torch.testing.assert_close(p, st["master_param"].to(dtype), atol=0, rtol=0)
    # The fp32 masters follow the fp32 math on the same (rounded) gradients.
    exact = [torch.nn.Parameter(p.detach().float()) for p in make_params(dtype)]
    exact_opt = optim.AdamW(exact, lr=1e-2)
    for s in range(20):
        set_grads(params, s)
        for pe, p in zip(exact, params):
            pe.grad = None if p.grad is None else p.grad.float()
        exact_opt.step()
    for pe, p in zip(exact, params):
        torch.testing.assert_close(opt.state[p]["master_param"], pe.detach(), **FP32_TOL)


@pytest.mark.parametrize("backend", BACKENDS)
def test_state_dict_round_trip_with_torch(backend):
    for torch_cls, fused_cls in PAIRS:
        # torch -> fusedtech, through torch.save / torch.load(weights_only=True), mid-training.
        p_torch = make_params()
        t_opt = run(torch_cls, p_torch, steps=5, foreach=False, lr=1e-2, amsgrad=True)
        buf = io.BytesIO()
        torch.save(t_opt.state_dict(), buf)
        buf.seek(0)
        sd = torch.load(buf, weights_only=True)
        p_ours = clone(p_torch)
        f_opt = fused_cls(p_ours, lr=1e-2, amsgrad=True)
        f_opt.load_state_dict(sd)
        _steps(t_opt, p_torch, 5, start=5)
        _steps(f_opt, p_ours, 5, backend, start=5)
        assert_close_params_and_state(t_opt, p_torch, f_opt, p_ours, **FP32_TOL)

        # fusedtech -> torch.
        p_ours = make_params()
        f_opt = run(fused_cls, p_ours, steps=5, backend=backend, lr=1e-2)
        sd = f_opt.state_dict()
        assert sd["param_groups"][0].keys() == torch_cls(make_params(), lr=1e-2).state_dict()["param_groups"][0].keys()
        p_torch = clone(p_ours)
        t_opt = torch_cls(p_torch, lr=1e-2, foreach=False)
        t_opt.load_state_dict(copy.deepcopy(sd))
        _steps(t_opt, p_torch, 5, start=5)
        _steps(f_opt, p_ours, 5, backend, start=5)
        assert_close_params_and_state(t_opt, p_torch, f_opt, p_ours, **FP32_TOL)


def test_state_layout_matches_torch():
    p1, p2 = make_params(), make_params()
    t_opt = run(torch.optim.Adam, p1, steps=2, foreach=False, amsgrad=True)
    f_opt = run(optim.Adam, p2, steps=2, amsgrad=True)
    for a, b in zip(p1, p2):
        st, sf = t_opt.state[a], f_opt.state[b]
        assert st.keys() == sf.keys()
        assert sf["step"].dtype == torch.float32 and sf["step"].dim() == 0
        assert sf["step"].item() == st["step"].item()
        for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
            assert sf[key].dtype == st[key].dtype and sf[key].shape == st[key].shape


@pytest.mark.parametrize("backend", BACKENDS)
def test_grad_scaler_skip_on_inf_changes_nothing(backend):
    params = make_params()
    opt = run(optim.Adam, params, steps=2, backend=backend, lr=1e-2, amsgrad=True)
    before = [p.detach().clone() for p in params]
    state_before = copy.deepcopy({k: {n: t.clone() for n, t in v.items()} for k, v in opt.state.items()})
    set_grads(params, 7)
    opt.grad_scale = torch.tensor(1024.0)
    opt.found_inf = torch.tensor(1.0)
    with fusedtech.use_backend(backend):
        opt.step()
    del opt.grad_scale, opt.found_inf
    for p, b in zip(params, before):
        assert torch.equal(p, b)
    for p in params:
        for key, t in state_before.get(p, {}).items():
            assert torch.equal(opt.state[p][key], t), key


@pytest.mark.parametrize("backend", BACKENDS)
def test_grad_scaler_unscales_in_kernel(backend):
    params, ref_params = make_params(), None
    ref_params = clone(params)
    ref = torch.optim.Adam(ref_params, lr=1e-2, foreach=False)
    fused = optim.Adam(params, lr=1e-2)
    for s in range(5):
        set_grads(params, s)
        set_grads(ref_params, s)
        for p in params:
            if p.grad is not None:
                p.grad.mul_(512.0)  # what GradScaler leaves in .grad (a power of two: exact)
        fused.grad_scale, fused.found_inf = torch.tensor(512.0), torch.tensor(0.0)
        with fusedtech.use_backend(backend):
            fused.step()
        ref.step()
    assert_close_params_and_state(ref, ref_params, fused, params, **FP32_TOL)


def test_real_grad_scaler_flow():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    ref_model = copy.deepcopy(model)
    opt, ref_opt = optim.Adam(model.parameters(), lr=1e-2), torch.optim.Adam(ref_model.parameters(), lr=1e-2)
    scaler, ref_scaler = torch.amp.GradScaler("cpu", init_scale=256.0), torch.amp.GradScaler("cpu", init_scale=256.0)
    for s in range(6):
        x = torch.randn(4, 8, generator=torch.Generator().manual_seed(s))
        if s == 3:
            x[0, 0] = float("inf")  # an overflowing step: skipped by both
        for m, o, sc in ((model, opt, scaler), (ref_model, ref_opt, ref_scaler)):
            o.zero_grad()
            sc.scale(m(x).sum()).backward()
            sc.step(o)
            sc.update()
    assert scaler.get_scale() == ref_scaler.get_scale() < 256.0
    for p, q in zip(model.parameters(), ref_model.parameters()):
        torch.testing.assert_close(p, q, **FP32_TOL)
        assert opt.state[p]["step"].item() == ref_opt.state[q]["step"].item() == 5


def test_lr_scheduler_drives_fused_optimizer():
    p1, p2 = make_params(), make_params()
    t_opt, f_opt = torch.optim.AdamW(p1, lr=1e-2, foreach=False), optim.AdamW(p2, lr=1e-2)
    t_s = optim.lr_scheduler.OneCycleLR(t_opt, max_lr=0.05, total_steps=12)
    f_s = optim.lr_scheduler.OneCycleLR(f_opt, max_lr=0.05, total_steps=12)
    for s in range(12):
        set_grads(p1, s)
        set_grads(p2, s)
        t_opt.step(), f_opt.step(), t_s.step(), f_s.step()
        assert f_opt.param_groups[0]["lr"] == t_opt.param_groups[0]["lr"]
    for a, b in zip(p1, p2):
        torch.testing.assert_close(b, a, **FP32_TOL)


def test_namespace_mirrors_torch_optim():
    import torch.optim as topt
    for name in ("SGD", "RMSprop", "Adagrad", "lr_scheduler", "Optimizer", "swa_utils"):
        assert hasattr(optim, name)
    assert optim.lr_scheduler is topt.lr_scheduler
    assert optim.FusedAdam is optim.Adam and optim.FusedAdamW is optim.AdamW
    assert isinstance(optim.Adam(make_params()), topt.Adam)


def test_constructor_defaults_and_repr_match_torch():
    for torch_cls, fused_cls in PAIRS:
        t, f = torch_cls(make_params()), fused_cls(make_params())
        assert t.defaults == f.defaults
        assert repr(t) == repr(f)
        assert f._step_supports_amp_scaling


@pytest.mark.parametrize("kwargs", [dict(lr=-1.0), dict(betas=(1.0, 0.9)), dict(betas=(0.9, -0.1)),
                                    dict(eps=-1e-8), dict(weight_decay=-0.1)])
def test_invalid_hyperparameters_same_message_as_torch(kwargs):
    for torch_cls, fused_cls in PAIRS:
        with pytest.raises(ValueError) as expected:
            torch_cls(make_params(), **kwargs)
        with pytest.raises(ValueError, match=str(expected.value).replace("(", r"\(").replace(")", r"\)")):
            fused_cls(make_params(), **kwargs)


def test_differentiable_refused():
    with pytest.raises(ValueError, match="differentiable"):
        optim.Adam(make_params(), differentiable=True)


def test_sparse_gradient_refused():
    p = torch.nn.Parameter(torch.randn(4, 3))
    p.grad = torch.randn(4, 3).to_sparse()
    with pytest.raises(RuntimeError, match="sparse gradients"):
        optim.Adam([p]).step()


@pytest.mark.parametrize("backend", BACKENDS)
def test_amsgrad_keeps_nan_in_the_running_maximum_as_torch(backend):
    p = torch.nn.Parameter(torch.tensor([0.5, -1.0, 2.0]))
    p.grad = torch.tensor([float("nan"), 1.0, -2.0])
    (ref,) = [torch.nn.Parameter(p.detach().clone())]
    ref.grad = p.grad.clone()
    opt = optim.Adam([p], amsgrad=True)
    with fusedtech.use_backend(backend):
        opt.step()
    ref_opt = torch.optim.Adam([ref], amsgrad=True)
    ref_opt.step()
    ours, theirs = opt.state[p]["max_exp_avg_sq"], ref_opt.state[ref]["max_exp_avg_sq"]
    assert torch.equal(ours.isnan(), theirs.isnan()) and ours.isnan()[0]
    torch.testing.assert_close(ours[1:], theirs[1:])


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b in ("cpu", "triton")])
def test_op_lists_are_checked_before_a_kernel_reads_them(backend):
    # The ops index every list with the parameters' offsets: a short or missing list, or another
    # dtype, would be read out of bounds (the Triton launcher crashed the process on grads=[]).
    from fusedtech.ops.adam import adam_step_
    from fusedtech.ops.grad_norm import multi_tensor_norm
    p, step = [torch.randn(6)], [torch.zeros(())]
    bad = {"grads has 0 tensors": ([], [torch.zeros(6)]),
           "exp_avgs": ([torch.randn(6)], [torch.zeros(2)]),
           "grads": ([torch.randn(6).bfloat16()], [torch.zeros(6)])}
    for match, (grads, exp_avgs) in bad.items():
        with fusedtech.use_backend(backend), pytest.raises(RuntimeError, match=match):
            adam_step_(p, grads, exp_avgs, [torch.zeros(6)], [], [], step, 1e-3, None, 0.9, 0.999, 1e-8, 0.0,
                       False, False, False, None, None)
    assert torch.isfinite(p[0]).all()
    if backend == "triton":  # the cpu op takes each tensor's own dtype
        with fusedtech.use_backend(backend), pytest.raises(RuntimeError, match="one dtype"):
            multi_tensor_norm([torch.randn(3, 4), torch.randn(12).bfloat16()], 2.0)


def test_sparse_gradient_refused_by_torchs_words():
    # Handed to torch.optim.Adam's step, which refuses sparse gradients as it always does.
    p = torch.nn.Parameter(torch.randn(4, 3))
    p.grad = torch.randn(4, 3).to_sparse()
    with pytest.raises(RuntimeError, match="SparseAdam"):
        optim.Adam([p]).step()


def test_unavailable_backend_requested():
    params = make_params()
    set_grads(params, 0)
    with fusedtech.use_backend("cuda"), pytest.raises(fusedtech.BackendUnavailableError, match="cuda"):
        optim.Adam(params).step()


def test_kernel_rejects_mismatched_lists():
    if "cpu" not in BACKENDS:
        pytest.skip("cpu extension not built")
    p = [torch.randn(4)]
    with pytest.raises(RuntimeError, match="grads.*has 0 tensors"):
        torch.ops.fusedtech_C.adam_step_(p, [], [torch.zeros(4)], [torch.zeros(4)], [], [], [torch.ones(())],
                                          1e-3, None, 0.9, 0.999, 1e-8, 0.0, False, False, False, None, None)
    with pytest.raises(RuntimeError, match=r"exp_avgs\[0\] has dtype"):
        torch.ops.fusedtech_C.adam_step_(p, [torch.randn(4)], [torch.zeros(4, dtype=torch.float64)], [torch.zeros(4)],
                                          [], [], [torch.ones(())], 1e-3, None, 0.9, 0.999, 1e-8, 0.0, False, False,
                                          False, None, None)


def test_closure_and_zero_grad():
    p = make_params()
    opt = optim.Adam(p, lr=1e-2)

    def closure():
        set_grads(p, 0)
        return torch.tensor(3.0)

    assert opt.step(closure).item() == 3.0
    opt.zero_grad()
    assert all(q.grad is None for q in p)


def test_compiled_step_matches_eager():
    """torch.compile traces the step through the fusedtech::adam_step_ custom op."""
    assert_compiled_step_matches_eager(lambda params: optim.AdamW(params, lr=1e-2))


def test_oracle_is_torch_math_in_fp32():
    # The oracle itself against torch.optim, so every kernel-vs-oracle test inherits the link.
    params = make_params()
    ref_params = clone(params)
    ref = run(torch.optim.Adam, ref_params, foreach=False, lr=1e-2, weight_decay=0.1, amsgrad=True)
    ours = run(optim.Adam, params, backend="torch", lr=1e-2, weight_decay=0.1, amsgrad=True)
    assert_close_params_and_state(ref, ref_params, ours, params, **FP32_TOL)
    assert reference.adam_step_ is not None


# --- GPU (run on a lent device) ---------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("config", [dict(lr=1e-2), dict(lr=1e-2, amsgrad=True, weight_decay=0.1, maximize=True),
                                    dict(lr=1e-2, master_weights=True)], ids=["default", "amsgrad-wd-max", "master"])
def test_gpu_matches_oracle(backend, dtype, config):
    if config.get("master_weights") and dtype == torch.float32:
        pytest.skip("master weights apply to fp16/bf16 only")
    params = make_params(dtype, device="cuda")
    params += [torch.nn.Parameter(torch.randn(70_000, device="cuda").to(dtype)) for _ in range(40)]
    ref_params = clone(params)
    ref = run(optim.AdamW, ref_params, backend="torch", **config)
    fused = run(optim.AdamW, params, backend=backend, **config)
    tol = FP32_TOL if dtype == torch.float32 else LOWP_TOL[dtype]
    assert_close_params_and_state(ref, ref_params, fused, params, **tol)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_gpu_matches_torch_fused_and_grad_scaler(backend):
    params = make_params(device="cuda")
    ref_params = clone(params)
    ref = run(torch.optim.Adam, ref_params, fused=True, lr=1e-2, amsgrad=True)
    ours = run(optim.Adam, params, backend=backend, lr=1e-2, amsgrad=True)
    assert_close_params_and_state(ref, ref_params, ours, params, **FP32_TOL)
    before = [p.detach().clone() for p in params]
    steps = [ours.state[p]["step"].clone() for p in params if p in ours.state]
    set_grads(params, 99)
    ours.grad_scale, ours.found_inf = torch.tensor(8.0, device="cuda"), torch.tensor(1.0, device="cuda")
    with fusedtech.use_backend(backend):
        ours.step()
    assert all(torch.equal(p, b) for p, b in zip(params, before))
    assert all(torch.equal(ours.state[p]["step"], s) for p, s in zip([p for p in params if p in ours.state], steps))


@pytest.mark.gpu
def test_gpu_capturable_step_in_cuda_graph():
    params = [torch.nn.Parameter(torch.randn(1000, device="cuda")) for _ in range(3)]
    opt = optim.Adam(params, lr=torch.tensor(1e-2, device="cuda"), capturable=True)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()  # state allocated outside the capture
    graph = torch.cuda.CUDAGraph()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s), torch.cuda.graph(graph):
        opt.step()
    torch.cuda.current_stream().wait_stream(s)
    before = opt.state[params[0]]["step"].item()
    graph.replay()
    torch.cuda.synchronize()
    assert opt.state[params[0]]["step"].item() == before + 1


@pytest.mark.parametrize("backend", BACKENDS)
def test_reused_buckets_follow_state_and_layout_changes(backend):
    """step() reuses last step's buckets; loading new state, a gradient that disappears or one
    with another layout must all be picked up."""
    p_ours, p_ref = make_params(), make_params()
    ours = run(optim.Adam, p_ours, steps=3, backend=backend, lr=1e-2)
    ref = run(torch.optim.Adam, p_ref, steps=3, foreach=False, lr=1e-2)
    # Replace our state with torch's (different tensors, different values) mid-training.
    for a, b in zip(p_ours, p_ref):
        a.data.copy_(b.data)
    ours.load_state_dict(copy.deepcopy(ref.state_dict()))
    _steps(ours, p_ours, 2, backend, start=3)
    _steps(ref, p_ref, 2, start=3)
    assert_close_params_and_state(ref, p_ref, ours, p_ours, **FP32_TOL)
    # A gradient laid out differently from its (transposed) parameter goes through the slow path.
    for ps, opt in ((p_ours, ours), (p_ref, ref)):
        set_grads(ps, 50)
        ps[5].grad = ps[5].grad.contiguous()
        with fusedtech.use_backend(backend if opt is ours else None):
            opt.step()
    assert_close_params_and_state(ref, p_ref, ours, p_ours, **FP32_TOL)
