#!/usr/bin/env bash
# Compile-only check of the CUDA path on a machine without a GPU (and with a CPU torch): nvcc -c
# every .cu for the target architectures, and host-compile the CUDA glue against torch's headers.
# Links nothing and runs nothing; a full GPU build is bench/gpu_check.sh. Usage:
#   tools/cuda_compile_check.sh [python]   (ARCHS="90 100" to add architectures)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${1:-${PYTHON:-.venv/bin/python}}
ARCHS=${ARCHS:-90}
NVCC=${NVCC:-$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)}
if [ -z "${CUDA_HOME:-}" ]; then  # nvcc may be a wrapper script: look for the headers
  for d in /usr/local/cuda "$(dirname "$(dirname "$(readlink -f "$NVCC")")")"; do
    if [ -f "$d/include/cuda_runtime.h" ]; then CUDA_HOME=$d; break; fi
  done
fi
TORCH_DIR=$("$PY" -c "import importlib.util, os; print(os.path.dirname(importlib.util.find_spec('torch').origin))")
PYBIND_INC=$("$PY" -c "import pybind11; print(pybind11.get_include())")
OUT=$(mktemp -d)
trap 'rm -rf "$OUT"' EXIT
gencode=()
for a in $ARCHS; do gencode+=(-gencode "arch=compute_${a},code=sm_${a}"); done
status=0
for cu in csrc/ops/cuda/*.cu; do
  echo "nvcc -c $cu (sm_${ARCHS// /, sm_})"
  "$NVCC" -std=c++17 -O3 "${gencode[@]}" -Werror all-warnings -Xcompiler -Wall \
    -c "$cu" -o "$OUT/$(basename "$cu").o" || status=1
done
for cpp in csrc/ops/cuda/*.cpp; do
  echo "g++ -c $cpp (CUDA glue, against torch headers)"
  g++ -std=c++20 -O1 -fsyntax-only -Wall -DC10_USING_CUSTOM_GENERATED_MACROS -DDNNTRACE_WITH_CUDA \
    -isystem "$PYBIND_INC" -isystem "$TORCH_DIR/include" \
    -isystem "$TORCH_DIR/include/torch/csrc/api/include" -isystem "$CUDA_HOME/include" \
    "$cpp" || status=1
done
[ $status -eq 0 ] && echo "CUDA compile check: OK" || echo "CUDA compile check: FAILED"
exit $status
