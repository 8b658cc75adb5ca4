// Torch-free interface of the CUDA per-unit kernels (raw pointers and a stream); the torch glue
// is unit_summary_register.cpp. Rules and accumulator columns: core/units.h.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "tensor_summary_cuda.h"  // DType

namespace dnntrace::cuda {

// x read as (outer, units, inner), contiguous. Adds into acc float64[units, 6].
// Returns nullptr, or a static error string.
const char* launch_unit_summary(DType dtype, const void* x, int64_t outer, int64_t units,
                                int64_t inner, double lo, double hi, double* acc,
                                cudaStream_t stream);

// g (and x of the same dtype and layout, or null) read as above. Adds into acc float64[units, 5];
// `rows` is added to the rows column (the logical outer size, which differs from `outer` for a
// channels_last map read as rows).
const char* launch_unit_grad_summary(DType dtype, const void* g, const void* x, int64_t outer,
                                     int64_t units, int64_t inner, int64_t rows, double* acc,
                                     cudaStream_t stream);

// samples float32[batch, units] and ids float32[batch], contiguous; values/ids/steps float32
// [units, k], k <= core::kMaxUnitTopK.
const char* launch_unit_topk_update(const float* samples, const float* sample_ids, int64_t batch,
                                    int64_t units, float step, float* values, float* ids,
                                    float* steps, int k, cudaStream_t stream);

}  // namespace dnntrace::cuda
