// CPU kernels of the per-unit ops (loops in core/units_cpu.cpp, rules in core/units.h). The input
// is read once, as (outer, units, inner):
// - inner == 1 (the unit axis is last: Linear-like outputs): chunks of rows run in parallel, each
//   into its own structure-of-arrays partial over all units; partials are folded in chunk order,
//   so the result does not depend on the thread count.
// - inner > 1 (channels: conv-like outputs): units run in parallel, each over its contiguous
//   inner spans; every unit is summed in one fixed order.
// float16/bfloat16 are widened to float32 in L1-sized pieces; float32 and float64 are read as is.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <type_traits>
#include <vector>

#include "../../core/units_cpu.h"
#include "../unit_checks.h"

namespace dnntrace::ops {
namespace {

using core::kUnitActCols;
using core::kUnitGradCols;
constexpr int64_t kChunkElems = 1 << 16;  // elements per parallel task
constexpr int64_t kWiden = 4096;          // float16/bfloat16 values widened at a time
constexpr int64_t kWideRows = 4096;       // rows of this many units or more: split by units
constexpr int64_t kUnitBlock = 1024;      // units per task then
constexpr int64_t kMaxChunks = 64;        // row chunks otherwise (partials: chunks x U)

// Row chunks of a (rows x U) input: about kChunkElems values each, at most kMaxChunks. Depends
// on the shape only, so results do not depend on the thread count.
int64_t row_chunks(int64_t rows, int64_t U) {
  const int64_t want = (rows * U + kChunkElems - 1) / kChunkElems;
  return std::clamp<int64_t>(want, 1, std::min(rows, kMaxChunks));
}

// Widens n values of a 16-bit float type into out.
template <typename scalar_t>
void widen(const scalar_t* p, int64_t n, float* out) {
  const auto* bits = reinterpret_cast<const uint16_t*>(p);
  if constexpr (std::is_same_v<scalar_t, at::Half>) {
    core::half_to_float(bits, static_cast<int>(n), out);
  } else {
    core::bf16_to_float(bits, static_cast<int>(n), out);
  }
}

// float16/bfloat16 inputs: calls fn(pb, xb, m) for consecutive packets of m runs of `len`
// values (run r at p + r * stride; x alike, or null), widened to float32 and packed (run j of a
// packet at pb + j * len), about kWiden values and at least one run per packet.
template <typename scalar_t, typename Fn>
void widened_runs(const scalar_t* p, const scalar_t* x, int64_t runs, int64_t len, int64_t stride,
                  std::vector<float>& buf, Fn&& fn) {
  const int64_t per = std::max<int64_t>(1, kWiden / len);
  const int64_t width = std::min(runs, per) * len;
  buf.resize(static_cast<size_t>((x == nullptr ? 1 : 2) * width));
  float* pb = buf.data();
  float* xb = x == nullptr ? nullptr : buf.data() + width;
  for (int64_t r = 0; r < runs; r += per) {
    const int64_t m = std::min(per, runs - r);
    for (int64_t j = 0; j < m; ++j) {
      widen(p + (r + j) * stride, len, pb + j * len);
      if (xb != nullptr) widen(x + (r + j) * stride, len, xb + j * len);
    }
    fn(pb, xb, m);
  }
}

// n rows of U values, row r at p + r * stride, into a.
template <typename scalar_t>
void act_rows(const scalar_t* p, int64_t n, int64_t U, int64_t stride, double lo, double hi,
              const core::UnitActSoA& a, std::vector<float>& buf) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    core::unit_act_rows_f32(p, n, U, stride, lo, hi, a);
  } else if constexpr (std::is_same_v<scalar_t, double>) {
    core::unit_act_rows_f64(p, n, U, stride, lo, hi, a);
  } else {
    widened_runs(p, static_cast<const scalar_t*>(nullptr), n, U, stride, buf,
                 [&](const float* pb, const float*, int64_t m) {
                   core::unit_act_rows_f32(pb, m, U, U, lo, hi, a);
                 });
  }
}

// The spans of one unit: `spans` runs of n values, run r at p + r * stride, into out.
template <typename scalar_t>
void act_spans(const scalar_t* p, int64_t spans, int64_t stride, int64_t n, double lo, double hi,
               double* out, std::vector<float>& buf) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    core::unit_act_spans_f32(p, spans, stride, n, lo, hi, out);
  } else if constexpr (std::is_same_v<scalar_t, double>) {
    core::unit_act_spans_f64(p, spans, stride, n, lo, hi, out);
  } else {
    widened_runs(p, static_cast<const scalar_t*>(nullptr), spans, n, stride, buf,
                 [&](const float* pb, const float*, int64_t m) {
                   core::unit_act_spans_f32(pb, m, n, n, lo, hi, out);
                 });
  }
}

template <typename scalar_t>
void grad_rows(const scalar_t* g, const scalar_t* x, int64_t n, int64_t U, int64_t stride,
               const core::UnitGradSoA& a, std::vector<float>& buf) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    core::unit_grad_rows_f32(g, x, n, U, stride, a);
  } else if constexpr (std::is_same_v<scalar_t, double>) {
    core::unit_grad_rows_f64(g, x, n, U, stride, a);
  } else {
    widened_runs(g, x, n, U, stride, buf, [&](const float* gb, const float* xb, int64_t m) {
      core::unit_grad_rows_f32(gb, xb, m, U, U, a);
    });
  }
}

template <typename scalar_t>
void grad_spans(const scalar_t* g, const scalar_t* x, int64_t spans, int64_t stride, int64_t n,
                double* out, std::vector<float>& buf) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    core::unit_grad_spans_f32(g, x, spans, stride, n, out);
  } else if constexpr (std::is_same_v<scalar_t, double>) {
    core::unit_grad_spans_f64(g, x, spans, stride, n, out);
  } else {
    widened_runs(g, x, spans, n, stride, buf, [&](const float* gb, const float* xb, int64_t m) {
      core::unit_grad_spans_f32(gb, xb, m, n, n, out);
    });
  }
}

template <typename scalar_t>
void unit_summary_impl(const scalar_t* p, const UnitShape& s, double lo, double hi, double* acc) {
  const int64_t U = s.units;
  constexpr double kNegInf = -std::numeric_limits<double>::infinity();
  if (s.inner == 1 && U >= kWideRows) {
    // wide rows: blocks of units run in parallel, each over all rows, so partials stay O(U)
    at::parallel_for(0, (U + kUnitBlock - 1) / kUnitBlock, 1, [&](int64_t b0, int64_t b1) {
      std::vector<float> buf;
      std::vector<double> part(5 * kUnitBlock);
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t u0 = b * kUnitBlock, ub = std::min(kUnitBlock, U - u0);
        std::fill(part.begin(), part.begin() + 4 * ub, 0.0);
        std::fill(part.begin() + 4 * ub, part.begin() + 5 * ub, kNegInf);
        double* q = part.data();
        const core::UnitActSoA a{q, q + ub, q + 2 * ub, q + 3 * ub, q + 4 * ub};
        act_rows(p + u0, s.outer, ub, U, lo, hi, a, buf);
        for (int64_t j = 0; j < ub; ++j) {
          double* o = acc + (u0 + j) * kUnitActCols;
          o[core::kUCount] += static_cast<double>(s.outer);
          for (int c = 0; c < 4; ++c) o[1 + c] += q[c * ub + j];
          o[core::kUMax] = core::unit_fold_max(o[core::kUMax], q[4 * ub + j]);
        }
      }
    });
    return;
  }
  if (s.inner == 1) {
    // chunks of rows in parallel (at most kMaxChunks: partials are chunks x U), folded in order
    const int64_t chunks = row_chunks(s.outer, U);
    const int64_t rows_per_chunk = (s.outer + chunks - 1) / chunks;
    // [chunk][5][U]: sum, sq, fire, sat, max
    std::vector<double> parts(static_cast<size_t>(chunks * 5 * U), 0.0);
    at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
      std::vector<float> buf;
      for (int64_t c = c0; c < c1; ++c) {
        double* base = parts.data() + c * 5 * U;
        std::fill(base + 4 * U, base + 5 * U, kNegInf);
        const core::UnitActSoA a{base, base + U, base + 2 * U, base + 3 * U, base + 4 * U};
        const int64_t r0 = std::min(s.outer, c * rows_per_chunk);
        const int64_t r1 = std::min(s.outer, r0 + rows_per_chunk);
        act_rows(p + r0 * U, r1 - r0, U, U, lo, hi, a, buf);
      }
    });
    at::parallel_for(0, U, 1024, [&](int64_t u0, int64_t u1) {
      for (int64_t u = u0; u < u1; ++u) {
        double* o = acc + u * kUnitActCols;
        o[core::kUCount] += static_cast<double>(s.outer);
        for (int64_t c = 0; c < chunks; ++c) {
          const double* base = parts.data() + c * 5 * U;
          for (int j = 0; j < 4; ++j) o[1 + j] += base[j * U + u];
          o[core::kUMax] = core::unit_fold_max(o[core::kUMax], base[4 * U + u]);
        }
      }
    });
    return;
  }
  const int64_t grain = std::max<int64_t>(1, kChunkElems / (s.outer * s.inner));
  at::parallel_for(0, U, grain, [&](int64_t u0, int64_t u1) {
    std::vector<float> buf;
    for (int64_t u = u0; u < u1; ++u) {
      double part[5] = {0.0, 0.0, 0.0, 0.0, kNegInf};  // sum sq fire sat max
      act_spans(p + u * s.inner, s.outer, U * s.inner, s.inner, lo, hi, part, buf);
      double* o = acc + u * kUnitActCols;
      o[core::kUCount] += static_cast<double>(s.outer * s.inner);
      for (int j = 0; j < 4; ++j) o[1 + j] += part[j];
      o[core::kUMax] = core::unit_fold_max(o[core::kUMax], part[4]);
    }
  });
}

void unit_summary_kernel(const at::Tensor& x_in, int64_t dim, double lo, double hi,
                         at::Tensor& acc) {
  check_unit_acc(acc, x_in, unit_shape(x_in, dim).units, kUnitActCols, "unit_summary_out");
  if (x_in.numel() == 0) return;  // an empty batch is a normal case
  const UnitView v = unit_view(x_in, dim);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, v.t.scalar_type(), "unit_summary_cpu",
                                  [&] {
                                    unit_summary_impl<scalar_t>(v.t.const_data_ptr<scalar_t>(), v.s,
                                                                lo, hi, acc.data_ptr<double>());
                                  });
}

template <typename scalar_t>
void unit_grad_impl(const scalar_t* g, const scalar_t* x, const UnitShape& s, int64_t rows,
                    double* acc) {
  const int64_t U = s.units;
  if (s.inner == 1 && U >= kWideRows) {
    at::parallel_for(0, (U + kUnitBlock - 1) / kUnitBlock, 1, [&](int64_t b0, int64_t b1) {
      std::vector<float> buf;
      std::vector<double> part(3 * kUnitBlock);
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t u0 = b * kUnitBlock, ub = std::min(kUnitBlock, U - u0);
        std::fill(part.begin(), part.begin() + 3 * ub, 0.0);
        double* q = part.data();
        const core::UnitGradSoA a{q, q + ub, q + 2 * ub};
        grad_rows(g + u0, x == nullptr ? nullptr : x + u0, s.outer, ub, U, a, buf);
        for (int64_t j = 0; j < ub; ++j) {
          double* o = acc + (u0 + j) * kUnitGradCols;
          o[core::kGRows] += static_cast<double>(rows);
          o[core::kGCount] += static_cast<double>(s.outer);
          for (int c = 0; c < 3; ++c) o[2 + c] += q[c * ub + j];
        }
      }
    });
    return;
  }
  if (s.inner == 1) {
    const int64_t chunks = row_chunks(s.outer, U);
    const int64_t rows_per_chunk = (s.outer + chunks - 1) / chunks;
    std::vector<double> parts(static_cast<size_t>(chunks * 3 * U), 0.0);  // [chunk][3][U]
    at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
      std::vector<float> buf;
      for (int64_t c = c0; c < c1; ++c) {
        double* base = parts.data() + c * 3 * U;
        const core::UnitGradSoA a{base, base + U, base + 2 * U};
        const int64_t r0 = std::min(s.outer, c * rows_per_chunk);
        const int64_t r1 = std::min(s.outer, r0 + rows_per_chunk);
        grad_rows(g + r0 * U, x == nullptr ? nullptr : x + r0 * U, r1 - r0, U, U, a, buf);
      }
    });
    at::parallel_for(0, U, 1024, [&](int64_t u0, int64_t u1) {
      for (int64_t u = u0; u < u1; ++u) {
        double* o = acc + u * kUnitGradCols;
        o[core::kGRows] += static_cast<double>(rows);
        o[core::kGCount] += static_cast<double>(s.outer);
        for (int64_t c = 0; c < chunks; ++c) {
          const double* base = parts.data() + c * 3 * U;
          for (int j = 0; j < 3; ++j) o[2 + j] += base[j * U + u];
        }
      }
    });
    return;
  }
  const int64_t grain = std::max<int64_t>(1, kChunkElems / (s.outer * s.inner));
  at::parallel_for(0, U, grain, [&](int64_t u0, int64_t u1) {
    std::vector<float> buf;
    for (int64_t u = u0; u < u1; ++u) {
      double part[3] = {0.0, 0.0, 0.0};
      grad_spans(g + u * s.inner, x == nullptr ? nullptr : x + u * s.inner, s.outer, U * s.inner,
                 s.inner, part, buf);
      double* o = acc + u * kUnitGradCols;
      o[core::kGRows] += static_cast<double>(rows);
      o[core::kGCount] += static_cast<double>(s.outer * s.inner);
      for (int j = 0; j < 3; ++j) o[2 + j] += part[j];
    }
  });
}

void unit_grad_summary_kernel(const at::Tensor& g_in, const std::optional<at::Tensor>& x_opt,
                              int64_t dim, at::Tensor& acc) {
  check_unit_acc(acc, g_in, unit_shape(g_in, dim).units, kUnitGradCols, "unit_grad_summary_out");
  const bool has_x = check_unit_grad_x(g_in, x_opt);
  if (g_in.numel() == 0) return;
  const UnitView v = unit_view(g_in, dim);
  const at::Tensor x = has_x ? same_layout(*x_opt, v, v.t.scalar_type()) : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, v.t.scalar_type(), "unit_grad_summary_cpu", [&] {
        unit_grad_impl<scalar_t>(v.t.const_data_ptr<scalar_t>(),
                                 has_x ? x.const_data_ptr<scalar_t>() : nullptr, v.s, v.rows,
                                 acc.data_ptr<double>());
      });
}

void unit_topk_update_kernel(const at::Tensor& samples_in, const at::Tensor& ids_in, int64_t step,
                             at::Tensor& values, at::Tensor& ids, at::Tensor& steps) {
  check_unit_topk(samples_in, ids_in, values, ids, steps);
  const int64_t B = samples_in.size(0), U = samples_in.size(1), k = values.size(1);
  if (B == 0 || U == 0) return;
  const at::Tensor samples = samples_in.to(at::kFloat).contiguous();
  const at::Tensor sid = ids_in.to(at::kFloat).contiguous();
  const float* sp = samples.const_data_ptr<float>();
  const float* ip = sid.const_data_ptr<float>();
  float* vp = values.data_ptr<float>();
  float* op = ids.data_ptr<float>();
  float* tp = steps.data_ptr<float>();
  const float st = static_cast<float>(step);
  const int kk = static_cast<int>(k);
  constexpr int64_t kScan = 32;
  at::parallel_for(0, U, std::max<int64_t>(256, 65536 / B), [&](int64_t u0, int64_t u1) {
    // Each unit's current k-th value, contiguous: after the first steps almost every sample is
    // rejected by one compare against it.
    std::vector<float> kth(static_cast<size_t>(u1 - u0));
    for (int64_t u = u0; u < u1; ++u) kth[u - u0] = vp[u * k + k - 1];
    const float* kt = kth.data() - u0;
    for (int64_t b = 0; b < B; ++b) {  // samples in order: ties keep the earlier one
      const float* row = sp + b * U;
      for (int64_t c = u0; c < u1; c += kScan) {
        const int64_t e = std::min(u1, c + kScan);
        int any = 0;  // a branch-free scan of the block first
        for (int64_t u = c; u < e; ++u) any |= row[u] > kt[u];
        if (!any) continue;
        for (int64_t u = c; u < e; ++u) {
          if (!(row[u] > kt[u])) continue;
          core::unit_topk_insert(vp + u * k, op + u * k, tp + u * k, kk, row[u], ip[b], st);
          kth[u - u0] = vp[u * k + k - 1];
        }
      }
    }
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(dnntrace, CPU, m) {
  m.impl("unit_summary_out", TORCH_FN(unit_summary_kernel));
  m.impl("unit_grad_summary_out", TORCH_FN(unit_grad_summary_kernel));
  m.impl("unit_topk_update", TORCH_FN(unit_topk_update_kernel));
}

}  // namespace dnntrace::ops
