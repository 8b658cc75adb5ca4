// CPU kernel of the fused summary: one read of the data in blocks of 1024 values (fp16/bf16
// widened to fp32 in registers, fp64 kept), moments in vector lanes, histogram by raw id into
// four interleaved 16-bit sub-counters per id and thread (breaking store-to-load chains when
// values repeat, as the zeros of ReLU outputs do), folded into 32-bit counters before they can
// overflow and into the row once per thread and tensor (csrc/core/summary_cpu.h). All tensors of a
// call share one parallel region: each thread takes a run of chunks of about equal elements,
// crossing tensors, so the small tensors of a list (a model's parameters) do not pay a region and
// a fold per thread each. Deterministic: chunk boundaries do not depend on the thread count, float
// partials are folded in chunk order, integers are order-free.
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
// Values per thread at least (see summarize_items): a call of two 64 Ki chunks or more (2^17
// values) runs on two threads. On a 2-core Zen 3 VM, fp32 calls on a fresh Linear output, the
// pool threads just used (bench/NOTES.md, twelfth session row 7): 2^17 values 85-124 -> 79-92 us
// median, 196,608 values 121-171 -> 94-130 us against one thread.
constexpr int64_t kMinRunElems = int64_t{1} << 16;

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

// Sub-counters and 32-bit counters of the ids `seen` can have touched into a row, both zeroed.
void fold_all(RawTables& t, const BlockAcc& seen, const HistLayout& l, int64_t* counts) {
  for_touched_ranges(seen, l.k, [&](int first, int last) {
    core::fold_tables(t.sub.data(), t.wide.data(), first, last, l, counts);
  });
}

void fold_wide(RawTables& t, const BlockAcc& seen, const HistLayout& l, int64_t* counts) {
  for_touched_ranges(seen, l.k, [&](int first, int last) {
    core::fold_tables(nullptr, t.wide.data(), first, last, l, counts);
  });
}

// One tensor of a call: where its values are and where its statistics go.
struct Item {
  Src src;
  const void* data;
  int64_t n;
  int64_t* counts;
  double* moments;
  bool direct;        // small or fp64: the full mapping straight into the row, one task
  int64_t first_acc;  // its chunks' accumulators: accs[first_acc .. first_acc + chunks)
  int64_t chunks;
};

// A task: one chunk of an item (or the whole of a direct item).
struct Task {
  int32_t item;
  int32_t chunk;
  int64_t cost;  // elements
};

// A thread's run of tasks. Raw-table tasks of the same item accumulate in the thread's tables,
// which are folded into the item's row (under its lock) when the run moves to another item or
// ends, or before a counter could overflow.
class RunWorker {
 public:
  RunWorker(const std::vector<Item>& items, const HistLayout& l, bool histogram,
            std::vector<BlockAcc>& accs, std::vector<std::mutex>& locks)
      : items_(items), l_(l), histogram_(histogram), accs_(accs), locks_(locks) {}

  void run(const Task* begin, const Task* end) {
    for (const Task* t = begin; t != end; ++t) {
      const Item& it = items_[t->item];
      if (t->item != current_) finish();
      if (it.direct) {  // one task, this thread alone writes its row
        summarize_direct(it.src, it.data, it.n, l_, histogram_, it.counts, it.moments);
        continue;
      }
      current_ = t->item;
      chunk(it, t->chunk);
    }
    finish();
  }

 private:
  void chunk(const Item& it, int64_t c) {
    const int64_t size = kChunkBlocks * kBlock;
    const int64_t esize = static_cast<int64_t>(elem_size(it.src));
    const int64_t len = std::min(it.n, (c + 1) * size) - c * size;
    // accumulated on this thread's stack, stored once: neighbouring chunks' accumulators share
    // cache lines, and another thread may be updating the next one
    BlockAcc acc;
    const char* p = static_cast<const char*>(it.data) + c * size * esize;
    if (!histogram_) {
      core::span_fused(elem_of(it.src), p, len, l_.k, nullptr, acc);
      accs_[it.first_acc + c] = acc;
      return;
    }
    if (since_sub_ + len > kSubFoldElems) {  // this chunk could overflow a sub-counter
      fold_sub(t_, seen_sub_, l_.k);
      seen_wide_.merge(seen_sub_);
      seen_sub_ = BlockAcc();
      since_sub_ = 0;
    }
    if (since_wide_ + len >= (int64_t{1} << 31)) {  // 32-bit counters: fold before overflow
      fold_sub(t_, seen_sub_, l_.k);
      seen_wide_.merge(seen_sub_);
      seen_sub_ = BlockAcc();
      since_sub_ = 0;
      std::lock_guard<std::mutex> lock(locks_[current_]);
      fold_wide(t_, seen_wide_, l_, it.counts);
      seen_wide_ = BlockAcc();
      since_wide_ = 0;
    }
    core::span_fused(elem_of(it.src), p, len, l_.k, t_.sub.data(), acc);
    accs_[it.first_acc + c] = acc;
    seen_sub_.merge(acc);
    since_sub_ += len;
    since_wide_ += len;
  }

  void finish() {
    if (current_ < 0) return;
    if (histogram_) {
      seen_wide_.merge(seen_sub_);
      std::lock_guard<std::mutex> lock(locks_[current_]);
      fold_all(t_, seen_wide_, l_, items_[current_].counts);
    }
    seen_sub_ = seen_wide_ = BlockAcc();
    since_sub_ = since_wide_ = 0;
    current_ = -1;
  }

  const std::vector<Item>& items_;
  const HistLayout& l_;
  const bool histogram_;
  std::vector<BlockAcc>& accs_;
  std::vector<std::mutex>& locks_;
  RawTables& t_ = thread_tables();
  int32_t current_ = -1;
  BlockAcc seen_sub_, seen_wide_;  // what this thread touched since the last folds
  int64_t since_sub_ = 0, since_wide_ = 0;
};

// Adds the statistics of every item to its row: one parallel region for all of them, the
// threads taking consecutive runs of tasks of about equal elements (a run crosses tensors, so
// small tensors of a multi-tensor call share a thread instead of paying a region and a fold per
// thread each). Chunk boundaries, and so the floating-point partials and the order they are
// folded in, do not depend on the threads.
void summarize_items(std::vector<Item>& items, const HistLayout& l, bool histogram) {
  const int64_t size = kChunkBlocks * kBlock;
  std::vector<Task> tasks;
  int64_t naccs = 0, total = 0;
  for (size_t i = 0; i < items.size(); ++i) {
    Item& it = items[i];
    it.counts[core::kCalls] += 1;
    if (it.n == 0) continue;
    const int64_t nchunks = (it.n + size - 1) / size;
    it.direct = it.n <= kDirectMax || it.src == Src::kF64 || (!histogram && nchunks == 1);
    it.first_acc = naccs;
    it.chunks = it.direct ? 0 : nchunks;
    naccs += it.chunks;
    if (it.direct) {
      tasks.push_back({static_cast<int32_t>(i), 0, it.n});
    } else {
      for (int64_t c = 0; c < nchunks; ++c)
        tasks.push_back({static_cast<int32_t>(i), static_cast<int32_t>(c),
                         std::min(it.n, (c + 1) * size) - c * size});
    }
    total += it.n;
  }
  if (tasks.empty()) return;
  std::vector<BlockAcc> accs(naccs);
  std::vector<std::mutex> locks(items.size());
  // Runs of about total / parts elements each (a task is not split), at least kMinRunElems: a
  // thread that shares a tensor folds its table into the same row as another, and moving the
  // row's cache lines between cores costs about what a thread saves on a shorter run.
  int64_t parts = std::min<int64_t>({static_cast<int64_t>(at::get_num_threads()),
                                     static_cast<int64_t>(tasks.size()),
                                     std::max<int64_t>(1, total / kMinRunElems)});
  if (at::in_parallel_region()) parts = 1;
  std::vector<size_t> cut(parts + 1, tasks.size());
  cut[0] = 0;
  int64_t acc_cost = 0;
  size_t ti = 0;
  for (int64_t p = 1; p < parts; ++p) {
    const int64_t goal = total * p / parts;
    while (ti < tasks.size() && acc_cost + tasks[ti].cost / 2 < goal) acc_cost += tasks[ti++].cost;
    cut[p] = std::max(ti, cut[p - 1]);
  }
  auto body = [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) {
      if (cut[p] == cut[p + 1]) continue;
      RunWorker w(items, l, histogram, accs, locks);
      w.run(tasks.data() + cut[p], tasks.data() + cut[p + 1]);
    }
  };
  if (parts > 1) {
    at::parallel_for(0, parts, 1, body);
  } else {
    body(0, 1);
  }
  for (const Item& it : items) {
    if (it.n == 0 || it.direct) continue;
    BlockAcc sum;
    for (int64_t c = 0; c < it.chunks; ++c) sum.merge(accs[it.first_acc + c]);
    apply(sum, it.n, histogram ? Specials::kRawTable : Specials::kFromAcc, it.counts, it.moments);
  }
}

Item item_of(const at::Tensor& x, int64_t slot, at::Tensor& counts, at::Tensor& moments) {
  return Item{source_of(x.scalar_type()),
              x.data_ptr(),
              x.numel(),
              counts.data_ptr<int64_t>() + slot * counts.size(1),
              moments.data_ptr<double>() + slot * moments.size(1),
              false,
              0,
              0};
}

void tensor_summary_out_kernel(const at::Tensor& x_in, int64_t slot, int64_t k, int64_t emin,
                               int64_t octaves, bool histogram, at::Tensor& counts,
                               at::Tensor& moments) {
  const auto l = checked_layout(k, emin, octaves);
  check_state(counts, moments, l, x_in.device());
  check_input(x_in, slot, counts);
  const at::Tensor x = dense_view_or_copy(x_in);
  std::vector<Item> items{item_of(x, slot, counts, moments)};
  summarize_items(items, l, histogram);
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
  std::vector<at::Tensor> dense;
  dense.reserve(xs.size());
  for (const auto& x : xs) dense.push_back(dense_view_or_copy(x));
  // Tensors sharing a slot go in separate calls: one item per row in a call (the threads of a
  // call write an item's row under that item's lock only).
  std::vector<char> used(static_cast<size_t>(counts.size(0)), 0);
  std::vector<Item> items;
  for (size_t i = 0; i < dense.size(); ++i) {
    if (used[slots[i]]) {
      summarize_items(items, l, histogram);
      items.clear();
      std::fill(used.begin(), used.end(), 0);
    }
    used[slots[i]] = 1;
    items.push_back(item_of(dense[i], slots[i], counts, moments));
  }
  summarize_items(items, l, histogram);
}

}  // namespace

TORCH_LIBRARY_IMPL(dnntrace, CPU, m) {
  m.impl("tensor_summary_out", TORCH_FN(tensor_summary_out_kernel));
  m.impl("multi_tensor_summary_out", TORCH_FN(multi_tensor_summary_out_kernel));
}

}  // namespace dnntrace::ops
