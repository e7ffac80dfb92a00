#!/usr/bin/env bash
# The one command for a lent GPU (at most 9 minutes on an H100/H200). Nothing is compiled there:
# it installs the wheel built here by benchmarks/build_device_wheel.sh and carried in .whl/ (with any
# peer wheels beside it), runs every gpu-marked test (time-capped, in parallel), the benchmark suite
# in its quick mode, and a C++ error raised on purpose (extensions built by a foreign toolchain have
# segfaulted there instead of raising). At most 8 files land in $OUT: gpu_check.log, env.txt,
# tests.log, results.json, report.md and the suite's plots.
#
#   here:        bash benchmarks/build_device_wheel.sh .whl
#   device run:  bash benchmarks/gpu_check.sh                (carry: [".whl"], timeout_s 600)
#   rehearsal:   bash benchmarks/gpu_check.sh --rehearse     (no GPU: every step that can run here)
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
REHEARSE=0
[ "${1:-}" = "--rehearse" ] && REHEARSE=1
OUT=${OUT:-$ROOT/bench_out_gpu}
mkdir -p "$OUT"; OUT=$(cd "$OUT" && pwd)
LOG=$OUT/gpu_check.log
exec > >(tee "$LOG") 2>&1
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
TEST_CAP=${TEST_CAP:-240} BENCH_CAP=${BENCH_CAP:-240}
status=0
step() { echo; echo "== $* ($(date -u +%H:%M:%S))"; }

step "install the carried wheels"
site=$(mktemp -d) scratch=""
trap 'rm -rf "$site" "$scratch"' EXIT
if [ "$REHEARSE" = 1 ] && ! compgen -G ".whl/fusedtech-*.whl" > /dev/null; then
  # No device wheel here: build one for this machine's Python and torch (CPU kernels only), so the
  # install, import and run steps below are exercised exactly as on the device.
  FUSEDTECH_BUILD_CUDA=0 "$PY" -m pip wheel -q --no-build-isolation --no-deps -w "$site/dist" . || exit 1
  wheels=$(ls "$site"/dist/*.whl)
else
  wheels=$(ls .whl/*.whl 2>/dev/null)
fi
[ -n "$wheels" ] || { echo "no wheel in .whl/: run benchmarks/build_device_wheel.sh .whl here first"; exit 1; }
"$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" $wheels || exit 1
export PYTHONPATH=$site${PYTHONPATH:+:$PYTHONPATH}
# The tests and the suite run from a scratch copy without the source package, so `import fusedtech`
# is the installed wheel's, not the checkout's (which has no compiled extension there).
scratch=$(mktemp -d)
cp -r tests benchmarks examples pyproject.toml "$scratch"/
cd "$scratch"
"$PY" - <<'PY' || exit 1
import fusedtech, os, sys
where = os.path.dirname(fusedtech.__file__)
print("fusedtech from", where)
sys.exit(0 if where.startswith(os.environ["PYTHONPATH"].split(":")[0]) else "fusedtech was not imported from the installed wheel")
PY
{ "$PY" -m fusedtech; echo; nvidia-smi 2>&1 | head -20; } > "$OUT/env.txt" 2>&1
head -30 "$OUT/env.txt"

step "a C++ error raised on purpose must raise, not crash"
"$PY" - <<'PY' || status=1
import torch, fusedtech
# Straight to the compiled op (the Python layer would refuse first): the C++ check must raise.
for dev in ["cpu"] + (["cuda"] if torch.cuda.is_available() else []):
    x = torch.randn(4, 8, device=dev)
    try:
        torch.ops.fusedtech.layer_norm_fwd(x, torch.ones(3, device=dev), None, 1e-5, False)
    except RuntimeError as e:
        print(dev, "raised as it should:", str(e).splitlines()[0][:120])
    else:
        raise SystemExit(f"{dev}: a wrong weight shape was accepted")
PY

step "gpu-marked tests"
xdist=""
"$PY" -c "import xdist" 2>/dev/null && xdist="-n 8"
if [ "$REHEARSE" = 1 ]; then
  # Without a GPU they would all skip: collect them, so an import or marker error shows here.
  "$PY" -m pytest -q -p no:cacheprovider --collect-only -m gpu tests > "$OUT/tests.log" 2>&1 || status=1
else
  timeout "$TEST_CAP" "$PY" -m pytest -q -rs -p no:cacheprovider $xdist -m gpu tests > "$OUT/tests.log" 2>&1 || status=1
fi
tail -5 "$OUT/tests.log"

step "benchmark suite, quick mode"
timeout "$BENCH_CAP" "$PY" -m benchmarks.run --quick --out "$OUT" ${BENCH_ARGS:-} 2>&1 | tail -60 || status=1
[ -f "$OUT/report.md" ] || { echo "the suite wrote no report"; status=1; }

step "files in \$OUT"
ls -la "$OUT"
n=$(find "$OUT" -type f | wc -l)
[ "$n" -le 8 ] || { echo "$n files in \$OUT: the device returns at most 8"; status=1; }
echo "gpu_check: $([ $status = 0 ] && echo passed || echo FAILED)"
exit $status
