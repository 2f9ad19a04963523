"""Certified Lipschitz control with Gram iteration (Delattre et al., arXiv 2305.16173, 2402.00240).

    conv = register_gram_spectral_norm(nn.Conv2d(16, 32, 3, padding=1))  # W * target / bound(true operator norm)
    total, table = lipschitz_bound(model, example_input)         # product of per-layer certified bounds
    print(format_lipschitz_table(table))
    loss = loss + 0.1 * lipschitz_penalty(model, tau=1.0)        # the paper's regulariser

Unlike torch.nn.utils.parametrizations.spectral_norm (a power-iteration lower estimate of the reshaped
matrix, pytorch#99149), the bound here is an upper bound on the operator norm of the layer itself.
"""

import math

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from torchext import _deprecation, ops
from torchext.ops._checks import check_float
from torchext.ops._gram_iteration import check_n_iter

BOUNDED = (nn.Linear, nn.Conv1d, nn.Conv2d)


def _conv_geometry(conv: nn.Module) -> tuple[str, int]:
    """(padding kind, stride) of a conv whose operator the frequency bound covers, or a clear error."""
    name = type(conv).__name__
    if any(d != 1 for d in conv.dilation):
        raise NotImplementedError(f"{name}: dilation {conv.dilation} is not supported by the Gram-iteration bound")
    if len(set(conv.stride)) != 1:
        raise NotImplementedError(f"{name}: unequal strides {conv.stride} are not supported")
    if conv.padding_mode == "circular":
        return "circular", conv.stride[0]
    if conv.padding_mode != "zeros":
        raise NotImplementedError(f"{name}: padding_mode {conv.padding_mode!r}: only 'zeros' and 'circular' "
                                  f"are bounded")
    padding = conv.padding if not isinstance(conv.padding, str) else (0,) if conv.padding == "valid" else None
    if padding is not None and any(p > k - 1 for p, k in zip(padding, conv.kernel_size)):
        raise NotImplementedError(f"{name}: padding {conv.padding} above kernel_size - 1 is not covered")
    return "zeros", conv.stride[0]


def layer_bound(module: nn.Module, weight: Tensor, n_iter: int = 6) -> Tensor:
    """Certified bound on the operator norm of a Linear / Conv1d / Conv2d with this weight (0-d tensor).

    Convs need the spatial input size, recorded by ``record_input_sizes`` (or the parametrization) at a forward.
    """
    if isinstance(module, nn.Linear):
        return ops.gram_spectral_norm(weight, n_iter)
    size = getattr(module, "torchext_input_size", None)
    if size is None:
        raise RuntimeError(f"{type(module).__name__}: its input size is unknown; run a forward first "
                           f"(record_input_sizes(model) or lipschitz_bound(model, example_input)), or pass "
                           f"input_size to register_gram_spectral_norm / GramSpectralNorm")
    padding, stride = _conv_geometry(module)
    return ops.conv_spectral_norm(weight, size, padding, stride, module.groups, n_iter)


def _remember_input_size(module: nn.Module, args) -> None:
    module.torchext_input_size = tuple(args[0].shape[2:])


def record_input_sizes(model: nn.Module) -> list:
    """Make every conv of ``model`` remember the spatial size of its input at each forward; returns the hooks."""
    return [m.register_forward_pre_hook(_remember_input_size) for m in model.modules()
            if isinstance(m, (nn.Conv1d, nn.Conv2d)) and not hasattr(m, "torchext_size_hook")]


class GramSpectralNorm(nn.Module):
    """Parametrization W -> W * target / b(W), b a certified bound on the layer's operator norm.

    Stateless and deterministic (no power-iteration buffers); in eval mode the bound is cached until the
    weight changes. ``register_gram_spectral_norm(module)`` registers it; registering it by hand with
    ``torch.nn.utils.parametrize.register_parametrization(module, "weight", GramSpectralNorm(module))`` works
    too, but torch then evaluates it at once, so a conv needs ``input_size`` (RuntimeError otherwise).
    A conv remembers the spatial size of its input at each forward (the bound depends on it).
    """

    def __init__(self, module: nn.Module, n_iter: int = 6, target: float = 1.0,
                 input_size: tuple[int, ...] | None = None):
        super().__init__()
        if not isinstance(module, BOUNDED):
            raise TypeError(f"GramSpectralNorm: expected Linear, Conv1d or Conv2d, got {type(module).__name__}")
        check_n_iter("GramSpectralNorm", n_iter)
        check_float("GramSpectralNorm", "target", target, positive=True)
        if not isinstance(module, nn.Linear):
            _conv_geometry(module)  # fail now, not at the first forward
            if not hasattr(module, "torchext_size_hook"):
                module.torchext_size_hook = module.register_forward_pre_hook(_remember_input_size)
            if input_size is not None:
                module.torchext_input_size = tuple(input_size)
        self.module_ref, self.n_iter, self.target = [module], n_iter, target  # a list: not a submodule
        self._cache: tuple | None = None

    def forward(self, weight: Tensor) -> Tensor:
        key = (weight.data_ptr(), weight._version, getattr(self.module_ref[0], "torchext_input_size", None))
        if not self.training and self._cache is not None and self._cache[0] == key:
            bound = self._cache[1]
        else:
            bound = layer_bound(self.module_ref[0], weight, self.n_iter)
            self._cache = (key, bound.detach()) if not self.training else None
        return weight * (self.target / bound)


def register_gram_spectral_norm(module: nn.Module, n_iter: int = 6, target: float = 1.0,
                       input_size: tuple[int, ...] | None = None) -> nn.Module:
    """Constrain a Linear / Conv1d / Conv2d to operator norm <= target (like torch's spectral_norm, but certified).

    Convs take their input size from ``input_size`` or else from each forward (the bound depends on it).
    Returns the module, parametrized in place.
    """
    if not isinstance(module, BOUNDED):
        raise TypeError(f"register_gram_spectral_norm: expected Linear, Conv1d or Conv2d, got {type(module).__name__}")
    # unsafe: the parametrization keeps shape and dtype, so torch need not evaluate it now (a conv's input size
    # may only be known at its first forward)
    parametrize.register_parametrization(module, "weight", GramSpectralNorm(module, n_iter, target, input_size),
                                         unsafe=True)
    return module


def _bounded_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(name, m) for name, m in model.named_modules() if isinstance(m, BOUNDED)]


def lipschitz_bound(model: nn.Module, example_input: Tensor | None = None,
                    n_iter: int = 6) -> tuple[Tensor, list[dict]]:
    """Product of the per-layer certified bounds of a feed-forward conv/linear net (1-Lipschitz activations).

    Args:
        model: its Linear / Conv1d / Conv2d layers, in order (parametrized ones count with their current weight).
        example_input: a batch to run once so every conv knows its input size (not needed if one ran already).

    Returns:
        (product, [{"layer", "type", "bound"} per layer]).
    """
    if example_input is not None:
        hooks = record_input_sizes(model)
        with torch.no_grad():
            model(example_input)
        for hook in hooks:
            hook.remove()
    table = [{"layer": name, "type": type(m).__name__.removeprefix("Parametrized"),
              "bound": layer_bound(m, m.weight, n_iter)}
             for name, m in _bounded_layers(model)]
    product = torch.stack([row["bound"] for row in table]).prod() if table else torch.tensor(1.0)
    return product, table


def lipschitz_penalty(model: nn.Module, tau: float = 1.0, n_iter: int = 6) -> Tensor:
    """The paper's regulariser: the sum of the layer bounds that exceed tau (add r * penalty to the loss).

    Convs must know their input size (``record_input_sizes(model)`` before the first training forward).
    """
    bounds = torch.stack([layer_bound(m, m.weight, n_iter) for _, m in _bounded_layers(model)])
    return (bounds * (bounds > tau)).sum()


def format_lipschitz_table(table: list[dict]) -> str:
    """The per-layer table of ``lipschitz_bound`` as text."""
    lines = [f"{row['layer']:<24}{row['type']:<10}{row['bound'].item():>12.5f}" for row in table]
    total = math.prod(row["bound"].item() for row in table)
    return "\n".join(lines + [f"{'product':<34}{total:>12.5f}"])



# register_gram_spectral_norm was gram_spectral_norm, the name of the op torchext.ops.gram_spectral_norm (a matrix).
_RENAMED = {"gram_spectral_norm": (register_gram_spectral_norm, "torchext.nn.register_gram_spectral_norm")}


def __getattr__(name: str):
    return _deprecation.renamed_attribute(__name__, name, _RENAMED)
