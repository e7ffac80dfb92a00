#!/usr/bin/env bash
# Builds, on a machine with no GPU, the fusedtech wheel a lent GPU installs without compiling: CPython
# 3.12, torch 2.11 (cu130) and CUDA kernels for sm_90 and sm_80, as the device has them. torch 2.11
# is installed into a throwaway environment (deleted at the end), never into the project's.
#
#   bash benchmarks/build_device_wheel.sh OUTDIR      -> OUTDIR/fusedtech-*-cp312-*.whl (at most 48 MiB)
#
# Environment: DEVICE_TORCH (default 2.11.0), PYTHON312 (default: pyenv's 3.12), CUDA_HOME (found
# from nvcc otherwise), TORCH_CUDA_ARCH_LIST (default "8.0;9.0"), FUSEDTECH_CPU_ARCH (default
# x86-64-v3: the wheel's CPU kernels run on the device's processor, not this one's).
set -euo pipefail
OUTDIR=${1:?usage: build_device_wheel.sh OUTDIR}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$OUTDIR"; OUTDIR=$(cd "$OUTDIR" && pwd)
PY=${PYTHON312:-$(ls -d "${PYENV_ROOT:-$HOME/.pyenv}"/versions/3.12*/bin/python3 2>/dev/null | tail -1)}
[ -x "$PY" ] || { echo "build_device_wheel: no Python 3.12 found (set PYTHON312)" >&2; exit 2; }
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
"$PY" -m venv "$work/venv"
# The full torch: setup.py imports it, and importing a CUDA build needs its CUDA libraries.
"$work/venv/bin/pip" install -q "torch==${DEVICE_TORCH:-2.11.0}" setuptools wheel ninja pybind11
git -C "$ROOT" archive --format=tar HEAD | tar -x -C "$work" --one-top-level=src
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-8.0;9.0} FUSEDTECH_CPU_ARCH=${FUSEDTECH_CPU_ARCH:-x86-64-v3}
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
(cd "$work/src" && "$work/venv/bin/python" -m pip wheel -q --no-build-isolation --no-deps -w "$work/dist" .)
wheel=$(ls "$work"/dist/fusedtech-*.whl)
# A wheel whose CUDA extension failed to build still installs (the package then says why); the device
# run needs the kernels, so refuse it here.
unzip -p "$wheel" fusedtech/_build_info.json | "$work/venv/bin/python" -c \
  'import json,sys; i=json.load(sys.stdin); print(i); sys.exit(0 if i["cuda"]=="built" and i["cpu"]=="built" else 1)'
so=$(mktemp -d -p "$work"); unzip -q -d "$so" "$wheel" 'fusedtech/_C_cuda*.so'
# cuobjdump is not beside every nvcc (this machine's is a wrapper with no cuobjdump): then NVIDIA's
# PyPI package of it, into the throwaway environment.
cuobjdump=$(command -v cuobjdump || ls "${CUDA_HOME:-/usr/local/cuda}"/bin/cuobjdump 2>/dev/null || true)
if [ -z "$cuobjdump" ]; then
  "$work/venv/bin/pip" install -q "nvidia-cuda-cuobjdump>=13,<14"
  cuobjdump=$(ls "$work"/venv/lib/python3.12/site-packages/nvidia/cu*/bin/cuobjdump | head -1)
fi
"$cuobjdump" --list-elf "$so"/fusedtech/_C_cuda*.so > "$work/elf.txt"
grep -q sm_90 "$work/elf.txt" || { echo "no sm_90 cubin in the wheel" >&2; cat "$work/elf.txt" >&2; exit 1; }
echo "cubins: $(grep -o 'sm_[0-9]*' "$work/elf.txt" | sort | uniq -c | tr '\n' ' ')"
size=$(stat -c %s "$wheel")
[ "$size" -le $((48 * 1024 * 1024)) ] || { echo "wheel is $size bytes, over 48 MiB" >&2; exit 1; }
cp "$wheel" "$OUTDIR/"
echo "built $(basename "$wheel") ($((size / 1024 / 1024)) MiB) for torch ${DEVICE_TORCH:-2.11.0}, sm ${TORCH_CUDA_ARCH_LIST}"
