#include "summary_cpu.h"

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#include <immintrin.h>
#define DNNTRACE_AVX512_PATH 1
#define DNNTRACE_V4 __attribute__((target("arch=x86-64-v4")))
#endif

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

// Subnormals whose raw id is that of a zero: 0 < |x| < 2^(23 - k) as bits, by sign.
template <typename Bits>
__attribute__((always_inline)) inline void count_sub_id0(Bits bits_of, int n, int k,
                                                         BlockAcc& acc) {
  const uint32_t lim = 1u << (23 - k);
  int64_t pos = 0, neg = 0;
  for (int i = 0; i < n; ++i) {
    const uint32_t u = bits_of(i);
    const uint32_t a = u & 0x7fffffffu;
    const int64_t c = (a != 0u) & (a < lim);
    pos += (u >> 31) ? 0 : c;
    neg += (u >> 31) ? c : 0;
  }
  acc.sub_id0_pos += pos;
  acc.sub_id0_neg += neg;
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
  sub_id0_pos += o.sub_id0_pos;
  sub_id0_neg += o.sub_id0_neg;
}

// The moments of a block and, with kScatter, the raw-id scatter of the same values in one loop
// body: the moments use the vector unit, the scatter scalar loads and stores, so they overlap
// (measured 1.5x faster than two passes). Inlined into each exported, target-cloned function.
template <bool kScatter>
__attribute__((always_inline)) inline void f32_block_impl(const float* x, int n, int k,
                                                          uint16_t* table, BlockAcc& acc) {
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
  if constexpr (kScatter) {
    count_sub_id0(
        [x](int i) {
          uint32_t u;
          std::memcpy(&u, x + i, sizeof u);
          return u;
        },
        n, 23 - shift, acc);
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

// The baseline fused block (fp32 values), for CPUs without AVX-512.
static DNNTRACE_CLONES void f32_block_fused(const float* x, int n, int k, uint16_t* table,
                                            BlockAcc& acc) {
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

DNNTRACE_CLONES void fold_sub_counters(uint16_t* table, int first, int last, uint32_t* wide) {
  for (int id = first; id <= last; ++id) {
    uint16_t* t = table + 4 * static_cast<size_t>(id);
    wide[id] += static_cast<uint32_t>(t[0]) + t[1] + t[2] + t[3];
    t[0] = t[1] = t[2] = t[3] = 0;
  }
}

namespace {

// Takes (and zeroes) the counts of ids [id0, id0 + n): wide[id] plus, when sub is set, its four
// sub-counters; out[i] = count of id0 + i. Returns their sum.
DNNTRACE_CLONES int64_t take_counts(uint16_t* sub, uint32_t* wide, int id0, int n, int64_t* out) {
  int64_t total = 0;
  uint32_t* w = wide + id0;
  if (sub != nullptr) {
    const uint16_t* t = sub + 4 * static_cast<size_t>(id0);
    for (int i = 0; i < n; ++i) {
      const int64_t c =
          static_cast<int64_t>(w[i]) + t[4 * i] + t[4 * i + 1] + t[4 * i + 2] + t[4 * i + 3];
      out[i] = c;
      total += c;
    }
    std::memset(sub + 4 * static_cast<size_t>(id0), 0, sizeof(uint16_t) * 4 * size_t(n));
  } else {
    for (int i = 0; i < n; ++i) {
      out[i] = w[i];
      total += w[i];
    }
  }
  std::memset(w, 0, sizeof(uint32_t) * size_t(n));
  return total;
}

}  // namespace

void fold_tables(uint16_t* sub, uint32_t* wide, int first, int last, const HistLayout& l,
                 int64_t* row) {
  const int k = l.k;
  const int sign_ids = 1 << (8 + k);
  const int32_t lo = f32_lo(l), ps = l.per_sign();
  const int top = 255 << k;  // first id of exponent 255 within a sign (NaN, Inf)
  int64_t buf[256];
  int64_t negatives = 0;
  for (int id = first; id <= last;) {
    const int s = id >> (8 + k);
    const int base = s * sign_ids;
    const int a = id - base;  // the id within its sign: exponent and top k mantissa bits
    // The class of `a` and the last id (within the sign) of that class. emin >= -126 puts every
    // id of exponent 0 below the window and emin + octaves <= 128 every id of exponent 255 above.
    int cls_end;
    int64_t* special = nullptr;  // the header counter of an under/overflow segment
    if (a < (1 << k)) {
      cls_end = (1 << k) - 1;  // exponent 0: ±0 (and the tiniest subnormals), then subnormals
    } else if (a >= top) {
      cls_end = sign_ids - 1;  // NaN and Inf: counted by the moments pass, only zeroed here
    } else if (a < lo) {
      cls_end = lo - 1;
      special = row + kUnderPos + s;
    } else if (a < lo + ps) {
      cls_end = lo + ps - 1;
    } else {
      cls_end = top - 1;
      special = row + kOverPos + s;
    }
    const int end = std::min(last, base + cls_end);
    for (int id0 = id; id0 <= end; id0 += 256) {  // in pieces of the stack buffer
      const int n = std::min(256, end - id0 + 1);
      const int a0 = id0 - base;
      const int64_t total = take_counts(sub, wide, id0, n, buf);
      if (total == 0) continue;
      if (a0 >= top) continue;
      if (a0 < (1 << k)) {
        for (int i = 0; i < n; ++i) {
          if (a0 + i == 0) {
            row[kZeros] += buf[i];  // not a negative, even with the sign bit
          } else {
            row[kUnderPos + s] += buf[i];
            negatives += s ? buf[i] : 0;
          }
        }
        continue;
      }
      negatives += s ? total : 0;
      if (special != nullptr) {
        *special += total;
      } else if (s == 0) {  // positive half: ascending with the id
        int64_t* r = row + kHeader + ps + (a0 - lo);
        for (int i = 0; i < n; ++i) r[i] += buf[i];
      } else {  // negative half: stored reversed
        int64_t* r = row + kHeader + ps - 1 - (a0 - lo);
        for (int i = 0; i < n; ++i) r[-i] += buf[i];
      }
    }
    id = end + 1;
  }
  row[kNegatives] += negatives;
}

DNNTRACE_CLONES void half_to_float(const uint16_t* x, int n, float* out) {
  for (int i = 0; i < n; ++i) out[i] = half_bits_to_float(x[i]);
}

DNNTRACE_CLONES void bf16_to_float(const uint16_t* x, int n, float* out) {
  for (int i = 0; i < n; ++i) out[i] = bf16_bits_to_float(x[i]);
}

#if defined(DNNTRACE_AVX512_PATH)
namespace {

// The fp32 bits of value i of an fp32, bf16 or fp16 array (exact).
template <Elem E>
__attribute__((always_inline)) inline uint32_t elem_bits(const void* p, int i) {
  if constexpr (E == Elem::kF32) {
    uint32_t u;
    std::memcpy(&u, static_cast<const float*>(p) + i, sizeof u);
    return u;
  } else if constexpr (E == Elem::kBF16) {
    return static_cast<uint32_t>(static_cast<const uint16_t*>(p)[i]) << 16;
  } else {
    return f32_bits(half_bits_to_float(static_cast<const uint16_t*>(p)[i]));
  }
}

// What a vector block found in its full 16-value groups.
struct VecPartial {
  double bs, bq;           // sums and squares (fp64)
  float bmn, bmx;          // min and max (a NaN may have been skipped: such blocks are recounted)
  uint32_t bmina;          // smallest non-zero |bits|, 0xffffffff when none
  int64_t neg, zer, nzer;  // moments-only mode
};

// The end of a vector block (AVX-512 and AVX2 versions), from value i on: the scalar tail, the
// subnormals that share the zeros' raw id, the exact recount of a block with NaN/Inf (any among
// the vector lanes makes their sum non-finite; the finite values of one block cannot overflow a
// double), and the fold into acc. Inlined into each version's block.
template <Elem E, bool kScatter>
__attribute__((always_inline)) inline void finish_block(const void* x, int i, int n, int k,
                                                        uint16_t* table, VecPartial p,
                                                        BlockAcc& acc) {
  const int shift = 23 - k;
  bool bad = false;
  for (; i < n; ++i) {
    const uint32_t u = elem_bits<E>(x, i);
    const uint32_t a = u & 0x7fffffffu;
    const float v = f32_from_bits(u);
    if constexpr (kScatter) {
      table[((u >> shift) << 2) + (i & 3)] += 1;
    } else {
      p.neg += v < 0.0f;
      p.zer += a == 0u;
      p.nzer += u == 0x80000000u;
    }
    bad |= a >= 0x7f800000u;
    p.bmina = (a != 0u && a < p.bmina) ? a : p.bmina;
    if (a < 0x7f800000u) {
      const double d = v;
      p.bs += d;
      p.bq += d * d;
      p.bmn = v < p.bmn ? v : p.bmn;
      p.bmx = v > p.bmx ? v : p.bmx;
    }
  }
  if (kScatter && p.bmina < 0x00800000u)
    count_sub_id0([x](int j) { return elem_bits<E>(x, j); }, n, k, acc);
  if (bad || (f64_bits(p.bs) & 0x7ff0000000000000ull) == 0x7ff0000000000000ull) {
    if constexpr (E == Elem::kF32) {
      f32_block_moments_masked(static_cast<const float*>(x), n, acc);
    } else {
      float f[kBlock];
      for (int j = 0; j < n; ++j) f[j] = f32_from_bits(elem_bits<E>(x, j));
      f32_block_moments_masked(f, n, acc);
    }
    return;
  }
  fold(acc.sum, acc.sum_c, p.bs);
  fold(acc.sq, acc.sq_c, p.bq);
  acc.mn = p.bmn < acc.mn ? p.bmn : acc.mn;
  acc.mx = p.bmx > acc.mx ? p.bmx : acc.mx;
  if (p.bmina != 0xffffffffu) {
    const double m = f32_from_bits(p.bmina);
    acc.min_abs = m < acc.min_abs ? m : acc.min_abs;
  }
  acc.negatives += p.neg;
  acc.zeros += p.zer;
  acc.neg_zeros += p.nzer;
}

// A version's entry points, over its block function with and without the scatter
// (`block(x, n, k, table, acc, ids, prev, prev_n)`, returning how many ids it stored) and its
// 16-id scatter (`scatter(ids, table)`).
template <typename BlockS, typename BlockM, typename Scatter>
inline void dispatch_block(BlockS with_table, BlockM moments_only, Scatter scatter, const void* x,
                           int n, int k, uint16_t* table, BlockAcc& acc) {
  if (table) {
    alignas(64) uint32_t ids[kBlock];
    const int stored = with_table(x, n, k, table, acc, ids, nullptr, 0);
    for (int j = 0; j < stored; j += 16) scatter(ids + j, table);
  } else {
    moments_only(x, n, k, nullptr, acc, nullptr, nullptr, 0);
  }
}

// Blocks of a span, each block's increments overlapped with the next block's moments.
template <Elem E, typename BlockS, typename BlockM, typename Scatter>
inline void span_blocks(BlockS with_table, BlockM moments_only, Scatter scatter, const void* x,
                        int64_t n, int k, uint16_t* table, BlockAcc& acc) {
  constexpr int64_t esize = E == Elem::kF32 ? 4 : 2;
  const char* p = static_cast<const char*>(x);
  alignas(64) uint32_t ids[2][kBlock];
  int pending = 0;
  for (int64_t off = 0, b = 0; off < n; off += kBlock, ++b) {
    const int m = static_cast<int>(std::min<int64_t>(kBlock, n - off));
    if (!table) {
      moments_only(p + off * esize, m, k, nullptr, acc, nullptr, nullptr, 0);
      continue;
    }
    pending = with_table(p + off * esize, m, k, table, acc, ids[b & 1], ids[(b + 1) & 1], pending);
    if (off + kBlock >= n)
      for (int j = 0; j < pending; j += 16) scatter(ids[b & 1] + j, table);
  }
}

// The AVX-512 fused block, written with intrinsics in functions compiled for x86-64-v4 (GCC 12
// neither vectorises the selects of these reductions nor lowers generic vectors of an inlined
// helper for the caller's target). Per 16 values: 16-lane loads (bf16 widened by a shift, fp16 by
// vcvtph2ps), sums and squares in two 8 x fp64 halves, min/max in fp32, the unsigned min (of
// non-zero) and max of |bits| for the block's exceptional cases, and, with a table, one vector
// shift for 16 raw ids stored to the stack and 16 scalar increments into four interleaved
// sub-histograms (no store-to-load chain on runs of equal ids up to four long). Zeros and
// negatives come from the table at the fold; blocks whose |bits| maximum says NaN/Inf are
// recomputed exactly with masks, blocks whose minimum says subnormal count those that share the
// zeros' raw id.
template <Elem E>
DNNTRACE_V4 inline __m512 v4_load16(const void* p, int i) {
  if constexpr (E == Elem::kF32) {
    return _mm512_loadu_ps(static_cast<const float*>(p) + i);
  } else {
    const __m256i h =
        _mm256_loadu_si256(reinterpret_cast<const __m256i*>(static_cast<const uint16_t*>(p) + i));
    if constexpr (E == Elem::kBF16) {
      return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
    } else {
      return _mm512_cvtph_ps(h);  // exact, subnormal halves included
    }
  }
}

// Sub-counter increments of 16 stored ids: two ids per 64-bit load; counter 4 * id + lane is one
// address (id * 8 + 2 * lane).
DNNTRACE_V4 inline void v4_scatter16(const uint32_t* ids, uint16_t* __restrict table) {
  for (int j = 0; j < 16; j += 4) {
    uint64_t p01, p23;
    std::memcpy(&p01, ids + j, sizeof p01);
    std::memcpy(&p23, ids + j + 2, sizeof p23);
    table[4 * (p01 & 0xffffffffu) + 0] += 1;
    table[4 * (p01 >> 32) + 1] += 1;
    table[4 * (p23 & 0xffffffffu) + 2] += 1;
    table[4 * (p23 >> 32) + 3] += 1;
  }
}

// One block. With kScatter, the raw ids of its first 16 * floor(n / 16) values are stored to
// `ids` (returned: how many) for the caller to scatter, the rest scattered here; and the
// `prev_n` ids of the previous block (a multiple of 16) are scattered inside the vector loop, so
// the out-of-order core overlaps the increments (load and store ports) with the moments (the
// two 512-bit vector ports). Extracting ids from registers instead costs 2 vector uops each,
// and loads right behind the 64-byte stores would wait on store forwarding.
template <Elem E, bool kScatter>
DNNTRACE_V4 int v4_block(const void* x, int n, int k, uint16_t* __restrict table, BlockAcc& acc,
                         uint32_t* __restrict ids, const uint32_t* __restrict prev, int prev_n) {
  const int shift = 23 - k;
  const __m128i shiftv = _mm_cvtsi32_si128(shift);
  __m512d s0 = _mm512_setzero_pd(), s1 = s0, q0 = s0, q1 = s0;
  __m512 mn = _mm512_set1_ps(__builtin_huge_valf()), mx = _mm512_set1_ps(-__builtin_huge_valf());
  __m512i mina = _mm512_set1_epi32(-1);
  const __m512i absm = _mm512_set1_epi32(0x7fffffff);
  const __m512i negzero = _mm512_set1_epi32(static_cast<int32_t>(0x80000000u));
  int64_t neg = 0, zer = 0, nzer = 0;  // moments-only mode
  int i = 0;
  const char* pf = static_cast<const char*>(x);
  for (; i + 16 <= n; i += 16) {
    // One line prefetched per 16 values, 8 KB ahead into L1 and 32 KB ahead into L2: measured
    // 1.0 -> 0.55 ns per fp32 value from memory (a burst of 64 prefetches per block, or none,
    // leaves the loop waiting on memory; a prefetch never faults past the end).
    _mm_prefetch(pf + i * (E == Elem::kF32 ? 4 : 2) + 8192, _MM_HINT_T0);
    _mm_prefetch(pf + i * (E == Elem::kF32 ? 4 : 2) + 32768, _MM_HINT_T1);
    const __m512 v = v4_load16<E>(x, i);
    const __m512i u = _mm512_castps_si512(v);
    const __m512d lo = _mm512_cvtps_pd(_mm512_castps512_ps256(v));
    const __m512d hi =
        _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1)));
    s0 = _mm512_add_pd(s0, lo);
    s1 = _mm512_add_pd(s1, hi);
    q0 = _mm512_fmadd_pd(lo, lo, q0);  // exact squares: a float's square fits a double
    q1 = _mm512_fmadd_pd(hi, hi, q1);
    mn = _mm512_min_ps(v, mn);  // a NaN in v leaves mn (NaN blocks are redone below)
    mx = _mm512_max_ps(v, mx);
    const __m512i a = _mm512_and_si512(u, absm);
    const __mmask16 nz = _mm512_test_epi32_mask(a, a);
    mina = _mm512_mask_min_epu32(mina, nz, mina, a);
    if constexpr (kScatter) {
      _mm512_store_si512(ids + i, _mm512_srl_epi32(u, shiftv));
      if (i < prev_n) v4_scatter16(prev + i, table);
    } else {
      neg += __builtin_popcount(_mm512_cmp_ps_mask(v, _mm512_setzero_ps(), _CMP_LT_OQ));
      zer += __builtin_popcount(static_cast<uint16_t>(~nz));
      nzer += __builtin_popcount(_mm512_cmpeq_epi32_mask(u, negzero));
    }
  }
  const int stored = i;
  if constexpr (kScatter) {
    for (int j = i; j < prev_n; j += 16) v4_scatter16(prev + j, table);
  }
  double bs = _mm512_reduce_add_pd(_mm512_add_pd(s0, s1));
  double bq = _mm512_reduce_add_pd(_mm512_add_pd(q0, q1));
  const float bmn = _mm512_reduce_min_ps(mn), bmx = _mm512_reduce_max_ps(mx);
  const uint32_t bmina = _mm512_reduce_min_epu32(mina);
  finish_block<E, kScatter>(x, i, n, k, table, {bs, bq, bmn, bmx, bmina, neg, zer, nzer}, acc);
  return stored;
}

template <Elem E>
void v4_dispatch(const void* x, int n, int k, uint16_t* table, BlockAcc& acc) {
  dispatch_block(v4_block<E, true>, v4_block<E, false>, v4_scatter16, x, n, k, table, acc);
}

template <Elem E>
void v4_span(const void* x, int64_t n, int k, uint16_t* table, BlockAcc& acc) {
  span_blocks<E>(v4_block<E, true>, v4_block<E, false>, v4_scatter16, x, n, k, table, acc);
}

// The AVX2 fused block (x86-64-v3: AVX2, FMA, F16C), for CPUs without AVX-512 (AMD Zen 1-3,
// Intel before Skylake-SP and most client parts). The same plan as the AVX-512 block, in two
// 8-lane halves per 16 values: sums and squares of pairs in two 4 x fp64 accumulators each, min/max
// in fp32, and the unsigned minimum of |bits| - 1 (a zero wraps to the largest value, so no mask
// register is needed) for the smallest non-zero |x|; raw ids stored to the stack by one vector
// shift per 8 values and scattered inside the next block's vector loop. Without a table, zeros,
// negatives and negative zeros are counted in vector lanes (a block has at most 1024 values).
// On a 2-core AMD EPYC (Zen 3) VM, 10^8 values on one thread against the baseline version: fp32
// 2.8 -> 9.3 GB/s, bf16 1.4 -> 4.7, fp16 0.8 -> 5.0 (bench/NOTES.md, tenth session).
#define DNNTRACE_V3 __attribute__((target("arch=x86-64-v3")))

template <Elem E>
DNNTRACE_V3 inline void v3_load16(const void* p, int i, __m256& a, __m256& b) {
  if constexpr (E == Elem::kF32) {
    const float* f = static_cast<const float*>(p) + i;
    a = _mm256_loadu_ps(f);
    b = _mm256_loadu_ps(f + 8);
  } else {
    const __m128i* h = reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(p) + i);
    const __m128i h0 = _mm_loadu_si128(h), h1 = _mm_loadu_si128(h + 1);
    if constexpr (E == Elem::kBF16) {
      a = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h0), 16));
      b = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h1), 16));
    } else {
      a = _mm256_cvtph_ps(h0);  // exact, subnormal halves included
      b = _mm256_cvtph_ps(h1);
    }
  }
}

// The four 16-bit sub-counters of an id as two 32-bit words, incremented by 32-bit adds of 1 (low
// half) or 2^16 (high half): on Zen 3 a 16-bit read-modify-write to memory costs 0.62-0.67 ns,
// a 32-bit one 0.33-0.37 ns (bench/NOTES.md). No carry crosses the halves: the caller folds the
// sub-counters before any passes 65535 (at most 49,152), and the uint16 view of the table is the
// same. Consecutive values go to different words (sub-counters 0, 2, 1, 3).
typedef uint32_t __attribute__((may_alias)) u32_alias;

DNNTRACE_V3 inline void v3_scatter16(const uint32_t* ids, uint16_t* __restrict table) {
  u32_alias* w = reinterpret_cast<u32_alias*>(table);
  for (int j = 0; j < 16; j += 4) {
    uint64_t p01, p23;
    std::memcpy(&p01, ids + j, sizeof p01);
    std::memcpy(&p23, ids + j + 2, sizeof p23);
    w[2 * (p01 & 0xffffffffu)] += 1u;
    w[2 * (p01 >> 32) + 1] += 1u;
    w[2 * (p23 & 0xffffffffu)] += 0x10000u;
    w[2 * (p23 >> 32) + 1] += 0x10000u;
  }
}

DNNTRACE_V3 inline double v3_hsum(__m256d v) {
  const __m128d s = _mm_add_pd(_mm256_castpd256_pd128(v), _mm256_extractf128_pd(v, 1));
  return _mm_cvtsd_f64(_mm_add_sd(s, _mm_unpackhi_pd(s, s)));
}

DNNTRACE_V3 inline int64_t v3_hsum_epi32(__m256i v) {
  alignas(32) int32_t l[8];
  _mm256_store_si256(reinterpret_cast<__m256i*>(l), v);
  int64_t s = 0;
  for (int j = 0; j < 8; ++j) s += l[j];
  return s;
}

// One block; the same contract as v4_block (ids of the first 16 * floor(n / 16) values stored
// for the caller, the previous block's `prev_n` ids scattered inside the vector loop).
template <Elem E, bool kScatter>
DNNTRACE_V3 int v3_block(const void* x, int n, int k, uint16_t* __restrict table, BlockAcc& acc,
                         uint32_t* __restrict ids, const uint32_t* __restrict prev, int prev_n) {
  const int shift = 23 - k;
  const __m128i shiftv = _mm_cvtsi32_si128(shift);
  __m256d s0 = _mm256_setzero_pd(), s1 = s0, q0 = s0, q1 = s0;
  __m256 mn = _mm256_set1_ps(__builtin_huge_valf()), mx = _mm256_set1_ps(-__builtin_huge_valf());
  __m256i mina = _mm256_set1_epi32(-1);  // min of |bits| - 1, unsigned: a zero wraps to the max
  const __m256i absm = _mm256_set1_epi32(0x7fffffff), one = _mm256_set1_epi32(1);
  const __m256i izero = _mm256_setzero_si256();
  const __m256i negzero = _mm256_set1_epi32(static_cast<int32_t>(0x80000000u));
  const __m256 fzero = _mm256_setzero_ps();
  static_assert(2 * kBlock / 16 < 1024, "a lane's count of a block must fit 10 bits");
  __m256i cnt = izero;  // moments-only mode: negatives | zeros << 10 | negative zeros << 20
  int i = 0;
  const char* pf = static_cast<const char*>(x);
  for (; i + 16 <= n; i += 16) {
    // One line 8 KB ahead into L1 (on Zen 3 the L2 prefetch of the AVX-512 loop measured 3-8 %
    // slower, no prefetch 8-15 % slower for fp32).
    _mm_prefetch(pf + i * (E == Elem::kF32 ? 4 : 2) + 8192, _MM_HINT_T0);
    __m256 va, vb;
    v3_load16<E>(x, i, va, vb);
    __m256d a0, a1, b0, b1;
    if constexpr (E == Elem::kF32) {  // halves converted from memory: no lane-crossing extract
      const float* f = static_cast<const float*>(x) + i;
      a0 = _mm256_cvtps_pd(_mm_loadu_ps(f));
      a1 = _mm256_cvtps_pd(_mm_loadu_ps(f + 4));
      b0 = _mm256_cvtps_pd(_mm_loadu_ps(f + 8));
      b1 = _mm256_cvtps_pd(_mm_loadu_ps(f + 12));
    } else {
      a0 = _mm256_cvtps_pd(_mm256_castps256_ps128(va));
      a1 = _mm256_cvtps_pd(_mm256_extractf128_ps(va, 1));
      b0 = _mm256_cvtps_pd(_mm256_castps256_ps128(vb));
      b1 = _mm256_cvtps_pd(_mm256_extractf128_ps(vb, 1));
    }
    // Pairs first, so each accumulator takes one add per 16 values: four accumulators, not
    // eight (AVX2 has 16 vector registers; eight were spilled, and the adds then waited on
    // store forwarding). A float's square is exact in a double; a pair's sum rounds once.
    s0 = _mm256_add_pd(s0, _mm256_add_pd(a0, b0));
    s1 = _mm256_add_pd(s1, _mm256_add_pd(a1, b1));
    q0 = _mm256_add_pd(q0, _mm256_fmadd_pd(b0, b0, _mm256_mul_pd(a0, a0)));
    q1 = _mm256_add_pd(q1, _mm256_fmadd_pd(b1, b1, _mm256_mul_pd(a1, a1)));
    mn = _mm256_min_ps(_mm256_min_ps(va, vb), mn);  // NaN blocks are redone below
    mx = _mm256_max_ps(_mm256_max_ps(va, vb), mx);
    const __m256i ua = _mm256_castps_si256(va), ub = _mm256_castps_si256(vb);
    const __m256i aa = _mm256_and_si256(ua, absm), ab = _mm256_and_si256(ub, absm);
    mina = _mm256_min_epu32(mina,
                            _mm256_min_epu32(_mm256_sub_epi32(aa, one), _mm256_sub_epi32(ab, one)));
    if constexpr (kScatter) {
      _mm256_store_si256(reinterpret_cast<__m256i*>(ids + i), _mm256_srl_epi32(ua, shiftv));
      _mm256_store_si256(reinterpret_cast<__m256i*>(ids + i + 8), _mm256_srl_epi32(ub, shiftv));
      if (i < prev_n) v3_scatter16(prev + i, table);
    } else {
      // Compare masks are -1 per true lane. The three counts share one register, in 10-bit
      // fields (a lane sees at most 2 * 1024 / 16 = 128 values of a block): a register each
      // made GCC spill a sum accumulator, and the sum then waited on store forwarding.
      const __m256i ng =
          _mm256_add_epi32(_mm256_castps_si256(_mm256_cmp_ps(va, fzero, _CMP_LT_OQ)),
                           _mm256_castps_si256(_mm256_cmp_ps(vb, fzero, _CMP_LT_OQ)));
      const __m256i zr =
          _mm256_add_epi32(_mm256_cmpeq_epi32(aa, izero), _mm256_cmpeq_epi32(ab, izero));
      const __m256i nz =
          _mm256_add_epi32(_mm256_cmpeq_epi32(ua, negzero), _mm256_cmpeq_epi32(ub, negzero));
      cnt = _mm256_sub_epi32(
          cnt, _mm256_add_epi32(
                   ng, _mm256_add_epi32(_mm256_slli_epi32(zr, 10), _mm256_slli_epi32(nz, 20))));
    }
  }
  const int stored = i;
  if constexpr (kScatter) {
    for (int j = i; j < prev_n; j += 16) v3_scatter16(prev + j, table);
  }
  double bs = v3_hsum(_mm256_add_pd(s0, s1));
  double bq = v3_hsum(_mm256_add_pd(q0, q1));
  alignas(32) float lmn[8], lmx[8];
  alignas(32) uint32_t lmina[8];
  _mm256_store_ps(lmn, mn);
  _mm256_store_ps(lmx, mx);
  _mm256_store_si256(reinterpret_cast<__m256i*>(lmina), mina);
  float bmn = __builtin_huge_valf(), bmx = -__builtin_huge_valf();
  uint32_t raw = 0xffffffffu;
  for (int j = 0; j < 8; ++j) {
    bmn = lmn[j] < bmn ? lmn[j] : bmn;
    bmx = lmx[j] > bmx ? lmx[j] : bmx;
    raw = lmina[j] < raw ? lmina[j] : raw;
  }
  uint32_t bmina = raw + 1u;  // back from |bits| - 1; 0: no non-zero value
  if (bmina == 0u) bmina = 0xffffffffu;
  int64_t neg = 0, zer = 0, nzer = 0;
  if constexpr (!kScatter) {
    neg = v3_hsum_epi32(_mm256_and_si256(cnt, _mm256_set1_epi32(1023)));
    zer = v3_hsum_epi32(_mm256_and_si256(_mm256_srli_epi32(cnt, 10), _mm256_set1_epi32(1023)));
    nzer = v3_hsum_epi32(_mm256_srli_epi32(cnt, 20));
  }
  finish_block<E, kScatter>(x, i, n, k, table, {bs, bq, bmn, bmx, bmina, neg, zer, nzer}, acc);
  return stored;
}

template <Elem E>
void v3_dispatch(const void* x, int n, int k, uint16_t* table, BlockAcc& acc) {
  dispatch_block(v3_block<E, true>, v3_block<E, false>, v3_scatter16, x, n, k, table, acc);
}

template <Elem E>
void v3_span(const void* x, int64_t n, int k, uint16_t* table, BlockAcc& acc) {
  span_blocks<E>(v3_block<E, true>, v3_block<E, false>, v3_scatter16, x, n, k, table, acc);
}

}  // namespace
#endif

namespace {

enum class Isa { kBaseline, kAvx2, kAvx512 };

// The best version this CPU runs, capped by DNNTRACE_CPU_ISA=baseline|avx2|avx512 (or
// DNNTRACE_CPU_BASELINE=1) in the environment when the first block runs, so tests can compare
// every version a machine supports.
Isa isa() {
#if defined(DNNTRACE_AVX512_PATH)
  static const Isa chosen = [] {
    __builtin_cpu_init();
    Isa best = __builtin_cpu_supports("x86-64-v4")   ? Isa::kAvx512
               : __builtin_cpu_supports("x86-64-v3") ? Isa::kAvx2
                                                     : Isa::kBaseline;
    Isa cap = Isa::kAvx512;
    const char* base = std::getenv("DNNTRACE_CPU_BASELINE");
    if (base && base[0] == '1') cap = Isa::kBaseline;
    const char* env = std::getenv("DNNTRACE_CPU_ISA");
    if (env && env[0]) {
      if (std::strcmp(env, "baseline") == 0)
        cap = Isa::kBaseline;
      else if (std::strcmp(env, "avx2") == 0)
        cap = cap == Isa::kBaseline ? cap : Isa::kAvx2;
      else if (std::strcmp(env, "avx512") != 0)
        std::fprintf(stderr,
                     "dnntrace: DNNTRACE_CPU_ISA=%.40s is not baseline, avx2 or avx512; ignored\n",
                     env);
    }
    return static_cast<int>(best) < static_cast<int>(cap) ? best : cap;
  }();
  return chosen;
#else
  return Isa::kBaseline;
#endif
}

bool use_avx512() { return isa() == Isa::kAvx512; }
bool use_avx2() { return isa() == Isa::kAvx2; }

}  // namespace

const char* block_fused_isa() {
  switch (isa()) {
    case Isa::kAvx512:
      return "avx512";
    case Isa::kAvx2:
      return "avx2";
    default:
      return "baseline";
  }
}

void span_fused(Elem e, const void* x, int64_t n, int k, uint16_t* table, BlockAcc& acc) {
#if defined(DNNTRACE_AVX512_PATH)
  if (use_avx512()) {
    switch (e) {
      case Elem::kF32:
        return v4_span<Elem::kF32>(x, n, k, table, acc);
      case Elem::kBF16:
        return v4_span<Elem::kBF16>(x, n, k, table, acc);
      case Elem::kF16:
        return v4_span<Elem::kF16>(x, n, k, table, acc);
    }
  }
  if (use_avx2()) {
    switch (e) {
      case Elem::kF32:
        return v3_span<Elem::kF32>(x, n, k, table, acc);
      case Elem::kBF16:
        return v3_span<Elem::kBF16>(x, n, k, table, acc);
      case Elem::kF16:
        return v3_span<Elem::kF16>(x, n, k, table, acc);
    }
  }
#endif
  const int64_t esize = e == Elem::kF32 ? 4 : 2;
  for (int64_t off = 0; off < n; off += kBlock) {
    const int m = static_cast<int>(std::min<int64_t>(kBlock, n - off));
    if (off + 2 * kBlock < n) {
      const char* next = static_cast<const char*>(x) + (off + 2 * kBlock) * esize;
      for (int64_t c = 0; c < kBlock * esize; c += 64) __builtin_prefetch(next + c);
    }
    block_fused(e, static_cast<const char*>(x) + off * esize, m, k, table, acc);
  }
}

void block_fused(Elem e, const void* x, int n, int k, uint16_t* table, BlockAcc& acc) {
#if defined(DNNTRACE_AVX512_PATH)
  if (use_avx512()) {
    switch (e) {
      case Elem::kF32:
        return v4_dispatch<Elem::kF32>(x, n, k, table, acc);
      case Elem::kBF16:
        return v4_dispatch<Elem::kBF16>(x, n, k, table, acc);
      case Elem::kF16:
        return v4_dispatch<Elem::kF16>(x, n, k, table, acc);
    }
  }
  if (use_avx2()) {
    switch (e) {
      case Elem::kF32:
        return v3_dispatch<Elem::kF32>(x, n, k, table, acc);
      case Elem::kBF16:
        return v3_dispatch<Elem::kBF16>(x, n, k, table, acc);
      case Elem::kF16:
        return v3_dispatch<Elem::kF16>(x, n, k, table, acc);
    }
  }
#endif
  float fbuf[kBlock];
  const float* f = static_cast<const float*>(x);
  if (e == Elem::kF16) {
    half_to_float(static_cast<const uint16_t*>(x), n, fbuf);
    f = fbuf;
  } else if (e == Elem::kBF16) {
    bf16_to_float(static_cast<const uint16_t*>(x), n, fbuf);
    f = fbuf;
  }
  if (table)
    f32_block_fused(f, n, k, table, acc);
  else
    f32_block_moments(f, n, acc);
}

}  // namespace dnntrace::core
