// Torch-free CPU building blocks of the fused summary: moments of a block of values and the row
// index of every value, written as simple lane loops that the compiler vectorises (the functions
// are compiled for AVX2 and a baseline, chosen at run time).
#pragma once

#include <cstdint>

#include "loglinear.h"

namespace dnntrace::core {

// Values are processed in blocks of at most this many elements; partial sums are taken per block
// and folded with TwoSum, so rounding error does not grow with the tensor's length.
constexpr int kBlock = 1024;
constexpr int kLanes = 8;

// Moments and special counts of a run of blocks. sum/sumsq carry a compensation term each.
struct BlockAcc {
  double sum = 0, sum_c = 0, sq = 0, sq_c = 0;
  double mn = __builtin_huge_val(), mx = -__builtin_huge_val();
  int64_t negatives = 0, nan = 0, posinf = 0, neginf = 0, zeros = 0;

  // Fold another accumulator in, in a fixed order (the caller fixes the order).
  void merge(const BlockAcc& o);
};

// Adds the moments and special counts of x[0..n) (n <= kBlock) to acc.
void f32_block_moments(const float* x, int n, BlockAcc& acc);
void f64_block_moments(const double* x, int n, BlockAcc& acc);

// idx[i] = row index of x[i] (n <= kBlock).
void f32_block_indices(const float* x, int n, const HistLayout& l, int32_t* idx);
void f64_block_indices(const double* x, int n, const HistLayout& l, int32_t* idx);

// Exact conversion of n values to fp32.
void half_to_float(const uint16_t* x, int n, float* out);
void bf16_to_float(const uint16_t* x, int n, float* out);

}  // namespace dnntrace::core
