"""Kronecker attention operators (Gao, Wang, Ji, arXiv 2007.08442) as torch.library custom ops:
torch.ops.torchext.kronecker_attention and its backward.

The op checks its inputs, dispatches (Triton kernels on CUDA or under the interpreter, the reference on CPU),
and has a fake for torch.compile and an autograd rule whose backward is itself an op. The forward also
returns the averaged tokens [B, C, L] (fp32, fp64 for fp64 inputs), which the backward uses instead of
re-reading x: KAO_QKV's backward then never touches x at all.
"""

import math

import torch
from torch import Tensor

from torchext._backend import HAS_TRITON, use_triton
from torchext._dtypes import accumulator_dtype
from torchext.ops._checks import check_int, check_same_device, check_shape, check_tensor
from torchext.reference import kronecker_attention as ref

if HAS_TRITON:
    from torchext.triton_kernels import kronecker_attention as kernels

MODES = ref.MODES
# The kernels hold all L = H + W (+ T) tokens of a head in one tile (triton_kernels/kronecker_attention.py says why
# 512); every path refuses longer maps, so code written on a CPU runs on a GPU. By x's element bytes.
MAX_TOKENS = {2: 512, 4: 512, 8: 256}

# What kind of kernel backs each op on CUDA (read by `python -m torchext info`).
KERNELS = {"kronecker_attention": "triton"}


def _check_kronecker_attention(x: Tensor, mode: str, heads: int, scale: float, op: str = "kronecker_attention",
                               name: str = "x", spatially_contiguous: bool = True) -> None:
    check_tensor(op, name, x)
    if x.dim() not in (4, 5):
        raise ValueError(f"{op}: {name} must be 4-D [B, C, H, W] or 5-D [B, C, T, H, W], got shape "
                         f"{tuple(x.shape)}")
    if mode not in MODES:
        raise ValueError(f"{op}: mode must be one of {MODES}, got {mode!r}")
    check_int(op, "heads", heads, minimum=1)
    channels, *spatial = x.shape[1:]
    if channels % heads:
        raise ValueError(f"{op}: the channels of {name} ({channels}) must be a multiple of heads ({heads})")
    if sum(spatial) > MAX_TOKENS[x.dtype.itemsize]:
        raise ValueError(f"{op}: {name} of shape {tuple(x.shape)} has {sum(spatial)} tokens (H + W, + T in 3-D), "
                         f"past the limit of {MAX_TOKENS[x.dtype.itemsize]} for {x.dtype}")
    if not math.isfinite(scale):
        raise ValueError(f"{op}: scale must be finite, got {scale}")
    if spatially_contiguous and not _spatially_contiguous(x):
        raise ValueError(f"{op}: {name} must be contiguous over its spatial dims (got strides {x.stride()} for "
                         f"shape {tuple(x.shape)}); call .contiguous() first")


def _spatially_contiguous(x: Tensor) -> bool:
    """Whether each channel's T*H*W block is one run (what the kernels stream); batch and channel strides may be
    anything."""
    expected = math.prod(x.shape[2:])
    if expected == 0:
        return True
    for size, stride in zip(x.shape[2:], x.stride()[2:]):
        expected //= size
        if size > 1 and stride != expected:
            return False
    return True


def _num_tokens(x: Tensor) -> int:
    return sum(x.shape[2:])


@torch.library.custom_op("torchext::kronecker_attention", mutates_args=())
def _kronecker_attention(x: Tensor, mode: str, heads: int, scale: float) -> tuple[Tensor, Tensor]:
    _check_kronecker_attention(x, mode, heads, scale)
    if x.numel() == 0 or not use_triton(x):
        return ref.kronecker_attention(x, mode, heads, scale).contiguous(), ref.kronecker_means(x)
    return kernels.kronecker_attention_fwd(x, mode, heads, scale)


@_kronecker_attention.register_fake
def _(x, mode, heads, scale):
    _check_kronecker_attention(x, mode, heads, scale)
    return x.new_empty(x.shape), x.new_empty((*x.shape[:2], _num_tokens(x)), dtype=accumulator_dtype(x.dtype))


def _check_kronecker_attention_backward(grad_out: Tensor, x: Tensor | None, means: Tensor, mode: str, heads: int,
                                        scale: float) -> None:
    op = "kronecker_attention_backward"
    # grad_out and x are made contiguous here where they are not: autograd may hand over an expanded grad_out, and
    # a compiled graph a channels-last x.
    _check_kronecker_attention(grad_out, mode, heads, scale, op, "grad_out", spatially_contiguous=False)
    if mode == "kv" and x is None:
        raise ValueError(f"{op}: mode 'kv' needs x (the queries); only 'qkv' may pass None")
    if x is not None:
        _check_kronecker_attention(x, mode, heads, scale, op, spatially_contiguous=False)
        check_shape(op, "grad_out", grad_out, x.shape)
    check_tensor(op, "means", means, dtypes=(accumulator_dtype(grad_out.dtype),), ndim=3)
    check_shape(op, "means", means, (*grad_out.shape[:2], _num_tokens(grad_out)))
    check_same_device(op, grad_out=grad_out, means=means, **({} if x is None else {"x": x}))


@torch.library.custom_op("torchext::kronecker_attention_backward", mutates_args=())
def _kronecker_attention_backward(grad_out: Tensor, x: Tensor | None, means: Tensor, mode: str, heads: int,
                                  scale: float) -> Tensor:
    _check_kronecker_attention_backward(grad_out, x, means, mode, heads, scale)
    grad_out, means = grad_out.contiguous(), means.contiguous()
    if x is not None and not _spatially_contiguous(x):
        x = x.contiguous()
    if grad_out.numel() == 0 or not use_triton(grad_out):
        return ref.kronecker_attention_backward(grad_out, x, means, mode, heads, scale)
    return kernels.kronecker_attention_bwd(grad_out, x, means, mode, heads, scale)


@_kronecker_attention_backward.register_fake
def _(grad_out, x, means, mode, heads, scale):
    _check_kronecker_attention_backward(grad_out, x, means, mode, heads, scale)
    return grad_out.new_empty(grad_out.shape)


def _kronecker_attention_setup(ctx, inputs, output):
    x, ctx.mode, ctx.heads, ctx.scale = inputs
    _, means = output
    ctx.mark_non_differentiable(means)
    ctx.save_for_backward(x if ctx.mode == "kv" else None, means)  # QKV's backward needs only the tokens


def _kronecker_attention_grad(ctx, grad_out, _grad_means):
    x, means = ctx.saved_tensors
    dx = torch.ops.torchext.kronecker_attention_backward(grad_out, x, means, ctx.mode, ctx.heads, ctx.scale)
    return dx, None, None, None


_kronecker_attention.register_autograd(_kronecker_attention_grad, setup_context=_kronecker_attention_setup)


def kronecker_attention(x: Tensor, mode: str = "kv", heads: int = 1, scale: float | None = None) -> Tensor:
    """Kronecker attention (KAO, Gao et al. 2020) of a 2-D or 3-D feature map, without projections.

    The map's row, column (and time) means form L = H + W (+ T) tokens C; channels split into heads.
    ``mode="kv"``: every position is a query attending to the L tokens (keys = values = C), out = C softmax(C^T x)
    per position: O(HW (H + W) C) instead of SDPA's O((HW)^2 C). ``mode="qkv"``: the L tokens attend among
    themselves and the output is their outer sum out[t, i, j] = o_t + o_i + o_j: O((H + W)^2 C) plus one write.
    Softmax runs over the tokens with scale * dot products.

    Args:
        x: [B, C, H, W] or [B, C, T, H, W], float32/bfloat16/float16/float64, contiguous over its spatial dims
            (a channel slice of a wider tensor is fine); C divisible by heads; H + W (+ T) <= 512 on the kernels
            (256 for fp64 on GPU).
        mode: "kv" or "qkv".
        heads: channel groups of C / heads channels that attend independently.
        scale: softmax scale; None means 1 / sqrt(C / heads).

    Returns:
        out, a tensor of x's shape and dtype (alone, as every torchext attention op's default; there is no
        log-sum-exp to ask for with return_lse).
    """
    if scale is None:
        _check_kronecker_attention(x, mode, heads, 1.0)
        scale = ref.default_scale(x.shape[1], heads)
    return torch.ops.torchext.kronecker_attention(x, mode, heads, float(scale))[0]
