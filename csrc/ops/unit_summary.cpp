// Schemas of the per-unit summary ops: statistics per unit (neuron, channel, head group) of an
// activation and of its gradient, added into a caller-owned float64 accumulator. Defined once.
#include <torch/library.h>

namespace dnntrace::ops {

TORCH_LIBRARY_FRAGMENT(dnntrace, m) {
  // x viewed as (outer, units, inner) around `dim`. Adds into acc float64[units, 6]: count, sum,
  // sum of squares, firing (x > 0), saturated (x <= lo or x >= hi; a NaN bound never matches),
  // and folds max. NaN elements enter count and the sums (which turn NaN), not firing/max.
  m.def("unit_summary_out(Tensor x, int dim, float lo, float hi, Tensor(a!) acc) -> ()");
  // g (and x of the same shape, if given) viewed as above. Adds into acc float64[units, 5]:
  // rows (outer), count, sum g^2, sum x*g, sum |x*g| (the last two stay 0 without x).
  m.def("unit_grad_summary_out(Tensor g, Tensor? x, int dim, Tensor(a!) acc) -> ()");
  // The k largest per-sample activations of each unit seen so far, merged with a new batch of
  // samples [batch, units] (ids [batch]: the samples' ids; step: recorded with each entry) into
  // values/ids/steps float32[units, k], kept in descending order, -inf (ids -1) where empty. A
  // value enters when strictly greater than the unit's k-th; equal values keep the earlier one.
  // NaN never enters. 1 <= k <= 64.
  m.def(
      "unit_topk_update(Tensor samples, Tensor ids, int step, Tensor(a!) values, "
      "Tensor(b!) sample_ids, Tensor(c!) steps) -> ()");
}

// Observers are not differentiated: autograd passes straight through to the backend kernels.
TORCH_LIBRARY_IMPL(dnntrace, Autograd, m) {
  m.impl("unit_summary_out", torch::CppFunction::makeFallthrough());
  m.impl("unit_grad_summary_out", torch::CppFunction::makeFallthrough());
  m.impl("unit_topk_update", torch::CppFunction::makeFallthrough());
}

}  // namespace dnntrace::ops
