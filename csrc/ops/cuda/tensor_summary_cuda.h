// Torch-free interface of the CUDA summary kernel (raw pointers and a stream), so the .cu file
// compiles in seconds and the torch glue lives in a host-compiled .cpp.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "../../core/loglinear.h"

namespace dnntrace::cuda {

enum class DType : int { kF32 = 0, kF64 = 1, kF16 = 2, kBF16 = 3 };

// Tensors per launch: their pointers, sizes and slots travel in the kernel's parameter block
// (apex multi_tensor_apply style), so a launch needs no host-to-device copy.
constexpr int kMaxTensorsPerLaunch = 64;

struct TensorRef {
  const void* data;
  int64_t numel;
  int64_t slot;
};

// Adds the statistics of every tensor into its slot of (counts, moments) on `stream`.
// All tensors share `dtype`. Returns the number of kernel launches (ceil(n / 64)), or -1 and
// fills `error` (a static string) on a launch error.
int launch_summary(DType dtype, const TensorRef* refs, int n, core::HistLayout layout,
                   bool histogram, int64_t* counts, double* moments, cudaStream_t stream,
                   const char** error);

}  // namespace dnntrace::cuda
