"""Gram-iteration spectral-norm bounds (arXiv 2305.16173, 2402.00240) as torch.library custom ops.

gram_spectral_norm bounds sigma_max of each matrix of a batch; conv_spectral_norm bounds the operator norm of a
convolution through its per-frequency blocks. Small matrices run in one CUDA C++ launch with every matrix kept
in shared memory for all iterations; larger ones use batched cuBLAS products (IEEE fp32, never TF32).
"""

import torch
from torch import Tensor

from torchext._backend import CUDA_EXT, use_cuda_ext
from torchext.ops._checks import check_int, check_ints, check_tensor
from torchext.reference import gram_iteration as ref

# What kind of kernel backs each op on CUDA (read by `python -m torchext info`).
KERNELS = {"gram_spectral_norm": "cuda", "conv_spectral_norm": "cuda"}

MATRIX_DTYPES = (torch.float32, torch.float64, torch.complex64, torch.complex128)
MAX_ITERATIONS = 30  # 2^30-th roots: past this the bound equals sigma_max to any float precision


def check_n_iter(op: str, n_iter: int) -> None:
    """n_iter is a Python int in [1, MAX_ITERATIONS] (shared by the ops and the nn parametrization)."""
    check_int(op, "n_iter", n_iter)
    if not 1 <= n_iter <= MAX_ITERATIONS:
        raise ValueError(f"{op}: n_iter must be in [1, {MAX_ITERATIONS}], got {n_iter}")


def _check_gram(w: Tensor, n_iter: int) -> None:
    op = "gram_spectral_norm"
    check_tensor(op, "w", w, MATRIX_DTYPES, min_ndim=2)
    check_n_iter(op, n_iter)


_GRAM_RULE = (f"on CUDA the kernel takes fp32/complex64 matrices with both sides <= "
              f"{getattr(CUDA_EXT, 'GRAM_MAX_SIDE', 'GRAM_MAX_SIDE')} (shared memory), the reference the rest")
DISPATCH = {"gram_spectral_norm": _GRAM_RULE, "conv_spectral_norm": _GRAM_RULE}


def _fits_shared_memory(w: Tensor) -> bool:
    """The CUDA kernel keeps each matrix (both sides <= GRAM_MAX_SIDE) and its Gram product in shared memory."""
    return (w.dtype in (torch.float32, torch.complex64) and hasattr(CUDA_EXT, "gram_iteration")
            and max(w.shape[-2:]) <= CUDA_EXT.GRAM_MAX_SIDE)


def _gram_cuda(w: Tensor, n_iter: int) -> tuple[Tensor, Tensor]:
    """All iterations of every matrix in one launch (csrc/gram_iteration/gram_iteration.cu)."""
    batch, side = w.shape[:-2], ref.gram_side(w)
    side = side.reshape(-1, *side.shape[-2:]).contiguous().resolve_conj()  # W^H is a lazy view: materialise it
    upper = torch.empty(side.shape[0], dtype=torch.float32, device=w.device)
    lower = torch.empty_like(upper)
    CUDA_EXT.gram_iteration(side.data_ptr(), side.is_complex(), side.shape[0], side.shape[1], side.shape[2], n_iter,
                            upper.data_ptr(), lower.data_ptr(), torch.cuda.current_stream(w.device).cuda_stream)
    return upper.reshape(batch), lower.reshape(batch)


@torch.library.custom_op("torchext::gram_spectral_norm", mutates_args=())
def _gram_spectral_norm(w: Tensor, n_iter: int) -> tuple[Tensor, Tensor]:
    _check_gram(w, n_iter)
    if use_cuda_ext(w) and _fits_shared_memory(w) and w.numel() > 0:
        return _gram_cuda(w, n_iter)
    upper, lower = ref.gram_log_bounds(w, n_iter)
    return upper.exp(), lower.exp()


@_gram_spectral_norm.register_fake
def _(w, n_iter):
    _check_gram(w, n_iter)
    real = torch.empty(w.shape[:-2], dtype=w.real.dtype, device=w.device)
    return real, torch.empty_like(real)


@torch.library.custom_op("torchext::gram_spectral_norm_backward", mutates_args=())
def _gram_spectral_norm_backward(grad: Tensor, w: Tensor, n_iter: int) -> Tensor:
    # Contiguous whatever w's layout (a wide w's gradient comes out transposed): compiled graphs check the
    # strides against the fake's.
    return ref.gram_spectral_norm_backward(grad, w, n_iter).contiguous()


@_gram_spectral_norm_backward.register_fake
def _(grad, w, n_iter):
    return torch.empty(w.shape, dtype=w.dtype, device=w.device)


def _gram_setup(ctx, inputs, output):
    w, ctx.n_iter = inputs
    ctx.save_for_backward(w)
    ctx.mark_non_differentiable(output[1])


def _gram_grad(ctx, grad_upper, grad_lower):
    return torch.ops.torchext.gram_spectral_norm_backward(grad_upper, ctx.saved_tensors[0], ctx.n_iter), None


_gram_spectral_norm.register_autograd(_gram_grad, setup_context=_gram_setup)


def gram_spectral_norm(w: Tensor, n_iter: int = 6, return_lower: bool = False) -> Tensor | tuple[Tensor, Tensor]:
    """Certified upper bound on the largest singular value of each matrix (Gram iteration, Frobenius-rescaled).

    The bound is the Schatten 2^(n_iter+1) norm: >= sigma_max in exact arithmetic, with an error that squares
    every iteration once the top singular value separates (slower for repeated ones). Differentiable.

    Args:
        w: [..., p, q] float32/float64/complex64/complex128.
        n_iter: iterations (6-7 give ~1e-3 or better on typical layers; see the research note's tables).
        return_lower: also return a lower bound (lambda_max of the PSD iterate >= ||G||_F^2 / tr G), a two-sided
            certificate to stop early on.

    Returns:
        upper [...] real (fp32 for fp32/complex64 inputs, else fp64); with return_lower, (upper, lower).
        An all-zero matrix, or one with no rows or no columns, gives 0.

    Raises:
        TypeError: w is not a tensor of those dtypes, n_iter is not an int. ValueError: n_iter outside [1, 30].
    """
    _check_gram(w, n_iter)
    upper, lower = torch.ops.torchext.gram_spectral_norm(w, n_iter)
    return (upper, lower) if return_lower else upper


def _conv_input_size(op: str, input_size, d: int) -> tuple[int, ...]:
    """input_size (an int, or one int per spatial dim) as a d-tuple of ints >= 1."""
    if isinstance(input_size, int) and not isinstance(input_size, bool):
        check_int(op, "input_size", input_size, minimum=1)
        return (input_size,) * d
    check_ints(op, "input_size", input_size, length=d, minimum=1)
    return tuple(input_size)


def _check_conv(weight: Tensor, input_size, padding: str, stride: int, groups: int, n_iter: int) -> tuple[int, ...]:
    """Everything conv_spectral_norm can check without its weight's values; returns input_size as a d-tuple. The
    rest (a circular input smaller than the kernel, a stride not dividing it) is checked where the blocks are built
    (reference.gram_iteration.conv_frequency_blocks)."""
    op = "conv_spectral_norm"
    check_tensor(op, "weight", weight, (torch.float32, torch.float64))
    if weight.dim() not in (3, 4):
        raise ValueError(f"{op}: weight must be 3-D (Conv1d) or 4-D (Conv2d), got shape {tuple(weight.shape)}")
    size = _conv_input_size(op, input_size, weight.dim() - 2)
    if padding not in ("circular", "zeros"):
        raise ValueError(f"{op}: padding must be 'circular' or 'zeros', got {padding!r}")
    check_int(op, "stride", stride, minimum=1)
    check_int(op, "groups", groups, minimum=1)
    check_n_iter(op, n_iter)
    if weight.shape[0] % groups:
        raise ValueError(f"{op}: groups={groups} must divide the {weight.shape[0]} output channels of weight "
                         f"{tuple(weight.shape)}")
    return size


# A composite of differentiable ops (the FFT, an index_select and gram_spectral_norm, whose backward is its own op):
# registered CompositeImplicitAutograd, so it needs no fake or autograd rule of its own and torch.compile traces
# into it.
torch.library.define("torchext::conv_spectral_norm",
                     "(Tensor weight, int[] input_size, str padding, int stride, int groups, int n_iter) -> Tensor")


@torch.library.impl("torchext::conv_spectral_norm", "CompositeImplicitAutograd")
def _conv_spectral_norm(weight: Tensor, input_size: list[int], padding: str, stride: int, groups: int,
                        n_iter: int) -> Tensor:
    size = _check_conv(weight, input_size, padding, stride, groups, n_iter)
    blocks = ref.conv_frequency_blocks(weight, size, padding, stride, groups)  # [freq, c_out/g, c_in/g], complex
    with torch.no_grad():
        winner = torch.ops.torchext.gram_spectral_norm(blocks.detach(), n_iter)[0].argmax()
    return torch.ops.torchext.gram_spectral_norm(blocks.index_select(0, winner.reshape(1)), n_iter)[0][0]


def conv_spectral_norm(weight: Tensor, input_size: tuple[int, ...] | int, padding: str = "circular",
                       stride: int = 1, groups: int = 1, n_iter: int = 6) -> Tensor:
    """Upper bound on the operator norm of a Conv1d/Conv2d at an input size, through its frequency blocks.

    Every block is bounded in one batched call; the gradient then flows through the winning block only (picked
    on the device, no host sync), since the max over frequencies depends on nothing else.

    Args:
        weight: [c_out, c_in / groups, k] or [c_out, c_in / groups, k_h, k_w], float32/float64.
        input_size: n or (n,) for Conv1d, (n_h, n_w) (or n) for Conv2d.
        padding: "circular" (exact operator) or "zeros" (a valid bound for zero padding up to k - 1, via the
            FFT at n + k - 1: the circular norm at n is not a bound for zero padding).
        stride: through the polyphase form (exact for circular; for zeros, at a size rounded up to a multiple).
        groups: the conv's groups (the bound is the max over groups).
        n_iter: Gram iterations.

    Returns:
        A 0-d real tensor of weight's dtype; 0 for a weight with no output (or input) channels. Differentiable.

    Raises:
        TypeError: a wrong dtype, or input_size / stride / groups / n_iter not ints. ValueError: a weight that is
        not 3-D or 4-D, input_size entries < 1 or (circular padding) smaller than the kernel, a stride that does not
        divide the circular input size, groups not dividing the output channels, n_iter outside [1, 30].
    """
    size = _check_conv(weight, input_size, padding, stride, groups, n_iter)
    return torch.ops.torchext.conv_spectral_norm(weight, list(size), padding, stride, groups, n_iter)
