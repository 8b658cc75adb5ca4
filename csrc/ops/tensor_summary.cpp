// Schemas of the summary ops, defined once, and the functional variant on top of the _out op.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <limits>

#include "../core/loglinear.h"
#include "summary_checks.h"

namespace dnntrace::ops {
namespace {

std::tuple<at::Tensor, at::Tensor> tensor_summary(const at::Tensor& x, int64_t k, int64_t emin,
                                                  int64_t octaves) {
  const auto l = checked_layout(k, emin, octaves);
  auto counts = at::zeros({1, l.width()}, x.options().dtype(at::kLong));
  auto moments = at::zeros({1, core::kNumMoments}, x.options().dtype(at::kDouble));
  moments.select(1, core::kMin).fill_(std::numeric_limits<double>::infinity());
  moments.select(1, core::kMax).fill_(-std::numeric_limits<double>::infinity());
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("dnntrace::tensor_summary_out", "")
                       .typed<void(const at::Tensor&, int64_t, int64_t, int64_t, int64_t, bool,
                                   at::Tensor&, at::Tensor&)>();
  op.call(x, 0, k, emin, octaves, true, counts, moments);
  return {counts.squeeze(0), moments.squeeze(0)};
}

}  // namespace

TORCH_LIBRARY(dnntrace, m) {
  // Adds the statistics of x into row `slot` of the state (counts int64[slots, width],
  // moments float64[slots, 8]); histogram=false counts and sums only (moments-only mode).
  m.def(
      "tensor_summary_out(Tensor x, int slot, int k, int emin, int octaves, bool histogram, "
      "Tensor(a!) counts, Tensor(b!) moments) -> ()");
  // The same for a list of tensors, each into its own slot, in as few launches as possible.
  m.def(
      "multi_tensor_summary_out(Tensor[] xs, int[] slots, int k, int emin, int octaves, "
      "bool histogram, Tensor(a!) counts, Tensor(b!) moments) -> ()");
  // Fresh state for one tensor: (counts int64[width], moments float64[8]).
  m.def(
      "tensor_summary(Tensor x, int k=6, int emin=-48, int octaves=64) -> (Tensor counts, "
      "Tensor moments)");
}

TORCH_LIBRARY_IMPL(dnntrace, CompositeExplicitAutograd, m) {
  m.impl("tensor_summary", TORCH_FN(tensor_summary));
}

// Observers are not differentiated: autograd passes straight through to the backend kernels.
TORCH_LIBRARY_IMPL(dnntrace, Autograd, m) {
  m.impl("tensor_summary_out", torch::CppFunction::makeFallthrough());
  m.impl("multi_tensor_summary_out", torch::CppFunction::makeFallthrough());
}

}  // namespace dnntrace::ops
