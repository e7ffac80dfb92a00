"""A training step CUDA graphs can capture: no host synchronisation inside an optimizer's step() or
a fused op's forward and backward. On CPU the Python side is checked directly (every way a tensor
reaches the host, patched to record its caller, must stay unused); the captures themselves are
`gpu` tests (torch.cuda.graph of a whole step, make_graphed_callables, torch.compile's
reduce-overhead mode without "skipping cudagraphs")."""
from __future__ import annotations

import contextlib
import copy
import traceback

import pytest
import torch

import fusedtech
import fusedtech.optim as fo
from fusedtech.nn import functional as F

# Every Tensor method that hands a value to the host (a device sync on a GPU).
HOST_READS = ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__", "__index__")

OPTIMIZERS = {
    "Adam": (fo.Adam, {}),
    "AdamW": (fo.AdamW, {"weight_decay": 0.1}),
    "SGD-nesterov": (fo.SGD, {"lr": 0.1, "momentum": 0.9, "nesterov": True}),
    "RMSprop": (fo.RMSprop, {"momentum": 0.9, "centered": True}),
    "Adagrad": (fo.Adagrad, {"lr_decay": 0.01}),
    "LAMB": (fo.LAMB, {"weight_decay": 0.01}),
}


@contextlib.contextmanager
def host_reads_recorded():
    """Records (method, fusedtech caller) for each host read made from fusedtech's code."""
    seen, saved = [], {name: getattr(torch.Tensor, name) for name in HOST_READS}

    def recording(name, original):
        def method(self, *args, **kwargs):
            frames = [f for f in traceback.extract_stack()[:-1] if "/fusedtech/" in f.filename
                      and "/reference/" not in f.filename]  # the oracles are not the fast path
            if frames:
                seen.append((name, f"{frames[-1].filename.rsplit('/', 2)[-2:]}:{frames[-1].lineno}"))
            return original(self, *args, **kwargs)
        return method

    for name, original in saved.items():
        setattr(torch.Tensor, name, recording(name, original))
    try:
        yield seen
    finally:
        for name, original in saved.items():
            setattr(torch.Tensor, name, original)


def _params():
    torch.manual_seed(0)
    params = [torch.randn(5, 3, requires_grad=True), torch.randn(7, requires_grad=True),
              torch.randn(2, 2, dtype=torch.bfloat16, requires_grad=True)]
    for p in params:
        p.grad = torch.randn_like(p)
    return params


@pytest.mark.parametrize("scaled", [False, True], ids=["plain", "grad-scaler"])
@pytest.mark.parametrize("name", OPTIMIZERS)
def test_an_optimizer_step_reads_nothing_back_to_the_host(name, scaled):
    cls, kwargs = OPTIMIZERS[name]
    params = _params()
    opt = cls(params, **kwargs)
    opt.step()  # the first step creates the state; the steps a graph would replay come after
    if scaled:  # what torch.amp.GradScaler hands a fused step
        opt.grad_scale, opt.found_inf = torch.tensor(8.0), torch.tensor(0.0)
    before = [p.detach().clone() for p in params]
    with host_reads_recorded() as seen:
        opt.step()
    assert seen == [], f"{name}.step() read tensors back to the host: {seen}"
    assert any(not torch.equal(a, p) for a, p in zip(before, params))  # it did step


@pytest.mark.parametrize("op", ["layer_norm", "rms_norm", "batch_norm", "batch_norm_act", "dropout",
                                "dropout_add_layer_norm", "drop_block2d"])
def test_a_fused_op_reads_nothing_back_to_the_host_forward_or_backward(op):
    torch.manual_seed(0)
    x = torch.randn(4, 6, 5, 8, requires_grad=True)
    w, b = torch.randn(8, requires_grad=True), torch.randn(8, requires_grad=True)
    wc, bc = torch.randn(6, requires_grad=True), torch.randn(6, requires_grad=True)
    rm, rv = torch.zeros(6), torch.ones(6)
    run = {
        "layer_norm": lambda: F.layer_norm(x, (8,), w, b),
        "rms_norm": lambda: F.rms_norm(x, (8,), w),
        "batch_norm": lambda: F.batch_norm(x, rm, rv, wc, bc, True, 0.1, 1e-5),
        "batch_norm_act": lambda: F.batch_norm_act(x, rm, rv, wc, bc, True, 0.1, 1e-5, "silu"),
        "dropout": lambda: F.dropout(x, 0.2),
        "dropout_add_layer_norm": lambda: F.dropout_add_layer_norm(x, x.detach() * 2, w, b, p=0.2),
        "drop_block2d": lambda: F.drop_block2d(x, 0.2, 3),
    }[op]
    run().sum().backward()  # first call: kernels built, backends chosen
    with host_reads_recorded() as seen:
        y = run()
        y.square().sum().backward()
    assert seen == [], f"{op} read tensors back to the host: {seen}"
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_the_host_read_recorder_sees_a_read_from_fusedtech_code():
    """The recorder itself: a host read inside fusedtech's code is caught (so an empty record means something)."""
    with host_reads_recorded() as seen:
        F._weight_has_zero(torch.ones(3))  # memory_efficient's eager check reads one bool back
    assert [name for name, _ in seen] == ["__bool__"]


# ------------------------------------------------------------------------------------ GPU captures

def _model(dropout=0.1):
    return torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.BatchNorm2d(16), torch.nn.ReLU(),
                               torch.nn.Flatten(), torch.nn.LayerNorm(16 * 8 * 8), torch.nn.Dropout(dropout),
                               torch.nn.Linear(16 * 8 * 8, 10))


@pytest.mark.gpu
@pytest.mark.parametrize("name", OPTIMIZERS)
def test_a_whole_training_step_is_captured_by_a_cuda_graph_and_replays_as_eager(name):
    cls, kwargs = OPTIMIZERS[name]
    torch.manual_seed(0)
    # no dropout here: the graph and the eager copy would draw different masks from one generator
    model = fusedtech.nn.convert_model(_model(dropout=0.0).cuda(), fuse_activations=True)
    eager = copy.deepcopy(model)
    opt = cls(model.parameters(), capturable=True, **kwargs) if name.startswith(("Adam", "RMSprop")) else \
        cls(model.parameters(), **kwargs)
    opt_eager = cls(eager.parameters(), **kwargs)
    x, y = torch.randn(8, 3, 8, 8, device="cuda"), torch.randint(0, 10, (8,), device="cuda")

    def step(m, o):
        loss = torch.nn.functional.cross_entropy(m(x), y)
        loss.backward()
        o.step()
        o.zero_grad(set_to_none=False)
        return loss

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up on a side stream, as torch's docs ask
        for _ in range(3):
            step(model, opt)
            step(eager, opt_eager)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured_loss = step(model, opt)
    for _ in range(3):
        graph.replay()
        eager_loss = step(eager, opt_eager)
    torch.cuda.synchronize()
    torch.testing.assert_close(captured_loss, eager_loss, rtol=1e-4, atol=1e-5)
    for p, q in zip(model.parameters(), eager.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5)


@pytest.mark.gpu
def test_make_graphed_callables_takes_a_converted_model():
    torch.manual_seed(0)
    model = fusedtech.nn.convert_model(_model().cuda(), fuse_activations=True)
    x = torch.randn(8, 3, 8, 8, device="cuda", requires_grad=True)
    graphed = torch.cuda.make_graphed_callables(model, (x,))
    out = graphed(x)
    out.sum().backward()
    assert torch.isfinite(x.grad).all()


@pytest.mark.gpu
def test_reduce_overhead_compile_of_a_converted_model_uses_cudagraphs(caplog):
    import logging
    torch.manual_seed(0)
    model = fusedtech.nn.convert_model(_model().cuda(), fuse_activations=True)
    opt = fo.AdamW(model.parameters(), capturable=True)
    compiled = torch.compile(model, mode="reduce-overhead")
    x = torch.randn(8, 3, 8, 8, device="cuda")
    with caplog.at_level(logging.WARNING):
        for _ in range(4):
            compiled(x).sum().backward()
            opt.step()
            opt.zero_grad()
    torch.cuda.synchronize()
    assert "skipping cudagraphs" not in caplog.text
