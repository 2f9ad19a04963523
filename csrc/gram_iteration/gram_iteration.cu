#include "gram_iteration.h"

#include <cuComplex.h>

namespace torchext {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;

// Real and complex entries through one interface, so the kernel is written once.
struct Real {
  using T = float;
  __device__ static T zero() { return 0.f; }
  __device__ static float abs2(T a) { return a * a; }
  __device__ static float real(T a) { return a; }
  __device__ static T conj_mul_add(T a, T b, T acc) { return fmaf(a, b, acc); }  // conj(a) b + acc
  __device__ static T scale(T a, float s) { return a * s; }
};

struct Complex {
  using T = cuFloatComplex;
  __device__ static T zero() { return make_cuFloatComplex(0.f, 0.f); }
  __device__ static float abs2(T a) { return fmaf(a.x, a.x, a.y * a.y); }
  __device__ static float real(T a) { return a.x; }
  __device__ static T conj_mul_add(T a, T b, T acc) {  // conj(a) b = (ax bx + ay by) + i (ax by - ay bx)
    return make_cuFloatComplex(fmaf(a.x, b.x, fmaf(a.y, b.y, acc.x)), fmaf(a.x, b.y, fmaf(-a.y, b.x, acc.y)));
  }
  __device__ static T scale(T a, float s) { return make_cuFloatComplex(a.x * s, a.y * s); }
};

// Reduction over the block (sum or max), the result returned to every thread.
template <bool kMax>
__device__ float block_reduce(float value, float* scratch) {
  for (int offset = 16; offset > 0; offset >>= 1) {
    const float other = __shfl_xor_sync(0xffffffffu, value, offset);
    value = kMax ? fmaxf(value, other) : value + other;
  }
  __syncthreads();  // scratch may still be read by an earlier reduction
  if (threadIdx.x % 32 == 0) scratch[threadIdx.x / 32] = value;
  __syncthreads();
  float total = scratch[0];
  for (int w = 1; w < kWarps; ++w) total = kMax ? fmaxf(total, scratch[w]) : total + scratch[w];
  return total;
}

// ||A||_F for the n entries of A, as max|a| * ||A / max|a|||_F so that fp32 entries of 1e30 do not overflow.
template <typename E>
__device__ float frobenius(const typename E::T* a, int n, float* scratch) {
  float peak = 0.f;
  for (int i = threadIdx.x; i < n; i += kThreads) peak = fmaxf(peak, sqrtf(E::abs2(a[i])));
  peak = block_reduce<true>(peak, scratch);
  if (peak == 0.f) return 0.f;
  const float inv = 1.f / peak;
  float sum = 0.f;
  for (int i = threadIdx.x; i < n; i += kThreads) sum += E::abs2(E::scale(a[i], inv));
  return peak * sqrtf(block_reduce<false>(sum, scratch));
}

template <typename E>
__global__ void __launch_bounds__(kThreads) gram_iteration_kernel(const typename E::T* __restrict__ w, int rows,
                                                                   int cols, int n_iter, float* upper, float* lower) {
  using T = typename E::T;
  extern __shared__ __align__(16) unsigned char shared[];
  T* a = reinterpret_cast<T*>(shared);                     // [rows, cols], then [cols, cols]: the iterate G
  T* g = a + kGramMaxSide * kGramMaxSide;                  // [cols, cols]: G^H G
  __shared__ float scratch[kWarps];

  const T* matrix = w + static_cast<int64_t>(blockIdx.x) * rows * cols;
  for (int i = threadIdx.x; i < rows * cols; i += kThreads) a[i] = matrix[i];
  __syncthreads();

  double log_scale = 0.0;  // L = log c with (true iterate) = c * G; fp64: it reaches ~2^T * |log r|
  int n_rows = rows;
  for (int t = 0; t < n_iter; ++t) {
    float r = frobenius<E>(a, n_rows * cols, scratch);
    if (r == 0.f) r = 1.f;  // a zero matrix stays zero: its bound is 0
    const float inv_r2 = 1.f / (r * r);
    log_scale = 2.0 * (log_scale + log(static_cast<double>(r)));
    // g[i, j] = sum_k conj(a[k, i]) a[k, j] / r^2: the Gram product of the normalised iterate.
    for (int idx = threadIdx.x; idx < cols * cols; idx += kThreads) {
      const int i = idx / cols, j = idx % cols;
      T acc = E::zero();
      for (int k = 0; k < n_rows; ++k) acc = E::conj_mul_add(a[k * cols + i], a[k * cols + j], acc);
      g[idx] = E::scale(acc, inv_r2);
    }
    __syncthreads();
    for (int idx = threadIdx.x; idx < cols * cols; idx += kThreads) a[idx] = g[idx];
    __syncthreads();
    n_rows = cols;
  }

  const float frob = frobenius<E>(a, cols * cols, scratch);
  float trace = 0.f;
  for (int i = threadIdx.x; i < cols; i += kThreads) trace += E::real(a[i * cols + i]);
  trace = block_reduce<false>(trace, scratch);
  if (threadIdx.x == 0) {
    const double inv_power = 1.0 / static_cast<double>(1LL << n_iter);
    if (frob == 0.f) {
      upper[blockIdx.x] = lower[blockIdx.x] = 0.f;
    } else {
      const double log_frob = log(static_cast<double>(frob));
      upper[blockIdx.x] = static_cast<float>(exp((log_scale + log_frob) * inv_power));
      lower[blockIdx.x] = static_cast<float>(exp((log_scale + 2.0 * log_frob - log(static_cast<double>(trace))) *
                                                 inv_power));
    }
  }
}

template <typename E>
cudaError_t launch(const void* w, int64_t batch, int rows, int cols, int n_iter, float* upper, float* lower,
                   cudaStream_t stream) {
  const size_t shared_bytes = 2 * kGramMaxSide * kGramMaxSide * sizeof(typename E::T);
  cudaError_t error = cudaFuncSetAttribute(gram_iteration_kernel<E>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                           static_cast<int>(shared_bytes));
  if (error != cudaSuccess) return error;
  gram_iteration_kernel<E><<<static_cast<unsigned>(batch), kThreads, shared_bytes, stream>>>(
      static_cast<const typename E::T*>(w), rows, cols, n_iter, upper, lower);
  return cudaGetLastError();
}

}  // namespace

cudaError_t gram_iteration(const void* w, bool is_complex, int64_t batch, int64_t rows, int64_t cols, int n_iter,
                           float* upper, float* lower, cudaStream_t stream) {
  if (batch < 0 || rows < cols || cols < 1 || rows > kGramMaxSide || n_iter < 1 || n_iter > 62 ||
      batch > 0x7fffffffLL) {
    return cudaErrorInvalidValue;
  }
  if (batch == 0) return cudaSuccess;
  return is_complex ? launch<Complex>(w, batch, static_cast<int>(rows), static_cast<int>(cols), n_iter, upper, lower,
                                      stream)
                    : launch<Real>(w, batch, static_cast<int>(rows), static_cast<int>(cols), n_iter, upper, lower,
                                   stream);
}

}  // namespace torchext
