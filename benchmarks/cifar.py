"""The CIFAR-10 loop side by side: the same model, data, seed and schedule trained with plain
torch, with fusedtech's drop-ins and with torch.compile, epochs alternating between them in one
process. Reports time per epoch, images/s, the optimizer's and the norm layers' share of step time
(torch.profiler), peak memory, final loss/accuracy, and the largest difference between the torch
and fusedtech loss curves over the first 100 steps (fp32, deterministic settings).

    python -m benchmarks.cifar --out bench_out [--quick] [--data DIR] [--model resnet18 --epochs 4]

Epoch times: the first epoch includes compilation and warm-up; "epoch (s)" is the median of the
epochs after it, and the speed-ups are ratios of those medians.
"""
from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "examples"))
import cifar10_data as data  # noqa: E402
import cifar10_train as train_mod  # noqa: E402

IMPLS = ("torch", "fusedtech", "torch.compile")
# On a GPU also fusedtech with BatchNorm+activation folded into BatchNormAct2d on its Triton kernels
# (the plain fusedtech run keeps cuDNN's BatchNorm, fusedtech's automatic choice on CUDA).
GPU_IMPLS = IMPLS + ("fusedtech+triton-bn",)


def _config(quick: bool, device: str, data_dir: str | None, model: str | None = None, epochs: int | None = None):
    gpu = device == "cuda"
    argv = ["--device", device, "--seed", "0", "--quiet", "--deterministic"]
    if gpu and not quick:
        argv += ["--model", model or "airbench", "--optimizer", "nesterov", "--lr", "0.2", "--weight-decay", "5e-4",
                 "--batch-size", "1024", "--epochs", str(epochs or 3), "--scheduler", "onecycle"]
    else:  # a few steps per epoch: a CPU run of minutes
        steps = {"resnet18": 4}.get(model, 12)
        argv += ["--model", model or "cnn", "--optimizer", "adamw", "--lr", "1e-3", "--weight-decay", "0.01",
                 "--batch-size", "128", "--epochs", str(epochs or 2), "--max-steps-per-epoch", str(steps)]
    argv += ["--data", data_dir] if data_dir else ["--synthetic", "--synthetic-size", "50000" if gpu else "2048"]
    return train_mod.parse_args(argv)


def steady_epoch_seconds(epoch_s: list) -> float:
    """The median epoch time after the first (warm-up, compilation); the only one if there is one."""
    rest = sorted(epoch_s[1:]) or list(epoch_s)
    mid = len(rest) // 2
    return rest[mid] if len(rest) % 2 else (rest[mid - 1] + rest[mid]) / 2


class Run:
    """One implementation's model, optimizer and data, trained an epoch at a time."""

    def __init__(self, impl: str, args, tensors):
        self.impl, self.args = impl, copy.copy(args)
        self.args.impl = "fused" if impl.startswith("fusedtech") else "torch"
        if impl == "fusedtech+triton-bn":
            self.args.fuse_activations, self.args.fused_backend = True, "triton"
        self.train_x, self.train_y = tensors
        self.model, self.report = train_mod.build(self.args, self.train_x.cpu())
        self.forward = torch.compile(self.model) if impl == "torch.compile" else self.model
        self.opt = train_mod.make_optimizer(self.args, self.model.parameters())
        self.losses, self.epoch_s, self.images_s = [], [], []
        self.steps = -(-len(self.train_x) // self.args.batch_size)
        if self.args.max_steps_per_epoch:
            self.steps = min(self.steps, self.args.max_steps_per_epoch)
        self.scale = getattr(self.model, "head_scale", 1.0)

    def step(self, xb, yb):
        with train_mod.fused_backend(self.args):
            loss = torch.nn.functional.cross_entropy(self.forward(xb) * self.scale, yb)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        return loss

    def epoch(self, epoch: int):
        dev = self.train_x.device
        g = torch.Generator(device=dev).manual_seed(epoch)
        order = torch.randperm(len(self.train_x), generator=g, device=dev)
        batches = [(data.normalize(data.augment(self.train_x[order[i * self.args.batch_size:(i + 1) * self.args.batch_size]], g)),
                    self.train_y[order[i * self.args.batch_size:(i + 1) * self.args.batch_size]]) for i in range(self.steps)]
        timer = _Timer(dev)
        for xb, yb in batches:
            self.losses.append(self.step(xb, yb).detach())
        seconds = timer.stop()
        self.epoch_s.append(seconds)
        self.images = sum(len(b[1]) for b in batches)  # per epoch
        self.images_s.append(self.images / seconds)


class _Timer:
    def __init__(self, dev):
        self.dev = dev
        if dev.type == "cuda":
            self.a, self.b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            self.a.record()
        else:
            self.t = time.perf_counter()

    def stop(self) -> float:
        if self.dev.type == "cuda":
            self.b.record()
            torch.cuda.synchronize()
            return self.a.elapsed_time(self.b) / 1e3
        return time.perf_counter() - self.t


def _profile_shares(run: Run, xb, yb) -> dict:
    """Fractions of one step's op time spent in the optimizer and in normalisation ops."""
    from torch.profiler import ProfilerActivity, profile
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if xb.is_cuda else [])
    with profile(activities=acts) as prof:
        for _ in range(3):
            run.step(xb, yb)
    attr = "self_device_time_total" if xb.is_cuda else "self_cpu_time_total"
    total = opt = norm = 0.0
    for e in prof.key_averages():
        t = getattr(e, attr, 0.0) or 0.0
        total += t
        name = e.key.lower()
        if any(k in name for k in ("adam", "sgd", "rmsprop", "adagrad", "lamb", "optimizer.step", "_foreach")):
            opt += t
        elif "norm" in name:
            norm += t
    return {"optimizer_share": opt / total if total else None, "norm_share": norm / total if total else None}


def run_cifar_benchmark(quick: bool, out_dir: str, data_dir: str | None = None, model: str | None = None,
                        epochs: int | None = None) -> dict:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    args = _config(quick, device, data_dir, model, epochs)
    if args.synthetic:
        tx, ty, vx, vy = data.synthetic_cifar10(args.synthetic_size, 2000, seed=0)
    else:
        tx, ty, vx, vy = data.load_cifar10(args.data)
    dev = torch.device(device)
    tx, ty, vx, vy = (t.to(dev) for t in (tx, ty, vx, vy))
    torch.use_deterministic_algorithms(True, warn_only=True)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    impls = GPU_IMPLS if dev.type == "cuda" else IMPLS
    runs = {impl: Run(impl, args, (tx, ty)) for impl in impls}
    from tqdm import tqdm
    for epoch in tqdm(range(args.epochs), desc="CIFAR-10 epochs (torch / fusedtech / compile alternating)"):
        for impl in impls:
            if dev.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            runs[impl].epoch(epoch)
            runs[impl].peak = torch.cuda.max_memory_allocated() if dev.type == "cuda" else None
    xb, yb = data.normalize(tx[:args.batch_size]), ty[:args.batch_size]
    result = {"device": torch.cuda.get_device_name() if dev.type == "cuda" else "cpu", "torch": torch.__version__,
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "synthetic": args.synthetic, "model": args.model, "optimizer": args.optimizer,
              "batch_size": args.batch_size, "epochs": args.epochs, "steps_per_epoch": runs["torch"].steps, "impls": {}}
    for impl, r in runs.items():
        val_loss, val_acc = train_mod.evaluate(r.model, vx, vy, r.args, r.scale)
        steady = steady_epoch_seconds(r.epoch_s)
        result["impls"][impl] = dict(epoch_seconds=r.epoch_s, steady_epoch_seconds=steady,
                                     images_per_s=r.images / steady,
                                     final_val_loss=val_loss,
                                     final_val_acc=val_acc, peak_memory_bytes=getattr(r, "peak", None),
                                     converted=r.report, **_profile_shares(r, xb, yb))
    a = torch.stack(runs["torch"].losses[:100]).float()
    b = torch.stack(runs["fusedtech"].losses[:100]).float()
    result["max_loss_curve_diff_first_100_steps"] = (a - b).abs().max().item()
    base = result["impls"]["torch"]["steady_epoch_seconds"]
    for impl in impls:
        result["impls"][impl]["speedup_vs_torch"] = base / result["impls"][impl]["steady_epoch_seconds"]
    result["plot"] = _plot(result, os.path.join(out_dir, "cifar.png"))
    result["markdown"] = _markdown(result)
    return result


def _markdown(r: dict) -> str:
    rows = ["| implementation | epoch (s) | images/s | vs torch | optimizer share | norm share | peak memory | val loss | val acc |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for impl, m in r["impls"].items():
        pct = lambda v: f"{100 * v:.0f}%" if v is not None else "-"  # noqa: E731
        mem = f"{m['peak_memory_bytes'] / 2**20:.0f} MiB" if m["peak_memory_bytes"] else "-"
        rows.append(f"| {impl} | {m['steady_epoch_seconds']:.2f} | {m['images_per_s']:.0f} | {m['speedup_vs_torch']:.2f}x | "
                    f"{pct(m['optimizer_share'])} | {pct(m['norm_share'])} | {mem} | {m['final_val_loss']:.4f} | {m['final_val_acc']:.3f} |")
    head = (f"{r['model']} / {r['optimizer']} / batch {r['batch_size']}, {r['epochs']} epochs x {r['steps_per_epoch']} steps "
            f"on {r['device']}{' — SYNTHETIC DATA' if r['synthetic'] else ''}; epoch time: median after the first. Largest |loss(torch) - loss(fusedtech)| "
            f"over the first 100 steps: {r['max_loss_curve_diff_first_100_steps']:.2e}.")
    return head + "\n\n" + "\n".join(rows)


def _plot(r: dict, path: str):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    impls = list(r["impls"])
    ax.bar(impls, [r["impls"][i]["steady_epoch_seconds"] for i in impls], color=["#888", "#2a7", "#47c", "#a5c"][:len(impls)])
    ax.set_ylabel("seconds per epoch (median after the first)")
    ax.set_title(f"CIFAR-10 {r['model']} on {r['device']}" + (" (synthetic data)" if r["synthetic"] else ""))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="bench_out")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--data", default=None, help="folder with cifar-10-batches-py/ (default: synthetic data)")
    p.add_argument("--model", default=None, choices=sorted(train_mod.models.MODELS),
                   help="default: airbench on a GPU, cnn on the CPU")
    p.add_argument("--epochs", type=int, default=None, help="default: 3 on a GPU, 2 on the CPU")
    a = p.parse_args()
    os.makedirs(a.out, exist_ok=True)
    res = run_cifar_benchmark(a.quick or not torch.cuda.is_available(), a.out, a.data, a.model, a.epochs)
    with open(os.path.join(a.out, "cifar.json"), "w") as f:
        json.dump(res, f, indent=1)
    print(res["markdown"])
