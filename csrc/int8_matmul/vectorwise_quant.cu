#include "vectorwise_quant.h"

#include <algorithm>
#include <climits>
#include <cstring>
#include <type_traits>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace torchext {
namespace {

constexpr int kVectorBytes = 16;           // one 128-bit load
constexpr int kCachedVectors = 4;          // vectors a thread keeps in registers from the first pass to the second
constexpr int kMaxThreads = 1024;          // threads per row block, at most
constexpr int64_t kFillThreads = 1 << 18;  // about the threads an H100 holds at once (132 SMs x 2048)
constexpr int kCompactThreads = 1024;
constexpr int kCompactWarps = kCompactThreads / 32;
constexpr float kInt8Max = 127.f;
// 127 / absmax overflows fp32 below absmax ~ 2^-121: a row with absmax < kTinyAbsmax is multiplied by kTinyLift
// (exactly, a power of two) before quantization, which changes no code where 127 / absmax was finite.
constexpr float kTinyAbsmax = 0x1p-64f;
constexpr float kTinyLift = 0x1p64f;

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }

// 16 bytes of x: 4 fp32 or 8 bf16/fp16 elements.
template <typename T>
struct alignas(kVectorBytes) Vector {
  static constexpr int kSize = kVectorBytes / sizeof(T);
  T v[kSize];
};

// p must be 16-byte aligned.
template <typename T>
__device__ __forceinline__ Vector<T> load_vector(const T* p) {
  const uint4 raw = __ldg(reinterpret_cast<const uint4*>(p));
  Vector<T> out;
  memcpy(&out, &raw, sizeof(out));  // a reinterpretation of the registers, no memory traffic
  return out;
}

// n = 4 or 8 codes to dst: one 4- or 8-byte store when dst is aligned to n bytes, else byte stores.
template <int n>
__device__ __forceinline__ void store_codes(int8_t* dst, const int8_t (&c)[n], bool aligned) {
  static_assert(n == 4 || n == 8, "a vector holds 4 or 8 elements");
  using Word = std::conditional_t<n == 8, uint2, uint32_t>;
  if (aligned) {
    Word word;
    memcpy(&word, c, n);
    *reinterpret_cast<Word*>(dst) = word;
  } else {
#pragma unroll
    for (int e = 0; e < n; ++e) dst[e] = c[e];
  }
}

// clamp(rint(v * inv), -127, 127), ties to even. cvt.rni saturates +-Inf (an outlier whose product overflows).
// inv is finite, and 0 only when absmax is 0, so finite v gives no NaN.
__device__ __forceinline__ int8_t quantize(float v, float inv) {
  const int q = __float2int_rn(__fmul_rn(v, inv));
  return static_cast<int8_t>(min(max(q, -127), 127));
}

// Max of `value` over the block's threads (blockDim.x a multiple of 32), returned to every thread. The caller
// must pass a barrier before warp_max is written again.
__device__ float block_max(float value, float* warp_max) {
  for (int offset = 16; offset > 0; offset >>= 1) value = fmaxf(value, __shfl_xor_sync(0xffffffffu, value, offset));
  if (threadIdx.x % 32 == 0) warp_max[threadIdx.x / 32] = value;
  __syncthreads();
  value = warp_max[0];
  for (int w = 1; w < static_cast<int>(blockDim.x / 32); ++w) value = fmaxf(value, warp_max[w]);
  return value;
}

// One block per row (grid-strided). Pass 1 loads the row (16-byte vectors, kCachedVectors of them per thread
// kept in registers, any further ones re-read from L2 in pass 2), marks outlier columns and reduces the inlier
// absmax and the non-finite flag over the block; pass 2 writes the codes and the row scale. Offsets of rows are
// int64; columns inside a row are int (the launcher checks cols <= INT32_MAX), which saves registers.
template <typename T>
__global__ void __launch_bounds__(kMaxThreads)
    quantize_rows_kernel(const T* __restrict__ x, int64_t rows, int cols, int64_t row_stride, float threshold,
                         const uint8_t* __restrict__ excluded, int8_t* __restrict__ codes,
                         float* __restrict__ row_scale, uint8_t* __restrict__ outlier_mask) {
  constexpr int V = Vector<T>::kSize;
  __shared__ float warp_max[kMaxThreads / 32];
  const int t = threadIdx.x, threads = blockDim.x;
  const bool detect = threshold > 0.f;  // false for NaN too, like the reference's `threshold > 0`

  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    const T* in = x + row * row_stride;
    int8_t* out = codes + row * cols;
    // Columns [0, head) come before the first 16-byte boundary of the row, [head, tail) are n_vectors whole
    // vectors, [tail, cols) are left over. The head and tail columns (fewer than 2V <= 16 in all, so fewer than
    // the block's threads) go one per thread: threads 0 .. head-1 the head, the next ones the tail.
    const int misaligned = static_cast<int>(reinterpret_cast<uintptr_t>(in) % kVectorBytes / sizeof(T));
    const int head = min((V - misaligned) % V, cols);
    const int n_vectors = (cols - head) / V;
    const int tail = head + n_vectors * V;
    const bool has_scalar = t < head || t - head < cols - tail;
    const int scalar_col = !has_scalar ? 0 : t < head ? t : tail + (t - head);
    const bool aligned_codes = reinterpret_cast<uintptr_t>(out + head) % V == 0;  // the same for every vector

    // ---- pass 1: absmax over inliers, non-finite flag, outlier columns ----
    float absmax = 0.f;
    bool nonfinite = false;
    auto observe = [&](float v, int j) {
      nonfinite |= !isfinite(v);  // any column, excluded or not
      if (excluded != nullptr && excluded[j]) return;
      if (detect && fabsf(v) >= threshold) {
        outlier_mask[j] = 1;  // every writer stores the same value: deterministic
      } else if (isfinite(v)) {
        absmax = fmaxf(absmax, fabsf(v));
      }
    };
    auto observe_vector = [&](const Vector<T>& vec, int col) {
#pragma unroll
      for (int e = 0; e < V; ++e) observe(to_float(vec.v[e]), col + e);
    };

    Vector<T> cache[kCachedVectors];
#pragma unroll
    for (int k = 0; k < kCachedVectors; ++k) {  // all loads first, so they are in flight together
      const int v = t + k * threads;
      if (v < n_vectors) cache[k] = load_vector(in + head + v * V);
    }
    const float scalar = has_scalar ? to_float(in[scalar_col]) : 0.f;
#pragma unroll
    for (int k = 0; k < kCachedVectors; ++k) {
      const int v = t + k * threads;
      if (v < n_vectors) observe_vector(cache[k], head + v * V);
    }
    for (int v = t + kCachedVectors * threads; v < n_vectors; v += threads) {
      observe_vector(load_vector(in + head + v * V), head + v * V);
    }
    if (has_scalar) observe(scalar, scalar_col);

    absmax = block_max(absmax, warp_max);
    nonfinite = __syncthreads_or(nonfinite);  // also the barrier before the next row rewrites warp_max

    // ---- pass 2: codes and row scale ----
    if (t == 0) row_scale[row] = nonfinite ? __int_as_float(0x7fc00000) : absmax;  // NaN as float("nan")
    // The reference's `127 / absmax` is torch's reciprocal(absmax) * 127: two roundings, not one division.
    const bool tiny = absmax > 0.f && absmax < kTinyAbsmax;
    const float inv = absmax > 0.f ? __fmul_rn(kInt8Max, __frcp_rn(tiny ? __fmul_rn(absmax, kTinyLift) : absmax))
                                   : 0.f;
    auto code = [&](float v, int j) -> int8_t {
      if (nonfinite || (excluded != nullptr && excluded[j])) return 0;
      return quantize(v, inv);
    };
    if (tiny) {  // rare (degenerate data): element by element from L2, so the common path keeps its registers
      for (int j = t; j < cols; j += threads) out[j] = code(__fmul_rn(to_float(in[j]), kTinyLift), j);
      continue;
    }
    auto write_vector = [&](const Vector<T>& vec, int col) {
      int8_t c[V];
#pragma unroll
      for (int e = 0; e < V; ++e) c[e] = code(to_float(vec.v[e]), col + e);
      store_codes(out + col, c, aligned_codes);
    };

#pragma unroll
    for (int k = 0; k < kCachedVectors; ++k) {
      const int v = t + k * threads;
      if (v < n_vectors) write_vector(cache[k], head + v * V);
    }
    for (int v = t + kCachedVectors * threads; v < n_vectors; v += threads) {
      write_vector(load_vector(in + head + v * V), head + v * V);  // re-read, from L2 at least
    }
    if (has_scalar) out[scalar_col] = code(scalar, scalar_col);
  }
}

// One block: outlier_cols = the indices j < cols with mask[j] != 0, ascending, at most capacity of them, then -1
// up to capacity; n_outliers[0] = how many there are. The columns go in chunks of kCompactThreads, one per
// thread; a thread's slot is the count before the chunk plus the exclusive prefix count inside it (ballots).
__global__ void __launch_bounds__(kCompactThreads)
    compact_outliers_kernel(const uint8_t* __restrict__ mask, int64_t cols, int32_t* __restrict__ outlier_cols,
                            int32_t* __restrict__ n_outliers, int64_t capacity) {
  __shared__ int warp_counts[kCompactWarps];
  const int t = threadIdx.x, lane = t % 32, warp = t / 32;
  int64_t total = 0;  // outlier columns before the current chunk, the same in every thread
  for (int64_t chunk = 0; chunk < cols; chunk += kCompactThreads) {
    const int64_t col = chunk + t;
    const bool hit = col < cols && mask[col] != 0;
    const unsigned ballot = __ballot_sync(0xffffffffu, hit);
    if (lane == 0) warp_counts[warp] = __popc(ballot);
    __syncthreads();
    int64_t slot = total + __popc(ballot & ((1u << lane) - 1u));
    for (int w = 0; w < kCompactWarps; ++w) {
      const int count = warp_counts[w];
      if (w < warp) slot += count;
      total += count;
    }
    if (hit && slot < capacity) outlier_cols[slot] = static_cast<int32_t>(col);
    __syncthreads();  // every thread has read warp_counts before the next chunk rewrites it
  }
  if (t == 0) n_outliers[0] = static_cast<int32_t>(total);
  for (int64_t i = total + t; i < capacity; i += kCompactThreads) outlier_cols[i] = -1;
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

template <typename T>
void launch_rows(const void* x, int64_t rows, int64_t cols, int64_t row_stride, float threshold,
                 const uint8_t* excluded_cols, int8_t* codes, float* row_scale, uint8_t* outlier_mask,
                 cudaStream_t stream) {
  // One vector (16 bytes) per thread while that leaves the GPU partly idle (few rows, e.g. decode: a 4096-wide
  // bf16 row gets 512 threads), up to kCachedVectors per thread for large inputs; a multiple of 32 in 32..1024.
  const int64_t vectors = std::max<int64_t>(cols / Vector<T>::kSize, 1);
  const int64_t per_thread = std::clamp<int64_t>(ceil_div(rows * vectors, kFillThreads), 1, kCachedVectors);
  const int64_t threads = std::clamp<int64_t>(ceil_div(ceil_div(vectors, per_thread), 32) * 32, 32, kMaxThreads);
  const int64_t blocks = std::min<int64_t>(rows, INT_MAX);  // the kernel strides over any further rows
  quantize_rows_kernel<T><<<static_cast<unsigned>(blocks), static_cast<unsigned>(threads), 0, stream>>>(
      static_cast<const T*>(x), rows, static_cast<int>(cols), row_stride, threshold, excluded_cols, codes, row_scale,
      outlier_mask);
}

}  // namespace

cudaError_t int8_vectorwise_quant(const void* x, int64_t dtype, int64_t rows, int64_t cols, int64_t row_stride,
                                  float threshold, const uint8_t* excluded_cols, int8_t* codes, float* row_scale,
                                  uint8_t* outlier_mask, int32_t* outlier_cols, int32_t* n_outliers,
                                  int64_t capacity, cudaStream_t stream) {
  if (rows < 0 || cols < 0 || cols > INT32_MAX || capacity < 0) return cudaErrorInvalidValue;
  const int64_t element_size = dtype == kFloat32 ? 4 : (dtype == kBFloat16 || dtype == kFloat16) ? 2 : 0;
  if (element_size == 0 || reinterpret_cast<uintptr_t>(x) % element_size != 0) return cudaErrorInvalidValue;

  const bool detect = threshold > 0.f && rows > 0 && cols > 0;
  if (detect) {
    const cudaError_t error = cudaMemsetAsync(outlier_mask, 0, static_cast<size_t>(cols), stream);
    if (error != cudaSuccess) return error;
  }
  if (rows > 0) {  // cols == 0 still writes row_scale = 0
    switch (dtype) {
      case kBFloat16:
        launch_rows<__nv_bfloat16>(x, rows, cols, row_stride, threshold, excluded_cols, codes, row_scale,
                                   outlier_mask, stream);
        break;
      case kFloat16:
        launch_rows<__half>(x, rows, cols, row_stride, threshold, excluded_cols, codes, row_scale, outlier_mask,
                            stream);
        break;
      default:
        launch_rows<float>(x, rows, cols, row_stride, threshold, excluded_cols, codes, row_scale, outlier_mask,
                           stream);
    }
    const cudaError_t error = cudaGetLastError();
    if (error != cudaSuccess) return error;
  }
  // Always: writes n_outliers and the -1 padding even with detection off (then the mask is not read).
  compact_outliers_kernel<<<1, kCompactThreads, 0, stream>>>(outlier_mask, detect ? cols : 0, outlier_cols,
                                                             n_outliers, capacity);
  return cudaGetLastError();
}

}  // namespace torchext
