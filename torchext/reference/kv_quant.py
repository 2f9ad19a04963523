"""Pure-PyTorch reference for KVQuant (Hooper et al., arXiv 2401.18079), written from the paper.

The quantized cache of one layer is a `Codebook` (fixed per layer: lookup tables and the per-channel key
normalisation, calibrated offline, paper sec. 3.1-3.4) and a `Storage` (per-sequence buffers preallocated for
`capacity` positions). Every function here is the ground truth the kernels are tested against and the CPU path
of the ops:

- keys are quantized per channel and before RoPE (sec. 3.1-3.2): x = (k - offset_c) / scale_c, so the
  calibrated range of channel c maps to [-1, 1]; RoPE is applied when attention reads them. With
  `Codebook.key_group` = G > 0 (the KIVI mode, Liu et al., arXiv 2402.02750, sec. 3.2) the range of channel c is
  instead the min-max range of every G consecutive quantized positions, stored per group in the cache;
- values are quantized per token: offset and scale of each [head_dim] vector, after its outliers are removed;
- each normalised element takes the code of its nearest level of a per-layer table of 2^bits levels (nuqX,
  sec. 3.3: k-means levels; uniform levels without calibration). The code is the number of midpoints
  (boundaries) below x: a binary search on midpoints finds the nearest level;
- dense-and-sparse (sec. 3.4): a fixed number of slots per [head_dim] vector keeps outliers exactly (their
  channel index and original 16-bit value), replacing the dense element on dequantization;
- positions below `sink` and the last `window` positions of each sequence stay in 16-bit (attention sink and
  recent window); the recent window is a ring buffer indexed by position % window. In the KIVI mode positions
  leave it G at a time, when the group they belong to is complete, so it holds between window - G + 1 and window
  of the most recent positions (KIVI's full-precision residual).
"""

import math
from typing import NamedTuple

import torch
from torch import Tensor

from torchext.reference.ngpt import rotate_half_rope

WORD_BITS = 32
SUPPORTED_BITS = (2, 3, 4)
POISONED_LENGTH = -1  # lengths[b] of a sequence an append could not take (see Storage)


class Codebook(NamedTuple):
    """What is fixed per layer. Levels are ascending fp32; boundaries[i] separates levels i and i + 1 (their
    midpoints, or the midpoints of the levels before Q-Norm moved them). key_group 0 normalises keys by the
    per-layer key_offset and key_scale (KVQuant); G > 0 by per-group ranges in the Storage (KIVI), and the
    per-layer ones go unread."""
    key_bits: int
    value_bits: int
    key_levels: Tensor         # [2^key_bits] fp32
    key_boundaries: Tensor     # [2^key_bits - 1] fp32
    value_levels: Tensor       # [2^value_bits] fp32
    value_boundaries: Tensor   # [2^value_bits - 1] fp32
    key_offset: Tensor         # [kv_heads, head_dim] fp32, the centre of each channel's calibrated range
    key_scale: Tensor          # [kv_heads, head_dim] fp32, its half-width (> 0)
    key_group: int = 0         # 0: per-layer key ranges; G > 0: per-channel ranges of every G positions


class Storage(NamedTuple):
    """The per-sequence buffers of one layer, indexed by absolute position (a position held in the sink or the
    window leaves its quantized slot unused). Outlier slots hold channel index -1 when empty.

    The value offsets and scales are fp16 in an fp16 cache and fp32 otherwise (value_metadata_dtype): they need
    the range of the values they describe (fp16 scales read an fp32 value of 7e4 back as inf) and more precision
    than bf16 gives them (a bf16 offset near 8 is rounded by up to 1/32); in an fp16 cache the values are fp16
    themselves, and fp32 metadata would cost 64 / head_dim bits per element (2 at head_dim 32) where fp16 costs
    half. The codes are those of the offset and scale as stored. Every other floating buffer has the cache dtype,
    the KIVI mode's key group ranges too, as KIVI stores them: one pair per group of G positions costs 32 / G bits
    per element at 16 bits, and the keys are quantized with the ranges as stored, so their rounding cannot push
    an element out of its group's range. Group g covers positions [sink + g G, sink + (g + 1) G).

    lengths[b] counts the tokens sequence b holds, or is POISONED_LENGTH once an append could not take its
    tokens (a count outside [0, n] or past the capacity): without a host sync the append cannot raise, so it marks
    the sequence rather than drop the tokens silently. A poisoned sequence takes no more tokens and its decode
    attention is NaN in every head; zeroing its length (KVQuantLayer.reset, storage.lengths.zero_()) clears it.
    """
    key_codes: Tensor            # [batch, kv_heads, capacity, words(head_dim, key_bits)] int32
    key_outlier_index: Tensor    # [batch, kv_heads, capacity, slots] int16
    key_outlier_value: Tensor    # [batch, kv_heads, capacity, slots] cache dtype
    key_group_offset: Tensor     # [batch, kv_heads, groups, head_dim] cache dtype (groups 0 unless key_group)
    key_group_scale: Tensor      # [batch, kv_heads, groups, head_dim] cache dtype, > 0
    value_codes: Tensor          # [batch, kv_heads, capacity, words(head_dim, value_bits)] int32
    value_offset: Tensor         # [batch, kv_heads, capacity] fp32
    value_scale: Tensor          # [batch, kv_heads, capacity] fp32
    value_outlier_index: Tensor  # [batch, kv_heads, capacity, slots] int16
    value_outlier_value: Tensor  # [batch, kv_heads, capacity, slots] cache dtype
    sink_keys: Tensor            # [batch, kv_heads, sink, head_dim] cache dtype, pre-RoPE
    sink_values: Tensor          # [batch, kv_heads, sink, head_dim]
    window_keys: Tensor          # [batch, kv_heads, window, head_dim] ring buffer, pre-RoPE
    window_values: Tensor        # [batch, kv_heads, window, head_dim]
    lengths: Tensor              # [batch] int32, tokens held per sequence, or POISONED_LENGTH


# The buffers by role, named once: code reads them through these, never by position.
KEY_PACKED = ("key_codes", "key_outlier_index", "key_outlier_value")  # one slot per quantized position
KEY_GROUPS = ("key_group_offset", "key_group_scale")  # one slot per group of key_group positions (KIVI mode)
VALUE_PACKED = ("value_codes", "value_offset", "value_scale", "value_outlier_index", "value_outlier_value")
PACKED = KEY_PACKED + VALUE_PACKED
DENSE = ("sink_keys", "sink_values", "window_keys", "window_values")  # cache-dtype positions
PER_SEQUENCE = KEY_PACKED + KEY_GROUPS + VALUE_PACKED + DENSE  # every buffer that holds a sequence's tokens
CUDA_APPEND = PACKED + DENSE  # the buffers the CUDA append writes, by keyword (it has no KIVI mode)


def buffers(storage: Storage, names: tuple[str, ...]) -> tuple[Tensor, ...]:
    return tuple(getattr(storage, name) for name in names)


def value_metadata_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of the value offsets and scales in a cache of `dtype` (see Storage)."""
    return torch.float16 if dtype == torch.float16 else torch.float32


def key_groups(capacity: int, sink: int, key_group: int) -> int:
    """Groups of key_group positions past the sink that `capacity` positions span (0 without the KIVI mode)."""
    return 0 if key_group == 0 else -(-max(capacity - sink, 0) // key_group)


def layout(batch: int, kv_heads: int, capacity: int, head_dim: int, slots: int, sink: int, window: int,
           key_bits: int, value_bits: int, dtype: torch.dtype,
           key_group: int = 0) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """The shape and dtype of every Storage buffer, in field order: what allocation, the ops' checks and byte
    counting read (adding a buffer is one entry here and one field in Storage)."""
    vectors, outliers = (batch, kv_heads, capacity), (batch, kv_heads, capacity, slots)
    dense = (batch, kv_heads)
    groups = (batch, kv_heads, key_groups(capacity, sink, key_group), head_dim)
    spec = {
        "key_codes": (vectors + (words_per_vector(head_dim, key_bits),), torch.int32),
        "key_outlier_index": (outliers, torch.int16), "key_outlier_value": (outliers, dtype),
        "key_group_offset": (groups, dtype), "key_group_scale": (groups, dtype),
        "value_codes": (vectors + (words_per_vector(head_dim, value_bits),), torch.int32),
        "value_offset": (vectors, value_metadata_dtype(dtype)), "value_scale": (vectors, value_metadata_dtype(dtype)),
        "value_outlier_index": (outliers, torch.int16), "value_outlier_value": (outliers, dtype),
        "sink_keys": (dense + (sink, head_dim), dtype), "sink_values": (dense + (sink, head_dim), dtype),
        "window_keys": (dense + (window, head_dim), dtype), "window_values": (dense + (window, head_dim), dtype),
        "lengths": ((batch,), torch.int32),
    }
    assert tuple(spec) == Storage._fields
    return spec


# ---- codes and levels -----------------------------------------------------------------------------------------------


def words_per_vector(head_dim: int, bits: int) -> int:
    """int32 words of a vector's codes, packed densely (3 bits: 3 words per 32 codes, no bit unused)."""
    return math.ceil(head_dim * bits / WORD_BITS)


def _code_bits(head_dim: int, bits: int, device) -> tuple[Tensor, Tensor]:
    """(word, shift) of each code's first bit: code c starts at bit c * bits, in word c * bits // 32."""
    first_bit = torch.arange(head_dim, device=device) * bits
    return first_bit // WORD_BITS, first_bit % WORD_BITS


def pack_codes(codes: Tensor, bits: int) -> Tensor:
    """codes [..., D] in [0, 2^bits) -> int32 words [..., words]: code c at bits [c bits, (c + 1) bits) of the
    little-endian bit string of the words, so a 3-bit code may straddle two words (2 and 4 bits never do)."""
    head_dim = codes.shape[-1]
    word, shift = _code_bits(head_dim, bits, codes.device)
    placed = codes.long() << shift  # up to 35 bits: what passes bit 32 belongs to the next word
    words = torch.zeros(*codes.shape[:-1], words_per_vector(head_dim, bits) + 1, dtype=torch.int64,
                        device=codes.device)
    words.scatter_add_(-1, word.expand_as(placed), placed & 0xFFFFFFFF)  # the fields are disjoint: sum = OR
    words.scatter_add_(-1, (word + 1).expand_as(placed), placed >> WORD_BITS)
    words = words[..., :-1]
    return torch.where(words >= 2 ** 31, words - 2 ** 32, words).to(torch.int32)  # the same 32 bits, signed


def unpack_codes(words: Tensor, bits: int, head_dim: int) -> Tensor:
    """int32 words [..., words] -> int64 codes [..., head_dim] (inverse of pack_codes)."""
    word, shift = _code_bits(head_dim, bits, words.device)
    unsigned = torch.cat((words.long() & 0xFFFFFFFF, words.new_zeros(*words.shape[:-1], 1, dtype=torch.int64)), -1)
    pair = unsigned[..., word] | (unsigned[..., word + 1] << WORD_BITS)  # the code's word and the next
    return (pair >> shift) & (2 ** bits - 1)


def uniform_levels(bits: int) -> Tensor:
    """The uncalibrated datatype: 2^bits evenly spaced levels over [-1, 1] (intX)."""
    return torch.linspace(-1, 1, 2 ** bits)


def midpoints(levels: Tensor) -> Tensor:
    return (levels[1:] + levels[:-1]) / 2


def nearest_code(x: Tensor, boundaries: Tensor) -> Tensor:
    """The code of the nearest level: the number of boundaries strictly below x (ties go to the lower level)."""
    return torch.bucketize(x.float().contiguous(), boundaries.float(), right=False)


def fit_levels(samples: Tensor, bits: int, weights: Tensor | None = None, iterations: int = 50) -> Tensor:
    """Weighted 1-D k-means (Lloyd) of normalised samples into 2^bits ascending levels (nuqX, sec. 3.3).

    samples: [n] values in about [-1, 1]; weights: [n] >= 0, e.g. the Fisher information (squared gradients),
    so the fit minimises sum_i F_i (x_i - Q(x_i))^2. Starts from weighted quantiles; an empty cluster keeps its
    level. Returns fp32 [2^bits].
    """
    x = samples.flatten().double()
    w = torch.ones_like(x) if weights is None else weights.flatten().double().clamp_min(0)
    if x.numel() == 0 or w.sum() <= 0:
        raise ValueError("fit_levels: needs samples with a positive total weight")
    order = x.argsort()
    cumulative = w[order].cumsum(0) / w.sum()
    quantiles = (torch.arange(2 ** bits, dtype=torch.float64) + 0.5) / 2 ** bits
    levels = x[order][torch.searchsorted(cumulative, quantiles).clamp_max(x.numel() - 1)]
    for _ in range(iterations):
        code = nearest_code(x, midpoints(levels))
        mass = torch.zeros_like(levels).index_add_(0, code, w)
        total = torch.zeros_like(levels).index_add_(0, code, w * x)
        updated = torch.where(mass > 0, total / mass.clamp_min(1e-300), levels).sort().values
        if torch.equal(updated, levels):
            break
        levels = updated
    return levels.float()


def q_norm_levels(samples: Tensor, levels: Tensor) -> Tensor:
    """Q-Norm (sec. 3.6): an affine map of the levels so quantized samples keep the mean and standard deviation
    of the originals. Codes are still assigned by the midpoints of the original levels."""
    x = samples.flatten().double()
    q = levels.double()[nearest_code(x, midpoints(levels))]
    gain = x.std() / q.std().clamp_min(1e-12)
    return (levels.double() * gain + (x.mean() - q.mean() * gain)).float()


def outlier_slots(head_dim: int, outlier_fraction: float) -> int:
    """Dense-and-sparse slots per vector: about outlier_fraction of head_dim, at least one when enabled."""
    return 0 if outlier_fraction <= 0 else max(1, round(outlier_fraction * head_dim))


# ---- quantize and dequantize one [..., head_dim] vector -------------------------------------------------------------


def _outliers(deviation: Tensor, eligible: Tensor, slots: int) -> Tensor:
    """Channel indices [..., slots] int64 of the largest eligible deviations, ties to the lowest channel (as the
    CUDA kernel breaks them; torch.topk leaves their order unspecified), -1 where fewer are eligible."""
    if slots == 0:
        return deviation.new_zeros(*deviation.shape[:-1], 0, dtype=torch.int64)
    values, indices = torch.where(eligible, deviation, -1.0).sort(dim=-1, descending=True, stable=True)
    return torch.where(values[..., :slots] >= 0, indices[..., :slots], -1)


def _gather_outliers(x: Tensor, index: Tensor) -> Tensor:
    return torch.where(index >= 0, x.gather(-1, index.clamp_min(0)), 0).to(x.dtype)


def _replace_outliers(dense: Tensor, index: Tensor, value: Tensor) -> Tensor:
    channel = torch.arange(dense.shape[-1], device=dense.device)
    for slot in range(index.shape[-1]):
        hit = channel == index[..., slot, None].long()
        dense = torch.where(hit, value[..., slot, None].to(dense.dtype), dense)
    return dense


def normalize_keys(k: Tensor, key_offset: Tensor, key_scale: Tensor) -> Tensor:
    """(k - offset_c) / scale_c in fp32: k [..., kv_heads, n, head_dim], offset/scale [kv_heads, head_dim]."""
    return (k.float() - key_offset[:, None]) / key_scale[:, None]


KeyRanges = tuple[Tensor, Tensor]  # fp32 (offset, scale) broadcastable to the keys [..., kv_heads, n, head_dim]


def layer_key_ranges(codebook: Codebook) -> KeyRanges:
    """The per-layer ranges of the KVQuant mode, [kv_heads, 1, head_dim] each."""
    return codebook.key_offset[:, None], codebook.key_scale[:, None]


def group_key_ranges(k: Tensor, group: int) -> KeyRanges:
    """KIVI's per-channel min-max ranges of every `group` consecutive positions of k [..., n, head_dim] (n a
    multiple of group): (offset, scale) [..., n / group, head_dim] in k.dtype, as the cache stores them; a
    constant channel gets the smallest positive scale, so it reads back as its offset."""
    grouped = k.float().unflatten(-2, (-1, group))  # [..., groups, group, head_dim]
    half_hi, half_lo = grouped.amax(-2) / 2, grouped.amin(-2) / 2  # halved first: hi - lo may overflow
    tiny = torch.finfo(k.dtype).tiny
    return (half_hi + half_lo).to(k.dtype), (half_hi - half_lo).clamp_min(tiny).to(k.dtype)


def quantize_keys(k: Tensor, codebook: Codebook, slots: int,
                  ranges: KeyRanges | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """k [batch, kv_heads, n, head_dim] pre-RoPE -> (codes int32 [..., words], outlier index int16 [..., slots],
    outlier value [..., slots] in k.dtype), normalised by `ranges` (default the codebook's per-layer ones).

    Elements outside their channel's range (|x| > 1) are outliers; the `slots` largest per vector are kept
    exactly, the rest clamp to the range.
    """
    offset, scale = layer_key_ranges(codebook) if ranges is None else ranges
    x = (k.float() - offset.float()) / scale.float()
    index = _outliers(x.abs(), x.abs() > 1, slots)
    codes = nearest_code(x.clamp(-1, 1), codebook.key_boundaries)
    return pack_codes(codes, codebook.key_bits), index.to(torch.int16), _gather_outliers(k, index)


def value_statistics(v: Tensor, slots: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Per-token statistics of v [..., head_dim] in the cache dtype: (normalised fp32 [..., head_dim], inlier mask,
    outlier index int64 [..., slots] (-1: empty), (offset, scale) fp32 [...] each, as a pair).

    The `slots` elements farthest from the vector's mean are outliers; the others set the vector's range
    [offset - scale, offset + scale].
    """
    vf = v.float()
    index = _outliers((vf - vf.mean(-1, keepdim=True)).abs(), torch.ones_like(vf, dtype=torch.bool), slots)
    inlier = _replace_outliers(torch.ones_like(vf, dtype=torch.bool), index, torch.zeros_like(index, dtype=vf.dtype))
    half_hi = torch.where(inlier, vf, -math.inf).amax(-1) / 2  # halved first: hi - lo overflows near fp32's max
    half_lo = torch.where(inlier, vf, math.inf).amin(-1) / 2
    offset, scale = half_hi + half_lo, half_hi - half_lo
    x = (vf - offset[..., None]) / scale.clamp_min(torch.finfo(torch.float32).tiny)[..., None]
    return x, inlier.bool(), index, (offset, scale)


def quantize_values(v: Tensor, codebook: Codebook, slots: int) -> tuple[Tensor, ...]:
    """v [batch, kv_heads, n, head_dim] -> (codes int32 [..., words], offset [...], scale [...], outlier index
    int16 [..., slots], outlier value [..., slots]), offsets and scales in value_metadata_dtype(v.dtype) and the
    codes of them as rounded, outliers in v.dtype; see value_statistics."""
    x, _, index, (offset, scale) = value_statistics(v, slots)
    metadata = value_metadata_dtype(v.dtype)
    if metadata != torch.float32:
        offset, scale = offset.to(metadata), scale.to(metadata)
        tiny = torch.finfo(torch.float32).tiny
        x = (v.float() - offset.float()[..., None]) / scale.float().clamp_min(tiny)[..., None]
    codes = nearest_code(x.clamp(-1, 1), codebook.value_boundaries)
    return (pack_codes(codes, codebook.value_bits), offset, scale, index.to(torch.int16),
            _gather_outliers(v, index))


def dequantize_keys(codes: Tensor, outlier_index: Tensor, outlier_value: Tensor, codebook: Codebook,
                    head_dim: int, ranges: KeyRanges | None = None) -> Tensor:
    """Inverse of quantize_keys: [batch, kv_heads, n, head_dim] fp32, pre-RoPE."""
    offset, scale = layer_key_ranges(codebook) if ranges is None else ranges
    level = codebook.key_levels[unpack_codes(codes, codebook.key_bits, head_dim)]
    dense = level * scale.float() + offset.float()
    return _replace_outliers(dense, outlier_index, outlier_value)


def dequantize_values(codes: Tensor, offset: Tensor, scale: Tensor, outlier_index: Tensor, outlier_value: Tensor,
                      codebook: Codebook, head_dim: int) -> Tensor:
    """Inverse of quantize_values: [batch, kv_heads, n, head_dim] fp32."""
    level = codebook.value_levels[unpack_codes(codes, codebook.value_bits, head_dim)]
    dense = level * scale.float()[..., None] + offset.float()[..., None]
    return _replace_outliers(dense, outlier_index, outlier_value)


def quantize_dequantize(keys: Tensor, values: Tensor, codebook: Codebook, slots: int) -> tuple[Tensor, Tensor]:
    """The quantizer alone (no sink, no window): keys (pre-RoPE) and values [batch, kv_heads, n, head_dim] as they
    read back from their quantized slots, fp32. In the KIVI mode the last n % key_group positions, an incomplete
    group, stay exact, as the window holds them. What calibration and the quality benchmark measure."""
    head_dim, n = keys.shape[-1], keys.shape[2]
    full = n - n % codebook.key_group if codebook.key_group else n
    ranges = None
    if codebook.key_group:
        ranges = tuple(t.repeat_interleave(codebook.key_group, -2) for t in
                       group_key_ranges(keys[:, :, :full], codebook.key_group))
    k_hat = dequantize_keys(*quantize_keys(keys[:, :, :full], codebook, slots, ranges), codebook, head_dim, ranges)
    v_hat = dequantize_values(*quantize_values(values, codebook, slots), codebook, head_dim)
    return torch.cat((k_hat, keys[:, :, full:].float()), 2), v_hat


# ---- RoPE -----------------------------------------------------------------------------------------------------------


def rope_cos_sin(positions: Tensor, inv_freq: Tensor, attention_scaling: float = 1.0) -> tuple[Tensor, Tensor]:
    """fp32 cos, sin [..., n, head_dim / 2] of the angles position * inv_freq, times attention_scaling, computed
    as Hugging Face's rotary embeddings do (fp32 product), so Llama-3 / YaRN scaling is whatever inv_freq holds."""
    angles = positions.float()[..., None] * inv_freq.float()
    return angles.cos() * attention_scaling, angles.sin() * attention_scaling


def rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Half-split ("rotate_half") RoPE of x [..., n, head_dim] by cos, sin [..., n, head_dim / 2], in fp32."""
    return rotate_half_rope(x.float(), cos, sin)


def unrotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Inverse of rotate (the transposed rotation, divided by the squared attention scaling)."""
    gain = cos.square() + sin.square()
    return rotate(x, cos / gain, -sin / gain)


# ---- the cache: append and read back --------------------------------------------------------------------------------


def _store_dense(storage: Storage, codebook: Codebook, b: int, positions: Tensor, k: Tensor, v: Tensor,
                 slots: int) -> None:
    """Quantize k, v [kv_heads, n, head_dim] into the dense-and-sparse slots of sequence b at `positions` (whole
    key groups in the KIVI mode: their ranges are stored first, and the keys quantized with them as stored)."""
    ranges = None
    if codebook.key_group:
        group = codebook.key_group
        first_group = (int(positions[0]) - storage.sink_keys.shape[2]) // group
        groups = torch.arange(first_group, first_group + positions.numel() // group)
        for buffer, new in zip(buffers(storage, KEY_GROUPS), group_key_ranges(k, group)):
            buffer[b][:, groups] = new
        ranges = tuple(t[b][:, groups].repeat_interleave(group, 1)[None] for t in buffers(storage, KEY_GROUPS))
    kc, ki, kv_ = quantize_keys(k[None], codebook, slots, ranges)
    vc, vo, vs, vi, vv = quantize_values(v[None], codebook, slots)
    for buffer, new in zip(buffers(storage, PACKED), (kc, ki, kv_, vc, vo, vs, vi, vv)):
        buffer[b][:, positions] = new[0]


def can_take(length: int, count: int, n: int, capacity: int) -> bool:
    """Whether a sequence holding `length` tokens can take `count` of n new ones: it is not poisoned (length < 0),
    count is in [0, n] and the tokens fit the capacity."""
    return length >= 0 and 0 <= count <= n and length + count <= capacity


def append(storage: Storage, codebook: Codebook, k: Tensor, v: Tensor, counts: Tensor | None = None) -> None:
    """Quantize-and-append (in place): sequence b takes the first counts[b] tokens of k[b], v[b] at positions
    lengths[b], lengths[b] + 1, ...; lengths grows by counts.

    k: [batch, kv_heads, n, head_dim] pre-RoPE; v: the same; counts: [batch] int (default n for all).
    A position below `sink` goes to the sink. Otherwise it enters the recent window; the positions it pushes out
    of the window (window_start) are quantized into their slots. A sequence that cannot take
    its tokens (can_take) is poisoned: nothing is written for it and lengths[b] becomes POISONED_LENGTH, so a
    poisoned sequence stays poisoned (see Storage; the op raises instead when asked to check on the host).
    """
    batch, _, n, _ = k.shape
    capacity = storage.key_codes.shape[2]
    counts = torch.full((batch,), n) if counts is None else counts.cpu()
    for b in range(batch):
        start, count = int(storage.lengths[b]), int(counts[b])
        if not can_take(start, count, n, capacity):
            storage.lengths[b] = POISONED_LENGTH
        elif count:
            _append_sequence(storage, codebook, b, k[b, :, :count], v[b, :, :count], start)
            storage.lengths[b] = start + count


def _append_sequence(storage: Storage, codebook: Codebook, b: int, k: Tensor, v: Tensor, start: int) -> None:
    """Sequence b's new tokens k, v [kv_heads, count, head_dim] at positions start, start + 1, ..."""
    sink, window, step = storage.sink_keys.shape[2], storage.window_keys.shape[2], window_step(codebook)
    count, slots = k.shape[1], storage.key_outlier_index.shape[3]
    history = torch.cat((read_window(storage, codebook, b, start), torch.stack((k, v))), 2)
    first = window_start(start, sink, window, step)  # the position history[:, :, 0] holds
    end = start + count
    to_sink = torch.arange(start, max(start, min(end, sink)))
    storage.sink_keys[b][:, to_sink], storage.sink_values[b][:, to_sink] = history[:, :, to_sink - first]
    if window > 0:  # the new tokens the ring keeps: the last one of each slot (a later one overwrites the rest)
        to_ring = torch.arange(max(start, sink, end - window), end)
        storage.window_keys[b][:, to_ring % window], storage.window_values[b][:, to_ring % window] = \
            history[:, :, to_ring - first]
    leaving = torch.arange(max(first, sink), max(window_start(end, sink, window, step), sink))
    if leaving.numel():  # positions that left the window in this append: quantize them
        _store_dense(storage, codebook, b, leaving, history[0, :, leaving - first], history[1, :, leaving - first],
                     slots)


def window_step(codebook: Codebook) -> int:
    """Positions that leave the recent window together: one at a time, or a whole key group (KIVI mode)."""
    return max(codebook.key_group, 1)


def window_start(length: int, sink: int, window: int, step: int = 1) -> int:
    """The first position the recent window holds in a sequence of `length` tokens: everything past the sink is
    in it while it fits; then positions leave in whole steps from the sink on, so the window holds the last
    window - step + 1 to window positions (window >= step)."""
    if length <= sink:
        return length
    excess = max(length - sink - window, 0)
    return sink + -(-excess // step) * step


def read_window(storage: Storage, codebook: Codebook, b: int, length: int) -> Tensor:
    """The window's tokens of sequence b at `length`, oldest first: [2, kv_heads, n, head_dim] (keys, values)."""
    sink, window = storage.sink_keys.shape[2], storage.window_keys.shape[2]
    positions = torch.arange(window_start(length, sink, window, window_step(codebook)), length)
    slots = positions % max(window, 1)
    return torch.stack((storage.window_keys[b][:, slots], storage.window_values[b][:, slots]))


def read_packed(storage: Storage, codebook: Codebook, positions: Tensor) -> tuple[Tensor, Tensor]:
    """The quantized slots at `positions` [n] of every sequence, dequantized: fp32 keys (pre-RoPE) and values
    [batch, kv_heads, n, head_dim]."""
    head_dim, sink = storage.sink_keys.shape[-1], storage.sink_keys.shape[2]
    ranges = None
    if codebook.key_group and storage.key_group_offset.shape[2]:
        group = ((positions - sink) // codebook.key_group).clamp(0, storage.key_group_offset.shape[2] - 1)
        ranges = tuple(t[:, :, group] for t in buffers(storage, KEY_GROUPS))
    keys = dequantize_keys(*(t[:, :, positions] for t in buffers(storage, KEY_PACKED)), codebook, head_dim, ranges)
    values = dequantize_values(*(t[:, :, positions] for t in buffers(storage, VALUE_PACKED)), codebook, head_dim)
    return keys, values


def read(storage: Storage, codebook: Codebook) -> tuple[Tensor, Tensor]:
    """Every position of the cache as fp32 (keys pre-RoPE): [batch, kv_heads, capacity, head_dim] each. Positions
    at or past a sequence's length hold garbage, every position of a poisoned one too; attention masks them."""
    sink, capacity = storage.sink_keys.shape[2], storage.key_codes.shape[2]
    keys, values = read_packed(storage, codebook, torch.arange(capacity, device=storage.key_codes.device))
    for b in range(keys.shape[0]):
        length = int(storage.lengths[b])
        if not 0 <= length <= capacity:  # poisoned (or a length no append writes): it holds nothing to read
            continue
        held = min(sink, length)
        keys[b, :, :held], values[b, :, :held] = storage.sink_keys[b, :, :held], storage.sink_values[b, :, :held]
        recent = read_window(storage, codebook, b, length).float()
        keys[b, :, length - recent.shape[2]:length], values[b, :, length - recent.shape[2]:length] = recent
    return keys, values


def crop(storage: Storage, codebook: Codebook, keep: list[int]) -> None:
    """Cut sequence b back to its first min(keep[b], lengths[b]) tokens, in place (a poisoned sequence stays so).

    A position the shorter sequence holds in its recent window may have left the window since (it was quantized,
    and newer tokens may have taken its ring slot): it is restored from its quantized slot, so it reads back
    quantized, as it would have after those tokens; every other position reads back as before.
    """
    sink, window, step = storage.sink_keys.shape[2], storage.window_keys.shape[2], window_step(codebook)
    for b, wanted in enumerate(keep):
        old = int(storage.lengths[b])
        if old < 0:
            continue
        new = max(min(int(wanted), old), 0)
        first = window_start(new, sink, window, step)
        quantized = torch.arange(first, max(first, min(new, window_start(old, sink, window, step))))
        if quantized.numel():  # dequantize just these positions of sequence b: [1, kv_heads, n, head_dim] each
            sequence = Storage(*(t[b:b + 1] for t in storage))
            keys, values = read_packed(sequence, codebook, quantized.to(storage.key_codes.device))
            slots = quantized % window
            storage.window_keys[b][:, slots] = keys[0].to(storage.window_keys.dtype)
            storage.window_values[b][:, slots] = values[0].to(storage.window_values.dtype)
        storage.lengths[b] = new


# ---- decode attention -----------------------------------------------------------------------------------------------


def decode_attention(q: Tensor, keys: Tensor, values: Tensor, lengths: Tensor, inv_freq: Tensor,
                     attention_scaling: float = 1.0, scale: float | None = None) -> Tensor:
    """One query token per sequence against its first lengths[b] cached positions, in fp32.

    q: [batch, heads, 1, head_dim] post-RoPE at any position; keys: [batch, kv_heads, n, head_dim] pre-RoPE (key
    at index p is rotated by position p); values: the same; heads a multiple of kv_heads (GQA); scale defaults
    to head_dim^-0.5. Returns fp32 [batch, heads, 1, head_dim], NaN in every head of a sequence whose length is
    not in [0, n] (poisoned: POISONED_LENGTH), so a failed append shows, and 0 for a sequence of length 0
    (attention over no keys, as FlashAttention gives a fully masked row; the kernel's split-K merge does too).
    """
    batch, heads, _, head_dim = q.shape
    n = keys.shape[2]
    cos, sin = rope_cos_sin(torch.arange(n, device=keys.device), inv_freq, attention_scaling)
    group = heads // keys.shape[1]
    k = rotate(keys, cos, sin).repeat_interleave(group, 1)
    v = values.float().repeat_interleave(group, 1)
    scores = (q.float() @ k.transpose(-1, -2)) * (head_dim ** -0.5 if scale is None else scale)
    lengths = lengths.to(q.device)
    visible = torch.arange(n, device=q.device) < lengths[:, None]
    scores = scores.masked_fill(~visible[:, None, None, :], -math.inf)
    held = (lengths >= 0) & (lengths <= n)
    attended = (scores.softmax(-1) @ v).masked_fill((lengths == 0)[:, None, None, None], 0.0)
    return torch.where(held[:, None, None, None], attended, math.nan)
