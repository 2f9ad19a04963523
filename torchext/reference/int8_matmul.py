"""Pure-PyTorch reference for LLM.int8() (Dettmers et al., arXiv 2208.07339), written from the paper.

Vector-wise quantization (section 3.2): each activation row and each weight row (output feature) gets its
own absmax scale c, codes are round(127 x / c), and the int32 product is dequantized with c_x c_w / 127^2.
Mixed-precision decomposition (section 3.3): input-feature columns holding any |x| >= threshold are
computed in 16-bit instead: Y = X[:, O] W[:, O]^T + S * (X_i8[:, not O] W_i8[:, not O]^T).

Conventions shared with the kernels (so codes match exactly):
- a row's scale is its absmax over elements with |x| < threshold (all elements when threshold <= 0),
  stored as is (bitsandbytes' SCB convention), and a row with absmax 0 gets codes 0, not a division by 0;
- codes are rint(x * (127 / absmax)) clamped to [-127, 127] (fp32 math, ties to even; a row with
  absmax < 2^-64 is scaled by 2^64 first, so 127 / absmax cannot overflow); elements at or above the
  threshold saturate, and the outlier correction removes their int8 contribution exactly;
- a row holding NaN or Inf gets scale NaN, so its output row is NaN instead of silently finite; an Inf
  scale given to int8_mm counts as NaN (codes * Inf is not a number at a zero code);
- outlier columns are listed in ascending order, at most `capacity` of them; the count is the true one.
"""

import torch
from torch import Tensor

INT8_MAX = 127
# 127 / absmax overflows fp32 for absmax below ~2^-121 (tiny normal and subnormal rows): such a row and its absmax
# are first multiplied by 2^64, exactly, so the codes are still rint(127 x / absmax). Every row whose 127 / absmax
# is finite gets bit-identical codes either way (scaling by a power of two commutes with fp32 rounding there).
TINY_ABSMAX, TINY_LIFT = 2.0 ** -64, 2.0 ** 64


def int8_vectorwise_quant(x: Tensor, threshold: float = 0.0, capacity: int | None = None,
                          excluded: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Quantize each row of x to int8 and find the outlier columns.

    Args:
        x: [M, K] float32/bfloat16/float16 activations (or weights, with threshold 0).
        threshold: |x| at or above which an input-feature column is an outlier; <= 0 disables detection.
        capacity: length of the returned column list (a fixed size, so no host sync is ever needed); None: K,
            room for every column, so the decomposition is exact whatever the count.
        excluded: [K] bool, columns fixed as outliers in advance (static mode): code 0, left out of the
            absmax and of the detected list.

    Returns:
        codes: [M, K] int8; row_scale: [M] fp32 absmax; outlier_cols: [capacity] int32, ascending, padded
        with -1; n_outliers: [1] int32, the number of outlier columns (may exceed capacity).
    """
    capacity = x.shape[1] if capacity is None else capacity
    xf = x.float()
    magnitude = xf.abs()
    inlier = magnitude < threshold if threshold > 0 else torch.ones_like(magnitude, dtype=torch.bool)
    kept = torch.ones(x.shape[1], dtype=torch.bool, device=x.device) if excluded is None else ~excluded
    inlier = inlier & kept
    absmax = torch.where(inlier & magnitude.isfinite(), magnitude, 0.0).amax(dim=1) if x.shape[1] else \
        xf.new_zeros(x.shape[0])
    finite_rows = xf.isfinite().all(dim=1)
    lift = torch.where((absmax > 0) & (absmax < TINY_ABSMAX), TINY_LIFT, 1.0)  # exact: a power of two
    inv = torch.where(absmax > 0, INT8_MAX / (absmax * lift), 0.0)
    codes = torch.where(finite_rows[:, None] & kept, (xf * lift[:, None]) * inv[:, None], 0.0)
    codes = codes.round().clamp(-INT8_MAX, INT8_MAX)
    row_scale = torch.where(finite_rows, absmax, float("nan"))
    is_outlier = (magnitude >= threshold).any(dim=0) & kept if threshold > 0 and x.shape[0] else \
        torch.zeros(x.shape[1], dtype=torch.bool, device=x.device)
    cols = is_outlier.nonzero().flatten().to(torch.int32)
    outlier_cols = torch.full((capacity,), -1, dtype=torch.int32, device=x.device)
    kept = cols[:capacity]
    outlier_cols[: kept.numel()] = kept
    n_outliers = torch.tensor([cols.numel()], dtype=torch.int32, device=x.device)
    return codes.to(torch.int8), row_scale, outlier_cols, n_outliers


def int8_dequantize(codes: Tensor, row_scale: Tensor) -> Tensor:
    """codes [M, K] int8, row_scale [M] -> codes * row_scale / 127 in fp32."""
    return codes.float() * (row_scale.float()[:, None] / INT8_MAX)


def inf_as_nan(scale: Tensor) -> Tensor:
    """An Inf scale dequantizes its zero codes to 0 * Inf = NaN and the others to +-Inf: its products are not
    numbers, whatever order they are summed in, so it is taken as NaN (and the kernel does the same)."""
    return torch.where(scale.isinf(), float("nan"), scale)


def static_excluded(static_cols: Tensor, K: int) -> Tensor:
    """[K] bool, True at the static outlier columns (left out of the codes). A column outside [0, K) marks
    nothing (int8_mm then gives NaN for the list): no host read, no out-of-range write."""
    cols = static_cols.long()
    marks = torch.zeros(K + 1, dtype=torch.bool, device=static_cols.device)  # the last one takes the bad columns
    return marks.index_fill_(0, torch.where((cols >= 0) & (cols < K), cols, K), True)[:K]


def usable(outlier_cols: Tensor, n_outliers: Tensor, K: int, w16: Tensor | None, w16_slot: Tensor | None) -> bool:
    """Whether the outlier list can be applied exactly: at most its capacity, columns in [0, K), slots inside w16.
    int8_mm gives NaN otherwise (the kernel's device-side check: never an out-of-range read, never a silently
    wrong number)."""
    n = int(n_outliers.item())
    if not 0 <= n <= outlier_cols.numel():
        return False
    cols = outlier_cols[:n].long()
    if ((cols < 0) | (cols >= K)).any():
        return False
    return w16 is None or not (w16_slot[cols] >= w16.shape[1]).any()


def outlier_weight_columns(w_codes: Tensor, w_scale: Tensor, cols: Tensor, w16: Tensor | None,
                           w16_slot: Tensor | None) -> Tensor:
    """[N, n] fp32: the weight columns the outlier columns cols [n] multiply, their 16-bit copy where w16_slot has
    one, else the dequantized codes (bitsandbytes' choice for every column)."""
    w_deq = int8_dequantize(w_codes[:, cols], w_scale)
    if w16 is None:
        return w_deq
    slots = w16_slot[cols].long()
    return torch.where((slots >= 0)[None, :], w16[:, slots.clamp(min=0)].float(), w_deq)


def int8_mm(a_codes: Tensor, a_scale: Tensor, w_codes: Tensor, w_scale: Tensor, bias: Tensor | None,
            x: Tensor, outlier_cols: Tensor, n_outliers: Tensor, w16: Tensor | None = None,
            w16_slot: Tensor | None = None) -> Tensor:
    """Y = (A_i8 W_i8^T) * a_scale w_scale^T / 127^2 + bias + outlier correction, in x.dtype.

    Args:
        a_codes: [M, K] int8, a_scale: [M] fp32 (from int8_vectorwise_quant of x).
        w_codes: [N, K] int8, w_scale: [N] fp32 (the weight, quantized per output row).
        bias: [N] or None.
        x: [M, K] the 16-bit activations the codes came from (read only at outlier columns).
        outlier_cols: [capacity] int32 ascending, -1 padded; n_outliers: [1] int32.
        w16: [N, n16] weight columns kept in 16-bit, and w16_slot: [K] int32, the w16 column of each input
            column or -1. An outlier column with a slot uses its 16-bit weight (the paper's decomposition);
            one without uses the dequantized int8 weight column (what bitsandbytes always does).

    For every listed outlier column j the int8 contribution a_codes[:, j] w_codes[:, j] (dequantized) is
    replaced by the fp32 product of x[:, j] and the weight column. A list that cannot be applied exactly (more
    outliers than its length, a column outside [0, K), a slot outside w16) gives a NaN output. An Inf in
    a_scale or w_scale gives NaN in its output row or column (like a NaN scale).
    """
    a_scale, w_scale = inf_as_nan(a_scale), inf_as_nan(w_scale)
    acc = a_codes.double() @ w_codes.double().T  # exact, like the int32 accumulator (fp32 is not past K ~ 1000)
    y = acc * (a_scale.double()[:, None] * w_scale.double()[None, :]) / INT8_MAX ** 2
    if not usable(outlier_cols, n_outliers, a_codes.shape[1], w16, w16_slot):
        return torch.full_like(y, float("nan")).to(x.dtype)
    n = int(n_outliers.item())
    if n:
        cols = outlier_cols[:n].long()
        w_deq = int8_dequantize(w_codes[:, cols], w_scale).double()  # [N, n]
        int8_part = int8_dequantize(a_codes[:, cols], a_scale).double() @ w_deq.T
        w_cols = outlier_weight_columns(w_codes, w_scale, cols, w16, w16_slot).double()
        y = y - int8_part + x[:, cols].double() @ w_cols.T
    if bias is not None:
        y = y + bias.double()
    return y.to(x.dtype)


def int8_linear(x: Tensor, w_codes: Tensor, w_scale: Tensor, bias: Tensor | None, threshold: float = 6.0,
                capacity: int | None = None, static_cols: Tensor | None = None, w16: Tensor | None = None,
                w16_slot: Tensor | None = None) -> Tensor:
    """LLM.int8() linear layer: x [..., K] -> [..., N] in x.dtype.

    Dynamic mode (static_cols None): the outlier columns are the ones of this x with |x| >= threshold (a list of
    ``capacity`` slots, default K: NaN if more are found, see int8_mm). Static mode: static_cols [n] int32
    ascending (from calibration) whatever x holds; a column outside [0, K) gives a NaN output (see int8_mm).
    w16 / w16_slot: the weight columns kept in 16-bit (see int8_mm).
    """
    x2 = x.reshape(x.shape[:-1].numel(), x.shape[-1])  # not -1: K may be 0
    if static_cols is None:
        a_codes, a_scale, cols, count = int8_vectorwise_quant(x2, threshold, capacity)
    else:
        excluded = static_excluded(static_cols, x2.shape[1])
        a_codes, a_scale, _, _ = int8_vectorwise_quant(x2, 0.0, 0, excluded)
        cols, count = static_cols, torch.tensor([static_cols.numel()], dtype=torch.int32, device=x.device)
    y = int8_mm(a_codes, a_scale, w_codes, w_scale, bias, x2, cols, count, w16, w16_slot)
    return y.reshape(*x.shape[:-1], w_codes.shape[0])


def quantize_weight(weight: Tensor) -> tuple[Tensor, Tensor]:
    """weight [N, K] -> (codes [N, K] int8, scale [N] fp32 absmax): the layout bitsandbytes stores (CB, SCB)."""
    codes, scale, _, _ = int8_vectorwise_quant(weight, 0.0, 0)
    return codes, scale
