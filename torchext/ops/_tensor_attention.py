"""Tensor (triple-wise) attention ops (Alman & Song, arXiv 2310.04064; 2-simplicial windows of Roy et al., arXiv
2507.02754) as torch.library custom ops: torch.ops.torchext.tensor_attention and its backward.

The op checks its inputs, runs the Triton kernels on CUDA tensors (or under the interpreter) and the chunked
reference otherwise, has a fake for torch.compile, and an autograd rule whose backward is itself an op.
"""

import math
import warnings

import torch
from torch import Tensor

from torchext._backend import HAS_TRITON, use_triton
from torchext._dtypes import accumulator_dtype
from torchext.ops._checks import (check_bool, check_float, check_ints, check_same_device, check_shape,
                                  check_tensor, check_tensors)
from torchext.reference import tensor_attention as ref
from torchext.reference._attention import nonfinite_heads_as_nan

if HAS_TRITON:
    from torchext.triton_kernels import tensor_attention as kernels

MAX_HEAD_DIM = 256  # the kernels hold whole head rows in registers

# What kind of kernel backs each op on CUDA (read by `python -m torchext info`).
KERNELS = {"tensor_attention": "triton"}

_NAMES = ("q", "k1", "k2", "v1", "v2")


def _window(window1: int, window2: int) -> tuple[int, int] | None:
    """The op schema's (0, 0) is "no window"."""
    return None if window1 == 0 else (window1, window2)


def _check(q: Tensor, k1: Tensor, k2: Tensor, v1: Tensor, v2: Tensor, window1: int, window2: int, causal: bool,
           scale: float) -> None:
    op = "tensor_attention"
    tensors = dict(zip(_NAMES, (q, k1, k2, v1, v2)))
    for name, x in tensors.items():
        check_tensor(op, name, x, ndim=4)
        if x.dtype != q.dtype:
            raise TypeError(f"{op}: {name} must have q's dtype {q.dtype}, got {x.dtype}")
    B, H, n, d = q.shape
    heads_kv = k1.shape[1]
    for name in _NAMES[1:]:
        check_shape(op, name, tensors[name], (B, heads_kv, n, d))
    if heads_kv == 0 or H % heads_kv:
        raise ValueError(f"{op}: q's heads ({H}) must be a multiple of k1/k2/v1/v2's heads ({heads_kv}) (GQA)")
    if not 1 <= d <= MAX_HEAD_DIM:
        raise ValueError(f"{op}: head_dim must be in [1, {MAX_HEAD_DIM}], got {d}")
    check_same_device(op, **tensors)
    if (window1 == 0) != (window2 == 0) or window1 < 0 or window2 < 0:
        raise ValueError(f"{op}: window must be None or (w1, w2) with w1, w2 >= 1, got ({window1}, {window2})")
    if window1 and not causal:
        raise ValueError(f"{op}: a window (w1, w2) is causal by definition (j in (i - w1, i]); pass causal=True")
    if not math.isfinite(scale):
        raise ValueError(f"{op}: scale must be finite, got {scale}")


def _kernel_roles(window: tuple[int, int] | None, n: int, k1: Tensor, k2: Tensor, v1: Tensor,
                  v2: Tensor) -> tuple[bool, int, int, Tensor, Tensor, Tensor, Tensor]:
    """(swap, wr, wc, kr, kc, vr, vc): the kernels fold the pair with the smaller window into their rows (see the
    kernel module); swap says the row side is (k2, v2)."""
    w1, w2 = window if window is not None else (n, n)
    if w2 < w1:
        return True, w2, w1, k2, k1, v2, v1
    return False, w1, w2, k1, k2, v1, v2


def _contiguous(*xs: Tensor) -> list[Tensor]:
    return [x.contiguous() for x in xs]


@torch.library.custom_op("torchext::tensor_attention", mutates_args=())
def _tensor_attention(q: Tensor, k1: Tensor, k2: Tensor, v1: Tensor, v2: Tensor, window1: int, window2: int,
                      causal: bool, scale: float) -> tuple[Tensor, Tensor]:
    _check(q, k1, k2, v1, v2, window1, window2, causal, scale)
    window = _window(window1, window2)
    if q.numel() == 0:
        return q.new_zeros(q.shape), q.new_zeros(q.shape[:3], dtype=accumulator_dtype(q.dtype))
    if not use_triton(q):
        out, lse = ref.tensor_attention(q, k1, k2, v1, v2, window, causal, scale)
        return out.contiguous(), lse
    q, k1, k2, v1, v2 = _contiguous(q, k1, k2, v1, v2)
    _, wr, wc, kr, kc, vr, vc = _kernel_roles(window, q.shape[2], k1, k2, v1, v2)
    return nonfinite_heads_as_nan(*kernels.tensor_attention_fwd(q, kr, kc, vr, vc, wr, wc, causal, scale), kr, kc,
                                  vr, vc)


@_tensor_attention.register_fake
def _(q, k1, k2, v1, v2, window1, window2, causal, scale):
    _check(q, k1, k2, v1, v2, window1, window2, causal, scale)
    return q.new_empty(q.shape), q.new_empty(q.shape[:3], dtype=accumulator_dtype(q.dtype))


@torch.library.custom_op("torchext::tensor_attention_backward", mutates_args=())
def _tensor_attention_backward(grad_out: Tensor, grad_lse: Tensor, q: Tensor, k1: Tensor, k2: Tensor, v1: Tensor,
                               v2: Tensor, out: Tensor, lse: Tensor, window1: int, window2: int, causal: bool,
                               scale: float) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    window = _window(window1, window2)
    if q.numel() == 0:
        return tuple(x.new_zeros(x.shape) for x in (q, k1, k2, v1, v2))
    if not use_triton(q):
        return ref.tensor_attention_backward(grad_out, grad_lse, q, k1, k2, v1, v2, out, lse, window, causal, scale)
    grad_out, q, k1, k2, v1, v2 = _contiguous(grad_out, q, k1, k2, v1, v2)
    # D_i = <dO_i, o_i> - dlse_i: the row term of the softmax Jacobian (lse's own gradient folds into it).
    delta = ((grad_out.to(lse.dtype) * out.to(lse.dtype)).sum(-1) - grad_lse.to(lse.dtype)).contiguous()
    swap, wr, wc, kr, kc, vr, vc = _kernel_roles(window, q.shape[2], k1, k2, v1, v2)
    dq, dkr, dkc, dvr, dvc = kernels.tensor_attention_bwd(grad_out, delta, q, kr, kc, vr, vc, lse.contiguous(), wr,
                                                          wc, causal, scale)
    return (dq, dkc, dkr, dvc, dvr) if swap else (dq, dkr, dkc, dvr, dvc)


@_tensor_attention_backward.register_fake
def _(grad_out, grad_lse, q, k1, k2, v1, v2, out, lse, window1, window2, causal, scale):
    return tuple(x.new_empty(x.shape) for x in (q, k1, k2, v1, v2))


def _tensor_attention_setup(ctx, inputs, output):
    q, k1, k2, v1, v2, ctx.window1, ctx.window2, ctx.causal, ctx.scale = inputs
    ctx.save_for_backward(q, k1, k2, v1, v2, *output)


def _tensor_attention_grad(ctx, grad_out, grad_lse):
    q, k1, k2, v1, v2, out, lse = ctx.saved_tensors
    grad_out = torch.zeros_like(out) if grad_out is None else grad_out
    grad_lse = torch.zeros_like(lse) if grad_lse is None else grad_lse
    grads = torch.ops.torchext.tensor_attention_backward(grad_out, grad_lse, q, k1, k2, v1, v2, out, lse,
                                                         ctx.window1, ctx.window2, ctx.causal, ctx.scale)
    return *grads, None, None, None, None


_tensor_attention.register_autograd(_tensor_attention_grad, setup_context=_tensor_attention_setup)


def tensor_attention(q: Tensor, k1: Tensor, k2: Tensor, v1: Tensor, v2: Tensor, *,
                     window: tuple[int, int] | None = None, causal: bool = True, scale: float | None = None,
                     return_lse: bool | None = None) -> Tensor | tuple[Tensor, Tensor]:
    """Tensor attention: o_i = sum_(j,k) softmax_(j,k)(scale <q_i, k1_j * k2_k>) (v1_j * v2_k), fused.

    Alman & Song's triple-wise attention; with a window, the 2-simplicial attention of Roy et al. The [n, n, n]
    score tensor is never built: the kernels run an online softmax over the flattened (j, k) axis.

    Args:
        q: [batch, heads, seq, dim] float32/bfloat16/float16/float64, dim <= 256.
        k1, k2, v1, v2: [batch, heads_kv, seq, dim], q's dtype; heads % heads_kv == 0 (GQA).
        window: None, every (j, k) allowed by ``causal`` (the exact O(seq^3) operator, for modest seq), or (w1, w2):
            j in (i - w1, i] and k in (i - w2, i] (O(seq w1 w2); needs causal=True).
        causal: j <= i and k <= i.
        scale: logit scale, default 1 / sqrt(dim) (Alman & Song's definition uses 1 / dim).
        return_lse: also return the log-sum-exp, as every torchext attention op (False: out alone). Not passing it
            returns (out, lse) as this op always did, with a FutureWarning (not under torch.compile, which cannot
            trace one): that default becomes False.

    Returns:
        out [batch, heads, seq, dim] in q's dtype; with return_lse, (out, lse [batch, heads, seq] float32 (float64
        for float64 inputs), the natural-log normaliser log sum_(j,k) exp(s_ijk)). Both are differentiable.
    """
    op = "tensor_attention"
    check_tensors(op, q=q, k1=k1, k2=k2, v1=v1, v2=v2)
    check_tensor(op, "q", q, ndim=4)
    if q.shape[-1] < 1:
        raise ValueError(f"{op}: head dim must be >= 1, got q {tuple(q.shape)}")
    if window is not None:
        check_ints(op, "window", window, length=2, minimum=1)
    if scale is not None:
        check_float(op, "scale", scale)
    if return_lse is None:
        if not torch.compiler.is_compiling():  # torch.compile cannot trace warnings.warn (fullgraph would fail)
            warnings.warn("tensor_attention returns (out, lse) when return_lse is not given, and will return out alone "
                          "(as kde_attention does): pass return_lse=True to keep both, return_lse=False for out",
                          FutureWarning, stacklevel=2)
        return_lse = True
    check_bool(op, "return_lse", return_lse)
    window1, window2 = (0, 0) if window is None else window
    scale = ref.default_scale(q.shape[-1]) if scale is None else float(scale)
    out, lse = torch.ops.torchext.tensor_attention(q, k1, k2, v1, v2, window1, window2, causal, scale)
    return (out, lse) if return_lse else out
