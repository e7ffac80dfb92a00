"""The example's models: an MLP, a small CNN, a CIFAR ResNet-18 and the airbench94 network, each
with the normalisation (none | batch | layer) and dropout the command line asks for. Plain torch.nn:
fusedtech.nn.convert_model swaps the norm/dropout modules for fused ones where they exist."""
from __future__ import annotations

import torch
from torch import nn


class ChannelLayerNorm(nn.Module):
    """LayerNorm over the channels of an NCHW tensor (a torch.nn.LayerNorm inside, so that
    convert_model can swap it)."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = nn.LayerNorm(channels)

    def forward(self, x):
        return self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


def norm2d(kind: str, c: int) -> nn.Module:
    return {"batch": lambda: nn.BatchNorm2d(c), "layer": lambda: ChannelLayerNorm(c), "none": nn.Identity}[kind]()


def norm1d(kind: str, c: int) -> nn.Module:
    return {"batch": lambda: nn.BatchNorm1d(c), "layer": lambda: nn.LayerNorm(c), "none": nn.Identity}[kind]()


def mlp(norm="none", dropout=0.0):
    return nn.Sequential(nn.Flatten(), nn.Linear(3072, 256), norm1d(norm, 256), nn.ReLU(), nn.Dropout(dropout),
                         nn.Linear(256, 128), norm1d(norm, 128), nn.ReLU(), nn.Dropout(dropout), nn.Linear(128, 10))


def cnn(norm="batch", dropout=0.0, widths=(32, 64, 128)):
    layers, cin = [], 3
    for w in widths:
        layers += [nn.Conv2d(cin, w, 3, padding=1, bias=norm == "none"), norm2d(norm, w), nn.ReLU(), nn.MaxPool2d(2)]
        cin = w
    return nn.Sequential(*layers, nn.Flatten(), nn.Dropout(dropout), nn.Linear(cin * 4 * 4, 10))


class BasicBlock(nn.Module):
    def __init__(self, cin, cout, stride, norm):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = norm2d(norm, cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = norm2d(norm, cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), norm2d(norm, cout))

    def forward(self, x):
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


def resnet18(norm="batch", dropout=0.0):
    layers, cin = [nn.Conv2d(3, 64, 3, 1, 1, bias=False), norm2d(norm, 64), nn.ReLU()], 64
    for width, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
        layers += [BasicBlock(cin, width, stride, norm), BasicBlock(width, width, 1, norm)]
        cin = width
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(dropout), nn.Linear(512, 10))


def airbench_norm(kind: str, c: int) -> nn.Module:
    """airbench94's BatchNorm: running statistics kept with momentum 0.6 (torch's momentum 0.4),
    eps 1e-12, the scale frozen at one (only the shift trains). Other norms as norm2d."""
    if kind != "batch":
        return norm2d(kind, c)
    bn = nn.BatchNorm2d(c, eps=1e-12, momentum=0.4)
    bn.weight.requires_grad_(False)
    return bn


def airbench(norm="batch", dropout=0.0, widths=(64, 256, 256)):
    """airbench94's network: a 2x2 whitening convolution (24 channels; initialised from the data
    with `init_whitening`), then three groups of conv -> max-pool -> norm -> GELU -> conv -> norm ->
    GELU, no residuals, a final max-pool and a linear head scaled by 1/9."""
    def group(cin, cout):
        return nn.Sequential(nn.Conv2d(cin, cout, 3, padding="same", bias=False), nn.MaxPool2d(2),
                             airbench_norm(norm, cout), nn.GELU(), nn.Conv2d(cout, cout, 3, padding="same", bias=False),
                             airbench_norm(norm, cout), nn.GELU())
    whiten = nn.Conv2d(3, 24, 2, padding=0, bias=True)
    net = nn.Sequential(whiten, nn.GELU(), group(24, widths[0]), group(widths[0], widths[1]), group(widths[1], widths[2]),
                        nn.MaxPool2d(3), nn.Flatten(), nn.Dropout(dropout), nn.Linear(widths[2], 10, bias=False))
    net.head_scale = 1 / 9
    return net


@torch.no_grad()
def init_whitening(conv: nn.Conv2d, images: torch.Tensor, eps: float = 5e-4) -> None:
    """airbench's whitening init: the first conv's filters are the eigenvectors of the 2x2 patch
    covariance, scaled by 1/sqrt(eigenvalue), and their negatives."""
    patches = images.unfold(2, 2, 1).unfold(3, 2, 1).permute(0, 2, 3, 1, 4, 5).reshape(-1, 12).double()
    patches = patches - patches.mean(0)
    eigenvalues, eigenvectors = torch.linalg.eigh(patches.T @ patches / len(patches))
    filters = (eigenvectors.T / torch.sqrt(eigenvalues + eps)[:, None]).reshape(12, 3, 2, 2).flip(0)
    conv.weight.copy_(torch.cat([filters, -filters]).to(conv.weight))
    conv.bias.zero_()


MODELS = {"mlp": mlp, "cnn": cnn, "resnet18": resnet18, "airbench": airbench}
