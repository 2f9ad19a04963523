"""Pure-PyTorch reference for Gram-iteration spectral-norm bounds (Delattre et al., arXiv 2305.16173 and
arXiv 2402.00240), written from the papers.

Gram iteration: G_0 = W, G_{t+1} = G_t^H G_t. After T steps ||G_T||_F^(1/2^T) is the Schatten 2^(T+1) norm of W,
an upper bound on its largest singular value that converges to it quadratically. Each step divides G by its
Frobenius norm r and tracks L = log c with G_true = c G, L <- 2 (L + log r), so nothing overflows; the answer
does not depend on the r, which are therefore treated as constants by autograd (exact, and cheaper).

Functions compute in the input precision (fp32 or fp64, real or complex); fp32 products are IEEE (no TF32).
"""

import contextlib
import math

import torch
from torch import Tensor


@contextlib.contextmanager
def ieee_products():
    """IEEE fp32 matrix products inside the iteration: TF32 (unit roundoff ~5e-4) would void the bound."""
    saved = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved


def gram_side(w: Tensor) -> Tensor:
    """W or W^H, whichever makes the Gram matrix G^H G the smaller one."""
    return w if w.shape[-2] >= w.shape[-1] else w.mH


def _frobenius(g: Tensor) -> Tensor:
    """||g||_F [...] computed as max|g| * ||g / max|g|||_F, so fp32 matrices of 1e30 do not overflow."""
    if g.shape[-2] == 0 or g.shape[-1] == 0:  # no entries: norm 0 (amax has no identity to reduce to)
        return g.new_zeros(g.shape[:-2], dtype=g.real.dtype)
    peak = g.abs().amax(dim=(-2, -1))
    safe_peak = torch.where(peak > 0, peak, torch.ones_like(peak))
    return safe_peak * torch.linalg.matrix_norm(g / safe_peak[..., None, None], ord="fro")


def gram_log_bounds(w: Tensor, n_iter: int = 6) -> tuple[Tensor, Tensor]:
    """(log upper bound, log lower bound) on sigma_max(W) for every matrix of a batch.

    Args:
        w: [..., p, q] float32/float64/complex64/complex128.
        n_iter: Gram iterations T >= 1.

    Returns:
        Two real tensors [...]: log of ||G_T||_F^(1/2^T) >= sigma_max (upper) and of
        (||G_T||_F^2 / tr G_T)^(1/2^T) <= sigma_max (lower: lambda_max of a PSD matrix is at least
        ||G||_F^2 / tr G). An all-zero matrix, or one with no rows or no columns, gives log 0 = -inf for both
        (a bound of 0, never NaN).
    """
    if n_iter < 1:
        raise ValueError(f"gram iteration needs n_iter >= 1, got {n_iter}")
    g = gram_side(w)
    log_scale = torch.zeros(w.shape[:-2], dtype=w.real.dtype, device=w.device)
    with ieee_products():
        for _ in range(n_iter):
            r = _frobenius(g).detach()
            safe_r = torch.where(r > 0, r, torch.ones_like(r))  # a zero matrix stays zero: its bound is 0
            g = g / safe_r[..., None, None]
            log_scale = 2 * (log_scale + safe_r.log())
            g = g.mH @ g
    frob = _frobenius(g)
    trace = torch.diagonal(g, dim1=-2, dim2=-1).real.sum(-1)
    upper = (log_scale + frob.log()) / 2 ** n_iter
    lower = (log_scale + 2 * frob.log() - trace.log()) / 2 ** n_iter
    lower = torch.where(frob > 0, lower, upper)  # a zero matrix: both -inf, not -inf + inf
    return upper, lower


def gram_spectral_norm_backward(grad: Tensor, w: Tensor, n_iter: int = 6) -> Tensor:
    """Gradient of the upper bound b = ||W||_{S_p}, p = 2^(T+1): grad * b^(1-p) W (W^H W)^(p/2 - 1), per matrix.

    (W^H W)^(2^T - 1) is the product of the iterates W_t = (W^H W)^(2^(t-1)), t = 1..T, kept normalised
    (W_t = c_t G_t) with the scales summed in the log domain, so nothing overflows. grad: [...], w: [..., p, q].
    """
    transposed = w.shape[-2] < w.shape[-1]
    g = gram_side(w)
    w_side = g
    log_scale = torch.zeros(w.shape[:-2], dtype=w.real.dtype, device=w.device)
    log_product = torch.zeros_like(log_scale)
    product = None
    with ieee_products():
        for _ in range(n_iter):
            r = _frobenius(g)
            safe_r = torch.where(r > 0, r, torch.ones_like(r))
            g = g / safe_r[..., None, None]
            log_scale = 2 * (log_scale + safe_r.log())
            g = g.mH @ g  # W_t / c_t with log c_t = log_scale
            product = g if product is None else product @ g
            log_product = log_product + log_scale
        log_b = (log_scale + _frobenius(g).log()) / 2 ** n_iter
        log_factor = (1 - 2 ** (n_iter + 1)) * log_b + log_product
        factor = torch.where(torch.isfinite(log_factor), log_factor.exp(), torch.zeros_like(log_factor))
        grad_side = (grad * factor)[..., None, None] * (w_side @ product)
    return grad_side.mH if transposed else grad_side


def gram_spectral_norm(w: Tensor, n_iter: int = 6) -> Tensor:
    """Upper bound on sigma_max of each matrix of w [..., p, q] (real or complex): a real tensor [...]."""
    return gram_log_bounds(w, n_iter)[0].exp()


def conv_frequency_blocks(weight: Tensor, input_size: tuple[int, ...], padding: str = "circular",
                          stride: int = 1, groups: int = 1) -> Tensor:
    """The per-frequency matrices of a convolution: [groups * n_freq, c_out / g, c_in / g * stride^d] complex.

    Circular padding at input size n is block-diagonalised by the DFT (Sedghi et al. 2019): the operator norm is
    the max over frequencies of sigma_max(K_hat(omega)). A zero-padded conv (padding <= k - 1) is a compression of
    the circular conv on any size N >= n + k - 1, which computes the full linear convolution without wrap-around,
    so the bound at that size is valid for it (at size n it is not: the kernel [1, -1] at n = 3 has norm 1.802
    zero-padded and 1.732 circular). Stride s: the polyphase reshape turns the conv into a stride-1 conv with s^d
    times more input channels on an n / s input, exact for circular padding; with zeros, N is rounded up to a
    multiple of s first (the strided zero-padded conv is still a compression of that strided circular conv).

    Args:
        weight: [c_out, c_in / groups, k] (Conv1d) or [c_out, c_in / groups, k_h, k_w] (Conv2d), real.
        input_size: the spatial input size (n,) or (n_h, n_w).
        padding: "circular" (exact) or "zeros" (a bound for any zero padding of at most k - 1).
    """
    d = weight.dim() - 2
    if d not in (1, 2) or len(input_size) != d:
        raise ValueError(f"conv_spectral_norm: weight must be 3-D or 4-D with one input size per spatial dim, "
                         f"got weight {tuple(weight.shape)} and input_size {tuple(input_size)}")
    kernel = tuple(weight.shape[2:])
    if padding == "zeros":  # an FFT size of at least n + k - 1 >= k
        input_size = tuple(math.ceil((n + k - 1) / stride) * stride for n, k in zip(input_size, kernel))
    elif padding != "circular":
        raise ValueError(f"conv_spectral_norm: padding must be 'circular' or 'zeros', got {padding!r}")
    elif any(k > n for k, n in zip(kernel, input_size)):  # the kernel would wrap onto itself
        raise ValueError(f"conv_spectral_norm: input_size {tuple(input_size)} is smaller than the kernel {kernel}; "
                         f"circular padding needs input_size >= kernel_size (zero padding does not)")
    if stride > 1:  # n >= k and s | n give n / s >= ceil(k / s): the polyphase kernel fits too
        weight, input_size = _polyphase(weight, tuple(input_size), stride)
    c_out, c_in_g = weight.shape[:2]
    spectrum = _spectrum(weight, tuple(input_size))  # [c_out, c_in/g, *freq]
    n_freq = math.prod(spectrum.shape[2:])  # not -1 in the reshapes: they must also take no channels
    blocks = spectrum.reshape(groups, c_out // groups, c_in_g, n_freq).permute(0, 3, 1, 2)  # [g, freq, co/g, ci/g]
    return blocks.reshape(groups * n_freq, c_out // groups, c_in_g)


def _spectrum(weight: Tensor, size: tuple[int, ...]) -> Tensor:
    """The DFT of the kernel at the FFT size over its spatial dims (the half rfftn keeps: the rest is conjugate)."""
    if weight.numel() == 0:  # FFT libraries reject empty inputs; no channels: an empty spectrum, a bound of 0
        complex_dtype = torch.complex128 if weight.dtype == torch.float64 else torch.complex64
        return weight.new_zeros((*weight.shape[:2], *size[:-1], size[-1] // 2 + 1), dtype=complex_dtype)
    return torch.fft.rfftn(weight, s=size, dim=tuple(range(2, weight.dim())))


def _polyphase(weight: Tensor, input_size: tuple[int, ...], stride: int) -> tuple[Tensor, tuple[int, ...]]:
    """A stride-s conv as a stride-1 conv over the s^d phases of the input (exact for circular padding)."""
    d = weight.dim() - 2
    if any(n % stride for n in input_size):
        raise ValueError(f"conv_spectral_norm: stride {stride} must divide input_size {input_size} with circular "
                         f"padding (the polyphase form)")
    kernel = weight.shape[2:]
    padded = [math.ceil(k / stride) * stride for k in kernel]
    w = torch.nn.functional.pad(weight, [p for k, pk in zip(reversed(kernel), reversed(padded)) for p in (0, pk - k)])
    c_out, c_in = w.shape[:2]
    if d == 1:
        w = w.reshape(c_out, c_in, padded[0] // stride, stride).permute(0, 1, 3, 2)
    else:
        w = w.reshape(c_out, c_in, padded[0] // stride, stride, padded[1] // stride, stride)
        w = w.permute(0, 1, 3, 5, 2, 4)
    return w.reshape(c_out, c_in * stride ** d, *(p // stride for p in padded)), tuple(n // stride for n in input_size)


def conv_spectral_norm(weight: Tensor, input_size: tuple[int, ...], padding: str = "circular", stride: int = 1,
                       groups: int = 1, n_iter: int = 6) -> Tensor:
    """Upper bound on the operator norm of a Conv1d/Conv2d at the given input size: a real 0-d tensor."""
    blocks = conv_frequency_blocks(weight, input_size, padding, stride, groups)
    return gram_spectral_norm(blocks, n_iter).max()
