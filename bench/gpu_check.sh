#!/usr/bin/env bash
# One call on a lent GPU (H100/H200): build with CUDA, run every CUDA test, the no-sync checks and
# the GPU benchmarks, keep logs under $OUT, print a short table last. Budget: under 8 minutes.
#   bash bench/gpu_check.sh                          (OUT defaults to ./out/gpu)
#   PHASES="build tests units" bash bench/gpu_check.sh  (a subset, in this order)
# Phases: build, tests (every needs_cuda test: kernels against the float64/CPU references,
# traced steps under torch.cuda.set_sync_debug_mode("error")), units (per-unit kernel throughput
# and bench_units on GPT-2-small and a ResNet), summary (bench_summary: GB/s against torch.sum
# and a device-to-device copy), overhead (bench_overhead against TensorBoard and naive hooks).
# The machine has torch (CUDA), pybind11, scikit-build-core, pyarrow, pytest, hypothesis,
# tensorboard; no network. Extra wheels travel in .whl/ (see the device tool's notes).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out/gpu}
PHASES=${PHASES:-"build tests units summary overhead"}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-16}
T0=$(date +%s)
log() { echo "[$(( $(date +%s) - T0 ))s] $*"; }
want() { [[ " $PHASES " == *" $1 "* ]]; }
declare -A RC

if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
PY=python3  # the image's python3 is the environment that holds CUDA torch
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"

if want build; then
  log "build (DNNTRACE_CUDA=ON, sm_90)"
  DNNTRACE_CUDA=ON $PY -m pip install -q --no-build-isolation --no-deps -e . >"$OUT/build.log" 2>&1
  RC[build]=$?
  tail -5 "$OUT/build.log"
  $PY -c "import torch, dnntrace.ops_units as o; print('native CUDA per-unit ops:', o.native('cuda'))"
fi

if want tests; then
  log "CUDA tests (kernels vs float64/CPU references, tracer under sync-debug mode)"
  timeout 240 $PY -m pytest -q -m "needs_cuda" tests/ops tests/stats tests/capture \
    --ignore=tests/capture/test_tracer_interop.py -p no:cacheprovider --junitxml="$OUT/cuda_tests.xml" >"$OUT/cuda_tests.log" 2>&1
  RC[tests]=$?
  grep -E "^(FAILED|ERROR)" "$OUT/cuda_tests.log" | head -20
  tail -3 "$OUT/cuda_tests.log"
fi

if want units; then
  log "per-unit kernels and per-unit overhead on CUDA"
  timeout 90 $PY bench/bench_unit_kernels.py --device cuda >"$OUT/bench_unit_kernels.txt" 2>&1
  RC[unit_kernels]=$?
  timeout 150 $PY bench/bench_units.py --device cuda --models gpt2,resnet --steps 8 --rounds 2 \
    >"$OUT/bench_units.txt" 2>&1
  RC[bench_units]=$?
fi

if want summary; then
  log "bench_summary on CUDA (GB/s vs torch.sum and device-to-device copy)"
  timeout 150 $PY bench/bench_summary.py --device cuda --dtypes float32 bfloat16 float16 \
    >"$OUT/bench_summary.txt" 2>&1
  RC[summary]=$?
fi

if want overhead; then
  log "bench_overhead on CUDA (GPT-2-small-size transformer, ResNet-style CNN)"
  CONFIGS=abcdfgi  # wandb (e) only where its wheels were carried; i: the default set
  $PY -c "import wandb" 2>/dev/null && CONFIGS=abcdefgi
  # --warmup 3: each configuration's first steps timed apart, few enough for the device time
  timeout 200 $PY bench/bench_overhead.py --device cuda --models gpt2,resnet --steps 10 \
    --rounds 2 --warmup 3 --demo-steps 0 --configs $CONFIGS >"$OUT/bench_overhead.txt" 2>&1
  RC[overhead]=$?
fi

log "done"
echo
echo "| step | exit |"
echo "|---|---|"
for k in "${!RC[@]}"; do echo "| $k | ${RC[$k]} |"; done
for f in bench_unit_kernels.txt bench_units.txt bench_summary.txt bench_overhead.txt; do
  [ -f "$OUT/$f" ] && { echo; echo "== $f"; tail -25 "$OUT/$f"; }
done
exit 0
