// Compaction of stat-bank rows for the writer: a row's header and moments plus its non-zero
// histogram buckets as (bucket index, count) pairs (the `hist_bucket`/`hist` lists of the trace
// format, version 2), counts narrowed to uint32. Torch-free, raw pointers.
#pragma once

#include <cstdint>

#include "loglinear.h"

namespace dnntrace::core {

// Pass 1: for each row `rows[i]`, i in [begin, m), of `counts` (row length `width`, histogram
// from kHeader), the first non-zero bucket (`first[i]`, 0 for an empty histogram) and the running
// span offsets (`offsets[i+1] - offsets[i]` = length of the span from the first to the last
// non-zero bucket; `offsets[begin]` is given). Returns `offsets[m]`: pass 2 writes at most that
// many pairs.
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

// Where a row's data was at its last compaction, to skip the buckets between its negative and
// its positive values next time: for bank row r, inner[2r] is one past its last non-zero
// negative bucket (0 without one) and inner[2r+1] its first non-zero positive bucket (`bins`
// without one); -1 when unknown. A weight's or a gradient's span runs from its most negative to
// its most positive value through the empty buckets of every magnitude below its smallest one
// (about half of the span); those move little from step to step. The prediction only decides
// what is read: a row whose scan misses values (the sum of its buckets is below its header's
// histogram total) is read again in full, so a wrong prediction costs a read, never a bucket.
struct GapHint {
  int32_t* inner;    // [slots, 2], updated by compact_copy
  int64_t slots;     // rows of `inner` (bank rows beyond it get no prediction)
  int32_t per_sign;  // buckets per sign: negative buckets are [0, per_sign)
  int32_t margin;    // buckets read on each side of the predicted gap, beyond the last data
};

// Pass 2: for rows [begin, m), copies each row's header (kHeader int64) to `header`, moments
// (kNumMoments doubles) to `moments_out`, and the non-zero buckets of its span (from pass 1) as
// ascending (bucket index, count) pairs to `index`/`values` from `pairs[i]` on, setting
// `pairs[i+1]` (`pairs[begin]` is given; the arrays need room for `pairs[begin]` plus the spans'
// total length). When `reset` is set each row is cleared as a fresh bank's (zero counts,
// +inf/-inf min/max) right after it is copied; only its non-zero buckets need zeroing. Stops,
// leaving that row and the later ones as they are, at the first row with a bucket above
// 2^32 - 1 (kOverflow) or, with `check_total` (hinted spans), whose span does not hold the
// values its header says (kSpanShort: the caller rescans from that row). With `gap` (only with
// `check_total`), a row skips its predicted gap (GapHint) and is read in full when that missed
// values. Adds the buckets read to `*scanned`.
CopyResult compact_copy(int64_t* counts, double* moments, int64_t width, const int64_t* rows,
                        int64_t begin, int64_t m, const int32_t* first, const int64_t* offsets,
                        int64_t* header, double* moments_out, uint16_t* index, uint32_t* values,
                        int64_t* pairs, bool reset, bool check_total, const GapHint* gap,
                        int64_t* scanned);

// Adds the state of row src[i] into row dst[i] for every i (counts and sums added, min/max
// combined), as if the tensors summarised in src[i] had also been summarised in dst[i]. Sources
// are read before any row changes, destinations are updated in order: the same bits as the
// index_select / index_add_ / scatter_reduce ops StatBank.merge_rows runs on a device.
void merge_rows(int64_t* counts, double* moments, int64_t width, const int64_t* src,
                const int64_t* dst, int64_t m);

}  // namespace dnntrace::core
