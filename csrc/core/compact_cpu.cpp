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

// How far ahead of the read copy_nonzero prefetches, in buckets (1.5 KB): the bank is cold
// when the writer compacts it (the training thread filled it a step ago) and each row's span is
// a short stream that the hardware prefetcher picks up late. Cold, 59 rows of the bench
// transformer's weights and gradients: 191 -> 158-179 us (bench/NOTES.md, eighth session).
constexpr int64_t kPrefetchAhead = 192;

struct SpanCopy {
  int64_t big, sum, nonzero;
};

// The non-zero buckets of h[0, len) as (first + j, h[j] narrowed to uint32) pairs written to
// idx/v, with the OR of every bit above the low 32 (or a negative count) and the sum. Blocks of 8
// zeros are skipped; inside a block the pair is stored unconditionally and the cursor advances by
// (h[j] != 0), so no branch depends on the data (idx/v need room for len pairs). Built for
// x86-64-v4/v3 and a baseline: the writer's per-bucket loop.
DNNTRACE_CLONES SpanCopy copy_nonzero(const int64_t* __restrict__ h, int64_t len, int32_t first,
                                      uint16_t* __restrict__ idx, uint32_t* __restrict__ v) {
  constexpr int64_t kHigh = ~static_cast<int64_t>(std::numeric_limits<uint32_t>::max());
  int64_t big = 0, sum = 0, n = 0, j = 0;
  for (; j + 8 <= len; j += 8) {
    const int64_t* b = h + j;
    __builtin_prefetch(b + kPrefetchAhead);
    if ((b[0] | b[1] | b[2] | b[3] | b[4] | b[5] | b[6] | b[7]) == 0) continue;
    for (int t = 0; t < 8; ++t) {
      const int64_t c = b[t];
      big |= c & kHigh;
      sum += c;
      idx[n] = static_cast<uint16_t>(first + j + t);
      v[n] = static_cast<uint32_t>(c);
      n += c != 0;
    }
  }
  for (; j < len; ++j) {
    const int64_t c = h[j];
    big |= c & kHigh;
    sum += c;
    idx[n] = static_cast<uint16_t>(first + j);
    v[n] = static_cast<uint32_t>(c);
    n += c != 0;
  }
  return {big, sum, n};
}

}  // namespace

CopyResult compact_copy(int64_t* counts, double* moments, int64_t width, const int64_t* rows,
                        int64_t begin, int64_t m, const int32_t* first, const int64_t* offsets,
                        int64_t* header, double* moments_out, uint16_t* index, uint32_t* values,
                        int64_t* pairs, bool reset, bool check_total, const GapHint* gap,
                        int64_t* scanned) {
  for (int64_t i = begin; i < m; ++i) {
    int64_t* row = counts + rows[i] * width;
    double* mo = moments + rows[i] * kNumMoments;
    int64_t* hist = row + kHeader;
    const int64_t f = first[i], len = offsets[i + 1] - offsets[i];
    if (i + 1 < m) {  // the next row's span starts cold: ask for its first lines now
      const int64_t* next = counts + rows[i + 1] * width + kHeader + first[i + 1];
      for (int l = 0; l < 4; ++l) __builtin_prefetch(next + 8 * l);
    }
    uint16_t* idx = index + pairs[i];
    uint32_t* val = values + pairs[i];
    const int64_t total = check_total ? histogram_total(row) : 0;
    int32_t* inner = nullptr;
    if (gap != nullptr && check_total && rows[i] < gap->slots) inner = gap->inner + 2 * rows[i];
    SpanCopy c{0, 0, 0};
    bool done = false;
    if (inner != nullptr && inner[0] >= 0 && inner[1] >= 0 && len > 0) {
      const int64_t s0 = std::max<int64_t>(f, int64_t{inner[0]} + gap->margin);
      const int64_t s1 = std::min<int64_t>(f + len, int64_t{inner[1]} - gap->margin);
      if (s1 > s0) {  // read [f, s0) and [s1, f + len)
        const SpanCopy a = copy_nonzero(hist + f, s0 - f, static_cast<int32_t>(f), idx, val);
        const SpanCopy b = copy_nonzero(hist + s1, f + len - s1, static_cast<int32_t>(s1),
                                        idx + a.nonzero, val + a.nonzero);
        c = {a.big | b.big, a.sum + b.sum, a.nonzero + b.nonzero};
        *scanned += len - (s1 - s0);
        done = c.sum == total;  // else values in the skipped buckets: read the whole span
      }
    }
    if (!done) {
      c = copy_nonzero(hist + f, len, static_cast<int32_t>(f), idx, val);
      *scanned += len;
    }
    if (c.big != 0) return {CopyStatus::kOverflow, i};
    if (check_total && c.sum != total) return {CopyStatus::kSpanShort, i};
    pairs[i + 1] = pairs[i] + c.nonzero;
    if (inner != nullptr) {
      if (c.nonzero == 0) {
        inner[0] = inner[1] = -1;
      } else {
        const uint16_t* pos = std::lower_bound(idx, idx + c.nonzero, gap->per_sign);
        inner[0] = pos == idx ? 0 : int32_t{pos[-1]} + 1;
        inner[1] = pos == idx + c.nonzero ? 2 * gap->per_sign : int32_t{*pos};
      }
    }
    std::memcpy(header + i * kHeader, row, kHeader * sizeof(int64_t));
    std::memcpy(moments_out + i * kNumMoments, mo, kNumMoments * sizeof(double));
    if (reset) {  // while the row is in cache; only the non-zero buckets need zeroing
      for (int64_t p = 0; p < c.nonzero; ++p) hist[idx[p]] = 0;
      std::fill(row, row + kHeader, int64_t{0});
      std::fill(mo, mo + kNumMoments, 0.0);
      mo[kMin] = std::numeric_limits<double>::infinity();
      mo[kMax] = -std::numeric_limits<double>::infinity();
    }
  }
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
