"""Tensor (2-simplicial) attention benchmarks: the fused Triton op against plain PyTorch (a windowed gather, or the
chunked reference without a window), torch.compile of it, and SDPA at equal FLOPs.

    .venv/bin/python bench/run.py --family tensor_attention                      # the table, JSON and PNG
    .venv/bin/python -m pytest bench/bench_tensor_attention.py -m gpu             # pytest-benchmark, GPU sizes
    TRITON_INTERPRET=1 .venv/bin/python -m pytest bench/bench_tensor_attention.py --benchmark-disable -q

FLOP convention (tensor-core FLOPs, as the PyTorch/TLX blog counts them): with T the number of unmasked (i, j, k)
triples of one head (sum over i of min(i + 1, w1) * min(i + 1, w2) with a window, sum of (i + 1)^2 without),
forward = 4 d T per head (the S = (q * k1) K2^T and P V2 GEMMs), backward = 10 d T (S, dP, dS K2, dS^T (q * k1),
P^T (dO * v1): the minimum; the kernels recompute S and dP per pass). Roy et al. count 6 d T forward.

SDPA anchor at equal FLOPs: non-causal attention of the same queries to T / n keys (w1 * w2 with a window away
from the start), which costs 4 d n (T / n) = 4 d T forward and 2.5x that backward, the same counts. Its keys
and values are [k1; k2] and [v1; v2] tiled to that length inside the timed call (a copy of about 0.1% of the
FLOP time). It computes another function, so the cases have no reference column: tests/test_tensor_attention.py
checks the kernels.

GPU targets (issue): forward >= 300 TFLOP/s and backward >= 150 in bf16 with windows (512, 32) at n = 16K on H100.

CPU showcase (bench/run.py without a GPU): fp32 at n = 128 with windows (64, 16), the reference (chunked, explicit
backward: it computes all n^3 triples and masks the window, so n stays small) against the windowed gather and SDPA
at equal FLOPs, each case's summary line giving every provider's peak extra memory (the CPU allocator's peak, from
torch's profiler).
"""

import dataclasses
from functools import partial

import pytest
import torch
import torch.nn.functional as F

from bench import sizes
from bench._harness import Case, NotApplicable, cases_of, memory_line, pytest_params, run_benchmark
from torchext.ops import tensor_attention
from torchext.reference import tensor_attention as ref

TensorCase = partial(Case, "tensor_attention")
BF16 = torch.bfloat16
# Plain PyTorch materialises [B, H, n, w1, w2] logits (or chunks of [B, H, n, c, n]); past this it does not fit.
EAGER_MAX_ELEMENTS = 1 << 31


def triples(n: int, window: tuple[int, int] | None) -> int:
    """Unmasked (i, j, k) triples of one causal head."""
    w1, w2 = window or (n, n)
    return sum(min(i + 1, w1) * min(i + 1, w2) for i in range(n))


def _inputs(B, H, Hkv, n, d, device, dtype):
    shapes = [(B, H, n, d)] + [(B, Hkv, n, d)] * 4
    return tuple(torch.randn(s, device=device, dtype=dtype, requires_grad=True) for s in shapes)


def _windowed_eager(q, k1, k2, v1, v2, window):
    """What a user writes without a kernel: gather each query's two windows, one [B, H, n, w1, w2] softmax."""
    B, H, n, d = q.shape
    if B * H * n * window[0] * window[1] > EAGER_MAX_ELEMENTS:
        raise NotApplicable(f"[B, H, n, w1, w2] logits = {B * H * n * window[0] * window[1]:.2e} elements")
    group = H // k1.shape[1]
    k1, k2, v1, v2 = (x.repeat_interleave(group, dim=1) for x in (k1, k2, v1, v2))

    def windows(x, w):  # [B, H, n, w, d]: positions i - w + 1 .. i, zeros before the start
        return F.pad(x, (0, 0, w - 1, 0)).unfold(2, w, 1).transpose(-1, -2)

    (k1w, v1w), (k2w, v2w) = ((windows(k, w), windows(v, w)) for (k, v), w in (((k1, v1), window[0]),
                                                                               ((k2, v2), window[1])))
    s = torch.einsum("bhid,bhijd,bhikd->bhijk", q.float(), k1w.float(), k2w.float()) * d**-0.5
    i = torch.arange(n, device=q.device)[:, None, None]
    valid = (i - window[0] + 1 + torch.arange(window[0], device=q.device)[:, None] >= 0) & \
            (i - window[1] + 1 + torch.arange(window[1], device=q.device) >= 0)  # [n, w1, w2]
    s = s.masked_fill(~valid, float("-inf")).flatten(-2)  # [B, H, n, w1 * w2]
    p = torch.softmax(s, -1).view(B, H, n, *window)
    out = torch.einsum("bhijk,bhijd,bhikd->bhid", p, v1w.float(), v2w.float())
    return out.to(q.dtype), torch.logsumexp(s, -1)


def _full_eager(q, k1, k2, v1, v2):
    B, H, n, _ = q.shape
    if B * H * n * n * n > 64 * EAGER_MAX_ELEMENTS:
        raise NotApplicable(f"O(n^3) logits = {B * H * n ** 3:.2e} elements")
    return ref.tensor_attention(q, k1, k2, v1, v2)


def _sdpa_equal_flops(keys: int):
    """SDPA of the queries over `keys` keys (non-causal): the same tensor-core FLOPs as tensor attention."""
    def sdpa(q, k1, k2, v1, v2):
        reps = -(-keys // (2 * k1.shape[2]))
        k, v = (torch.cat(pair, dim=2).repeat(1, 1, reps, 1)[:, :, :keys] for pair in ((k1, k2), (v1, v2)))
        return F.scaled_dot_product_attention(q, k, v, enable_gqa=k.shape[1] != q.shape[1])
    return sdpa


def _memory_summary(case, ms):
    """Each provider's peak extra memory, for the case's one mode."""
    (mode,) = case.modes
    providers = ("torchext", "eager", *case.extra_providers)
    return f"tensor_attention {case.shape} {mode}: " + memory_line(case, mode, providers)


def _case(B, H, Hkv, n, d, window, gpu, dtype=BF16, modes=("fwd", "fwd+bwd"), memory=False):
    """memory: one case per mode with a summary line of the peak extra memory of torchext, eager and SDPA."""
    t = triples(n, window)
    fwd = 4 * d * t * B * H
    eager = partial(_windowed_eager, window=window) if window else _full_eager
    label = f"B{B}-H{H}/{Hkv}-n{n}-d{d}-" + (f"w{window[0]}x{window[1]}" if window else "full")
    case = TensorCase(
        "tensor_attention", label, dtype, partial(_inputs, B, H, Hkv, n, d),
        torchext=partial(tensor_attention, window=window, return_lse=True), eager=eager, modes=modes,
        count_bytes=False, flops={"fwd": fwd, "fwd+bwd": fwd * 14 // 4}, gpu=gpu, rep_ms=500 if gpu else 100,
        extra_providers={"sdpa (equal FLOPs)": _sdpa_equal_flops(max(1, round(t / n)))})
    return dataclasses.replace(case, summary=partial(_memory_summary, case)) if memory else case


KINDS = {"tensor": _case}

CASES = [
    # CPU smoke sizes: a few dozen Triton-interpreter programs per launch.
    _case(1, 2, 1, 24, 16, (8, 4), gpu=False),
    _case(1, 2, 1, 12, 16, None, gpu=False),
    # GPU sizes: the paper's windows (512, 32), head_dim 128 and 64, GQA 8, n up to 32K; the exact operator.
    *cases_of(sizes.TENSOR_ATTENTION, KINDS),
]

CPU_CASES = [_case(1, 4, 2, 128, 64, (64, 16), gpu=False, dtype=torch.float32, modes=(mode,), memory=True)
             for mode in ("fwd", "fwd+bwd")]
SHOWCASE = []  # the memory against the windowed gather and SDPA is in each case's summary line


@pytest.mark.parametrize(("case", "provider", "mode"), pytest_params(CASES))
def test_tensor_attention(benchmark, case, provider, mode):
    run_benchmark(benchmark, case, provider, mode)
