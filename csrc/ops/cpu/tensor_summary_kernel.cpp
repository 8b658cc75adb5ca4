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
constexpr int64_t kSerialMax = 2 * kChunkBlocks * kBlock;

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

void summarize_span(Src src, const void* data, int64_t n, const HistLayout& l, bool histogram,
                    int64_t* counts, double* moments) {
  counts[core::kCalls] += 1;
  if (n == 0) return;
  if (n <= kSerialMax) return summarize_direct(src, data, n, l, histogram, counts, moments);
  // Large inputs: chunks in parallel. fp32/fp16/bf16 scatter raw ids (bits >> (23 - k)) into a
  // per-thread table of 4 interleaved 32-bit counters per id; fp64 scatters full row indices.
  const bool raw = histogram && src != Src::kF64;
  const int width = l.width();
  const size_t table_ids = raw ? core::raw_id_count(l.k) : (histogram ? width : 0);
  const int64_t chunk = kChunkBlocks * kBlock;
  const int64_t nchunks = (n + chunk - 1) / chunk;
  const int64_t elem_size = src == Src::kF64 ? 8 : (src == Src::kF32 ? 4 : 2);
  std::vector<BlockAcc> accs(nchunks);
  std::mutex mu;
  at::parallel_for(0, nchunks, 1, [&](int64_t c0, int64_t c1) {
    std::vector<uint32_t> table(4 * table_ids, 0u);
    std::vector<int64_t> local(histogram ? width : 0, 0);
    int32_t idx[kBlock];
    float fbuf[kBlock];
    int64_t since_fold = 0;
    auto fold_table = [&] {
      if (raw) {
        core::fold_raw_table(table.data(), 4, l, local.data());
      } else {
        for (size_t b = 0; b < table_ids; ++b) {
          const uint32_t* t = &table[4 * b];
          local[b] += static_cast<int64_t>(t[0]) + t[1] + t[2] + t[3];
        }
      }
      std::fill(table.begin(), table.end(), 0u);
      since_fold = 0;
    };
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
        if (raw) {
          const float* f = src == Src::kF32 ? static_cast<const float*>(data) + off : fbuf;
          if (src == Src::kF16)
            core::half_to_float(static_cast<const uint16_t*>(data) + off, m, fbuf);
          if (src == Src::kBF16)
            core::bf16_to_float(static_cast<const uint16_t*>(data) + off, m, fbuf);
          core::f32_block_moments(f, m, accs[c]);
          core::f32_block_scatter_raw(f, m, l.k, table.data());
        } else {
          process_block(src, data, off, m, l, accs[c], histogram ? idx : nullptr, fbuf);
        }
        if (histogram && !raw) {
          uint32_t* t = table.data();
          int i = 0;
          for (; i + 4 <= m; i += 4) {
            t[4 * static_cast<uint32_t>(idx[i]) + 0] += 1;
            t[4 * static_cast<uint32_t>(idx[i + 1]) + 1] += 1;
            t[4 * static_cast<uint32_t>(idx[i + 2]) + 2] += 1;
            t[4 * static_cast<uint32_t>(idx[i + 3]) + 3] += 1;
          }
          for (; i < m; ++i) t[4 * static_cast<uint32_t>(idx[i])] += 1;
        }
      }
      since_fold += end - c * chunk;
      if (histogram && since_fold >= (int64_t{1} << 31)) fold_table();  // 32-bit counters
    }
    if (!histogram) return;
    fold_table();
    std::lock_guard<std::mutex> lock(mu);
    for (int b = 0; b < width; ++b) counts[b] += local[b];
  });
  BlockAcc total;
  for (const auto& a : accs) total.merge(a);
  apply(total, n, !histogram ? Specials::kFromAcc : (raw ? Specials::kRawTable : Specials::kInRow),
        counts, moments);
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
  for (size_t i = 0; i < xs.size(); ++i) {
    TORCH_CHECK(xs[i].device() == counts.device(), "dnntrace: tensor ", i, " on ", xs[i].device(),
                " but state on ", counts.device());
    summarize_into(xs[i], slots[i], l, histogram, counts, moments);
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(dnntrace, CPU, m) {
  m.impl("tensor_summary_out", TORCH_FN(tensor_summary_out_kernel));
  m.impl("multi_tensor_summary_out", TORCH_FN(multi_tensor_summary_out_kernel));
}

}  // namespace dnntrace::ops
