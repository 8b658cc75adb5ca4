// CPU kernel of the fused summary: one read of the data, blocks of 1024 values made into fp32 (or
// kept fp64), moments by vectorised lane loops, histogram by scatter into four interleaved
// 32-bit sub-histograms per thread (breaking store-to-load chains when values repeat, as the
// zeros of ReLU outputs do). Deterministic: chunk boundaries do not depend on the thread count,
// float partials are folded in chunk order, integers are order-free.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <algorithm>
#include <mutex>
#include <vector>

#include "../../core/loglinear.h"
#include "../../core/summary_cpu.h"
#include "../summary_checks.h"

namespace dnntrace::ops {
namespace {

using core::BlockAcc;
using core::HistLayout;
using core::kBlock;

constexpr int64_t kChunkBlocks = 64;  // 64 Ki elements per chunk
constexpr int64_t kDirectMax = 4096;  // below this the full mapping straight into the row wins

enum class Src { kF32, kF64, kF16, kBF16 };

Src source_of(at::ScalarType t) {
  switch (t) {
    case at::kFloat:
      return Src::kF32;
    case at::kDouble:
      return Src::kF64;
    case at::kHalf:
      return Src::kF16;
    case at::kBFloat16:
      return Src::kBF16;
    default:
      TORCH_CHECK(false, "dnntrace: unsupported dtype ", t,
                  " (float32, float64, float16 and bfloat16 are)");
  }
}

// Moments (always) and row indices (when idx != nullptr) of block [off, off + n).
void process_block(Src src, const void* data, int64_t off, int n, const HistLayout& l,
                   BlockAcc& acc, int32_t* idx, float* fbuf) {
  switch (src) {
    case Src::kF64: {
      const double* p = static_cast<const double*>(data) + off;
      core::f64_block_moments(p, n, acc);
      if (idx) core::f64_block_indices(p, n, l, idx);
      return;
    }
    case Src::kF32: {
      const float* p = static_cast<const float*>(data) + off;
      core::f32_block_moments(p, n, acc);
      if (idx) core::f32_block_indices(p, n, l, idx);
      return;
    }
    case Src::kF16:
      core::half_to_float(static_cast<const uint16_t*>(data) + off, n, fbuf);
      break;
    case Src::kBF16:
      core::bf16_to_float(static_cast<const uint16_t*>(data) + off, n, fbuf);
      break;
  }
  core::f32_block_moments(fbuf, n, acc);
  if (idx) core::f32_block_indices(fbuf, n, l, idx);
}

void fold(double& hi, double& lo, double v) {
  double s, e;
  core::two_sum(hi, v, s, e);
  hi = s;
  lo += e;
}

// Where the special counts of a span come from.
enum class Specials {
  kInRow,     // the full-mapping scatter already put NaN/Inf/zeros/under/overflow into the row
  kFromAcc,   // moments-only mode: NaN/Inf/zeros from the moments pass
  kRawTable,  // raw-id table: NaN/Inf/zeros from the moments pass, zeros moved out of underflow
};

void apply(const BlockAcc& a, int64_t n, Specials sp, int64_t* counts, double* moments) {
  counts[core::kCount] += n;
  counts[core::kNegatives] += a.negatives;
  if (sp != Specials::kInRow) {
    counts[core::kNan] += a.nan;
    counts[core::kPosInf] += a.posinf;
    counts[core::kNegInf] += a.neginf;
    counts[core::kZeros] += a.zeros;
  }
  if (sp == Specials::kRawTable) {
    counts[core::kUnderPos] -= a.zeros - a.neg_zeros;
    counts[core::kUnderNeg] -= a.neg_zeros;
  }
  fold(moments[core::kSum], moments[core::kSumComp], a.sum);
  moments[core::kSumComp] += a.sum_c;
  fold(moments[core::kSumSq], moments[core::kSumSqComp], a.sq);
  moments[core::kSumSqComp] += a.sq_c;
  moments[core::kMin] = std::min(moments[core::kMin], a.mn);
  moments[core::kMax] = std::max(moments[core::kMax], a.mx);
}

// Small inputs, fp64 inputs: the full mapping, scattered straight into the int64 row.
void summarize_direct(Src src, const void* data, int64_t n, const HistLayout& l, bool histogram,
                      int64_t* counts, double* moments) {
  BlockAcc acc;
  int32_t idx[kBlock];
  float fbuf[kBlock];
  for (int64_t off = 0; off < n; off += kBlock) {
    const int m = static_cast<int>(std::min<int64_t>(kBlock, n - off));
    process_block(src, data, off, m, l, acc, histogram ? idx : nullptr, fbuf);
    if (histogram)
      for (int i = 0; i < m; ++i) counts[idx[i]] += 1;
  }
  apply(acc, n, histogram ? Specials::kInRow : Specials::kFromAcc, counts, moments);
}

// A thread's raw-id table: 2^(9+k) ids x 4 interleaved 32-bit counters, allocated once per
// thread and kept zeroed between calls (folding zeroes what it reads), so a call pays only for
// the ids its values can have touched, not for the whole table.
std::vector<uint32_t>& thread_table() {
  thread_local std::vector<uint32_t> table(4 * static_cast<size_t>(core::raw_id_count(7)), 0u);
  return table;
}

// Folds the ids that values in [acc.mn, acc.mx] with |x| >= acc.min_abs (and zeros, subnormals,
// NaN, Inf) can have touched.
void fold_touched(std::vector<uint32_t>& table, const BlockAcc& acc, const HistLayout& l,
                  int64_t* counts) {
  const int k = l.k;
  const int sign = 1 << (8 + k);
  const int exp0 = (1 << k) - 1;  // ids of exponent 0: zeros and subnormals
  core::fold_raw_range(table.data(), 4, 0, exp0, l, counts);
  core::fold_raw_range(table.data(), 4, sign, sign + exp0, l, counts);
  if (acc.nan || acc.posinf || acc.neginf) {  // exponent 255, both signs
    core::fold_raw_range(table.data(), 4, 255 << k, (256 << k) - 1, l, counts);
    core::fold_raw_range(table.data(), 4, sign + (255 << k), sign + (256 << k) - 1, l, counts);
  }
  if (acc.min_abs == __builtin_huge_val()) return;  // no finite non-zero value
  const int lo = core::raw_id_of(static_cast<float>(acc.min_abs), k);
  if (acc.mx > 0) core::fold_raw_range(table.data(), 4, lo, core::raw_id_of(acc.mx, k), l, counts);
  if (acc.mn < 0)
    core::fold_raw_range(table.data(), 4, sign + lo, core::raw_id_of(acc.mn, k), l, counts);
}

// Processes chunks [c0, c1) of a span: moments into accs[c], raw ids into this thread's table,
// folded into `counts` under `mu` at the end.
void raw_worker(Src src, const void* data, int64_t n, int64_t c0, int64_t c1, const HistLayout& l,
                std::vector<BlockAcc>& accs, int64_t* counts, std::mutex& mu) {
  const int64_t chunk = kChunkBlocks * kBlock;
  const int64_t elem_size = src == Src::kF32 ? 4 : 2;
  auto& table = thread_table();
  float fbuf[kBlock];
  BlockAcc seen;  // what this thread touched, for the fold
  int64_t since_fold = 0;
  for (int64_t c = c0; c < c1; ++c) {
    const int64_t end = std::min(n, (c + 1) * chunk);
    for (int64_t off = c * chunk; off < end; off += kBlock) {
      const int m = static_cast<int>(std::min<int64_t>(kBlock, end - off));
      // The scatter is compute-bound and the moments pass waits on memory: prefetching the
      // block after next overlaps the two (measured 0.80 -> 0.62 ns/element on one core).
      if (off + 2 * kBlock < end) {
        const char* next = static_cast<const char*>(data) + (off + 2 * kBlock) * elem_size;
        for (int64_t b = 0; b < kBlock * elem_size; b += 64) __builtin_prefetch(next + b);
      }
      const float* f = src == Src::kF32 ? static_cast<const float*>(data) + off : fbuf;
      if (src == Src::kF16) core::half_to_float(static_cast<const uint16_t*>(data) + off, m, fbuf);
      if (src == Src::kBF16) core::bf16_to_float(static_cast<const uint16_t*>(data) + off, m, fbuf);
      core::f32_block_fused(f, m, l.k, table.data(), accs[c]);
    }
    seen.merge(accs[c]);
    since_fold += end - c * chunk;
    if (since_fold >= (int64_t{1} << 31)) {  // 32-bit counters: fold before they can overflow
      std::lock_guard<std::mutex> lock(mu);
      fold_touched(table, seen, l, counts);
      seen = BlockAcc();
      since_fold = 0;
    }
  }
  std::lock_guard<std::mutex> lock(mu);
  fold_touched(table, seen, l, counts);
}

void summarize_span(Src src, const void* data, int64_t n, const HistLayout& l, bool histogram,
                    int64_t* counts, double* moments) {
  counts[core::kCalls] += 1;
  if (n == 0) return;
  const int64_t chunk = kChunkBlocks * kBlock;
  const int64_t nchunks = (n + chunk - 1) / chunk;
  if (n <= kDirectMax || src == Src::kF64 || (!histogram && nchunks == 1))
    return summarize_direct(src, data, n, l, histogram, counts, moments);
  std::vector<BlockAcc> accs(nchunks);
  std::mutex mu;
  if (!histogram) {  // moments only, in parallel
    at::parallel_for(0, nchunks, 1, [&](int64_t c0, int64_t c1) {
      float fbuf[kBlock];
      for (int64_t c = c0; c < c1; ++c) {
        const int64_t end = std::min(n, (c + 1) * chunk);
        for (int64_t off = c * chunk; off < end; off += kBlock) {
          const int m = static_cast<int>(std::min<int64_t>(kBlock, end - off));
          process_block(src, data, off, m, l, accs[c], nullptr, fbuf);
        }
      }
    });
  } else if (nchunks == 1) {
    raw_worker(src, data, n, 0, 1, l, accs, counts, mu);
  } else {
    at::parallel_for(0, nchunks, 1, [&](int64_t c0, int64_t c1) {
      raw_worker(src, data, n, c0, c1, l, accs, counts, mu);
    });
  }
  BlockAcc total;
  for (const auto& a : accs) total.merge(a);
  apply(total, n, histogram ? Specials::kRawTable : Specials::kFromAcc, counts, moments);
}

void summarize_into(const at::Tensor& x_in, int64_t slot, const HistLayout& l, bool histogram,
                    at::Tensor& counts, at::Tensor& moments) {
  check_input(x_in, slot, counts);
  const at::Tensor x = dense_view_or_copy(x_in);
  summarize_span(source_of(x.scalar_type()), x.data_ptr(), x.numel(), l, histogram,
                 counts.data_ptr<int64_t>() + slot * counts.size(1),
                 moments.data_ptr<double>() + slot * moments.size(1));
}

void tensor_summary_out_kernel(const at::Tensor& x, int64_t slot, int64_t k, int64_t emin,
                               int64_t octaves, bool histogram, at::Tensor& counts,
                               at::Tensor& moments) {
  const auto l = checked_layout(k, emin, octaves);
  check_state(counts, moments, l, x.device());
  summarize_into(x, slot, l, histogram, counts, moments);
}

void multi_tensor_summary_out_kernel(at::TensorList xs, at::IntArrayRef slots, int64_t k,
                                     int64_t emin, int64_t octaves, bool histogram,
                                     at::Tensor& counts, at::Tensor& moments) {
  TORCH_CHECK(xs.size() == slots.size(), "dnntrace: ", xs.size(), " tensors but ", slots.size(),
              " slots");
  const auto l = checked_layout(k, emin, octaves);
  check_state(counts, moments, l, counts.device());
  // Every member is checked before anything is added, so a bad call leaves the state untouched.
  for (size_t i = 0; i < xs.size(); ++i) {
    TORCH_CHECK(xs[i].device() == counts.device(), "dnntrace: tensor ", i, " on ", xs[i].device(),
                " but state on ", counts.device());
    check_input(xs[i], slots[i], counts);
  }
  for (size_t i = 0; i < xs.size(); ++i)
    summarize_into(xs[i], slots[i], l, histogram, counts, moments);
}

}  // namespace

TORCH_LIBRARY_IMPL(dnntrace, CPU, m) {
  m.impl("tensor_summary_out", TORCH_FN(tensor_summary_out_kernel));
  m.impl("multi_tensor_summary_out", TORCH_FN(multi_tensor_summary_out_kernel));
}

}  // namespace dnntrace::ops
