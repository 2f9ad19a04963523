"""LLM.int8() benchmarks: torchext.ops.int8_linear (weight quantized to int8 in advance, activations per call,
outlier columns in 16-bit) against the bf16 linear layer it replaces (cuBLAS) and torch.compile of it.

    .venv/bin/python bench/run.py --family int8_matmul                          # the table, JSON and PNG
    .venv/bin/python -m pytest bench/bench_int8_matmul.py -m gpu                 # pytest-benchmark, GPU sizes
    TRITON_INTERPRET=1 .venv/bin/python -m pytest bench/bench_int8_matmul.py --benchmark-disable -q   # CPU smoke

y = x W^T without bias at Llama-3-8B's linear shapes (K x N: 4096x4096 attention, 4096x14336 MLP gate/up,
14336x4096 MLP down) for M in {1, 16, 64, 256, 2048, 8192} tokens of bf16 activations; shapes read MxKxN.
int8_linear_t0 runs at threshold 0 (pure int8) on Gaussian x; int8_linear_t6 at threshold 6 on x with one
planted outlier column per 512 input features (0.2%), each of one sign and magnitude 20-60. A GEMM counts
2 M N K FLOPs (4 M N K with the input gradient); the rate column is against the dense bf16 peak, and the
int8 peak is twice that on H100, H200 and A100. Both error columns are against the fp32
torchext.reference.int8_matmul.int8_linear: "err torchext" is the kernel's distance from exact int8
arithmetic (plus the bf16 rounding of y), "err eager" is where the bf16 layer lands, about the quantization
error of LLM.int8() itself. The summary lines give each shape's weight memory and the ratios of the targets.

GPU targets (issue, H100): threshold 0 >= 1.6x bf16 at M >= 2048 and >= 1.3x at M <= 16; threshold 6 with
0.1-1% outlier columns costs <= 10% over pure int8; weight memory (int8 codes + fp32 row scales) ~0.5x bf16.
"""

from functools import partial

import pytest
import torch
import torch.nn.functional as F

from bench._harness import Case, pytest_params, run_benchmark
from torchext import ops
from torchext.reference import int8_matmul as ref

Int8Case = partial(Case, "int8_matmul")
BF16 = torch.bfloat16

M_SIZES = (1, 16, 64, 256, 2048, 8192)
LLAMA3_8B_LINEARS = ((4096, 4096), (4096, 14336), (14336, 4096))  # (K, N)
THRESHOLDS = (0.0, 6.0)
FEATURES_PER_OUTLIER = 512  # one planted outlier column per 512 input features, at least one


def _linear_inputs(m, k, n, outliers, device, dtype):
    """x [m, k] (with planted outlier columns if asked), the weight [n, k] and its int8 codes and row scales."""
    x = torch.randn(m, k, device=device)
    if outliers:
        cols = torch.randperm(k, device=device)[:max(1, k // FEATURES_PER_OUTLIER)]
        sign = torch.randint(0, 2, (cols.numel(),), device=device) * 2 - 1
        x[:, cols] = sign * torch.empty(m, cols.numel(), device=device).uniform_(20, 60)
    weight = (torch.randn(n, k, device=device) * k**-0.5).to(dtype)
    w_codes, w_scale = ref.quantize_weight(weight)
    return x.to(dtype).requires_grad_(), weight, w_codes, w_scale


def _int8_linear_torchext(threshold, x, weight, w_codes, w_scale):
    return ops.int8_linear(x, w_codes, w_scale, threshold=threshold)


def _linear_bf16(x, weight, w_codes, w_scale):
    """The layer int8 replaces: F.linear on the bf16 weight (cuBLAS); a frozen weight, so only x gets a gradient."""
    return F.linear(x, weight)


def _int8_linear_reference(threshold, x, weight, w_codes, w_scale):
    """ref.int8_linear's output with the op's gradient, grad_x = grad_y W_dequantized (straight through)."""
    dense = x @ ref.int8_dequantize(w_codes, w_scale).T
    return ref.int8_linear(x.detach(), w_codes, w_scale, None, threshold) + (dense - dense.detach())


# ---- summary lines ----------------------------------------------------------------------------------------------


def _weight_memory(k, n) -> str:
    int8, bf16 = n * k + 4 * n, 2 * n * k  # int8 codes + fp32 row scales; the bf16 weight
    return f"weight {int8 / 2**20:.4g} MiB int8 + scales vs {bf16 / 2**20:.4g} MiB bf16 ({int8 / bf16:.3f}x)"


def _ratio(ms: dict[str, float], numerator: str, denominator: str) -> str:
    """ms[numerator] / ms[denominator], or why there is none."""
    if numerator not in ms or denominator not in ms:
        return "no ratio (a provider failed)"
    return f"{ms[numerator] / ms[denominator]:.2f}x"


def _summaries(m, k, n):
    """The summary hooks of one shape's threshold 0 and 6 cases; the second divides by the first's time."""
    label = f"int8_linear {m}x{k}x{n}"
    target = " (target >= 1.6x)" if m >= 2048 else " (target >= 1.3x)" if m <= 16 else ""
    pure_int8 = {}  # {"threshold 0": torchext ms}, once the threshold 0 case has run

    def threshold0(ms):
        if "torchext" in ms:
            pure_int8["threshold 0"] = ms["torchext"]
        return f"{label}: {_weight_memory(k, n)}; threshold 0: {_ratio(ms, 'eager', 'torchext')} bf16{target}"

    def threshold6(ms):
        return (f"{label}: threshold 6: {_ratio(ms, 'eager', 'torchext')} bf16, "
                f"{_ratio({**ms, **pure_int8}, 'torchext', 'threshold 0')} the threshold 0 time (target <= 1.10x)")

    return threshold0, threshold6


# ---- cases ------------------------------------------------------------------------------------------------------


def _int8_linear(m, k, n, threshold, gpu, mode="fwd", summary=None):
    """One mode per case, since a summary hook sees the times of one mode. Threshold > 0 plants outliers in x;
    in "fwd+bwd" x gets the input gradient (int8_backward=True, the default) and the weight stays frozen."""
    gemms = 2 if mode == "fwd+bwd" else 1
    make_inputs = partial(_linear_inputs, m, k, n, threshold > 0)
    return Int8Case(f"int8_linear_t{threshold:g}", f"{m}x{k}x{n}", BF16, make_inputs,
                    partial(_int8_linear_torchext, threshold), _linear_bf16, partial(_int8_linear_reference, threshold),
                    modes=(mode,), count_bytes=False, flops={mode: gemms * 2 * m * n * k}, gpu=gpu, summary=summary)


def _int8_linear_pair(m, k, n, gpu):
    """The forward at threshold 0 (Gaussian x) and at threshold 6 (planted outlier columns) for one shape."""
    return [_int8_linear(m, k, n, threshold, gpu, summary=summary)
            for threshold, summary in zip(THRESHOLDS, _summaries(m, k, n))]


CASES = [
    # CPU smoke sizes: a handful of Triton-interpreter programs per launch.
    *_int8_linear_pair(4, 64, 32, gpu=False),
    _int8_linear(4, 64, 32, 0.0, gpu=False, mode="fwd+bwd"),
    # GPU sizes.
    *(case for k, n in LLAMA3_8B_LINEARS for m in M_SIZES for case in _int8_linear_pair(m, k, n, gpu=True)),
    _int8_linear(2048, 4096, 14336, 0.0, gpu=True, mode="fwd+bwd"),
]


@pytest.mark.parametrize(("case", "provider", "mode"), pytest_params(CASES))
def test_int8_matmul(benchmark, case, provider, mode):
    run_benchmark(benchmark, case, provider, mode)
