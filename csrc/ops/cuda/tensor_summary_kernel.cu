// CUDA kernel of the fused summary. One block walks chunks of 8192 elements grid-stride over all
// tensors of a launch; per element it updates per-thread moments and, in histogram mode, a
// shared-memory privatised histogram: zeros (half of ReLU outputs) are counted with ballot/popc,
// other equal bucket ids within a warp are merged with match_any before one shared atomic, so
// concentrated tensors do not serialise on a few counters. The block flushes its histogram and
// moments to the slot with global atomics when it moves to another tensor. Integer fields are
// sums of integers, hence bit-identical to the CPU kernel whatever the atomic order.
#include <cuda_runtime.h>

#include <cstdint>

#include "../../core/loglinear.h"
#include "tensor_summary_cuda.h"

namespace dnntrace::cuda {
namespace {

using core::HistLayout;

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int64_t kChunk = 8192;
constexpr unsigned kFull = 0xffffffffu;

struct LaunchArgs {
  const void* data[kMaxTensorsPerLaunch];
  int64_t numel[kMaxTensorsPerLaunch];
  int64_t slot[kMaxTensorsPerLaunch];
  int64_t chunk_start[kMaxTensorsPerLaunch + 1];  // prefix sums of chunks per tensor
  int n;
  int vectorized;  // every pointer 16-byte aligned
};

struct Acc {
  double sum, sq, mn, mx;
  unsigned long long neg, nan, pinf, ninf, zeros;
  __device__ void clear() {
    sum = sq = 0.0;
    mn = __longlong_as_double(0x7ff0000000000000ll);  // +inf
    mx = __longlong_as_double(0xfff0000000000000ll);  // -inf
    neg = nan = pinf = ninf = zeros = 0ull;
  }
};

template <DType D>
struct Traits;
template <>
struct Traits<DType::kF32> {
  using raw = float;
  static constexpr int kVec = 4;
  __device__ static float value(raw r) { return r; }
};
template <>
struct Traits<DType::kF64> {
  using raw = double;
  static constexpr int kVec = 2;
  __device__ static double value(raw r) { return r; }
};
template <>
struct Traits<DType::kF16> {
  using raw = uint16_t;
  static constexpr int kVec = 8;
  __device__ static float value(raw r) { return core::half_bits_to_float(r); }
};
template <>
struct Traits<DType::kBF16> {
  using raw = uint16_t;
  static constexpr int kVec = 8;
  __device__ static float value(raw r) { return core::bf16_bits_to_float(r); }
};

__device__ __forceinline__ int32_t index_of(float v, const HistLayout& l, int32_t lo, int32_t ps) {
  return core::row_index_f32(__float_as_uint(v), l.k, lo, ps);
}
__device__ __forceinline__ int32_t index_of(double v, const HistLayout& l, int32_t, int32_t) {
  return core::row_index(v, l);
}

__device__ __forceinline__ bool finite_of(float v) {
  return core::is_finite_f32(__float_as_uint(v));
}
__device__ __forceinline__ bool finite_of(double v) {
  return (static_cast<unsigned long long>(__double_as_longlong(v)) & 0x7ff0000000000000ull) !=
         0x7ff0000000000000ull;
}

// One element per lane; every lane of the warp calls it (valid or not) so the warp votes are safe.
template <bool kHist, typename V>
__device__ __forceinline__ void consume(V v, bool valid, Acc& a, unsigned* sh, const HistLayout& l,
                                        int32_t lo, int32_t ps, int lane) {
  const bool fin = valid && finite_of(v);
  if (fin) {
    const double d = static_cast<double>(v);
    a.sum += d;
    a.sq += d * d;
    a.mn = fmin(a.mn, d);
    a.mx = fmax(a.mx, d);
  }
  if (valid) a.neg += (v < V(0)) ? 1ull : 0ull;  // -0 and NaN compare false
  if constexpr (kHist) {
    const int32_t idx = valid ? index_of(v, l, lo, ps) : -1;
    const unsigned zeros = __ballot_sync(kFull, idx == core::kZeros);
    if (lane == 0 && zeros) atomicAdd(&sh[core::kZeros], static_cast<unsigned>(__popc(zeros)));
    const int32_t key = (idx == core::kZeros) ? -1 : idx;
    const unsigned peers = __match_any_sync(kFull, key);
    if (key >= 0 && lane == __ffs(peers) - 1)
      atomicAdd(&sh[key], static_cast<unsigned>(__popc(peers)));
  } else if (valid) {
    if (v != v) {
      a.nan += 1;
    } else if (!fin) {
      if (v > V(0))
        a.pinf += 1;
      else
        a.ninf += 1;
    } else if (v == V(0)) {
      a.zeros += 1;
    }
  }
}

__device__ __forceinline__ double warp_sum(double v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(kFull, v, o);
  return v;
}
__device__ __forceinline__ unsigned long long warp_sum(unsigned long long v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(kFull, v, o);
  return v;
}
__device__ __forceinline__ double warp_min(double v) {
  for (int o = 16; o > 0; o >>= 1) v = fmin(v, __shfl_xor_sync(kFull, v, o));
  return v;
}
__device__ __forceinline__ double warp_max(double v) {
  for (int o = 16; o > 0; o >>= 1) v = fmax(v, __shfl_xor_sync(kFull, v, o));
  return v;
}

__device__ void atomic_min_double(double* p, double v) {
  unsigned long long* q = reinterpret_cast<unsigned long long*>(p);
  unsigned long long old = *q;
  while (v < __longlong_as_double(static_cast<long long>(old))) {
    const unsigned long long seen =
        atomicCAS(q, old, static_cast<unsigned long long>(__double_as_longlong(v)));
    if (seen == old) break;
    old = seen;
  }
}

__device__ void atomic_max_double(double* p, double v) {
  unsigned long long* q = reinterpret_cast<unsigned long long*>(p);
  unsigned long long old = *q;
  while (v > __longlong_as_double(static_cast<long long>(old))) {
    const unsigned long long seen =
        atomicCAS(q, old, static_cast<unsigned long long>(__double_as_longlong(v)));
    if (seen == old) break;
    old = seen;
  }
}

// Compensated global add: atomicAdd returns the old value, so the rounding error of exactly the
// addition that happened is known (TwoSum) and goes into the compensation term.
__device__ void atomic_add_compensated(double* hi, double* lo, double v) {
  if (v == 0.0) return;
  const double old = atomicAdd(hi, v);
  double s, e;
  core::two_sum(old, v, s, e);
  if (e != 0.0) atomicAdd(lo, e);
}

__device__ void add_count(int64_t* p, unsigned long long v) {
  if (v) atomicAdd(reinterpret_cast<unsigned long long*>(p), v);
}

template <bool kHist>
__device__ void flush(Acc& a, unsigned* sh, int width, int64_t* counts, double* moments) {
  __shared__ double s_d[4][kWarps];
  __shared__ unsigned long long s_u[5][kWarps];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  double d0 = warp_sum(a.sum), d1 = warp_sum(a.sq), d2 = warp_min(a.mn), d3 = warp_max(a.mx);
  unsigned long long u[5] = {warp_sum(a.neg), warp_sum(a.nan), warp_sum(a.pinf), warp_sum(a.ninf),
                             warp_sum(a.zeros)};
  if (lane == 0) {
    s_d[0][warp] = d0;
    s_d[1][warp] = d1;
    s_d[2][warp] = d2;
    s_d[3][warp] = d3;
    for (int i = 0; i < 5; ++i) s_u[i][warp] = u[i];
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    for (int w = 1; w < kWarps; ++w) {
      s_d[0][0] += s_d[0][w];
      s_d[1][0] += s_d[1][w];
      s_d[2][0] = fmin(s_d[2][0], s_d[2][w]);
      s_d[3][0] = fmax(s_d[3][0], s_d[3][w]);
      for (int i = 0; i < 5; ++i) s_u[i][0] += s_u[i][w];
    }
    atomic_add_compensated(&moments[core::kSum], &moments[core::kSumComp], s_d[0][0]);
    atomic_add_compensated(&moments[core::kSumSq], &moments[core::kSumSqComp], s_d[1][0]);
    atomic_min_double(&moments[core::kMin], s_d[2][0]);
    atomic_max_double(&moments[core::kMax], s_d[3][0]);
    add_count(&counts[core::kNegatives], s_u[0][0]);
    if (!kHist) {
      add_count(&counts[core::kNan], s_u[1][0]);
      add_count(&counts[core::kPosInf], s_u[2][0]);
      add_count(&counts[core::kNegInf], s_u[3][0]);
      add_count(&counts[core::kZeros], s_u[4][0]);
    }
  }
  if constexpr (kHist) {
    for (int b = threadIdx.x; b < width; b += kThreads) {
      const unsigned v = sh[b];
      if (v) {
        add_count(&counts[b], v);
        sh[b] = 0u;
      }
    }
  }
  __syncthreads();
  a.clear();
}

template <DType D, bool kHist>
__global__ void __launch_bounds__(kThreads)
    summary_kernel(const LaunchArgs args, HistLayout l, int64_t* counts, double* moments) {
  using T = Traits<D>;
  using raw = typename T::raw;
  extern __shared__ unsigned sh[];
  const int width = l.width();
  const int32_t lo = core::f32_lo(l), ps = l.per_sign();
  const int lane = threadIdx.x & 31;
  if constexpr (kHist) {
    for (int b = threadIdx.x; b < width; b += kThreads) sh[b] = 0u;
    __syncthreads();
  }
  Acc a;
  a.clear();
  const int64_t total = args.chunk_start[args.n];
  int cur = -1;
  for (int64_t c = blockIdx.x; c < total; c += gridDim.x) {
    int lo_t = 0, hi_t = args.n - 1;  // last t with chunk_start[t] <= c (block-uniform)
    while (lo_t < hi_t) {
      const int mid = (lo_t + hi_t + 1) >> 1;
      if (args.chunk_start[mid] <= c)
        lo_t = mid;
      else
        hi_t = mid - 1;
    }
    const int t = lo_t;
    if (t != cur) {
      if (cur >= 0)
        flush<kHist>(a, sh, width, counts + args.slot[cur] * width,
                     moments + args.slot[cur] * core::kNumMoments);
      cur = t;
    }
    const int64_t local = c - args.chunk_start[t];
    const int64_t n = args.numel[t];
    const int64_t begin = local * kChunk;
    const int64_t end = begin + kChunk < n ? begin + kChunk : n;
    const raw* x = static_cast<const raw*>(args.data[t]);
    if (local == 0 && threadIdx.x == 0) {
      add_count(&counts[args.slot[t] * width + core::kCount], static_cast<unsigned long long>(n));
      add_count(&counts[args.slot[t] * width + core::kCalls], 1ull);
    }
    if (args.vectorized && end - begin == kChunk) {
      // Full chunk, aligned: 16-byte loads, kChunk / (kThreads * kVec) per thread, coalesced.
      constexpr int kVec = T::kVec;
      constexpr int kIters = static_cast<int>(kChunk / (kThreads * kVec));
      const uint4* xv = reinterpret_cast<const uint4*>(x + begin);
#pragma unroll 2
      for (int i = 0; i < kIters; ++i) {
        const uint4 q = __ldg(&xv[i * kThreads + threadIdx.x]);
        const raw* r = reinterpret_cast<const raw*>(&q);
#pragma unroll
        for (int j = 0; j < kVec; ++j) consume<kHist>(T::value(r[j]), true, a, sh, l, lo, ps, lane);
      }
    } else {
      for (int64_t e0 = begin; e0 < end; e0 += kThreads) {  // same trip count in every lane
        const int64_t e = e0 + threadIdx.x;
        const bool valid = e < end;
        const raw r = valid ? x[e] : raw(0);
        consume<kHist>(T::value(r), valid, a, sh, l, lo, ps, lane);
      }
    }
  }
  if (cur >= 0)
    flush<kHist>(a, sh, width, counts + args.slot[cur] * width,
                 moments + args.slot[cur] * core::kNumMoments);
}

template <DType D, bool kHist>
const char* launch_one(const LaunchArgs& args, const HistLayout& l, int64_t* counts,
                       double* moments, cudaStream_t stream) {
  const size_t smem = kHist ? static_cast<size_t>(l.width()) * sizeof(unsigned) : 0;
  auto kernel = summary_kernel<D, kHist>;
  if (smem > 48 * 1024) {
    if (cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                             static_cast<int>(smem)) != cudaSuccess)
      return "cudaFuncSetAttribute(MaxDynamicSharedMemorySize) failed";
  }
  int device = 0, sms = 0, per_sm = 0;
  if (cudaGetDevice(&device) != cudaSuccess ||
      cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device) != cudaSuccess ||
      cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kThreads, smem) != cudaSuccess)
    return "querying the device for the launch configuration failed";
  const int64_t total = args.chunk_start[args.n];
  int64_t grid = static_cast<int64_t>(sms) * (per_sm > 0 ? per_sm : 1);
  if (total < grid) grid = total;
  if (grid < 1) return nullptr;
  kernel<<<static_cast<unsigned>(grid), kThreads, smem, stream>>>(args, l, counts, moments);
  const cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}

template <DType D>
const char* dispatch_hist(bool histogram, const LaunchArgs& args, const HistLayout& l,
                          int64_t* counts, double* moments, cudaStream_t stream) {
  return histogram ? launch_one<D, true>(args, l, counts, moments, stream)
                   : launch_one<D, false>(args, l, counts, moments, stream);
}

}  // namespace

int launch_summary(DType dtype, const TensorRef* refs, int n, HistLayout layout, bool histogram,
                   int64_t* counts, double* moments, cudaStream_t stream, const char** error) {
  int launches = 0;
  for (int first = 0; first < n; first += kMaxTensorsPerLaunch) {
    LaunchArgs args{};
    args.n = n - first < kMaxTensorsPerLaunch ? n - first : kMaxTensorsPerLaunch;
    args.vectorized = 1;
    args.chunk_start[0] = 0;
    for (int i = 0; i < args.n; ++i) {
      const TensorRef& r = refs[first + i];
      args.data[i] = r.data;
      args.numel[i] = r.numel;
      args.slot[i] = r.slot;
      const int64_t chunks = r.numel > 0 ? (r.numel + kChunk - 1) / kChunk : 1;
      args.chunk_start[i + 1] = args.chunk_start[i] + chunks;
      if (reinterpret_cast<uintptr_t>(r.data) % 16 != 0) args.vectorized = 0;
    }
    const char* err = nullptr;
    switch (dtype) {
      case DType::kF32:
        err = dispatch_hist<DType::kF32>(histogram, args, layout, counts, moments, stream);
        break;
      case DType::kF64:
        err = dispatch_hist<DType::kF64>(histogram, args, layout, counts, moments, stream);
        break;
      case DType::kF16:
        err = dispatch_hist<DType::kF16>(histogram, args, layout, counts, moments, stream);
        break;
      case DType::kBF16:
        err = dispatch_hist<DType::kBF16>(histogram, args, layout, counts, moments, stream);
        break;
    }
    if (err) {
      *error = err;
      return -1;
    }
    ++launches;
  }
  return launches;
}

}  // namespace dnntrace::cuda
