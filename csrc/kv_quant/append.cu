#include "append.h"

#include <algorithm>
#include <climits>
#include <cmath>
#include <type_traits>

#include <cuda_bf16.h>

namespace torchext {
namespace {

constexpr int kWarp = 32;
constexpr int kWarpsPerBlock = 4;
constexpr int kThreads = kWarp * kWarpsPerBlock;
constexpr int kPerLane = kKvQuantMaxHeadDim / kWarp;  // lane l holds channels l, l + 32, ... (coalesced loads)
constexpr int kMaxBoundaries = 15;                    // 2^4 - 1
constexpr int kWordBits = 32;
constexpr unsigned kFullMask = 0xffffffffu;

// The floor of a value scale (torch.finfo(torch.float32).tiny), as the reference clamps it.
constexpr float kScaleFloor = 1.17549435e-38f;

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }

template <typename T>
__device__ __forceinline__ T zero() {
  return T(0.f);
}

// The type of the value offsets and scales in a cache of T (reference: value_metadata_dtype).
template <typename T>
using ValueMetadata = std::conditional_t<std::is_same_v<T, __half>, __half, float>;

__device__ __forceinline__ float rounded_to(float x, float*) { return x; }
__device__ __forceinline__ float rounded_to(float x, __half*) { return __half2float(__float2half_rn(x)); }

struct Params {
  const void* k;
  const void* v;
  KvQuantStrides k_strides, v_strides;
  const int32_t* counts;
  int32_t* lengths;
  KvQuantStorage storage;
  KvQuantCodebook codebook;
  int64_t batch, kv_heads, n_new, capacity, sink, window;
  int head_dim, slots;
};

// What sequence b appends: tokens [start, start + count) when it can take them (ok), else nothing: it is (or
// stays) poisoned, as in the reference's can_take. A count of 0 writes nothing either way.
struct Span {
  int64_t start, count;
  bool ok;
};

__device__ __forceinline__ Span span_of(const Params& p, int64_t b) {
  const int64_t start = p.lengths[b], count = p.counts[b];
  return {start, count, start >= 0 && count >= 0 && count <= p.n_new && start + count <= p.capacity};
}

// Token j of (sequence b, head h) of a strided [batch, kv_heads, n_new, head_dim] input.
template <typename T>
__device__ __forceinline__ const T* token_row(const void* x, KvQuantStrides strides, int64_t b, int64_t h, int64_t j) {
  return static_cast<const T*>(x) + b * strides.batch + h * strides.head + j * strides.token;
}

__device__ __forceinline__ float warp_sum(float x) {
  for (int offset = kWarp / 2; offset > 0; offset >>= 1) x += __shfl_xor_sync(kFullMask, x, offset);
  return x;
}

__device__ __forceinline__ float warp_max(float x) {
  for (int offset = kWarp / 2; offset > 0; offset >>= 1) x = fmaxf(x, __shfl_xor_sync(kFullMask, x, offset));
  return x;
}

__device__ __forceinline__ float warp_min(float x) {
  for (int offset = kWarp / 2; offset > 0; offset >>= 1) x = fminf(x, __shfl_xor_sync(kFullMask, x, offset));
  return x;
}

// The channel of the largest score over the warp's vector, skipping this lane's registers marked in `taken`,
// returned to every lane: the lexicographic maximum of (score, -channel), so equal scores go to the lowest
// channel. A butterfly of an associative, commutative operation gives all lanes the same answer.
__device__ __forceinline__ int warp_argmax(const float (&score)[kPerLane], unsigned taken, int head_dim, int lane,
                                           float& best) {
  best = -INFINITY;
  int channel = kKvQuantMaxHeadDim;  // beyond any channel: loses every tie
#pragma unroll
  for (int j = 0; j < kPerLane; ++j) {
    const int c = lane + j * kWarp;  // ascending in j: a strict > keeps the lowest channel of a tie
    if (c < head_dim && !(taken >> j & 1u) && score[j] > best) {
      best = score[j];
      channel = c;
    }
  }
  for (int offset = kWarp / 2; offset > 0; offset >>= 1) {
    const float other_best = __shfl_xor_sync(kFullMask, best, offset);
    const int other_channel = __shfl_xor_sync(kFullMask, channel, offset);
    if (other_best > best || (other_best == best && other_channel < channel)) {
      best = other_best;
      channel = other_channel;
    }
  }
  return channel;
}

// Dense-and-sparse (sec. 3.4): `slots` rounds of warp argmax, as torch.topk(score, slots) in descending order.
// A channel with a negative score is never an outlier (keys: |x| <= 1); once only those are left the remaining
// slots are empty (-1, 0). Returns this lane's outlier channels as a bit mask over its registers j (a mask
// rather than overwritten scores: a dynamically indexed register array would live in local memory).
template <typename T>
__device__ __forceinline__ unsigned select_outliers(const float (&score)[kPerLane], int head_dim, int slots, int lane,
                                                    const T* src, int16_t* index, T* value) {
  unsigned taken = 0;
  for (int s = 0; s < slots; ++s) {
    float best;
    const int channel = warp_argmax(score, taken, head_dim, lane, best);
    if (!(best >= 0.f)) {  // warp-uniform
      for (int t = s + lane; t < slots; t += kWarp) {
        index[t] = -1;
        value[t] = zero<T>();
      }
      break;
    }
    if (channel % kWarp == lane) {
      taken |= 1u << (channel / kWarp);
      index[s] = static_cast<int16_t>(channel);
      value[s] = src[channel];  // the original element, exactly
    }
  }
  return taken;
}

// Nearest level (sec. 3.3): the number of boundaries strictly below clamp(x, -1, 1), by a branchless binary
// search over the 2^bits - 1 ascending boundaries (steps 2^(bits-1), ..., 1 never index past the last one).
__device__ __forceinline__ int nearest_code(float x, const float* boundaries, int bits) {
  x = fminf(fmaxf(x, -1.f), 1.f);
  int code = 0;
  for (int step = 1 << (bits - 1); step > 0; step >>= 1) {
    if (boundaries[code + step - 1] < x) code += step;
  }
  return code;
}

// Codes of the vector's normalised elements, packed into the words of vector `row`: code c at bits
// [c * bits, (c + 1) * bits) of the words' little-endian bit string (reference pack_codes; a 3-bit code may straddle
// two words). The codes go through the warp's `staging` bytes, then lane w builds word w from every code with bits
// in it.
__device__ __forceinline__ void store_codes(const float (&normal)[kPerLane], const float* boundaries, int bits,
                                            int head_dim, int lane, uint8_t* staging, int32_t* codes, int64_t row) {
#pragma unroll
  for (int j = 0; j < kPerLane; ++j) {
    const int c = lane + j * kWarp;
    if (c < head_dim) staging[c] = static_cast<uint8_t>(nearest_code(normal[j], boundaries, bits));
  }
  __syncwarp();
  const int n_words = (head_dim * bits + kWordBits - 1) / kWordBits;
  for (int w = lane; w < n_words; w += kWarp) {
    uint32_t word = 0;
    const int last = std::min(head_dim, ((w + 1) * kWordBits + bits - 1) / bits);  // codes starting before bit 32(w+1)
    for (int c = w * kWordBits / bits; c < last; ++c) {
      const int shift = c * bits - w * kWordBits;  // in (-bits, 32): negative for a code begun in word w - 1
      const uint32_t code = staging[c];
      word |= shift >= 0 ? code << shift : code >> -shift;
    }
    codes[row * n_words + w] = static_cast<int32_t>(word);
  }
  __syncwarp();  // staging is read before the warp's next vector overwrites it
}

// Keys per channel, pre-RoPE (sec. 3.1-3.2), against the calibrated per-channel range of head h.
template <typename T>
__device__ __forceinline__ void quantize_key(const Params& p, const float (&x)[kPerLane], const T* src, int64_t h,
                                             int64_t row, int lane, const float* boundaries, uint8_t* staging) {
  const int head_dim = p.head_dim;
  const float* offset = p.codebook.key_offset + h * head_dim;
  const float* scale = p.codebook.key_scale + h * head_dim;
  float normal[kPerLane], score[kPerLane];
#pragma unroll
  for (int j = 0; j < kPerLane; ++j) {
    const int c = lane + j * kWarp;
    normal[j] = c < head_dim ? __fdiv_rn(__fsub_rn(x[j], __ldg(offset + c)), __ldg(scale + c)) : 0.f;
    score[j] = fabsf(normal[j]) > 1.f ? fabsf(normal[j]) : -1.f;  // only out-of-range elements are eligible
  }
  select_outliers(score, head_dim, p.slots, lane, src, p.storage.key_outlier_index + row * p.slots,
                  static_cast<T*>(p.storage.key_outlier_value) + row * p.slots);
  store_codes(normal, boundaries, static_cast<int>(p.codebook.key_bits), head_dim, lane, staging,
              p.storage.key_codes, row);
}

// Values per token: outliers are the channels farthest from the mean, the others set the range.
template <typename T>
__device__ __forceinline__ void quantize_value(const Params& p, const float (&x)[kPerLane], const T* src,
                                               int64_t row, int lane, const float* boundaries, uint8_t* staging) {
  const int head_dim = p.head_dim;
  float sum = 0.f;
#pragma unroll
  for (int j = 0; j < kPerLane; ++j) sum += lane + j * kWarp < head_dim ? x[j] : 0.f;
  const float mean = __fdiv_rn(warp_sum(sum), static_cast<float>(head_dim));
  float score[kPerLane];
#pragma unroll
  for (int j = 0; j < kPerLane; ++j) score[j] = fabsf(__fsub_rn(x[j], mean));
  const unsigned outlier = select_outliers(score, head_dim, p.slots, lane, src,
                                           p.storage.value_outlier_index + row * p.slots,
                                           static_cast<T*>(p.storage.value_outlier_value) + row * p.slots);
  float hi = -INFINITY, lo = INFINITY;
#pragma unroll
  for (int j = 0; j < kPerLane; ++j) {
    if (lane + j * kWarp < head_dim && !(outlier >> j & 1u)) {
      hi = fmaxf(hi, x[j]);
      lo = fminf(lo, x[j]);
    }
  }
  hi = warp_max(hi);
  lo = warp_min(lo);
  // Halved first: hi - lo overflows fp32 near its largest finite values.
  // Rounded to the stored type first, so the codes are those of the offset and scale a read sees.
  using Metadata = ValueMetadata<T>;
  Metadata* const stored_offset = static_cast<Metadata*>(p.storage.value_offset);
  Metadata* const stored_scale = static_cast<Metadata*>(p.storage.value_scale);
  const float half_hi = __fmul_rn(hi, 0.5f), half_lo = __fmul_rn(lo, 0.5f);
  const float offset = rounded_to(__fadd_rn(half_hi, half_lo), stored_offset);
  const float scale = rounded_to(__fsub_rn(half_hi, half_lo), stored_scale);
  if (lane == 0) {
    stored_offset[row] = Metadata(offset);
    stored_scale[row] = Metadata(scale);
  }
  const float scale_floored = fmaxf(scale, kScaleFloor);
  float normal[kPerLane];
#pragma unroll
  for (int j = 0; j < kPerLane; ++j) normal[j] = __fdiv_rn(__fsub_rn(x[j], offset), scale_floored);
  store_codes(normal, boundaries, static_cast<int>(p.codebook.value_bits), head_dim, lane, staging,
              p.storage.value_codes, row);
}

// Launch 1: warp g quantizes leaving vector i of (sequence b, head h), the key when g is even, the value when odd.
// Sequence b's leaving positions are q = lo + i < hi, fewer than count <= n_new, so n_new per (b, h) bounds them.
template <typename T>
__global__ void __launch_bounds__(kThreads) quantize_leaving_kernel(Params p) {
  __shared__ float key_boundaries[kMaxBoundaries];
  __shared__ float value_boundaries[kMaxBoundaries];
  __shared__ uint8_t staging[kWarpsPerBlock][kKvQuantMaxHeadDim];
  const int t = threadIdx.x, lane = t % kWarp, warp = t / kWarp;
  if (t < (1 << p.codebook.key_bits) - 1) key_boundaries[t] = p.codebook.key_boundaries[t];
  if (t < (1 << p.codebook.value_bits) - 1) value_boundaries[t] = p.codebook.value_boundaries[t];
  __syncthreads();

  const int64_t total = p.batch * p.kv_heads * p.n_new * 2;
  for (int64_t g = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + warp; g < total;
       g += static_cast<int64_t>(gridDim.x) * kWarpsPerBlock) {
    const bool is_key = g % 2 == 0;
    const int64_t i = g / 2 % p.n_new, bh = g / 2 / p.n_new, b = bh / p.kv_heads, h = bh % p.kv_heads;
    const Span s = span_of(p, b);
    if (!s.ok) continue;
    const int64_t lo = std::max(s.start - p.window, p.sink), hi = std::max(s.start + s.count - p.window, p.sink);
    const int64_t q = lo + i;
    if (q >= hi) continue;

    const T* src;
    if (q < s.start) {  // still in the ring buffer (window > 0 here since q >= start - window)
      const void* ring = is_key ? p.storage.window_keys : p.storage.window_values;
      src = static_cast<const T*>(ring) + (bh * p.window + q % p.window) * p.head_dim;
    } else {
      const int64_t j = q - s.start;
      src = is_key ? token_row<T>(p.k, p.k_strides, b, h, j) : token_row<T>(p.v, p.v_strides, b, h, j);
    }
    float x[kPerLane];
#pragma unroll
    for (int j = 0; j < kPerLane; ++j) {
      const int c = lane + j * kWarp;
      x[j] = c < p.head_dim ? to_float(src[c]) : 0.f;
    }
    const int64_t row = bh * p.capacity + q;  // the vector [b, h, q] of the dense-and-sparse buffers
    if (is_key) {
      quantize_key(p, x, src, h, row, lane, key_boundaries, staging[warp]);
    } else {
      quantize_value(p, x, src, row, lane, value_boundaries, staging[warp]);
    }
  }
}

// Launch 2: the new tokens that stay in the cache dtype after the append, one warp each. Per (b, h) there are at most
// min(n_new, sink) sink tokens, u < that bound: token u when start + u < sink; and at most min(n_new, window) ring
// tokens: the last min(count, window) that are not in the sink (a token written earlier in the same append would
// be overwritten by a later one in the reference, so it is skipped here: no two warps write one slot).
template <typename T>
__global__ void __launch_bounds__(kThreads) place_new_tokens_kernel(Params p) {
  const int lane = threadIdx.x % kWarp;
  const int64_t sink_part = std::min(p.n_new, p.sink), per_head = sink_part + std::min(p.n_new, p.window);
  const int64_t total = p.batch * p.kv_heads * per_head;
  for (int64_t g = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarp; g < total;
       g += static_cast<int64_t>(gridDim.x) * kWarpsPerBlock) {
    const int64_t u = g % per_head, bh = g / per_head, b = bh / p.kv_heads, h = bh % p.kv_heads;
    const Span s = span_of(p, b);
    if (!s.ok) continue;
    int64_t j, dst_row;
    T *dst_k, *dst_v;
    if (u < sink_part) {
      j = u;
      if (j >= std::min(s.count, p.sink - s.start)) continue;
      dst_row = bh * p.sink + s.start + j;
      dst_k = static_cast<T*>(p.storage.sink_keys);
      dst_v = static_cast<T*>(p.storage.sink_values);
    } else {
      j = std::max(std::max(p.sink - s.start, s.count - p.window), int64_t{0}) + (u - sink_part);
      if (j >= s.count) continue;
      dst_row = bh * p.window + (s.start + j) % p.window;
      dst_k = static_cast<T*>(p.storage.window_keys);
      dst_v = static_cast<T*>(p.storage.window_values);
    }
    const T* src_k = token_row<T>(p.k, p.k_strides, b, h, j);
    const T* src_v = token_row<T>(p.v, p.v_strides, b, h, j);
    for (int c = lane; c < p.head_dim; c += kWarp) {
      dst_k[dst_row * p.head_dim + c] = src_k[c];
      dst_v[dst_row * p.head_dim + c] = src_v[c];
    }
  }
}

// Launch 3: lengths[b] += counts[b] for the sequences that can take their tokens, the others poisoned (after
// launches 1 and 2 have read lengths).
__global__ void advance_lengths_kernel(Params p) {
  for (int64_t b = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; b < p.batch;
       b += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const Span s = span_of(p, b);
    p.lengths[b] = s.ok ? static_cast<int32_t>(s.start + s.count) : kKvQuantPoisonedLength;
  }
}

unsigned blocks_for(int64_t work, int64_t per_block) {
  return static_cast<unsigned>(std::min<int64_t>((work + per_block - 1) / per_block, INT_MAX));
}

template <typename T>
cudaError_t launch(const Params& p, cudaStream_t stream) {
  if (p.batch == 0) return cudaSuccess;  // with n_new == 0 launch 3 still runs: a nonzero count poisons
  const int64_t leaving_warps = p.batch * p.kv_heads * p.n_new * 2;
  const int64_t placing_warps = p.batch * p.kv_heads * (std::min(p.n_new, p.sink) + std::min(p.n_new, p.window));
  if (leaving_warps > 0) {
    quantize_leaving_kernel<T><<<blocks_for(leaving_warps, kWarpsPerBlock), kThreads, 0, stream>>>(p);
    const cudaError_t error = cudaGetLastError();
    if (error != cudaSuccess) return error;
  }
  if (placing_warps > 0) {
    place_new_tokens_kernel<T><<<blocks_for(placing_warps, kWarpsPerBlock), kThreads, 0, stream>>>(p);
    const cudaError_t error = cudaGetLastError();
    if (error != cudaSuccess) return error;
  }
  advance_lengths_kernel<<<blocks_for(p.batch, kThreads), kThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

bool valid_bits(int64_t bits) { return bits >= 2 && bits <= 4; }

}  // namespace

cudaError_t kv_quant_append(const void* k, const void* v, KvQuantStrides k_strides, KvQuantStrides v_strides,
                            const int32_t* counts, int32_t* lengths, const KvQuantStorage& storage,
                            const KvQuantCodebook& codebook, const KvQuantShape& shape, int64_t dtype,
                            cudaStream_t stream) {
  const int64_t element_size = dtype == kFloat32 ? 4 : (dtype == kBFloat16 || dtype == kFloat16) ? 2 : 0;
  if (element_size == 0 || reinterpret_cast<uintptr_t>(k) % element_size != 0 ||
      reinterpret_cast<uintptr_t>(v) % element_size != 0) {
    return cudaErrorInvalidValue;
  }
  if (!valid_bits(codebook.key_bits) || !valid_bits(codebook.value_bits)) return cudaErrorInvalidValue;
  if (shape.head_dim < 2 || shape.head_dim > kKvQuantMaxHeadDim || shape.head_dim % 2 != 0) {
    return cudaErrorInvalidValue;
  }
  if (shape.batch < 0 || shape.kv_heads < 0 || shape.n_new < 0 || shape.capacity < 0 || shape.sink < 0 ||
      shape.window < 0 || shape.slots < 0 || shape.slots >= shape.head_dim) {
    return cudaErrorInvalidValue;
  }
  const Params p{k, v, k_strides, v_strides, counts, lengths, storage, codebook, shape.batch, shape.kv_heads,
                 shape.n_new, shape.capacity, shape.sink, shape.window, static_cast<int>(shape.head_dim),
                 static_cast<int>(shape.slots)};
  switch (dtype) {
    case kBFloat16: return launch<__nv_bfloat16>(p, stream);
    case kFloat16: return launch<__half>(p, stream);
    default: return launch<float>(p, stream);
  }
}

}  // namespace torchext
