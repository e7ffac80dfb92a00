"""The CIFAR-10 loop side by side: the same model, data, seed and schedule trained with plain
torch, with fusedtech's drop-ins and with torch.compile, epochs alternating between them in one
process. Reports time per epoch, images/s, the optimizer's and the norm layers' share of step time
(torch.profiler), peak memory, final loss/accuracy, and the largest difference between the torch
and fusedtech loss curves over the first 100 steps (fp32, deterministic settings).

On a GPU the timed runs follow airbench94's recipe: bf16 autocast, channels_last, cuDNN autotuning
(airbench trains in half precision, channels_last); the loss-curve agreement comes from a separate
100-step fp32 deterministic run of torch and fusedtech. On the CPU everything is fp32, deterministic,
and the agreement is read from the timed runs.

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


def _config(quick: bool, device: str, data_dir: str | None, model: str | None = None, epochs: int | None = None,
            extra_argv: list | None = None):
    gpu = device == "cuda"
    argv = ["--device", device, "--seed", "0", "--quiet"]
    if gpu and not quick:
        argv += ["--model", model or "airbench", "--optimizer", "nesterov", "--lr", "0.2", "--weight-decay", "5e-4",
                 "--batch-size", "1024", "--epochs", str(epochs or 3), "--scheduler", "onecycle",
                 "--amp", "bf16", "--channels-last"]
    else:  # a few steps per epoch: a CPU run of minutes
        steps = {"resnet18": 4}.get(model, 12)
        argv += ["--deterministic", "--model", model or "cnn", "--optimizer", "adamw", "--lr", "1e-3", "--weight-decay", "0.01",
                 "--batch-size", "128", "--epochs", str(epochs or 2), "--max-steps-per-epoch", str(steps)]
    argv += ["--data", data_dir] if data_dir else ["--synthetic", "--synthetic-size", "50000" if gpu else "2048"]
    return train_mod.parse_args(argv + list(extra_argv or ()))


def agreement_config(args):
    """The timed configuration in fp32 with deterministic algorithms, NCHW: where torch and fusedtech
    must give the same loss curve (bf16 rounding would hide a real difference in noise)."""
    args = copy.copy(args)
    args.amp, args.channels_last, args.deterministic = "none", False, True
    return args


def loss_curves(args, tensors, steps: int) -> dict:
    """The first `steps` losses of torch and fusedtech trained in `args` (epochs as needed)."""
    losses = {}
    for impl in ("torch", "fusedtech"):
        run, epoch = Run(impl, args, tensors), 0
        while len(run.losses) < steps and epoch < args.epochs:
            run.epoch(epoch)
            epoch += 1
        losses[impl] = run.losses[:steps]
    return losses


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
        self.sched = train_mod.make_scheduler(self.args, self.opt, self.steps)
        self.scale = getattr(self.model, "head_scale", 1.0)
        self.smoothing = train_mod.label_smoothing(self.args)

    def step(self, xb, yb, schedule: bool = True):
        with train_mod.autocast(self.args), train_mod.fused_backend(self.args):
            loss = torch.nn.functional.cross_entropy(self.forward(xb).float() * self.scale, yb,
                                                     label_smoothing=self.smoothing)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        if schedule and self.sched is not None:
            self.sched.step()
        return loss

    def epoch(self, epoch: int):
        dev = self.train_x.device
        g = torch.Generator(device=dev).manual_seed(epoch)
        order = torch.randperm(len(self.train_x), generator=g, device=dev)
        memory_format = torch.channels_last if self.args.channels_last else torch.contiguous_format
        batches = [(data.normalize(data.augment(self.train_x[order[i * self.args.batch_size:(i + 1) * self.args.batch_size]], g))
                    .contiguous(memory_format=memory_format),
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
    """Fractions of one step's op time spent in the optimizer and in normalisation ops (for
    BatchNormAct2d, the activation fused into them). Each share sums the inclusive time of the
    outermost profiler events whose name says what they are (an optimizer's step, an op or autograd
    node with "norm" in its name), so kernels launched by an op's children count once, whatever
    the kernels are called (Triton's are named after their source functions)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if xb.is_cuda else [])
    with profile(activities=acts) as prof:
        for _ in range(3):
            run.step(xb, yb, schedule=False)
    # Host-side events only: a kernel's own event would count again beside the op that launched it
    # (device_time_total of an op includes its children's kernels).
    events = [e for e in prof.events() if e.device_type == DeviceType.CPU]
    device = xb.is_cuda
    total = sum((e.self_device_time_total if device else e.self_cpu_time_total) or 0.0 for e in events)

    def kind(name: str):
        name = name.lower()
        if name.startswith("optimizer.step"):  # torch.optim's record_function around every step()
            return "optimizer"
        return "norm" if "norm" in name else None

    shares = {"optimizer": 0.0, "norm": 0.0}
    for e in events:
        k = kind(e.name)
        if k is None:
            continue
        parent = e.cpu_parent
        while parent is not None and kind(parent.name) is None:
            parent = parent.cpu_parent
        if parent is None:  # outermost of its kind
            shares[k] += (e.device_time_total if device else e.cpu_time_total) or 0.0
    return {f"{k}_share": (v / total if total else None) for k, v in shares.items()}


def run_cifar_benchmark(quick: bool, out_dir: str, data_dir: str | None = None, model: str | None = None,
                        epochs: int | None = None, extra_argv: list | None = None) -> dict:
    """extra_argv: training-script flags over the configuration (e.g. ["--amp", "bf16"])."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    args = _config(quick, device, data_dir, model, epochs, extra_argv)
    if args.synthetic:
        tx, ty, vx, vy = data.synthetic_cifar10(args.synthetic_size, 2000, seed=0)
    else:
        tx, ty, vx, vy = data.load_cifar10(args.data)
    dev = torch.device(device)
    tx, ty, vx, vy = (t.to(dev) for t in (tx, ty, vx, vy))
    impls = GPU_IMPLS if dev.type == "cuda" else IMPLS
    saved_settings = torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.benchmark
    agreement = agreement_config(args)
    timed_in_fp32 = vars(agreement) == vars(args)
    if not timed_in_fp32:  # the loss-curve check in its own fp32 deterministic runs, before the timed ones
        torch.use_deterministic_algorithms(True, warn_only=True)
        result_losses = loss_curves(agreement, (tx, ty), steps=100)
    # airbench's setting for the timed runs (cuDNN picks its fastest convolutions): deterministic
    # only where the agreement is read from them.
    torch.use_deterministic_algorithms(args.deterministic, warn_only=True)
    torch.backends.cudnn.benchmark = not args.deterministic
    runs = {impl: Run(impl, args, (tx, ty)) for impl in impls}
    from tqdm import tqdm
    for epoch in tqdm(range(args.epochs), desc="CIFAR-10 epochs (torch / fusedtech / compile alternating)"):
        for impl in impls:
            if dev.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            runs[impl].epoch(epoch)
            runs[impl].peak = torch.cuda.max_memory_allocated() if dev.type == "cuda" else None
    xb, yb = data.normalize(tx[:args.batch_size]), ty[:args.batch_size]
    if args.channels_last:
        xb = xb.contiguous(memory_format=torch.channels_last)
    result = {"device": torch.cuda.get_device_name() if dev.type == "cuda" else "cpu", "torch": torch.__version__,
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "synthetic": args.synthetic, "model": args.model, "optimizer": args.optimizer,
              "batch_size": args.batch_size, "epochs": args.epochs, "steps_per_epoch": runs["torch"].steps, "impls": {}}
    for impl, r in runs.items():
        val_loss, val_acc = train_mod.evaluate(r.model, vx, vy, r.args, r.scale)
        steady = steady_epoch_seconds(r.epoch_s)
        shares = _profile_shares(r, xb, yb)
        if impl.startswith("torch.compile"):  # its norms run inside compiled graphs no event names
            shares["norm_share"] = None
        result["impls"][impl] = dict(epoch_seconds=r.epoch_s, steady_epoch_seconds=steady,
                                     images_per_s=r.images / steady,
                                     final_val_loss=val_loss,
                                     final_val_acc=val_acc, peak_memory_bytes=getattr(r, "peak", None),
                                     converted=r.report, **shares)
    if timed_in_fp32:
        result_losses = {impl: runs[impl].losses[:100] for impl in ("torch", "fusedtech")}
    a, b = (torch.stack(result_losses[impl]).float() for impl in ("torch", "fusedtech"))
    result["max_loss_curve_diff_first_100_steps"] = (a - b).abs().max().item()
    result["agreement_steps"] = len(a)
    result["precision"] = (f"{args.amp} autocast" if args.amp != "none" else "fp32") + (
        ", channels_last" if args.channels_last else "")
    base = result["impls"]["torch"]["steady_epoch_seconds"]
    for impl in impls:
        result["impls"][impl]["speedup_vs_torch"] = base / result["impls"][impl]["steady_epoch_seconds"]
    result["plot"] = _plot(result, os.path.join(out_dir, "cifar.png"))
    result["markdown"] = _markdown(result)
    torch.use_deterministic_algorithms(saved_settings[0], warn_only=True)
    torch.backends.cudnn.benchmark = saved_settings[1]
    return result


def _markdown(r: dict) -> str:
    rows = ["| implementation | epoch (s) | images/s | vs torch | optimizer share | norm share | peak memory | val loss | val acc |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for impl, m in r["impls"].items():
        pct = lambda v: f"{100 * v:.0f}%" if v is not None else "-"  # noqa: E731
        mem = f"{m['peak_memory_bytes'] / 2**20:.0f} MiB" if m["peak_memory_bytes"] else "-"
        rows.append(f"| {impl} | {m['steady_epoch_seconds']:.2f} | {m['images_per_s']:.0f} | {m['speedup_vs_torch']:.2f}x | "
                    f"{pct(m['optimizer_share'])} | {pct(m['norm_share'])} | {mem} | {m['final_val_loss']:.4f} | {m['final_val_acc']:.3f} |")
    head = (f"{r['model']} / {r['optimizer']} / batch {r['batch_size']} / {r['precision']}, {r['epochs']} epochs x "
            f"{r['steps_per_epoch']} steps on {r['device']}{' — SYNTHETIC DATA' if r['synthetic'] else ''}; epoch time: "
            f"{'median after the first' if r['epochs'] > 1 else 'the one epoch, warm-up and compilation included'}. "
            f"Largest |loss(torch) - loss(fusedtech)| over the first {r['agreement_steps']} "
            f"steps in fp32, deterministic: {r['max_loss_curve_diff_first_100_steps']:.2e}.")
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
