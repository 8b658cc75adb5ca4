// CUDA kernels of the per-unit ops; per-element rules and the top-k insertion are core/units.h,
// compiled into the CPU kernels too. One read of the input per op:
// - rows (inner == 1: Linear-like outputs, channels_last maps): a block is 32 units x 8 row
//   lanes; a warp reads 32 consecutive units of one row (coalesced), each thread accumulates its
//   unit over a strided run of rows in registers, the 8 lanes are reduced in shared memory and
//   one thread per unit adds the block's partial to the accumulator with global atomics;
// - spans (inner > 1: NCHW-like outputs): a block reads one unit's contiguous runs, in groups
//   of G = 2^ceil(log2(min(inner, 256))) threads per run, reduces over the block and adds once.
// Integer-valued columns (counts, firing, saturated) are sums of integers in float64, hence
// identical to the CPU kernel whatever the order of the atomics; sums differ only by rounding.
#include <cuda_runtime.h>

#include <cstdint>

#include "../../core/units.h"
#include "unit_summary_cuda.h"

namespace dnntrace::cuda {
namespace {

using core::kUnitActCols;
using core::kUnitGradCols;

constexpr int kThreads = 256;
constexpr int kRowLanes = 8;  // rows kernel: blockDim (32, 8)

template <DType D>
struct Load;
template <>
struct Load<DType::kF32> {
  using raw = float;
  __device__ static double at(const raw* p, int64_t i) { return static_cast<double>(p[i]); }
};
template <>
struct Load<DType::kF64> {
  using raw = double;
  __device__ static double at(const raw* p, int64_t i) { return p[i]; }
};
template <>
struct Load<DType::kF16> {
  using raw = uint16_t;
  __device__ static double at(const raw* p, int64_t i) {
    return static_cast<double>(core::half_bits_to_float(p[i]));
  }
};
template <>
struct Load<DType::kBF16> {
  using raw = uint16_t;
  __device__ static double at(const raw* p, int64_t i) {
    return static_cast<double>(core::bf16_bits_to_float(p[i]));
  }
};

// max over doubles without a CAS loop: non-negative doubles order like signed integers, negative
// ones inversely like unsigned integers (NaN never reaches here).
__device__ __forceinline__ void atomic_max(double* p, double v) {
  if (!(v > -__longlong_as_double(0x7ff0000000000000ll))) return;  // -inf: nothing to do
  if (__double_as_longlong(v) >= 0) {
    atomicMax(reinterpret_cast<long long*>(p), __double_as_longlong(v));
  } else {
    atomicMin(reinterpret_cast<unsigned long long*>(p),
              static_cast<unsigned long long>(__double_as_longlong(v)));
  }
}

__device__ __forceinline__ void atomic_add_nz(double* p, double v) {
  if (v != 0.0) atomicAdd(p, v);  // NaN != 0: a NaN sum still propagates
}

__device__ __forceinline__ double warp_sum(double v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
  return v;
}
__device__ __forceinline__ double warp_max(double v) {
  for (int o = 16; o > 0; o >>= 1) v = core::unit_fold_max(v, __shfl_down_sync(0xffffffffu, v, o));
  return v;
}

// Rows [start, end) of the block's y-slice.
__device__ __forceinline__ void row_range(int64_t outer, int64_t& start, int64_t& end) {
  const int64_t per = (outer + gridDim.y - 1) / gridDim.y;
  start = static_cast<int64_t>(blockIdx.y) * per;
  end = start + per < outer ? start + per : outer;
}

// Reduces `n` per-thread values over a whole block (sum, except the last one when `last_max`):
// thread 0 gets the results in out[]. Needs kThreads / 32 * n doubles of shared memory.
template <int N>
__device__ void block_reduce(double (&v)[N], bool last_max, double* sh) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  for (int j = 0; j < N; ++j) {
    v[j] = (last_max && j == N - 1) ? warp_max(v[j]) : warp_sum(v[j]);
    if (lane == 0) sh[warp * N + j] = v[j];
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    for (int w = 1; w < kThreads / 32; ++w) {
      for (int j = 0; j < N; ++j) {
        v[j] = (last_max && j == N - 1) ? core::unit_fold_max(v[j], sh[w * N + j])
                                        : v[j] + sh[w * N + j];
      }
    }
  }
}

// ---- activations -------------------------------------------------------------------------------

template <DType D>
__global__ void __launch_bounds__(kThreads)
    act_rows_kernel(const typename Load<D>::raw* x, int64_t outer, int64_t U, double lo, double hi,
                    double* acc) {
  __shared__ double sh[5][kRowLanes][32];
  int64_t start, end;
  row_range(outer, start, end);
  const int64_t u = static_cast<int64_t>(blockIdx.x) * 32 + threadIdx.x;
  double s = 0, q = 0, f = 0, t = 0, m = -__longlong_as_double(0x7ff0000000000000ll);
  if (u < U) {
    for (int64_t r = start + threadIdx.y; r < end; r += kRowLanes) {
      const double v = Load<D>::at(x, r * U + u);
      s += v;
      q += v * v;
      f += core::unit_fires(v);
      t += core::unit_saturated(v, lo, hi);
      m = core::unit_fold_max(m, v);
    }
  }
  sh[0][threadIdx.y][threadIdx.x] = s;
  sh[1][threadIdx.y][threadIdx.x] = q;
  sh[2][threadIdx.y][threadIdx.x] = f;
  sh[3][threadIdx.y][threadIdx.x] = t;
  sh[4][threadIdx.y][threadIdx.x] = m;
  __syncthreads();
  if (threadIdx.y != 0 || u >= U || end <= start) return;
  for (int l = 1; l < kRowLanes; ++l) {
    s += sh[0][l][threadIdx.x];
    q += sh[1][l][threadIdx.x];
    f += sh[2][l][threadIdx.x];
    t += sh[3][l][threadIdx.x];
    m = core::unit_fold_max(m, sh[4][l][threadIdx.x]);
  }
  double* o = acc + u * kUnitActCols;
  atomicAdd(&o[core::kUCount], static_cast<double>(end - start));
  atomic_add_nz(&o[core::kUSum], s);
  atomic_add_nz(&o[core::kUSq], q);
  atomic_add_nz(&o[core::kUFire], f);
  atomic_add_nz(&o[core::kUSat], t);
  atomic_max(&o[core::kUMax], m);
}

template <DType D>
__global__ void __launch_bounds__(kThreads)
    act_spans_kernel(const typename Load<D>::raw* x, int64_t outer, int64_t U, int64_t inner,
                     int log2g, double lo, double hi, double* acc) {
  __shared__ double sh[kThreads / 32 * 5];
  int64_t start, end;
  row_range(outer, start, end);
  const int64_t u = blockIdx.x;
  const int g = 1 << log2g, groups = kThreads >> log2g;
  const int grp = threadIdx.x >> log2g, lane = threadIdx.x & (g - 1);
  double v5[5] = {0, 0, 0, 0, -__longlong_as_double(0x7ff0000000000000ll)};
  for (int64_t r = start + grp; r < end; r += groups) {
    const int64_t base = (r * U + u) * inner;
    for (int64_t i = lane; i < inner; i += g) {
      const double v = Load<D>::at(x, base + i);
      v5[0] += v;
      v5[1] += v * v;
      v5[2] += core::unit_fires(v);
      v5[3] += core::unit_saturated(v, lo, hi);
      v5[4] = core::unit_fold_max(v5[4], v);
    }
  }
  block_reduce(v5, true, sh);
  if (threadIdx.x != 0 || end <= start) return;
  double* o = acc + u * kUnitActCols;
  atomicAdd(&o[core::kUCount], static_cast<double>((end - start) * inner));
  atomic_add_nz(&o[core::kUSum], v5[0]);
  atomic_add_nz(&o[core::kUSq], v5[1]);
  atomic_add_nz(&o[core::kUFire], v5[2]);
  atomic_add_nz(&o[core::kUSat], v5[3]);
  atomic_max(&o[core::kUMax], v5[4]);
}

// ---- gradients ---------------------------------------------------------------------------------

template <DType D>
__global__ void __launch_bounds__(kThreads)
    grad_rows_kernel(const typename Load<D>::raw* g, const typename Load<D>::raw* x, int64_t outer,
                     int64_t U, int64_t rows, double* acc) {
  __shared__ double sh[3][kRowLanes][32];
  int64_t start, end;
  row_range(outer, start, end);
  const int64_t u = static_cast<int64_t>(blockIdx.x) * 32 + threadIdx.x;
  double a = 0, b = 0, c = 0;
  if (u < U) {
    for (int64_t r = start + threadIdx.y; r < end; r += kRowLanes) {
      const double gv = Load<D>::at(g, r * U + u);
      a += gv * gv;
      if (x != nullptr) {
        const double p = gv * Load<D>::at(x, r * U + u);
        b += p;
        c += core::unit_abs(p);
      }
    }
  }
  sh[0][threadIdx.y][threadIdx.x] = a;
  sh[1][threadIdx.y][threadIdx.x] = b;
  sh[2][threadIdx.y][threadIdx.x] = c;
  __syncthreads();
  if (threadIdx.y != 0 || u >= U) return;
  if (blockIdx.y == 0) atomicAdd(&acc[u * kUnitGradCols + core::kGRows], static_cast<double>(rows));
  if (end <= start) return;
  for (int l = 1; l < kRowLanes; ++l) {
    a += sh[0][l][threadIdx.x];
    b += sh[1][l][threadIdx.x];
    c += sh[2][l][threadIdx.x];
  }
  double* o = acc + u * kUnitGradCols;
  atomicAdd(&o[core::kGCount], static_cast<double>(end - start));
  atomic_add_nz(&o[core::kGSq], a);
  atomic_add_nz(&o[core::kGAttr], b);
  atomic_add_nz(&o[core::kGAttrAbs], c);
}

template <DType D>
__global__ void __launch_bounds__(kThreads)
    grad_spans_kernel(const typename Load<D>::raw* g, const typename Load<D>::raw* x, int64_t outer,
                      int64_t U, int64_t inner, int log2g, int64_t rows, double* acc) {
  __shared__ double sh[kThreads / 32 * 3];
  int64_t start, end;
  row_range(outer, start, end);
  const int64_t u = blockIdx.x;
  const int gsz = 1 << log2g, groups = kThreads >> log2g;
  const int grp = threadIdx.x >> log2g, lane = threadIdx.x & (gsz - 1);
  double v3[3] = {0, 0, 0};
  for (int64_t r = start + grp; r < end; r += groups) {
    const int64_t base = (r * U + u) * inner;
    for (int64_t i = lane; i < inner; i += gsz) {
      const double gv = Load<D>::at(g, base + i);
      v3[0] += gv * gv;
      if (x != nullptr) {
        const double p = gv * Load<D>::at(x, base + i);
        v3[1] += p;
        v3[2] += core::unit_abs(p);
      }
    }
  }
  block_reduce(v3, false, sh);
  if (threadIdx.x != 0) return;
  double* o = acc + u * kUnitGradCols;
  if (blockIdx.y == 0) atomicAdd(&o[core::kGRows], static_cast<double>(rows));
  if (end <= start) return;
  atomicAdd(&o[core::kGCount], static_cast<double>((end - start) * inner));
  atomic_add_nz(&o[core::kGSq], v3[0]);
  atomic_add_nz(&o[core::kGAttr], v3[1]);
  atomic_add_nz(&o[core::kGAttrAbs], v3[2]);
}

// ---- top-k -------------------------------------------------------------------------------------

// One thread per unit: its list in registers/local memory, the batch read in order (a warp reads
// 32 consecutive units of one sample), the same insertion as the CPU kernel, so the lists are
// identical on both devices.
__global__ void __launch_bounds__(128)
    topk_kernel(const float* samples, const float* sample_ids, int64_t B, int64_t U, float step,
                float* values, float* ids, float* steps, int k) {
  const int64_t u = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (u >= U) return;
  float v[core::kMaxUnitTopK], id[core::kMaxUnitTopK], st[core::kMaxUnitTopK];
  for (int j = 0; j < k; ++j) {
    v[j] = values[u * k + j];
    id[j] = ids[u * k + j];
    st[j] = steps[u * k + j];
  }
  float kth = v[k - 1];
  for (int64_t b = 0; b < B; ++b) {
    const float s = samples[b * U + u];
    if (!(s > kth)) continue;
    core::unit_topk_insert(v, id, st, k, s, sample_ids[b], step);
    kth = v[k - 1];
  }
  for (int j = 0; j < k; ++j) {
    values[u * k + j] = v[j];
    ids[u * k + j] = id[j];
    steps[u * k + j] = st[j];
  }
}

// ---- launch configuration ------------------------------------------------------------------

int64_t target_blocks() {
  int device = 0, sms = 0;
  if (cudaGetDevice(&device) != cudaSuccess ||
      cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device) != cudaSuccess) {
    sms = 108;
  }
  return 4LL * sms;
}

// y-slices of the rows: enough blocks to fill the device, at least `min_rows` rows each.
unsigned grid_y(int64_t gx, int64_t outer, int64_t min_rows) {
  int64_t gy = (target_blocks() + gx - 1) / gx;
  const int64_t most = (outer + min_rows - 1) / min_rows;
  if (gy > most) gy = most;
  if (gy > 65535) gy = 65535;
  return static_cast<unsigned>(gy < 1 ? 1 : gy);
}

int log2_group(int64_t inner) {
  int l = 0;
  while ((1LL << l) < inner && (1 << l) < kThreads) ++l;
  return l;
}

const char* launch_error() {
  const cudaError_t e = cudaGetLastError();
  return e == cudaSuccess ? nullptr : cudaGetErrorString(e);
}

template <DType D>
void act_launch(const void* xv, int64_t outer, int64_t U, int64_t inner, double lo, double hi,
                double* acc, cudaStream_t stream) {
  const auto* x = static_cast<const typename Load<D>::raw*>(xv);
  if (inner == 1) {
    const int64_t gx = (U + 31) / 32;
    const dim3 grid(static_cast<unsigned>(gx), grid_y(gx, outer, 4 * kRowLanes));
    act_rows_kernel<D><<<grid, dim3(32, kRowLanes), 0, stream>>>(x, outer, U, lo, hi, acc);
  } else {
    const int l = log2_group(inner);
    const dim3 grid(static_cast<unsigned>(U), grid_y(U, outer, kThreads >> l));
    act_spans_kernel<D><<<grid, kThreads, 0, stream>>>(x, outer, U, inner, l, lo, hi, acc);
  }
}

template <DType D>
void grad_launch(const void* gv, const void* xv, int64_t outer, int64_t U, int64_t inner,
                 int64_t rows, double* acc, cudaStream_t stream) {
  using raw = typename Load<D>::raw;
  const auto* g = static_cast<const raw*>(gv);
  const auto* x = static_cast<const raw*>(xv);
  if (inner == 1) {
    const int64_t gx = (U + 31) / 32;
    const dim3 grid(static_cast<unsigned>(gx), grid_y(gx, outer, 4 * kRowLanes));
    grad_rows_kernel<D><<<grid, dim3(32, kRowLanes), 0, stream>>>(g, x, outer, U, rows, acc);
  } else {
    const int l = log2_group(inner);
    const dim3 grid(static_cast<unsigned>(U), grid_y(U, outer, kThreads >> l));
    grad_spans_kernel<D><<<grid, kThreads, 0, stream>>>(g, x, outer, U, inner, l, rows, acc);
  }
}

}  // namespace

const char* launch_unit_summary(DType dtype, const void* x, int64_t outer, int64_t units,
                                int64_t inner, double lo, double hi, double* acc,
                                cudaStream_t stream) {
  if (outer == 0 || units == 0 || inner == 0) return nullptr;
  if (units > 0x7fffffffLL) return "too many units for one launch (2^31 - 1 at most)";
  switch (dtype) {
    case DType::kF32:
      act_launch<DType::kF32>(x, outer, units, inner, lo, hi, acc, stream);
      break;
    case DType::kF64:
      act_launch<DType::kF64>(x, outer, units, inner, lo, hi, acc, stream);
      break;
    case DType::kF16:
      act_launch<DType::kF16>(x, outer, units, inner, lo, hi, acc, stream);
      break;
    case DType::kBF16:
      act_launch<DType::kBF16>(x, outer, units, inner, lo, hi, acc, stream);
      break;
  }
  return launch_error();
}

const char* launch_unit_grad_summary(DType dtype, const void* g, const void* x, int64_t outer,
                                     int64_t units, int64_t inner, int64_t rows, double* acc,
                                     cudaStream_t stream) {
  if (outer == 0 || units == 0 || inner == 0) return nullptr;
  if (units > 0x7fffffffLL) return "too many units for one launch (2^31 - 1 at most)";
  switch (dtype) {
    case DType::kF32:
      grad_launch<DType::kF32>(g, x, outer, units, inner, rows, acc, stream);
      break;
    case DType::kF64:
      grad_launch<DType::kF64>(g, x, outer, units, inner, rows, acc, stream);
      break;
    case DType::kF16:
      grad_launch<DType::kF16>(g, x, outer, units, inner, rows, acc, stream);
      break;
    case DType::kBF16:
      grad_launch<DType::kBF16>(g, x, outer, units, inner, rows, acc, stream);
      break;
  }
  return launch_error();
}

const char* launch_unit_topk_update(const float* samples, const float* sample_ids, int64_t batch,
                                    int64_t units, float step, float* values, float* ids,
                                    float* steps, int k, cudaStream_t stream) {
  if (batch == 0 || units == 0) return nullptr;
  if (k < 1 || k > core::kMaxUnitTopK) return "k out of range";
  const int64_t blocks = (units + 127) / 128;
  topk_kernel<<<static_cast<unsigned>(blocks), 128, 0, stream>>>(samples, sample_ids, batch, units,
                                                                 step, values, ids, steps, k);
  return launch_error();
}

}  // namespace dnntrace::cuda
