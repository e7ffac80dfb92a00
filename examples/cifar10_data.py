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


def load_cifar10(root: str, check_md5: bool = True, progress: bool = False):
    """(train_x, train_y, test_x, test_y) from `root` (the folder holding cifar-10-batches-py/, or
    that folder itself); `progress` shows a tqdm bar over the six files."""
    folder = root if os.path.basename(os.path.normpath(root)) == "cifar-10-batches-py" else os.path.join(root, "cifar-10-batches-py")
    if not os.path.isdir(folder):
        raise DatasetError(
            f"CIFAR-10 not found at {folder}. This machine cannot download it: fetch cifar-10-python.tar.gz "
            f"(https://www.cs.toronto.edu/~kriz/cifar.html) elsewhere, extract it so that {folder}/data_batch_1 "
            f"... data_batch_5 and test_batch exist, and pass --data {root}; or run with --synthetic.")
    names = FILES.items()
    if progress:
        from tqdm import tqdm
        names = tqdm(names, desc=f"reading CIFAR-10 from {folder}", unit="file", leave=False)
    parts = {name: read_batch(os.path.join(folder, name), md5 if check_md5 else None) for name, md5 in names}
    train = [parts[f"data_batch_{i}"] for i in range(1, 6)]
    return (torch.cat([p[0] for p in train]), torch.cat([p[1] for p in train]), *parts["test_batch"])


# The synthetic set's recipe (see synthetic_cifar10), tuned so that the curves have somewhere to go:
# the default CNN (momentum SGD, lr 0.01, CPU) reached 64%, 69%, 79% validation accuracy after
# epochs 1-3 on the 50000 images, and 21%, 37%, 45%, 46%, 44%, 51% over six epochs on 5000 (no
# classifier beats about 90%: a tenth of the labels are wrong); a nearest-class-mean classifier 20%.
SYNTHETIC_MODES = 3  # looks per class
SYNTHETIC_OBJECT = 24  # an object's side, placed anywhere on the 32 x 32 image
SYNTHETIC_OVERLAP = 0.3  # how much of its partner class's shapes each class's shapes contain
SYNTHETIC_CONTRAST = (0.3, 0.8)  # object contrast range (low: hard to see against the background)
SYNTHETIC_BACKGROUND = 0.1  # smooth background clutter
SYNTHETIC_NOISE = 0.06  # pixel noise
SYNTHETIC_CHUNK = 5000  # images generated at a time (bounds the float32 temporaries)


def synthetic_cifar10(train: int = 50000, test: int = 10000, seed: int = 0, label_noise: float = 0.1,
                      progress: bool = False):
    """A CIFAR-shaped stand-in that a CNN learns over several epochs, not in one. Every output of
    the example labels runs on it as synthetic.

    Each class has SYNTHETIC_MODES smooth random shapes, each made partly of its partner class's
    (classes come in pairs that look alike). An image is one of its class's shapes at a random
    position, with a random contrast and a colour half the class's and half random, on a smooth
    random background of random colour, plus pixel noise; then a `label_noise` fraction of labels
    (train and test alike) is replaced by another class. So no classifier can exceed about
    1 - label_noise, and faint objects and the paired classes put it lower.

    Deterministic from `seed`: the classes come from it alone, the train and test images from
    generators of their own, so the test set and the classes do not depend on `train`.
    Vectorised in chunks of SYNTHETIC_CHUNK images; `progress` shows a tqdm bar over them."""
    F = torch.nn.functional
    g = torch.Generator().manual_seed(3 * seed)
    modes, side, pad = SYNTHETIC_MODES, SYNTHETIC_OBJECT, 32 - SYNTHETIC_OBJECT
    own = F.interpolate(torch.randn(10 * modes, 1, 5, 5, generator=g), size=side, mode="bicubic",
                        align_corners=False).view(10, modes, side, side)
    perm = torch.randperm(10, generator=g)
    partner = torch.empty(10, dtype=torch.int64)
    partner[perm[0::2]], partner[perm[1::2]] = perm[1::2], perm[0::2]
    shapes = own + SYNTHETIC_OVERLAP * own[partner]
    shapes = shapes - shapes.mean((2, 3), keepdim=True)
    r = torch.linspace(-1, 1, side)
    window = torch.exp(-(r[:, None] ** 2 + r[None, :] ** 2) / 0.5)  # fades each shape out at its edges
    shapes = shapes / shapes.std((2, 3), keepdim=True) * window
    # Padded by `pad` on each side: an image's rows/columns are a 32-wide window of it.
    shapes = F.pad(shapes.view(10 * modes, side, side), (pad, pad, pad, pad))
    class_colour = torch.rand(10, 3, generator=g)
    low, high = SYNTHETIC_CONTRAST
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=train + test, desc=f"generating synthetic CIFAR-10 (seed {seed})", unit="img", leave=False)

    def make(n, gen):
        x, y = torch.empty(n, 3, 32, 32, dtype=torch.uint8), torch.empty(n, dtype=torch.int64)
        span = torch.arange(32)
        for s in range(0, n, SYNTHETIC_CHUNK):
            k = min(SYNTHETIC_CHUNK, n - s)
            label = torch.randint(0, 10, (k,), generator=gen)
            look = label * modes + torch.randint(0, modes, (k,), generator=gen)
            shift = torch.randint(0, pad + 1, (k, 2), generator=gen)
            contrast = low + (high - low) * torch.rand(k, 1, generator=gen)
            colour = contrast * (0.5 * class_colour[label] + 0.5 * torch.rand(k, 3, generator=gen))
            base = 0.3 + 0.4 * torch.rand(k, 3, generator=gen)
            rows, cols = pad - shift[:, :1] + span, pad - shift[:, 1:] + span
            obj = shapes[look[:, None, None], rows[:, :, None], cols[:, None, :]].unsqueeze(1)
            clutter = F.interpolate(torch.randn(k, 1, 4, 4, generator=gen), size=32, mode="bicubic",
                                    align_corners=False)
            clutter.mul_(SYNTHETIC_BACKGROUND).add_(torch.randn(k, 1, 32, 32, generator=gen), alpha=SYNTHETIC_NOISE)
            img = torch.addcmul(base[:, :, None, None] + clutter, obj, colour[:, :, None, None])
            x[s:s + k] = img.mul_(255).add_(0.5).clamp_(0, 255)  # rounded (the cast truncates)
            noisy = torch.rand(k, generator=gen) < label_noise
            y[s:s + k] = torch.where(noisy, (label + torch.randint(1, 10, (k,), generator=gen)) % 10, label)
            if progress:
                bar.update(k)
        return x, y

    out = (*make(train, torch.Generator().manual_seed(3 * seed + 1)),
           *make(test, torch.Generator().manual_seed(3 * seed + 2)))
    if progress:
        bar.close()
    return out


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
