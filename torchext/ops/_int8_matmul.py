"""LLM.int8() ops (arXiv 2208.07339) as torch.library custom ops: torch.ops.torchext.<name>.

int8_vectorwise_quant (CUDA C++) -> int8_mm (Triton, fused dequantization and outlier decomposition);
int8_linear composes them, with an autograd rule for the input gradient (frozen int8 weights, LoRA-style).
"""

import torch
from torch import Tensor

from torchext._backend import CUDA_EXT, HAS_TRITON, cuda_dtype_code, use_cuda_ext, use_triton
from torchext.ops._checks import check_int, check_same_device, check_shape, check_tensor, check_unit_last_stride
from torchext.reference import int8_matmul as ref

if HAS_TRITON:
    from torchext.triton_kernels import int8_matmul as kernels

# What kind of kernel backs each op on CUDA (read by `python -m torchext info`).
KERNELS = {"int8_vectorwise_quant": "cuda", "int8_mm": "triton", "int8_linear": "triton"}

# Outlier columns a calibration keeps per layer (static mode): the paper sees at most 7 per layer up to 13B parameters.
# Dynamic detection lists up to K columns (all of them), so its decomposition is exact whatever the count.
DEFAULT_CAPACITY = 64
ACTIVATION_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _check_threshold(op: str, threshold) -> None:
    """A real number; +-Inf are valid (detection off / only Inf outliers), NaN is not (no column compares)."""
    if not isinstance(threshold, (int, float)) or isinstance(threshold, bool):
        raise TypeError(f"{op}: threshold must be a float, got {type(threshold).__name__} {threshold!r}")
    if threshold != threshold:
        raise ValueError(f"{op}: threshold must be a number, got NaN")


def _check_capacity(op: str, capacity) -> None:
    """check_int, also taking the SymInt that torch.compile with dynamic shapes passes for the default (a size)."""
    if isinstance(capacity, torch.SymInt):
        if capacity < 0:
            raise ValueError(f"{op}: capacity must be >= 0, got {capacity}")
        return
    check_int(op, "capacity", capacity, minimum=0)


# ---- int8_vectorwise_quant ------------------------------------------------------------------------------------


def _check_quant(x: Tensor, threshold: float, capacity: int, excluded: Tensor | None) -> None:
    op = "int8_vectorwise_quant"
    check_tensor(op, "x", x, ACTIVATION_DTYPES, ndim=2)
    check_unit_last_stride(op, "x", x)
    _check_capacity(op, capacity)
    _check_threshold(op, threshold)
    if excluded is not None:
        check_tensor(op, "excluded", excluded, (torch.bool,))
        check_shape(op, "excluded", excluded, x.shape[1:])
        check_same_device(op, x=x, excluded=excluded)


def _quant_cuda(x: Tensor, threshold: float, capacity: int, excluded: Tensor | None):
    M, K = x.shape
    codes = torch.empty((M, K), dtype=torch.int8, device=x.device)
    row_scale = torch.empty(M, dtype=torch.float32, device=x.device)
    outlier_mask = torch.empty(K, dtype=torch.uint8, device=x.device)
    outlier_cols = torch.empty(capacity, dtype=torch.int32, device=x.device)
    n_outliers = torch.empty(1, dtype=torch.int32, device=x.device)
    excluded_bytes = excluded.to(torch.uint8) if excluded is not None else None  # alive until the launch
    CUDA_EXT.int8_vectorwise_quant(
        x.data_ptr(), cuda_dtype_code(x.dtype), M, K, x.stride(0), threshold,
        excluded_bytes.data_ptr() if excluded_bytes is not None else 0, codes.data_ptr(), row_scale.data_ptr(),
        outlier_mask.data_ptr(), outlier_cols.data_ptr(), n_outliers.data_ptr(), capacity,
        torch.cuda.current_stream(x.device).cuda_stream)
    return codes, row_scale, outlier_cols, n_outliers


def _quant_cpu(x: Tensor, threshold: float, capacity: int, excluded: Tensor | None):
    """int8_vectorwise_quant on CPU tensors in about a third of the reference's passes over x, with the same codes
    (rint(x * (127 / absmax)), fp32): row and column peaks in two reductions, the inlier absmax recomputed only
    where an outlier column exists. Rows the reference treats specially (NaN/Inf, or an absmax below 2^-64 that
    it rescales first) go to the reference; so do empty inputs."""
    M, K = x.shape
    xf = x.float()
    magnitude = xf.abs()  # [M, K], a buffer of our own from here
    if excluded is not None:
        magnitude.masked_fill_(excluded, 0.0)
    row_peak = magnitude.amax(1) if M and K else None
    if row_peak is None or not row_peak.isfinite().all() or ((row_peak > 0) & (row_peak < ref.TINY_ABSMAX)).any():
        return ref.int8_vectorwise_quant(x, threshold, capacity, excluded)
    cols = (magnitude.amax(0) >= threshold).nonzero().flatten() if threshold > 0 else magnitude.new_empty(0).long()
    absmax = row_peak
    if cols.numel():  # the largest element below the threshold: outlier columns' inliers, then the other columns
        outlier_part = magnitude[:, cols]
        inlier_peak = outlier_part.masked_fill_(outlier_part >= threshold, 0.0).amax(1)
        absmax = torch.maximum(magnitude.index_fill_(1, cols, 0.0).amax(1), inlier_peak)
    inv = torch.where(absmax > 0, ref.INT8_MAX / absmax, 0.0)
    codes = torch.mul(xf, inv[:, None], out=magnitude).round_().clamp_(-ref.INT8_MAX, ref.INT8_MAX)
    if excluded is not None:
        codes.masked_fill_(excluded, 0.0)
    outlier_cols = torch.full((capacity,), -1, dtype=torch.int32)
    outlier_cols[: min(capacity, cols.numel())] = cols[:capacity].to(torch.int32)
    n_outliers = torch.full((1,), cols.numel(), dtype=torch.int32)
    return codes.to(torch.int8), absmax, outlier_cols, n_outliers


@torch.library.custom_op("torchext::int8_vectorwise_quant", mutates_args=())
def _int8_vectorwise_quant(x: Tensor, threshold: float, capacity: int,
                           excluded: Tensor | None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    _check_quant(x, threshold, capacity, excluded)
    if use_cuda_ext(x):
        return _quant_cuda(x, threshold, capacity, excluded)
    if x.device.type == "cpu":
        return _quant_cpu(x, threshold, capacity, excluded)
    return ref.int8_vectorwise_quant(x, threshold, capacity, excluded)


@_int8_vectorwise_quant.register_fake
def _(x, threshold, capacity, excluded):
    _check_quant(x, threshold, capacity, excluded)
    M, K = x.shape
    return (x.new_empty((M, K), dtype=torch.int8), x.new_empty(M, dtype=torch.float32),
            x.new_empty(capacity, dtype=torch.int32), x.new_empty(1, dtype=torch.int32))


def int8_vectorwise_quant(x: Tensor, threshold: float = 0.0, capacity: int | None = None,
                          excluded: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Vector-wise int8 quantization of each row, with LLM.int8() outlier-column detection, in one pass.

    No host sync: the outlier columns come back as a fixed-size device list, so the op works under CUDA
    graphs and ``torch.compile(fullgraph=True)``.

    Args:
        x: [M, K] float32/bfloat16/float16 with unit stride on K.
        threshold: columns holding any |x| >= threshold are outliers; <= 0 turns detection off.
        capacity: length of the returned outlier list; None (default): K, room for every column. With a
            shorter list and more outliers than it holds, int8_mm gives NaN (never a silently wrong product).
        excluded: [K] bool, columns fixed as outliers in advance (static mode), left out of the codes.

    Returns:
        codes [M, K] int8 = rint(127 x / absmax) (saturating at +-127 for elements >= threshold), for any
        representable row (subnormal ones included);
        row_scale [M] fp32 absmax over inlier elements (NaN for rows holding NaN/Inf);
        outlier_cols [capacity] int32 ascending, -1 padded; n_outliers [1] int32 (the true count).

    Raises:
        TypeError: x or excluded not a tensor of the listed dtype, capacity not an int, threshold not a number.
        ValueError: a wrong shape, stride or device, capacity < 0, threshold NaN.
    """
    check_tensor("int8_vectorwise_quant", "x", x, ACTIVATION_DTYPES, ndim=2)
    capacity = x.shape[1] if capacity is None else capacity
    _check_quant(x, threshold, capacity, excluded)
    return torch.ops.torchext.int8_vectorwise_quant(x, threshold, capacity, excluded)


# ---- int8_mm ------------------------------------------------------------------------------------------------------


def _check_w16(op: str, w16: Tensor | None, w16_slot: Tensor | None, N: int, K: int, tensors: dict) -> None:
    if (w16 is None) != (w16_slot is None):
        raise ValueError(f"{op}: w16 and w16_slot go together (the 16-bit columns and where each input column is)")
    if w16 is not None:
        check_tensor(op, "w16", w16, ACTIVATION_DTYPES, ndim=2)
        if w16.shape[0] != N:
            raise ValueError(f"{op}: w16 must be [N, n16] with N = {N}, got {tuple(w16.shape)}")
        check_unit_last_stride(op, "w16", w16)
        check_tensor(op, "w16_slot", w16_slot, (torch.int32,))
        check_shape(op, "w16_slot", w16_slot, (K,))
        tensors.update(w16=w16, w16_slot=w16_slot)


def _check_mm(a_codes, a_scale, w_codes, w_scale, bias, x, outlier_cols, n_outliers, w16, w16_slot) -> None:
    op = "int8_mm"
    check_tensor(op, "a_codes", a_codes, (torch.int8,), ndim=2)
    check_tensor(op, "w_codes", w_codes, (torch.int8,), ndim=2)
    M, K = a_codes.shape
    N = w_codes.shape[0]
    if w_codes.shape[1] != K:
        raise ValueError(f"{op}: w_codes must be [N, K] with K = {K} like a_codes, got {tuple(w_codes.shape)}")
    check_tensor(op, "a_scale", a_scale, (torch.float32,))
    check_shape(op, "a_scale", a_scale, (M,))
    check_tensor(op, "w_scale", w_scale, (torch.float32,))
    check_shape(op, "w_scale", w_scale, (N,))
    check_tensor(op, "x", x, ACTIVATION_DTYPES)
    check_shape(op, "x", x, (M, K))
    check_tensor(op, "outlier_cols", outlier_cols, (torch.int32,), ndim=1)
    check_tensor(op, "n_outliers", n_outliers, (torch.int32,))
    check_shape(op, "n_outliers", n_outliers, (1,))
    tensors = dict(a_codes=a_codes, a_scale=a_scale, w_codes=w_codes, w_scale=w_scale, x=x, outlier_cols=outlier_cols,
                   n_outliers=n_outliers)
    if bias is not None:
        check_tensor(op, "bias", bias, ACTIVATION_DTYPES)
        check_shape(op, "bias", bias, (N,))
        tensors["bias"] = bias
    _check_w16(op, w16, w16_slot, N, K, tensors)
    check_same_device(op, **tensors)
    check_unit_last_stride(op, "a_codes", a_codes)
    check_unit_last_stride(op, "x", x)


def _int8_mm_cpu(a_codes: Tensor, a_scale: Tensor, w_codes: Tensor, w_scale: Tensor, bias: Tensor | None, x: Tensor,
                 outlier_cols: Tensor, n_outliers: Tensor, w16: Tensor | None, w16_slot: Tensor | None) -> Tensor:
    """int8_mm on CPU tensors: an int8 GEMM into int32 (torch._int_mm, exact like the kernel's accumulator) with
    the outlier columns' codes zeroed, then the fp32 epilogue and the outlier columns' fp32 product. The host reads
    of the outlier count cost nothing on a CPU. Same contract as the reference (which multiplies in fp64)."""
    K = a_codes.shape[1]
    if not ref.usable(outlier_cols, n_outliers, K, w16, w16_slot):
        return x.new_full((a_codes.shape[0], w_codes.shape[0]), float("nan"))
    cols = outlier_cols[: int(n_outliers.item())].long()
    inliers = a_codes.index_fill(1, cols, 0) if cols.numel() else a_codes
    y = torch._int_mm(inliers.contiguous(), w_codes.t()).float()  # [M, N]; in place from here: one pass each
    y.mul_(ref.inf_as_nan(a_scale)[:, None]).mul_(ref.inf_as_nan(w_scale)[None, :] / ref.INT8_MAX ** 2)
    if cols.numel():
        y.addmm_(x[:, cols].float(), ref.outlier_weight_columns(w_codes, w_scale, cols, w16, w16_slot).T)
    if bias is not None:
        y.add_(bias.float())
    return y.to(x.dtype)


@torch.library.custom_op("torchext::int8_mm", mutates_args=())
def _int8_mm(a_codes: Tensor, a_scale: Tensor, w_codes: Tensor, w_scale: Tensor, bias: Tensor | None, x: Tensor,
             outlier_cols: Tensor, n_outliers: Tensor, w16: Tensor | None, w16_slot: Tensor | None) -> Tensor:
    _check_mm(a_codes, a_scale, w_codes, w_scale, bias, x, outlier_cols, n_outliers, w16, w16_slot)
    if a_codes.numel() == 0 or w_codes.shape[0] == 0:
        return ref.int8_mm(a_codes, a_scale, w_codes, w_scale, bias, x, outlier_cols, n_outliers, w16, w16_slot)
    if not use_triton(a_codes):
        return _int8_mm_cpu(a_codes, a_scale, w_codes, w_scale, bias, x, outlier_cols, n_outliers, w16, w16_slot)
    w16 = w16.to(x.dtype) if w16 is not None else None
    return kernels.int8_mm_fwd(a_codes, a_scale, w_codes, w_scale, bias, x, outlier_cols, n_outliers, w16, w16_slot,
                               x.dtype)


@_int8_mm.register_fake
def _(a_codes, a_scale, w_codes, w_scale, bias, x, outlier_cols, n_outliers, w16, w16_slot):
    _check_mm(a_codes, a_scale, w_codes, w_scale, bias, x, outlier_cols, n_outliers, w16, w16_slot)
    return x.new_empty((a_codes.shape[0], w_codes.shape[0]))


def int8_mm(a_codes: Tensor, a_scale: Tensor, w_codes: Tensor, w_scale: Tensor, bias: Tensor | None, x: Tensor,
            outlier_cols: Tensor, n_outliers: Tensor, w16: Tensor | None = None,
            w16_slot: Tensor | None = None) -> Tensor:
    """Int8 tensor-core GEMM with LLM.int8()'s dequantization and outlier decomposition fused in.

    Y = (A_i8 W_i8^T) a_scale w_scale^T / 127^2 + bias, where for each listed outlier column j the int8
    term is replaced by the fp32-accumulated product of x[:, j] and weight column j. Any M >= 1, K, N.

    Args:
        a_codes [M, K] int8, a_scale [M] fp32: from ``int8_vectorwise_quant(x)``.
        w_codes [N, K] int8 (any strides), w_scale [N] fp32: the weight quantized per output row.
        bias: [N] or None. x: [M, K] the activations (read only at outlier columns).
        outlier_cols [capacity] int32 ascending, n_outliers [1] int32: from the quant op or calibration.
        w16: [N, n16] weight columns kept in 16-bit, w16_slot: [K] int32 the w16 column of each input column
            or -1. Outlier columns with a slot use the 16-bit weight (the paper's decomposition); the others
            (or all, when both are None) use the dequantized int8 weight column (as bitsandbytes does).

    Returns:
        Y [M, N] in x.dtype. NaN where the outlier list cannot be applied exactly (all of Y), and in the rows /
        columns of a NaN or Inf a_scale / w_scale.

    Raises:
        TypeError: an argument not a tensor of its listed dtype. ValueError: a wrong shape, stride or device.
    """
    _check_mm(a_codes, a_scale, w_codes, w_scale, bias, x, outlier_cols, n_outliers, w16, w16_slot)
    return torch.ops.torchext.int8_mm(a_codes, a_scale, w_codes, w_scale, bias, x, outlier_cols, n_outliers, w16,
                                      w16_slot)


# ---- int8_linear --------------------------------------------------------------------------------------------------


def _check_linear(x: Tensor, w_codes: Tensor, w_scale: Tensor, bias: Tensor | None, threshold: float, capacity: int,
                  static_cols: Tensor | None, w16: Tensor | None, w16_slot: Tensor | None) -> None:
    """Everything the inner quant and GEMM ops would check, so that their errors name int8_linear."""
    op = "int8_linear"
    check_tensor(op, "x", x, ACTIVATION_DTYPES)
    check_tensor(op, "w_codes", w_codes, (torch.int8,), ndim=2)
    N, K = w_codes.shape
    if x.shape[-1] != K:
        raise ValueError(f"{op}: x has {x.shape[-1]} input features but the weight has {K}")
    check_unit_last_stride(op, "x", x)
    if not w_codes.is_contiguous():
        raise ValueError(f"{op}: w_codes must be contiguous [N, K] (the layout quantize_weight returns)")
    check_tensor(op, "w_scale", w_scale, (torch.float32,))
    check_shape(op, "w_scale", w_scale, (N,))
    tensors = dict(x=x, w_codes=w_codes, w_scale=w_scale)
    if bias is not None:
        check_tensor(op, "bias", bias, ACTIVATION_DTYPES)
        check_shape(op, "bias", bias, (N,))
        tensors["bias"] = bias
    _check_threshold(op, threshold)
    _check_capacity(op, capacity)
    if static_cols is not None:
        check_tensor(op, "static_cols", static_cols, (torch.int32,), ndim=1)
        tensors["static_cols"] = static_cols
    _check_w16(op, w16, w16_slot, N, K, tensors)
    check_same_device(op, **tensors)


def _quantize_activations(x2: Tensor, threshold: float, capacity: int, static_cols: Tensor | None):
    """(codes, scale, outlier_cols, n_outliers) for the rows x2 [M, K], dynamic or static."""
    if static_cols is None:
        return torch.ops.torchext.int8_vectorwise_quant(x2, threshold, capacity, None)
    excluded = ref.static_excluded(static_cols, x2.shape[1])
    codes, scale, _, _ = torch.ops.torchext.int8_vectorwise_quant(x2, 0.0, 0, excluded)
    count = torch.full((1,), static_cols.numel(), dtype=torch.int32, device=x2.device)
    return codes, scale, static_cols, count


@torch.library.custom_op("torchext::int8_linear", mutates_args=())
def _int8_linear(x: Tensor, w_codes: Tensor, w_scale: Tensor, bias: Tensor | None, threshold: float, capacity: int,
                 static_cols: Tensor | None, w16: Tensor | None, w16_slot: Tensor | None,
                 int8_backward: bool) -> Tensor:
    _check_linear(x, w_codes, w_scale, bias, threshold, capacity, static_cols, w16, w16_slot)
    x2 = x.reshape(x.shape[:-1].numel(), x.shape[-1])  # not -1: K may be 0
    codes, scale, cols, count = _quantize_activations(x2, threshold, capacity, static_cols)
    y = torch.ops.torchext.int8_mm(codes, scale, w_codes, w_scale, bias, x2, cols, count, w16, w16_slot)
    return y.view(*x.shape[:-1], w_codes.shape[0])


@_int8_linear.register_fake
def _(x, w_codes, w_scale, bias, threshold, capacity, static_cols, w16, w16_slot, int8_backward):
    _check_linear(x, w_codes, w_scale, bias, threshold, capacity, static_cols, w16, w16_slot)
    return x.new_empty((*x.shape[:-1], w_codes.shape[0]))


def _input_grad_int8(grad2: Tensor, w_codes: Tensor, w_scale: Tensor) -> Tensor:
    """grad_x = grad W with W = w_codes w_scale / 127, without materialising W: w_scale / 127 is folded into
    grad, which is quantized per row and multiplied with the stored codes (read transposed) in int8."""
    folded = grad2.float() * (w_scale / ref.INT8_MAX)  # [M, N]
    codes, scale, _, _ = torch.ops.torchext.int8_vectorwise_quant(folded, 0.0, 0, None)
    no_outliers = torch.zeros(1, dtype=torch.int32, device=grad2.device)
    unit_scale = torch.full((w_codes.shape[1],), float(ref.INT8_MAX), device=grad2.device)  # cancels one 1/127
    return torch.ops.torchext.int8_mm(codes, scale, w_codes.t(), unit_scale, None, folded, no_outliers[:0],
                                      no_outliers, None, None)


def _with_static_w16_grads(grad_x: Tensor, grad2: Tensor, static_cols: Tensor, w16: Tensor,
                           w16_slot: Tensor) -> Tensor:
    """grad_x with grad2 @ w16[:, slot] at the static columns that have a 16-bit weight column (the forward used it
    there). No host read: a column outside [0, K) or without a usable slot writes into a scratch column past K."""
    K = grad_x.shape[1]
    if K == 0 or w16.shape[1] == 0 or static_cols.numel() == 0:
        return grad_x
    cols = static_cols.long()
    in_range = (cols >= 0) & (cols < K)
    slots = w16_slot[torch.where(in_range, cols, 0)].long()
    kept = in_range & (slots >= 0) & (slots < w16.shape[1])
    grads16 = grad2.float() @ w16[:, torch.where(kept, slots, 0)].float()  # [M, n]
    padded = torch.cat((grad_x, grad_x.new_zeros(grad_x.shape[0], 1)), dim=1)
    return padded.index_copy(1, torch.where(kept, cols, K), grads16)[:, :K]


def _int8_linear_setup(ctx, inputs, output):
    x, w_codes, w_scale, bias, _, _, static_cols, w16, w16_slot, ctx.int8_backward = inputs
    ctx.x_shape, ctx.x_dtype, ctx.has_bias = x.shape, x.dtype, bias is not None
    ctx.save_for_backward(w_codes, w_scale, static_cols, w16, w16_slot)


def _int8_linear_grad(ctx, grad_out):
    w_codes, w_scale, static_cols, w16, w16_slot = ctx.saved_tensors
    grad2 = grad_out.reshape(ctx.x_shape[:-1].numel(), w_codes.shape[0])  # not -1: N may be 0
    if ctx.int8_backward:
        grad_x = _input_grad_int8(grad2, w_codes, w_scale)
    else:  # the default, bitsandbytes' input gradient: the dequantized weight in the activations' dtype
        weight = w_codes.to(ctx.x_dtype).mul_((w_scale / ref.INT8_MAX).to(ctx.x_dtype)[:, None])  # [N, K], one copy
        grad_x = (grad2.to(ctx.x_dtype) @ weight).float()
    if static_cols is not None and w16 is not None:
        grad_x = _with_static_w16_grads(grad_x, grad2, static_cols, w16, w16_slot)
    grad_bias = grad2.sum(0) if ctx.has_bias else None
    return grad_x.to(ctx.x_dtype).view(ctx.x_shape), None, None, grad_bias, None, None, None, None, None, None


_int8_linear.register_autograd(_int8_linear_grad, setup_context=_int8_linear_setup)


def int8_linear(x: Tensor, w_codes: Tensor, w_scale: Tensor, bias: Tensor | None = None, threshold: float = 6.0,
                capacity: int | None = None, static_cols: Tensor | None = None, w16: Tensor | None = None,
                w16_slot: Tensor | None = None, int8_backward: bool = False) -> Tensor:
    """LLM.int8() linear layer: quantize x per row, find outlier columns, int8 GEMM with fused dequantization.

    Args:
        x: [..., K] float32/bfloat16/float16 (unit stride on K).
        w_codes: [N, K] int8 and w_scale: [N] fp32 (``torchext.reference.int8_matmul.quantize_weight``).
        bias: [N] or None (gets a gradient when it requires one).
        threshold: dynamic mode: columns of this x holding any |x| >= threshold take the 16-bit path.
        capacity: the length of the outlier list; None (default): K, so any number of outlier columns is exact.
            A shorter list that overflows gives NaN outputs, never silently wrong ones.
        static_cols: [n] int32 ascending: a fixed outlier set (static mode: batch-invariant results). A column
            outside [0, K) gives NaN outputs (checked on the device, like any unusable outlier list).
        w16, w16_slot: weight columns kept in 16-bit and the w16 column of each input column (-1: none);
            outlier columns with a copy use it (the paper), the others the dequantized codes (see int8_mm).
        int8_backward: input gradient by int8 GEMM on the stored codes (True: no dequantized weight in memory,
            2.5x the error on a real FFN layer) or, the default, grad_out times the weight dequantized to x's
            dtype (bitsandbytes' input gradient).

    Returns:
        [..., N] in x.dtype (K = 0 gives bias, or zeros). Gradients flow to x (and bias); the int8 weight is frozen.

    Raises:
        TypeError: a tensor argument not a tensor of its listed dtype, capacity not an int, threshold not a number.
        ValueError: a wrong shape, stride or device, capacity < 0, threshold NaN.
    """
    check_tensor("int8_linear", "w_codes", w_codes, (torch.int8,), ndim=2)
    capacity = w_codes.shape[1] if capacity is None else capacity
    _check_linear(x, w_codes, w_scale, bias, threshold, capacity, static_cols, w16, w16_slot)
    return torch.ops.torchext.int8_linear(x, w_codes, w_scale, bias, threshold, capacity, static_cols, w16, w16_slot,
                                          int8_backward)
