#include "summary_cpu.h"

#include <cstring>

namespace dnntrace::core {

namespace {

void fold(double& hi, double& lo, double v) {
  double s, e;
  two_sum(hi, v, s, e);
  hi = s;
  lo += e;
}

// GCC/Clang vector extensions: explicit 8-wide lanes that compile to AVX2 in the x86-64-v3 clone
// and to pairs of SSE registers in the baseline one (the compiler does not vectorise the mixed
// float -> double reductions by itself).
typedef float v8f __attribute__((vector_size(32)));
typedef double v4d __attribute__((vector_size(32)));
typedef int32_t v8i __attribute__((vector_size(32)));
typedef uint32_t v8u __attribute__((vector_size(32)));

// Exact block moments with NaN/Inf masked out; used for blocks that contain non-finite values.
void f32_block_moments_masked(const float* x, int n, BlockAcc& acc) {
  double bs = 0, bq = 0;
  for (int i = 0; i < n; ++i) {
    const float v = x[i];
    uint32_t u;
    std::memcpy(&u, &v, sizeof u);
    const uint32_t a = u & 0x7fffffffu;
    if (a < 0x7f800000u) {
      const double d = v;
      bs += d;
      bq += d * d;
      if (v < acc.mn) acc.mn = v;
      if (v > acc.mx) acc.mx = v;
      const float av = v < 0 ? -v : v;
      if (a != 0u && av < acc.min_abs) acc.min_abs = av;
    }
    acc.negatives += (u > 0x80000000u) && (u <= 0xff800000u);
    acc.nan += a > 0x7f800000u;
    acc.posinf += u == 0x7f800000u;
    acc.neginf += u == 0xff800000u;
    acc.zeros += a == 0u;
    acc.neg_zeros += u == 0x80000000u;
  }
  fold(acc.sum, acc.sum_c, bs);
  fold(acc.sq, acc.sq_c, bq);
}

}  // namespace

void BlockAcc::merge(const BlockAcc& o) {
  fold(sum, sum_c, o.sum);
  sum_c += o.sum_c;
  fold(sq, sq_c, o.sq);
  sq_c += o.sq_c;
  mn = o.mn < mn ? o.mn : mn;
  mx = o.mx > mx ? o.mx : mx;
  min_abs = o.min_abs < min_abs ? o.min_abs : min_abs;
  negatives += o.negatives;
  nan += o.nan;
  posinf += o.posinf;
  neginf += o.neginf;
  zeros += o.zeros;
  neg_zeros += o.neg_zeros;
}

// The moments of a block and, with kScatter, the raw-id scatter of the same values in one loop
// body: the moments use the vector unit, the scatter scalar loads and stores, so they overlap
// (measured 1.5x faster than two passes). Inlined into each exported, target-cloned function.
template <bool kScatter>
__attribute__((always_inline)) inline void f32_block_impl(const float* x, int n, int k,
                                                          uint32_t* table, BlockAcc& acc) {
  const int shift = 23 - k;
  (void)shift;  // used by the scatter only
  // Fast path: no masking. Non-finite values show up in the `bad` count, and such (rare) blocks
  // are recomputed exactly with masks.
  v4d s0 = {}, s1 = {}, q0 = {}, q1 = {};
  v8f mn, mx, mina;
  for (int l = 0; l < 8; ++l) {
    mn[l] = __builtin_huge_valf();
    mx[l] = -__builtin_huge_valf();
    mina[l] = __builtin_huge_valf();
  }
  const v8f inf = mina;
  const v8f zero = {};
  v8i neg = {}, zer = {}, nzer = {}, bad = {};
  const int full = n - n % 8;
  for (int i = 0; i < full; i += 8) {
    v8f v;
    std::memcpy(&v, x + i, sizeof v);
    v8i u;
    std::memcpy(&u, &v, sizeof u);
    const v8i a = u & 0x7fffffff;
    const v4d lo = __builtin_convertvector(__builtin_shufflevector(v, v, 0, 1, 2, 3), v4d);
    const v4d hi = __builtin_convertvector(__builtin_shufflevector(v, v, 4, 5, 6, 7), v4d);
    s0 += lo;
    s1 += hi;
    q0 += lo * lo;  // exact: the square of a float fits in a double
    q1 += hi * hi;
    mn = v < mn ? v : mn;
    mx = v > mx ? v : mx;
    neg -= v < zero;  // -0 and NaN compare false
    const v8i is_zero = a == 0;
    zer -= is_zero;
    v8f av;
    std::memcpy(&av, &a, sizeof av);
    av = is_zero ? inf : av;
    mina = av < mina ? av : mina;
    nzer -= u == static_cast<int32_t>(0x80000000u);
    bad -= a > 0x7f7fffff;
    if constexpr (kScatter) {
      v8u id;
      std::memcpy(&id, &u, sizeof id);
      id = (id >> shift) << 2;
      uint32_t ids[8];
      std::memcpy(ids, &id, sizeof ids);
      table[ids[0] + 0] += 1;
      table[ids[1] + 1] += 1;
      table[ids[2] + 2] += 1;
      table[ids[3] + 3] += 1;
      table[ids[4] + 0] += 1;
      table[ids[5] + 1] += 1;
      table[ids[6] + 2] += 1;
      table[ids[7] + 3] += 1;
    }
  }
  if constexpr (kScatter) {
    for (int i = full; i < n; ++i) {
      uint32_t u;
      std::memcpy(&u, x + i, sizeof u);
      table[(u >> shift) << 2] += 1;
    }
  }
  int64_t nbad = 0;
  for (int l = 0; l < 8; ++l) nbad += bad[l];
  for (int i = full; i < n; ++i) {
    uint32_t u;
    std::memcpy(&u, &x[i], sizeof u);
    nbad += (u & 0x7fffffffu) >= 0x7f800000u;
  }
  if (nbad) {
    f32_block_moments_masked(x, n, acc);
    return;
  }
  double bs = 0, bq = 0;
  for (int l = 0; l < 4; ++l) {
    bs += s0[l] + s1[l];
    bq += q0[l] + q1[l];
  }
  for (int l = 0; l < 8; ++l) {
    acc.mn = mn[l] < acc.mn ? mn[l] : acc.mn;
    acc.mx = mx[l] > acc.mx ? mx[l] : acc.mx;
    acc.min_abs = mina[l] < acc.min_abs ? mina[l] : acc.min_abs;
    acc.negatives += neg[l];
    acc.zeros += zer[l];
    acc.neg_zeros += nzer[l];
  }
  for (int i = full; i < n; ++i) {
    const float v = x[i];
    uint32_t u;
    std::memcpy(&u, &v, sizeof u);
    const double d = v;
    bs += d;
    bq += d * d;
    if (v < acc.mn) acc.mn = v;
    if (v > acc.mx) acc.mx = v;
    const float av = v < 0 ? -v : v;
    if (av != 0.0f && av < acc.min_abs) acc.min_abs = av;
    acc.negatives += v < 0.0f;
    acc.zeros += (u & 0x7fffffffu) == 0u;
    acc.neg_zeros += u == 0x80000000u;
  }
  fold(acc.sum, acc.sum_c, bs);
  fold(acc.sq, acc.sq_c, bq);
}

DNNTRACE_CLONES void f32_block_moments(const float* x, int n, BlockAcc& acc) {
  f32_block_impl<false>(x, n, 0, nullptr, acc);
}

DNNTRACE_CLONES void f32_block_fused(const float* x, int n, int k, uint32_t* table, BlockAcc& acc) {
  f32_block_impl<true>(x, n, k, table, acc);
}

void f64_block_moments(const double* x, int n, BlockAcc& acc) {
  double bs = 0, bq = 0;
  for (int i = 0; i < n; ++i) {
    const double v = x[i];
    uint64_t u;
    std::memcpy(&u, &v, sizeof u);
    const uint64_t a = u & 0x7fffffffffffffffull;
    if (a < 0x7ff0000000000000ull) {
      bs += v;
      bq += v * v;
      if (v < acc.mn) acc.mn = v;
      if (v > acc.mx) acc.mx = v;
    }
    acc.negatives += v < 0.0;
    acc.nan += a > 0x7ff0000000000000ull;
    acc.posinf += u == 0x7ff0000000000000ull;
    acc.neginf += u == 0xfff0000000000000ull;
    acc.zeros += a == 0u;
    acc.neg_zeros += u == 0x8000000000000000ull;
  }
  fold(acc.sum, acc.sum_c, bs);
  fold(acc.sq, acc.sq_c, bq);
}

DNNTRACE_CLONES void f32_block_indices(const float* x, int n, const HistLayout& l, int32_t* idx) {
  const int k = l.k;
  const int32_t lo = f32_lo(l);
  const int32_t ps = l.per_sign();
  for (int i = 0; i < n; ++i) {
    uint32_t u;
    std::memcpy(&u, &x[i], sizeof u);
    idx[i] = row_index_f32(u, k, lo, ps);
  }
}

void f64_block_indices(const double* x, int n, const HistLayout& l, int32_t* idx) {
  for (int i = 0; i < n; ++i) idx[i] = row_index(x[i], l);
}

void fold_raw_range(uint32_t* table, int copies, int first, int last, const HistLayout& l,
                    int64_t* row) {
  const int k = l.k;
  const int32_t lo = f32_lo(l), ps = l.per_sign();
  for (int id = first; id <= last; ++id) {
    uint32_t* t = table + static_cast<size_t>(id) * copies;
    int64_t c = 0;
    for (int j = 0; j < copies; ++j) {
      c += t[j];
      t[j] = 0u;
    }
    if (!c) continue;
    const int32_t s = id >> (8 + k);
    const int32_t e = (id >> k) & 0xff;
    if (e == 0xff) continue;  // NaN and Inf: counted by the moments pass
    if (e == 0) {             // zeros and subnormals: the caller moves the zeros out
      row[kUnderPos + s] += c;
      continue;
    }
    // the lowest value of this id, as fp32 bits, through the shared mapping
    row[row_index_f32(static_cast<uint32_t>(id) << (23 - k), k, lo, ps)] += c;
  }
}

DNNTRACE_CLONES void half_to_float(const uint16_t* x, int n, float* out) {
  for (int i = 0; i < n; ++i) out[i] = half_bits_to_float(x[i]);
}

DNNTRACE_CLONES void bf16_to_float(const uint16_t* x, int n, float* out) {
  for (int i = 0; i < n; ++i) out[i] = bf16_bits_to_float(x[i]);
}

}  // namespace dnntrace::core
