#!/usr/bin/env bash
# One call on a lent GPU (H100/H200): build with CUDA, run every CUDA test, the no-sync check and
# the GPU benchmarks, keep logs under $OUT, print a short table last. Budget: under 8 minutes.
#   bash bench/gpu_check.sh            (OUT defaults to ./out/gpu)
# The machine has torch (CUDA), pybind11, scikit-build-core, pyarrow, pytest; no network. Extra
# wheels (hypothesis, tensorboard, wandb, ...) travel in .whl/ (see the device tool's notes).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out/gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
T0=$(date +%s)
log() { echo "[$(( $(date +%s) - T0 ))s] $*"; }

if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
python3 -m venv --system-site-packages /tmp/venv && PY=/tmp/venv/bin/python || PY=python3
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"

log "build (DNNTRACE_CUDA=ON, sm_90)"
DNNTRACE_CUDA=ON $PY -m pip install -q --no-build-isolation --no-deps -e . >"$OUT/build.log" 2>&1
BUILD=$?
tail -5 "$OUT/build.log"

log "CUDA tests (kernels vs float64/CPU references, tracer under sync-debug mode)"
timeout 240 $PY -m pytest -q -x -m "needs_cuda" tests/ops tests/stats tests/capture \
  -p no:cacheprovider --junitxml="$OUT/cuda_tests.xml" >"$OUT/cuda_tests.log" 2>&1
TESTS=$?
tail -15 "$OUT/cuda_tests.log"

log "bench_summary on CUDA (GB/s vs torch.sum and device-to-device copy)"
timeout 150 $PY bench/bench_summary.py --device cuda --dtypes float32 bfloat16 float16 \
  >"$OUT/bench_summary.txt" 2>&1
SUMMARY=$?

log "bench_overhead on CUDA (GPT-2-small-size transformer, ResNet-style CNN)"
timeout 200 $PY bench/bench_overhead.py --device cuda --models gpt2,resnet --steps 10 \
  --rounds 2 --demo-steps 0 >"$OUT/bench_overhead.txt" 2>&1
OVERHEAD=$?

log "done"
echo
echo "| step | exit | log |"
echo "|---|---|---|"
echo "| build | $BUILD | build.log |"
echo "| CUDA tests | $TESTS | cuda_tests.log |"
echo "| bench_summary | $SUMMARY | bench_summary.txt |"
echo "| bench_overhead | $OVERHEAD | bench_overhead.txt |"
echo
tail -30 "$OUT/bench_summary.txt"
tail -30 "$OUT/bench_overhead.txt"
