"""KVQuant family: the packed layout, quantize/dequantize and quantize-and-append semantics, the fused decode
attention against reference attention over the dequantized cache, the paper's quality orderings on synthetic KV
with KVQuant's structure and on a small Llama built locally, the Hugging Face cache, and bad inputs.

The quantize-and-append CUDA C++ kernel is checked against the reference on a GPU (`gpu` marker); on CPU the
reference is the append path and the decode kernel runs through the Triton interpreter.
"""

import functools
import math
from collections import Counter
from pathlib import Path

import pytest
import torch
from harness import TOLERANCES, NoHostReads, check_opcheck, check_raises

from torchext import ops
from torchext._backend import CUDA_EXT
from torchext.nn.kv_quant import KVQuantConfig, Quantizer, candidate_quantizers, choose_quantizer, key_ranges, \
    layer_calibration
from torchext.reference import kv_quant as ref

# Decode attention vs the reference over the same dequantized cache. fp32: the kernel builds RoPE angles by angle
# addition (cos(a + b) from cos a, sin a, cos b, sin b) where the reference evaluates cos(p theta) directly, a few
# fp32 ulps of the angle apart. 16-bit: the operands of both products are rounded to the 16-bit format for the
# tensor cores (as flash attention does) and the output once; the interpreter also sums fp16 products in fp16.
DECODE_TOLERANCES = {**TOLERANCES, torch.float32: dict(atol=2e-5, rtol=2e-5),
                     torch.float16: dict(atol=5e-3, rtol=5e-3)}


def llama3_inv_freq(head_dim, base=500000.0, factor=8.0, low=1.0, high=4.0, original=64):
    """Llama-3-style scaled RoPE frequencies (the scaling lives in inv_freq, as in Hugging Face), small original
    context so that short test sequences cross all three bands."""
    inv_freq = base ** (-torch.arange(0, head_dim, 2).float() / head_dim)
    wavelength = 2 * math.pi / inv_freq
    smooth = ((original / wavelength - low) / (high - low)).clamp(0, 1)
    return (1 - smooth) * inv_freq / factor + smooth * inv_freq


def structured_kv(batch, kv_heads, n, head_dim, seed=0):
    """Synthetic pre-RoPE K/V with KVQuant's structure (sec. 3.1): a few heavy key channels, each with a large
    one-signed offset, in high-frequency RoPE pairs (the same channels in every sample, as in a real layer),
    value outlier tokens, and an attention sink at position 0 (a large key along sink_direction, which the
    test queries share). `seed` draws the sample; the channel structure is fixed."""
    structure = torch.Generator().manual_seed(1234)
    heavy = torch.randperm(head_dim // 4, generator=structure)[:head_dim // 8]  # in pairs RoPE turns fast
    channel_scale = torch.ones(kv_heads, head_dim)
    channel_scale[:, heavy] = 4.0
    channel_offset = torch.randn(kv_heads, head_dim, generator=structure)
    channel_offset[:, heavy] += 12 * torch.randn(kv_heads, len(heavy), generator=structure).sign()
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(batch, kv_heads, n, head_dim, generator=g) * channel_scale[:, None] + channel_offset[:, None]
    v = torch.randn(batch, kv_heads, n, head_dim, generator=g)
    v[..., torch.randperm(n, generator=g)[:max(1, n // 50)], :] *= 6  # outlier tokens
    k[:, :, 0] = 60 * sink_direction(head_dim)
    return k, v


def sink_direction(head_dim):
    return torch.nn.functional.normalize(torch.randn(head_dim, generator=torch.Generator().manual_seed(99)), dim=0)


def fresh_cache(batch, kv_heads, head_dim, capacity, key_bits=4, value_bits=4, slots=1, sink=1, window=0,
                dtype=torch.float32, keys=None, levels=None, device="cpu", key_group=0):
    """An empty cache: KVQuant's per-layer key ranges from a sample, or the KIVI mode's (key_group > 0)."""
    sample = torch.randn(256, kv_heads, head_dim) * 1.5 if keys is None else keys
    offset, scale = key_ranges(sample, 0.01)
    codebook = ops.make_codebook(key_bits, value_bits, offset.to(device), scale.to(device), **(levels or {}),
                                 key_group=key_group)
    return ops.allocate_storage(batch, kv_heads, head_dim, capacity, codebook, slots, sink, window, dtype, device), \
        codebook


def quantization_step(codebook, kind):
    levels = getattr(codebook, f"{kind}_levels")
    return (levels[1:] - levels[:-1]).max().item()


# ---- layout and quantization semantics ------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", ref.SUPPORTED_BITS)
@pytest.mark.parametrize("head_dim", [32, 64, 128])
def test_packing_layout(bits, head_dim):
    """Code c sits at bits [c bits, (c + 1) bits) of the words' little-endian bit string: 3 bits take 3 words per
    32 codes, code 10 straddling words 0 and 1."""
    codes = torch.randint(0, 2 ** bits, (5, head_dim))
    words = ref.pack_codes(codes, bits)
    assert words.dtype == torch.int32 and words.shape == (5, head_dim * bits // 32)
    as_int = [sum((int(w) & 0xFFFFFFFF) << (32 * i) for i, w in enumerate(row)) for row in words]
    for c in (0, 10, 13, head_dim - 1):
        assert [(n >> (c * bits)) & (2 ** bits - 1) for n in as_int] == codes[:, c].tolist()
    assert torch.equal(ref.unpack_codes(words, bits, head_dim), codes)


def test_the_named_buffer_groups_cover_storage_in_field_order():
    """PER_SEQUENCE is every buffer but lengths, in field order; the CUDA binding takes the buffers it writes by
    their Storage names (its py::arg keywords)."""
    assert ref.PER_SEQUENCE + ("lengths",) == ref.Storage._fields
    binding = (Path(__file__).parents[1] / "csrc" / "module.cpp").read_text()
    assert all(f'py::arg("{name}")' in binding for name in ref.CUDA_APPEND + ("lengths",))
    storage, _ = fresh_cache(2, 2, 64, 8, key_bits=3, slots=2, sink=1, window=4, dtype=torch.bfloat16)
    for name, (shape, dtype) in ref.layout(2, 2, 8, 64, 2, 1, 4, 3, 4, torch.bfloat16).items():
        assert getattr(storage, name).shape == shape and getattr(storage, name).dtype == dtype, name


def test_nearest_code_is_the_nearest_level():
    levels = ref.fit_levels(torch.randn(4000).clamp(-1, 1), 3)
    x = torch.linspace(-1.2, 1.2, 1001)
    codes = ref.nearest_code(x, ref.midpoints(levels))
    assert torch.equal(levels[codes].sub(x).abs(), (levels[None] - x[:, None]).abs().amin(1))


def test_fit_levels_weighted_kmeans_and_q_norm():
    x = torch.randn(20000).clamp(-1, 1) * torch.rand(20000)
    levels = ref.fit_levels(x, 3)
    mse = lambda lv: (lv[ref.nearest_code(x, ref.midpoints(lv))] - x).square().mean()  # noqa: E731
    assert mse(levels) < 0.8 * mse(ref.uniform_levels(3))  # nuq beats uniform on a peaked distribution
    weights = (x > 0).float() * 100 + 1  # Fisher weighting pulls the levels to the heavily weighted side
    assert (ref.fit_levels(x, 3, weights) > 0).sum() > (levels > 0).sum()
    corrected = ref.q_norm_levels(x, ref.fit_levels(x, 2))
    q = corrected[ref.nearest_code(x, ref.midpoints(ref.fit_levels(x, 2)))]
    torch.testing.assert_close(torch.stack((q.mean(), q.std())), torch.stack((x.mean(), x.std())), atol=1e-4,
                               rtol=1e-3)


@pytest.mark.parametrize("bits", ref.SUPPORTED_BITS)
def test_quantize_round_trip_within_half_a_step_and_outliers_exact(bits):
    storage, codebook = fresh_cache(1, 2, 64, 8, bits, bits, slots=2)
    k, v = torch.randn(1, 2, 40, 64), torch.randn(1, 2, 40, 64)
    k[0, 0, 3, 5], k[0, 1, 7, 60], v[0, 0, 2, 9] = 40.0, -35.0, 25.0  # planted outliers
    codes, index, value = ref.quantize_keys(k, codebook, 2)
    k_hat = ref.dequantize_keys(codes, index, value, codebook, 64)
    assert k_hat[0, 0, 3, 5] == 40.0 and k_hat[0, 1, 7, 60] == -35.0
    inside = ref.normalize_keys(k, codebook.key_offset, codebook.key_scale).abs() <= 1
    step = quantization_step(codebook, "key") * codebook.key_scale[:, None]
    assert ((k_hat - k).abs() <= step / 2 + 1e-5)[inside].all()
    v_codes, offset, scale, v_index, v_value = ref.quantize_values(v, codebook, 2)
    v_hat = ref.dequantize_values(v_codes, offset, scale, v_index, v_value, codebook, 64)
    assert v_hat[0, 0, 2, 9] == 25.0
    bound = quantization_step(codebook, "value") * scale.float()[..., None] / 2 + 2e-3 * v.abs().amax()
    assert ((v_hat - v).abs() <= bound).all()


def test_append_places_sink_window_and_packed_positions():
    """Ragged prefill then decode steps: sink and window exact, packed positions within their step, lengths."""
    storage, codebook = fresh_cache(2, 2, 32, 40, 4, 4, slots=1, sink=2, window=5)
    k, v = structured_kv(2, 2, 30, 32)
    counts = torch.tensor([30, 9], dtype=torch.int32)
    ops.kv_quant_append_(storage, codebook, k[:, :, :24], v[:, :, :24], counts.clamp_max(24))
    for t in range(24, 30):  # sequence 1 stops at 9 tokens
        step = torch.tensor([1, 0], dtype=torch.int32)
        ops.kv_quant_append_(storage, codebook, k[:, :, t:t + 1], v[:, :, t:t + 1], step)
    assert storage.lengths.tolist() == [30, 9]
    keys, values = ref.read(storage, codebook)
    for b, length in enumerate((30, 9)):
        exact = list(range(min(2, length))) + list(range(max(2, length - 5), length))
        torch.testing.assert_close(keys[b, :, exact], k[b, :, exact], atol=0, rtol=0)
        torch.testing.assert_close(values[b, :, exact], v[b, :, exact], atol=0, rtol=0)
        packed = [p for p in range(length) if p not in exact]
        if packed:
            error = (keys[b, :, packed] - k[b, :, packed]).abs()
            bound = quantization_step(codebook, "key") * codebook.key_scale[:, None] / 2 + 1e-5
            outlier = ref.normalize_keys(k[b:b + 1, :, packed], codebook.key_offset, codebook.key_scale)[0].abs() > 1
            assert ((error <= bound) | outlier).all()


def test_kivi_mode_quantizes_whole_groups_with_their_min_max_ranges():
    """Positions leave the window a group at a time (it then holds window - G + 1 to window positions), each
    group's per-channel range is its keys' min-max, and the cache reads back what the quantizer alone gives."""
    group, sink, window = 8, 1, 12
    storage, codebook = fresh_cache(2, 2, 32, 48, slots=0, sink=sink, window=window, key_group=group)
    k, v = structured_kv(2, 2, 40, 32)
    ops.kv_quant_append_(storage, codebook, k, v, torch.tensor([40, 21], dtype=torch.int32))
    keys, values = ref.read(storage, codebook)
    for b, length in enumerate((40, 21)):
        start = ref.window_start(length, sink, window, group)
        assert (start - sink) % group == 0 and window - group < length - start <= window
        exact = list(range(sink)) + list(range(start, length))
        assert torch.equal(keys[b, :, exact], k[b, :, exact]) and torch.equal(values[b, :, exact], v[b, :, exact])
        packed = slice(sink, start)
        offset, scale = ref.group_key_ranges(k[b, :, packed], group)
        groups = (start - sink) // group
        assert torch.equal(storage.key_group_offset[b, :, :groups], offset)
        assert torch.equal(storage.key_group_scale[b, :, :groups], scale)
        alone = ref.quantize_dequantize(k[b:b + 1, :, packed], v[b:b + 1, :, packed], codebook, 0)
        assert torch.equal(keys[b, :, packed], alone[0][0]) and torch.equal(values[b, :, packed], alone[1][0])
        half_step = scale.repeat_interleave(group, 1) / (2 ** codebook.key_bits - 1)
        assert ((keys[b, :, packed] - k[b, :, packed]).abs() <= half_step * (1 + 1e-5)).all()


@pytest.mark.parametrize("key_group", [0, 4], ids=["kvquant", "kivi"])
def test_one_prefill_equals_token_by_token_appends(key_group):
    k, v = structured_kv(1, 2, 20, 64)
    storage, codebook = fresh_cache(1, 2, 64, 32, 3, 2, slots=1, sink=1, window=4, key_group=key_group)
    stepped = ref.Storage(*(t.clone() for t in storage))
    ops.kv_quant_append_(storage, codebook, k, v)
    for t in range(20):
        ops.kv_quant_append_(stepped, codebook, k[:, :, t:t + 1], v[:, :, t:t + 1])
    for name, a, b in zip(ref.Storage._fields, storage, stepped):
        assert torch.equal(a, b), name


def test_check_raises_before_writing_on_overflow_bad_counts_and_poisoned_sequences():
    """check=True (the debug mode) raises instead of poisoning, and writes nothing."""
    storage, codebook = fresh_cache(2, 1, 32, 10)
    k, v = torch.randn(2, 1, 8, 32), torch.randn(2, 1, 8, 32)
    ops.kv_quant_append_(storage, codebook, k, v, torch.tensor([8, 2], dtype=torch.int32), check=True)
    before = [t.clone() for t in storage]
    append = functools.partial(ops.kv_quant_append_, storage, codebook, k[:, :, :3], v[:, :, :3], check=True)
    check_raises(append, ValueError, "sequences [0] would pass the cache capacity of 10")
    check_raises(lambda: append(torch.tensor([1, 4], dtype=torch.int32)), ValueError,
                 "counts must be in [0, n=3], got [1, 4]")
    check_raises(lambda: append(torch.tensor([-1, 0], dtype=torch.int32)), ValueError,
                 "counts must be in [0, n=3], got [-1, 0]")
    assert_same_storage(storage, before, "after the raising appends")
    storage.lengths[1] = ref.POISONED_LENGTH
    check_raises(lambda: append(torch.tensor([1, 1], dtype=torch.int32)), ValueError, "sequences [1] are poisoned")


# ---- a sequence that cannot take its tokens is poisoned, not silently dropped ---------------------------------------


def poisoned_decode_case(dtype=torch.float32, device="cpu"):
    """Four sequences (capacity 12, sink 1, window 2): a prefill, then an append that sequence 0 takes, 1 cannot
    (it would pass the capacity), 2 cannot (count -1) and 3 cannot (count 4 > n = 3). Returns the cache, the state
    before the second append, and the same cache with only sequence 0 appended."""
    storage, codebook = fresh_cache(4, 2, 32, 12, sink=1, window=2, dtype=dtype, device=device)
    k, v = (x.to(device, dtype) for x in structured_kv(4, 2, 10, 32))
    ops.kv_quant_append_(storage, codebook, k, v, torch.tensor([5, 10, 5, 5], dtype=torch.int32, device=device))
    before, healthy = ref.Storage(*(t.clone() for t in storage)), ref.Storage(*(t.clone() for t in storage))
    new_k, new_v = (x.to(device, dtype) for x in structured_kv(4, 2, 3, 32, seed=1))
    counts = torch.tensor([3, 3, -1, 4], dtype=torch.int32, device=device)
    with NoHostReads():  # the default (check=False) wrapper syncs nothing
        ops.kv_quant_append_(storage, codebook, new_k, new_v, counts)
    ops.kv_quant_append_(healthy, codebook, new_k, new_v, counts.clamp(0, 0).index_fill_(0, torch.tensor([0]), 3))
    return storage, codebook, before, healthy


def assert_poisoned_rows(storage, before, poisoned):
    """Nothing was written for the poisoned sequences and their lengths are POISONED_LENGTH."""
    for name in ref.PER_SEQUENCE:
        got, old = getattr(storage, name), getattr(before, name)
        assert torch.equal(got[poisoned], old[poisoned]), f"storage.{name} was written for a poisoned sequence"
    assert (storage.lengths[poisoned] == ref.POISONED_LENGTH).all()


def check_poisoned_decode(storage, codebook, poisoned, dtype=torch.float32, device="cpu"):
    """NaN in every head of the poisoned sequences, on the op's path (the interpreted kernel on CPU) and the
    reference's alike; the others match the reference as usual."""
    batch, kv_heads, _, head_dim = storage.sink_keys.shape
    q = torch.randn(batch, 2 * kv_heads, 1, head_dim, device=device).to(dtype)
    inv_freq = (10000.0 ** (-torch.arange(0, head_dim, 2).float() / head_dim)).to(device)
    out = ops.kv_quant_decode_attention(q, storage, codebook, inv_freq)
    keys, values = ref.read(storage, codebook)
    expected = ref.decode_attention(q, keys, values, storage.lengths, inv_freq).to(dtype)
    healthy = [b for b in range(batch) if b not in poisoned]
    assert out[poisoned].isnan().all() and expected[poisoned].isnan().all()
    assert not out[healthy].isnan().any()
    torch.testing.assert_close(out[healthy], expected[healthy], **DECODE_TOLERANCES[dtype])


def test_append_poisons_a_sequence_that_cannot_take_its_tokens():
    storage, codebook, before, healthy = poisoned_decode_case()
    assert storage.lengths.tolist() == [8, -1, -1, -1]
    assert_poisoned_rows(storage, before, [1, 2, 3])
    assert_same_storage([t[:1] for t in storage], [t[:1] for t in healthy], "sequence 0, which took its tokens")
    check_poisoned_decode(storage, codebook, [1, 2, 3])


def test_a_poisoned_sequence_stays_poisoned_until_its_length_is_zeroed():
    storage, codebook, _, _ = poisoned_decode_case()
    k, v = structured_kv(4, 2, 1, 32, seed=2)
    before = ref.Storage(*(t.clone() for t in storage))
    ops.kv_quant_append_(storage, codebook, k, v)  # counts 1 each: fine for a healthy sequence
    assert storage.lengths.tolist() == [9, -1, -1, -1]
    assert_poisoned_rows(storage, before, [1, 2, 3])
    check_poisoned_decode(storage, codebook, [1, 2, 3])
    storage.lengths[1:] = 0  # what KVQuantLayer.reset does for every sequence
    ops.kv_quant_append_(storage, codebook, k, v)
    assert storage.lengths.tolist() == [10, 1, 1, 1]
    check_poisoned_decode(storage, codebook, [])


def test_a_length_outside_the_capacity_decodes_to_nan_without_reading_past_it():
    """A length no append writes (past the capacity, or negative other than POISONED_LENGTH) reads as empty."""
    storage, codebook, _, _ = poisoned_decode_case()
    storage.lengths.copy_(torch.tensor([8, 13, -7, 12], dtype=torch.int32))
    check_poisoned_decode(storage, codebook, [1, 2])


def test_layer_reset_clears_a_poisoned_sequence():
    from torchext.nn import KVQuantLayer
    inv_freq = llama3_inv_freq(32)
    layer = KVQuantLayer(KVQuantConfig(4, 4, sink_tokens=1), 0, inv_freq, 1.0, 16, fused=False)
    k, v = structured_kv(2, 2, 6, 32)
    layer.update(k, v)
    ops.kv_quant_append_(layer.storage, layer.codebook, k[:, :, :1], v[:, :, :1],
                         torch.tensor([1, 2], dtype=torch.int32))  # outside KVQuantLayer: bad count for sequence 1
    assert layer.storage.lengths.tolist() == [7, -1]
    layer.reset()
    layer.update(k, v)
    assert layer.storage.lengths.tolist() == [6, 6]
    check_poisoned_decode(layer.storage, layer.codebook, [])


# ---- value offsets and scales in fp32 --------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_value_offsets_and_scales_are_fp16_only_in_an_fp16_cache(dtype):
    storage, codebook = fresh_cache(1, 2, 32, 4, dtype=dtype)
    expected = torch.float16 if dtype == torch.float16 else torch.float32
    assert storage.value_offset.dtype == storage.value_scale.dtype == expected
    wrong = storage._replace(value_scale=storage.value_scale.to(torch.float64))
    check_raises(lambda: ops.kv_quant_append_(wrong, codebook, torch.zeros(1, 2, 1, 32, dtype=dtype),
                                              torch.zeros(1, 2, 1, 32, dtype=dtype)), TypeError,
                 f"storage.value_scale must have dtype in ['{expected}']")


def test_fp16_value_metadata_codes_what_a_read_sees():
    """In an fp16 cache the codes are those of the offset and scale as rounded to fp16: the read-back error
    stays within half a step of the stored scale, as with fp32 metadata."""
    storage, codebook = fresh_cache(1, 2, 32, 64, slots=0, sink=0, dtype=torch.float16)
    v = (torch.randn(1, 2, 64, 32) * 3 + 5).half()
    ops.kv_quant_append_(storage, codebook, v, v)
    _, values = ref.read(storage, codebook)
    half_step = storage.value_scale.float()[..., None] / (2 ** codebook.value_bits - 1)
    assert ((values - v.float()).abs() <= half_step * (1 + 1e-3) + 1e-6).all()


def test_bf16_cache_keeps_offsets_of_shifted_values():
    """Values of 8 +- 0.1 (a shifted activation) read back as closely from a bf16 cache as from an fp32 one (bf16
    offsets and scales made the error 35% larger: an offset near 8 is rounded by up to 1/32)."""
    torch.manual_seed(0)
    v = 8 + 0.1 * torch.randn(1, 2, 64, 32)
    errors = {}
    for dtype in (torch.float32, torch.bfloat16):
        storage, codebook = fresh_cache(1, 2, 32, 64, dtype=dtype)
        ref.append(storage, codebook, v.to(dtype), v.to(dtype))
        _, values = ref.read(storage, codebook)
        errors[dtype] = (values - v.to(dtype).float()).pow(2).mean().sqrt().item()
    assert errors[torch.bfloat16] < 1.05 * errors[torch.float32], errors


@pytest.mark.parametrize("dtype,magnitude", [(torch.float32, 7e4), (torch.float32, 1e30), (torch.bfloat16, 1e5)],
                         ids=["fp32-7e4", "fp32-1e30", "bf16-1e5"])
@pytest.mark.parametrize("slots", [0, 2])
def test_values_past_fp16_range_round_trip(dtype, magnitude, slots):
    """Values beyond fp16's 65504 read back finite, within half a quantization step (fp16 scales made them inf),
    and the decode kernel attends over them as the reference does."""
    storage, codebook = fresh_cache(2, 2, 64, 24, slots=slots, sink=0, window=0, dtype=dtype)
    k, v = structured_kv(2, 2, 20, 64)
    v = (v / v.abs().amax(-1, keepdim=True) * magnitude).to(dtype)  # each vector reaches +-magnitude
    ops.kv_quant_append_(storage, codebook, k.to(dtype), v)
    _, values = ref.read(storage, codebook)
    values = values[:, :, :20]
    assert values.isfinite().all()
    _, _, scale, _, _ = ref.quantize_values(v, codebook, slots)
    bound = quantization_step(codebook, "value") * scale.float()[..., None] / 2 + \
        torch.finfo(dtype).eps * v.float().abs().amax(-1, keepdim=True)
    assert ((values - v.float()).abs() <= bound).all()
    q, inv_freq = torch.randn(2, 4, 1, 64).to(dtype), 10000.0 ** (-torch.arange(0, 64, 2).float() / 64)
    out = ops.kv_quant_decode_attention(q, storage, codebook, inv_freq)
    expected = ref.decode_attention(q, *ref.read(storage, codebook), storage.lengths, inv_freq).to(dtype)
    assert out.isfinite().all()  # relative to the magnitude: outputs near 0 are sums that cancel
    torch.testing.assert_close(out / magnitude, expected / magnitude, **DECODE_TOLERANCES[dtype])


# ---- fused decode attention vs the reference ------------------------------------------------------------------------


def decode_case(batch, kv_heads, group, head_dim, lengths, key_bits, value_bits, sink, window, dtype, slots=1,
                device="cpu", inv_freq=None, attention_scaling=1.0, key_group=0):
    capacity = max(lengths) + 3
    storage, codebook = fresh_cache(batch, kv_heads, head_dim, capacity, key_bits, value_bits, slots, sink, window,
                                    dtype, device=device, key_group=key_group)
    k, v = structured_kv(batch, kv_heads, max(lengths), head_dim)
    ops.kv_quant_append_(storage, codebook, k.to(device, dtype), v.to(device, dtype),
                         torch.tensor(lengths, dtype=torch.int32, device=device))
    q = torch.randn(batch, kv_heads * group, 1, head_dim, device=device).to(dtype)
    inv_freq = (10000.0 ** (-torch.arange(0, head_dim, 2).float() / head_dim) if inv_freq is None else inv_freq)
    return q, storage, codebook, inv_freq.to(device), attention_scaling


def check_decode(q, storage, codebook, inv_freq, attention_scaling, max_length=None):
    out = ops.kv_quant_decode_attention(q, storage, codebook, inv_freq, attention_scaling, max_length=max_length)
    keys, values = ref.read(storage, codebook)
    expected = ref.decode_attention(q, keys, values, storage.lengths, inv_freq, attention_scaling).to(q.dtype)
    assert out.shape == q.shape and out.dtype == q.dtype and not out.isnan().any()
    torch.testing.assert_close(out, expected, **DECODE_TOLERANCES[q.dtype])


@pytest.mark.parametrize("group", [1, 4, 8], ids=["MHA", "GQA4", "MQA8"])
@pytest.mark.parametrize("bits", [(4, 4), (3, 3), (2, 2), (4, 2)], ids=lambda b: f"K{b[0]}V{b[1]}")
def test_decode_matches_reference(group, bits):
    check_decode(*decode_case(2, 8 // group if group < 8 else 1, group, 64, [70, 33], *bits, sink=1, window=0,
                              dtype=torch.float32))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_decode_dtypes_head_dims_sink_and_window(dtype, head_dim):
    check_decode(*decode_case(2, 2, 2, head_dim, [90, 5], 4, 3, sink=4, window=16, dtype=dtype, slots=2))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bits", [(4, 4), (3, 2)], ids=lambda b: f"K{b[0]}V{b[1]}")
def test_decode_kivi_mode_matches_reference(dtype, bits):
    """The same kernel with per-group key ranges read from the cache: ragged lengths (one still all in the
    window), GQA, a sink and a window that holds 9 to 16 positions."""
    check_decode(*decode_case(3, 2, 4, 64, [90, 12, 41], *bits, sink=2, window=16, dtype=dtype, key_group=8))


def test_decode_ragged_batch_llama3_rope_scaling_and_many_splits():
    inv_freq = llama3_inv_freq(32)
    case = decode_case(3, 1, 4, 32, [150, 1, 77], 3, 2, sink=0, window=8, dtype=torch.float32, slots=0,
                       inv_freq=inv_freq, attention_scaling=1.2)
    check_decode(*case, max_length=150)  # several splits per sequence on the interpreter grid
    check_decode(*case)  # the default grid, sized by the capacity


def test_decode_opcheck_and_compile():
    q, storage, codebook, inv_freq, scaling = decode_case(1, 2, 2, 32, [20], 4, 4, sink=1, window=4,
                                                          dtype=torch.float32)
    args = (q, *storage, *codebook, inv_freq, 1.0, 32 ** -0.5, 20)
    check_opcheck(torch.ops.torchext.kv_quant_decode_attention.default, args)
    k, v = torch.randn(1, 2, 2, 32), torch.randn(1, 2, 2, 32)
    check_opcheck(torch.ops.torchext.kv_quant_append_.default,
                  (*[t.clone() for t in storage], *codebook, k, v,
                   torch.tensor([2], dtype=torch.int32)))
    compiled = torch.compile(ops.kv_quant_decode_attention, fullgraph=True)
    torch.testing.assert_close(compiled(q, storage, codebook, inv_freq), ops.kv_quant_decode_attention(
        q, storage, codebook, inv_freq))


def test_decode_compiles_a_fixed_set_over_a_long_generation(monkeypatch):
    """An 8K-token generation on an H100's grid launches the decode and merge kernels in a few specialisations
    only (Triton compiles each once): the split count and chunk that grow with the context are runtime arguments
    (as constexprs they cost about 135 compiles of each kernel, 2.5-3 s apiece)."""
    from bench._launches import recording, unique
    from torchext.triton_kernels import _launch, kv_quant as kernels

    monkeypatch.setattr(kernels, "sm_count", lambda device: _launch.H100_SMS)
    storage, codebook = fresh_cache(1, 8, 128, 8192, dtype=torch.bfloat16)
    q = torch.randn(1, 32, 1, 128).to(torch.bfloat16)
    inv_freq = llama3_inv_freq(128)
    with recording() as launches:
        for length in range(1, 8193):
            ops.kv_quant_decode_attention(q, storage, codebook, inv_freq, max_length=length)
    assert len(launches) == 2 * 8192
    compiles = Counter(launch.kernel for launch in unique(launches))
    assert set(compiles) == {"_kv_quant_decode_fwd_kernel", "_kv_quant_decode_merge_kernel"}
    assert max(compiles.values()) <= 4, compiles  # 67 and 66 when splits and chunk were constexprs


def test_bad_inputs():
    q, storage, codebook, inv_freq, _ = decode_case(1, 2, 2, 32, [10], 4, 4, sink=1, window=0, dtype=torch.float16)
    decode = ops.kv_quant_decode_attention
    check_raises(lambda: decode(q[:, :3], storage, codebook, inv_freq), ValueError,
                 "q has 3 heads, not a multiple of the cache's 2 kv heads")
    check_raises(lambda: decode(q.float(), storage, codebook, inv_freq), TypeError, "q must have dtype")
    check_raises(lambda: decode(q.expand(1, 4, 2, 32), storage, codebook, inv_freq), ValueError,
                 "one decode token per sequence")
    check_raises(lambda: decode(q, storage, codebook, inv_freq[:-1]), ValueError, "inv_freq must have shape (16,)")
    check_raises(lambda: ops.allocate_storage(1, 2, 48, 8, codebook), ValueError, "head_dim must be one of")
    check_raises(lambda: ops.make_codebook(5, 4, codebook.key_offset, codebook.key_scale), ValueError,
                 "key_bits must be one of (2, 3, 4)")
    nan_offset = codebook.key_offset.clone().index_fill_(1, torch.tensor([0]), float("nan"))
    check_raises(lambda: ops.make_codebook(4, 4, nan_offset, codebook.key_scale), ValueError,
                 "key_offset must be finite and key_scale finite and > 0")
    check_raises(lambda: ops.make_codebook(4, 4, codebook.key_offset, codebook.key_scale * float("inf")), ValueError,
                 "key_offset must be finite and key_scale finite and > 0")
    check_raises(lambda: ops.make_codebook(4, 4, codebook.key_offset, codebook.key_scale,
                                           key_levels=torch.linspace(1, -1, 16)), ValueError,
                 "key levels and boundaries must be finite and strictly ascending")
    check_raises(lambda: ops.allocate_storage(1, 4, 32, 8, codebook), ValueError,
                 "the codebook is for [kv_heads, head_dim] = [2, 32], not [4, 32]")
    check_raises(lambda: decode(q.tolist(), storage, codebook, inv_freq), TypeError,
                 "kv_quant_decode_attention: q must be a torch.Tensor, got list")
    check_raises(lambda: decode(q, storage, codebook, inv_freq, scale=float("nan")), ValueError,
                 "scale must be finite and > 0, got nan")
    check_raises(lambda: KVQuantConfig(key_bits=9), ValueError, "KVQuantConfig: key_bits must be one of (2, 3, 4)")
    check_raises(lambda: KVQuantConfig(outlier_fraction=1.5), ValueError, "outlier_fraction must be in [0, 1)")
    check_raises(lambda: ops.make_codebook(4, 4, codebook.key_offset, codebook.key_scale, key_group=1), ValueError,
                 "key_group must be 0 (per-layer key ranges) or >= 2")
    kivi = ops.make_codebook(4, 4, codebook.key_offset, codebook.key_scale, key_group=8)
    check_raises(lambda: ops.allocate_storage(1, 2, 32, 8, kivi, window=4), ValueError,
                 "the KIVI mode (key_group=8) needs window >= key_group")
    check_raises(lambda: decode(q, storage, kivi, inv_freq), ValueError,
                 "the KIVI mode needs window >= key_group=8, got 0")
    check_raises(lambda: KVQuantConfig(key_group=32, window_tokens=16), ValueError,
                 "the KIVI mode needs key_group >= 2 and window_tokens >= key_group")
    k = torch.randn(1, 2, 1, 32)
    check_raises(lambda: ops.kv_quant_append_(storage, codebook, k, k.half()), TypeError, "k must have dtype")
    check_raises(lambda: ops.kv_quant_append_(storage, codebook, k.half()[:, :1], k.half()[:, :1]), ValueError,
                 "k must be [batch=1, kv_heads=2, n, head_dim=32]")


# ---- quality: the paper's orderings on synthetic KV with KVQuant's structure ----------------------------------------


def attention_error(config_bits, pre_rope=True, nuq=True, outlier_fraction=0.01, sink=1):
    """(relative error of the decode attention output, KL divergence of the attention weights) over a quantized
    structured cache, 64 queries at the last position, after calibrating on other samples of the distribution.
    The KL isolates the keys; the output error also carries the values' quantization error."""
    head_dim, n, inv_freq = 64, 256, 10000.0 ** (-torch.arange(0, 64, 2).float() / 64)
    calib_k, calib_v = structured_kv(4, 1, n, head_dim, seed=1)
    k, v = structured_kv(1, 1, n, head_dim, seed=2)
    cos, sin = ref.rope_cos_sin(torch.arange(n), inv_freq)
    if not pre_rope:  # quantize the rotated keys; attention then must not rotate again
        calib_k, k = ref.rotate(calib_k, cos, sin), ref.rotate(k, cos, sin)
    stats = layer_calibration(calib_k[:, :, sink:].transpose(1, 2).flatten(0, 1),
                              calib_v[:, :, sink:].transpose(1, 2).flatten(0, 1), *config_bits, outlier_fraction,
                              nuq=nuq)
    codebook = ops.make_codebook(*config_bits, **stats)
    storage = ops.allocate_storage(1, 1, head_dim, n, codebook, ref.outlier_slots(head_dim, outlier_fraction),
                                   sink, 0, torch.float32)
    ref.append(storage, codebook, k, v)
    keys, values = ref.read(storage, codebook)
    q = torch.randn(1, 64, 1, head_dim) * 0.05 + 0.05 * sink_direction(head_dim)  # logits std ~1, a visible sink
    rope = inv_freq if pre_rope else torch.zeros_like(inv_freq)
    exact = ref.decode_attention(q, k, v, storage.lengths, rope)
    approx = ref.decode_attention(q, keys, values, storage.lengths, rope)
    log_weights = [(q @ ref.rotate(x, *ref.rope_cos_sin(torch.arange(n), rope)).transpose(-1, -2) / 8).log_softmax(-1)
                   for x in (k, keys)]
    kl = (log_weights[0].exp() * (log_weights[0] - log_weights[1])).sum(-1).mean()
    return ((approx - exact).norm() / exact.norm()).item(), kl.item()


def test_error_falls_as_bits_grow():
    errors = [attention_error((b, b)) for b in (2, 3, 4)]
    assert errors[0][0] > errors[1][0] > errors[2][0] and errors[0][1] > errors[1][1] > errors[2][1], errors


def test_pre_rope_beats_post_rope_and_nuq_beats_uniform_at_3_bits():
    (pre_out, pre_kl), (_, post_kl) = attention_error((3, 3)), attention_error((3, 3), pre_rope=False)
    uniform_out, uniform_kl = attention_error((3, 3), nuq=False)
    assert pre_kl < 0.8 * post_kl, (pre_kl, post_kl)
    assert pre_out < 0.9 * uniform_out and pre_kl < uniform_kl, (pre_out, uniform_out, pre_kl, uniform_kl)


def test_outliers_and_sink_help():
    assert attention_error((3, 3))[1] < attention_error((3, 3), outlier_fraction=0.0)[1]
    assert attention_error((2, 2))[1] < attention_error((2, 2), sink=0)[1]


def test_config_round_trips_through_safetensors(tmp_path):
    pytest.importorskip("safetensors")
    k, v = structured_kv(2, 2, 64, 32)
    stats = layer_calibration(k.transpose(1, 2).flatten(0, 1), v.transpose(1, 2).flatten(0, 1), 2, 3, 0.01)
    config = KVQuantConfig(2, 3, 0.01, 4, 16, True, [stats, stats])
    config.save(tmp_path / "kvquant.safetensors")
    loaded = KVQuantConfig.load(tmp_path / "kvquant.safetensors")
    assert (loaded.key_bits, loaded.value_bits, loaded.sink_tokens, loaded.window_tokens) == (2, 3, 4, 16)
    for a, b in zip(config.codebook(1, "cpu"), loaded.codebook(1, "cpu")):
        assert torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b
    assert "key_boundaries" in stats  # Q-Norm at 2 bits keeps the original midpoints as boundaries
    chosen = [Quantizer(2, 3, 0.01), Quantizer(4, 4, 0.0, 16, False)]
    kivi_stats = {"key_offset": torch.zeros(2, 32), "key_scale": torch.ones(2, 32)}  # uniform levels
    KVQuantConfig(2, 3, 0.01, 4, 16, True, [stats, kivi_stats], quantizers=chosen).save(tmp_path / "chosen.safetensors")
    loaded = KVQuantConfig.load(tmp_path / "chosen.safetensors")
    assert loaded.quantizers == chosen and loaded.codebook(1, "cpu").key_group == 16


def test_cache_unrotates_keys_with_the_cos_sin_it_is_handed():
    """transformers 4.x hands cos/sin ([batch, n, head_dim], halves repeated) to update; 5.x hands none and the
    cache rotates by its inv_freq at its own positions. Both store the same pre-RoPE keys; reading back gives the
    post-RoPE keys within the quantization error."""
    from torchext.nn import KVQuantLayer
    inv_freq = llama3_inv_freq(32)
    k_pre, v = structured_kv(1, 2, 20, 32)
    cos, sin = ref.rope_cos_sin(torch.arange(20), inv_freq)
    k_post = ref.rotate(k_pre, cos, sin)
    # the second layer's own frequencies are wrong (zero): only the handed cos/sin can un-rotate correctly
    layers = [KVQuantLayer(KVQuantConfig(4, 4, sink_tokens=1), 0, freq, 1.0, 32, fused=False)
              for freq in (inv_freq, torch.zeros_like(inv_freq))]
    layers[0].update(k_post, v)
    layers[1].update(k_post, v, {"cos": torch.cat((cos, cos), -1)[None], "sin": torch.cat((sin, sin), -1)[None]})
    for name, a, b in zip(ref.Storage._fields, layers[0].storage, layers[1].storage):
        assert torch.equal(a, b), name
    layers[0].update(k_post[:, :, :1] * 0, v[:, :, :1])  # a decode step: the read-back path
    keys, _ = layers[0].dequantized(torch.float32)
    assert ((keys[:, :, :20] - k_post).norm() / k_post.norm()) < 0.1


# ---- GPU: the CUDA C++ append kernel and GPU-sized decode -----------------------------------------------------------


# Append steps against capacity 40: a ragged prefill with an empty sequence, decodes, chunks, a 30-token chunk
# that overflows sequence 0 (poisoned: nothing written, length -1, and so for every later step), a negative count
# that poisons sequence 1, and a count past n that poisons sequence 2.
APPEND_STEPS = [(13, [13, 0, 7]), (1, [1, 1, 1]), (1, [1, 1, 0]), (6, [6, 2, 5]), (4, [4, 4, 4]), (30, [30, 3, 1]),
                (1, [1, 1, 1]), (2, [2, -1, 2]), (1, [1, 1, 1]), (2, [2, 2, 3])]


def tie_free_inputs(batch, kv_heads, n, head_dim, slots, dtype, g, device):
    """k with elements outside the calibrated ranges; v with slots + 1 planted distinct values per vector, so the
    outlier ranking has no ties; both strided (views), as projections hand them over."""
    k = torch.randn(batch, kv_heads, n + 3, head_dim, generator=g) * 1.5
    v = torch.randn(batch, kv_heads, n, head_dim, generator=g).clamp(-3, 3)
    channels = torch.rand(v.shape, generator=g).argsort(-1)[..., :slots + 1]
    v.scatter_(-1, channels, (4 + 0.5 * torch.arange(slots + 1.0)).expand(channels.shape).contiguous())
    return k.to(device, dtype)[:, :, 2:2 + n], v.to(device, dtype).transpose(1, 2).contiguous().transpose(1, 2)


def garbage_storage(batch, kv_heads, head_dim, codebook, slots, sink, window, dtype, g, device, capacity=40):
    """Storage full of random values, so stray or missing writes show."""
    storage = ops.allocate_storage(batch, kv_heads, head_dim, capacity, codebook, slots, sink, window, dtype, device)
    for t in ref.buffers(storage, ref.PER_SEQUENCE):
        t.copy_(torch.randn(t.shape, generator=g) if t.dtype.is_floating_point else
                torch.randint(-1000, 1000, t.shape, generator=g))
    return storage


def assert_same_storage(got, expected, message):
    for name, a, b in zip(ref.Storage._fields, got, expected):
        a, b = a.cpu(), b.cpu()
        if a.dtype.is_floating_point:  # bit for bit
            a, b = (x.view(torch.int32 if x.dtype == torch.float32 else torch.int16) for x in (a, b))
        assert torch.equal(a, b), f"{message}: storage.{name} differs at {(a != b).nonzero()[:4].tolist()}"


def cpu_copy(storage, codebook):
    return (ref.Storage(*(t.cpu().clone() for t in storage)),
            ref.Codebook(*(x.cpu() if isinstance(x, torch.Tensor) else x for x in codebook)))


@pytest.mark.gpu
@pytest.mark.parametrize("key_bits,value_bits", [(2, 2), (3, 3), (4, 4), (4, 2), (3, 4)])
@pytest.mark.parametrize("head_dim,dtype", [(64, torch.float16), (128, torch.bfloat16), (128, torch.float32)])
@pytest.mark.parametrize("sink,window,slots", [(0, 0, 1), (2, 4, 1), (1, 8, 3), (5, 0, 0), (0, 16, 2)])
def test_cuda_append_matches_reference_bit_for_bit(key_bits, value_bits, head_dim, dtype, sink, window, slots):
    assert hasattr(CUDA_EXT, "kv_quant_append"), "torchext._C was built without kv_quant_append"
    batch, kv_heads, device = 3, 2, "cuda"
    g = torch.Generator().manual_seed(key_bits * 100 + value_bits * 10 + head_dim + sink + window + slots)
    levels = [torch.rand(2 ** b, generator=g).sort().values * 2 - 1 for b in (key_bits, value_bits)]  # nuq-like
    codebook = ops.make_codebook(key_bits, value_bits, (torch.randn(kv_heads, head_dim, generator=g) * 0.5).to(device),
                                 (torch.rand(kv_heads, head_dim, generator=g) * 2 + 0.5).to(device),
                                 key_levels=levels[0], value_levels=levels[1])
    got = garbage_storage(batch, kv_heads, head_dim, codebook, slots, sink, window, dtype, g, device)
    expected, cpu_codebook = cpu_copy(got, codebook)
    for step, (n, counts) in enumerate(APPEND_STEPS):
        k, v = tie_free_inputs(batch, kv_heads, n, head_dim, slots, dtype, g, device)
        counts = torch.tensor(counts, dtype=torch.int32)
        ops.kv_quant_append_(got, codebook, k, v, counts.to(device), check=False)
        ref.append(expected, cpu_codebook, k.cpu(), v.cpu(), counts)
        assert_same_storage(got, expected, f"step {step} (n={n}, counts={counts.tolist()})")
    assert expected.lengths.tolist() == [-1, -1, -1]


@pytest.mark.gpu
def test_cuda_append_replays_in_a_cuda_graph():
    """A decode step captured in a CUDA graph and replayed: no host sync or allocation in the launcher."""
    batch, kv_heads, head_dim, slots, device = 2, 2, 128, 1, "cuda"
    g = torch.Generator().manual_seed(0)
    codebook = ops.make_codebook(4, 4, torch.zeros(kv_heads, head_dim, device=device),
                                 torch.ones(kv_heads, head_dim, device=device))
    got = garbage_storage(batch, kv_heads, head_dim, codebook, slots, 1, 4, torch.float16, g, device, capacity=64)
    expected, cpu_codebook = cpu_copy(got, codebook)
    k, v = tie_free_inputs(batch, kv_heads, 1, head_dim, slots, torch.float16, g, device)
    counts = torch.ones(batch, dtype=torch.int32, device=device)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up outside the graph, as capture requires
        ops.kv_quant_append_(got, codebook, k, v, counts, check=False)
    torch.cuda.current_stream().wait_stream(stream)
    ref.append(expected, cpu_codebook, k.cpu(), v.cpu(), counts.cpu())
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        ops.kv_quant_append_(got, codebook, k, v, counts, check=False)
    for step in range(10):  # crosses the window: positions start leaving it at length 5
        new_k, new_v = tie_free_inputs(batch, kv_heads, 1, head_dim, slots, torch.float16, g, device)
        k.copy_(new_k)
        v.copy_(new_v)
        graph.replay()
        ref.append(expected, cpu_codebook, k.cpu(), v.cpu(), counts.cpu())
        torch.cuda.synchronize()
        assert_same_storage(got, expected, f"replay {step}")
    assert expected.lengths.tolist() == [11, 11]


@pytest.mark.gpu
def test_decode_long_context_on_gpu():
    check_decode(*decode_case(4, 8, 4, 128, [8192, 300, 5000, 1], 4, 4, sink=4, window=64, dtype=torch.bfloat16,
                              slots=2, device="cuda"))


# ---- a small Llama built locally with transformers (no downloads) ---------------------------------------------------

INDUCTION_PERIOD, INDUCTION_VOCAB = 16, 64


def induction_batch(batch, repeats, generator):
    """Random token blocks repeated: after the first block every token is predictable by attending back."""
    block = torch.randint(0, INDUCTION_VOCAB, (batch, INDUCTION_PERIOD), generator=generator)
    return block.repeat(1, repeats)


@pytest.fixture(scope="module")
def small_llama():
    """A 2-layer GQA Llama (head_dim 32), random init then 300 AdamW steps on the induction task (~20 s on two
    cores), so that greedy decoding depends on attention over the cache and its choices have margins."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=INDUCTION_VOCAB, hidden_size=64, intermediate_size=128,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                                      max_position_embeddings=256)
    model = transformers.LlamaForCausalLM(config)
    model.generation_config.eos_token_id = None  # generate exactly max_new_tokens
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(0)
    for _ in range(300):
        ids = induction_batch(16, 4, g)
        loss = model(ids, labels=ids).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < 1.15  # the first block is noise (ln 64 / 4 = 1.04 per token): the copy is learned
    return model.eval(), config, g


def greedy(model, ids, cache, new_tokens=32):
    from torchext.nn import cache_kwargs
    with torch.no_grad():
        return model.generate(ids, max_new_tokens=new_tokens, do_sample=False, **cache_kwargs(model, cache),
                              attention_mask=torch.ones_like(ids), pad_token_id=0)[:, ids.shape[1]:]


@pytest.mark.xdist_group("small_llama")  # one worker trains the model once
def test_llama_greedy_generation_identical_at_4_bits_with_outliers(small_llama):
    """The fused decode kernel (interpreter on CPU) through model.generate, against a 16-bit DynamicCache."""
    from transformers import DynamicCache

    from torchext.nn import KVQuantCache, calibrate
    model, config, g = small_llama
    kvquant = calibrate(model, [induction_batch(16, 4, g)], bits=4, outlier_fraction=0.01)
    ids = induction_batch(1, 3, g)[:, :40]
    expected = greedy(model, ids, DynamicCache(config=config))
    cache = KVQuantCache(kvquant, model, max_length=128)
    try:
        assert torch.equal(greedy(model, ids, cache), expected)
    finally:
        model.set_attn_implementation("sdpa")
    report = cache.memory_report()
    assert expected.shape == (1, 32) and report["tokens"] == 40 + 32 - 1
    assert report["total_bytes"] < report["fp16_bytes"] / 2


@pytest.mark.xdist_group("small_llama")  # one worker trains the model once
def test_llama_logit_error_falls_as_bits_grow(small_llama):
    from transformers import DynamicCache

    from torchext.nn import KVQuantCache, cache_kwargs, calibrate
    model, config, g = small_llama
    calibration, ids = [induction_batch(4, 4, g)], induction_batch(2, 3, g)
    with torch.no_grad():
        exact_cache = DynamicCache(config=config)
        model(ids[:, :40], **cache_kwargs(model, exact_cache))
        exact = model(ids[:, 40:], **cache_kwargs(model, exact_cache)).logits
        errors = []
        for bits in (2, 3, 4):
            cache = KVQuantCache(calibrate(model, calibration, bits=bits), model, max_length=64, fused=False)
            model(ids[:, :40], **cache_kwargs(model, cache))
            errors.append((model(ids[:, 40:], **cache_kwargs(model, cache)).logits - exact).abs().max().item())
    assert errors[0] > errors[1] > errors[2], errors


@pytest.mark.xdist_group("small_llama")  # one worker trains the model once
def test_llama_fisher_calibration_weights_the_levels(small_llama):
    """fisher=True weights k-means by squared loss gradients (sec. 3.3): the levels move, the ranges do not."""
    from torchext.nn import calibrate
    model, _, g = small_llama
    batches = [induction_batch(4, 4, g)]
    plain, weighted = calibrate(model, batches, bits=3), calibrate(model, batches, bits=3, fisher=True)
    assert all(p.grad is None for p in model.parameters())  # calibration leaves no gradients behind
    for a, b in zip(plain.layers, weighted.layers):
        assert torch.equal(a["key_scale"], b["key_scale"]) and not torch.equal(a["key_levels"], b["key_levels"])
        assert not torch.equal(a["value_levels"], b["value_levels"])


def generate_with_logits(model, ids, mask, cache, new_tokens=6, **kwargs):
    """(new tokens [batch, new_tokens], logits [batch, new_tokens, vocab]) of greedy generation."""
    from torchext.nn import cache_kwargs
    with torch.no_grad():
        out = model.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False,
                             **cache_kwargs(model, cache), pad_token_id=0, output_logits=True,
                             return_dict_in_generate=True, **kwargs)
    return out.sequences[:, ids.shape[1]:], torch.stack(out.logits, 1)


@pytest.mark.xdist_group("small_llama")  # one worker trains the model once
@pytest.mark.parametrize("fused", [False, True])
def test_left_padded_batch_generates_as_each_prompt_alone(small_llama, fused):
    """Rows of a left-padded batch (pads stored nowhere: each row's position 0 is its first real token) give the
    tokens and logits of the same prompt run alone, on the fused kernel (interpreter on CPU) and off it."""
    from torchext.nn import KVQuantCache, calibrate
    model, _, g = small_llama
    kvquant = calibrate(model, [induction_batch(4, 4, g)], bits=4)
    ids, pads = induction_batch(3, 3, g)[:, :36], [0, 5, 11]
    mask = torch.ones_like(ids)
    for b, pad in enumerate(pads):
        ids[b, :pad], mask[b, :pad] = 0, 0
    try:
        tokens, logits = generate_with_logits(model, ids, mask, KVQuantCache(kvquant, model, max_length=48,
                                                                             fused=fused))
        for b, pad in enumerate(pads):
            alone = ids[b:b + 1, pad:]
            expected_tokens, expected_logits = generate_with_logits(
                model, alone, torch.ones_like(alone), KVQuantCache(kvquant, model, max_length=48, fused=fused))
            assert torch.equal(tokens[b], expected_tokens[0]), b
            # The batch changes the projections' summation order by an ulp, which can flip a code at a level
            # boundary (up to 1e-2 on this model); attending a pad, or a pad in the sink, moved them by 0.5-1.3.
            torch.testing.assert_close(logits[b], expected_logits[0], atol=5e-2, rtol=0)
    finally:
        model.set_attn_implementation("sdpa")


@pytest.mark.xdist_group("small_llama")  # one worker trains the model once
@pytest.mark.parametrize("fused", [False, True])
def test_generation_strategies_run_as_with_a_dynamic_cache(small_llama, fused):
    """Beam search (reorder_cache), reuse across generate calls and prompt-lookup decoding (crop) give a
    DynamicCache's tokens exactly when every position stays in the 16-bit window (so only the Cache API is
    tested here; crop of quantized positions is tested on the reference)."""
    from transformers import DynamicCache

    from torchext.nn import KVQuantCache, KVQuantConfig
    model, config, g = small_llama
    exact = KVQuantConfig(4, 4, window_tokens=64)

    def both(ids, new_tokens=6, **kwargs):
        caches = KVQuantCache(exact, model, max_length=64, fused=fused), DynamicCache(config=config)
        return [generate_with_logits(model, ids, torch.ones_like(ids), cache, new_tokens, **kwargs)[0]
                for cache in caches], caches

    ids = induction_batch(2, 3, g)[:, :20]
    try:
        (got, expected), _ = both(ids, num_beams=3)
        assert torch.equal(got, expected)
        (got, expected), _ = both(ids[:1], prompt_lookup_num_tokens=3)
        assert torch.equal(got, expected)
        (got, expected), (cache, dynamic) = both(ids)
        again = [generate_with_logits(model, longer, torch.ones_like(longer), c)[0]
                 for longer, c in ((torch.cat((ids, got, ids[:, :3]), 1), cache),
                                   (torch.cat((ids, expected, ids[:, :3]), 1), dynamic))]
        assert torch.equal(*again) and cache.get_seq_length() == dynamic.get_seq_length() == 34
    finally:
        model.set_attn_implementation("sdpa")


def test_batch_select_and_repeat_match_a_dynamic_cache():
    from transformers import DynamicCache

    from torchext.nn import KVQuantCache, KVQuantConfig
    inv_freq = llama3_inv_freq(32)
    k, v = structured_kv(4, 2, 10, 32)
    cache = KVQuantCache(KVQuantConfig(4, 4, window_tokens=16), num_layers=1, inv_freq=inv_freq, max_length=16,
                         fused=False)
    dynamic = DynamicCache()
    for c in (cache, dynamic):
        c.update(k[:3], v[:3], 0)
        c.batch_select_indices(torch.tensor([2, 0]))
        c.batch_repeat_interleave(2)
        c.reorder_cache(torch.tensor([3, 2, 1, 0]))
    got = cache.update(k[:4, :, :1], v[:4, :, :1], 0)
    expected = dynamic.update(k[:4, :, :1], v[:4, :, :1], 0)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


@pytest.mark.parametrize("key_group", [0, 4], ids=["kvquant", "kivi"])
def test_crop_reads_back_what_the_longer_cache_read(key_group):
    """Cropping keeps every remaining position as it read before (window positions that were quantized since
    come back from their quantized slots), and the cropped cache takes new tokens like an uncropped one."""
    storage, codebook = fresh_cache(2, 2, 32, 40, sink=1, window=4, key_group=key_group)
    k, v = structured_kv(2, 2, 30, 32)
    ref.append(storage, codebook, k, v, torch.tensor([30, 25]))
    before = ref.read(storage, codebook)
    ref.crop(storage, codebook, [12, 40])
    assert storage.lengths.tolist() == [12, 25]
    after = ref.read(storage, codebook)
    for a, b in zip(after, before):
        assert torch.equal(a[0, :, :12], b[0, :, :12]) and torch.equal(a[1, :, :25], b[1, :, :25])
    ref.append(storage, codebook, k[:, :, :3], v[:, :, :3], torch.tensor([3, 0]))
    keys, _ = ref.read(storage, codebook)
    first = max(ref.window_start(15, 1, 4, ref.window_step(codebook)), 12)  # new tokens still in the window
    assert first < 15 and torch.equal(keys[0, :, first:15], k[0, :, first - 12:3].float())


# ---- choosing the quantizer per layer at a bits-per-element budget --------------------------------------------------


def drifting_keys(batch, kv_heads, n, head_dim, group, seed=0):
    """Keys whose channel offsets jump every `group` positions (a range per layer must span every level they
    visit; a range per group needs only its own)."""
    g = torch.Generator().manual_seed(seed)
    jumps = 8 * torch.randn(batch, kv_heads, n // group, 1, head_dim, generator=g)
    noise = torch.randn(batch, kv_heads, n // group, group, head_dim, generator=g)
    return (jumps + noise).flatten(2, 3)


def spiky_keys(batch, kv_heads, n, head_dim, seed=0):
    """Gaussian keys, half of the vectors with one element 40 larger in a random channel (a per-group range is
    stretched by every spike in it for all the group's positions; per-layer levels fitted to the data are not)."""
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(batch, kv_heads, n, head_dim, generator=g)
    spike = (torch.rand(batch, kv_heads, n, 1, generator=g) < 0.5) * 40.0
    return k.scatter_add_(-1, torch.randint(0, head_dim, (batch, kv_heads, n, 1), generator=g), spike)


@pytest.mark.parametrize("data", ["drifting", "spiky"])
def test_choose_quantizer_follows_the_data(data):
    """Keys whose channels drift along the sequence get the KIVI mode's per-group ranges; keys with rare large
    elements get KVQuant's per-layer ranges and levels."""
    head_dim, n, budget = 64, 256, 4.5
    keys = drifting_keys(2, 2, n, head_dim, 32) if data == "drifting" else spiky_keys(2, 2, n, head_dim)
    k, v = keys.half(), torch.randn(2, 2, n, head_dim).half()
    q = torch.randn(2, 8, n, head_dim, generator=torch.Generator().manual_seed(1))
    candidates = candidate_quantizers(budget, head_dim, window_tokens=128)
    assert {c.key_group for c in candidates} == {0, 32, 64, 128}
    assert all(c.bits_per_element(head_dim) <= budget for c in candidates)
    best, stats, errors = choose_quantizer([q], [k], [v], candidates, torch.zeros(head_dim // 2), sink_tokens=1)
    assert errors[best] == min(errors.values()) and set(errors) == set(candidates)
    assert (best.key_group > 0) == (data == "drifting"), best
    kivi = min((c for c in candidates if c.key_group), key=errors.get)
    kvquant = min((c for c in candidates if not c.key_group), key=errors.get)
    loser, winner = (kvquant, kivi) if data == "drifting" else (kivi, kvquant)
    assert errors[loser] > 1.2 * errors[winner], (errors[loser], errors[winner])


@pytest.mark.xdist_group("small_llama")  # one worker trains the model once
def test_budget_calibration_stays_within_budget_and_the_cache_holds_its_choice(small_llama):
    """calibrate(budget=...) gives each layer a quantizer within the budget; the cache built from the config
    quantizes each layer as chosen, and its memory report's bits per quantized element are the budget's."""
    from torchext.nn import KVQuantCache, cache_kwargs, calibrate
    model, config, g = small_llama
    kv = calibrate(model, [induction_batch(8, 4, g)], budget=4.0, sink_tokens=1, window_tokens=16)
    assert len(kv.quantizers) == config.num_hidden_layers
    assert all(q.bits_per_element(32, torch.float32) <= 4.0 for q in kv.quantizers), kv.quantizers
    cache = KVQuantCache(kv, model, max_length=96, fused=False)
    with torch.no_grad():
        model(induction_batch(2, 5, g)[:, :80], **cache_kwargs(model, cache))
    for layer, q in zip(cache.layers, kv.quantizers):
        assert (layer.codebook.key_bits, layer.codebook.value_bits, layer.codebook.key_group) == \
            (q.key_bits, q.value_bits, q.key_group)
        assert layer.storage.key_outlier_index.shape[-1] == q.slots(32)
        memory = layer.memory()
        quantized = sum(memory[name] for name in ("codes", "value_scales", "outliers", "key_group_ranges"))
        positions = 2 * (ref.window_start(80, 1, 16, ref.window_step(layer.codebook)) - 1)  # 2 sequences
        assert 8 * quantized / (positions * 2 * config.num_key_value_heads * 32) == pytest.approx(
            q.bits_per_element(32, torch.float32), rel=1e-3)


@pytest.mark.xdist_group("small_llama")  # one worker trains the model once
def test_kivi_mode_generates_through_the_fused_kernel(small_llama):
    """KVQuantConfig(key_group=...) in model.generate: the fused kernel (interpreter on CPU) gives the greedy
    tokens of the dequantized cache, and of a 16-bit DynamicCache at 4 bits."""
    from transformers import DynamicCache

    from torchext.nn import KVQuantCache
    model, config, g = small_llama
    ids = induction_batch(1, 3, g)[:, :40]
    kivi = KVQuantConfig(4, 4, outlier_fraction=0.0, sink_tokens=1, window_tokens=8, key_group=8)
    unfused = greedy(model, ids, KVQuantCache(kivi, model, max_length=64, fused=False), new_tokens=12)
    try:
        fused = greedy(model, ids, KVQuantCache(kivi, model, max_length=64), new_tokens=12)
    finally:
        model.set_attn_implementation("sdpa")
    assert torch.equal(fused, unfused)
    assert torch.equal(fused, greedy(model, ids, DynamicCache(config=config), new_tokens=12))
