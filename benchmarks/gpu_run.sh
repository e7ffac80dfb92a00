#!/usr/bin/env bash
# The one command for a lent GPU: build the extension against the device's own torch, run every
# test (the GPU-marked ones included), then the full benchmark suite; everything lands in $OUT
# (at most 8 files come back from the device: keep this list short).
#
#   device run:  bash benchmarks/gpu_run.sh        (OUT is set by the device tool)
#   then here:   copy $OUT's files to benchmarks/results/<date>-<gpu>/ and commit them.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench_out_gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
# Wheels carried in .whl/ (pytest-benchmark, tqdm ... when the device lacks them), per the device README.
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-16}
# The lent H100 (2026-11-22) had CXX=/opt/gcc/bin/g++; extensions built with it segfaulted whenever
# a C++ check raised (benchmarks/results/2026-11-22-h100/cpp-error-diag*.txt), while the same
# torch 2.11 with the distribution's gcc raises properly. Suspected: that toolchain's runtime is
# not torch's. Build with the system compiler unless FUSEDTECH_CXX names one (not yet verified there).
export CXX=${FUSEDTECH_CXX:-$(command -v c++ || echo "${CXX:-c++}")}
# Each phase has a time cap (seconds) so that one device call (10 minutes at most) always returns its logs.
TEST_CAP=${TEST_CAP:-240} BENCH_CAP=${BENCH_CAP:-330}
if [ "${SKIP_BUILD:-0}" != 1 ]; then
  { time python3 setup.py build_ext --inplace; } > "$OUT/build.log" 2>&1 || echo "build failed (see build.log)"
  tail -3 "$OUT/build.log"
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-}
{ python3 -m fusedtech; echo; nvidia-smi; } > "$OUT/env.txt" 2>&1
if [ "${SKIP_TESTS:-0}" != 1 ]; then
  # -n 8: the CPU-side tests spread over the cores; the GPU ones share the one GPU, which is fine for parity.
  timeout "$TEST_CAP" python3 -m pytest -q -rs -n 8 -p no:cacheprovider ${TESTS:-tests} 2>&1 | tee "$OUT/tests.log" | tail -40
fi
if [ "${RESOURCES:-0}" = 1 ]; then
  # Registers, spills and occupancy of every Triton launch at the benchmark shapes, from this device's
  # Triton (opt-in: two more files back).
  timeout 300 python3 -m benchmarks.kernel_resources --out "$OUT" 2>&1 | tail -5
fi
if [ "${HOST_TIME:-0}" = 1 ]; then
  # Host time per call with Triton's driver stubbed (benchmarks/host_time.py) on this machine's CPU,
  # to relate the CPU VM's numbers to the GPU host's (opt-in: two more files back).
  timeout 300 python3 -m benchmarks.host_time --out "$OUT" 2>&1 | tail -12
fi
if [ "${SKIP_BENCH:-0}" != 1 ]; then
  timeout "$BENCH_CAP" python3 -m benchmarks.run --out "$OUT" ${BENCH_ARGS:-} 2>&1 | tail -80
fi
ls -la "$OUT"
