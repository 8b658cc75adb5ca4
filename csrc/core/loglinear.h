// The log-linear histogram of dnntrace: one bucket per (sign, binary exponent, top k mantissa
// bits).
//
// A finite non-zero value v with |v| = 2^e * (1 + f), 0 <= f < 1, falls in bucket
// (e - emin) * 2^k + floor(f * 2^k) of its sign. For fp32 that is the float's bits shifted right by
// 23 - k, so no log is taken and counts are integers: blocks, steps and ranks merge exactly by
// addition. With the harmonic mean of a bucket's bounds as its representative, every value inside
// the exponent window is represented with relative error below 2^-(k+1) (0.78% at k = 6).
//
// This header is torch-free and shared by the CPU kernel, the CUDA kernel and (through the
// constants exported by the bindings) the Python reader, so there is one definition of the mapping.
#pragma once

#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define DNNTRACE_HD __host__ __device__ __forceinline__
#else
#define DNNTRACE_HD inline
#endif

namespace dnntrace::core {

// Layout of one slot's row in the int64 `counts` state tensor: a header of special counters, then
// the histogram, negative values first (most negative first) then positive values (ascending), so a
// cumulative sum over the row in order is the CDF.
enum CountField : int {
  kCount = 0,      // every element seen, NaN included
  kNan = 1,        //
  kPosInf = 2,     // kPosInf + sign
  kNegInf = 3,     //
  kZeros = 4,      // +0 and -0
  kNegatives = 5,  // x < 0, -inf included, -0 and NaN excluded
  kUnderPos = 6,   // finite, 0 < |x| < 2^emin; kUnderPos + sign
  kUnderNeg = 7,   //
  kOverPos = 8,    // finite, |x| >= 2^(emin + octaves); kOverPos + sign
  kOverNeg = 9,    //
  kCalls = 10,     // accumulate calls into this slot
  kHeader = 16,    // first histogram bucket
};

// Layout of one slot's row in the float64 `moments` state tensor. Sums are over finite values and
// carry a compensation term (Neumaier), so sum = moments[kSum] + moments[kSumComp].
enum MomentField : int {
  kSum = 0,
  kSumComp = 1,
  kSumSq = 2,
  kSumSqComp = 3,
  kMin = 4,  // finite minimum, +inf when there is none
  kMax = 5,  // finite maximum, -inf when there is none
  kNumMoments = 8,
};

constexpr int kDefaultMantissaBits = 6;
constexpr int kMaxMantissaBits = 7;  // bf16 carries 7 mantissa bits
constexpr int kDefaultMinExponent = -48;
constexpr int kDefaultOctaves = 64;

struct HistLayout {
  int k;        // mantissa bits per bucket, 0..7
  int emin;     // smallest binary exponent inside the window, >= -126
  int octaves;  // exponents emin .. emin + octaves - 1 are inside; emin + octaves <= 128

  DNNTRACE_HD int per_sign() const { return octaves << k; }
  DNNTRACE_HD int bins() const { return 2 * per_sign(); }
  DNNTRACE_HD int width() const { return kHeader + bins(); }
};

// Returns nullptr when the layout is valid, otherwise a message naming the bad parameter.
inline const char* validate_layout(const HistLayout& l) {
  if (l.k < 0 || l.k > kMaxMantissaBits) return "k must be in 0..7";
  if (l.octaves < 1 || l.octaves > 254) return "octaves must be in 1..254";
  if (l.emin < -126) return "emin must be >= -126 (subnormals count as underflow)";
  if (l.emin + l.octaves > 128) return "emin + octaves must be <= 128";
  return nullptr;
}

DNNTRACE_HD uint32_t f32_bits(float v) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(v);
#else
  uint32_t u;
  std::memcpy(&u, &v, sizeof u);
  return u;
#endif
}

DNNTRACE_HD uint64_t f64_bits(double v) {
#if defined(__CUDA_ARCH__)
  return static_cast<uint64_t>(__double_as_longlong(v));
#else
  uint64_t u;
  std::memcpy(&u, &v, sizeof u);
  return u;
#endif
}

DNNTRACE_HD float f32_from_bits(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
#endif
}

// fp16 / bf16 bits to fp32, exact (shared with the CUDA kernel).
DNNTRACE_HD float half_bits_to_float(uint16_t h) {
  const uint32_t s = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t e = (h >> 10) & 0x1fu;
  const uint32_t m = h & 0x3ffu;
  uint32_t bits;
  if (e == 0x1fu) {
    bits = s | 0x7f800000u | (m << 13);
  } else if (e == 0) {
    // subnormal (or zero): m * 2^-24 is exact in fp32
    const float f = static_cast<float>(m) * 5.9604644775390625e-8f;
    bits = s | f32_bits(f);
  } else {
    bits = s | ((e + 112u) << 23) | (m << 13);
  }
  return f32_from_bits(bits);
}

DNNTRACE_HD float bf16_bits_to_float(uint16_t h) {
  return f32_from_bits(static_cast<uint32_t>(h) << 16);
}

// Index into a slot's counts row for a value given by its fp32 bits. Written with selects only,
// so the CPU loop vectorises and CUDA warps do not diverge.
DNNTRACE_HD int32_t row_index_f32(uint32_t bits, int k, int32_t lo, int32_t per_sign) {
  const uint32_t a = bits & 0x7fffffffu;
  const int32_t s = static_cast<int32_t>(bits >> 31);
  const int32_t j = static_cast<int32_t>(a >> (23 - k)) - lo;
  // j for positive values, ~j = -1 - j for negative ones: the negative half is stored reversed.
  const int32_t hist = kHeader + per_sign + (j ^ -s);
  int32_t sp = (j < 0) ? (kUnderPos + s) : (kOverPos + s);
  sp = (a == 0u) ? static_cast<int32_t>(kZeros) : sp;
  sp = (a == 0x7f800000u) ? (kPosInf + s) : sp;
  sp = (a > 0x7f800000u) ? static_cast<int32_t>(kNan) : sp;
  return (static_cast<uint32_t>(j) < static_cast<uint32_t>(per_sign)) ? hist : sp;
}

// lo = (emin + 127) << k: subtracting it puts exponent emin at bucket 0.
DNNTRACE_HD int32_t f32_lo(const HistLayout& l) { return (l.emin + 127) << l.k; }

DNNTRACE_HD int32_t row_index(float v, const HistLayout& l) {
  return row_index_f32(f32_bits(v), l.k, f32_lo(l), l.per_sign());
}

// The same mapping for fp64 values, from their own bits (no rounding to fp32 first, so a double
// lands in the bucket of its exact value).
DNNTRACE_HD int32_t row_index(double v, const HistLayout& l) {
  const uint64_t bits = f64_bits(v);
  const uint64_t a = bits & 0x7fffffffffffffffull;
  const int32_t s = static_cast<int32_t>(bits >> 63);
  if (a > 0x7ff0000000000000ull) return kNan;
  if (a == 0x7ff0000000000000ull) return kPosInf + s;
  if (a == 0) return kZeros;
  const int64_t j =
      static_cast<int64_t>(a >> (52 - l.k)) - (static_cast<int64_t>(l.emin + 1023) << l.k);
  if (j < 0) return kUnderPos + s;
  if (j >= l.per_sign()) return kOverPos + s;
  const int32_t j32 = static_cast<int32_t>(j);
  return kHeader + l.per_sign() + (j32 ^ -s);
}

// True for x < 0 excluding -0 and NaN (fp32 bits).
DNNTRACE_HD bool is_negative_f32(uint32_t bits) {
  return bits > 0x80000000u && bits <= 0xff800000u;
}

DNNTRACE_HD bool is_finite_f32(uint32_t bits) { return (bits & 0x7f800000u) != 0x7f800000u; }

// Error-free sum (Knuth's TwoSum): s + e == a + b exactly. When s overflows (or an input is not
// finite) there is no finite error term: e is 0, so a compensation never turns inf into NaN.
DNNTRACE_HD void two_sum(double a, double b, double& s, double& e) {
  s = a + b;
  const double bb = s - a;
  e = (a - (s - bb)) + (b - bb);
  if ((f64_bits(s) & 0x7ff0000000000000ull) == 0x7ff0000000000000ull) e = 0.0;
}

}  // namespace dnntrace::core
