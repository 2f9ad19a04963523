"""KDE attention against FlashAttention by a roofline ESTIMATE (not a measurement), and the plan's measured cost.

    .venv/bin/python -m bench.kde_roofline            # the table at 32K and 128K, B 1, H 32, d 64, bf16

Measured here, on CPU (the plan is the same torch code on every device):
- the plan's operation count (every aten op make_plan dispatches, counted with a TorchDispatchMode) and the bytes
  those ops read and write (inputs plus outputs of each op), at reduced heads and scaled linearly to H;
- with --memory, the plan's peak memory: the high-water RSS of a fresh process above its inputs, at reduced heads,
  scaled linearly to H.
Counted from shapes: FLOPs and bytes of the kernels (each query tile of 128 reads its b + m keys and values once per
pass; the backward adds the sampled keys' dk, dv into the fp32 accumulators with atomics, a read and a write of a
row per slot) and their buffers.

The estimate: time = max(FLOPs / peak, bytes / bandwidth) for each kernel, on H100 SXM datasheet peaks (989 TFLOP/s
bf16 dense, 3.35 TB/s), plus LAUNCH_US per eager plan operation; FlashAttention at the same peaks with its exact
FLOPs (4 B H N^2 D forward, 3.5x with the backward, halved when causal). Both run at the roofline, so the ratio is
the ideal one; real kernels reach different fractions of it. The plan is built again in the backward.
"""

import argparse
import functools
import math
import multiprocessing
import resource

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from torchext.reference import kde_attention as ref

FLOP_PEAK, BANDWIDTH = 989e12, 3.35e12  # H100 SXM5, bf16 dense, HBM3
LAUNCH_US = 4.0  # host cost of one eager CUDA operation (assumed)
TILE = ref.QUERY_TILE
SHAPE = dict(B=1, H=32, D=64)
PLAN_HEADS = 2  # heads the plan is measured at (it scales linearly in B H)


class _Counter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops, self.bytes = 0, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.ops += 1
        tensors = [x for x in (*args, *(kwargs or {}).values(), *(out if isinstance(out, (tuple, list)) else (out,)))
                   if isinstance(x, torch.Tensor)]
        self.bytes += sum(x.numel() * x.element_size() for x in tensors)
        return out


def _inputs(n: int, heads: int, d: int):
    g = torch.Generator().manual_seed(0)
    return tuple(torch.randn(1, heads, n, d, generator=g, dtype=torch.bfloat16) for _ in range(3))


def _params(n: int, causal: bool) -> dict:
    from torchext.ops._kde_attention import DEFAULT_EXACT_WINDOW
    return dict(causal=causal, bucket_size=256, num_samples=256, num_hash_bits=ref.default_hash_bits(n, 256),
                exact_window=DEFAULT_EXACT_WINDOW)


@functools.lru_cache(maxsize=None)
def plan_cost(n: int, causal: bool) -> tuple[int, float]:
    """(aten operations, bytes they read and write, scaled to SHAPE's heads) of one make_plan."""
    q, k, v = _inputs(n, PLAN_HEADS, SHAPE["D"])
    with _Counter() as counter:
        ref.make_plan(q, k, v, 0, **_params(n, causal))
    return counter.ops, counter.bytes * SHAPE["H"] / PLAN_HEADS


def _plan_peak(n: int, causal: bool, result) -> None:
    q, k, v = _inputs(n, PLAN_HEADS, SHAPE["D"])
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    ref.make_plan(q, k, v, 0, **_params(n, causal))
    result.put((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024)


def plan_peak_bytes(n: int, causal: bool) -> float:
    """Peak memory of one make_plan above its inputs (RSS high-water mark of a fresh process), scaled to SHAPE's
    heads."""
    context = multiprocessing.get_context("spawn")
    result = context.Queue()
    process = context.Process(target=_plan_peak, args=(n, causal, result))
    process.start()
    peak = result.get()
    process.join()
    return peak * SHAPE["H"] / PLAN_HEADS


def _levels(n: int, causal: bool) -> int:
    window = _params(n, causal)["exact_window"]
    return max(0, math.ceil(math.log2(n / window))) if causal else 1


def kernel_cost(n: int, causal: bool, backward: bool) -> tuple[float, float, float]:
    """(FLOPs, bytes, buffer bytes) of the KDE kernels for SHAPE, bf16 operands, fp32 accumulators."""
    B, H, D = SHAPE["B"], SHAPE["H"], SHAPE["D"]
    b = m = 256
    window = _params(n, causal)["exact_window"]
    levels = _levels(n, causal)
    # Key columns per query: causal, half a window on average plus b + m at every level for the half of the queries
    # in odd chunks; non-causal b + m.
    columns = (window / 2 + 0.5 * levels * (b + m)) if causal else b + m
    flops = 4 * B * H * n * columns * D
    kv_bytes = B * H * (n / TILE) * columns * 2 * D * 2  # each tile reads its columns' k and v rows once
    io_bytes = B * H * n * D * 2 * 4  # q, k, v in, out
    buffers = B * H * n * D * 4 + B * H * n * 4  # fp32 output state of several launches, lse
    if not backward:
        return flops, kv_bytes + io_bytes, buffers
    tiles = n / TILE + n / b  # per level, plus the partly filled tile of every block
    slot_bytes = B * H * levels * tiles * m * 2 * D * 4 * 2  # the atomic adds: read and write a dk, dv row per slot
    buffers += 3 * B * H * n * D * 4 + B * H * n * 4  # dq, dk, dv accumulators, delta
    return 3.5 * flops, 3 * kv_bytes + 3 * io_bytes + slot_bytes, buffers


def flash_cost(n: int, causal: bool, backward: bool) -> tuple[float, float]:
    """(FLOPs, extra memory bytes) of FlashAttention for SHAPE: out and lse, and with the backward dq (fp32
    accumulator and bf16), dk, dv and delta."""
    B, H, D = SHAPE["B"], SHAPE["H"], SHAPE["D"]
    flops = 4 * B * H * n * n * D / (2 if causal else 1) * (3.5 if backward else 1)
    memory = B * H * n * (D * 2 + 4) + (B * H * n * (D * 4 + 3 * D * 2 + 4) if backward else 0)
    return flops, memory


def estimate(n: int, causal: bool, backward: bool) -> dict:
    """The roofline estimate of one configuration (times in ms)."""
    ops, plan_bytes = plan_cost(n, causal)
    passes = 2 if backward else 1  # the backward rebuilds the plan
    plan_ms = passes * (ops * LAUNCH_US * 1e-3 + plan_bytes / BANDWIDTH * 1e3)
    flops, kbytes, buffers = kernel_cost(n, causal, backward)
    kernel_ms = max(flops / FLOP_PEAK, kbytes / BANDWIDTH) * 1e3
    fa_flops, fa_memory = flash_cost(n, causal, backward)
    fa_ms = fa_flops / FLOP_PEAK * 1e3
    return dict(n=n, causal=causal, backward=backward, plan_ops=ops, plan_ms=plan_ms, kernel_ms=kernel_ms,
                kde_ms=plan_ms + kernel_ms, flash_ms=fa_ms, speedup=fa_ms / (plan_ms + kernel_ms),
                kernel_buffers=buffers, flash_memory=fa_memory)


METHOD = (f"roofline ESTIMATE, not measured: H100 SXM peaks ({FLOP_PEAK / 1e12:.0f} TFLOP/s, "
          f"{BANDWIDTH / 1e12:.2f} TB/s), {LAUNCH_US:g} us per eager plan op, plan op count and bytes measured on "
          f"CPU (bench/kde_roofline.py), B {SHAPE['B']} H {SHAPE['H']} D {SHAPE['D']} bf16")


def summary(causal: bool, backward: bool) -> str:
    """One line for the bench output: the estimated speed-up over FlashAttention at 32K and 128K."""
    parts = []
    for n in (32768, 131072):
        e = estimate(n, causal, backward)
        parts.append(f"{n // 1024}K {e['speedup']:.2g}x ({e['kde_ms']:.3g} ms: plan {e['plan_ops']} ops "
                     f"{e['plan_ms']:.3g} ms, kernels {e['kernel_ms']:.3g} ms; flash {e['flash_ms']:.3g} ms)")
    return f"vs FlashAttention, {METHOD}: " + ", ".join(parts)


def break_even(causal: bool, backward: bool = False) -> int:
    """The smallest power-of-two n from 1K at which the estimate says KDE attention is faster than FlashAttention."""
    n = 1024
    while estimate(n, causal, backward)["speedup"] < 1 and n < 1 << 20:
        n *= 2
    return n


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--memory", action="store_true", help="also measure the plan's peak memory (fresh processes)")
    args = p.parse_args()
    print(METHOD)
    print("| n | causal | pass | plan ops | plan ms | kernels ms | KDE ms | flash ms | speed-up |"
          + (" KDE peak extra GiB | flash extra GiB |" if args.memory else ""))
    print("|---|---|---|---|---|---|---|---|---|" + ("---|---|" if args.memory else ""))
    for n in (32768, 131072):
        for causal in (False, True):
            peak = plan_peak_bytes(n, causal) if args.memory else None
            for backward in (False, True):
                e = estimate(n, causal, backward)
                line = (f"| {n // 1024}K | {causal} | {'fwd+bwd' if backward else 'fwd'} | {e['plan_ops']} | "
                        f"{e['plan_ms']:.3g} | {e['kernel_ms']:.3g} | {e['kde_ms']:.3g} | {e['flash_ms']:.3g} | "
                        f"{e['speedup']:.2g}x |")
                if peak is not None:
                    line += f" {(peak + e['kernel_buffers']) / 2**30:.3g} | {e['flash_memory'] / 2**30:.3g} |"
                print(line, flush=True)
    for causal in (False, True):
        print(f"break-even (forward, estimate): {'causal' if causal else 'non-causal'} n >= {break_even(causal)}")


if __name__ == "__main__":
    main()
