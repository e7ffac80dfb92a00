"""convert_model on the models people train: timm's and HF Transformers' norm classes, and the
BatchNorm -> activation pairs that a module's forward calls in a row (found with torch.fx). Models
are built from configs with random weights (never downloaded); each family's tests skip with the
reason where its library is absent (`.[test]` installs both).

Numerics: a converted model is compared with the unconverted one in float64 (the exact answer,
torch's own ops) and must be no worse than the unconverted model in the same dtype:
err(converted) <= NO_WORSE_FACTOR * err(original) + ATOL[dtype] * scale, scale the largest
magnitude of the exact answer. The factor allows the fused kernels' other (equally exact) order of
summation; ATOL covers an exact-zero err(original)."""
from __future__ import annotations

import copy

import pytest
import torch

from fusedtech.nn import TimmBatchNormAct2d, TimmGroupNormAct, TransformersRMSNorm, convert_model
from fusedtech.nn.convert import FoldedActivation

NO_WORSE_FACTOR = 2.0
ATOL = {torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 4e-3}


def _eps_of(dtype):
    return -torch.finfo(dtype).eps  # the coarsest dtype first: min() picks it

def _needs(name):
    return pytest.importorskip(name, reason=f"{name} is not installed (it comes with .[test])")


def _flat(tensors):
    return torch.cat([t.detach().double().reshape(-1) for t in tensors])


def _assert_no_worse(converted, original, exact, dtype, what):
    scale = max(exact.abs().max().item(), 1e-30)
    err_converted = (converted - exact).abs().max().item()
    err_original = (original - exact).abs().max().item()
    assert err_converted <= NO_WORSE_FACTOR * err_original + ATOL[dtype] * scale, (
        f"{what} in {dtype}: converted model is off by {err_converted:.3g}, the original by {err_original:.3g} "
        f"(scale {scale:.3g})")


def _forward_backward(model, inputs, seed=0):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    out = model(**inputs) if isinstance(inputs, dict) else model(inputs)
    out = out.logits if hasattr(out, "logits") else out
    out.float().square().mean().backward()
    return out.detach().double(), _flat(p.grad for p in model.parameters() if p.grad is not None)


def _to_dtype(inputs, dtype):
    if isinstance(inputs, dict):
        return inputs  # token ids
    return inputs.to(dtype)


def _check_numerics(build, inputs, dtype, train):
    """Forward and backward of the converted model against the original, both in `dtype`, with the
    original in float64 as the exact answer."""
    torch.manual_seed(0)
    original = build().to(dtype)
    exact = copy.deepcopy(original).double()
    converted = convert_model(copy.deepcopy(original), fuse_activations=True)
    for m in (original, exact, converted):
        m.train(train)
    y_exact, g_exact = _forward_backward(exact, _to_dtype(inputs, torch.float64))
    y_orig, g_orig = _forward_backward(original, _to_dtype(inputs, dtype))
    y_conv, g_conv = _forward_backward(converted, _to_dtype(inputs, dtype))
    _assert_no_worse(y_conv, y_orig, y_exact, dtype, "output")
    if train:
        _assert_no_worse(g_conv, g_orig, g_exact, dtype, "parameter gradients")
        # the running statistics (BatchNorm) moved as the original's did
        for (name, b_conv), b_orig, b_exact in zip(converted.named_buffers(), original.buffers(), exact.buffers()):
            if b_conv.is_floating_point():
                _assert_no_worse(b_conv.double(), b_orig.double(), b_exact.double(), dtype, f"buffer {name}")


def _three_sgd_steps(model, inputs):
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for step in range(3):
        _forward_backward(model, inputs, seed=step)
        opt.step()
    return _flat(model.parameters())


def _check_three_steps(build, inputs):
    torch.manual_seed(0)
    original = build()
    exact = copy.deepcopy(original).double()
    converted = convert_model(copy.deepcopy(original), fuse_activations=True)
    for m in (original, exact, converted):
        m.train()
    p_exact = _three_sgd_steps(exact, _to_dtype(inputs, torch.float64))
    p_orig = _three_sgd_steps(original, inputs)
    p_conv = _three_sgd_steps(converted, inputs)
    _assert_no_worse(p_conv, p_orig, p_exact, torch.float32, "parameters after 3 SGD steps")


def _check_compiles(build, inputs):
    """torch.compile(fullgraph=True) of the converted model: no graph break anywhere (the aot_eager
    backend traces forward and backward through the ops' fake kernels and autograd, without
    inductor's code generation, which the op tests cover)."""
    torch.manual_seed(0)
    converted = convert_model(build(), fuse_activations=True).train()
    reference = copy.deepcopy(converted)
    compiled = torch.compile(converted, fullgraph=True, backend="aot_eager")
    y_ref, g_ref = _forward_backward(reference, inputs)
    y, g = _forward_backward(compiled, inputs)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g, g_ref, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------- timm

def _timm_model(name, **kwargs):
    timm = _needs("timm")
    return lambda: timm.create_model(name, pretrained=False, num_classes=10, **kwargs)


TIMM_MODELS = {
    # name: (builder kwargs, the report's expected "replaced" keys, which norm classes they cover)
    "resnet18": ({}, {"BatchNorm2d+ReLU", "BatchNorm2d"}),
    "efficientnet_b0": ({}, {"timm.BatchNormAct2d"}),  # (inputs: see _timm_input)
    "convnext_atto": ({}, {"timm.LayerNorm2d"}),
    "vit_tiny_patch16_224": ({"img_size": 32, "patch_size": 8}, {"timm.LayerNorm"}),
}


def _timm_input(name, batch):
    """A well-conditioned input: efficientnet's last stages are 1x1 at 32x32, where batch
    statistics over two values leave gradients meaningless (in torch's own float32 as well)."""
    torch.manual_seed(2)
    size = 64 if name == "efficientnet_b0" else 32
    return torch.randn(max(batch, 8) if name == "efficientnet_b0" else batch, 3, size, size)


def _timm_norm_count(model):
    import timm.layers as layers
    kinds = (torch.nn.BatchNorm2d, torch.nn.LayerNorm, layers.BatchNormAct2d)
    return sum(isinstance(m, kinds) for m in model.modules())


@pytest.mark.parametrize("name", TIMM_MODELS)
def test_convert_model_replaces_every_norm_of_a_timm_model(name):
    kwargs, keys = TIMM_MODELS[name]
    model = _timm_model(name, **kwargs)()
    norms = _timm_norm_count(model)
    _, report = convert_model(model, fuse_activations=True, return_report=True)
    norm_keys = {k: v for k, v in report["replaced"].items() if k != "Dropout"}
    assert set(norm_keys) == keys
    assert sum(norm_keys.values()) == norms
    # every norm is replaced; what the report lists is only pairs it could not fold (resnet's
    # residual adds), each with its reason
    assert all(s["reason"].startswith("not folded") for s in report["skipped"])
    assert _timm_norm_count(model) == sum(
        isinstance(m, (torch.nn.BatchNorm2d, torch.nn.LayerNorm)) and type(m).__module__.startswith("fusedtech.")
        for m in model.modules())


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("name", TIMM_MODELS)
def test_a_converted_timm_model_is_no_less_exact_than_the_original(name, dtype, train):
    kwargs, _ = TIMM_MODELS[name]
    _check_numerics(_timm_model(name, **kwargs), _timm_input(name, 2), dtype, train)


@pytest.mark.parametrize("name", TIMM_MODELS)
def test_a_converted_timm_model_trains_three_steps_as_the_original(name):
    kwargs, _ = TIMM_MODELS[name]
    _check_three_steps(_timm_model(name, **kwargs), _timm_input(name, 4))


@pytest.mark.parametrize("name", ["resnet18", "efficientnet_b0", "convnext_atto"])
def test_a_converted_timm_model_compiles_as_one_graph(name):
    kwargs, _ = TIMM_MODELS[name]
    _check_compiles(_timm_model(name, **kwargs), _timm_input(name, 2))


def test_timm_batchnormact_runs_its_drop_and_unfusable_act_after_the_norm():
    timm = _needs("timm")
    torch.manual_seed(0)
    bn = timm.layers.BatchNormAct2d(6, act_layer=torch.nn.Hardswish)
    converted = convert_model(copy.deepcopy(bn))
    assert isinstance(converted, TimmBatchNormAct2d)
    x = torch.randn(3, 6, 5, 4)
    torch.testing.assert_close(converted(x), bn(x))
    converted.act = bn.act = torch.nn.SiLU()  # a child replaced later is what runs
    torch.testing.assert_close(converted(x), bn(x))
    assert converted.state_dict().keys() == bn.state_dict().keys()


def test_timm_group_norms_are_replaced_and_compute_as_timm():
    """timm's GroupNorm, GroupNorm1 (-> fusedtech GroupNorm), GroupNormAct, GroupNorm1Act (-> one
    GroupNormAct op where the act is one the kernels have, else the norm fused and the act after it)."""
    timm = _needs("timm")
    torch.manual_seed(3)
    layers = timm.layers
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3, padding=1), layers.GroupNorm(16, num_groups=4),
                                layers.GroupNormAct(16, 4, act_layer=torch.nn.SiLU), layers.GroupNorm1(16),
                                layers.GroupNormAct(16, 8, act_layer=torch.nn.Hardswish), layers.GroupNorm1Act(16))
    converted, report = convert_model(copy.deepcopy(model), return_report=True)
    assert report["replaced"] == {"timm.GroupNorm": 1, "timm.GroupNorm1": 1, "timm.GroupNormAct": 2,
                                  "timm.GroupNorm1Act": 1}, report
    assert all(type(m).__module__.startswith("fusedtech.") for m in list(converted)[1:])
    assert isinstance(converted[2], TimmGroupNormAct) and converted.state_dict().keys() == model.state_dict().keys()
    for memory_format in (torch.contiguous_format, torch.channels_last):
        x = torch.randn(2, 3, 6, 5).to(memory_format=memory_format)
        xt, xf = x.clone().requires_grad_(), x.clone().requires_grad_()
        yt, yf = model(xt), converted(xf)
        torch.testing.assert_close(yf, yt, atol=1e-5, rtol=1e-5)
        (gt,), (gf,) = torch.autograd.grad(yt.sum(), [xt]), torch.autograd.grad(yf.sum(), [xf])
        torch.testing.assert_close(gf, gt, atol=1e-5, rtol=1e-5)


def test_timm_layernorm2d_keeps_the_layout_timm_gives_for_both_memory_formats():
    timm = _needs("timm")
    ln = timm.layers.LayerNorm2d(8)
    converted = convert_model(copy.deepcopy(ln))
    for x in (torch.randn(2, 8, 5, 3), torch.randn(2, 8, 5, 3).to(memory_format=torch.channels_last)):
        y, y_ref = converted(x), ln(x)
        torch.testing.assert_close(y, y_ref)
        assert y.stride() == y_ref.stride()


def test_a_timm_fast_norm_layernorm_or_a_custom_subclass_is_left_alone_with_the_reason():
    timm = _needs("timm")

    class Scaled(timm.layers.LayerNorm):
        def forward(self, x):
            return 2 * super().forward(x)

    fast = timm.layers.LayerNorm(8)
    fast._fast_norm = True
    model = torch.nn.Sequential(Scaled(8), fast)
    _, report = convert_model(model, return_report=True)
    assert type(model[0]) is Scaled and model[1] is fast
    reasons = {s["module"]: s["reason"] for s in report["skipped"]}
    assert "overriding forward" in reasons["0"]
    assert "fast-norm" in reasons["1"]


# ------------------------------------------------------------------------ fx folding of BN -> act

class _Block(torch.nn.Module):
    """A residual block written the way timm and torchvision write theirs."""

    def __init__(self, c, shared_relu=False, functional=False):
        super().__init__()
        self.conv1, self.bn1, self.act1 = torch.nn.Conv2d(c, c, 3, padding=1), torch.nn.BatchNorm2d(c), torch.nn.ReLU()
        self.drop = torch.nn.Identity()
        self.conv2, self.bn2 = torch.nn.Conv2d(c, c, 3, padding=1), torch.nn.BatchNorm2d(c)
        self.act2 = self.act1 if shared_relu else torch.nn.SiLU()
        self.functional = functional

    def forward(self, x):
        y = self.act1(self.drop(self.bn1(self.conv1(x))))
        y = self.bn2(self.conv2(y))
        if self.functional:
            return torch.relu(y)
        return self.act2(y + x)


def test_fuse_activations_folds_pairs_a_forward_calls_in_a_row_and_reports_the_others():
    torch.manual_seed(0)
    model = torch.nn.Sequential(_Block(4), _Block(4, shared_relu=True), _Block(4, functional=True))
    reference = copy.deepcopy(model)
    _, report = convert_model(model, fuse_activations=True, return_report=True)
    assert report["replaced"] == {"BatchNorm2d+ReLU": 2, "BatchNorm2d": 4}
    assert isinstance(model[0].act1, FoldedActivation) and isinstance(model[2].act1, FoldedActivation)
    assert not isinstance(model[1].act1, FoldedActivation)  # shared with the block's last activation
    reasons = {s["module"]: s["reason"] for s in report["skipped"]}
    assert "more than once" in reasons["1.bn1"]
    assert "residual add" in reasons["0.bn2"]
    assert "function call" in reasons["2.bn2"]
    x = torch.randn(2, 4, 6, 6)
    torch.testing.assert_close(model(x), reference(x))
    assert model.state_dict().keys() == reference.state_dict().keys()


def test_a_folded_pair_stops_folding_when_an_identity_between_is_replaced():
    torch.manual_seed(0)
    block = _Block(4)
    convert_model(block, fuse_activations=True)
    block.drop = torch.nn.Dropout(0.0)  # what runs between norm and activation now
    reference = _Block(4)
    reference.load_state_dict(block.state_dict())
    reference.drop = torch.nn.Dropout(0.0)
    x = torch.randn(2, 4, 6, 6)
    torch.testing.assert_close(block(x), reference(x))


def test_a_pair_with_hooks_is_not_folded_and_the_report_says_why():
    block = _Block(4)
    seen = []
    block.bn1.register_forward_hook(lambda m, i, o: seen.append(o.min().item()))
    _, report = convert_model(block, fuse_activations=True, return_report=True)
    assert not isinstance(block.act1, FoldedActivation)
    assert any("hooks" in s["reason"] for s in report["skipped"] if s["module"] == "bn1")
    block(torch.randn(2, 4, 6, 6))
    assert seen and seen[0] < 0  # the hook still sees the norm's own (not activated) output


def test_a_module_that_does_not_trace_is_reported_and_its_norms_still_converted():
    class Branchy(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.bn, self.act = torch.nn.BatchNorm2d(3), torch.nn.ReLU()

        def forward(self, x):
            if x.sum() > 0:  # data-dependent: torch.fx cannot trace it
                return self.act(self.bn(x))
            return self.bn(x)

    model = Branchy()
    _, report = convert_model(model, fuse_activations=True, return_report=True)
    assert report["replaced"] == {"BatchNorm2d": 1}
    assert any("does not trace" in s["reason"] for s in report["skipped"])


# ---------------------------------------------------------------------------------- HF Transformers

def _hf_builders():
    transformers = _needs("transformers")
    small = dict(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2)
    return {
        "llama": lambda: transformers.LlamaForCausalLM(transformers.LlamaConfig(**small)),
        "qwen2": lambda: transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**small)),
        "gemma": lambda: transformers.GemmaForCausalLM(transformers.GemmaConfig(**small, head_dim=8)),
        "t5": lambda: transformers.T5ForConditionalGeneration(transformers.T5Config(
            vocab_size=96, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, dropout_rate=0.0)),
    }


HF_FORMS = {"llama": "llama", "qwen2": "llama", "gemma": "gemma", "t5": "t5"}


def _hf_inputs(family):
    torch.manual_seed(1)
    ids = torch.randint(0, 96, (2, 7))
    return {"input_ids": ids, "decoder_input_ids": ids} if family == "t5" else {"input_ids": ids}


@pytest.mark.parametrize("family", HF_FORMS)
def test_convert_model_replaces_every_rmsnorm_of_an_hf_model(family):
    model = _hf_builders()[family]()
    norms = sum(type(m).__name__.endswith(("RMSNorm", "LayerNorm")) for m in model.modules())
    keys = model.state_dict().keys()
    _, report = convert_model(model, return_report=True)
    assert norms > 0
    assert sum(v for k, v in report["replaced"].items() if k.startswith("transformers.")) == norms
    assert {m.form for m in model.modules() if isinstance(m, TransformersRMSNorm)} == {HF_FORMS[family]}
    assert report["skipped"] == []
    assert model.state_dict().keys() == keys


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("family", HF_FORMS)
def test_a_converted_hf_model_is_no_less_exact_than_the_original(family, dtype, train):
    _check_numerics(_hf_builders()[family], _hf_inputs(family), dtype, train)


@pytest.mark.parametrize("family", HF_FORMS)
def test_a_converted_hf_model_trains_three_steps_as_the_original(family):
    _check_three_steps(_hf_builders()[family], _hf_inputs(family))


@pytest.mark.parametrize("family", ["llama", "gemma"])
def test_a_converted_hf_model_compiles_as_one_graph(family):
    _check_compiles(_hf_builders()[family], _hf_inputs(family))


DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.mark.parametrize("weight_dtype", DTYPES, ids=str)
@pytest.mark.parametrize("input_dtype", DTYPES, ids=str)
@pytest.mark.parametrize("form", ["llama", "gemma", "t5"])
def test_an_hf_rmsnorm_stand_in_casts_as_hf_does_for_every_dtype_pair(form, input_dtype, weight_dtype):
    transformers = _needs("transformers")
    cls = {"llama": transformers.models.llama.modeling_llama.LlamaRMSNorm,
           "gemma": transformers.models.gemma.modeling_gemma.GemmaRMSNorm,
           "t5": transformers.models.t5.modeling_t5.T5LayerNorm}[form]
    torch.manual_seed(0)
    hf = cls(24)
    with torch.no_grad():
        hf.weight.normal_()
    hf = hf.to(weight_dtype)
    ours = convert_model(copy.deepcopy(hf))
    assert isinstance(ours, TransformersRMSNorm) and ours.form == form
    x = (3 * torch.randn(5, 24)).to(input_dtype).requires_grad_()
    x_ref = x.detach().clone().requires_grad_()
    y, y_ref = ours(x), hf(x_ref)
    assert y.dtype == y_ref.dtype
    # one rounding of the output dtype apart at most: the variance sums in another order
    torch.testing.assert_close(y, y_ref)
    # backward: HF's autograd rounds each of the input's two gradient paths to its dtype before
    # adding them, the fused op once; so the gradients are held to the no-worse rule
    hf64 = copy.deepcopy(hf).double()
    x64 = x.detach().double().requires_grad_()
    w = torch.randn_like(y, dtype=torch.float64)
    for out in (y, y_ref, hf64(x64)):
        (out.double() * w).sum().backward()
    for name, ours_grad, hf_grad, exact in (("input", x.grad, x_ref.grad, x64.grad),
                                            ("weight", ours.weight.grad, hf.weight.grad, hf64.weight.grad)):
        _assert_no_worse(ours_grad.double(), hf_grad.double(), exact, min(input_dtype, weight_dtype, key=_eps_of),
                         f"{name} gradient")
    y64 = ours(x64.detach())  # float64: the same form in torch's ops
    assert y64.dtype == hf(x64.detach()).dtype
    torch.testing.assert_close(y64, hf(x64.detach()))


def test_an_hf_named_norm_with_unknown_code_is_left_alone_with_the_reason():
    transformers = _needs("transformers")
    base = transformers.models.llama.modeling_llama.LlamaRMSNorm

    class MyRMSNorm(base):
        def forward(self, hidden_states):
            return super().forward(hidden_states) * 2

    MyRMSNorm.__module__ = "transformers.models.mine.modeling_mine"
    model = torch.nn.Sequential(MyRMSNorm(8))
    _, report = convert_model(model, return_report=True)
    assert type(model[0]) is MyRMSNorm
    assert "none of the known" in report["skipped"][0]["reason"]


def _tiny_llama_trainer(tmp_path, make_optimizer, max_steps, resume=None):
    transformers = _needs("transformers")
    _needs("accelerate")
    torch.manual_seed(0)
    model = convert_model(_hf_builders()["llama"]())
    data = [{"input_ids": torch.randint(0, 96, (8,)), "labels": torch.randint(0, 96, (8,))} for _ in range(16)]
    optimizer = make_optimizer(model.parameters())
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (1 + step))
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=max_steps, per_device_train_batch_size=4, save_steps=2,
        logging_steps=1, report_to=[], use_cpu=True, seed=0, data_seed=0, disable_tqdm=True)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=data, optimizers=(optimizer, scheduler))
    trainer.train(resume_from_checkpoint=resume)
    return _flat(model.parameters()), optimizer


@pytest.mark.parametrize("name", ["AdamW", "LAMB"])
def test_hf_trainer_trains_and_resumes_a_converted_llama_with_a_fused_optimizer(tmp_path, name):
    import fusedtech.optim as fo
    make = {"AdamW": lambda p: fo.AdamW(p, lr=1e-2), "LAMB": lambda p: fo.LAMB(p, lr=1e-2, weight_decay=0.01)}[name]
    straight, _ = _tiny_llama_trainer(tmp_path / "straight", make, 4)
    _tiny_llama_trainer(tmp_path / "resumed", make, 2)
    resumed, optimizer = _tiny_llama_trainer(tmp_path / "resumed", make, 4,
                                             resume=str(tmp_path / "resumed" / "checkpoint-2"))
    assert len(optimizer.state) > 0
    torch.testing.assert_close(resumed, straight)
    if name == "AdamW":  # the same run with torch's own AdamW
        torch_run, _ = _tiny_llama_trainer(tmp_path / "torch", lambda p: torch.optim.AdamW(p, lr=1e-2), 4)
        torch.testing.assert_close(straight, torch_run, rtol=1e-5, atol=1e-6)
