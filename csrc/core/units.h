// Per-element rules of the per-unit statistics and the top-k insertion, shared by the CPU kernels
// and the CUDA kernels (compiled into both), so the two devices apply one definition.
//
// A tensor is read as (outer, units, inner) around its unit axis. Columns of the accumulators:
//   activations float64[units, 6]: count, sum, sum of squares, firing (x > 0), saturated
//     (x <= lo or x >= hi; a NaN bound never matches), max (finite or inf; NaN never enters);
//   gradients   float64[units, 5]: rows (outer), count, sum g^2, sum x*g, sum |x*g|.
// Count-like columns are sums of integers, exact in float64 below 2^53 and therefore identical on
// every device whatever the order of the additions.
#pragma once

#include <cstdint>

#include "loglinear.h"  // DNNTRACE_HD

namespace dnntrace::core {

constexpr int kUnitActCols = 6;
constexpr int kUnitGradCols = 5;
enum UnitActCol : int { kUCount = 0, kUSum = 1, kUSq = 2, kUFire = 3, kUSat = 4, kUMax = 5 };
enum UnitGradCol : int { kGRows = 0, kGCount = 1, kGSq = 2, kGAttr = 3, kGAttrAbs = 4 };

// Top-k lists per unit hold at most this many entries (a per-thread array on the GPU).
constexpr int kMaxUnitTopK = 64;

DNNTRACE_HD double unit_fires(double v) { return v > 0.0 ? 1.0 : 0.0; }

DNNTRACE_HD double unit_saturated(double v, double lo, double hi) {
  return (v <= lo) | (v >= hi) ? 1.0 : 0.0;  // bitwise or: no branch, vectorisable
}

// max that ignores NaN in v (and keeps m when v is NaN).
DNNTRACE_HD double unit_fold_max(double m, double v) { return v > m ? v : m; }

DNNTRACE_HD double unit_abs(double v) { return v < 0.0 ? -v : v; }

// Inserts (v, id, step) into the descending list vals[0..k) (ids, steps alongside), whose empty
// entries hold -inf. A value enters only if it is strictly greater than the current k-th, and it
// goes after the entries equal to it, so among equal values the earlier one is kept first: the
// list is always the first k of a stable descending sort of everything offered, in the order
// offered. NaN never enters (every comparison with it is false), nor does -inf.
DNNTRACE_HD void unit_topk_insert(float* vals, float* ids, float* steps, int k, float v, float id,
                                  float step) {
  if (!(v > vals[k - 1])) return;
  int i = k - 1;
  while (i > 0 && vals[i - 1] < v) {
    vals[i] = vals[i - 1];
    ids[i] = ids[i - 1];
    steps[i] = steps[i - 1];
    --i;
  }
  vals[i] = v;
  ids[i] = id;
  steps[i] = step;
}

}  // namespace dnntrace::core
