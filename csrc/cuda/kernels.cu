// CUDA kernels of the LABPAL op set (semantics: labpal_fast/ops/eager.py). No torch headers:
// raw pointers, a dtype code and a stream come in through the launchers of kernels.h.
#include "kernels.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace labpal_fast {
namespace cuda {
namespace {

constexpr int THREADS = 256;
constexpr int ITEMS = static_cast<int>(DIR_BLOCK / THREADS);  // per thread, per reduction block
constexpr int64_t MAX_GRID = 65535LL * 16;

// Parameter dtype P <-> accumulation dtype A.
template <typename P> struct Cvt;
template <> struct Cvt<float> {
  using A = float;
  static __device__ __forceinline__ float load(float x) { return x; }
  static __device__ __forceinline__ float store(float x) { return x; }
};
template <> struct Cvt<double> {
  using A = double;
  static __device__ __forceinline__ double load(double x) { return x; }
  static __device__ __forceinline__ double store(double x) { return x; }
};
template <> struct Cvt<__half> {
  using A = float;
  static __device__ __forceinline__ float load(__half x) { return __half2float(x); }
  static __device__ __forceinline__ __half store(float x) { return __float2half_rn(x); }
};
template <> struct Cvt<__nv_bfloat16> {
  using A = float;
  static __device__ __forceinline__ float load(__nv_bfloat16 x) { return __bfloat162float(x); }
  static __device__ __forceinline__ __nv_bfloat16 store(float x) { return __float2bfloat16_rn(x); }
};

int grid_for(int64_t n) {
  int64_t blocks = (n + THREADS - 1) / THREADS;
  if (blocks < 1) blocks = 1;
  return static_cast<int>(blocks < MAX_GRID ? blocks : MAX_GRID);
}

// ------------------------------------------------------------------------------ elementwise
template <typename P>
__global__ void accumulate_kernel(typename Cvt<P>::A* __restrict__ s, P* __restrict__ g, int64_t n,
                                  bool first) {
  using A = typename Cvt<P>::A;
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n;
       i += (int64_t)gridDim.x * blockDim.x) {
    const A gi = Cvt<P>::load(g[i]);
    s[i] = first ? gi : s[i] + gi;
    g[i] = Cvt<P>::store(A(0));
  }
}

template <typename P>
__global__ void train_update_kernel(P* __restrict__ th, typename Cvt<P>::A* __restrict__ d,
                                    const double* __restrict__ coef, const bool* __restrict__ ok,
                                    int64_t n) {
  using A = typename Cvt<P>::A;
  const A c = static_cast<A>(*coef);
  const bool fine = *ok;
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n;
       i += (int64_t)gridDim.x * blockDim.x) {
    A di = A(0);
    if (fine) di = d[i]; else d[i] = A(0);
    th[i] = Cvt<P>::store(Cvt<P>::load(th[i]) + c * di);
  }
}

template <typename P>
__global__ void line_move_kernel(P* __restrict__ th, const typename Cvt<P>::A* __restrict__ o,
                                 const typename Cvt<P>::A* __restrict__ d,
                                 const double* __restrict__ coef, int64_t n) {
  using A = typename Cvt<P>::A;
  const A c = static_cast<A>(*coef);
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n;
       i += (int64_t)gridDim.x * blockDim.x) {
    th[i] = Cvt<P>::store(o[i] + c * d[i]);
  }
}

// ------------------------------------------------------------------------------ direction
// Block-wide sum of K values per thread, in a fixed tree order; thread 0 gets the totals.
template <int K>
__device__ void block_sum(double (&v)[K], double (*sh)[THREADS]) {
  for (int k = 0; k < K; ++k) sh[k][threadIdx.x] = v[k];
  __syncthreads();
  for (int stride = THREADS / 2; stride > 0; stride >>= 1) {
    if (threadIdx.x < stride)
      for (int k = 0; k < K; ++k) sh[k][threadIdx.x] += sh[k][threadIdx.x + stride];
    __syncthreads();
  }
  for (int k = 0; k < K; ++k) v[k] = sh[k][0];
}

// ------------------------------------------------------------------------------ grad_sqnorm
// Stage 1: block b sums ḡ² over [b·DIR_BLOCK, (b+1)·DIR_BLOCK) (ḡ formed as direction_kernel
// forms it) into work[b]; stage 2 (sum_kernel) adds the blocks in a fixed order.
template <typename P>
__global__ void sqnorm_kernel(const P* __restrict__ grad, const typename Cvt<P>::A* __restrict__ gs,
                              int64_t n, double inv_m, double* __restrict__ work) {
  using A = typename Cvt<P>::A;
  __shared__ double sh[1][THREADS];
  const A im = static_cast<A>(inv_m);
  double v[1] = {0};
  const int64_t base = blockIdx.x * DIR_BLOCK;
  for (int k = 0; k < ITEMS; ++k) {
    const int64_t i = base + k * THREADS + threadIdx.x;
    if (i >= n) break;
    A g = Cvt<P>::load(grad[i]);
    if (gs != nullptr) g = (gs[i] + g) * im;
    v[0] += static_cast<double>(g) * static_cast<double>(g);
  }
  block_sum<1>(v, sh);
  if (threadIdx.x == 0) work[blockIdx.x] = v[0];
}

__global__ void sum_kernel(const double* __restrict__ work, int64_t blocks,
                           double* __restrict__ out) {
  __shared__ double sh[1][THREADS];
  double v[1] = {0};
  for (int64_t b = threadIdx.x; b < blocks; b += THREADS) v[0] += work[b];
  block_sum<1>(v, sh);
  if (threadIdx.x == 0) *out = v[0];
}

// Stage 1: block b owns elements [b·DIR_BLOCK, (b+1)·DIR_BLOCK) and writes its 5 sums to work.
template <typename P>
__global__ void direction_kernel(typename Cvt<P>::A* __restrict__ d, P* __restrict__ grad,
                                 const typename Cvt<P>::A* __restrict__ gs,
                                 const P* __restrict__ th, const Segments segments, int64_t n,
                                 double inv_m, double momentum, bool terms,
                                 const double* __restrict__ scale, double* __restrict__ work) {
  using A = typename Cvt<P>::A;
  __shared__ double sh[5][THREADS];
  const A im = static_cast<A>(inv_m), beta = static_cast<A>(momentum);
  const A c = scale != nullptr ? static_cast<A>(*scale) : A(1);  // clipping factor
  double v[5] = {0, 0, 0, 0, 0};
  const int64_t base = blockIdx.x * DIR_BLOCK;
  int p = 0;
  for (int k = 0; k < ITEMS; ++k) {
    const int64_t i = base + k * THREADS + threadIdx.x;
    if (i >= n) break;
    while (p + 1 < segments.count && segments.end[p] <= i) ++p;  // i only grows
    const double wd = segments.wd[p];
    A g = Cvt<P>::load(grad[i]);
    if (gs != nullptr) g = (gs[i] + g) * im;
    A go = g;  // the objective's gradient, for ⟨ḡ, d⟩
    if (scale != nullptr) g = g * c;
    A t = A(0);
    if (wd != 0.0) {
      t = Cvt<P>::load(th[i]);
      g = g + static_cast<A>(wd) * t;
      go = go + static_cast<A>(wd) * t;
    }
    const A dn = momentum != 0.0 ? g + beta * d[i] : g;
    d[i] = dn;
    grad[i] = Cvt<P>::store(A(0));
    const double dd = static_cast<double>(dn);
    v[0] += dd * dd;
    if (terms) {
      v[1] += static_cast<double>(go) * dd;
      if (wd != 0.0) {
        const double td = static_cast<double>(t);
        v[2] += wd * dd * dd;
        v[3] += wd * td * dd;
        v[4] += wd * td * td;
      }
    }
  }
  block_sum<5>(v, sh);
  if (threadIdx.x == 0)
    for (int k = 0; k < 5; ++k) work[blockIdx.x * 5 + k] = v[k];
}

// Stage 2: one block adds the per-block sums in a fixed order.
__global__ void direction_finish_kernel(const double* __restrict__ work, int64_t blocks,
                                        double* __restrict__ out) {
  __shared__ double sh[5][THREADS];
  double v[5] = {0, 0, 0, 0, 0};
  for (int64_t b = threadIdx.x; b < blocks; b += THREADS)
    for (int k = 0; k < 5; ++k) v[k] += work[b * 5 + k];
  block_sum<5>(v, sh);
  if (threadIdx.x == 0)
    for (int k = 0; k < 5; ++k) out[k] = v[k];
}

template <template <typename> class Launch, typename... Args>
cudaError_t by_dtype(DType dtype, Args&&... args) {
  switch (dtype) {
    case F32: return Launch<float>::run(args...);
    case F64: return Launch<double>::run(args...);
    case F16: return Launch<__half>::run(args...);
    case BF16: return Launch<__nv_bfloat16>::run(args...);
  }
  return cudaErrorInvalidValue;
}

template <typename P> struct AccumulateLaunch {
  static cudaError_t run(void* s, void* g, int64_t n, bool first, cudaStream_t st) {
    accumulate_kernel<P><<<grid_for(n), THREADS, 0, st>>>(
        static_cast<typename Cvt<P>::A*>(s), static_cast<P*>(g), n, first);
    return cudaGetLastError();
  }
};

template <typename P> struct DirectionLaunch {
  static cudaError_t run(void* d, void* g, const void* gs, const void* th, const Segments& segments,
                         int64_t n, double inv_m, double momentum, bool terms,
                         const double* scale, double* work, double* out, cudaStream_t st) {
    using A = typename Cvt<P>::A;
    const int64_t blocks = form_direction_blocks(n);
    direction_kernel<P><<<static_cast<unsigned>(blocks), THREADS, 0, st>>>(
        static_cast<A*>(d), static_cast<P*>(g), static_cast<const A*>(gs),
        static_cast<const P*>(th), segments, n, inv_m, momentum, terms, scale, work);
    cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
    direction_finish_kernel<<<1, THREADS, 0, st>>>(work, blocks, out);
    return cudaGetLastError();
  }
};

template <typename P> struct SqnormLaunch {
  static cudaError_t run(const void* g, const void* gs, int64_t n, double inv_m, double* work,
                         double* out, cudaStream_t st) {
    using A = typename Cvt<P>::A;
    const int64_t blocks = form_direction_blocks(n);
    sqnorm_kernel<P><<<static_cast<unsigned>(blocks), THREADS, 0, st>>>(
        static_cast<const P*>(g), static_cast<const A*>(gs), n, inv_m, work);
    cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
    sum_kernel<<<1, THREADS, 0, st>>>(work, blocks, out);
    return cudaGetLastError();
  }
};

template <typename P> struct TrainUpdateLaunch {
  static cudaError_t run(void* th, void* d, const double* coef, const bool* ok, int64_t n,
                         cudaStream_t st) {
    train_update_kernel<P><<<grid_for(n), THREADS, 0, st>>>(
        static_cast<P*>(th), static_cast<typename Cvt<P>::A*>(d), coef, ok, n);
    return cudaGetLastError();
  }
};

template <typename P> struct LineMoveLaunch {
  static cudaError_t run(void* th, const void* o, const void* d, const double* coef, int64_t n,
                         cudaStream_t st) {
    using A = typename Cvt<P>::A;
    line_move_kernel<P><<<grid_for(n), THREADS, 0, st>>>(
        static_cast<P*>(th), static_cast<const A*>(o), static_cast<const A*>(d), coef, n);
    return cudaGetLastError();
  }
};

}  // namespace

int64_t form_direction_blocks(int64_t n) {
  const int64_t blocks = (n + DIR_BLOCK - 1) / DIR_BLOCK;
  return blocks < 1 ? 1 : blocks;
}

cudaError_t accumulate(void* grad_sum, void* grad, int64_t n, DType dtype, bool first,
                       cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  return by_dtype<AccumulateLaunch>(dtype, grad_sum, grad, n, first, stream);
}

cudaError_t form_direction(void* direction, void* grad, const void* grad_sum, const void* param,
                           const Segments& segments, int64_t n, DType dtype, double inv_m,
                           double momentum, bool terms, const double* scale, double* work,
                           double* out, cudaStream_t stream) {
  if (segments.count < 1 || segments.count > MAX_SEGMENTS) return cudaErrorInvalidValue;
  return by_dtype<DirectionLaunch>(dtype, direction, grad, grad_sum, param, segments, n, inv_m,
                                   momentum, terms, scale, work, out, stream);
}

cudaError_t grad_sqnorm(const void* grad, const void* grad_sum, int64_t n, DType dtype,
                        double inv_m, double* work, double* out, cudaStream_t stream) {
  return by_dtype<SqnormLaunch>(dtype, grad, grad_sum, n, inv_m, work, out, stream);
}

cudaError_t train_update(void* param, void* direction, const double* coef, const bool* ok,
                         int64_t n, DType dtype, cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  return by_dtype<TrainUpdateLaunch>(dtype, param, direction, coef, ok, n, stream);
}

cudaError_t line_move(void* param, const void* origin, const void* direction, const double* coef,
                      int64_t n, DType dtype, cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  return by_dtype<LineMoveLaunch>(dtype, param, origin, direction, coef, n, stream);
}

}  // namespace cuda
}  // namespace labpal_fast
