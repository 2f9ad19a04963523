"""Gram-iteration spectral-norm bounds against the exact norm and the usual estimators.

    .venv/bin/python bench/run.py --family gram_iteration                          # the table, JSON and PNG
    .venv/bin/python -m pytest bench/bench_gram_iteration.py -m gpu                 # pytest-benchmark, GPU sizes
    TRITON_INTERPRET=1 .venv/bin/python -m pytest bench/bench_gram_iteration.py --benchmark-disable -q   # CPU smoke

torchext.ops.gram_spectral_norm (dense matrices, one or a batch) and conv_spectral_norm (circular padding, the
polyphase form for stride 2) against "eager", the exact norm the plain-PyTorch way: torch.linalg.matrix_norm(ord=2),
or for a conv the FFT frequency blocks (torchext.reference.gram_iteration.conv_frequency_blocks) and
torch.linalg.svdvals. Shapes: every conv of the CIFAR ResNet-18 at its input size, all 20 together (one bound per
layer, as lipschitz_penalty computes them), and dense 500x400, 4096x4096 and 256 x 64x64, in fp32. The ops
(T = n_iter) run at T = 6 forward and fwd+bwd with every anchor, and at T = 7 forward against exact only.

Anchors:
- power_it1, power_it100: power iteration on the true operator, x <- A^T A x / ||.|| (for a conv, conv2d on a
  circularly padded input of the layer's size and conv_transpose2d), then ||A x||: a lower estimate. Its
  gradient flows through the last product only, as in spectral normalization.
- torch_sn: the sigma torch.nn.utils.parametrizations.spectral_norm divides by, ||W|| / ||sn(W)|| around one
  training-mode forward of its parametrization (15 power steps at registration, then 1 per forward). For a conv
  that is the norm of the reshaped [c_out, c_in k k] matrix, not of the operator (pytorch#99149); n/a for a batch.
torch.compile is n/a: the exact norm is cuFFT + cuSOLVER calls that inductor leaves as extern kernels, with
nothing between them to fuse. No rate columns: the products are IEEE fp32 (no tensor-core peak applies).

Every weight is scaled to exact operator norm 1 (fp64), so the error columns, against the fp64 exact norm, read
as relative errors (in fwd+bwd also of the weight gradient against the exact norm's). A forward case's summary
line gives each provider's signed relative error (the worst layer or matrix): bounds sit above 0, estimates below.

GPU targets (issue, H100): all ResNet-18 CIFAR convs bounded together in < 2 ms forward, relative error <= 1e-3
against exact at n_iter 6-7, >= 10x faster than FFT + SVD.

CPU showcase (bench/run.py without a GPU): the reference path at T = 6 on a CIFAR ResNet's first-stage conv (64
channels, 3x3, 32x32) forward, and on a dense 1024x1024 matrix forward and forward + backward (the cost of the bound
as a training-time penalty), with every anchor; each forward case's summary line gives every provider's error
against the exact norm.
"""

import dataclasses
from functools import cache, cached_property, partial
from typing import ClassVar

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.parametrizations import spectral_norm

from bench import sizes
from bench._harness import Case, NotApplicable, cases_of, pytest_params, run_benchmark
from torchext import ops
from torchext.reference import gram_iteration as ref

GramCase = partial(Case, "gram_iteration")
FP32 = torch.float32
DEFAULT_N_ITER, MORE_N_ITER = 6, 7
POWER_STEPS = (1, 100)


# ---- the operators --------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Dense:
    """x -> W x for W [rows, cols], or for each matrix of a [batch, rows, cols] stack."""

    rows: int
    cols: int
    batch: int = 0  # 0: one matrix
    op: ClassVar[str] = "gram_spectral_norm"
    vector_ndim: ClassVar[int] = 2  # power-iteration vectors are [*batch, cols, 1]

    @property
    def label(self) -> str:
        return (f"{self.batch}x" if self.batch else "") + f"{self.rows}x{self.cols}"

    @property
    def _batch_shape(self) -> tuple[int, ...]:
        return (self.batch,) if self.batch else ()

    @property
    def weight_shape(self) -> tuple[int, ...]:
        return (*self._batch_shape, self.rows, self.cols)

    @property
    def vector_shape(self) -> tuple[int, ...]:
        return (*self._batch_shape, self.cols, 1)

    def apply(self, w: Tensor, x: Tensor) -> Tensor:
        return w @ x

    def adjoint(self, w: Tensor, y: Tensor) -> Tensor:
        return w.mT @ y

    def exact(self, w: Tensor) -> Tensor:
        return torch.linalg.matrix_norm(w, ord=2)

    def bound(self, w: Tensor, n_iter: int) -> Tensor:
        return ops.gram_spectral_norm(w, n_iter)


@dataclasses.dataclass(frozen=True)
class Conv:
    """A bias-free Conv2d with circular 'same' padding (k // 2) on a c_in x n x n input."""

    c_in: int
    c_out: int
    k: int
    n: int
    stride: int = 1
    batch: ClassVar[int] = 0  # always one operator
    op: ClassVar[str] = "conv_spectral_norm"
    vector_ndim: ClassVar[int] = 4  # power-iteration vectors are inputs [1, c_in, n, n]

    @property
    def label(self) -> str:
        return f"{self.c_out}x{self.c_in}x{self.k}x{self.k}-s{self.stride}-n{self.n}"

    @property
    def weight_shape(self) -> tuple[int, ...]:
        return self.c_out, self.c_in, self.k, self.k

    @property
    def vector_shape(self) -> tuple[int, ...]:
        return 1, self.c_in, self.n, self.n

    def apply(self, w: Tensor, x: Tensor) -> Tensor:
        return F.conv2d(F.pad(x, [self.k // 2] * 4, mode="circular"), w, stride=self.stride)

    def adjoint(self, w: Tensor, y: Tensor) -> Tensor:
        """conv_transpose2d back to the padded size, then the padding's adjoint: each wrapped row and column is
        added onto the one it copied."""
        p, padded = self.k // 2, self.n + self.k // 2 * 2
        output_padding = padded - ((y.shape[-1] - 1) * self.stride + self.k)
        z = F.conv_transpose2d(y, w, stride=self.stride, output_padding=output_padding)
        source = torch.arange(-p, self.n + p, device=y.device) % self.n
        z = z.new_zeros(*z.shape[:-1], self.n).index_add_(-1, source, z)
        return z.new_zeros(*z.shape[:-2], self.n, self.n).index_add_(-2, source, z)

    def exact(self, w: Tensor) -> Tensor:
        blocks = ref.conv_frequency_blocks(w, (self.n, self.n), "circular", self.stride)
        return torch.linalg.svdvals(blocks).amax()

    def bound(self, w: Tensor, n_iter: int) -> Tensor:
        return ops.conv_spectral_norm(w, self.n, "circular", self.stride, n_iter=n_iter)


# Every conv of the CIFAR ResNet-18 (3x3 stem, BasicBlocks, 1x1 stride-2 shortcuts) at its input size, in order.
RESNET18_CIFAR = (
    Conv(3, 64, 3, 32),
    *[Conv(64, 64, 3, 32)] * 4,
    Conv(64, 128, 3, 32, 2), Conv(128, 128, 3, 16), Conv(64, 128, 1, 32, 2), *[Conv(128, 128, 3, 16)] * 2,
    Conv(128, 256, 3, 16, 2), Conv(256, 256, 3, 8), Conv(128, 256, 1, 16, 2), *[Conv(256, 256, 3, 8)] * 2,
    Conv(256, 512, 3, 8, 2), Conv(512, 512, 3, 4), Conv(256, 512, 1, 8, 2), *[Conv(512, 512, 3, 4)] * 2,
)
TINY_CONVS = (Conv(3, 8, 3, 8), Conv(8, 16, 3, 8, 2), Conv(8, 16, 1, 8, 2), Conv(16, 16, 3, 4))  # for CPU


# ---- inputs ---------------------------------------------------------------------------------------------------------


@cache
def _unit_norm_weights(layers: tuple, device: torch.device, dtype: torch.dtype) -> list[Tensor]:
    """Gaussian weights scaled to exact (fp64) operator norm 1, each matrix of a batch on its own; computed once
    per case and device, since the exact norm of a large weight takes seconds."""
    generator = torch.Generator(device).manual_seed(0)
    weights = []
    for layer in layers:
        w = torch.randn(layer.weight_shape, generator=generator, device=device, dtype=torch.float64)
        norm = layer.exact(w)
        weights.append((w / norm.reshape(*norm.shape, 1, 1)).to(dtype))
    return weights


class _TorchSpectralNorms:
    """torch's spectral_norm parametrization of each weight, registered on its first use (the torch_sn provider's
    first, untimed call), so only that provider pays for it."""

    def __init__(self, weights: list[Tensor]):
        self.weights = weights

    @cached_property
    def parametrizations(self) -> list[nn.Module]:
        return [_spectral_norm_of(w) for w in self.weights]


def _spectral_norm_of(weight: Tensor) -> nn.Module:
    holder = nn.Module()
    holder.weight = nn.Parameter(weight.detach().clone())
    return spectral_norm(holder).parametrizations.weight[0]  # in training mode: one power step per call


def _inputs(layers, device, dtype):
    """(weights with gradients, power-iteration start vectors, torch's spectral_norm parametrizations)."""
    weights = [w.clone().requires_grad_() for w in _unit_norm_weights(layers, device, dtype)]
    starts = [torch.randn(layer.vector_shape, device=device, dtype=dtype) for layer in layers]
    return weights, starts, _TorchSpectralNorms(weights)


# ---- providers: each returns one value per layer (per matrix of a batch), concatenated ---------------------------


def _flat(values) -> Tensor:
    return torch.cat([v.reshape(-1) for v in values])


def _torchext(layers, n_iter, weights, starts, sns):
    return _flat(layer.bound(w, n_iter) for layer, w in zip(layers, weights))


def _exact(layers, weights, starts, sns):
    return _flat(layer.exact(w) for layer, w in zip(layers, weights))


def _exact_fp64(layers, weights, starts, sns):
    return _exact(layers, [w.double() for w in weights], starts, sns)


def _not_compiled(*args):
    raise NotApplicable("the exact norm is cuFFT + cuSOLVER calls that inductor keeps as extern kernels")


def _vector_norm(x: Tensor, ndim: int) -> Tensor:
    return torch.linalg.vector_norm(x, dim=tuple(range(-ndim, 0)), keepdim=True)


def _power_iteration(layer, w: Tensor, x: Tensor, steps: int) -> Tensor:
    """||A x|| after `steps` of x <- A^T A x / ||A^T A x||: a lower estimate, differentiable through the last A x."""
    with torch.no_grad():
        for _ in range(steps):
            x = layer.adjoint(w, layer.apply(w, x))
            x = x / _vector_norm(x, layer.vector_ndim)
    return _vector_norm(layer.apply(w, x), layer.vector_ndim)


def _power(layers, steps, weights, starts, sns):
    return _flat(_power_iteration(layer, w, x, steps) for layer, w, x in zip(layers, weights, starts))


def _torch_sn(layers, weights, starts, sns):
    if any(layer.batch for layer in layers):
        raise NotApplicable("torch's spectral_norm parametrizes one weight per module, not a batch")
    return _flat(w.norm() / sn(w).norm() for sn, w in zip(sns.parametrizations, weights))


def _anchors(layers) -> dict:
    power = {f"power_it{steps}": partial(_power, layers, steps) for steps in POWER_STEPS}
    return {**power, "torch_sn": partial(_torch_sn, layers)}


# ---- summary lines --------------------------------------------------------------------------------------------------


def _recording(values: dict, name: str, fn):
    """fn, keeping the value of its first call (the one the harness checks) in values[name]."""
    def call(*args):
        out = fn(*args)
        if name not in values:
            values[name] = out.detach()
        return out
    return call


def _worst(relative: Tensor) -> float:
    """The entry of largest magnitude, with its sign."""
    return relative[relative.abs().argmax()].item()


def _targets(ms: dict[str, float], torchext_error: float) -> str:
    if "torchext" not in ms or "eager" not in ms:
        return "; no target check (a provider failed)"
    return (f"; targets: forward {ms['torchext']:.3g} ms (< 2 ms on H100), error {torchext_error:.1e} (<= 1e-3), "
            f"{ms['eager'] / ms['torchext']:.3g}x faster than exact (>= 10x)")


def _summary(label: str, values: dict[str, Tensor], target: bool, ms: dict[str, float]) -> str:
    """Signed relative error of each provider's value against the fp64 exact norm (the worst layer or matrix)."""
    if "reference" not in values:
        return f"{label}: no errors (the exact reference failed)"
    exact = values["reference"]
    errors = {name: _worst(value.double() / exact - 1) for name, value in values.items() if name != "reference"}
    line = f"{label}: relative error vs fp64 exact: " + ", ".join(f"{name} {e:+.1e}" for name, e in errors.items())
    return line + (_targets(ms, errors.get("torchext", float("nan"))) if target else "")


# ---- cases ----------------------------------------------------------------------------------------------------------


def _case(layers, n_iter, mode, gpu, shape=None, target=False):
    """One mode per case, since a summary hook sees the times of one mode. n_iter 6 runs every anchor; a forward
    case records each provider's value for its summary line."""
    layers = tuple(layers)
    shape = shape or layers[0].label
    fns = {"torchext": partial(_torchext, layers, n_iter), "eager": partial(_exact, layers),
           "reference": partial(_exact_fp64, layers), **(_anchors(layers) if n_iter == DEFAULT_N_ITER else {})}
    summary = None
    if mode == "fwd":
        values = {}
        fns = {name: _recording(values, name, fn) for name, fn in fns.items()}
        summary = partial(_summary, f"{layers[0].op} {shape} T{n_iter}", values, target)
    return GramCase(f"{layers[0].op}_T{n_iter}", shape, FP32, partial(_inputs, layers), fns.pop("torchext"),
                    fns.pop("eager"), fns.pop("reference"), compiled=_not_compiled, modes=(mode,), count_bytes=False,
                    gpu=gpu, summary=summary, extra_providers=fns)


def _cases(layers, gpu, shape=None, target=False):
    """n_iter 6 forward and fwd+bwd with the anchors, n_iter 7 forward against exact only."""
    return [_case(layers, DEFAULT_N_ITER, "fwd", gpu, shape, target),
            _case(layers, DEFAULT_N_ITER, "fwd+bwd", gpu, shape),
            _case(layers, MORE_N_ITER, "fwd", gpu, shape, target)]


NETWORKS = {sizes.RESNET18: RESNET18_CIFAR}


def _each_conv(network, gpu):
    """Every distinct conv shape of a network, one at a time."""
    return [case for conv in dict.fromkeys(NETWORKS[network]) for case in _cases([conv], gpu)]


def _network(network, gpu):
    """All the convs of a network bounded together, one bound per layer (as lipschitz_penalty computes them)."""
    layers = NETWORKS[network]
    return _cases(layers, gpu, shape=f"{network}-cifar-{len(layers)}convs", target=True)


def _dense(rows, cols, gpu, batch=0):
    return _cases([Dense(rows, cols, batch)], gpu)


KINDS = {"conv_each": _each_conv, "network": _network, "dense": _dense}

CASES = [
    # CPU smoke sizes.
    *_cases([Conv(16, 16, 3, 8)], gpu=False),
    *_cases(TINY_CONVS, gpu=False, shape=f"tiny-{len(TINY_CONVS)}convs", target=True),
    *_cases([Dense(50, 40)], gpu=False),
    *_cases([Dense(8, 8, batch=4)], gpu=False),
    # GPU sizes: each ResNet-18 CIFAR conv shape, then all 20 convs together (the target), dense matrices.
    *cases_of(sizes.GRAM_ITERATION, KINDS),
]

CPU_CASES = [*_cases([Conv(64, 64, 3, 32)], gpu=False)[:1], *_cases([Dense(1024, 1024)], gpu=False)[:2]]
SHOWCASE = []  # bound against exact is each forward case's summary line; its cost, the table


@pytest.mark.parametrize(("case", "provider", "mode"), pytest_params(CASES))
def test_gram_iteration(benchmark, case, provider, mode):
    run_benchmark(benchmark, case, provider, mode)
