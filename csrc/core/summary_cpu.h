// Torch-free CPU building blocks of the fused summary. Blocks of up to 1024 values (L1-resident)
// go through one loop: moments (fp64 sums and squares, fp32 min/max, the smallest non-zero |x|)
// and, for large inputs, the raw bucket id of every value, which for fp32 is just
// `bits >> (23 - k)`, counted in a per-thread table of all 2^(9+k) ids with four interleaved
// 16-bit sub-counters per id. Zeros and negatives are read from the table's ids when it is folded
// into a slot's row (window, underflow, overflow), so the per-element histogram work is one
// shift and one increment. The AVX-512 version (intrinsics, x86-64-v4) or the AVX2 one
// (intrinsics, x86-64-v3) is picked at run time; the baseline one (generic vectors, target clones)
// runs elsewhere.
#pragma once

#include <cstdint>

#include "loglinear.h"

// Hot loops are compiled for x86-64-v4 (AVX-512), x86-64-v3 (AVX2/FMA/F16C) and a baseline, and
// picked at load time (GCC function multiversioning).
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define DNNTRACE_CLONES \
  __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define DNNTRACE_CLONES
#endif

namespace dnntrace::core {

// Values are processed in blocks of at most this many elements; partial sums are taken per block
// and folded with TwoSum, so rounding error does not grow with the tensor's length.
constexpr int kBlock = 1024;

// Moments and special counts of a run of blocks. sum/sumsq carry a compensation term each.
struct BlockAcc {
  double sum = 0, sum_c = 0, sq = 0, sq_c = 0;
  double mn = __builtin_huge_val(), mx = -__builtin_huge_val();
  double min_abs = __builtin_huge_val();  // smallest non-zero finite |x|
  int64_t negatives = 0, nan = 0, posinf = 0, neginf = 0, zeros = 0, neg_zeros = 0;
  // Raw-table mode: subnormals whose raw id is that of +0 (resp. -0), i.e. 0 < |x| < 2^(-126-k):
  // the table cannot tell them from zeros, so blocks holding subnormals count them here.
  int64_t sub_id0_pos = 0, sub_id0_neg = 0;

  // Fold another accumulator in, in a fixed order (the caller fixes the order).
  void merge(const BlockAcc& o);
};

// Adds the moments and special counts of x[0..n) (n <= kBlock) to acc: finite sums, finite
// min/max, negatives, NaN, +Inf, -Inf, zeros and negative zeros.
void f32_block_moments(const float* x, int n, BlockAcc& acc);
void f64_block_moments(const double* x, int n, BlockAcc& acc);

// idx[i] = row index of x[i] (n <= kBlock): the full mapping, for small inputs and fp64.
void f32_block_indices(const float* x, int n, const HistLayout& l, int32_t* idx);
void f64_block_indices(const double* x, int n, const HistLayout& l, int32_t* idx);

// Element types of the raw-table path.
enum class Elem { kF32, kF16, kBF16 };

// Moments of x[0..n) (n <= kBlock, element type e) into acc and, when table != nullptr, for each
// value table[4 * (bits(x[i]) >> (23 - k)) + i % 4] += 1: the raw id (sign, exponent, top k
// mantissa bits) with four interleaved 16-bit sub-counters per id, so no counter grows by more
// than ceil(n / 4) per call; the caller folds them (fold_sub_counters) before any can pass 65535.
// With a table, zeros and negatives are left to the table (fold_raw_range) and only
// sub_id0_pos/neg are counted; without one, acc gets every special count. NaN/Inf counts always
// go to acc. The best version the CPU runs (AVX-512, AVX2, baseline) is picked at run time, capped
// by DNNTRACE_CPU_ISA=baseline|avx2|avx512 (or DNNTRACE_CPU_BASELINE=1) in the environment when
// the first block runs.
void block_fused(Elem e, const void* x, int n, int k, uint16_t* table, BlockAcc& acc);

// block_fused over x[0..n) in blocks of kBlock, in order (so the same sums as block by block);
// the AVX-512 and AVX2 versions overlap each block's increments with the next block's moments.
void span_fused(Elem e, const void* x, int64_t n, int k, uint16_t* table, BlockAcc& acc);

// Which block_fused version runs here: "avx512", "avx2" or "baseline".
const char* block_fused_isa();

// wide[id] += the four sub-counters of id, which are zeroed, for ids first..last.
void fold_sub_counters(uint16_t* table, int first, int last, uint32_t* wide);

// Number of raw ids for k mantissa bits: 2^(9 + k).
inline int raw_id_count(int k) { return 1 << (9 + k); }

// Adds ids [first, last] of a thread's tables (sub: four 16-bit sub-counters per id, may be
// nullptr; wide: one 32-bit counter per id) into a row and zeroes them, in one pass. In-window ids
// map to consecutive buckets (reversed for the negative half), so the pass is a linear add per run
// of ids rather than a mapping per id. The ids of +0 and -0 go to kZeros, the other ids of
// exponent 0 (subnormals) to underflow; ids of exponent 255 (NaN, Inf) are only zeroed. Ids with
// the sign bit add to kNegatives, except -0's. The caller then moves sub_id0_pos/neg from kZeros
// to underflow (and sub_id0_neg to kNegatives) and adds NaN/Inf (and -Inf to kNegatives) from the
// moments pass.
void fold_tables(uint16_t* sub, uint32_t* wide, int first, int last, const HistLayout& l,
                 int64_t* row);

// The raw id of a value (fp32 bits >> (23 - k)).
inline int raw_id_of(float v, int k) { return static_cast<int>(f32_bits(v) >> (23 - k)); }

// Exact conversion of n values to fp32 (baseline code).
void half_to_float(const uint16_t* x, int n, float* out);
void bf16_to_float(const uint16_t* x, int n, float* out);

}  // namespace dnntrace::core
