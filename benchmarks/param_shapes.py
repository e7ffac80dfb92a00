"""Parameter lists the optimizer benchmarks step over: real models' shapes, no torchvision needed."""
from __future__ import annotations

import torch


def resnet18_cifar_shapes() -> list[tuple[int, ...]]:
    """The 62 parameter tensors (11.2M values) of a CIFAR ResNet-18 (3x3 stem, 4 stages)."""
    shapes = [(64, 3, 3, 3), (64,), (64,)]
    cin = 64
    for width, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
        for block in range(2):
            shapes += [(width, cin, 3, 3), (width,), (width,), (width, width, 3, 3), (width,), (width,)]
            if block == 0 and (stride != 1 or cin != width):
                shapes += [(width, cin, 1, 1), (width,), (width,)]
            cin = width
    shapes += [(10, 512), (10,)]
    return shapes


def transformer_shapes(layers: int, d: int, vocab: int) -> list[tuple[int, ...]]:
    """A GPT-style decoder: embeddings, per layer two LayerNorms, qkv, proj and a 4x MLP."""
    shapes = [(vocab, d), (1024, d)]
    for _ in range(layers):
        shapes += [(d,), (d,), (3 * d, d), (3 * d,), (d, d), (d,), (d,), (d,), (4 * d, d), (4 * d,), (d, 4 * d), (d,)]
    shapes += [(d,), (d,)]
    return shapes


def cases(device: torch.device) -> dict[str, list[tuple[int, ...]]]:
    if device.type == "cuda":
        return {"resnet18": resnet18_cifar_shapes(), "gpt2-small": transformer_shapes(12, 768, 50257)}
    return {"resnet18": resnet18_cifar_shapes(), "transformer-6x512": transformer_shapes(6, 512, 8192)}


def make_params(shapes, device, dtype=torch.float32, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    params = [torch.nn.Parameter(torch.randn(s, generator=g).to(device=device, dtype=dtype)) for s in shapes]
    for p in params:
        p.grad = torch.randn(p.shape, generator=g).to(device=device, dtype=dtype)
    return params
