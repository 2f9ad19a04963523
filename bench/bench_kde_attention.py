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

CPU showcase (bench/run.py without a GPU): at n = 2048, fp32, the library's defaults (b = m = 256), torchext as users
get it (exact SDPA: the estimator starts at MIN_SEQ_LEN) and the estimator itself ("kde estimator", the dense CPU
reference) against SDPA, the summary line without the GPU roofline estimate; then the estimator's error against
exact attention and against the trivial approximations that touch as many keys per query (examples/kde_quality.py's
measurement) on Gaussian and clustered data.
"""

import dataclasses
from functools import partial

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from bench import kde_roofline, sizes
from bench._harness import (Case, NotApplicable, Showcase, bench_device, cases_of, memory_line, pytest_params,
                            run_benchmark, smoke_run, time_ms)
from torchext.ops import kde_attention
from torchext.ops._kde_attention import DEFAULT_EXACT_WINDOW, MIN_SEQ_LEN, MIN_SEQ_LEN_CAUSAL
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


def _same_budget(causal: bool, params: dict) -> dict:
    """KDE attention and the trivial methods the kernels can run at its budget of b + m key columns per query: the
    LSH blocks of 2b keys with no samples ("heavy blocks") and blocks of 2b positions in the original order
    ("diagonal blocks", no hashing); causal, with exact windows of 2b (examples/kde_quality.py measures all five
    methods at exactly equal columns, on CPU)."""
    wide = 2 * params["bucket_size"]
    blocks = dict(bucket_size=wide, num_samples=0, **({"exact_window": wide} if causal else {}))
    return {"KDE attention": partial(_estimate, causal, params),
            "heavy blocks": partial(_estimate, causal, blocks),
            "diagonal blocks": partial(_estimate, causal, {**blocks, "num_hash_bits": 0})}


def _estimate(causal: bool, params: dict, q, k, v) -> torch.Tensor:
    """The estimator's output: the kernels on CUDA; on CPU the reference with the same plan (the same numbers,
    without the interpreter's seconds per call in the smoke runs)."""
    if q.is_cuda:
        return kde_attention(q, k, v, causal=causal, seed=SEED, min_seq_len=0, **params)
    params = {"exact_window": DEFAULT_EXACT_WINDOW, **params}
    params["num_hash_bits"] = params.get("num_hash_bits", ref.default_hash_bits(q.shape[2], params["bucket_size"]))
    return ref.kde_attention(q, k, v, ref.make_plan(q, k, v, SEED, causal, **params))[0]


def _spectral_error(out: torch.Tensor, exact: torch.Tensor) -> tuple[float, torch.Tensor]:
    """(the largest over heads of ||out - exact||_2 / ||exact||_2, the error) of [B, H, N, D] outputs."""
    error = out.float() - exact
    return (torch.linalg.matrix_norm(error, ord=2) / torch.linalg.matrix_norm(exact, ord=2)).max().item(), error


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
        exact = F.scaled_dot_product_attention(q, k, v, is_causal=causal).float()
        errors = {name: _spectral_error(estimate(q, k, v), exact) for name, estimate in
                  _same_budget(causal, params).items()}
        kde_error, kde_difference = errors.pop("KDE attention")
        by_v = (torch.linalg.matrix_norm(kde_difference, ord=2) / torch.linalg.matrix_norm(v.float(), ord=2)).max()
    best = min(errors, key=lambda name: errors[name][0])
    parts.append(f"spectral error {kde_error:.3g} of ||O||, {by_v.item():.3g} of ||V||; best trivial method at the "
                 f"same keys per query: {best} {errors[best][0]:.3g} of ||O||")
    estimator = next((p for p in ("kde kernel", "kde estimator") if p in ms), None)
    if mode == "fwd" and estimator:
        plan_params = {"exact_window": DEFAULT_EXACT_WINDOW, **params}
        plan_ms = time_ms(lambda: ref.make_plan(q, k, v, SEED, causal, **plan_params), device)
        parts.append(f"hash+sort+sample {plan_ms:.3g} ms = {100 * plan_ms / ms[estimator]:.0f}% of the "
                     f"{estimator}'s forward")
    if device.type == "cpu" and not smoke_run(device):
        parts.append(f"torchext runs exact SDPA below {MIN_SEQ_LEN_CAUSAL if causal else MIN_SEQ_LEN} tokens, the "
                     f"kde estimator is its CPU reference")
    if not smoke_run(device):
        parts.append(memory_line(case, mode, ("torchext", "eager", *case.extra_providers)))
    if device.type == "cuda" or smoke_run(device):  # an H100 estimate: not for the CPU showcase
        parts.append(kde_roofline.summary(causal, mode == "fwd+bwd"))
    return "; ".join(parts)


def _case(B, H, n, D, causal, mode, gpu, dtype=BF16, sampling="uniform", cpu_showcase=False, estimator=True):
    """cpu_showcase: the library's default parameters and, as the only anchor, the estimator (the CPU reference).
    estimator=False leaves the "kde kernel" anchor out."""
    params = {**(GPU_PARAMS if gpu or cpu_showcase else CPU_PARAMS), "sampling": sampling}
    kde = partial(_torchext, causal, {**params, "min_seq_len": 0})
    anchors = {"sdpa flash": partial(_sdpa, causal, backend=SDPBackend.FLASH_ATTENTION),
               "sdpa efficient": partial(_sdpa, causal, backend=SDPBackend.EFFICIENT_ATTENTION),
               "flash-attn": partial(_flash_attn, causal),
               **({"kde kernel": kde} if estimator else {})}
    if cpu_showcase:
        anchors = {"kde estimator": kde}
    shape = f"B{B}-H{H}-N{n}-D{D}" + ("" if sampling == "uniform" else f"-{sampling}")
    case = Case("kde_attention", "kde_attention" + ("_causal" if causal else ""), shape, dtype,
                partial(_inputs, B, H, n, D), partial(_torchext, causal, params), partial(_sdpa, causal),
                partial(_sdpa, causal), modes=(mode,), count_bytes=False, gpu=gpu, extra_providers=anchors,
                flops={mode: (4 if mode == "fwd" else 14) * B * H * n * n * D // (2 if causal else 1)}, rep_ms=500)
    return dataclasses.replace(case, summary=partial(_summary, case, causal, params))


KINDS = {"kde": _case}

CASES = [
    # CPU smoke sizes: the exact fallback (torchext, short N) in every case; the estimator (min_seq_len 0 in "kde
    # kernel": tens of seconds each under the interpreter, and tests/test_kde_attention.py checks the kernels) in the
    # two that cover its forward and its causal backward.
    *(_case(1, 2, 200, 32, causal, mode, gpu=False, dtype=torch.float32,
            estimator=(causal, mode) in ((False, "fwd"), (True, "fwd+bwd")))
      for causal in (False, True) for mode in ("fwd", "fwd+bwd")),
    *cases_of(sizes.KDE_ATTENTION, KINDS),  # GPU sizes
]

CPU_CASES = [_case(1, 4, 2048, 64, False, "fwd", gpu=False, dtype=torch.float32, cpu_showcase=True)]


def _quality_table(n=2048, seed=0):
    """Relative Frobenius error (and cosine) against exact fp64 attention of KDE attention and of the trivial
    methods at the same number of key columns per query, per data set (examples/kde_quality.measure)."""
    from examples import kde_quality  # imports transformers (through kv_quality): only here

    datasets = {"Gaussian d 64": kde_quality.gaussian(n, 64, 1.0, seed),
                "Gaussian d 64, temperature 4": kde_quality.gaussian(n, 64, 4.0, seed),
                "clustered d 64": kde_quality.clustered(n, 64, seed)}
    rows = []
    for name, (q, k, v) in datasets.items():
        result = kde_quality.measure(q, k, v, False, seed)
        best = min(kde_quality.METHODS[1:], key=lambda m: result[m][1])
        rows.append([f"{name}, n {n}", f"{result['budget'][0]:.0f}",
                     *(f"{result[m][1]:.3f} ({result[m][0]:.3f})" for m in kde_quality.METHODS), best])
    return ["data", "keys/query", *kde_quality.METHODS, "best trivial"], rows


SHOWCASE = [Showcase("kde_attention", "Relative error against exact attention (cosine in brackets), every method "
                                      "touching as many keys per query (non-causal, fp64)", _quality_table)]


@pytest.mark.parametrize(("case", "provider", "mode"), pytest_params(CASES))
def test_kde_attention(benchmark, case, provider, mode):
    run_benchmark(benchmark, case, provider, mode)
