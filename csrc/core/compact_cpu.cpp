#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "compact.h"
#include "loglinear.h"
#include "summary_cpu.h"

namespace dnntrace::core {

int64_t histogram_total(const int64_t* row) {
  return row[kCount] - row[kNan] - row[kPosInf] - row[kNegInf] - row[kZeros] - row[kUnderPos] -
         row[kUnderNeg] - row[kOverPos] - row[kOverNeg];
}

namespace {

// [lo, hi) of the buckets that values in [mn, mx] can fall in (bucket order is value order).
// Anything that is not a finite bound (NaN from a merge, no finite value) widens to the whole row.
void hinted_span(double mn, double mx, const HistLayout& l, int64_t* lo, int64_t* hi) {
  const int64_t per_sign = l.per_sign(), bins = l.bins();
  *lo = 0;
  *hi = bins;
  if (!(std::isfinite(mn) && std::isfinite(mx) && mn <= mx)) return;
  // A minimum of magnitude below 2^emin (zero, underflow) leaves no negative value in a bucket;
  // a maximum there, no positive one.
  const int32_t a = row_index(mn, l);
  if (a >= kHeader) {
    *lo = a - kHeader;
  } else if (a == kZeros || a == kUnderPos || a == kUnderNeg) {
    *lo = per_sign;
  } else if (a == kOverPos) {
    *lo = bins;  // every finite value overflows: no bucket
  }
  const int32_t b = row_index(mx, l);
  if (b >= kHeader) {
    *hi = b - kHeader + 1;
  } else if (b == kZeros || b == kUnderPos || b == kUnderNeg) {
    *hi = per_sign;
  } else if (b == kOverNeg) {
    *hi = 0;
  }
  if (*hi < *lo) *hi = *lo;
}

}  // namespace

int64_t compact_bounds(const int64_t* counts, const double* moments, int64_t width,
                       const int64_t* rows, int64_t begin, int64_t m, const HistLayout* hint,
                       int32_t* first, int64_t* offsets) {
  const int64_t bins = width - kHeader;
  for (int64_t i = begin; i < m; ++i) {
    const int64_t* row = counts + rows[i] * width;
    const int64_t* h = row + kHeader;
    int64_t lo = 0, end = bins;
    if (hint != nullptr) {
      if (histogram_total(row) == 0) {
        end = 0;
      } else {
        const double* mo = moments + rows[i] * kNumMoments;
        hinted_span(mo[kMin], mo[kMax], *hint, &lo, &end);
      }
    }
    // Scan inwards from both ends, 8 buckets at a time: only the zeros outside the span and
    // the span's end blocks are read (with a hint, usually none).
    while (lo + 8 <= end && (h[lo] | h[lo + 1] | h[lo + 2] | h[lo + 3] | h[lo + 4] | h[lo + 5] |
                             h[lo + 6] | h[lo + 7]) == 0)
      lo += 8;
    while (lo < end && h[lo] == 0) ++lo;
    int64_t len = 0;
    if (lo < end) {
      int64_t hi = end;  // one past the last non-zero
      while (hi - 8 > lo && (h[hi - 1] | h[hi - 2] | h[hi - 3] | h[hi - 4] | h[hi - 5] | h[hi - 6] |
                             h[hi - 7] | h[hi - 8]) == 0)
        hi -= 8;
      while (h[hi - 1] == 0) --hi;
      len = hi - lo;
    } else {
      lo = 0;
    }
    first[i] = static_cast<int32_t>(lo);
    offsets[i + 1] = offsets[i] + len;
  }
  return offsets[m];
}

namespace {

struct SpanCopy {
  int64_t big, sum, nonzero;
};

// v[j] = h[j] narrowed to uint32, with the OR of every bit above the low 32 (or a negative count),
// the sum and the number of non-zero buckets. Built for x86-64-v4/v3 and a baseline: the
// writer's per-bucket loop.
DNNTRACE_CLONES SpanCopy copy_span(const int64_t* __restrict__ h, int64_t len,
                                   uint32_t* __restrict__ v) {
  constexpr int64_t kHigh = ~static_cast<int64_t>(std::numeric_limits<uint32_t>::max());
  int64_t big = 0, sum = 0, nz = 0;
  for (int64_t j = 0; j < len; ++j) {
    big |= h[j] & kHigh;
    nz += h[j] != 0;
    sum += h[j];
    v[j] = static_cast<uint32_t>(h[j]);
  }
  return {big, sum, nz};
}

}  // namespace

CopyResult compact_copy(int64_t* counts, double* moments, int64_t width, const int64_t* rows,
                        int64_t begin, int64_t m, const int32_t* first, const int64_t* offsets,
                        int64_t* header, double* moments_out, uint32_t* values, bool reset,
                        bool check_total, int64_t* nonzero) {
  int64_t nz = 0;
  for (int64_t i = begin; i < m; ++i) {
    int64_t* row = counts + rows[i] * width;
    double* mo = moments + rows[i] * kNumMoments;
    int64_t* h = row + kHeader + first[i];
    uint32_t* v = values + offsets[i];
    const int64_t len = offsets[i + 1] - offsets[i];
    const SpanCopy c = copy_span(h, len, v);
    const int64_t big = c.big, sum = c.sum, row_nz = c.nonzero;
    if (big != 0) {
      *nonzero += nz;
      return {CopyStatus::kOverflow, i};
    }
    if (check_total && sum != histogram_total(row)) {
      *nonzero += nz;
      return {CopyStatus::kSpanShort, i};
    }
    nz += row_nz;
    std::memcpy(header + i * kHeader, row, kHeader * sizeof(int64_t));
    std::memcpy(moments_out + i * kNumMoments, mo, kNumMoments * sizeof(double));
    if (reset) {  // while the row is in cache; buckets outside the span are already zero
      std::fill(row, row + kHeader, int64_t{0});
      std::fill(h, h + len, int64_t{0});
      std::fill(mo, mo + kNumMoments, 0.0);
      mo[kMin] = std::numeric_limits<double>::infinity();
      mo[kMax] = -std::numeric_limits<double>::infinity();
    }
  }
  *nonzero += nz;
  return {CopyStatus::kOk, m};
}

namespace {

// torch.amin/amax semantics: NaN wins.
double min_nan(double a, double b) { return std::isnan(a) || std::isnan(b) ? NAN : std::min(a, b); }
double max_nan(double a, double b) { return std::isnan(a) || std::isnan(b) ? NAN : std::max(a, b); }

}  // namespace

void merge_rows(int64_t* counts, double* moments, int64_t width, const int64_t* src,
                const int64_t* dst, int64_t m) {
  // Every source is read before any destination changes: a source may also be a destination.
  std::vector<int64_t> c(static_cast<size_t>(m * width));
  std::vector<double> mo(static_cast<size_t>(m * kNumMoments));
  for (int64_t i = 0; i < m; ++i) {
    std::memcpy(&c[i * width], counts + src[i] * width, width * sizeof(int64_t));
    std::memcpy(&mo[i * kNumMoments], moments + src[i] * kNumMoments, kNumMoments * sizeof(double));
  }
  for (int64_t i = 0; i < m; ++i) {  // in order, as index_add_ adds repeated destinations
    int64_t* d = counts + dst[i] * width;
    const int64_t* s = &c[i * width];
    for (int64_t j = 0; j < width; ++j) d[j] += s[j];
    double* dm = moments + dst[i] * kNumMoments;
    const double* sm = &mo[i * kNumMoments];
    for (int j = 0; j < kNumMoments; ++j) {
      if (j == kMin) {
        dm[j] = min_nan(dm[j], sm[j]);
      } else if (j == kMax) {
        dm[j] = max_nan(dm[j], sm[j]);
      } else {
        dm[j] += sm[j];
      }
    }
  }
}

}  // namespace dnntrace::core
