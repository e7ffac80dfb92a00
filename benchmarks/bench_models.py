"""End-to-end training steps of the models people train, torch eager against the same model after
fusedtech.nn.convert_model with fusedtech's AdamW: a small HF Llama, timm's convnext_atto and
vit_tiny (random weights from configs). One step = forward, loss, backward, AdamW step, zero_grad.

A whole step is not a bandwidth figure: the rows carry no bytes (the report shows time and the
ratio to torch). torch's AdamW runs its default (foreach) path; "fusedtech" is every piece the
library has (norms, dropout, the optimizer) on the automatic backend.
"""
from __future__ import annotations

import pytest
import torch

import fusedtech
from benchmarks import _common

DEV = _common.device()
GPU = DEV.type == "cuda"


def _llama():
    transformers = pytest.importorskip("transformers", reason="transformers is not installed")
    hidden = 512 if GPU else 128
    config = transformers.LlamaConfig(vocab_size=4096 if GPU else 1024, hidden_size=hidden,
                                      intermediate_size=4 * hidden, num_hidden_layers=4 if GPU else 2,
                                      num_attention_heads=8, num_key_value_heads=4)
    model = transformers.LlamaForCausalLM(config)
    batch, seq = (8, 512) if GPU else (2, 64)
    ids = torch.randint(0, config.vocab_size, (batch, seq), device=DEV)
    return model, lambda m: m(input_ids=ids, labels=ids).loss, f"llama h{hidden} b{batch}x{seq}"


def _timm(name, **kwargs):
    timm = pytest.importorskip("timm", reason="timm is not installed")
    model = timm.create_model(name, pretrained=False, num_classes=100, **kwargs)
    batch, size = (64, kwargs.get("img_size", 224)) if GPU else (4, kwargs.get("img_size", 64))
    x = torch.randn(batch, 3, size, size, device=DEV)
    target = torch.randint(0, 100, (batch,), device=DEV)
    return model, lambda m: torch.nn.functional.cross_entropy(m(x), target), f"{name} b{batch} {size}px"


MODELS = {
    "llama": _llama,
    "convnext_atto": lambda: _timm("convnext_atto"),
    "vit_tiny": lambda: _timm("vit_tiny_patch16_224", **({} if GPU else {"img_size": 64, "patch_size": 8})),
}


@pytest.mark.parametrize("impl", ["torch", "fusedtech"])
@pytest.mark.parametrize("model_name", MODELS)
def test_train_step(benchmark, model_name, impl):
    torch.manual_seed(0)
    model, loss_of, case = MODELS[model_name]()
    model = model.to(DEV).train()
    if impl == "torch":
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    else:
        model, report = fusedtech.nn.convert_model(model, fuse_activations=True, return_report=True)
        assert report["replaced"], f"convert_model replaced nothing in {model_name}"
        opt = fusedtech.optim.AdamW(model.parameters(), lr=1e-4)

    def step():
        loss_of(model).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    _common.measure(benchmark, step, dev=DEV, op="train_step", impl=impl, case=case, dtype=torch.float32,
                    bytes_moved=None, calls=1, rounds=3 if _common.QUICK else 10,
                    params=sum(p.numel() for p in model.parameters()))
