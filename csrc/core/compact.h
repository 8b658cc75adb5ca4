// Compaction of stat-bank rows for the writer: a row's header and moments plus the one contiguous
// span of its histogram that holds every non-zero bucket (the span of `hist_offset`/`hist` in the
// trace format), counts narrowed to uint32. Torch-free, raw pointers.
#pragma once

#include <cstdint>

#include "loglinear.h"

namespace dnntrace::core {

// Pass 1: for each row `rows[i]`, i in [begin, m), of `counts` (row length `width`, histogram
// from kHeader), the first non-zero bucket (`first[i]`, 0 for an empty histogram) and the running
// span offsets (`offsets[i+1] - offsets[i]` = span length; `offsets[begin]` is given). Returns
// `offsets[m]`.
//
// With `hint` (the bank's layout), a row is not scanned for its span: a histogram holds
// count - (NaN + Inf + zeros + underflow + overflow) values, so a row whose header says none is
// empty; otherwise its non-zero buckets lie between the buckets of its finite min and max
// (the row's bucket order is value order), read from `moments`. compact_copy checks that the span
// holds all of the row's histogram values and reports the first row where it does not, so a hint
// can cost a rescan but never a bucket. Without a hint, the zeros outside the span are read.
int64_t compact_bounds(const int64_t* counts, const double* moments, int64_t width,
                       const int64_t* rows, int64_t begin, int64_t m, const HistLayout* hint,
                       int32_t* first, int64_t* offsets);

// The values a row's histogram buckets hold by its header: count minus NaN, +/-Inf, zeros,
// underflow and overflow.
int64_t histogram_total(const int64_t* row);

enum class CopyStatus { kOk, kOverflow, kSpanShort };

struct CopyResult {
  CopyStatus status;
  int64_t row;  // the first row not done (m when kOk)
};

// Pass 2: for rows [begin, m), copies each row's header (kHeader int64) to `header`, moments
// (kNumMoments doubles) to `moments_out` and its span to `values` (at `offsets[i]`), and adds the
// non-zero buckets to `*nonzero`. When `reset` is set each row is cleared as a fresh bank's (zero
// counts, +inf/-inf min/max) right after it is copied; only the span needs zeroing since buckets
// outside it are zero. Stops, leaving that row and the later ones as they are, at the first row
// with a bucket above 2^32 - 1 (kOverflow) or, with `check_total` (hinted spans), whose span
// does not hold the values its header says (kSpanShort: the caller rescans from that row).
CopyResult compact_copy(int64_t* counts, double* moments, int64_t width, const int64_t* rows,
                        int64_t begin, int64_t m, const int32_t* first, const int64_t* offsets,
                        int64_t* header, double* moments_out, uint32_t* values, bool reset,
                        bool check_total, int64_t* nonzero);

// Adds the state of row src[i] into row dst[i] for every i (counts and sums added, min/max
// combined), as if the tensors summarised in src[i] had also been summarised in dst[i]. Sources
// are read before any row changes, destinations are updated in order: the same bits as the
// index_select / index_add_ / scatter_reduce ops StatBank.merge_rows runs on a device.
void merge_rows(int64_t* counts, double* moments, int64_t width, const int64_t* src,
                const int64_t* dst, int64_t m);

}  // namespace dnntrace::core
