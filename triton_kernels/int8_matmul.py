"""Triton int8 GEMM for LLM.int8() (arXiv 2208.07339) with the whole dequantization fused into the epilogue.

Y[m, n] = acc[m, n] * a_scale[m] * w_scale[n] / 127^2 + bias[n] + outlier correction, stored in the output
dtype, where acc is the int32 sum of int8 products (tensor cores). For each listed outlier column j the
correction removes the int8 term a_codes[m, j] w_codes[n, j] from acc (exactly, in int32) and adds the
fp32-accumulated 16-bit product of x[m, j] and the weight column: the one kept in 16-bit when the column
has a w16 slot (the paper's decomposition), else the dequantized int8 column (what bitsandbytes does). The
outlier list is read on the device, so nothing here syncs with the host.
"""

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._launch import GPU_TILES, dot, dot_dtype

INT8_MAX = tl.constexpr(127)  # kernels read only constexpr globals (a plain int works only in the interpreter)


@triton.jit
def _inf_as_nan(scale):
    return tl.where(tl.abs(scale) == float("inf"), float("nan"), scale)


@triton.jit
def _int8_mm_fwd_kernel(a_ptr, a_scale_ptr, w_ptr, w_scale_ptr, bias_ptr, x_ptr, cols_ptr, n_cols_ptr, w16_ptr,
                        slot_ptr, out_ptr, M, N, K, capacity, n16, a_stride, w_stride_n, w_stride_k, x_stride,
                        w16_stride,
                        HAS_BIAS: tl.constexpr, HAS_W16: tl.constexpr, DOT16: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                        BLOCK_O: tl.constexpr, GROUP_M: tl.constexpr):
    # Grouped program order: GROUP_M row tiles share each column tile of W while it is in L2.
    pid = tl.program_id(0)
    tiles_m, tiles_n = tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N)
    group_size = GROUP_M * tiles_n
    first_m = (pid // group_size) * GROUP_M
    rows_in_group = tl.minimum(tiles_m - first_m, GROUP_M)
    pid_m = first_m + (pid % group_size) % rows_in_group
    pid_n = (pid % group_size) // rows_in_group

    rm = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)  # [BLOCK_M]
    rn = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)  # [BLOCK_N]
    m_mask, n_mask = rm < M, rn < N
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.int32)
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        a = tl.load(a_ptr + rm[:, None] * a_stride + rk[None, :], mask=m_mask[:, None] & (rk[None, :] < K),
                    other=0)  # [BLOCK_M, BLOCK_K] int8
        w = tl.load(w_ptr + rn[None, :] * w_stride_n + rk[:, None] * w_stride_k,
                    mask=n_mask[None, :] & (rk[:, None] < K), other=0)  # [BLOCK_K, BLOCK_N] int8, W^T
        acc = tl.dot(a, w, acc, out_dtype=tl.int32)

    # Outlier columns, BLOCK_O at a time: int8 terms out of acc; x times 16-bit weight columns into acc16,
    # x times int8 weight codes (columns without a 16-bit copy) into acc_deq, scaled by w_scale / 127 below.
    # A list the kernel cannot use exactly (more outliers than its capacity, a column outside [0, K), a slot
    # outside w16) is never read out of range and makes the whole output NaN: wrong, but never silently.
    acc16 = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    acc_deq = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    n_listed = tl.load(n_cols_ptr)
    n_outliers = tl.minimum(n_listed, capacity)
    unusable = tl.zeros([BLOCK_O], dtype=tl.int1)  # per lane, reduced once after the loop
    for o0 in range(0, n_outliers, BLOCK_O):
        ro = o0 + tl.arange(0, BLOCK_O)
        col = tl.load(cols_ptr + ro, mask=ro < n_outliers, other=0).to(tl.int64)  # [BLOCK_O]
        o_mask = (ro < n_outliers) & (col >= 0) & (col < K)
        unusable |= (ro < n_outliers) & ~o_mask
        a_mask, w_mask = m_mask[:, None] & o_mask[None, :], o_mask[:, None] & n_mask[None, :]
        a_out = tl.load(a_ptr + rm[:, None] * a_stride + col[None, :], mask=a_mask, other=0)  # [BLOCK_M, BLOCK_O]
        w_out = tl.load(w_ptr + rn[None, :] * w_stride_n + col[:, None] * w_stride_k, mask=w_mask, other=0)
        acc -= tl.dot(a_out, w_out, out_dtype=tl.int32)
        x_out = tl.load(x_ptr + rm[:, None] * x_stride + col[None, :], mask=a_mask, other=0.0).to(DOT16)
        if HAS_W16:
            slot = tl.load(slot_ptr + col, mask=o_mask, other=-1).to(tl.int64)  # [BLOCK_O]
            unusable |= slot >= n16
            slot = tl.where(slot < n16, slot, -1)
            kept = (slot >= 0)[:, None]
            w16 = tl.load(w16_ptr + rn[None, :] * w16_stride + slot[:, None], mask=w_mask & kept, other=0.0)
            acc16 = dot(x_out, w16, acc16, DOT16)
            w_out = tl.where(kept, 0, w_out)
        acc_deq = dot(x_out, w_out, acc_deq, DOT16)

    # An Inf scale counts as NaN, as in the reference: its dequantized codes are +-Inf and 0 * Inf, not numbers,
    # whatever order they are summed in (scaling acc after the sum alone would give +-Inf for some of them).
    a_scale = _inf_as_nan(tl.load(a_scale_ptr + rm, mask=m_mask, other=0.0))
    w_scale = _inf_as_nan(tl.load(w_scale_ptr + rn, mask=n_mask, other=0.0))
    y = acc.to(tl.float32) * (a_scale[:, None] * (w_scale[None, :] * (1.0 / (INT8_MAX * INT8_MAX))))
    y += acc16 + acc_deq * (w_scale[None, :] * (1.0 / INT8_MAX))
    if HAS_BIAS:
        y += tl.load(bias_ptr + rn, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    unusable = (tl.max(unusable.to(tl.int32), axis=0) > 0) | (n_listed > capacity) | (n_listed < 0)
    y = tl.where(unusable, float("nan"), y)
    out_mask = m_mask[:, None] & n_mask[None, :]
    tl.store(out_ptr + rm[:, None] * N + rn[None, :], y.to(out_ptr.dtype.element_ty), mask=out_mask)


def _tiles(M: int, N: int, K: int, w16: bool, fp32_x: bool) -> dict:
    """Tile shapes by regime. Decode (M <= 16) streams W with tall-K tiles; prefill uses 64x128 tiles, 32x64 where
    the outlier epilogue also holds 16-bit weight columns (w16), 32x32 for fp32 activations (fp32_x: the outlier
    dot runs on the FMA units with both operands in registers); decode takes 32-wide tiles for either.

    The interpreter gets tiles that cover small test problems in a few programs.
    """
    if not GPU_TILES:
        fit = lambda n, lo, hi: max(lo, min(hi, triton.next_power_of_2(n)))  # noqa: E731
        return dict(BLOCK_M=fit(M, 16, 64), BLOCK_N=fit(N, 16, 64), BLOCK_K=fit(K, 32, 128), num_warps=4,
                    num_stages=1)
    if M <= 16:  # with fp32 activations, 64-wide tiles spilled 24-56 bytes per thread (sm_90, Triton 3.6)
        return dict(BLOCK_M=16, BLOCK_N=32 if w16 or fp32_x else 64, BLOCK_K=256, num_warps=4, num_stages=4)
    # The int32 tile and the two fp32 outlier accumulators share the registers: 128 x 128 spilled 500-2000 bytes
    # per thread (sm_80 / sm_90 offline compile, bench/results/offline/); these spill none (32 x 64 with fp32
    # activations sat at 255 registers and spilled 8 bytes on sm_90 once the outlier list was checked).
    if fp32_x:
        return dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=128, num_warps=8, num_stages=4)
    if w16:
        return dict(BLOCK_M=32, BLOCK_N=64, BLOCK_K=128, num_warps=8, num_stages=4)
    return dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=128, num_warps=8, num_stages=4)


def _dot16(x: Tensor):
    """The operand type of the outlier dot: x's own tensor-core type for 16-bit x (exact products, fp32 sums), fp32
    for fp32 and fp64 x (and on the interpreter, see dot_dtype)."""
    return tl.float32 if x.dtype == torch.float64 else dot_dtype(x.dtype)


def int8_mm_fwd(a_codes: Tensor, a_scale: Tensor, w_codes: Tensor, w_scale: Tensor, bias: Tensor | None,
                x: Tensor, outlier_cols: Tensor, n_outliers: Tensor, w16: Tensor | None, w16_slot: Tensor | None,
                out_dtype: torch.dtype) -> Tensor:
    """a_codes [M, K] int8 (unit stride on K), a_scale [M] fp32; w_codes [N, K] int8 with any strides (a
    transposed view serves the input-gradient GEMM), w_scale [N] fp32; bias [N] or None; x [M, K] with unit
    stride on K; outlier_cols [capacity] int32, n_outliers [1] int32; w16 [N, n16] in x.dtype with unit
    stride on n16 and w16_slot [K] int32, or both None. Returns [M, N] contiguous in out_dtype."""
    M, K = a_codes.shape
    N = w_codes.shape[0]
    out = torch.empty((M, N), dtype=out_dtype, device=a_codes.device)
    tiles, dot16 = _tiles(M, N, K, w16 is not None, x.dtype.itemsize >= 4), _dot16(x)
    grid = (triton.cdiv(M, tiles["BLOCK_M"]) * triton.cdiv(N, tiles["BLOCK_N"]),)
    _int8_mm_fwd_kernel[grid](
        a_codes, a_scale, w_codes, w_scale, bias if bias is not None else a_scale, x, outlier_cols, n_outliers,
        w16 if w16 is not None else x, w16_slot if w16_slot is not None else outlier_cols, out, M, N, K,
        outlier_cols.numel(), w16.shape[1] if w16 is not None else 0, a_codes.stride(0), w_codes.stride(0),
        w_codes.stride(1), x.stride(0), w16.stride(0) if w16 is not None else 0,
        HAS_BIAS=bias is not None, HAS_W16=w16 is not None, DOT16=dot16,
        BLOCK_O=32, GROUP_M=8, **tiles)
    return out
