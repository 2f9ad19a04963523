#include "renormalize.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace torchext {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kColumns = kRenormalizeColumnsPerBlock;
constexpr int kRowGroups = kThreads / kColumns;  // column blocks are [kRowGroups, kColumns] threads
constexpr int kTableWidth = 6;

__device__ float load(const void* data, int64_t i, int64_t dtype) {
  switch (dtype) {
    case kBFloat16: return __bfloat162float(static_cast<const __nv_bfloat16*>(data)[i]);
    case kFloat16: return __half2float(static_cast<const __half*>(data)[i]);
    default: return static_cast<const float*>(data)[i];
  }
}

__device__ void store(void* data, int64_t i, int64_t dtype, float value) {
  switch (dtype) {
    case kBFloat16: static_cast<__nv_bfloat16*>(data)[i] = __float2bfloat16(value); break;
    case kFloat16: static_cast<__half*>(data)[i] = __float2half(value); break;
    default: static_cast<float*>(data)[i] = value;
  }
}

struct Add { __device__ float operator()(float a, float b) const { return a + b; } };
struct Max { __device__ float operator()(float a, float b) const { return fmaxf(a, b); } };

// `value` reduced over the block's threads, returned to every thread.
template <typename Op>
__device__ float block_reduce(float value, float (&warp_values)[kWarps], Op op) {
  for (int offset = 16; offset > 0; offset >>= 1) value = op(value, __shfl_xor_sync(0xffffffffu, value, offset));
  __syncthreads();  // warp_values may still be read by the previous reduction
  if (threadIdx.x % 32 == 0) warp_values[threadIdx.x / 32] = value;
  __syncthreads();
  float result = warp_values[0];
  for (int w = 1; w < kWarps; ++w) result = op(result, warp_values[w]);
  return result;
}

// A plain sum of squares overflows past |x| ~ 1e19 and flushes to zero below ~1e-19 (fp32). Sums outside
// [kSafeSumMin, kSafeSumMax] (zero and NaN included) are redone as ||x / s|| with s = max|x| (LAPACK nrm2's scaling,
// as the Triton nGPT kernels and the reference do); trained weights never take that second pass. ||x|| = s ||x / s||
// itself is never formed (it overflows for vectors peaking near 3e38, whose unit vector is representable): the
// result is (x / s) / max(||x / s||, eps / s), with s = 1 on the plain pass.
constexpr float kSafeSumMin = 1e-30f, kSafeSumMax = 1e30f;

__device__ bool needs_scaling(float sum_sq) { return !(sum_sq >= kSafeSumMin && sum_sq <= kSafeSumMax); }

// The divisor of the scaled pass: max|x|, or 1 for a zero vector (which stays 0 instead of 0 / 0).
__device__ float safe_scale(float max_abs) { return max_abs > 0.f ? max_abs : 1.f; }

// 1 / max(norm, eps) that keeps a NaN norm NaN (fmaxf would return eps and scale the row by 1 / eps).
__device__ float inv_clamped(float norm, float eps) { return 1.f / (isnan(norm) ? norm : fmaxf(norm, eps)); }

// One contiguous vector of n elements: all threads stride over it.
__device__ void normalize_row(void* data, int64_t dtype, int64_t base, int64_t n, float eps, int32_t* zero_count) {
  __shared__ float warp_values[kWarps];
  float sum_sq = 0.f;
  for (int64_t i = threadIdx.x; i < n; i += kThreads) {
    const float x = load(data, base + i, dtype);
    sum_sq += x * x;
  }
  float norm = sqrtf(block_reduce(sum_sq, warp_values, Add{})), scale = 1.f;  // norm = ||x / scale||
  if (needs_scaling(norm * norm)) {  // uniform over the block: every thread holds the same norm
    float max_abs = 0.f;
    for (int64_t i = threadIdx.x; i < n; i += kThreads) max_abs = fmaxf(max_abs, fabsf(load(data, base + i, dtype)));
    scale = safe_scale(block_reduce(max_abs, warp_values, Max{}));
    float scaled_sq = 0.f;
    for (int64_t i = threadIdx.x; i < n; i += kThreads) {
      const float x = load(data, base + i, dtype) / scale;
      scaled_sq += x * x;
    }
    norm = sqrtf(block_reduce(scaled_sq, warp_values, Add{}));
  }
  if (threadIdx.x == 0 && norm == 0.f) atomicAdd(zero_count, 1);
  const float to_unit = inv_clamped(norm, eps / scale);
  for (int64_t i = threadIdx.x; i < n; i += kThreads) {
    store(data, base + i, dtype, load(data, base + i, dtype) / scale * to_unit);
  }
}

// `value` reduced over the kRowGroups threads of each column, returned to every thread of that column.
template <typename Op>
__device__ float column_reduce(float value, float (&partial)[kRowGroups][kColumns], int group, int lane, Op op) {
  __syncthreads();  // partial may still be read by the previous reduction
  partial[group][lane] = value;
  __syncthreads();
  float result = partial[0][lane];
  for (int g = 1; g < kRowGroups; ++g) result = op(result, partial[g][lane]);
  return result;
}

// kColumns adjacent vectors of stride `inner`: a warp reads 32 adjacent elements (coalesced), and the
// kRowGroups warps split the n rows between them.
__device__ void normalize_columns(void* data, int64_t dtype, int64_t base, int64_t n, int64_t inner, int64_t col0,
                                  float eps, int32_t* zero_count) {
  __shared__ float partial[kRowGroups][kColumns];
  const int lane = threadIdx.x % kColumns, group = threadIdx.x / kColumns;
  const int64_t col = col0 + lane;
  const int64_t rows = col < inner ? n : 0;  // threads past the last column reduce nothing
  float sum_sq = 0.f;
  for (int64_t r = group; r < rows; r += kRowGroups) {
    const float x = load(data, base + r * inner + col, dtype);
    sum_sq += x * x;
  }
  float norm = sqrtf(column_reduce(sum_sq, partial, group, lane, Add{})), scale = 1.f;  // norm = ||x / scale||
  // Any column out of the safe range sends the whole block through the scaled pass (its barriers must be uniform).
  if (__syncthreads_or(col < inner && needs_scaling(norm * norm))) {
    float max_abs = 0.f;
    for (int64_t r = group; r < rows; r += kRowGroups) max_abs = fmaxf(max_abs, fabsf(load(data, base + r * inner + col,
                                                                                            dtype)));
    scale = safe_scale(column_reduce(max_abs, partial, group, lane, Max{}));
    float scaled_sq = 0.f;
    for (int64_t r = group; r < rows; r += kRowGroups) {
      const float x = load(data, base + r * inner + col, dtype) / scale;
      scaled_sq += x * x;
    }
    norm = sqrtf(column_reduce(scaled_sq, partial, group, lane, Add{}));
  }
  if (group == 0 && col < inner && norm == 0.f) atomicAdd(zero_count, 1);
  const float to_unit = inv_clamped(norm, eps / scale);
  for (int64_t r = group; r < rows; r += kRowGroups) {
    const int64_t i = base + r * inner + col;
    store(data, i, dtype, load(data, i, dtype) / scale * to_unit);
  }
}

__global__ void __launch_bounds__(kThreads) renormalize_kernel(const int64_t* __restrict__ table, int num_tensors,
                                                                int32_t* zero_counts, float eps) {
  // The owning tensor is the last one whose first block is <= this block (empty tensors own none).
  const int64_t block = blockIdx.x;
  int lo = 0, hi = num_tensors - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) / 2;
    if (table[mid * kTableWidth + 5] <= block) lo = mid; else hi = mid - 1;
  }
  const int64_t* slot = table + lo * kTableWidth;
  void* data = reinterpret_cast<void*>(slot[0]);
  const int64_t n = slot[2], inner = slot[3], dtype = slot[4], piece = block - slot[5];
  if (inner == 1) {
    normalize_row(data, dtype, piece * n, n, eps, zero_counts + lo);
  } else {
    const int64_t col_blocks = (inner + kColumns - 1) / kColumns;
    const int64_t outer_index = piece / col_blocks, col0 = (piece % col_blocks) * kColumns;
    normalize_columns(data, dtype, outer_index * n * inner, n, inner, col0, eps, zero_counts + lo);
  }
}

}  // namespace

cudaError_t renormalize(const int64_t* table, int num_tensors, int64_t num_blocks, int32_t* zero_counts, float eps,
                        cudaStream_t stream) {
  if (num_blocks == 0) return cudaSuccess;
  if (num_blocks > 0x7fffffffLL) return cudaErrorInvalidConfiguration;
  renormalize_kernel<<<static_cast<unsigned>(num_blocks), kThreads, 0, stream>>>(table, num_tensors, zero_counts, eps);
  return cudaGetLastError();
}

}  // namespace torchext
