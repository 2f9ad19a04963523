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

// Sum of `value` over the block's threads, returned to every thread.
__device__ float block_sum(float value, float* warp_sums) {
  for (int offset = 16; offset > 0; offset >>= 1) value += __shfl_xor_sync(0xffffffffu, value, offset);
  if (threadIdx.x % 32 == 0) warp_sums[threadIdx.x / 32] = value;
  __syncthreads();
  float total = 0.f;
  for (int w = 0; w < kWarps; ++w) total += warp_sums[w];
  return total;
}

// One contiguous vector of n elements: all threads stride over it.
__device__ void normalize_row(void* data, int64_t dtype, int64_t base, int64_t n, float eps, int32_t* zero_count) {
  __shared__ float warp_sums[kWarps];
  float sum_sq = 0.f;
  for (int64_t i = threadIdx.x; i < n; i += kThreads) {
    const float x = load(data, base + i, dtype);
    sum_sq += x * x;
  }
  const float norm = sqrtf(block_sum(sum_sq, warp_sums));
  if (threadIdx.x == 0 && norm == 0.f) atomicAdd(zero_count, 1);
  const float inv = 1.f / fmaxf(norm, eps);
  for (int64_t i = threadIdx.x; i < n; i += kThreads) store(data, base + i, dtype, load(data, base + i, dtype) * inv);
}

// kColumns adjacent vectors of stride `inner`: a warp reads 32 adjacent elements (coalesced), and the
// kRowGroups warps split the n rows between them.
__device__ void normalize_columns(void* data, int64_t dtype, int64_t base, int64_t n, int64_t inner, int64_t col0,
                                  float eps, int32_t* zero_count) {
  __shared__ float partial[kRowGroups][kColumns];
  __shared__ float inv_norm[kColumns];
  const int lane = threadIdx.x % kColumns, group = threadIdx.x / kColumns;
  const int64_t col = col0 + lane;
  float sum_sq = 0.f;
  if (col < inner) {
    for (int64_t r = group; r < n; r += kRowGroups) {
      const float x = load(data, base + r * inner + col, dtype);
      sum_sq += x * x;
    }
  }
  partial[group][lane] = sum_sq;
  __syncthreads();
  if (group == 0) {
    float total = 0.f;
    for (int g = 0; g < kRowGroups; ++g) total += partial[g][lane];
    const float norm = sqrtf(total);
    if (col < inner && norm == 0.f) atomicAdd(zero_count, 1);
    inv_norm[lane] = 1.f / fmaxf(norm, eps);
  }
  __syncthreads();
  if (col < inner) {
    const float inv = inv_norm[lane];
    for (int64_t r = group; r < n; r += kRowGroups) {
      const int64_t i = base + r * inner + col;
      store(data, i, dtype, load(data, i, dtype) * inv);
    }
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
