// Torch glue of the CUDA per-unit kernels: checks, device guard, current stream, layout.
// Host-compiled; the kernels themselves (unit_summary_kernel.cu) see no torch header.
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../unit_checks.h"
#include "cuda_dtype.h"
#include "unit_summary_cuda.h"

namespace dnntrace::ops {
namespace {

void unit_summary_cuda(const at::Tensor& x, int64_t dim, double lo, double hi, at::Tensor& acc) {
  check_unit_acc(acc, x, unit_shape(x, dim).units, core::kUnitActCols, "unit_summary_out");
  if (x.numel() == 0) return;
  const c10::cuda::CUDAGuard guard(x.device());
  const UnitView v = unit_view(x, dim);
  const char* err = cuda::launch_unit_summary(
      cuda_dtype(v.t.scalar_type()), v.t.data_ptr(), v.s.outer, v.s.units, v.s.inner, lo, hi,
      acc.data_ptr<double>(), c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == nullptr, "dnntrace: CUDA unit_summary_out failed: ", err);
}

void unit_grad_summary_cuda(const at::Tensor& g, const std::optional<at::Tensor>& x_opt,
                            int64_t dim, at::Tensor& acc) {
  check_unit_acc(acc, g, unit_shape(g, dim).units, core::kUnitGradCols, "unit_grad_summary_out");
  const bool has_x = check_unit_grad_x(g, x_opt);
  if (g.numel() == 0) return;
  const c10::cuda::CUDAGuard guard(g.device());
  const UnitView v = unit_view(g, dim);
  const at::Tensor x = has_x ? same_layout(*x_opt, v, v.t.scalar_type()) : at::Tensor();
  const char* err = cuda::launch_unit_grad_summary(
      cuda_dtype(v.t.scalar_type()), v.t.data_ptr(), has_x ? x.data_ptr() : nullptr, v.s.outer,
      v.s.units, v.s.inner, v.rows, acc.data_ptr<double>(),
      c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == nullptr, "dnntrace: CUDA unit_grad_summary_out failed: ", err);
}

void unit_topk_update_cuda(const at::Tensor& samples, const at::Tensor& sample_ids, int64_t step,
                           at::Tensor& values, at::Tensor& ids, at::Tensor& steps) {
  check_unit_topk(samples, sample_ids, values, ids, steps);
  if (samples.numel() == 0) return;
  const c10::cuda::CUDAGuard guard(samples.device());
  const at::Tensor s = samples.to(at::kFloat).contiguous();
  const at::Tensor i = sample_ids.to(at::kFloat).contiguous();
  const char* err = cuda::launch_unit_topk_update(
      s.const_data_ptr<float>(), i.const_data_ptr<float>(), s.size(0), s.size(1),
      static_cast<float>(step), values.data_ptr<float>(), ids.data_ptr<float>(),
      steps.data_ptr<float>(), static_cast<int>(values.size(1)),
      c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == nullptr, "dnntrace: CUDA unit_topk_update failed: ", err);
}

}  // namespace

TORCH_LIBRARY_IMPL(dnntrace, CUDA, m) {
  m.impl("unit_summary_out", TORCH_FN(unit_summary_cuda));
  m.impl("unit_grad_summary_out", TORCH_FN(unit_grad_summary_cuda));
  m.impl("unit_topk_update", TORCH_FN(unit_topk_update_cuda));
}

}  // namespace dnntrace::ops
