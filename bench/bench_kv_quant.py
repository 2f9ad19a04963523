"""KVQuant decode attention: one query token per sequence over a packed 4/3/2-bit cache, against fp16 SDPA over
the same context (flash and the default backend) and the Hugging Face QuantizedCache way (dequantize the whole
cache, then attend).

    .venv/bin/python bench/run.py --family kv_quant                 # the table, JSON and PNG
    .venv/bin/python -m pytest bench/bench_kv_quant.py -m gpu        # pytest-benchmark, GPU sizes

Shapes: GQA 8:1 (32 query heads, 4 kv heads, head_dim 128), contexts 4K-128K, batch 1-32. The summary line of
each case gives the speed-up over fp16 SDPA, the ideal speed-up 16 / b_eff (b_eff: bits per cached element counting
codes, value scales and outlier slots) and the fraction of it reached, torchext's achieved GB/s over the packed
bytes it reads, and the memory per token. GPU targets (issue): at >= 16K, 4-bit >= 2.5x fp16 SDPA (>= 70% of the
ideal), 2-bit >= 4x; never slower than fp16 at 4K.

CPU showcase (bench/run.py without a GPU): the decode op's CPU path (the reference: dequantize, then attend) at
batch 1, 2K context, GQA 8:2, head_dim 64, against dequantize-then-attend and fp16 SDPA over a 16-bit cache; then,
measured on synthetic keys and values (log-normal per-channel key scales, the outlier channels KVQuant's
per-channel key quantization is for), each quantizer's bits per element, bytes per token and attention-output
error at 4, 3 and 2 bits, against KIVI as its paper describes it (examples/kv_quality.py's anchor).
"""

from functools import cache, partial

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from bench import sizes
from bench._harness import Case, NotApplicable, Showcase, cases_of, pytest_params, run_benchmark
from torchext import ops
from torchext.nn.kv_quant import Quantizer, layer_calibration, simulate
from torchext.ops._kv_quant import bytes_per_position
from torchext.reference import kv_quant as ref

HEADS, KV_HEADS, HEAD_DIM = 32, 4, 128
SINK, SLOTS = 4, 1  # 16-bit sink positions; outlier slots per vector (1% of 128, rounded)
APPEND_CHUNK = 16384  # tokens appended per call while building a long cache


def _inv_freq(head_dim, device):
    return (500000.0 ** (-torch.arange(0, head_dim, 2, device=device).float() / head_dim)).contiguous()


def _inputs(batch, context, key_bits, value_bits, heads, kv_heads, head_dim, key_group, device, dtype):
    """(q, storage, codebook, inv_freq, k16, v16): a packed cache of `context` tokens per sequence (built with the
    quantize-and-append op) and the fp16 cache SDPA reads. The KIVI mode (key_group > 0) holds its incomplete
    group in a window of key_group positions."""
    codebook = ops.make_codebook(key_bits, value_bits, torch.zeros(kv_heads, head_dim, device=device),
                                 torch.full((kv_heads, head_dim), 2.0, device=device), key_group=key_group)
    storage = ops.allocate_storage(batch, kv_heads, head_dim, context, codebook, SLOTS, SINK, key_group, dtype,
                                   device)
    for first in range(0, context, APPEND_CHUNK):
        n = min(APPEND_CHUNK, context - first)
        k, v = (torch.randn(batch, kv_heads, n, head_dim, device=device, dtype=dtype) for _ in range(2))
        ops.kv_quant_append_(storage, codebook, k, v, check=False)
    q = torch.randn(batch, heads, 1, head_dim, device=device, dtype=dtype)
    k16, v16 = (torch.randn(batch, kv_heads, context, head_dim, device=device, dtype=dtype) for _ in range(2))
    return q, storage, codebook, _inv_freq(head_dim, device), k16, v16


def _torchext(q, storage, codebook, inv_freq, k16, v16):
    return ops.kv_quant_decode_attention(q, storage, codebook, inv_freq, max_length=storage.key_codes.shape[2])


def _dequantize_then_attend(q, storage, codebook, inv_freq, k16, v16):
    """What Hugging Face's QuantizedCache does every step: dequantize the whole cache, then ordinary attention."""
    keys, values = ref.read(storage, codebook)
    cos, sin = ref.rope_cos_sin(torch.arange(keys.shape[2], device=q.device), inv_freq)
    keys = ref.rotate(keys, cos, sin).to(q.dtype)
    return F.scaled_dot_product_attention(q, keys, values.to(q.dtype), enable_gqa=True)


def _reference(q, storage, codebook, inv_freq, k16, v16):
    keys, values = ref.read(storage, codebook)
    return ref.decode_attention(q, keys, values, storage.lengths, inv_freq)


def _sdpa(q, storage, codebook, inv_freq, k16, v16, backend=None):
    """fp16 attention over the 16-bit cache of the same context (what the packed cache replaces)."""
    if backend is None:
        return F.scaled_dot_product_attention(q, k16, v16, enable_gqa=True)
    if not q.is_cuda:
        raise NotApplicable("the flash backend needs CUDA")
    with sdpa_kernel(backend):
        return F.scaled_dot_product_attention(q, k16, v16, enable_gqa=True)


def _not_compileable(*args):
    raise NotApplicable("dequantize-then-attend reads every sequence's length on the host (the HF QuantizedCache "
                        "is documented as not torch.compile-able)")


ANCHORS = {"sdpa fp16": _sdpa, "flash fp16": partial(_sdpa, backend=SDPBackend.FLASH_ATTENTION)}


def packed_bytes_per_token(key_bits, value_bits, kv_heads=KV_HEADS, head_dim=HEAD_DIM):
    """Bytes one position takes in the packed buffers (codes, value offset and scale, outlier slots), read
    off an allocated one-position cache."""
    codebook = ops.make_codebook(key_bits, value_bits, torch.zeros(kv_heads, head_dim), torch.ones(kv_heads, head_dim))
    storage = ops.allocate_storage(1, kv_heads, head_dim, 1, codebook, SLOTS, dtype=torch.float16)
    return sum(bytes_per_position(storage, codebook).values())


def _summary(batch, context, key_bits, value_bits, kv_heads, head_dim):
    fp16 = 2 * kv_heads * head_dim * 2  # bytes per token of a 16-bit K/V cache
    packed = packed_bytes_per_token(key_bits, value_bits, kv_heads, head_dim)
    ideal = fp16 / packed  # 16 / b_eff

    def line(ms):
        if "sdpa fp16" not in ms:
            return f"b{batch} ctx{context} K{key_bits}V{value_bits}: {packed} B/token vs {fp16} fp16"
        speedup = ms["sdpa fp16"] / ms["torchext"]
        gbps = batch * context * packed / ms["torchext"] / 1e6
        return (f"b{batch} ctx{context} K{key_bits}V{value_bits}: {speedup:.2f}x fp16 SDPA, ideal {ideal:.2f}x "
                f"(b_eff {16 / ideal:.2f} bits), {speedup / ideal:.0%} of it; {gbps:.0f} GB/s over the packed "
                f"cache; {packed} B/token vs {fp16} fp16")
    return line


def _decode(batch, context, key_bits, value_bits, gpu, check=False, heads=None, kv_heads=None, head_dim=None,
            dtype=torch.float16, key_group=0, showcase=False):
    """GPU cases default to GQA 32:4 with head_dim 128; smoke cases to 8:2 with 64. key_group > 0: the KIVI mode.
    showcase: the CPU showcase's case: its cache is built once (decode leaves it unchanged), the anchor that runs
    on a CPU, no summary line (the SHOWCASE table has the memory)."""
    default = (HEADS, KV_HEADS, HEAD_DIM) if gpu else (8, 2, 64)
    heads, kv_heads, head_dim = (given or fallback for given, fallback in zip((heads, kv_heads, head_dim), default))
    shape = f"b{batch}-ctx{context}-K{key_bits}V{value_bits}" + (f"-H{heads}/{kv_heads}-d{head_dim}" if
                                                                  (heads, kv_heads, head_dim) != default else "")
    shape += f"-kivi{key_group}" if key_group else ""
    make_inputs = partial(_inputs, batch, context, key_bits, value_bits, heads, kv_heads, head_dim, key_group)
    return Case("kv_quant", "kv_quant_decode_attention", shape, dtype,
                cache(make_inputs) if showcase else make_inputs,
                _torchext, _dequantize_then_attend, _reference if check else None, compiled=_not_compileable,
                modes=("fwd",), count_bytes=False, gpu=gpu,
                summary=None if showcase else _summary(batch, context, key_bits, value_bits, kv_heads, head_dim),
                extra_providers={"sdpa fp16": _sdpa} if showcase else ANCHORS)


KINDS = {"decode": _decode}

CASES = [
    # CPU smoke size: a few interpreter programs.
    _decode(2, 96, 4, 4, gpu=False, check=True),
    _decode(2, 96, 4, 4, gpu=False, check=True, key_group=32),
    *cases_of(sizes.KV_QUANT, KINDS),  # GPU sizes
]

CPU_CASES = [_decode(1, 2048, bits, bits, gpu=False, showcase=True) for bits in (4, 2)]


def _synthetic_kv(g: torch.Generator, key_scale: torch.Tensor, key_mean: torch.Tensor, heads: int, n: int) -> dict:
    """q, k, v [1, heads or kv_heads, n, head_dim] (lists of one layer, kv_quality's layout), keys pre-RoPE."""
    kv_heads, _, head_dim = key_scale.shape
    k = torch.randn(1, kv_heads, n, head_dim, generator=g) * key_scale + key_mean
    v, q = torch.randn(1, kv_heads, n, head_dim, generator=g), torch.randn(1, heads, n, head_dim, generator=g)
    return {"q": [q], "k": [k], "v": [v]}


def _quality_table(heads=8, kv_heads=2, head_dim=64, n=1024):
    """Bits per element, bytes per token and causal attention-output error (relative Frobenius, against exact
    attention over the 16-bit cache) of each quantizer, calibrated on one draw and measured on another."""
    from examples import kv_quality  # the measurement of examples/kv_quality.py (imports transformers: only here)

    g = torch.Generator().manual_seed(0)
    key_scale = (0.8 * torch.randn(kv_heads, 1, head_dim, generator=g)).exp()
    key_mean = torch.randn(kv_heads, 1, head_dim, generator=g)
    data = {"calibration": _synthetic_kv(g, key_scale, key_mean, heads, n), "head_dim": head_dim, "causal": True,
            "evaluation": _synthetic_kv(g, key_scale, key_mean, heads, n), "inv_freq": _inv_freq(head_dim, "cpu")}
    k, v = (data["evaluation"][kind][0].to(kv_quality.DTYPE) for kind in "kv")
    fp16_bytes = 2 * kv_heads * head_dim * 2
    rows = []

    def add(method, bits_per_element, k_hat_post, v_hat):
        error = kv_quality.error(data, 0, k_hat_post, v_hat)
        rows.append([method, f"{bits_per_element:.3g}", f"{bits_per_element * 2 * kv_heads * head_dim / 8:.4g}",
                     f"{bits_per_element * 2 * kv_heads * head_dim / 8 / fp16_bytes:.3f}x", f"{error:.3e}"])

    for bits in (4, 3, 2):
        for quantizer in (Quantizer(bits, bits, 0.01), Quantizer(bits, bits, 0.0, kv_quality.GROUP, nuq=False)):
            if quantizer.key_group:  # KIVI mode: key ranges come from the cache; these give the shape only
                stats = {"key_offset": torch.zeros(kv_heads, head_dim), "key_scale": torch.ones(kv_heads, head_dim)}
            else:
                cal_k, cal_v = (kv_quality.flat(data["calibration"][kind][0].to(kv_quality.DTYPE)) for kind in "kv")
                stats = layer_calibration(cal_k, cal_v, bits, bits, quantizer.outlier_fraction)
            k_hat, v_hat = simulate(k, v, quantizer, stats)
            add(f"torchext {quantizer}", quantizer.bits_per_element(head_dim),
                kv_quality.rotated(k_hat, data["inv_freq"]), v_hat)
        add(f"KIVI paper K{bits}V{bits} (post-RoPE, g{kv_quality.GROUP})", bits + kv_quality.ANCHOR_METADATA_BITS,
            kv_quality.kivi_paper(kv_quality.rotated(k.float(), data["inv_freq"]), bits, True),
            kv_quality.kivi_paper(v.float(), bits, False))
    header = ["quantizer", "bits/element", "bytes/token", "vs fp16", "attention error"]
    return header, [["fp16 cache", "16", f"{fp16_bytes}", "1.000x", "0"], *rows]


SHOWCASE = [Showcase("kv_quant", "KV cache per token and layer (GQA 8:2, head_dim 64) and causal attention error, "
                                 "on synthetic K/V (n = 1024)", _quality_table)]


@pytest.mark.parametrize(("case", "provider", "mode"), pytest_params(CASES))
def test_kv_quant(benchmark, case, provider, mode):
    run_benchmark(benchmark, case, provider, mode)
