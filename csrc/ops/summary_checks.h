// Argument checks shared by the CPU kernel and the CUDA glue of the summary ops.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include "../core/loglinear.h"

namespace dnntrace::ops {

inline core::HistLayout checked_layout(int64_t k, int64_t emin, int64_t octaves) {
  core::HistLayout l{static_cast<int>(k), static_cast<int>(emin), static_cast<int>(octaves)};
  const char* err = core::validate_layout(l);
  TORCH_CHECK(err == nullptr, "dnntrace: invalid histogram layout (k=", k, ", emin=", emin,
              ", octaves=", octaves, "): ", err);
  return l;
}

inline void check_state(const at::Tensor& counts, const at::Tensor& moments,
                        const core::HistLayout& l, const c10::Device& device) {
  TORCH_CHECK(counts.scalar_type() == at::kLong && counts.dim() == 2 && counts.is_contiguous(),
              "dnntrace: counts must be a contiguous int64 tensor [slots, width], got ",
              counts.scalar_type(), " ", counts.sizes());
  TORCH_CHECK(counts.size(1) == l.width(), "dnntrace: counts has width ", counts.size(1),
              " but the layout needs ", l.width());
  TORCH_CHECK(moments.scalar_type() == at::kDouble && moments.dim() == 2 &&
                  moments.is_contiguous() && moments.size(1) == core::kNumMoments &&
                  moments.size(0) == counts.size(0),
              "dnntrace: moments must be a contiguous float64 tensor [slots, ", core::kNumMoments,
              "] matching counts, got ", moments.scalar_type(), " ", moments.sizes());
  TORCH_CHECK(counts.device() == device && moments.device() == device, "dnntrace: state on ",
              counts.device(), " but input on ", device);
}

inline void check_input(const at::Tensor& x, int64_t slot, const at::Tensor& counts) {
  const auto t = x.scalar_type();
  TORCH_CHECK(t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16,
              "dnntrace: expected a float32, float64, float16 or bfloat16 tensor, got ", t);
  TORCH_CHECK(slot >= 0 && slot < counts.size(0), "dnntrace: slot ", slot,
              " out of range for a state of ", counts.size(0), " slots");
}

// A view whose elements occupy [data_ptr, data_ptr + numel) in some order (contiguous,
// channels_last, permuted): order-free statistics read it in place, without a copy.
inline at::Tensor dense_view_or_copy(const at::Tensor& x) {
  if (x.is_contiguous() || x.is_non_overlapping_and_dense()) return x;
  return x.contiguous();
}

}  // namespace dnntrace::ops
