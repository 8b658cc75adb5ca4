// Compaction of stat-bank rows for the writer: a row's header and moments plus the one contiguous
// span of its histogram that holds every non-zero bucket (the span of `hist_offset`/`hist` in the
// trace format), counts narrowed to uint32. Torch-free, raw pointers.
#pragma once

#include <cstdint>

namespace dnntrace::core {

// Pass 1: for each of the `m` rows `rows[i]` of `counts` (row length `width`, histogram from
// kHeader), the first non-zero bucket (`first[i]`, 0 for an empty histogram) and the running
// span offsets `offsets[0..m]` (`offsets[i+1] - offsets[i]` = span length). Returns the total.
int64_t compact_bounds(const int64_t* counts, int64_t width, const int64_t* rows, int64_t m,
                       int32_t* first, int64_t* offsets);

// Pass 2: copies each row's header (kHeader int64) to `header`, moments (kNumMoments doubles) to
// `moments_out` and its span to `values` (at `offsets[i]`), and counts the non-zero buckets into
// `*nonzero`. When `reset` is set each row is cleared as a fresh bank's (zero counts, +inf/-inf
// min/max) right after it is copied; only the span needs zeroing since buckets outside it are
// zero. Returns false at the first row with a bucket above 2^32 - 1 (that row and the later ones
// are left as they are).
bool compact_copy(int64_t* counts, double* moments, int64_t width, const int64_t* rows, int64_t m,
                  const int32_t* first, const int64_t* offsets, int64_t* header,
                  double* moments_out, uint32_t* values, bool reset, int64_t* nonzero);

// Adds the state of row src[i] into row dst[i] for every i (counts and sums added, min/max
// combined), as if the tensors summarised in src[i] had also been summarised in dst[i]. Sources
// are read before any row changes, destinations are updated in order: the same bits as the
// index_select / index_add_ / scatter_reduce ops StatBank.merge_rows runs on a device.
void merge_rows(int64_t* counts, double* moments, int64_t width, const int64_t* src,
                const int64_t* dst, int64_t m);

}  // namespace dnntrace::core
