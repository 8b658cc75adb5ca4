// CPU kernel of the fused summary: one read of the data in blocks of 1024 values (fp16/bf16
// widened to fp32 in registers, fp64 kept), moments in vector lanes, histogram by raw id into
// four interleaved 16-bit sub-counters per id and thread (breaking store-to-load chains when
// values repeat, as the zeros of ReLU outputs do), folded into 32-bit counters before they can
// overflow and into the row once per thread (csrc/core/summary_cpu.h). Deterministic: chunk
// boundaries do not depend on the thread count, float partials are folded in chunk order,
// integers are order-free.
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

core::Elem elem_of(Src src) {
  return src == Src::kF32 ? core::Elem::kF32
                          : (src == Src::kF16 ? core::Elem::kF16 : core::Elem::kBF16);
}

size_t elem_size(Src src) { return src == Src::kF64 ? 8 : (src == Src::kF32 ? 4 : 2); }

// Moments (always) and row indices (when idx != nullptr) of block [off, off + n).
void process_block(Src src, const void* data, int64_t off, int n, const HistLayout& l,
                   BlockAcc& acc, int32_t* idx, float* fbuf) {
  if (src == Src::kF64) {
    const double* p = static_cast<const double*>(data) + off;
    core::f64_block_moments(p, n, acc);
    if (idx) core::f64_block_indices(p, n, l, idx);
    return;
  }
  const void* p = static_cast<const char*>(data) + off * elem_size(src);
  core::block_fused(elem_of(src), p, n, l.k, nullptr, acc);
  if (!idx) return;
  const float* f = static_cast<const float*>(p);
  if (src == Src::kF16) core::half_to_float(static_cast<const uint16_t*>(p), n, fbuf);
  if (src == Src::kBF16) core::bf16_to_float(static_cast<const uint16_t*>(p), n, fbuf);
  if (src != Src::kF32) f = fbuf;
  core::f32_block_indices(f, n, l, idx);
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
  kRawTable,  // raw-id table: zeros/negatives from the fold, NaN/Inf from the moments pass
};

void apply(const BlockAcc& a, int64_t n, Specials sp, int64_t* counts, double* moments) {
  counts[core::kCount] += n;
  if (sp != Specials::kRawTable) {
    counts[core::kNegatives] += a.negatives;
  }
  if (sp == Specials::kFromAcc) {
    counts[core::kNan] += a.nan;
    counts[core::kPosInf] += a.posinf;
    counts[core::kNegInf] += a.neginf;
    counts[core::kZeros] += a.zeros;
  }
  if (sp == Specials::kRawTable) {
    // The fold put zeros and negatives in from the table; here the pieces the table cannot
    // know: NaN/Inf (skipped at the fold), and subnormals that share the zeros' raw ids.
    counts[core::kNan] += a.nan;
    counts[core::kPosInf] += a.posinf;
    counts[core::kNegInf] += a.neginf;
    counts[core::kNegatives] += a.neginf + a.sub_id0_neg;
    counts[core::kZeros] -= a.sub_id0_pos + a.sub_id0_neg;
    counts[core::kUnderPos] += a.sub_id0_pos;
    counts[core::kUnderNeg] += a.sub_id0_neg;
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

// A thread's raw-id tables, allocated once per thread and kept zeroed between calls (folding
// zeroes what it reads), so a call pays only for the ids its values can have touched:
// - sub: 2^(9+k) ids x 4 interleaved 16-bit sub-counters, what the blocks increment (half the
//   cache footprint of 32-bit counters); folded into `wide` every kSubFoldElems elements, before
//   any sub-counter (at most a quarter of the elements each) can pass 65535;
// - wide: one 32-bit counter per id, folded into the int64 row at the end of the thread's work
//   and every 2^31 elements.
struct RawTables {
  std::vector<uint16_t> sub = std::vector<uint16_t>(4 * size_t(core::raw_id_count(7)), 0);
  std::vector<uint32_t> wide = std::vector<uint32_t>(size_t(core::raw_id_count(7)), 0u);
};

constexpr int64_t kSubFoldElems = 3 * kChunkBlocks * kBlock;  // 196608 / 4 < 65536
static_assert(kSubFoldElems <= 4 * 65535 - 3 * kBlock, "16-bit sub-counters could overflow");

RawTables& thread_tables() {
  thread_local RawTables tables;
  return tables;
}

// Calls f(first, last) for the raw-id ranges that values in [acc.mn, acc.mx] with
// |x| >= acc.min_abs (and zeros, subnormals, NaN, Inf) can have touched.
template <typename F>
void for_touched_ranges(const BlockAcc& acc, int k, F f) {
  const int sign = 1 << (8 + k);
  const int exp0 = (1 << k) - 1;  // ids of exponent 0: zeros and subnormals
  f(0, exp0);
  f(sign, sign + exp0);
  if (acc.nan || acc.posinf || acc.neginf) {  // exponent 255, both signs
    f(255 << k, (256 << k) - 1);
    f(sign + (255 << k), sign + (256 << k) - 1);
  }
  if (acc.min_abs == __builtin_huge_val()) return;  // no finite non-zero value
  const int lo = core::raw_id_of(static_cast<float>(acc.min_abs), k);
  if (acc.mx > 0) f(lo, core::raw_id_of(acc.mx, k));
  if (acc.mn < 0) f(sign + lo, core::raw_id_of(acc.mn, k));
}

void fold_sub(RawTables& t, const BlockAcc& seen, int k) {
  for_touched_ranges(seen, k, [&](int first, int last) {
    core::fold_sub_counters(t.sub.data(), first, last, t.wide.data());
  });
}

void fold_wide(RawTables& t, const BlockAcc& seen, const HistLayout& l, int64_t* counts) {
  for_touched_ranges(seen, l.k, [&](int first, int last) {
    core::fold_raw_range(t.wide.data(), 1, first, last, l, counts);
  });
}

// Processes chunks [c0, c1) of a span: moments into accs[c], raw ids into this thread's tables,
// folded into `counts` under `mu` at the end.
void raw_worker(Src src, const void* data, int64_t n, int64_t c0, int64_t c1, const HistLayout& l,
                std::vector<BlockAcc>& accs, int64_t* counts, std::mutex& mu) {
  const int64_t chunk = kChunkBlocks * kBlock;
  const int64_t esize = static_cast<int64_t>(elem_size(src));
  const core::Elem e = elem_of(src);
  auto& t = thread_tables();
  BlockAcc seen_sub, seen_wide;  // what this thread touched since the last folds
  int64_t since_sub = 0, since_wide = 0;
  for (int64_t c = c0; c < c1; ++c) {
    const int64_t end = std::min(n, (c + 1) * chunk);
    core::span_fused(e, static_cast<const char*>(data) + c * chunk * esize, end - c * chunk, l.k,
                     t.sub.data(), accs[c]);
    seen_sub.merge(accs[c]);
    since_sub += end - c * chunk;
    since_wide += end - c * chunk;
    if (since_sub + chunk > kSubFoldElems) {  // the next chunk could overflow a sub-counter
      fold_sub(t, seen_sub, l.k);
      seen_wide.merge(seen_sub);
      seen_sub = BlockAcc();
      since_sub = 0;
    }
    if (since_wide >= (int64_t{1} << 31)) {  // 32-bit counters: fold before they can overflow
      std::lock_guard<std::mutex> lock(mu);
      fold_wide(t, seen_wide, l, counts);
      seen_wide = BlockAcc();
      since_wide = 0;
    }
  }
  fold_sub(t, seen_sub, l.k);
  seen_wide.merge(seen_sub);
  std::lock_guard<std::mutex> lock(mu);
  fold_wide(t, seen_wide, l, counts);
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
    const int64_t esize = static_cast<int64_t>(elem_size(src));
    at::parallel_for(0, nchunks, 1, [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c) {
        const int64_t end = std::min(n, (c + 1) * chunk);
        core::span_fused(elem_of(src), static_cast<const char*>(data) + c * chunk * esize,
                         end - c * chunk, l.k, nullptr, accs[c]);
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
