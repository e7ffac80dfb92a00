"""The benchmark suite in one command: every benchmarks/bench_*.py module (pytest-benchmark cases)
and the CIFAR-10 training loop, written to one report folder:

  results.json   every measurement, with device, versions and date
  report.md      one table per op: time, GB/s and fraction of a device copy per implementation, its
                 speed against the best torch implementation and the best peer (DeepSpeed,
                 torch_optimizer, apex, Liger) in the same run, and on a GPU the time the GPU was
                 busy (profiler): wall >> busy means host-bound calls; the machine's load average
                 around each module (above 1 on a CPU run: its ratios are not to be trusted)
  bandwidth.png  GB/s per case and implementation, one panel per op
  cifar.png      (from benchmarks/cifar.py, when present) epoch time per implementation

    python -m benchmarks.run --out bench_out            # full sizes on a GPU, short CPU version otherwise
    python -m benchmarks.run --out bench_out --quick    # fewer rounds
"""
from __future__ import annotations

import argparse
import datetime
import glob
import importlib
import json
import os
import platform
import subprocess
import sys
from collections import defaultdict

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def environment() -> dict:
    import torch
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    import fusedtech
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": gpu or f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
                         f"{torch.get_num_threads()} torch threads)",
        "gpu": gpu,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": triton_version,
        "fusedtech": fusedtech.__version__,
        "backends": fusedtech.available_backends(),
    }


# Implementations that are neither torch nor ours: what the ratios are measured against.
PEERS = ("deepspeed", "torch_optimizer", "apex", "liger")
LOAD_TRUSTED = 1.0  # 1-minute load average above which a CPU run's timings compete with other work


def load_average() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:  # not on this platform
        return None


def run_module(path: str, json_path: str, quick: bool, select: str | None = None) -> tuple[int, str]:
    env = dict(os.environ, FUSEDTECH_BENCH_QUICK="1" if quick else os.environ.get("FUSEDTECH_BENCH_QUICK", "0"))
    env["PYTHONPATH"] = os.pathsep.join([ROOT, env.get("PYTHONPATH", "")])
    cmd = [sys.executable, "-m", "pytest", path, "-q", "-p", "no:cacheprovider", "--benchmark-only",
           f"--benchmark-json={json_path}", "--benchmark-disable-gc", "--benchmark-sort=name"]
    if select:
        cmd += ["-k", select]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    return proc.returncode, (proc.stdout + proc.stderr)[-3000:]


def rows_from(json_path: str, module: str) -> list[dict]:
    with open(json_path) as f:
        data = json.load(f)
    rows = []
    for b in data["benchmarks"]:
        info = b.get("extra_info", {})
        if "bytes" not in info:  # (None: a whole training step, timed but not a bandwidth figure)
            continue
        calls = info.get("calls_per_round", 1)
        t = b["stats"]["median"] / calls
        busy = info.get("gpu_busy_s")
        moved = info["bytes"]
        rows.append(dict(info, module=module, name=b["name"], time_s=t, gbps=moved / t / 1e9 if moved else None,
                         time_iqr_s=b["stats"]["iqr"] / calls,
                         busy_gbps=moved / busy / 1e9 if busy and moved else None))
    # Fraction of the copy measured in the same module run, for the same case and bytes.
    copies = {(r["case"], r["bytes"]): r for r in rows if r["impl"] == "copy"}
    for r in rows:
        c = copies.get((r["case"], r["bytes"]))
        r["copy_fraction"] = r["gbps"] / c["gbps"] if c else None
        r["copy_time_s"] = c["time_s"] if c else None
    return rows


def markdown(results: dict) -> str:
    env = results["env"]
    out = [f"# fusedtech benchmark report", "",
           f"- device: **{env['device']}**", f"- date: {env['date']}",
           f"- torch {env['torch']} (CUDA {env['cuda']}), triton {env['triton']}, python {env['python']}, "
           f"fusedtech {env['fusedtech']}; backends here: {', '.join(env['backends'])}",
           f"- mode: {'quick' if results['quick'] else 'full'}"]
    loads = results.get("load_average", {})
    if loads:
        out.append("- load average (1 min) before / after each module: "
                   + ", ".join(f"{m} {a} / {b}" for m, (a, b) in loads.items()))
        worst = max((v for pair in loads.values() for v in pair if v is not None), default=None)
        if worst is not None and worst > LOAD_TRUSTED and not env.get("gpu"):
            out.append(f"- **load average reached {worst} (above {LOAD_TRUSTED}): other work shared the CPU, so "
                       f"this run's times and ratios are not to be trusted**")
    out.append("")
    by_op = defaultdict(list)
    for r in results["rows"]:
        if r["impl"] != "copy":
            by_op[r["op"]].append(r)
    for op, rows in sorted(by_op.items()):
        out += [f"## {op}", "", "| case | dtype | implementation | time (ms) | GB/s | % of copy | vs torch best "
                "| vs peer best | GPU busy (ms) | GB/s while busy |", "|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
        groups = defaultdict(list)
        for r in rows:
            groups[(r["case"], r["dtype"])].append(r)
        for (case, dtype), rs in sorted(groups.items()):
            torch_rs = [r for r in rs if r["impl"].startswith("torch")]
            best_torch = min((r["time_s"] for r in torch_rs), default=None)
            best_peer = min((r["time_s"] for r in rs if r["impl"].startswith(PEERS)), default=None)
            for r in sorted(rs, key=lambda r: r["time_s"]):
                frac = f"{100 * r['copy_fraction']:.0f}%" if r.get("copy_fraction") else "-"
                speed = f"{best_torch / r['time_s']:.2f}x" if best_torch else "-"
                peer = f"{best_peer / r['time_s']:.2f}x" if best_peer else "-"
                busy = (f"{1e3 * r['gpu_busy_s']:.3f} | " + (f"{r['busy_gbps']:.1f}" if r.get("busy_gbps") else "-")
                        if r.get("gpu_busy_s") else "- | -")
                gbps = f"{r['gbps']:.1f}" if r.get("gbps") else "-"
                out.append(f"| {case} | {dtype} | {r['impl']} | {1e3 * r['time_s']:.3f} | {gbps} | {frac} "
                           f"| {speed} | {peer} | {busy} |")
            if rs[0].get("copy_time_s"):
                t = rs[0]["copy_time_s"]
                out.append(f"| {case} | {dtype} | *device copy, same bytes* | {1e3 * t:.3f} | {rs[0]['bytes'] / t / 1e9:.1f} | 100% | | | | |")
        out.append("")
    if results.get("failures"):
        out += ["## Modules that failed", ""] + [f"- `{m}`: exit {rc}" for m, rc in results["failures"].items()] + [""]
    cifar = results.get("cifar")
    if cifar and cifar.get("markdown"):
        out += ["## CIFAR-10 training loop", "", cifar["markdown"], ""]
    return "\n".join(out)


def plot(results: dict, path: str) -> str | None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    by_op = defaultdict(list)
    for r in results["rows"]:
        if r.get("gbps") or r["impl"] == "copy":  # a bandwidth plot: whole training steps have none
            by_op[r["op"]].append(r)
    ops = sorted(o for o in by_op if o != "copy")
    if not ops:
        return None
    cols = min(3, len(ops))
    nrows = (len(ops) + cols - 1) // cols
    fig, axes = plt.subplots(nrows, cols, figsize=(6 * cols, 4 * nrows), squeeze=False)
    for ax, op in zip(axes.flat, ops):
        rows = by_op[op] + [r for r in results["rows"] if r["impl"] == "copy" and r["module"] == by_op[op][0]["module"]]
        cases = sorted({(r["bytes"], r["case"]) for r in rows})
        impls = sorted({r["impl"] for r in rows})
        for impl in impls:
            pts = sorted((r["bytes"], r["gbps"]) for r in rows if r["impl"] == impl)
            style = dict(linestyle="--", color="black") if impl == "copy" else {}
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=impl, **style)
        ax.set_xscale("log")
        ax.set_title(op)
        ax.set_xlabel("bytes moved per call")
        ax.set_ylabel("GB/s")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        if len(cases) <= 6:
            ax.set_xticks([c[0] for c in cases], [c[1] for c in cases], rotation=30, fontsize=7)
    for ax in list(axes.flat)[len(ops):]:
        ax.axis("off")
    fig.suptitle(f"fusedtech on {results['env']['device']} ({results['env']['date'][:10]})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="bench_out", help="report folder")
    ap.add_argument("--quick", action="store_true", help="fewer rounds (default on a machine with no GPU)")
    ap.add_argument("--only", nargs="*", help="module names to run (e.g. bench_optim)")
    ap.add_argument("--no-cifar", action="store_true", help="skip the CIFAR-10 loop")
    ap.add_argument("--select", default=None, help="pytest -k expression choosing benchmark cases")
    ap.add_argument("--data", default=None, help="CIFAR-10 folder for the training loop (default: synthetic)")
    args = ap.parse_args(argv)
    from tqdm import tqdm

    sys.path.insert(0, ROOT)
    import torch
    quick = args.quick or not torch.cuda.is_available()
    os.makedirs(args.out, exist_ok=True)
    results = {"env": environment(), "quick": quick, "rows": [], "failures": {}, "load_average": {}}
    modules = sorted(glob.glob(os.path.join(HERE, "bench_*.py")))
    if args.only:
        modules = [m for m in modules if os.path.splitext(os.path.basename(m))[0] in args.only]
    logs = {}
    for path in tqdm(modules, desc="benchmark modules", unit="module"):
        name = os.path.splitext(os.path.basename(path))[0]
        json_path = os.path.join(args.out, f".{name}.json")
        before = load_average()
        rc, log = run_module(path, json_path, quick, args.select)
        results["load_average"][name] = (before, load_average())
        logs[name] = log
        if rc != 0:
            results["failures"][name] = rc
            tqdm.write(f"{name}: exit {rc}\n{log[-1500:]}")
        if os.path.exists(json_path):
            results["rows"] += rows_from(json_path, name)
            os.remove(json_path)
        write_report(results, args.out)  # after every module, so a run cut short still leaves a report
    if not args.no_cifar and (not args.only or "cifar" in args.only):
        try:
            cifar = importlib.import_module("benchmarks.cifar")
            results["cifar"] = cifar.run_cifar_benchmark(quick=quick, out_dir=args.out, data_dir=args.data)
        except ModuleNotFoundError as e:
            if e.name != "benchmarks.cifar":
                raise
        except Exception as e:  # noqa: BLE001 - the other results still get written
            results["failures"]["cifar"] = f"{type(e).__name__}: {e}"
            tqdm.write(f"cifar benchmark failed: {e}")
    print(write_report(results, args.out))
    return 1 if results["failures"] else 0


def write_report(results: dict, out: str) -> str:
    results["plot"] = plot(results, os.path.join(out, "bandwidth.png"))
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(results, f, indent=1, default=str)
    report = markdown(results)
    with open(os.path.join(out, "report.md"), "w") as f:
        f.write(report)
    return report


if __name__ == "__main__":
    sys.exit(main())
