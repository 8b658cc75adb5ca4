// The torch dtype -> kernel dtype mapping of the CUDA glue (host code, torch headers).
#pragma once

#include <c10/core/ScalarType.h>
#include <c10/util/Exception.h>

#include "tensor_summary_cuda.h"

namespace dnntrace::ops {

inline cuda::DType cuda_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat:
      return cuda::DType::kF32;
    case at::kDouble:
      return cuda::DType::kF64;
    case at::kHalf:
      return cuda::DType::kF16;
    case at::kBFloat16:
      return cuda::DType::kBF16;
    default:
      TORCH_CHECK(false, "dnntrace: unsupported dtype ", t,
                  " (float32, float64, float16 and bfloat16 are)");
  }
}

}  // namespace dnntrace::ops
