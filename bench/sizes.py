"""The GPU problem sizes of every family: the one table that the benchmarks (bench/bench_<family>.py), the offline
compile check (bench/offline.py) and the bounded GPU command (./dev gpu, bench/gpu.py) read, so they cannot drift.

Each `Size` names a case kind of its family's bench module (the module's KINDS maps it to the constructor of one or
more `Case`s) and the keyword arguments of that constructor. A size may carry the README's targets: ./dev gpu
measures those sizes first and reports each target as met or missed. Sizes marked `compile` are the ones the
offline compile check records and compiles for sm_80 and sm_90: every regime a launcher tells apart (decode and
prefill, causal and not, head dims, row lengths past the register limit, bf16 / fp16 / fp32). Recording runs the
op on the CPU, so `capture` may shrink dimensions that only change the grid (batch, heads) to keep that cheap; the
kernels' configurations and specialisations stay those of the full size.
"""

import dataclasses
from typing import Any

import torch

BF16, FP16, FP32 = torch.bfloat16, torch.float16, torch.float32


@dataclasses.dataclass(frozen=True)
class Target:
    """A performance target, as the README states it, read off the rows of the size's cases.

    metric:
        "speedup"       the fastest of `baselines` / torchext (higher is better)
        "ratio"         torchext / the fastest of `baselines` (lower is better)
        "pct_peak"      torchext's share of the datasheet peak: HBM for byte-counted rows, else the case's FLOP peak
        "tflops"        torchext's TFLOP/s in `mode`
        "bwd_tflops"    the backward's TFLOP/s: (FLOPs fwd+bwd - fwd) / (ms fwd+bwd - fwd)
        "ms"            torchext's milliseconds (lower is better)
    """

    text: str
    metric: str
    threshold: float
    mode: str = "fwd"
    baselines: tuple[str, ...] = ()
    case: str | None = None  # the op of the case it reads, where a size makes several (e.g. "int8_linear_t0")

    @property
    def higher_is_better(self) -> bool:
        return self.metric not in ("ratio", "ms")

    def met(self, value: float) -> bool:
        return value >= self.threshold if self.higher_is_better else value <= self.threshold


@dataclasses.dataclass(frozen=True)
class Size:
    family: str
    kind: str
    dims: dict[str, Any]
    targets: tuple[Target, ...] = ()
    compile: bool = False
    capture: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def label(self) -> str:
        return f"{self.family} {self.kind} " + " ".join(f"{k}={_short(v)}" for k, v in self.dims.items())

    def for_capture(self) -> "Size":
        """The size the compile check records launches at: `capture` overrides dims that change only the grid."""
        return dataclasses.replace(self, dims={**self.dims, **self.capture})


def _short(value) -> str:
    return {BF16: "bf16", FP16: "fp16", FP32: "fp32"}.get(value, str(value))


def _sizes(family: str, *entries: tuple) -> list[Size]:
    """Size(family, kind, dims, **options) for each (kind, dims[, options]) entry."""
    return [Size(family, kind, dims, **(options[0] if options else {})) for kind, dims, *options in entries]


def _pct_hbm(mode: str, pct: float) -> Target:
    return Target(f"{mode} >= {pct:g}% of HBM bandwidth", "pct_peak", pct, mode)


TRAIN = "train"  # nGPT's training-step model (bench_ngpt.TRAIN_MODEL)

NGPT = _sizes(
    "ngpt",
    ("l2_normalize", dict(n=16384, d=1024), dict(compile=True)),
    ("l2_normalize", dict(n=16384, d=4096), dict(compile=True)),
    ("l2_normalize", dict(n=16384, d=1024, dtype=FP32), dict(compile=True)),
    ("l2_normalize", dict(n=2048, d=32768), dict(compile=True)),  # past the register limit: split rows
    ("hypersphere_update", dict(n=16384, d=1024), dict(compile=True)),
    ("hypersphere_update", dict(n=16384, d=4096),
     dict(targets=(_pct_hbm("fwd", 80), _pct_hbm("fwd+bwd", 80)), compile=True)),
    ("hypersphere_update", dict(n=16384, d=4096, dtype=FP16), dict(compile=True)),
    ("hypersphere_update", dict(n=4096, d=1024, dtype=FP32), dict(compile=True)),
    ("hypersphere_update", dict(n=2048, d=32768), dict(compile=True)),
    ("qk_norm_rope", dict(B=8, T=2048, H=16, D=64), dict(compile=True)),
    ("qk_norm_rope", dict(B=4, T=1024, H=16, D=128, dtype=FP32), dict(compile=True)),
    ("scaled_swiglu", dict(n=16384, d_mlp=4096, d_model=1024), dict(compile=True)),
    ("scaled_swiglu", dict(n=4096, d_mlp=4096, d_model=1024, dtype=FP32), dict(compile=True)),
    ("renormalize", dict(model=TRAIN)),
    ("train_step", dict(), dict(targets=(Target("an nGPT step <= 1.15x the GPT step", "ratio", 1.15, "step",
                                                ("eager",)),))),
)

LLAMA3_8B_LINEARS = ((4096, 4096), (4096, 14336), (14336, 4096))  # (K, N)
_INT8_TARGETS = {
    2048: (Target("threshold 0 >= 1.6x bf16 at M >= 2048", "speedup", 1.6, baselines=("eager",), case="int8_linear_t0"),
           Target("threshold 6 <= 1.10x pure int8", "ratio", 1.10, baselines=("int8 t0",), case="int8_linear_t6")),
    16: (Target("threshold 0 >= 1.3x bf16 at M <= 16", "speedup", 1.3, baselines=("eager",), case="int8_linear_t0"),),
}
INT8_MATMUL = [
    *(Size("int8_matmul", "int8_linear_pair", dict(m=m, k=k, n=n),
           targets=_INT8_TARGETS.get(m, ()) if (k, n) == (4096, 14336) else (),
           compile=(k, n) == (4096, 14336) and m in (1, 16, 64, 2048))
      for k, n in LLAMA3_8B_LINEARS for m in (1, 16, 64, 256, 2048, 8192)),
    *_sizes("int8_matmul",
            ("int8_linear", dict(m=2048, k=4096, n=14336, threshold=0.0, mode="fwd+bwd"), dict(compile=True)),
            ("int8_linear", dict(m=2048, k=4096, n=4096, threshold=6.0, dtype=FP16), dict(compile=True)),
            ("int8_linear", dict(m=16, k=4096, n=4096, threshold=6.0, dtype=FP32), dict(compile=True)),
            ("int8_linear_static", dict(m=2048, k=4096, n=14336), dict(compile=True)),
            ("int8_linear_static", dict(m=1, k=4096, n=14336), dict(compile=True))),
]

KV_QUANT = _sizes(
    "kv_quant",
    ("decode", dict(batch=1, context=4096, key_bits=4, value_bits=4),
     dict(targets=(Target("4-bit never slower than fp16 at 4K", "speedup", 1.0,
                          baselines=("sdpa fp16", "flash fp16")),), compile=True)),
    ("decode", dict(batch=1, context=4096, key_bits=3, value_bits=3)),
    ("decode", dict(batch=1, context=4096, key_bits=2, value_bits=2)),
    ("decode", dict(batch=1, context=16384, key_bits=4, value_bits=4),
     dict(targets=(Target("4-bit >= 2.5x fp16 SDPA at 16K", "speedup", 2.5, baselines=("sdpa fp16", "flash fp16")),),
          compile=True)),
    ("decode", dict(batch=1, context=16384, key_bits=3, value_bits=3), dict(compile=True)),
    ("decode", dict(batch=1, context=16384, key_bits=2, value_bits=2),
     dict(targets=(Target("2-bit >= 4x fp16 SDPA at 16K", "speedup", 4.0, baselines=("sdpa fp16", "flash fp16")),),
          compile=True)),
    ("decode", dict(batch=1, context=65536, key_bits=4, value_bits=4)),
    ("decode", dict(batch=1, context=131072, key_bits=4, value_bits=4)),
    ("decode", dict(batch=1, context=131072, key_bits=2, value_bits=2)),
    ("decode", dict(batch=8, context=16384, key_bits=4, value_bits=4)),
    ("decode", dict(batch=32, context=4096, key_bits=4, value_bits=4),
     dict(compile=True, capture=dict(batch=2))),
    ("decode", dict(batch=32, context=16384, key_bits=4, value_bits=4)),
    ("decode", dict(batch=8, context=16384, key_bits=2, value_bits=2)),
    ("decode", dict(batch=1, context=4096, key_bits=4, value_bits=4, dtype=BF16), dict(compile=True)),
    ("decode", dict(batch=1, context=4096, key_bits=4, value_bits=4, head_dim=64), dict(compile=True)),
    ("decode", dict(batch=1, context=16384, key_bits=4, value_bits=4, key_group=32),  # the KIVI mode
     dict(compile=True)),
)

_HALF_THE_HEADS = dict(H=16)  # 32 -> 16: the same specialisation (a multiple of 16), half the plan to build on the CPU
# Causal 32K -> 8K: the same kernels and specialisations (windows, then levels of 2048 and 4096 tokens: a level with
# several pieces and one with a single piece, as at 32K), a quarter of the sequence and half the levels to plan on
# the CPU. Recording every compile size took 554 s at 32K and 155 s with this; the table came out the same.
_CAUSAL_8K = dict(n=8192)
_KDE_TARGETS = {
    (32768, False): Target(">= 4x SDPA flash at 32K", "speedup", 4.0, baselines=("sdpa flash",)),
    (131072, False): Target(">= 10x SDPA flash at 128K", "speedup", 10.0, baselines=("sdpa flash",)),
    (65536, True): Target("causal >= 2x SDPA flash at 64K", "speedup", 2.0, baselines=("sdpa flash",)),
}
KDE_ATTENTION = [
    Size("kde_attention", "kde", dict(B=B, H=H, n=n, D=D, causal=causal, mode=mode),
         targets=((_KDE_TARGETS[n, causal],)
                  if (B, H, D) == (1, 32, 64) and mode == "fwd" and (n, causal) in _KDE_TARGETS else ()),
         compile=(B, H, n) in ((1, 32, 32768), (4, 8, 32768)) and mode == "fwd+bwd",
         capture={**(_HALF_THE_HEADS if H == 32 else {}), **(_CAUSAL_8K if causal else {})})
    for B, H, D in ((1, 32, 64), (1, 32, 128), (4, 8, 128))
    for n in (1024, 2048, 4096, 8192, 12000, 16384, 32768, 65536, 131072)
    for causal in (False, True) for mode in ("fwd", "fwd+bwd")
] + _sizes("kde_attention",
           ("kde", dict(B=1, H=8, n=32768, D=64, causal=True, mode="fwd+bwd", dtype=FP16),
            dict(compile=True, capture=_CAUSAL_8K)),
           ("kde", dict(B=1, H=8, n=8192, D=32, causal=True, mode="fwd+bwd", dtype=FP32),
            dict(compile=True)),
           # value-norm sampling: its dq kernel also reduces dS per sample slot (the weights' gradient to v)
           *(("kde", dict(B=1, H=8, n=32768, D=D, causal=False, mode="fwd+bwd", sampling="value_norm"),
              dict(compile=True)) for D in (64, 128)))

KRONECKER_ATTENTION = [
    *(Size("kronecker_attention", "kao", dict(mode=mode, shape=(8, 128, side, side), heads=2, bench_mode=bench_mode),
           targets=(Target("QKV >= 50x SDPA over the flattened tokens at 128x128", "speedup", 50.0, "fwd",
                           ("sdpa flat",)), _pct_hbm("fwd", 70)) if (mode, side, bench_mode) == ("qkv", 128, "fwd")
           else (),
           compile=bench_mode == "fwd+bwd")
      for side in (32, 64, 128) for mode in ("kv", "qkv") for bench_mode in ("fwd", "fwd+bwd")),
    *(Size("kronecker_attention", "kao", dict(mode=mode, shape=(2, 128, 16, 32, 32), heads=2, bench_mode=bench_mode),
           compile=bench_mode == "fwd+bwd")
      for mode in ("kv", "qkv") for bench_mode in ("fwd", "fwd+bwd")),
    *_sizes("kronecker_attention",
            ("kao", dict(mode="qkv", shape=(1, 64, 256, 256), heads=1, bench_mode="fwd+bwd"), dict(compile=True)),
            ("kao", dict(mode="kv", shape=(1, 64, 256, 256), heads=1, bench_mode="fwd+bwd", dtype=FP32),
             dict(compile=True)),
            ("kao", dict(mode="kv", shape=(2, 128, 64, 64), heads=2, bench_mode="fwd+bwd", dtype=FP32),
             dict(compile=True)),
            ("kao", dict(mode="qkv", shape=(2, 128, 64, 64), heads=2, bench_mode="fwd+bwd", dtype=FP16),
             dict(compile=True))),
]

_TENSOR_TARGETS = (Target("forward >= 300 TFLOP/s", "tflops", 300.0, "fwd"),
                   Target("backward >= 150 TFLOP/s", "bwd_tflops", 150.0, "fwd+bwd"))
TENSOR_ATTENTION = _sizes(
    "tensor_attention",
    *(("tensor", dict(B=1, H=8, Hkv=1, n=n, d=128, window=(512, 32)),
       dict(targets=_TENSOR_TARGETS if n == 16384 else (), compile=n == 16384)) for n in (4096, 8192, 16384, 32768)),
    ("tensor", dict(B=1, H=8, Hkv=1, n=16384, d=64, window=(512, 32)), dict(compile=True)),
    ("tensor", dict(B=1, H=8, Hkv=1, n=16384, d=128, window=(32, 512)), dict(compile=True)),
    ("tensor", dict(B=1, H=8, Hkv=8, n=1024, d=128, window=None), dict(compile=True)),
    ("tensor", dict(B=1, H=8, Hkv=1, n=4096, d=128, window=(512, 32), dtype=FP16), dict(compile=True)),
    ("tensor", dict(B=1, H=8, Hkv=1, n=4096, d=128, window=(512, 32), dtype=FP32), dict(compile=True)),
)

RESNET18 = "resnet18"  # every conv of the CIFAR ResNet-18 together (bench_gram_iteration.RESNET18_CIFAR)
GRAM_ITERATION = _sizes(
    "gram_iteration",
    ("conv_each", dict(network=RESNET18)),
    ("network", dict(network=RESNET18),
     dict(targets=(Target("all ResNet-18 CIFAR convs bounded in < 2 ms", "ms", 2.0, case="conv_spectral_norm_T6"),
                   Target(">= 10x faster than FFT + SVD", "speedup", 10.0, baselines=("eager",),
                          case="conv_spectral_norm_T6")))),
    ("dense", dict(rows=500, cols=400)),
    ("dense", dict(rows=4096, cols=4096)),
    ("dense", dict(rows=64, cols=64, batch=256)),
)

TABLE: dict[str, list[Size]] = {
    "ngpt": NGPT, "int8_matmul": INT8_MATMUL, "gram_iteration": GRAM_ITERATION, "kv_quant": KV_QUANT,
    "kde_attention": KDE_ATTENTION, "kronecker_attention": KRONECKER_ATTENTION, "tensor_attention": TENSOR_ATTENTION,
}


def of(family: str) -> list[Size]:
    return TABLE[family]
