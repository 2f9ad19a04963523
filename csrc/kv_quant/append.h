// KVQuant quantize-and-append (Hooper et al., arXiv 2401.18079, sections 3.1-3.6): new key/value tokens enter a
// preallocated per-sequence cache (16-bit sink, 16-bit recent-window ring buffer, packed dense-and-sparse codes)
// with per-sequence lengths, for prefill and decode alike, without any host synchronisation or allocation.
#pragma once

#include <cstdint>

#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "dtype.h"

namespace torchext {

// head_dim limit: one warp holds a vector, at most 8 channels per lane.
constexpr int kKvQuantMaxHeadDim = 256;

// lengths[b] of a poisoned sequence, one an append could not take (torchext/reference/kv_quant.py::
// POISONED_LENGTH): without a host sync the append cannot raise, so it marks the sequence instead of dropping its
// tokens silently. A poisoned sequence takes no more tokens; zeroing its length clears it.
constexpr int32_t kKvQuantPoisonedLength = -1;

// Element strides of a [batch, kv_heads, n, head_dim] input whose last stride is 1.
struct KvQuantStrides {
  int64_t batch, head, token;
};

// The buffers of torchext/reference/kv_quant.py::Storage, all contiguous (device addresses). "dtype" is the
// cache dtype (the `dtype` argument of kv_quant_append, the same as the inputs'), that of every floating buffer but
// the value offsets and scales: __half in an fp16 cache, float otherwise (see Storage: range and precision);
// words = ceil(head_dim * bits / 32) int32 words per vector, code c at bits [c * bits, (c + 1) * bits) of their
// little-endian bit string (a 3-bit code may straddle two words).
struct KvQuantStorage {
  int32_t* key_codes;            // [batch, kv_heads, capacity, words(head_dim, key_bits)]
  int16_t* key_outlier_index;    // [batch, kv_heads, capacity, slots], -1 in empty slots
  void* key_outlier_value;       // [batch, kv_heads, capacity, slots] dtype, 0 in empty slots
  int32_t* value_codes;          // [batch, kv_heads, capacity, words(head_dim, value_bits)]
  void* value_offset;            // [batch, kv_heads, capacity] __half in an fp16 cache, else float
  void* value_scale;             // [batch, kv_heads, capacity] the same
  int16_t* value_outlier_index;  // [batch, kv_heads, capacity, slots]
  void* value_outlier_value;     // [batch, kv_heads, capacity, slots] dtype
  void* sink_keys;               // [batch, kv_heads, sink, head_dim] dtype, pre-RoPE
  void* sink_values;             // [batch, kv_heads, sink, head_dim] dtype
  void* window_keys;             // [batch, kv_heads, window, head_dim] dtype, ring buffer indexed by position % window
  void* window_values;           // [batch, kv_heads, window, head_dim] dtype
};

// torchext/reference/kv_quant.py::Codebook (fp32 device arrays).
struct KvQuantCodebook {
  const float* key_boundaries;    // [2^key_bits - 1] ascending
  const float* value_boundaries;  // [2^value_bits - 1] ascending
  const float* key_offset;        // [kv_heads, head_dim]
  const float* key_scale;         // [kv_heads, head_dim], > 0
  int64_t key_bits;               // 2, 3 or 4
  int64_t value_bits;             // 2, 3 or 4
};

struct KvQuantShape {
  int64_t batch, kv_heads, n_new, head_dim, capacity, slots, sink, window;
};

// Reproduces torchext/reference/kv_quant.py::append(storage, codebook, k, v, counts) for finite inputs. Sequence b
// with start = lengths[b], count = counts[b] can take its tokens when 0 <= start, 0 <= count <= n_new and
// start + count <= capacity; any other sequence is poisoned: nothing is written for it and lengths[b] =
// kKvQuantPoisonedLength (so a poisoned one, start < 0, stays poisoned). For a sequence that can take them:
// - the new token j < count is position p = start + j: p < sink goes to the sink; otherwise, when it is among the
//   last `window` positions after the append, to ring slot p % window;
// - every position q in [max(start - window, sink), max(start + count - window, sink)) leaves the window and is
//   quantized into its dense-and-sparse slot q, read from the ring buffer (q < start) or the input (q >= start);
// - lengths[b] = start + count.
// Quantization of one [head_dim] vector, with fp32 arithmetic rounded as the reference's torch operations are:
// - keys: x_c = (k_c - key_offset[h, c]) / key_scale[h, c]; the `slots` channels of largest |x_c| among those with
//   |x_c| > 1 are outliers (index, original value), remaining slots -1 / 0; codes of clamp(x, -1, 1);
// - values: the `slots` channels farthest from the vector's mean are outliers; hi / lo = max / min of the others;
//   offset = dtype(hi / 2 + lo / 2), scale = dtype(hi / 2 - lo / 2) (halves first: hi - lo may overflow);
//   x_c = (v_c - offset) / max(scale, smallest normal of dtype); codes of clamp(x, -1, 1);
// - code = the number of boundaries strictly below x (binary search), i.e. torch.bucketize(x, boundaries);
// - outlier slots are in descending order of |x| (keys) or distance from the mean (values); equal scores go to the
//   lowest channel first (torch.topk leaves the order of ties unspecified). The mean is a warp-tree fp32 sum, so
//   distances within an ulp of each other may rank differently from the reference's; offsets, scales and codes
//   are otherwise bit-identical.
// Three launches on `stream`, in this order because each reads what the next one overwrites: (1) one warp per
// leaving (sequence, head, position, key|value) vector quantizes it, (2) one warp per surviving new token writes
// it to the sink or the ring buffer, (3) one thread per sequence advances lengths or poisons the sequence.
// Returns cudaErrorInvalidValue for bits outside {2, 3, 4}, head_dim odd or outside [2, kKvQuantMaxHeadDim],
// negative sizes, slots >= head_dim, an unknown dtype or k / v not aligned to their element size; otherwise the
// launch status (cudaGetLastError()).
cudaError_t kv_quant_append(const void* k,                    // [batch, kv_heads, n_new, head_dim] dtype
                            const void* v,                    // [batch, kv_heads, n_new, head_dim] dtype
                            KvQuantStrides k_strides,         // elements; last stride 1
                            KvQuantStrides v_strides,         // elements; last stride 1
                            const int32_t* counts,            // [batch]: tokens of sequence b to take
                            int32_t* lengths,                 // [batch]: tokens held, advanced in place
                            const KvQuantStorage& storage,    // updated in place
                            const KvQuantCodebook& codebook,  // read only
                            const KvQuantShape& shape,        // sizes >= 0, slots < head_dim
                            int64_t dtype,                    // DtypeCode of k, v and the cache's floating buffers
                            cudaStream_t stream);             // every launch goes on this stream

}  // namespace torchext
