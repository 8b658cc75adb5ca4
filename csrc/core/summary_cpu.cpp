#include "summary_cpu.h"

#include <cstring>

namespace dnntrace::core {

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define DNNTRACE_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define DNNTRACE_CLONES
#endif

namespace {

void fold(double& hi, double& lo, double v) {
  double s, e;
  two_sum(hi, v, s, e);
  hi = s;
  lo += e;
}

}  // namespace

void BlockAcc::merge(const BlockAcc& o) {
  fold(sum, sum_c, o.sum);
  sum_c += o.sum_c;
  fold(sq, sq_c, o.sq);
  sq_c += o.sq_c;
  mn = o.mn < mn ? o.mn : mn;
  mx = o.mx > mx ? o.mx : mx;
  negatives += o.negatives;
  nan += o.nan;
  posinf += o.posinf;
  neginf += o.neginf;
  zeros += o.zeros;
}

DNNTRACE_CLONES void f32_block_moments(const float* x, int n, BlockAcc& acc) {
  double s[kLanes] = {}, q[kLanes] = {};
  float mn[kLanes], mx[kLanes];
  int32_t neg[kLanes] = {}, nan[kLanes] = {}, pinf[kLanes] = {}, ninf[kLanes] = {},
          zer[kLanes] = {};
  for (int l = 0; l < kLanes; ++l) {
    mn[l] = __builtin_huge_valf();
    mx[l] = -__builtin_huge_valf();
  }
  const int full = n - n % kLanes;
  auto body = [&](int l, float v) {
    uint32_t u;
    std::memcpy(&u, &v, sizeof u);
    const uint32_t a = u & 0x7fffffffu;
    const bool fin = a < 0x7f800000u;
    const float f = fin ? v : 0.0f;
    const double d = static_cast<double>(f);
    s[l] += d;
    q[l] += d * d;  // exact: the square of a float fits in a double
    mn[l] = (fin && v < mn[l]) ? v : mn[l];
    mx[l] = (fin && v > mx[l]) ? v : mx[l];
    neg[l] += (u > 0x80000000u && u <= 0xff800000u) ? 1 : 0;
    nan[l] += (a > 0x7f800000u) ? 1 : 0;
    pinf[l] += (u == 0x7f800000u) ? 1 : 0;
    ninf[l] += (u == 0xff800000u) ? 1 : 0;
    zer[l] += (a == 0u) ? 1 : 0;
  };
  for (int i = 0; i < full; i += kLanes)
    for (int l = 0; l < kLanes; ++l) body(l, x[i + l]);
  for (int i = full; i < n; ++i) body(i - full, x[i]);
  double bs = 0, bq = 0;
  for (int l = 0; l < kLanes; ++l) {
    bs += s[l];
    bq += q[l];
    acc.mn = mn[l] < acc.mn ? mn[l] : acc.mn;
    acc.mx = mx[l] > acc.mx ? mx[l] : acc.mx;
    acc.negatives += neg[l];
    acc.nan += nan[l];
    acc.posinf += pinf[l];
    acc.neginf += ninf[l];
    acc.zeros += zer[l];
  }
  fold(acc.sum, acc.sum_c, bs);
  fold(acc.sq, acc.sq_c, bq);
}

DNNTRACE_CLONES void f64_block_moments(const double* x, int n, BlockAcc& acc) {
  double s[kLanes] = {}, q[kLanes] = {};
  double mn[kLanes], mx[kLanes];
  int32_t neg[kLanes] = {}, nan[kLanes] = {}, pinf[kLanes] = {}, ninf[kLanes] = {},
          zer[kLanes] = {};
  for (int l = 0; l < kLanes; ++l) {
    mn[l] = __builtin_huge_val();
    mx[l] = -__builtin_huge_val();
  }
  const int full = n - n % kLanes;
  auto body = [&](int l, double v) {
    uint64_t u;
    std::memcpy(&u, &v, sizeof u);
    const uint64_t a = u & 0x7fffffffffffffffull;
    const bool fin = a < 0x7ff0000000000000ull;
    const double f = fin ? v : 0.0;
    s[l] += f;
    q[l] += f * f;
    mn[l] = (fin && v < mn[l]) ? v : mn[l];
    mx[l] = (fin && v > mx[l]) ? v : mx[l];
    neg[l] += (u > 0x8000000000000000ull && u <= 0xfff0000000000000ull) ? 1 : 0;
    nan[l] += (a > 0x7ff0000000000000ull) ? 1 : 0;
    pinf[l] += (u == 0x7ff0000000000000ull) ? 1 : 0;
    ninf[l] += (u == 0xfff0000000000000ull) ? 1 : 0;
    zer[l] += (a == 0u) ? 1 : 0;
  };
  for (int i = 0; i < full; i += kLanes)
    for (int l = 0; l < kLanes; ++l) body(l, x[i + l]);
  for (int i = full; i < n; ++i) body(i - full, x[i]);
  double bs = 0, bq = 0;
  for (int l = 0; l < kLanes; ++l) {
    bs += s[l];
    bq += q[l];
    acc.mn = mn[l] < acc.mn ? mn[l] : acc.mn;
    acc.mx = mx[l] > acc.mx ? mx[l] : acc.mx;
    acc.negatives += neg[l];
    acc.nan += nan[l];
    acc.posinf += pinf[l];
    acc.neginf += ninf[l];
    acc.zeros += zer[l];
  }
  fold(acc.sum, acc.sum_c, bs);
  fold(acc.sq, acc.sq_c, bq);
}

DNNTRACE_CLONES void f32_block_indices(const float* x, int n, const HistLayout& l,
                                       int32_t* idx) {
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

DNNTRACE_CLONES void half_to_float(const uint16_t* x, int n, float* out) {
  for (int i = 0; i < n; ++i) out[i] = half_bits_to_float(x[i]);
}

DNNTRACE_CLONES void bf16_to_float(const uint16_t* x, int n, float* out) {
  for (int i = 0; i < n; ++i) out[i] = bf16_bits_to_float(x[i]);
}

}  // namespace dnntrace::core
