"""Kronecker attention benchmarks: the fused KAO kernels against the plain PyTorch a user writes for the same
operator (means by torch.mean, SDPA over the L = H + W (+ T) tokens, a broadcast outer sum), torch.compile of it,
and, as anchors, full attention over the flattened H*W tokens that KAO replaces (SDPA with q = k = v = x per
head, the same projection-free attention; once with torch's backend choice, once with the math backend that
materialises the scores).

    .venv/bin/python bench/run.py --family kronecker_attention          # the table, JSON and PNG
    .venv/bin/python -m pytest bench/bench_kronecker_attention.py -m gpu  # pytest-benchmark, GPU sizes
    TRITON_INTERPRET=1 .venv/bin/python bench/run.py --family kronecker_attention --quick   # CPU smoke

Bytes (the GB/s columns): the harness's minimum-traffic convention, per element of x with E bytes per element:
2E forward (x read, out written), 3E backward (grad_out and x read, dx written). What the kernels really move
(triton_kernels/kronecker_attention.py): forward KV 3E (x is read by the pooling and again as queries), QKV 2E;
backward KV 5E, QKV 2E (x is not read). Each case's summary line gives the GB/s of that actual traffic and
its share of the HBM peak (the issue's target: >= 70%), the speed-up over flattened SDPA and the extra peak
memory of each provider (outputs, saved tensors and workspace: torch.cuda.max_memory_allocated on CUDA, the CPU
allocator's peak from torch's profiler in the CPU showcase). The SDPA anchors compute a different operator, so
their error in the JSON is not an error.

CPU showcase (bench/run.py without a GPU): fp32, the reference path against the same eager PyTorch and flattened
SDPA, at a conv-net stage's 32x32 and 64x64.

GPU targets (issue, H100): KAO_QKV >= 50x faster and >= 100x less memory than SDPA over flattened tokens at
128x128; the kernels >= 70% of HBM bandwidth.
"""

import contextlib
import dataclasses
import math
from functools import partial

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from bench import sizes
from bench._harness import (Case, NotApplicable, bench_device, cases_of, device_info, memory_line, pytest_params,
                            run_benchmark, smoke_run)
from torchext.ops import kronecker_attention
from torchext.reference import kronecker_attention as ref

BF16 = torch.bfloat16
# Bytes per element of x the kernels move: (mode, bench mode) -> multiple of the element size.
KERNEL_TRAFFIC = {("kv", "fwd"): 3, ("qkv", "fwd"): 2, ("kv", "fwd+bwd"): 3 + 5, ("qkv", "fwd+bwd"): 2 + 2}
# Scores the math-backend anchor may materialise before it is skipped (bytes).
MATH_SCORES_LIMIT = 24 * 2**30


def _inputs(shape, device, dtype):
    return (torch.randn(shape, device=device, dtype=dtype, requires_grad=True),)


def _kao_eager(mode, heads, x):
    """KAO as a user writes it in PyTorch: means with torch.mean, SDPA over the tokens, a broadcast outer sum."""
    B, C, *spatial = x.shape
    axes = range(2, x.dim())
    tokens = torch.cat([x.mean(dim=[a for a in axes if a != axis]) for axis in axes], dim=-1)  # [B, C, L]
    tokens = tokens.view(B, heads, C // heads, -1).transpose(-1, -2)  # [B, heads, L, d]
    if mode == "kv":
        queries = x.reshape(B, heads, C // heads, -1).transpose(-1, -2)  # [B, heads, N, d]
        out = F.scaled_dot_product_attention(queries, tokens, tokens)
        return out.transpose(-1, -2).reshape(x.shape)
    out = F.scaled_dot_product_attention(tokens, tokens, tokens).transpose(-1, -2).reshape(B, C, -1)
    folded = 0
    for axis, part in enumerate(out.split(spatial, dim=-1)):
        folded = folded + part.reshape(B, C, *(n if i == axis else 1 for i, n in enumerate(spatial)))
    return folded


def _sdpa_flattened(heads, backend, x):
    """Full attention over the flattened positions, q = k = v = x split into heads: what KAO replaces."""
    B, C = x.shape[:2]
    N = math.prod(x.shape[2:])
    if backend == SDPBackend.MATH and B * heads * N * N * x.element_size() > MATH_SCORES_LIMIT:
        raise NotApplicable(f"the math backend would materialise {B * heads * N * N * x.element_size() / 2**30:.0f} "
                            f"GiB of scores")
    tokens = x.reshape(B, heads, C // heads, N).transpose(-1, -2).contiguous()  # [B, heads, N, d], unit stride on d
    with sdpa_kernel(backend) if backend else contextlib.nullcontext():
        out = F.scaled_dot_product_attention(tokens, tokens, tokens)
    return out.transpose(-1, -2).reshape(x.shape)


def _summary(case, mode, numel, element_size, ms):
    """Speed-up over flattened SDPA, (CUDA) the kernels' actual GB/s, and the peak memory of each provider."""
    (bench_mode,) = case.modes
    label = f"kronecker_attention {mode} {case.shape} {bench_mode}"
    if "torchext" not in ms:
        return f"{label}: torchext failed"
    parts = [f"{label}: torchext {ms['torchext']:.4g} ms"]
    for anchor in case.extra_providers:
        if anchor in ms:
            parts.append(f"speed-up over {anchor} {ms[anchor] / ms['torchext']:.3g}x")
    device = bench_device()
    if device.type == "cuda":
        traffic = KERNEL_TRAFFIC[mode, bench_mode] * numel * element_size
        rate = traffic / (ms["torchext"] * 1e-3)
        peak = device_info(device).hbm_peak
        parts.append(f"actual traffic {KERNEL_TRAFFIC[mode, bench_mode]}E/element = {rate / 1e9:.4g} GB/s"
                     + (f" ({100 * rate / peak:.0f}% of HBM peak)" if peak else ""))
    if not smoke_run(device):
        parts.append(memory_line(case, bench_mode, ("torchext", "eager", *case.extra_providers)))
    return "; ".join(parts)


def _kao(mode, shape, heads, bench_mode, gpu, dtype=BF16):
    anchors = {"sdpa flat": partial(_sdpa_flattened, heads, None),
               "sdpa flat math": partial(_sdpa_flattened, heads, SDPBackend.MATH)}
    case = Case("kronecker_attention", f"kronecker_{mode}", "x".join(map(str, shape)) + f"-h{heads}", dtype,
                partial(_inputs, shape), partial(kronecker_attention, mode=mode, heads=heads),
                partial(_kao_eager, mode, heads), partial(ref.kronecker_attention, mode=mode, heads=heads),
                modes=(bench_mode,), gpu=gpu, extra_providers=anchors)
    # One mode per case, since a summary sees the times of one mode; it measures memory on the case itself.
    summary = partial(_summary, case, mode, math.prod(shape), dtype.itemsize)
    return dataclasses.replace(case, summary=summary)


def _both_modes(mode, shape, heads, gpu):
    return [_kao(mode, shape, heads, bench_mode, gpu) for bench_mode in ("fwd", "fwd+bwd")]


KINDS = {"kao": _kao}
FP32 = torch.float32

CASES = [
    # CPU smoke sizes: a few Triton-interpreter programs per launch.
    *_both_modes("kv", (1, 8, 8, 8), 2, gpu=False),
    *_both_modes("qkv", (1, 8, 8, 8), 2, gpu=False),
    *_both_modes("qkv", (1, 4, 2, 4, 4), 1, gpu=False),
    # GPU sizes: a conv-net stage (batch 8, 128 channels, 2 heads of 64) at 32x32 .. 128x128, a video clip, and
    # the 1024-token limit.
    *cases_of(sizes.KRONECKER_ATTENTION, KINDS),
]

CPU_CASES = [
    _kao("qkv", (4, 64, 32, 32), 2, "fwd", gpu=False, dtype=FP32),
    _kao("qkv", (4, 64, 32, 32), 2, "fwd+bwd", gpu=False, dtype=FP32),
    _kao("kv", (4, 64, 32, 32), 2, "fwd", gpu=False, dtype=FP32),
    _kao("qkv", (1, 64, 64, 64), 2, "fwd", gpu=False, dtype=FP32),
]
SHOWCASE = []  # the memory against flattened SDPA is in each case's summary line


@pytest.mark.parametrize(("case", "provider", "mode"), pytest_params(CASES))
def test_kronecker_attention(benchmark, case, provider, mode):
    run_benchmark(benchmark, case, provider, mode)
