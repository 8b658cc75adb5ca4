// Torch glue of the CUDA summary kernel: checks, device guard, current stream, dtype grouping.
// Host-compiled; the kernel itself (tensor_summary_kernel.cu) sees no torch header.
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <vector>

#include "../summary_checks.h"
#include "cuda_dtype.h"
#include "tensor_summary_cuda.h"

namespace dnntrace::ops {
namespace {

void run(const std::vector<at::Tensor>& xs, const std::vector<int64_t>& slots,
         const core::HistLayout& l, bool histogram, at::Tensor& counts, at::Tensor& moments) {
  const c10::cuda::CUDAGuard guard(counts.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  // One launch sequence per dtype; dense views are read in place, others copied once.
  std::vector<at::Tensor> keep;
  for (auto dt : {at::kFloat, at::kBFloat16, at::kHalf, at::kDouble}) {
    std::vector<cuda::TensorRef> refs;
    for (size_t i = 0; i < xs.size(); ++i) {
      if (xs[i].scalar_type() != dt) continue;
      keep.push_back(dense_view_or_copy(xs[i]));
      refs.push_back({keep.back().data_ptr(), keep.back().numel(), slots[i]});
    }
    if (refs.empty()) continue;
    const char* err = nullptr;
    const int launches = cuda::launch_summary(
        cuda_dtype(dt), refs.data(), static_cast<int>(refs.size()), l, histogram,
        counts.data_ptr<int64_t>(), moments.data_ptr<double>(), stream, &err);
    TORCH_CHECK(launches >= 0, "dnntrace: CUDA summary kernel failed: ", err);
  }
}

void tensor_summary_out_cuda(const at::Tensor& x, int64_t slot, int64_t k, int64_t emin,
                             int64_t octaves, bool histogram, at::Tensor& counts,
                             at::Tensor& moments) {
  const auto l = checked_layout(k, emin, octaves);
  check_state(counts, moments, l, x.device());
  check_input(x, slot, counts);
  run({x}, {slot}, l, histogram, counts, moments);
}

void multi_tensor_summary_out_cuda(at::TensorList xs, at::IntArrayRef slots, int64_t k,
                                   int64_t emin, int64_t octaves, bool histogram,
                                   at::Tensor& counts, at::Tensor& moments) {
  TORCH_CHECK(xs.size() == slots.size(), "dnntrace: ", xs.size(), " tensors but ", slots.size(),
              " slots");
  const auto l = checked_layout(k, emin, octaves);
  check_state(counts, moments, l, counts.device());
  std::vector<at::Tensor> v;
  v.reserve(xs.size());
  for (size_t i = 0; i < xs.size(); ++i) {
    TORCH_CHECK(xs[i].device() == counts.device(), "dnntrace: tensor ", i, " on ", xs[i].device(),
                " but state on ", counts.device());
    check_input(xs[i], slots[i], counts);
    v.push_back(xs[i]);
  }
  run(v, std::vector<int64_t>(slots.begin(), slots.end()), l, histogram, counts, moments);
}

}  // namespace

TORCH_LIBRARY_IMPL(dnntrace, CUDA, m) {
  m.impl("tensor_summary_out", TORCH_FN(tensor_summary_out_cuda));
  m.impl("multi_tensor_summary_out", TORCH_FN(multi_tensor_summary_out_cuda));
}

}  // namespace dnntrace::ops
