"""KVQuant decode attention (arXiv 2401.18079) as split-K flash decoding over the packed cache.

Program (sequence b, kv head h, split s) walks its chunk of quantized positions in tiles of BLOCK_N: it unpacks the
codes of a [BLOCK_N, head_dim] key tile, looks up the per-layer levels, undoes the per-channel normalisation (per
layer, or per group of KEY_GROUP positions in the KIVI mode: one kernel serves both, the mode a constexpr),
puts the dense-and-sparse outliers back, rotates the tile by RoPE at its positions (angle addition from a table
built once per program: no sincos per element) and scores all the query heads of the GQA group at once, so one
dequantization serves the whole group. Values are dequantized per token the same way. The last split of each
(b, h) attends over the 16-bit sink and recent window instead. Each split leaves a normalised partial output and
its log-sum-exp; a second kernel merges the splits (log-sum-exp weights).
"""

import math

import torch
import triton
import triton.language as tl

from torchext.reference import kv_quant as ref

from ._attention import online_softmax_step, softmax_result
from ._launch import GPU_TILES, dot, dot_dtype, sm_count

LOG2E = math.log2(math.e)
# Positions per tile: the interpreter favours big tiles; on the GPU, 16 with 8 warps compiles for sm_90 to 128
# registers and no spills (32 takes 250). Not yet tuned on a GPU.
BLOCK_N = 16 if GPU_TILES else 64
NUM_WARPS = 8
# Split partials the merge kernel reads per step; the number of splits is a runtime argument of both kernels, so
# a growing context never recompiles them.
MERGE_BLOCK = 64


@triton.jit
def _rope_table(inv_freq_ptr, attention_scaling, BLOCK_N: tl.constexpr, HALF: tl.constexpr):
    """cos, sin of j * theta_i for j < BLOCK_N (times the attention scaling): [BLOCK_N, HALF] each, and theta."""
    theta = tl.load(inv_freq_ptr + tl.arange(0, HALF)).to(tl.float32)  # [HALF]
    angle = tl.arange(0, BLOCK_N).to(tl.float32)[:, None] * theta[None, :]  # [BLOCK_N, HALF]
    return tl.cos(angle) * attention_scaling, tl.sin(angle) * attention_scaling, theta


@triton.jit
def _scores(q_lo, q_hi, k_lo, k_hi, start, theta, cos_j, sin_j, DOT: tl.constexpr):
    """q . RoPE(k) for keys at positions start + j: [BLOCK_G, BLOCK_N] fp32.

    cos((start + j) theta) = cos(start theta) cos(j theta) - sin(start theta) sin(j theta) (and the sine likewise):
    HALF sincos per tile, two FMAs per element. Pairs (i, i + HALF) rotate as Hugging Face's rotate_half does.
    """
    base = (start + 0.0) * theta  # [HALF]
    cos_b, sin_b = tl.cos(base)[None, :], tl.sin(base)[None, :]
    cos = cos_b * cos_j - sin_b * sin_j  # [BLOCK_N, HALF]
    sin = sin_b * cos_j + cos_b * sin_j
    rot_lo = (k_lo * cos - k_hi * sin).to(DOT)
    rot_hi = (k_hi * cos + k_lo * sin).to(DOT)
    s = dot(q_lo, tl.trans(rot_lo), tl.zeros((q_lo.shape[0], rot_lo.shape[0]), tl.float32), DOT)
    return dot(q_hi, tl.trans(rot_hi), s, DOT)


@triton.jit
def _put_outliers(x, channel, index_ptr, value_ptr, rows, valid, SLOTS: tl.constexpr):
    """Replace the dense elements of a [BLOCK_N, C] tile by the exact outliers of its rows (slot index -1: none)."""
    for slot in tl.static_range(SLOTS):
        index = tl.load(index_ptr + rows * SLOTS + slot, mask=valid, other=-1).to(tl.int32)  # [BLOCK_N]
        value = tl.load(value_ptr + rows * SLOTS + slot, mask=valid, other=0.0).to(tl.float32)
        x = tl.where(channel[None, :] == index[:, None], value[:, None], x)
    return x


@triton.jit
def _group_ranges(offset_ptr, scale_ptr, bh, pos, valid, channel, SINK: tl.constexpr, KEY_GROUP: tl.constexpr,
                  GROUPS: tl.constexpr, D: tl.constexpr):
    """The KIVI mode's (offset, scale) fp32 [BLOCK_N, C] of a key tile's channels: each position's group's
    (group g starts at SINK + g KEY_GROUP)."""
    at = (bh * GROUPS + (pos - SINK) // KEY_GROUP)[:, None] * D + channel[None, :]  # [BLOCK_N, C]
    offset = tl.load(offset_ptr + at, mask=valid[:, None], other=0.0).to(tl.float32)
    scale = tl.load(scale_ptr + at, mask=valid[:, None], other=0.0).to(tl.float32)
    return offset, scale


@triton.jit
def _unpack(codes_ptr, rows, channel, valid, levels_ptr, WORDS: tl.constexpr, BITS: tl.constexpr):
    """Levels of the codes of a [BLOCK_N, C] tile: code c of a row sits at bits [c BITS, (c + 1) BITS) of the row's
    words (reference.kv_quant.pack_codes); at 3 bits a code may continue in the next word."""
    first_bit = channel * BITS  # [C]
    at = rows[:, None] * WORDS + (first_bit // 32)[None, :]  # [BLOCK_N, C]
    shift = (first_bit % 32).to(tl.uint32)[None, :]
    code = tl.load(codes_ptr + at, mask=valid[:, None], other=0).to(tl.uint32, bitcast=True) >> shift
    if 32 % BITS != 0:
        straddles = (first_bit % 32 + BITS > 32)[None, :]
        rest = tl.load(codes_ptr + at + 1, mask=valid[:, None] & straddles, other=0).to(tl.uint32, bitcast=True)
        code = code | ((rest << 1) << (31 - shift))  # rest << (32 - shift), never a shift by 32
    return tl.load(levels_ptr + (code & ((1 << BITS) - 1)).to(tl.int32))


@triton.jit
def _kv_quant_decode_fwd_kernel(
        q_ptr, stride_qb, stride_qh,
        key_codes_ptr, key_index_ptr, key_value_ptr, key_group_offset_ptr, key_group_scale_ptr, key_levels_ptr,
        key_offset_ptr, key_scale_ptr,
        value_codes_ptr, value_offset_ptr, value_scale_ptr, value_index_ptr, value_value_ptr, value_levels_ptr,
        sink_keys_ptr, sink_values_ptr, window_keys_ptr, window_values_ptr, lengths_ptr,
        inv_freq_ptr, attention_scaling, qk_scale, part_out_ptr, part_lse_ptr, chunk, splits,
        KV_HEADS: tl.constexpr, GROUP: tl.constexpr, CAPACITY: tl.constexpr, SINK: tl.constexpr,
        WINDOW: tl.constexpr, RING: tl.constexpr, SLOTS: tl.constexpr, KEY_GROUP: tl.constexpr,
        GROUPS: tl.constexpr, WINDOW_STEP: tl.constexpr,
        KEY_BITS: tl.constexpr, VALUE_BITS: tl.constexpr, KEY_WORDS: tl.constexpr, VALUE_WORDS: tl.constexpr,
        D: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, DOT: tl.constexpr):
    HALF: tl.constexpr = D // 2
    bh = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1)
    b, h = bh // KV_HEADS, bh % KV_HEADS
    length = tl.load(lengths_ptr + b)
    # A poisoned sequence (negative length: an append could not take its tokens), or a length past the capacity
    # that no append writes, reads as empty: nothing out of range is loaded. The merge kernel makes its output NaN.
    length = tl.where((length >= 0) & (length <= CAPACITY), length, 0)
    # The first window position (reference.kv_quant.window_start): positions leave in steps of WINDOW_STEP.
    if WINDOW_STEP == 1:
        window_start = tl.minimum(length, tl.maximum(SINK, length - WINDOW))
    else:
        excess = tl.maximum(length - SINK - WINDOW, 0)
        window_start = tl.where(length <= SINK, length, SINK + tl.cdiv(excess, WINDOW_STEP) * WINDOW_STEP)

    g = tl.arange(0, BLOCK_G)
    lo, hi, all_d = tl.arange(0, HALF), HALF + tl.arange(0, HALF), tl.arange(0, D)
    q_rows = q_ptr + b * stride_qb + (h * GROUP + g)[:, None] * stride_qh
    g_ok = (g < GROUP)[:, None]
    q_lo = (tl.load(q_rows + lo[None, :], mask=g_ok, other=0.0).to(tl.float32) * qk_scale).to(DOT)  # [BLOCK_G, HALF]
    q_hi = (tl.load(q_rows + hi[None, :], mask=g_ok, other=0.0).to(tl.float32) * qk_scale).to(DOT)
    cos_j, sin_j, theta = _rope_table(inv_freq_ptr, attention_scaling, BLOCK_N, HALF)

    m = tl.full((BLOCK_G,), -float("inf"), tl.float32)
    l_sum = tl.zeros((BLOCK_G,), tl.float32)
    acc = tl.zeros((BLOCK_G, D), tl.float32)
    offs = tl.arange(0, BLOCK_N)
    if split < splits:  # packed positions [SINK, window_start) of this chunk
        seq = bh * CAPACITY  # first row of this (b, h) in the [batch * kv_heads * capacity, ...] buffers
        if KEY_GROUP == 0:  # KVQuant: one range per channel for the whole loop, [HALF] each
            layer_off_lo, layer_off_hi = tl.load(key_offset_ptr + h * D + lo), tl.load(key_offset_ptr + h * D + hi)
            layer_sc_lo, layer_sc_hi = tl.load(key_scale_ptr + h * D + lo), tl.load(key_scale_ptr + h * D + hi)
        first = tl.maximum(split * chunk, SINK)
        last = tl.minimum((split + 1) * chunk, window_start)
        for start in range(first, last, BLOCK_N):
            pos = start + offs  # [BLOCK_N]
            valid = pos < last
            rows = seq + pos
            if KEY_GROUP > 0:  # [BLOCK_N, HALF] each
                off_lo, sc_lo = _group_ranges(key_group_offset_ptr, key_group_scale_ptr, bh, pos, valid, lo, SINK,
                                              KEY_GROUP, GROUPS, D)
                off_hi, sc_hi = _group_ranges(key_group_offset_ptr, key_group_scale_ptr, bh, pos, valid, hi, SINK,
                                              KEY_GROUP, GROUPS, D)
            else:
                off_lo, sc_lo, off_hi, sc_hi = layer_off_lo, layer_sc_lo, layer_off_hi, layer_sc_hi
            k_lo = _unpack(key_codes_ptr, rows, lo, valid, key_levels_ptr, KEY_WORDS, KEY_BITS) * sc_lo + off_lo
            k_hi = _unpack(key_codes_ptr, rows, hi, valid, key_levels_ptr, KEY_WORDS, KEY_BITS) * sc_hi + off_hi
            k_lo = _put_outliers(k_lo, lo, key_index_ptr, key_value_ptr, rows, valid, SLOTS)  # [BLOCK_N, HALF]
            k_hi = _put_outliers(k_hi, hi, key_index_ptr, key_value_ptr, rows, valid, SLOTS)
            s = _scores(q_lo, q_hi, k_lo, k_hi, start, theta, cos_j, sin_j, DOT)
            v_off = tl.load(value_offset_ptr + rows, mask=valid, other=0.0).to(tl.float32)
            v_sc = tl.load(value_scale_ptr + rows, mask=valid, other=0.0).to(tl.float32)
            v = _unpack(value_codes_ptr, rows, all_d, valid, value_levels_ptr, VALUE_WORDS, VALUE_BITS)
            v = _put_outliers(v * v_sc[:, None] + v_off[:, None], all_d, value_index_ptr, value_value_ptr, rows,
                              valid, SLOTS)  # [BLOCK_N, D]
            m, l_sum, acc = online_softmax_step(m, l_sum, acc, s, valid[None, :], v, DOT)
    else:  # the 16-bit sink [0, min(SINK, length)) and recent window [window_start, length)
        for segment in tl.static_range(2):
            first = 0 if segment == 0 else window_start
            last = tl.minimum(SINK, length) if segment == 0 else length
            for start in range(first, last, BLOCK_N):
                pos = start + offs
                valid = pos < last
                if segment == 0:
                    rows = bh * SINK + pos
                    k_base, v_base = sink_keys_ptr, sink_values_ptr
                else:
                    rows = bh * WINDOW + pos % RING  # a ring buffer
                    k_base, v_base = window_keys_ptr, window_values_ptr
                k_lo = tl.load(k_base + rows[:, None] * D + lo[None, :], mask=valid[:, None], other=0.0)
                k_hi = tl.load(k_base + rows[:, None] * D + hi[None, :], mask=valid[:, None], other=0.0)
                s = _scores(q_lo, q_hi, k_lo.to(tl.float32), k_hi.to(tl.float32), start, theta, cos_j, sin_j, DOT)
                v = tl.load(v_base + rows[:, None] * D + all_d[None, :], mask=valid[:, None], other=0.0)
                m, l_sum, acc = online_softmax_step(m, l_sum, acc, s, valid[None, :], v.to(tl.float32), DOT)

    part = (bh * GROUP + g) * (splits + 1) + split  # [BLOCK_G] rows of [batch * heads, splits + 1]
    out, lse = softmax_result(m, l_sum, acc)  # an empty split: out 0, lse -inf (weight 0 in the merge)
    tl.store(part_out_ptr + part[:, None] * D + all_d[None, :], out, mask=g_ok)
    tl.store(part_lse_ptr + part, lse, mask=g < GROUP)


@triton.jit
def _kv_quant_decode_merge_kernel(part_out_ptr, part_lse_ptr, out_ptr, stride_ob, stride_oh, parts, lengths_ptr,
                                  capacity, HEADS: tl.constexpr, BLOCK_P: tl.constexpr, D: tl.constexpr):
    """out = sum_s 2^(lse_s - lse) o_s over the `parts` partials of one (sequence, head) row (flash decoding's
    reduction), BLOCK_P partials at a time: a first pass finds the largest lse, a second sums. NaN for a sequence
    whose length is not in [0, capacity] (poisoned), which the decode kernel read as empty (checked here: in the
    decode kernel the flag would stay live across the tile loops, and cost registers there)."""
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_P)
    top = tl.full((BLOCK_P,), -float("inf"), tl.float32)
    for p0 in range(0, parts, BLOCK_P):
        lse = tl.load(part_lse_ptr + row * parts + p0 + offs, mask=p0 + offs < parts, other=-float("inf"))
        top = tl.maximum(top, lse, propagate_nan=tl.PropagateNan.ALL)
    top_all = tl.max(top, 0)
    top_safe = tl.where(top_all == -float("inf"), 0.0, top_all)  # no keys at all: every weight is 0
    d = tl.arange(0, D)
    total = tl.zeros((D,), tl.float32)
    weight_sum = tl.zeros((BLOCK_P,), tl.float32)
    for p0 in range(0, parts, BLOCK_P):
        ok = p0 + offs < parts
        lse = tl.load(part_lse_ptr + row * parts + p0 + offs, mask=ok, other=-float("inf"))  # [BLOCK_P], base 2
        weight = tl.where(lse == -float("inf"), 0.0, tl.exp2(lse - top_safe))
        o = tl.load(part_out_ptr + (row * parts + p0 + offs)[:, None] * D + d[None, :], mask=ok[:, None], other=0.0)
        total += tl.sum(o * weight[:, None], 0)  # [D]
        weight_sum += weight
    merged = total / tl.maximum(tl.sum(weight_sum, 0), 1e-30)
    b, h = row // HEADS, row % HEADS
    length = tl.load(lengths_ptr + b)
    merged = tl.where((length >= 0) & (length <= capacity), merged, float("nan"))
    tl.store(out_ptr + b * stride_ob + h * stride_oh + d, merged.to(out_ptr.dtype.element_ty))


def _splits(batch_kv_heads: int, max_length: int, device: torch.device) -> tuple[int, int]:
    """(splits, chunk): enough programs to fill the GPU (about four per SM) over the longest sequence."""
    tiles = max(triton.cdiv(max_length, BLOCK_N), 1)
    splits = min(max(triton.cdiv(4 * sm_count(device), batch_kv_heads), 1), tiles)
    return splits, triton.cdiv(tiles, splits) * BLOCK_N


def kv_quant_decode_fwd(q, storage, codebook, inv_freq, attention_scaling: float, scale: float,
                        max_length: int) -> torch.Tensor:
    """q [batch, heads, 1, D] -> out [batch, heads, 1, D] in q.dtype (see torchext.ops.kv_quant_decode_attention)."""
    batch, heads, _, d = q.shape
    kv_heads, capacity = storage.key_codes.shape[1:3]
    slots = storage.key_outlier_index.shape[3]
    group = heads // kv_heads
    splits, chunk = _splits(batch * kv_heads, max_length, q.device)
    # Without the KIVI mode the group buffers are empty: hand the kernel a real pointer it never reads instead.
    group_ranges = (storage.key_group_offset, storage.key_group_scale) if codebook.key_group else \
        (codebook.key_offset, codebook.key_scale)
    part_out = torch.empty(batch * heads * (splits + 1), d, device=q.device, dtype=torch.float32)
    part_lse = torch.empty(batch * heads * (splits + 1), device=q.device, dtype=torch.float32)
    _kv_quant_decode_fwd_kernel[(batch * kv_heads, splits + 1)](
        q, q.stride(0), q.stride(1),
        storage.key_codes, storage.key_outlier_index, storage.key_outlier_value, *group_ranges, codebook.key_levels,
        codebook.key_offset, codebook.key_scale,
        storage.value_codes, storage.value_offset, storage.value_scale, storage.value_outlier_index,
        storage.value_outlier_value, codebook.value_levels,
        storage.sink_keys, storage.sink_values, storage.window_keys, storage.window_values, storage.lengths,
        inv_freq, attention_scaling, scale * LOG2E, part_out, part_lse, chunk, splits,
        KV_HEADS=kv_heads, GROUP=group, CAPACITY=capacity, SINK=storage.sink_keys.shape[2],
        WINDOW=storage.window_keys.shape[2], RING=max(storage.window_keys.shape[2], 1), SLOTS=slots,
        KEY_GROUP=codebook.key_group, GROUPS=storage.key_group_offset.shape[2], WINDOW_STEP=ref.window_step(codebook),
        KEY_BITS=codebook.key_bits, VALUE_BITS=codebook.value_bits, KEY_WORDS=storage.key_codes.shape[3],
        VALUE_WORDS=storage.value_codes.shape[3], D=d, BLOCK_G=max(16, triton.next_power_of_2(group)),
        BLOCK_N=BLOCK_N, DOT=dot_dtype(q.dtype), num_warps=NUM_WARPS)
    out = torch.empty_like(q)
    _kv_quant_decode_merge_kernel[(batch * heads,)](
        part_out, part_lse, out, out.stride(0), out.stride(1), splits + 1, storage.lengths, capacity, HEADS=heads,
        BLOCK_P=MERGE_BLOCK, D=d)
    return out
