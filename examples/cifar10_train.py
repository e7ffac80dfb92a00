"""Train on CIFAR-10 with plain PyTorch or with fusedtech's drop-ins (one flag: --impl).

    python examples/cifar10_train.py --synthetic --model cnn --optimizer adamw --epochs 2
    python examples/cifar10_train.py --data ~/data --model airbench --optimizer nesterov --lr 0.2 --impl fused

With --impl fused, the optimizer comes from fusedtech.optim and clip_grad_norm_ from
fusedtech.nn.utils, and fusedtech.nn.convert_model swaps norm/dropout modules for the fused ones
that exist; each piece can be switched off alone (--no-fused-optim, --no-fused-norm, ...). The
run then prints (and records under "backends" in the history it prints as JSON) which fusedtech
backend each fused piece ran on.
The dataset is kept on the device and augmented there (random crop with padding, flip).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import cifar10_data as data  # noqa: E402
import cifar10_models as models  # noqa: E402

OPTIMIZERS = ("sgd", "momentum", "nesterov", "adagrad", "rmsprop", "adam", "adamw", "lamb")
# The step op (fusedtech/ops: op name, module) each fused optimizer calls, by --optimizer.
OPTIMIZER_OPS = {"sgd": ("sgd_step_", "sgd"), "momentum": ("sgd_step_", "sgd"), "nesterov": ("sgd_step_", "sgd"),
                 "adagrad": ("adagrad_step_", "adagrad"), "rmsprop": ("rmsprop_step_", "rmsprop"),
                 "adam": ("adam_step_", "adam"), "adamw": ("adam_step_", "adam"), "lamb": ("lamb_step_", "lamb")}
# The training-set images that the per-epoch train loss/accuracy (and the initial loss) are measured
# on: an estimate for the curves, not worth a 10000-image pass per epoch on a CPU.
TRAIN_EVAL_IMAGES = 2000


def _at_least(low: int):
    """An argparse type: an int >= low (the error names the argument)."""
    def check(text: str) -> int:
        value = int(text)
        if value < low:
            raise argparse.ArgumentTypeError(f"must be an integer >= {low}, got {value}")
        return value
    check.__name__ = f"integer >= {low}"
    return check


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--impl", choices=("torch", "fused"), default="torch")
    p.add_argument("--fused-optim", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--fused-norm", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--fused-dropout", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--fuse-activations", action="store_true",
                   help="with --impl fused: fold BatchNorm2d + ReLU/GELU/SiLU into fusedtech.nn.BatchNormAct2d")
    p.add_argument("--fused-backend", choices=("auto", "triton", "cuda", "cpu", "torch"), default="auto",
                   help="with --impl fused: run the model's fused ops on this backend (on a GPU, 'triton' "
                        "replaces the cuDNN BatchNorm that 'auto' keeps)")
    p.add_argument("--model", choices=tuple(models.MODELS), default="cnn")
    p.add_argument("--optimizer", choices=OPTIMIZERS, default="momentum")
    p.add_argument("--lr", type=float, default=None, help="default depends on the optimizer")
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--dropout", type=float, default=0.0)
    p.add_argument("--norm", choices=("none", "batch", "layer"), default="batch")
    p.add_argument("--epochs", type=_at_least(1), default=10)
    p.add_argument("--batch-size", type=_at_least(1), default=256)
    p.add_argument("--scheduler", choices=("none", "step", "cosine", "onecycle"), default="none")
    p.add_argument("--clip-grad-norm", type=float, default=None)
    p.add_argument("--early-stop-patience", type=_at_least(0), default=None, help="epochs without val-loss improvement")
    p.add_argument("--label-smoothing", type=float, default=None, help="default 0.2 for airbench, else 0")
    p.add_argument("--amp", choices=("bf16", "fp16", "none"), default="none")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--deterministic", action="store_true", help="deterministic algorithms (for comparisons)")
    p.add_argument("--data", default="data", help="folder holding cifar-10-batches-py/")
    p.add_argument("--synthetic", action="store_true", help="generated CIFAR-shaped data (outputs say so)")
    p.add_argument("--synthetic-size", type=_at_least(1), default=50000)
    p.add_argument("--max-steps-per-epoch", type=_at_least(1), default=None)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--checkpoint", default=None, help="save model/optimizer/scheduler state here after each epoch")
    p.add_argument("--resume", default=None, help="continue from this checkpoint")
    p.add_argument("--stop-after", type=_at_least(1), default=None, help="end this invocation after N epochs (resume later)")
    p.add_argument("--plot", default=None, help="write learning curves to this PNG")
    p.add_argument("--quiet", action="store_true", help="no progress bars or per-epoch lines")
    return p.parse_args(argv)


def say(args, text: str) -> None:
    """A progress line (unless --quiet), shown at once."""
    if not args.quiet:
        print(text, flush=True)


def default_lr(opt: str) -> float:
    return {"sgd": 0.01, "momentum": 0.01, "nesterov": 0.01, "adagrad": 0.01, "rmsprop": 1e-3}.get(opt, 1e-3)


def make_optimizer(args, params):
    use_fused = args.impl == "fused" and args.fused_optim
    if use_fused:
        import fusedtech.optim as optim
    else:
        import torch.optim as optim
    lr, wd = args.lr if args.lr is not None else default_lr(args.optimizer), args.weight_decay
    kind = args.optimizer
    if kind in ("sgd", "momentum", "nesterov"):
        return optim.SGD(params, lr=lr, momentum=0.0 if kind == "sgd" else 0.9, nesterov=kind == "nesterov",
                         weight_decay=wd)
    if kind == "lamb":
        if use_fused:
            return optim.LAMB(params, lr=lr, weight_decay=wd)
        try:
            import torch_optimizer
        except ImportError as e:
            raise SystemExit("--optimizer lamb with --impl torch needs torch-optimizer (pip install torch-optimizer)") from e
        return torch_optimizer.Lamb(params, lr=lr, weight_decay=wd)
    cls = {"adagrad": optim.Adagrad, "rmsprop": optim.RMSprop, "adam": optim.Adam, "adamw": optim.AdamW}[kind]
    return cls(params, lr=lr, weight_decay=wd)


def make_scheduler(args, opt, steps_per_epoch):
    total = max(1, args.epochs * steps_per_epoch)
    if args.scheduler == "step":
        return torch.optim.lr_scheduler.StepLR(opt, step_size=max(1, total // 3), gamma=0.1)
    if args.scheduler == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total)
    if args.scheduler == "onecycle":
        # Momentum is cycled only where the optimizer has some: plain SGD would otherwise train with
        # momentum 0.95, and Adagrad / RMSprop without momentum are refused by OneCycleLR.
        cycle = args.optimizer in ("momentum", "nesterov", "adam", "adamw", "lamb")
        return torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=opt.param_groups[0]["lr"], total_steps=total,
                                                   cycle_momentum=cycle)
    return None


def build(args, train_x):
    torch.manual_seed(args.seed)
    model = models.MODELS[args.model](norm=args.norm, dropout=args.dropout)
    if args.model == "airbench":
        models.init_whitening(model[0], data.normalize(train_x[:5000]))
    model = model.to(args.device)
    report = None
    if args.impl == "fused" and (args.fused_norm or args.fused_dropout):
        import fusedtech.nn
        # Only the module kinds asked for; convert_model skips kinds with no fused class yet.
        keep = {torch.nn.LayerNorm, torch.nn.RMSNorm, torch.nn.BatchNorm1d, torch.nn.BatchNorm2d} if args.fused_norm else set()
        keep |= {torch.nn.Dropout} if args.fused_dropout else set()
        model, report = fusedtech.nn.convert_model(model, include=keep, fuse_activations=args.fuse_activations,
                                                   return_report=True)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model, report


def fused_backend(args):
    """The context the model runs in: fusedtech.use_backend(--fused-backend) for the fused run."""
    if args.impl != "fused" or args.fused_backend == "auto":
        return contextlib.nullcontext()
    import fusedtech
    return fusedtech.use_backend(args.fused_backend)


NATIVE = "torch native"  # fusedtech hands the op to torch's own (BatchNorm on a GPU by default)
NOT_USED = "not used"


def _backward_request(args, device: torch.device):
    """The backend request that the training loop's backward pass sees on `device`. The loop runs
    backward inside fused_backend(args), a ContextVar that reaches a backward autograd runs on the
    calling thread (CPU tensors) but need not reach one it runs on a device thread of its own
    (CUDA): asked of autograd with a one-element probe rather than assumed."""
    from fusedtech import _backend
    seen = []

    class Probe(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x.clone()

        @staticmethod
        def backward(ctx, grad):
            seen.append(_backend.requested_backend())
            return grad

    with fused_backend(args):
        Probe.apply(torch.zeros(1, device=device, requires_grad=True)).sum().backward()
    return seen[0]


def fused_backends(args, model, opt) -> dict | None:
    """With --impl fused: which backend each fused piece runs on, {piece: {"backend", "what"}, plus
    "backward" where the backward pass runs on another}. A backend is cuda, triton, cpu or torch
    (fusedtech's reference ops), NATIVE, or NOT_USED ("what" says why).

    fusedtech has no public call that names the backend of a module or an optimizer, so this asks
    each op's implementation table (fusedtech.ops.<family>), whose pick() every op calls, for its
    backend, in the backend context the piece runs in here (the optimizer and clip_grad_norm_
    outside fused_backend(args), as FUSEDTECH_BACKEND alone steers them). The one policy outside select(): fusedtech.nn.functional hands
    BatchNorm on a GPU to torch's own when no backend was asked for; mirrored here."""
    if args.impl != "fused":
        return None
    import fusedtech
    import fusedtech.nn as fnn
    from fusedtech import _backend
    from fusedtech.ops import adagrad, adam, batch_norm, dropout, grad_norm, lamb, layer_norm, rmsprop, sgd
    steps = {"sgd_step_": sgd.STEP, "adagrad_step_": adagrad.STEP, "rmsprop_step_": rmsprop.STEP,
             "adam_step_": adam.STEP, "lamb_step_": lamb.STEP}
    dev = torch.device(args.device)
    backward_request = _backward_request(args, dev)

    def entry(backend, what, backward=None):
        e = {"backend": backend, "what": what}
        if backward is not None and backward != backend:
            e["backward"] = backward
        return e

    def model_op(table, native_on_gpu=False):
        """(forward backend, backward backend) of one of the model's op families."""
        with fused_backend(args):
            if native_on_gpu and dev.type != "cpu" and _backend.requested_backend() is None:
                return NATIVE, NATIVE
            forward = table.backend(dev)
        with fusedtech.use_backend(backward_request):
            return forward, table.backend(dev)

    def modules(*classes):
        found = [m for m in model.modules() if type(m) in classes]
        counts = {}
        for m in found:
            counts[type(m).__name__] = counts.get(type(m).__name__, 0) + 1
        return found, ", ".join(f"{n} {name}" for name, n in counts.items())

    report = {}
    if not args.fused_optim:
        report["optimizer"] = entry(NOT_USED, f"--no-fused-optim: {type(opt).__module__}.{type(opt).__name__}")
    else:
        op, _ = OPTIMIZER_OPS[args.optimizer]
        params = [p for group in opt.param_groups for p in group["params"] if p.requires_grad]
        # On a GPU the list's size takes part in the choice (as fusedtech/ops/_multi_tensor.py passes it).
        elements = sum(p.numel() for p in params) if dev.type == "cuda" else None
        backend = steps[op].backend(dev, elements)
        report["optimizer"] = entry(backend, f"fusedtech.optim.{type(opt).__name__}: {op} over {len(params)} tensors")

    folded, folded_what = modules(fnn.BatchNormAct2d)
    if not folded:
        report["activation_folding"] = entry(NOT_USED, "--fuse-activations not given" if not args.fuse_activations
                                             else "no BatchNorm2d + activation to fold")
    else:
        forward, backward = model_op(batch_norm.STATS, native_on_gpu=True)
        how = ("torch's batch_norm, then torch's activation" if forward == NATIVE
               else "batch_norm_act ops (activation fused)")
        report["activation_folding"] = entry(forward, f"{folded_what}: {how}", backward)

    norms, what = modules(fnn.BatchNorm1d, fnn.BatchNorm2d, fnn.LayerNorm, fnn.RMSNorm)
    if norms:
        is_bn = isinstance(norms[0], torch.nn.modules.batchnorm._BatchNorm)
        forward, backward = (model_op(batch_norm.STATS, native_on_gpu=True) if is_bn
                             else model_op(layer_norm.FORWARD))
        report["norm"] = entry(forward, f"{what}: {'batch_norm' if is_bn else 'layer_norm'} ops", backward)
    else:
        report["norm"] = entry(NOT_USED, "--no-fused-norm" if not args.fused_norm
                               else "no norm layers (--norm none)" if args.norm == "none"
                               else "each BatchNorm2d folded with its activation" if folded
                               else "no norm that convert_model swaps")

    drops, what = modules(fnn.Dropout)
    active = [m for m in drops if m.p > 0]
    if not active:
        report["dropout"] = entry(NOT_USED, "--no-fused-dropout" if not args.fused_dropout
                                  else f"{what}, p=0: the identity, no op runs" if drops else "no Dropout in the model")
    else:
        forward, backward = model_op(dropout.APPLY)
        report["dropout"] = entry(forward, f"{what} (p={active[0].p}): dropout ops", backward)

    if args.clip_grad_norm is None:
        report["clip_grad_norm"] = entry(NOT_USED, "--clip-grad-norm not given")
    elif not args.fused_optim:
        report["clip_grad_norm"] = entry(NOT_USED, "--no-fused-optim: torch.nn.utils.clip_grad_norm_")
    else:
        backend = grad_norm.NORM.backend(dev)
        report["clip_grad_norm"] = entry(backend, "fusedtech.nn.utils.clip_grad_norm_: multi_tensor_norm op, "
                                                  "then torch's foreach multiply")
    return {k: report[k] for k in ("optimizer", "norm", "activation_folding", "dropout", "clip_grad_norm")}


def format_backends(report: dict, device) -> str:
    lines = [f"fusedtech backends on {device}:"]
    for piece, e in report.items():
        backend = e["backend"] + (f" (backward: {e['backward']})" if "backward" in e else "")
        lines.append(f"  {piece:<19} {backend:<13} {e['what']}")
    return "\n".join(lines)


def evaluate(model, x, y, args, scale, desc: str = "evaluating"):
    from tqdm import tqdm
    model.eval()
    total_loss, correct = 0.0, 0
    with torch.no_grad(), autocast(args), fused_backend(args):
        for i in tqdm(range(0, len(x), 1000), desc=desc, disable=args.quiet, leave=False, unit="batch"):
            xb = data.normalize(x[i:i + 1000])
            if args.channels_last:
                xb = xb.contiguous(memory_format=torch.channels_last)
            out = model(xb).float() * scale
            total_loss += torch.nn.functional.cross_entropy(out, y[i:i + 1000], reduction="sum").item()
            correct += (out.argmax(1) == y[i:i + 1000]).sum().item()
    model.train()
    return total_loss / max(1, len(x)), correct / max(1, len(x))


def autocast(args):
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.amp)
    return torch.autocast(torch.device(args.device).type, dtype=dtype, enabled=dtype is not None)


def label_smoothing(args) -> float:
    """--label-smoothing, or airbench's 0.2 for airbench and none for the other models."""
    if args.label_smoothing is not None:
        return args.label_smoothing
    return 0.2 if args.model == "airbench" else 0.0


def train(args) -> dict:
    """Runs the whole training; returns the history (also what --checkpoint stores)."""
    if args.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    t0 = time.perf_counter()
    if args.synthetic:
        n_test = max(1000, args.synthetic_size // 5)
        say(args, f"generating synthetic CIFAR-10 data: {args.synthetic_size} train + {n_test} validation images "
                  f"(seed {args.seed})")
        train_x, train_y, test_x, test_y = data.synthetic_cifar10(args.synthetic_size, n_test, seed=args.seed,
                                                                  progress=not args.quiet)
    else:
        say(args, f"reading CIFAR-10 from {args.data}")
        train_x, train_y, test_x, test_y = data.load_cifar10(args.data, progress=not args.quiet)
    dev = torch.device(args.device)
    say(args, f"data ready in {time.perf_counter() - t0:.1f}s; building {args.model} (norm {args.norm}, "
              f"impl {args.impl}) on {dev}")
    train_x, train_y, test_x, test_y = (t.to(dev) for t in (train_x, train_y, test_x, test_y))
    model, report = build(args, train_x.cpu())
    scale = getattr(model, "head_scale", 1.0)
    smoothing = label_smoothing(args)
    steps_per_epoch = math.ceil(len(train_x) / args.batch_size)
    if args.max_steps_per_epoch:
        steps_per_epoch = min(steps_per_epoch, args.max_steps_per_epoch)
    opt = make_optimizer(args, model.parameters())
    sched = make_scheduler(args, opt, steps_per_epoch)
    scaler = torch.amp.GradScaler(dev.type, enabled=args.amp == "fp16")
    if args.impl == "fused" and args.fused_optim:
        from fusedtech.nn.utils import clip_grad_norm_
    else:
        from torch.nn.utils import clip_grad_norm_
    backends = fused_backends(args, model, opt)
    if backends is not None:
        say(args, format_backends(backends, dev))
    history = {"synthetic": args.synthetic, "impl": args.impl, "model": args.model, "optimizer": args.optimizer,
               "converted": report, "backends": backends, "step_loss": [], "epochs": [], "device": str(dev)}
    start_epoch, best, stale = 0, math.inf, 0
    if args.resume:
        ck = torch.load(args.resume, weights_only=False, map_location=dev)
        planned = ck.get("schedule_steps")
        if sched is not None and planned is not None and planned != args.epochs * steps_per_epoch:
            raise SystemExit(f"--resume: the checkpoint's {args.scheduler} schedule spans {planned} steps, this run's "
                             f"{args.epochs * steps_per_epoch}: resume with the same --epochs, --batch-size and "
                             f"--max-steps-per-epoch")
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        if sched is not None and ck.get("scheduler"):
            sched.load_state_dict(ck["scheduler"])
        scaler.load_state_dict(ck["scaler"])
        torch.set_rng_state(ck["rng_cpu"])
        history, start_epoch, best, stale = ck["history"], ck["epoch"] + 1, ck["best"], ck["stale"]
        if history["impl"] != args.impl:  # a torch checkpoint continued with fusedtech, or the reverse
            history["impl"] = f"{history['impl']}, then {args.impl}"
        if "early_stopped_at_epoch" in history:  # the run had ended: nothing more to train
            start_epoch = args.epochs
        history["backends"] = backends  # this invocation's
    train_eval = min(len(test_x), TRAIN_EVAL_IMAGES)
    if not args.resume:
        history["initial_train_loss"] = evaluate(model, train_x[:train_eval], train_y[:train_eval], args, scale,
                                                 desc="initial train loss")[0]
    from tqdm import tqdm
    for epoch in range(start_epoch, args.epochs):
        # Data order and augmentation depend on (seed, epoch) only, so a resumed run sees the same batches.
        g = torch.Generator(device=dev).manual_seed(args.seed * 1000 + epoch)
        order = torch.randperm(len(train_x), generator=g, device=dev)
        t0, seen, loss_sum = time.perf_counter(), 0, 0.0
        bar = tqdm(range(steps_per_epoch), desc=f"epoch {epoch + 1}/{args.epochs}" + (" [synthetic]" if args.synthetic else ""),
                   disable=args.quiet, leave=False)
        for step in bar:
            idx = order[step * args.batch_size:(step + 1) * args.batch_size]
            xb = data.normalize(data.augment(train_x[idx], g))
            if args.channels_last:
                xb = xb.contiguous(memory_format=torch.channels_last)
            with autocast(args), fused_backend(args):
                loss = torch.nn.functional.cross_entropy(model(xb).float() * scale, train_y[idx], label_smoothing=smoothing)
            opt.zero_grad(set_to_none=True)
            with fused_backend(args):  # the model's backward ops too (autocast stays outside, as torch advises)
                scaler.scale(loss).backward()
            if args.clip_grad_norm is not None:
                scaler.unscale_(opt)
                clip_grad_norm_(model.parameters(), args.clip_grad_norm)
            scaler.step(opt)
            scaler.update()
            if sched is not None:
                sched.step()
            history["step_loss"].append(loss.item())
            loss_sum += loss.item() * len(idx)
            seen += len(idx)
            bar.set_postfix(loss=f"{loss.item():.3f}")
        if dev.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
        val_loss, val_acc = evaluate(model, test_x, test_y, args, scale, desc="validation")
        train_loss, train_acc = evaluate(model, train_x[:train_eval], train_y[:train_eval], args, scale,
                                         desc=f"train loss ({train_eval} images)")
        history["epochs"].append(dict(epoch=epoch, seconds=seconds, images_per_s=seen / seconds, avg_step_loss=loss_sum / seen,
                                      train_loss=train_loss, train_acc=train_acc, val_loss=val_loss, val_acc=val_acc))
        if not args.quiet:
            print(f"epoch {epoch + 1}: train loss {train_loss:.4f} acc {train_acc:.3f} | val loss {val_loss:.4f} "
                  f"acc {val_acc:.3f} | {seconds:.1f}s{' [synthetic data]' if args.synthetic else ''}")
        best, stale = (val_loss, 0) if val_loss < best else (best, stale + 1)
        early_stop = args.early_stop_patience is not None and stale >= args.early_stop_patience
        if early_stop:  # recorded before the checkpoint, so that a resumed run knows it has ended
            history["early_stopped_at_epoch"] = epoch
            if not args.quiet:
                print(f"early stop: no val-loss improvement for {stale} epochs")
        if args.checkpoint:
            torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(),
                        "scheduler": sched.state_dict() if sched is not None else None, "scaler": scaler.state_dict(),
                        "rng_cpu": torch.get_rng_state(), "history": history, "epoch": epoch, "best": best,
                        "stale": stale, "schedule_steps": args.epochs * steps_per_epoch}, args.checkpoint)
        if early_stop or (args.stop_after is not None and epoch + 1 - start_epoch >= args.stop_after):
            break
    if args.plot:
        plot_curves(history, args.plot)
    return history


def plot_curves(history: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (a, c, b) = plt.subplots(1, 3, figsize=(15, 4))
    ep = [e["epoch"] + 1 for e in history["epochs"]]
    a.plot(history["step_loss"], lw=0.7)
    a.set(title="training loss per step", xlabel="step")
    c.plot(ep, [e["train_loss"] for e in history["epochs"]], "o-", label="train")
    c.plot(ep, [e["val_loss"] for e in history["epochs"]], "o-", label="validation")  # what early stopping watches
    c.set(title="loss", xlabel="epoch")
    c.legend()
    b.plot(ep, [e["train_acc"] for e in history["epochs"]], "o-", label="train")
    b.plot(ep, [e["val_acc"] for e in history["epochs"]], "o-", label="validation")
    b.set(title="accuracy", xlabel="epoch")
    b.legend()
    fig.suptitle(f"{history['model']} / {history['optimizer']} / {history['impl']}"
                 + (" — SYNTHETIC DATA" if history["synthetic"] else ""))
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None):
    args = parse_args(argv)
    try:
        history = train(args)
    except data.DatasetError as e:
        raise SystemExit(str(e)) from None
    print(json.dumps({k: v for k, v in history.items() if k != "step_loss"}, indent=1, default=str))


if __name__ == "__main__":
    main()
