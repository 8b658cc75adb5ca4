#include "units_cpu.h"

namespace dnntrace::core {
namespace {

#define DNNTRACE_INLINE __attribute__((always_inline)) inline

constexpr int kLanes = 8;

// ---- rows: the unit loop is innermost and the loop vectoriser handles it --------------------

template <typename T>
DNNTRACE_INLINE void act_rows(const T* __restrict__ p, int64_t n, int64_t U, int64_t stride,
                              double lo, double hi, double* __restrict__ sum,
                              double* __restrict__ sq, double* __restrict__ fire,
                              double* __restrict__ sat, double* __restrict__ mx) {
  for (int64_t r = 0; r < n; ++r) {
    const T* __restrict__ row = p + r * stride;
    for (int64_t u = 0; u < U; ++u) {
      const double v = static_cast<double>(row[u]);
      sum[u] += v;
      sq[u] += v * v;
      fire[u] += unit_fires(v);
      sat[u] += unit_saturated(v, lo, hi);
      mx[u] = unit_fold_max(mx[u], v);
    }
  }
}

template <typename T>
DNNTRACE_INLINE void grad_rows(const T* __restrict__ g, const T* __restrict__ x, int64_t n,
                               int64_t U, int64_t stride, double* __restrict__ g2,
                               double* __restrict__ xg, double* __restrict__ axg) {
  for (int64_t r = 0; r < n; ++r) {
    const T* __restrict__ grow = g + r * stride;
    if (x == nullptr) {
      for (int64_t u = 0; u < U; ++u) {
        const double gv = static_cast<double>(grow[u]);
        g2[u] += gv * gv;
      }
      continue;
    }
    const T* __restrict__ xrow = x + r * stride;
    for (int64_t u = 0; u < U; ++u) {
      const double gv = static_cast<double>(grow[u]);
      const double pv = gv * static_cast<double>(xrow[u]);
      g2[u] += gv * gv;
      xg[u] += pv;
      axg[u] += unit_abs(pv);
    }
  }
}

// ---- spans: 8 lanes per statistic ------------------------------------------------------------
// Element i of a span goes to lane i % 8 while 8 remain, the span's tail to lanes 0, 1, ...; the
// lanes persist across the spans of a call and are folded in one fixed order at its end.

DNNTRACE_INLINE double fold8(const double* a) {
  return ((a[0] + a[1]) + (a[2] + a[3])) + ((a[4] + a[5]) + (a[6] + a[7]));
}

struct ActLanes {
  double s[kLanes], q[kLanes], f[kLanes], t[kLanes], m[kLanes];
  DNNTRACE_INLINE ActLanes() {
    for (int j = 0; j < kLanes; ++j) {
      s[j] = q[j] = f[j] = t[j] = 0.0;
      m[j] = -__builtin_huge_val();
    }
  }
  template <typename T>
  DNNTRACE_INLINE void add(const T* p, int64_t n, double lo, double hi) {  // n < 8 per call
    for (int64_t j = 0; j < n; ++j) {
      const double v = static_cast<double>(p[j]);
      s[j] += v;
      q[j] += v * v;
      f[j] += unit_fires(v);
      t[j] += unit_saturated(v, lo, hi);
      m[j] = unit_fold_max(m[j], v);
    }
  }
  DNNTRACE_INLINE void out(double* o) const {
    o[0] += fold8(s);
    o[1] += fold8(q);
    o[2] += fold8(f);
    o[3] += fold8(t);
    for (int j = 0; j < kLanes; ++j) o[4] = unit_fold_max(o[4], m[j]);
  }
};

struct GradLanes {
  double a[kLanes], b[kLanes], c[kLanes];
  DNNTRACE_INLINE GradLanes() {
    for (int j = 0; j < kLanes; ++j) a[j] = b[j] = c[j] = 0.0;
  }
  template <typename T>
  DNNTRACE_INLINE void add(const T* g, const T* x, int64_t n) {  // n < 8 per call
    for (int64_t j = 0; j < n; ++j) {
      const double gv = static_cast<double>(g[j]);
      a[j] += gv * gv;
      if (x != nullptr) {
        const double pv = gv * static_cast<double>(x[j]);
        b[j] += pv;
        c[j] += unit_abs(pv);
      }
    }
  }
  DNNTRACE_INLINE void out(double* o) const {
    o[0] += fold8(a);
    o[1] += fold8(b);
    o[2] += fold8(c);
  }
};

// float64 input: scalar lanes.
template <typename T>
DNNTRACE_INLINE void act_spans_scalar(const T* p, int64_t spans, int64_t stride, int64_t n,
                                      double lo, double hi, double* out) {
  ActLanes l;
  for (int64_t r = 0; r < spans; ++r) {
    const T* sp = p + r * stride;
    for (int64_t i = 0; i < n; i += kLanes) l.add(sp + i, n - i < kLanes ? n - i : kLanes, lo, hi);
  }
  l.out(out);
}

template <typename T>
DNNTRACE_INLINE void grad_spans_scalar(const T* g, const T* x, int64_t spans, int64_t stride,
                                       int64_t n, double* out) {
  GradLanes l;
  for (int64_t r = 0; r < spans; ++r) {
    const T* gs = g + r * stride;
    const T* xs = x == nullptr ? nullptr : x + r * stride;
    for (int64_t i = 0; i < n; i += kLanes) {
      l.add(gs + i, xs == nullptr ? nullptr : xs + i, n - i < kLanes ? n - i : kLanes);
    }
  }
  l.out(out);
}

// float32 input: explicit vectors, two of 4 lanes (lanes 0-3 and 4-7; comparisons give 0 / -1
// lane masks). GCC lowers generic vector code for the target of the function it is written in
// (an inlined helper, or a target_clones function, stays at the baseline and is scalarised), so
// the bodies are written out in each target version of the functions below (multiversioning;
// the versions are dispatched only where the caller sees them all: this file).
typedef double v4d __attribute__((vector_size(32)));
typedef int64_t v4l __attribute__((vector_size(32)));
typedef float v4f __attribute__((vector_size(16)));

#define DNNTRACE_LOAD2(P, A, B)                      \
  v4f P##0, P##1;                                    \
  __builtin_memcpy(&P##0, (P) + i, sizeof P##0);     \
  __builtin_memcpy(&P##1, (P) + i + 4, sizeof P##1); \
  const v4d A = __builtin_convertvector(P##0, v4d);  \
  const v4d B = __builtin_convertvector(P##1, v4d)

#define DNNTRACE_ACT_SPANS_F32_BODY                                                   \
  {                                                                                   \
    const v4d zero = {0, 0, 0, 0};                                                    \
    const v4d lov = zero + lo, hiv = zero + hi;                                       \
    v4d s0 = zero, s1 = zero, q0 = zero, q1 = zero;                                   \
    v4d m0 = zero - __builtin_huge_val(), m1 = m0;                                    \
    v4l f0 = {0, 0, 0, 0}, f1 = f0, t0 = f0, t1 = f0;                                 \
    ActLanes l;                                                                       \
    const int64_t body = n & ~int64_t{kLanes - 1};                                    \
    for (int64_t r = 0; r < spans; ++r) {                                             \
      const float* sp = p + r * stride;                                               \
      for (int64_t i = 0; i < body; i += kLanes) {                                    \
        DNNTRACE_LOAD2(sp, a, b);                                                     \
        s0 += a;                                                                      \
        s1 += b;                                                                      \
        q0 += a * a;                                                                  \
        q1 += b * b;                                                                  \
        f0 -= a > zero;                                                               \
        f1 -= b > zero;                                                               \
        t0 -= (a <= lov) | (a >= hiv);                                                \
        t1 -= (b <= lov) | (b >= hiv);                                                \
        m0 = a > m0 ? a : m0;                                                         \
        m1 = b > m1 ? b : m1;                                                         \
      }                                                                               \
      l.add(sp + body, n - body, lo, hi);                                             \
    }                                                                                 \
    for (int j = 0; j < 4; ++j) {                                                     \
      l.s[j] += s0[j], l.s[j + 4] += s1[j];                                           \
      l.q[j] += q0[j], l.q[j + 4] += q1[j];                                           \
      l.f[j] += static_cast<double>(f0[j]), l.f[j + 4] += static_cast<double>(f1[j]); \
      l.t[j] += static_cast<double>(t0[j]), l.t[j + 4] += static_cast<double>(t1[j]); \
      l.m[j] = unit_fold_max(l.m[j], m0[j]);                                          \
      l.m[j + 4] = unit_fold_max(l.m[j + 4], m1[j]);                                  \
    }                                                                                 \
    l.out(out);                                                                       \
  }

#define DNNTRACE_GRAD_SPANS_F32_BODY                                       \
  {                                                                        \
    const v4d zero = {0, 0, 0, 0};                                         \
    const v4l abs_mask = {INT64_MAX, INT64_MAX, INT64_MAX, INT64_MAX};     \
    v4d a0 = zero, a1 = zero, b0 = zero, b1 = zero, c0 = zero, c1 = zero;  \
    GradLanes l;                                                           \
    const int64_t body = n & ~int64_t{kLanes - 1};                         \
    for (int64_t r = 0; r < spans; ++r) {                                  \
      const float* gs = g + r * stride;                                    \
      if (x == nullptr) {                                                  \
        for (int64_t i = 0; i < body; i += kLanes) {                       \
          DNNTRACE_LOAD2(gs, u, v);                                        \
          a0 += u * u;                                                     \
          a1 += v * v;                                                     \
        }                                                                  \
        l.add<float>(gs + body, nullptr, n - body);                        \
        continue;                                                          \
      }                                                                    \
      const float* xs = x + r * stride;                                    \
      for (int64_t i = 0; i < body; i += kLanes) {                         \
        DNNTRACE_LOAD2(gs, u, v);                                          \
        DNNTRACE_LOAD2(xs, y, z);                                          \
        const v4d p0 = u * y, p1 = v * z;                                  \
        a0 += u * u;                                                       \
        a1 += v * v;                                                       \
        b0 += p0;                                                          \
        b1 += p1;                                                          \
        c0 += reinterpret_cast<v4d>(reinterpret_cast<v4l>(p0) & abs_mask); \
        c1 += reinterpret_cast<v4d>(reinterpret_cast<v4l>(p1) & abs_mask); \
      }                                                                    \
      l.add(gs + body, xs + body, n - body);                               \
    }                                                                      \
    for (int j = 0; j < 4; ++j) {                                          \
      l.a[j] += a0[j], l.a[j + 4] += a1[j];                                \
      l.b[j] += b0[j], l.b[j + 4] += b1[j];                                \
      l.c[j] += c0[j], l.c[j + 4] += c1[j];                                \
    }                                                                      \
    l.out(out);                                                            \
  }

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
__attribute__((target("arch=x86-64-v3"))) void act_spans_f32(const float* p, int64_t spans,
                                                             int64_t stride, int64_t n, double lo,
                                                             double hi, double* out)
    DNNTRACE_ACT_SPANS_F32_BODY __attribute__((target("arch=x86-64-v3"))) void grad_spans_f32(
        const float* g, const float* x, int64_t spans, int64_t stride, int64_t n,
        double* out) DNNTRACE_GRAD_SPANS_F32_BODY __attribute__((target("default")))
#endif
    void act_spans_f32(const float* p, int64_t spans, int64_t stride, int64_t n, double lo,
                       double hi, double* out) DNNTRACE_ACT_SPANS_F32_BODY
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
    __attribute__((target("default")))
#endif
    void grad_spans_f32(const float* g, const float* x, int64_t spans, int64_t stride, int64_t n,
                        double* out) DNNTRACE_GRAD_SPANS_F32_BODY

#undef DNNTRACE_ACT_SPANS_F32_BODY
#undef DNNTRACE_GRAD_SPANS_F32_BODY
#undef DNNTRACE_LOAD2

}  // namespace

DNNTRACE_CLONES void unit_act_rows_f32(const float* p, int64_t n, int64_t U, int64_t stride,
                                       double lo, double hi, const UnitActSoA& a) {
  act_rows(p, n, U, stride, lo, hi, a.sum, a.sq, a.fire, a.sat, a.mx);
}
void unit_act_rows_f64(const double* p, int64_t n, int64_t U, int64_t stride, double lo, double hi,
                       const UnitActSoA& a) {
  act_rows(p, n, U, stride, lo, hi, a.sum, a.sq, a.fire, a.sat, a.mx);
}
DNNTRACE_CLONES void unit_grad_rows_f32(const float* g, const float* x, int64_t n, int64_t U,
                                        int64_t stride, const UnitGradSoA& a) {
  grad_rows(g, x, n, U, stride, a.g2, a.xg, a.axg);
}
void unit_grad_rows_f64(const double* g, const double* x, int64_t n, int64_t U, int64_t stride,
                        const UnitGradSoA& a) {
  grad_rows(g, x, n, U, stride, a.g2, a.xg, a.axg);
}

void unit_act_spans_f32(const float* p, int64_t spans, int64_t stride, int64_t n, double lo,
                        double hi, double* out) {
  act_spans_f32(p, spans, stride, n, lo, hi, out);
}
void unit_act_spans_f64(const double* p, int64_t spans, int64_t stride, int64_t n, double lo,
                        double hi, double* out) {
  act_spans_scalar(p, spans, stride, n, lo, hi, out);
}
void unit_grad_spans_f32(const float* g, const float* x, int64_t spans, int64_t stride, int64_t n,
                         double* out) {
  grad_spans_f32(g, x, spans, stride, n, out);
}
void unit_grad_spans_f64(const double* g, const double* x, int64_t spans, int64_t stride, int64_t n,
                         double* out) {
  grad_spans_scalar(g, x, spans, stride, n, out);
}

}  // namespace dnntrace::core
