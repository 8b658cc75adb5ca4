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
}

// Observers are not differentiated: autograd passes straight through to the backend kernels.
TORCH_LIBRARY_IMPL(dnntrace, Autograd, m) {
  m.impl("unit_summary_out", torch::CppFunction::makeFallthrough());
  m.impl("unit_grad_summary_out", torch::CppFunction::makeFallthrough());
}

}  // namespace dnntrace::ops
