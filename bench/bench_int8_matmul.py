"""LLM.int8() benchmarks: torchext.ops.int8_linear (weight quantized to int8 in advance, activations per call,
outlier columns in 16-bit) against the bf16 linear layer it replaces (cuBLAS), torch.compile of it and, in
the forward, two int8 anchors: torch._int_mm with the scaling in PyTorch, and bitsandbytes where it imports.

    .venv/bin/python bench/run.py --family int8_matmul                          # the table, JSON and PNG
    .venv/bin/python -m pytest bench/bench_int8_matmul.py -m gpu                 # pytest-benchmark, GPU sizes
    TRITON_INTERPRET=1 .venv/bin/python -m pytest bench/bench_int8_matmul.py --benchmark-disable -q   # CPU smoke

y = x W^T without bias at Llama-3-8B's linear shapes (K x N: 4096x4096 attention, 4096x14336 MLP gate/up,
14336x4096 MLP down) for M in {1, 16, 64, 256, 2048, 8192} tokens of bf16 activations; shapes read MxKxN.
int8_linear_t0 runs at threshold 0 (pure int8) on Gaussian x; int8_linear_t6 at threshold 6 on x with one
planted outlier column per 512 input features (0.2%), each of one sign and magnitude 20-60. A GEMM counts
2 M N K FLOPs (4 M N K with the input gradient); torchext's % of peak is against the dense int8 peak
(twice the bf16 one on H100, H200 and A100). Both error columns are against the fp32
torchext.reference.int8_matmul.int8_linear: "err torchext" is the kernel's distance from exact int8
arithmetic (plus the bf16 rounding of y), "err eager" is where the bf16 layer lands, about the quantization
error of LLM.int8() itself. The summary lines give each shape's weight memory and the ratios of the targets.

Anchors (forward only; "vs best anchor" is torchext's speed-up over the faster one):
- torch._int_mm: what torchao's int8 dynamic-activation path runs unfused: x quantized per row in PyTorch,
  torch._int_mm (cuBLASLt, int32 out), the fp32 scales, the cast to bf16. Pure int8 whatever the case's
  threshold; n/a where cuBLASLt refuses the shape (M <= 16, K or N not a multiple of 8).
- bitsandbytes: bitsandbytes.nn.Linear8bitLt at the case's threshold holding the same weight; absent from
  the cases when bitsandbytes does not import.

GPU targets (issue, H100): threshold 0 >= 1.6x bf16 at M >= 2048 and >= 1.3x at M <= 16; threshold 6 with
0.1-1% outlier columns costs <= 10% over pure int8; weight memory (int8 codes + fp32 row scales) ~0.5x bf16.

CPU showcase (bench/run.py without a GPU): fp32 activations, torchext's int8 CPU path against the fp32 linear layer
and the anchors at 256 tokens of a 1024x1024 layer; then what int8 buys on any device, measured: the memory of an
Int8Linear against the nn.Linear it replaces, and the output error against exact fp32 of int8 without and with the
outlier decomposition, bitsandbytes and a bf16 layer, on Gaussian activations and with planted outlier columns.
bitsandbytes' log warnings (its CPU 4-bit kernels not loading, its int8 path casting inputs to fp16) are silenced.
"""

import logging
from functools import cached_property, partial

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bench import sizes
from bench._harness import Case, NotApplicable, Showcase, cases_of, pytest_params, run_benchmark
from torchext import ops
from torchext.nn import Int8Linear
from torchext.reference import int8_matmul as ref

logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
try:
    import bitsandbytes
except ImportError:  # not installed: the bitsandbytes anchor is left out
    bitsandbytes = None

Int8Case = partial(Case, "int8_matmul")
BF16 = torch.bfloat16

THRESHOLDS = (0.0, 6.0)
FEATURES_PER_OUTLIER = 512  # one planted outlier column per 512 input features, at least one


class _Linear8bitLt:
    """bitsandbytes.nn.Linear8bitLt holding a case's weight, built on its first call (the provider's first, untimed
    one), so only the bitsandbytes provider pays for it."""

    def __init__(self, weight, threshold):
        self.weight, self.threshold = weight, threshold

    @cached_property
    def layer(self):
        n, k = self.weight.shape
        layer = bitsandbytes.nn.Linear8bitLt(k, n, bias=False, has_fp16_weights=False, threshold=self.threshold)
        layer.load_state_dict({"weight": self.weight.cpu()})
        return layer.to(self.weight.device).eval()  # the move to the GPU quantizes the weight

    def __call__(self, x):
        return self.layer(x)


def _linear_inputs(m, k, n, threshold, device, dtype):
    """x [m, k] (with planted outlier columns when threshold > 0), the weight [n, k], its int8 codes and row
    scales, and the lazy bitsandbytes layer of the weight at that threshold."""
    x = torch.randn(m, k, device=device)
    if threshold > 0:
        cols = torch.randperm(k, device=device)[:max(1, k // FEATURES_PER_OUTLIER)]
        sign = torch.randint(0, 2, (cols.numel(),), device=device) * 2 - 1
        x[:, cols] = sign * torch.empty(m, cols.numel(), device=device).uniform_(20, 60)
    weight = (torch.randn(n, k, device=device) * k**-0.5).to(dtype)
    w_codes, w_scale = ref.quantize_weight(weight)
    return x.to(dtype).requires_grad_(), weight, w_codes, w_scale, _Linear8bitLt(weight, threshold)


def _int8_linear_torchext(threshold, x, weight, w_codes, w_scale, bnb_layer):
    return ops.int8_linear(x, w_codes, w_scale, threshold=threshold, int8_backward=True)  # the kernel's backward


def _linear_bf16(x, weight, w_codes, w_scale, bnb_layer):
    """The layer int8 replaces: F.linear on the bf16 weight (cuBLAS); a frozen weight, so only x gets a gradient."""
    return F.linear(x, weight)


def _int8_linear_reference(threshold, x, weight, w_codes, w_scale, bnb_layer):
    """ref.int8_linear's output with the op's gradient, grad_x = grad_y W_dequantized (straight through)."""
    dense = x @ ref.int8_dequantize(w_codes, w_scale).T
    return ref.int8_linear(x.detach(), w_codes, w_scale, None, threshold) + (dense - dense.detach())


# ---- anchors ----------------------------------------------------------------------------------------------------


def _int_mm_linear(x, weight, w_codes, w_scale, bnb_layer):
    """Per-row absmax int8 codes of x, torch._int_mm against the weight codes as the column-major [K, N] view
    cuBLASLt wants (w_codes.t(), no copy), then both fp32 scales and the cast to x.dtype."""
    (m, k), n = x.shape, w_codes.shape[0]
    if m <= 16 or k % 8 or n % 8:
        raise NotApplicable("cuBLASLt needs M > 16 and K, N multiples of 8")
    x_absmax = x.abs().amax(dim=1, keepdim=True).float().clamp(min=1e-12)  # a zero row gets codes 0, not NaN
    x_codes = (x.float() * (127 / x_absmax)).round().to(torch.int8)
    acc = torch._int_mm(x_codes, w_codes.t())
    return (acc.float() * (x_absmax / 127) * (w_scale / 127)).to(x.dtype)


def _bitsandbytes_linear(x, weight, w_codes, w_scale, bnb_layer):
    return bnb_layer(x)


# The forward cases' anchors (torch._int_mm has no gradient, so the fwd+bwd case has none).
ANCHORS = {"torch._int_mm": _int_mm_linear, **({"bitsandbytes": _bitsandbytes_linear} if bitsandbytes else {})}


# ---- summary lines ----------------------------------------------------------------------------------------------


def _weight_memory(k, n) -> str:
    int8, bf16 = n * k + 4 * n, 2 * n * k  # int8 codes + fp32 row scales; the bf16 weight
    return f"weight {int8 / 2**20:.4g} MiB int8 + scales vs {bf16 / 2**20:.4g} MiB bf16 ({int8 / bf16:.3f}x)"


def _ratio(ms: dict[str, float], numerator: str, denominator: str) -> str:
    """ms[numerator] / ms[denominator], or why there is none."""
    if numerator not in ms or denominator not in ms:
        return "no ratio (a provider failed)"
    return f"{ms[numerator] / ms[denominator]:.2f}x"


def _summary(m, k, n, threshold):
    label = f"int8_linear {m}x{k}x{n} threshold {threshold:g}"

    def line(ms):
        parts = [f"{label}: {_weight_memory(k, n)}", f"bf16 / torchext {_ratio(ms, 'eager', 'torchext')}"]
        if threshold > 0:  # the same inputs through the pure int8 path: what the outlier decomposition costs
            parts.append(f"torchext / pure int8 {_ratio(ms, 'torchext', PURE_INT8)} (target <= 1.10x)")
        return "; ".join(parts)
    return line


# ---- cases ------------------------------------------------------------------------------------------------------

PURE_INT8 = "int8 t0"  # the anchor of threshold > 0 cases: torchext at threshold 0 on the same x


def _int8_linear(m, k, n, threshold, gpu, mode="fwd", dtype=BF16, summary=True):
    """One mode per case, since a summary hook sees the times of one mode. Threshold > 0 plants outliers in x;
    in "fwd+bwd" x gets the input gradient by the int8 GEMM (int8_backward=True; the default is a bf16 matmul with
    the dequantized weight) and the weight stays frozen. The "fwd" cases also run the ANCHORS (and, with
    outliers, the pure int8 path); the FLOPs count against the int8 peak. summary: the line of weight memory and
    target ratios (the CPU showcase has its own tables instead)."""
    gemms = 2 if mode == "fwd+bwd" else 1
    make_inputs = partial(_linear_inputs, m, k, n, threshold)
    anchors = {}
    if mode == "fwd":
        anchors = {**ANCHORS, **({PURE_INT8: partial(_int8_linear_torchext, 0.0)} if threshold > 0 else {})}
    return Int8Case(f"int8_linear_t{threshold:g}", f"{m}x{k}x{n}", dtype, make_inputs,
                    partial(_int8_linear_torchext, threshold), _linear_bf16, partial(_int8_linear_reference, threshold),
                    modes=(mode,), count_bytes=False, flops={mode: gemms * 2 * m * n * k}, gpu=gpu,
                    summary=_summary(m, k, n, threshold) if summary else None, extra_providers=anchors, peak="int8")


def _int8_linear_pair(m, k, n, gpu, **options):
    """The forward at threshold 0 (Gaussian x) and at threshold 6 (planted outlier columns) for one shape."""
    return [_int8_linear(m, k, n, threshold, gpu, **options) for threshold in THRESHOLDS]


def _static_inputs(m, k, n, device, dtype):
    """_linear_inputs at threshold 6, plus the static outlier set (the planted columns, found once, as
    calibrate_outliers does) and their 16-bit weight columns."""
    x, weight, w_codes, w_scale, bnb_layer = _linear_inputs(m, k, n, 6.0, device, dtype)
    cols = (x.detach().abs() >= 6.0).any(0).nonzero().flatten().to(torch.int32)
    slot = torch.full((k,), -1, dtype=torch.int32, device=device)
    slot[cols.long()] = torch.arange(cols.numel(), dtype=torch.int32, device=device)
    return x, weight, cols, weight[:, cols.long()].contiguous(), slot, w_codes, w_scale


def _static_torchext(x, weight, cols, w16, slot, w_codes, w_scale):
    return ops.int8_linear(x, w_codes, w_scale, threshold=6.0, static_cols=cols, w16=w16, w16_slot=slot)


def _static_bf16(x, weight, cols, w16, slot, w_codes, w_scale):
    return F.linear(x, weight)


def _int8_linear_static(m, k, n, gpu, dtype=BF16):
    """Static mode (Int8Linear(outliers="static")): a calibrated outlier set whose weight columns stay in 16 bits."""
    return Int8Case("int8_linear_static", f"{m}x{k}x{n}", dtype, partial(_static_inputs, m, k, n), _static_torchext,
                    _static_bf16, modes=("fwd",), count_bytes=False, flops={"fwd": 2 * m * n * k}, gpu=gpu,
                    peak="int8")


KINDS = {"int8_linear_pair": _int8_linear_pair, "int8_linear": _int8_linear, "int8_linear_static": _int8_linear_static}

CASES = [
    # CPU smoke sizes: a handful of Triton-interpreter programs per launch; torch._int_mm is n/a at M = 4.
    *_int8_linear_pair(4, 64, 32, gpu=False),
    _int8_linear(32, 64, 32, 0.0, gpu=False),
    _int8_linear(4, 64, 32, 0.0, gpu=False, mode="fwd+bwd"),
    *cases_of(sizes.INT8_MATMUL, KINDS),  # GPU sizes
]


# ---- the CPU showcase -------------------------------------------------------------------------------------------

FP32 = torch.float32
CPU_CASES = [
    *_int8_linear_pair(256, 1024, 1024, gpu=False, dtype=FP32, summary=False),
    _int8_linear(256, 1024, 1024, 0.0, gpu=False, mode="fwd+bwd", dtype=FP32, summary=False),
]


def _module_mib(module: nn.Module) -> float:
    return sum(t.numel() * t.element_size() for t in module.state_dict().values() if t is not None) / 2**20


def _memory_table(shapes=((4096, 4096), (4096, 14336))):
    """The state_dict bytes of a bias-free nn.Linear of each (in, out) shape in fp32 and bf16, and of the Int8Linear
    made from the bf16 one."""
    rows = []
    for k, n in shapes:
        linear = nn.Linear(k, n, bias=False)
        fp32 = _module_mib(linear)
        bf16 = _module_mib(linear.bfloat16())
        int8 = _module_mib(Int8Linear.from_float(linear))
        rows.append([f"{k}x{n}", f"{fp32:.4g}", f"{bf16:.4g}", f"{int8:.4g}", f"{int8 / bf16:.3f}x"])
    return ["layer (in x out)", "fp32 MiB", "bf16 MiB", "Int8Linear MiB", "Int8Linear / bf16"], rows


def _relative(y, exact) -> str:
    return f"{float((y.float() - exact).norm() / exact.norm()):.2e}"


def _error_table(m=256, k=1024, n=1024):
    """||y - x W^T|| / ||x W^T|| against fp32 for each method, on Gaussian x and on x with planted outlier columns."""
    methods = {"int8 (threshold 0)": partial(_int8_linear_torchext, 0.0),
               "LLM.int8() (threshold 6)": partial(_int8_linear_torchext, 6.0),
               **({"bitsandbytes (threshold 6)": _bitsandbytes_linear} if bitsandbytes else {})}
    rows = []
    for threshold, label in ((0.0, "Gaussian"), (6.0, f"1 outlier column per {FEATURES_PER_OUTLIER}")):
        torch.manual_seed(0)
        x, weight, w_codes, w_scale, _ = _linear_inputs(m, k, n, threshold, torch.device("cpu"), FP32)
        x = x.detach()
        exact = x @ weight.T
        bnb = _Linear8bitLt(weight, 6.0)
        with torch.no_grad():
            cells = [_relative(fn(x, weight, w_codes, w_scale, bnb), exact) for fn in methods.values()]
            cells.append(_relative(F.linear(x.bfloat16(), weight.bfloat16()), exact))
        rows.append([f"x {m}x{k}: {label}", *cells])
    return [f"activations (W {n}x{k})", *methods, "bf16 linear"], rows


SHOWCASE = [
    Showcase("int8_matmul", "Weight memory: an Int8Linear (int8 codes + fp32 row scales) against the nn.Linear it "
                            "replaces", _memory_table),
    Showcase("int8_matmul", "Output error against exact fp32 (relative Frobenius)", _error_table),
]


@pytest.mark.parametrize(("case", "provider", "mode"), pytest_params(CASES))
def test_int8_matmul(benchmark, case, provider, mode):
    run_benchmark(benchmark, case, provider, mode)
