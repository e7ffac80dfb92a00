"""`python -m fusedtech`: versions, GPU visibility and, for each backend, whether it can run here."""
import os
import platform
import subprocess
import sys

import torch

from . import __version__, _backend


def _compiler(cmd):
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=10).stdout.strip().splitlines()
        return out[0] if cmd[0] != "nvcc" else out[-1]
    except (OSError, subprocess.SubprocessError, IndexError):
        return "not found"


def report() -> str:
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    lines = [
        f"fusedtech {__version__}",
        f"python    {platform.python_version()} ({sys.executable})",
        f"torch     {torch.__version__} (CUDA {torch.version.cuda or 'none'})",
        f"triton    {triton_version}",
        f"c++       {_compiler([os.environ.get('CXX', 'c++'), '--version'])} ($CXX, else c++)",
        f"nvcc      {_compiler(['nvcc', '--version'])}",
    ]
    if torch.cuda.is_available():
        lines.append(f"GPU       {torch.cuda.get_device_name()} (capability {'.'.join(map(str, torch.cuda.get_device_capability()))})")
    else:
        lines.append("GPU       none visible to torch")
    info = _backend._build_info()
    if info:
        lines.append("build     " + ", ".join(f"{k}: {v.splitlines()[0][:120]}" for k, v in info.items()))
    lines.append("backends:")
    for name in _backend.BACKENDS:
        per_device = []
        for dev in ("cuda", "cpu"):
            why = _backend.why_unavailable(name, dev)
            per_device.append(f"{dev}: " + ("available" if why is None else f"no ({why})"))
        lines.append(f"  {name:<7} " + "; ".join(per_device))
    try:
        requested = _backend.requested_backend() or "auto (fastest available per device)"
    except _backend.BackendUnavailableError as e:  # what this command is run to find out
        requested = f"invalid: {e}"
    lines.append(f"requested {requested}")
    return "\n".join(lines)


if __name__ == "__main__":
    text = report()
    print(text)
    sys.exit(1 if "\nrequested invalid:" in text else 0)
