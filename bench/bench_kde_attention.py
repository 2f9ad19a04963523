"""KDE attention benchmarks: torchext.ops.kde_attention (LSH blocks + importance-sampled keys, b = m = 256, r = 8)
against exact attention: PyTorch SDPA as a user calls it (eager), torch.compile of it, and the anchors SDPA's flash
and memory-efficient backends (torch.nn.attention.sdpa_kernel) and flash-attn 2 when it imports.

    .venv/bin/python bench/run.py --family kde_attention                    # the table, JSON and PNG
    .venv/bin/python -m pytest bench/bench_kde_attention.py -m gpu           # pytest-benchmark, GPU sizes
    TRITON_INTERPRET=1 .venv/bin/python -m pytest bench/bench_kde_attention.py --benchmark-disable -q   # CPU smoke

GPU cases (issue): bf16, n = 1K..128K (plus a non-power of two), (batch, heads, head_dim) in {(1, 32, 64),
(1, 32, 128), (4, 8, 128)}, causal and not, one case per mode (fwd, fwd+bwd). The torchext column is the op as
users get it, so below its exact-attention threshold (MIN_SEQ_LEN / MIN_SEQ_LEN_CAUSAL) it is SDPA; the anchor
"kde kernel" forces the estimator at every n (min_seq_len=0): where it crosses "sdpa flash" is the threshold to
set. The error column is the max abs difference from exact fp32 attention (in fwd+bwd also of the gradients): the
approximation error, not rounding. Each case's summary line adds the speed-up over every anchor, the relative
spectral error of the output (by ||O|| and by ||V||, the bound's scale), the share of hashing + sorting + sampling
(make_plan) in the forward, and on CUDA the peak extra memory of each provider. TFLOP/s count exact attention's
FLOPs (4 B H N^2 D forward, 3.5x that with the backward, halved when causal), so for torchext they are effective.

GPU targets (issue, H100, bf16, d = 64, non-causal): >= 4x faster than SDPA flash at n = 32K and >= 10x at 128K with
relative spectral error <= 0.1 on Gaussian inputs; causal >= 2x at 64K.
"""

import dataclasses
from functools import partial

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from bench import kde_roofline, sizes
from bench._harness import (Case, NotApplicable, bench_device, cases_of, peak_extra_mib, pytest_params,
                            run_benchmark, time_ms)
from torchext.ops import kde_attention
from torchext.ops._kde_attention import DEFAULT_EXACT_WINDOW
from torchext.reference import kde_attention as ref

try:
    from flash_attn import flash_attn_func
except ImportError:  # not installed: the flash-attn anchor says n/a
    flash_attn_func = None

BF16 = torch.bfloat16
SEED = 0
GPU_PARAMS = dict(bucket_size=256, num_samples=256, num_hash_bits=8)  # the defaults
CPU_PARAMS = dict(bucket_size=32, num_samples=32, num_hash_bits=4, exact_window=64)  # a few interpreter programs


def _inputs(B, H, n, D, device, dtype):
    return tuple(torch.randn(B, H, n, D, device=device, dtype=dtype, requires_grad=True) for _ in range(3))


def _torchext(causal, params, q, k, v):
    return kde_attention(q, k, v, causal=causal, seed=SEED, **params)


def _sdpa(causal, q, k, v, backend=None):
    """Exact attention: the eager provider, the error column's ground truth and (with a backend) the anchors."""
    if backend is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    try:
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    except RuntimeError as e:  # the backend refuses the inputs (e.g. flash on CPU or fp32)
        raise NotApplicable(f"SDPA {backend.name}: {str(e).splitlines()[0]}") from None


def _flash_attn(causal, q, k, v):
    if flash_attn_func is None:
        raise NotApplicable("flash-attn is not installed")
    if not q.is_cuda or q.dtype not in (torch.bfloat16, torch.float16):
        raise NotApplicable("flash-attn needs CUDA bf16/fp16")
    # flash-attn takes [B, N, H, D]: transposed views of the same tensors, no copies.
    return flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=causal).transpose(1, 2)


def _summary(case: Case, causal: bool, params: dict, ms: dict[str, float]) -> str:
    (mode,) = case.modes
    label = f"kde_attention {case.shape} {mode}"
    if "torchext" not in ms:
        return f"{label}: torchext failed"
    parts = [f"{label}: torchext {ms['torchext']:.4g} ms"]
    parts += [f"{ms[p] / ms['torchext']:.3g}x vs {p}" for p in ("eager", *case.extra_providers) if p in ms]
    device = bench_device()
    torch.manual_seed(0)
    q, k, v = (x.detach() for x in case.make_inputs(device, case.dtype))
    with torch.no_grad():
        out = kde_attention(q, k, v, causal=causal, seed=SEED, min_seq_len=0, **params).float()
        exact = F.scaled_dot_product_attention(q, k, v, is_causal=causal).float()
        error = torch.linalg.matrix_norm(out - exact, ord=2)
        by_out = (error / torch.linalg.matrix_norm(exact, ord=2)).max().item()
        by_v = (error / torch.linalg.matrix_norm(v.float(), ord=2)).max().item()
    parts.append(f"spectral error {by_out:.3g} of ||O||, {by_v:.3g} of ||V||")
    if mode == "fwd" and "kde kernel" in ms:
        plan_params = {"exact_window": DEFAULT_EXACT_WINDOW, **params}
        plan_ms = time_ms(lambda: ref.make_plan(q, k, v, SEED, causal, **plan_params), device)
        parts.append(f"hash+sort+sample {plan_ms:.3g} ms = {100 * plan_ms / ms['kde kernel']:.0f}% of the kde "
                     f"kernel's forward")
    if device.type == "cuda":
        memory = {p: peak_extra_mib(case, p, mode) for p in ("torchext", "eager", *case.extra_providers)}
        parts.append("peak extra memory " + ", ".join(f"{p} {m:.4g} MiB" for p, m in memory.items() if m is not None))
    parts.append(kde_roofline.summary(causal, mode == "fwd+bwd"))
    return "; ".join(parts)


def _case(B, H, n, D, causal, mode, gpu, dtype=BF16, sampling="uniform"):
    params = {**(GPU_PARAMS if gpu else CPU_PARAMS), "sampling": sampling}
    anchors = {"sdpa flash": partial(_sdpa, causal, backend=SDPBackend.FLASH_ATTENTION),
               "sdpa efficient": partial(_sdpa, causal, backend=SDPBackend.EFFICIENT_ATTENTION),
               "flash-attn": partial(_flash_attn, causal),
               "kde kernel": partial(_torchext, causal, {**params, "min_seq_len": 0})}
    shape = f"B{B}-H{H}-N{n}-D{D}" + ("" if sampling == "uniform" else f"-{sampling}")
    case = Case("kde_attention", "kde_attention" + ("_causal" if causal else ""), shape, dtype,
                partial(_inputs, B, H, n, D), partial(_torchext, causal, params), partial(_sdpa, causal),
                partial(_sdpa, causal), modes=(mode,), count_bytes=False, gpu=gpu, extra_providers=anchors,
                flops={mode: (4 if mode == "fwd" else 14) * B * H * n * n * D // (2 if causal else 1)}, rep_ms=500)
    return dataclasses.replace(case, summary=partial(_summary, case, causal, params))


KINDS = {"kde": _case}

CASES = [
    # CPU smoke sizes: the estimator (min_seq_len 0 in "kde kernel") and the exact fallback (torchext, short N).
    *(_case(1, 2, 200, 32, causal, mode, gpu=False, dtype=torch.float32)
      for causal in (False, True) for mode in ("fwd", "fwd+bwd")),
    *cases_of(sizes.KDE_ATTENTION, KINDS),  # GPU sizes
]


@pytest.mark.parametrize(("case", "provider", "mode"), pytest_params(CASES))
def test_kde_attention(benchmark, case, provider, mode):
    run_benchmark(benchmark, case, provider, mode)
