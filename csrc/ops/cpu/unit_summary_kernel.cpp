// CPU kernels of the per-unit summaries. The input is read once, as (outer, units, inner):
// - inner == 1 (the unit axis is last: Linear-like outputs): chunks of rows run in parallel, each
//   into its own structure-of-arrays partial over all units (unit loop innermost, vectorisable);
//   partials are folded in chunk order, so the result does not depend on the thread count.
// - inner > 1 (channels: conv-like outputs): units run in parallel, each over its contiguous
//   inner spans; every unit is summed in one fixed order.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

namespace dnntrace::ops {
namespace {

constexpr int kActCols = 6;   // count sum sumsq firing saturated max
constexpr int kGradCols = 5;  // rows count g2 xg |xg|
constexpr int64_t kChunkElems = 1 << 16;

struct Shape3 {
  int64_t outer, units, inner;
};

Shape3 shape3(const at::Tensor& x, int64_t dim) {
  TORCH_CHECK(x.dim() >= 1, "dnntrace: per-unit statistics need at least one dimension");
  const int64_t d = dim < 0 ? dim + x.dim() : dim;
  TORCH_CHECK(d >= 0 && d < x.dim(), "dnntrace: unit dim ", dim, " out of range for ", x.sizes());
  Shape3 s{1, x.size(d), 1};
  for (int64_t i = 0; i < d; ++i) s.outer *= x.size(i);
  for (int64_t i = d + 1; i < x.dim(); ++i) s.inner *= x.size(i);
  return s;
}

void check_acc(const at::Tensor& acc, const at::Tensor& x, int64_t units, int cols,
               const char* op) {
  TORCH_CHECK(acc.scalar_type() == at::kDouble && acc.dim() == 2 && acc.is_contiguous() &&
                  acc.size(0) == units && acc.size(1) == cols,
              "dnntrace: ", op, ": acc must be a contiguous float64 tensor [", units, ", ", cols,
              "], got ", acc.scalar_type(), " ", acc.sizes());
  TORCH_CHECK(acc.device() == x.device(), "dnntrace: ", op, ": acc on ", acc.device(),
              " but input on ", x.device());
  TORCH_CHECK(at::isFloatingType(x.scalar_type()), "dnntrace: ", op,
              ": expected a floating tensor, got ", x.scalar_type());
}

// Structure-of-arrays partial over `units` units.
struct ActPartial {
  std::vector<double> sum, sq, fire, sat, mx;
  explicit ActPartial(int64_t u)
      : sum(u, 0.0),
        sq(u, 0.0),
        fire(u, 0.0),
        sat(u, 0.0),
        mx(u, -std::numeric_limits<double>::infinity()) {}
};

template <typename scalar_t>
void unit_summary_kernel_impl(const scalar_t* p, const Shape3& s, double lo, double hi,
                              double* acc) {
  const int64_t U = s.units;
  if (s.inner == 1) {
    const int64_t rows_per_chunk = std::max<int64_t>(1, kChunkElems / std::max<int64_t>(U, 1));
    const int64_t chunks = (s.outer + rows_per_chunk - 1) / rows_per_chunk;
    std::vector<ActPartial> parts;
    parts.reserve(chunks);
    for (int64_t c = 0; c < chunks; ++c) parts.emplace_back(U);
    at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c) {
        ActPartial& a = parts[c];
        double* sum = a.sum.data();
        double* sq = a.sq.data();
        double* fire = a.fire.data();
        double* sat = a.sat.data();
        double* mx = a.mx.data();
        const int64_t r1 = std::min(s.outer, (c + 1) * rows_per_chunk);
        for (int64_t r = c * rows_per_chunk; r < r1; ++r) {
          const scalar_t* row = p + r * U;
          for (int64_t u = 0; u < U; ++u) {
            const double v = static_cast<double>(row[u]);
            sum[u] += v;
            sq[u] += v * v;
            fire[u] += v > 0.0 ? 1.0 : 0.0;
            sat[u] += (v <= lo || v >= hi) ? 1.0 : 0.0;
            mx[u] = v > mx[u] ? v : mx[u];
          }
        }
      }
    });
    const double n = static_cast<double>(s.outer);
    for (int64_t u = 0; u < U; ++u) {
      double* o = acc + u * kActCols;
      o[0] += n;
      for (const ActPartial& a : parts) {
        o[1] += a.sum[u];
        o[2] += a.sq[u];
        o[3] += a.fire[u];
        o[4] += a.sat[u];
        o[5] = a.mx[u] > o[5] ? a.mx[u] : o[5];
      }
    }
    return;
  }
  const int64_t grain = std::max<int64_t>(1, kChunkElems / std::max<int64_t>(s.outer * s.inner, 1));
  at::parallel_for(0, U, grain, [&](int64_t u0, int64_t u1) {
    for (int64_t u = u0; u < u1; ++u) {
      double sum = 0, sq = 0, fire = 0, sat = 0, mx = -std::numeric_limits<double>::infinity();
      for (int64_t r = 0; r < s.outer; ++r) {
        const scalar_t* span = p + (r * U + u) * s.inner;
        for (int64_t i = 0; i < s.inner; ++i) {
          const double v = static_cast<double>(span[i]);
          sum += v;
          sq += v * v;
          fire += v > 0.0 ? 1.0 : 0.0;
          sat += (v <= lo || v >= hi) ? 1.0 : 0.0;
          mx = v > mx ? v : mx;
        }
      }
      double* o = acc + u * kActCols;
      o[0] += static_cast<double>(s.outer * s.inner);
      o[1] += sum;
      o[2] += sq;
      o[3] += fire;
      o[4] += sat;
      o[5] = mx > o[5] ? mx : o[5];
    }
  });
}

void unit_summary_kernel(const at::Tensor& x_in, int64_t dim, double lo, double hi,
                         at::Tensor& acc) {
  const Shape3 s = shape3(x_in, dim);
  check_acc(acc, x_in, s.units, kActCols, "unit_summary_out");
  if (x_in.numel() == 0) return;  // an empty batch is a normal case
  const at::Tensor x = x_in.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, x.scalar_type(), "unit_summary_cpu", [&] {
        unit_summary_kernel_impl<scalar_t>(x.const_data_ptr<scalar_t>(), s, lo, hi,
                                           acc.data_ptr<double>());
      });
}

template <typename scalar_t>
void unit_grad_summary_kernel_impl(const scalar_t* g, const scalar_t* x, const Shape3& s,
                                   double* acc) {
  const int64_t U = s.units;
  const auto at_ = [](const scalar_t* p, int64_t i) {
    return p == nullptr ? 0.0 : static_cast<double>(p[i]);
  };
  if (s.inner == 1) {
    const int64_t rows_per_chunk = std::max<int64_t>(1, kChunkElems / std::max<int64_t>(U, 1));
    const int64_t chunks = (s.outer + rows_per_chunk - 1) / rows_per_chunk;
    std::vector<std::vector<double>> parts(chunks, std::vector<double>(3 * U, 0.0));
    at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c) {
        double* g2 = parts[c].data();
        double* xg = g2 + U;
        double* axg = xg + U;
        const int64_t r1 = std::min(s.outer, (c + 1) * rows_per_chunk);
        for (int64_t r = c * rows_per_chunk; r < r1; ++r) {
          const scalar_t* grow = g + r * U;
          if (x == nullptr) {
            for (int64_t u = 0; u < U; ++u) {
              const double gv = static_cast<double>(grow[u]);
              g2[u] += gv * gv;
            }
            continue;
          }
          const scalar_t* xrow = x + r * U;
          for (int64_t u = 0; u < U; ++u) {
            const double gv = static_cast<double>(grow[u]);
            const double p = gv * static_cast<double>(xrow[u]);
            g2[u] += gv * gv;
            xg[u] += p;
            axg[u] += std::fabs(p);
          }
        }
      }
    });
    for (int64_t u = 0; u < U; ++u) {
      double* o = acc + u * kGradCols;
      o[0] += static_cast<double>(s.outer);
      o[1] += static_cast<double>(s.outer);
      for (const auto& pt : parts) {
        o[2] += pt[u];
        o[3] += pt[U + u];
        o[4] += pt[2 * U + u];
      }
    }
    return;
  }
  const int64_t grain = std::max<int64_t>(1, kChunkElems / std::max<int64_t>(s.outer * s.inner, 1));
  at::parallel_for(0, U, grain, [&](int64_t u0, int64_t u1) {
    for (int64_t u = u0; u < u1; ++u) {
      double g2 = 0, xg = 0, axg = 0;
      for (int64_t r = 0; r < s.outer; ++r) {
        const int64_t base = (r * U + u) * s.inner;
        for (int64_t i = 0; i < s.inner; ++i) {
          const double gv = static_cast<double>(g[base + i]);
          const double p = gv * at_(x, base + i);
          g2 += gv * gv;
          xg += p;
          axg += std::fabs(p);
        }
      }
      double* o = acc + u * kGradCols;
      o[0] += static_cast<double>(s.outer);
      o[1] += static_cast<double>(s.outer * s.inner);
      o[2] += g2;
      o[3] += xg;
      o[4] += axg;
    }
  });
}

void unit_grad_summary_kernel(const at::Tensor& g_in, const std::optional<at::Tensor>& x_opt,
                              int64_t dim, at::Tensor& acc) {
  const Shape3 s = shape3(g_in, dim);
  check_acc(acc, g_in, s.units, kGradCols, "unit_grad_summary_out");
  const bool has_x = x_opt.has_value() && x_opt->defined();
  if (has_x) {
    TORCH_CHECK(x_opt->sizes() == g_in.sizes(), "dnntrace: unit_grad_summary_out: x ",
                x_opt->sizes(), " and g ", g_in.sizes(), " differ in shape");
    TORCH_CHECK(x_opt->device() == g_in.device(), "dnntrace: unit_grad_summary_out: x on ",
                x_opt->device(), " but g on ", g_in.device());
  }
  if (g_in.numel() == 0) return;
  const at::Tensor g = g_in.contiguous();
  const at::Tensor x = has_x ? x_opt->to(g.scalar_type()).contiguous() : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, g.scalar_type(), "unit_grad_summary_cpu", [&] {
        unit_grad_summary_kernel_impl<scalar_t>(g.const_data_ptr<scalar_t>(),
                                                has_x ? x.const_data_ptr<scalar_t>() : nullptr, s,
                                                acc.data_ptr<double>());
      });
}

}  // namespace

TORCH_LIBRARY_IMPL(dnntrace, CPU, m) {
  m.impl("unit_summary_out", TORCH_FN(unit_summary_kernel));
  m.impl("unit_grad_summary_out", TORCH_FN(unit_grad_summary_kernel));
}

}  // namespace dnntrace::ops
