"""CIFAR-10 for the training example and benchmark: the official python batches read from disk
(no torchvision), a synthetic CIFAR-shaped stand-in, and augmentation done on the device."""
from __future__ import annotations

import hashlib
import os
import pickle

import torch

# MD5s of the official "CIFAR-10 python version" files, as published with the dataset (and in
# torchvision's datasets/cifar.py).
FILES = {
    "data_batch_1": "c99cafc152244af753f735de768cd75f",
    "data_batch_2": "d4bba439e000b95fd0a9bffe97cbabec",
    "data_batch_3": "54ebc095f3ab1f0389bbae665268c751",
    "data_batch_4": "634d18415352ddfa80567beed471001a",
    "data_batch_5": "482c414d41f54cd18b22e5b47cb7c3cb",
    "test_batch": "40351d587109b95175f43aff81a1287e",
}
IMAGES_PER_FILE = 10000
PIXELS = 3 * 32 * 32
MEAN = (0.4914, 0.4822, 0.4465)
STD = (0.2470, 0.2435, 0.2616)


class DatasetError(RuntimeError):
    pass


def _md5(path: str) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def read_batch(path: str, expected_md5: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One pickled batch -> (uint8 [N, 3, 32, 32], int64 [N]). Checks size, MD5 and contents."""
    if not os.path.isfile(path):
        raise DatasetError(f"missing CIFAR-10 file {path}: its folder needs data_batch_1 ... data_batch_5 and "
                           f"test_batch, extracted from cifar-10-python.tar.gz "
                           f"(https://www.cs.toronto.edu/~kriz/cifar.html); or run with --synthetic")
    size = os.path.getsize(path)
    if expected_md5 is not None and size < IMAGES_PER_FILE * PIXELS:
        raise DatasetError(f"{path} has {size} bytes, less than its {IMAGES_PER_FILE} images need: a truncated download?")
    if expected_md5 is not None and _md5(path) != expected_md5:
        raise DatasetError(f"{path}: MD5 mismatch (expected {expected_md5}); the file is corrupt or not the official one")
    with open(path, "rb") as f:
        d = pickle.load(f, encoding="bytes")
    data, labels = d[b"data"], d[b"labels"]
    x = torch.as_tensor(data, dtype=torch.uint8)
    if x.dim() != 2 or x.shape[1] != PIXELS:
        raise DatasetError(f"{path}: b'data' has shape {tuple(x.shape)}, expected (N, {PIXELS})")
    y = torch.as_tensor(labels, dtype=torch.int64)
    if y.shape[0] != x.shape[0] or (y.numel() and (y.min() < 0 or y.max() > 9)):
        raise DatasetError(f"{path}: labels do not match the images or fall outside 0..9")
    return x.view(-1, 3, 32, 32), y


def load_cifar10(root: str, check_md5: bool = True):
    """(train_x, train_y, test_x, test_y) from `root` (the folder holding cifar-10-batches-py/, or
    that folder itself)."""
    folder = root if os.path.basename(os.path.normpath(root)) == "cifar-10-batches-py" else os.path.join(root, "cifar-10-batches-py")
    if not os.path.isdir(folder):
        raise DatasetError(
            f"CIFAR-10 not found at {folder}. This machine cannot download it: fetch cifar-10-python.tar.gz "
            f"(https://www.cs.toronto.edu/~kriz/cifar.html) elsewhere, extract it so that {folder}/data_batch_1 "
            f"... data_batch_5 and test_batch exist, and pass --data {root}; or run with --synthetic.")
    parts = {name: read_batch(os.path.join(folder, name), md5 if check_md5 else None) for name, md5 in FILES.items()}
    train = [parts[f"data_batch_{i}"] for i in range(1, 6)]
    return (torch.cat([p[0] for p in train]), torch.cat([p[1] for p in train]), *parts["test_batch"])


def synthetic_cifar10(train: int = 50000, test: int = 10000, seed: int = 0):
    """A CIFAR-shaped stand-in with learnable structure (each class a smooth colour pattern plus
    noise), so that loss curves move. Every output of the example labels runs on it as synthetic."""
    g = torch.Generator().manual_seed(seed)
    patterns = torch.nn.functional.interpolate(torch.rand(10, 3, 4, 4, generator=g), size=32, mode="bilinear",
                                               align_corners=False)

    def make(n):
        y = torch.randint(0, 10, (n,), generator=g)
        x = patterns[y] * 0.3 + torch.rand(n, 3, 32, 32, generator=g) * 0.7
        return (x * 255).round().to(torch.uint8), y

    return (*make(train), *make(test))


def normalize(x_uint8: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    mean = torch.tensor(MEAN, device=x_uint8.device).view(1, 3, 1, 1)
    std = torch.tensor(STD, device=x_uint8.device).view(1, 3, 1, 1)
    return ((x_uint8.float() / 255 - mean) / std).to(dtype)


def augment(x: torch.Tensor, generator: torch.Generator, pad: int = 4) -> torch.Tensor:
    """Random crop with reflect padding and horizontal flip, batched on x's device."""
    n, c, h, w = x.shape
    padded = torch.nn.functional.pad(x, (pad, pad, pad, pad), mode="reflect")
    dev = x.device
    i = torch.randint(0, 2 * pad + 1, (n,), generator=generator, device=generator.device).to(dev)
    j = torch.randint(0, 2 * pad + 1, (n,), generator=generator, device=generator.device).to(dev)
    flip = torch.rand(n, generator=generator, device=generator.device).to(dev) < 0.5
    rows = (i[:, None] + torch.arange(h, device=dev))[:, None, :, None]
    cols = j[:, None] + torch.arange(w, device=dev)
    cols = torch.where(flip[:, None], cols.flip(1), cols)[:, None, None, :]
    return padded[torch.arange(n, device=dev)[:, None, None, None], torch.arange(c, device=dev)[None, :, None, None],
                  rows, cols]
