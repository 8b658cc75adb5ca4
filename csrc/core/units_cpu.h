// Torch-free CPU loops of the per-unit statistics (rules in units.h). Two shapes of input:
// - rows: the unit axis is last and contiguous (Linear-like outputs, inner == 1): each row adds
//   one value to every unit of structure-of-arrays partials, unit loop innermost (vectorised);
// - spans: a contiguous run of one unit's values (conv-like outputs, inner > 1): reduced with 8
//   independent lanes folded in a fixed order, so the result does not depend on the machine.
#pragma once

#include <cstdint>

#include "summary_cpu.h"  // DNNTRACE_CLONES
#include "units.h"

namespace dnntrace::core {

// Per-unit partials of activations, U entries each; mx starts at -inf.
struct UnitActSoA {
  double* sum;
  double* sq;
  double* fire;
  double* sat;
  double* mx;
};

// Per-unit partials of gradients, U entries each.
struct UnitGradSoA {
  double* g2;
  double* xg;
  double* axg;
};

// Adds n rows of U values, row r at p + r * stride, into a.
void unit_act_rows_f32(const float* p, int64_t n, int64_t U, int64_t stride, double lo, double hi,
                       const UnitActSoA& a);
void unit_act_rows_f64(const double* p, int64_t n, int64_t U, int64_t stride, double lo, double hi,
                       const UnitActSoA& a);

// Adds `spans` spans of n values, span r at p + r * stride, into out = {sum, sq, fire, sat} and
// folds out[4] = max.
void unit_act_spans_f32(const float* p, int64_t spans, int64_t stride, int64_t n, double lo,
                        double hi, double* out);
void unit_act_spans_f64(const double* p, int64_t spans, int64_t stride, int64_t n, double lo,
                        double hi, double* out);

// Adds n rows of g (and x at the same offsets, or null), as above, into a.
void unit_grad_rows_f32(const float* g, const float* x, int64_t n, int64_t U, int64_t stride,
                        const UnitGradSoA& a);
void unit_grad_rows_f64(const double* g, const double* x, int64_t n, int64_t U, int64_t stride,
                        const UnitGradSoA& a);

// Adds spans of g (and x at the same offsets, or null), as above, into out = {sum g^2, sum x*g,
// sum |x*g|}.
void unit_grad_spans_f32(const float* g, const float* x, int64_t spans, int64_t stride, int64_t n,
                         double* out);
void unit_grad_spans_f64(const double* g, const double* x, int64_t spans, int64_t stride, int64_t n,
                         double* out);

}  // namespace dnntrace::core
