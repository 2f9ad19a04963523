"""Triton kernels for nGPT (arXiv 2410.01131): row L2 norm, the hypersphere residual update,
fused RoPE + QK-norm, and scaled SwiGLU, each with its backward.

Conventions: fp32 math on every tile (bf16/fp16 upcast on load), int64 offsets, every load and
store masked. Launchers take 2-D row views ([rows, n], unit stride along n) and return contiguous
outputs; the ops layer checks inputs. Backward kernels recompute the norms from the inputs instead
of saving them: they must read the inputs anyway, so this costs no extra memory traffic.
"""

import math

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._launch import (MAX_ROW_ELEMENTS, accumulator_dtype, compute_dtype, elementwise_tile, reduction_grid, row_tile,
                      split_row_tile)


# ---- shared pieces: y = x / max(||x||, eps) on [BLOCK_M, BLOCK_N] fp32 tiles ----------------------------------


# Norms are taken of x / scale with scale = max|x| over the row (1 for a zero row), as LAPACK's nrm2 does, so that
# they cannot overflow (or flush to zero) where x itself is representable: rows of 1e30 normalise to unit rows,
# not 0. ||x|| = scale ||x / scale|| itself is never formed (it overflows for rows peaking near 3e38, whose unit
# vector is representable): y = (x / scale) / max(||x / scale||, eps / scale). NaN anywhere in a row makes its
# norm, and so the whole row, NaN.


@triton.jit
def _inv_norm(sum_sq, scale, eps):
    """From sum_sq = ||x / scale||^2 [BLOCK_M, 1] (or scalars): (to_unit, inv, above_eps) with to_unit =
    1 / max(||x / scale||, eps / scale), the factor that takes x / scale to x / max(||x||, eps); inv =
    1 / max(||x||, eps), which scales the gradients; above_eps = ||x|| > eps."""
    norm_s, eps_s = tl.sqrt(sum_sq), eps / scale
    to_unit = 1.0 / tl.maximum(norm_s, eps_s, propagate_nan=tl.PropagateNan.ALL)
    return to_unit, to_unit / scale, norm_s > eps_s


@triton.jit
def _row_scale(x):
    """max|x| of each row of x [BLOCK_M, BLOCK_N] -> [BLOCK_M, 1], 1 for a zero row."""
    amax = tl.max(tl.abs(x), axis=1)[:, None]
    return tl.where(amax > 0, amax, 1.0)


@triton.jit
def _unit(x, eps):
    """(x / max(||x||, eps), inv, above_eps) of each row of x [BLOCK_M, BLOCK_N] (see _inv_norm)."""
    scale = _row_scale(x)
    xs = x / scale
    to_unit, inv, above_eps = _inv_norm(tl.sum(xs * xs, axis=1)[:, None], scale, eps)
    return xs * to_unit, inv, above_eps


@triton.jit
def _add_squares(sum_sq, scale, x):
    """Add chunk x [BLOCK_N] to a row's running squares, kept per lane relative to the lane's running max|x|:
    (sum_sq, scale) [BLOCK_N] -> the same after x (nrm2's update, so a long row never overflows either)."""
    new_scale = tl.maximum(scale, tl.abs(x))
    safe = tl.where(new_scale > 0, new_scale, 1.0)
    ratio, xs = scale / safe, x / safe
    return sum_sq * (ratio * ratio) + xs * xs, new_scale


@triton.jit
def _add_dot(dot, scale, x, dy):
    """Add chunk x.dy [BLOCK_N] to a row's running dot product, kept per lane relative to the lane's running
    max|x| as _add_squares keeps the squares (scale is the one before x), so that it cannot overflow either."""
    new_scale = tl.maximum(scale, tl.abs(x))
    safe = tl.where(new_scale > 0, new_scale, 1.0)
    return dot * (scale / safe) + (x / safe) * dy


@triton.jit
def _lanes_dot(dot, scale, row_scale):
    """x.dy / row_scale from the per-lane running dot products of _add_dot."""
    return tl.sum(dot * (scale / row_scale), axis=0)


@triton.jit
def _lanes_inv_norm(sum_sq, scale, eps):
    """(row_scale, to_unit, inv, above_eps) of a row from its per-lane running squares (_add_squares): its unit
    vector is (x / row_scale) * to_unit (see _inv_norm)."""
    row_scale = tl.max(scale, axis=0)
    row_scale = tl.where(row_scale > 0, row_scale, 1.0)
    ratio = scale / row_scale
    to_unit, inv, above_eps = _inv_norm(tl.sum(sum_sq * (ratio * ratio), axis=0), row_scale, eps)
    return row_scale, to_unit, inv, above_eps


@triton.jit
def _unit_bwd(dy, y, inv, above_eps):
    """dx for y = x / max(||x||, eps): (dy - y (y.dy)) / ||x||, or dy / eps where the norm was clamped."""
    y_dot_dy = tl.where(above_eps, tl.sum(y * dy, axis=1)[:, None], 0.0)
    return (dy - y * y_dot_dy) * inv


@triton.jit
def _row_offsets(row_start, n_rows, n_cols, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    rows = row_start + tl.arange(0, BLOCK_M)  # [BLOCK_M] int64
    cols = tl.arange(0, BLOCK_N)
    mask = (rows[:, None] < n_rows) & (cols[None, :] < n_cols)  # [BLOCK_M, BLOCK_N]
    return rows[:, None], cols[None, :], mask


# ---- l2_normalize ---------------------------------------------------------------------------------------------


@triton.jit
def _l2_normalize_fwd_kernel(x_ptr, y_ptr, n_rows, n_cols, x_row_stride, eps,
                             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, COMPUTE: tl.constexpr):
    row_start = tl.program_id(0).to(tl.int64) * BLOCK_M
    rows, cols, mask = _row_offsets(row_start, n_rows, n_cols, BLOCK_M, BLOCK_N)
    x = tl.load(x_ptr + rows * x_row_stride + cols, mask=mask, other=0.0).to(COMPUTE)
    y, _, _ = _unit(x, eps)
    tl.store(y_ptr + rows * n_cols + cols, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _l2_normalize_bwd_kernel(dy_ptr, x_ptr, dx_ptr, n_rows, n_cols, x_row_stride, eps,
                             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, COMPUTE: tl.constexpr):
    row_start = tl.program_id(0).to(tl.int64) * BLOCK_M
    rows, cols, mask = _row_offsets(row_start, n_rows, n_cols, BLOCK_M, BLOCK_N)
    x = tl.load(x_ptr + rows * x_row_stride + cols, mask=mask, other=0.0).to(COMPUTE)
    dy = tl.load(dy_ptr + rows * n_cols + cols, mask=mask, other=0.0).to(COMPUTE)
    y, inv, above_eps = _unit(x, eps)
    tl.store(dx_ptr + rows * n_cols + cols, _unit_bwd(dy, y, inv, above_eps).to(dx_ptr.dtype.element_ty), mask=mask)


def l2_normalize_fwd(x: Tensor, eps: float) -> Tensor:
    """x: [rows, n] with unit column stride -> y = x / max(||x||, eps) per row, contiguous, x.dtype."""
    n_rows, n_cols = x.shape
    y = torch.empty((n_rows, n_cols), dtype=x.dtype, device=x.device)
    if n_cols > MAX_ROW_ELEMENTS:
        block_n, num_warps = split_row_tile(n_cols)
        _l2_normalize_split_fwd_kernel[(n_rows,)](x, y, n_cols, x.stride(0), eps, BLOCK_N=block_n,
                                                  num_warps=num_warps, COMPUTE=compute_dtype(x.dtype))
        return y
    block_m, block_n, num_warps = row_tile(n_rows, n_cols)
    _l2_normalize_fwd_kernel[(triton.cdiv(n_rows, block_m),)](
        x, y, n_rows, n_cols, x.stride(0), eps, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps,
        COMPUTE=compute_dtype(x.dtype))
    return y


def l2_normalize_bwd(dy: Tensor, x: Tensor, eps: float) -> Tensor:
    """dy: [rows, n] contiguous, x: [rows, n] row view -> dx [rows, n] contiguous, x.dtype."""
    n_rows, n_cols = x.shape
    dx = torch.empty((n_rows, n_cols), dtype=x.dtype, device=x.device)
    if n_cols > MAX_ROW_ELEMENTS:
        block_n, num_warps = split_row_tile(n_cols)
        _l2_normalize_split_bwd_kernel[(n_rows,)](dy, x, dx, n_cols, x.stride(0), eps, BLOCK_N=block_n,
                                                  num_warps=num_warps, COMPUTE=compute_dtype(x.dtype))
        return dx
    block_m, block_n, num_warps = row_tile(n_rows, n_cols)
    _l2_normalize_bwd_kernel[(triton.cdiv(n_rows, block_m),)](
        dy, x, dx, n_rows, n_cols, x.stride(0), eps, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps,
        COMPUTE=compute_dtype(x.dtype))
    return dx


# ---- hypersphere_update: h' = Norm(h + |alpha| (Norm(h_branch) - h)), eqs. 10-11 ------------------------------


@triton.jit
def _hypersphere_update_fwd_kernel(h_ptr, b_ptr, alpha_ptr, out_ptr, n_rows, n_cols, h_row_stride, b_row_stride,
                                   eps, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, COMPUTE: tl.constexpr):
    row_start = tl.program_id(0).to(tl.int64) * BLOCK_M
    rows, cols, mask = _row_offsets(row_start, n_rows, n_cols, BLOCK_M, BLOCK_N)
    h = tl.load(h_ptr + rows * h_row_stride + cols, mask=mask, other=0.0).to(COMPUTE)
    b = tl.load(b_ptr + rows * b_row_stride + cols, mask=mask, other=0.0).to(COMPUTE)
    a = tl.abs(tl.load(alpha_ptr + cols, mask=cols < n_cols, other=0.0).to(COMPUTE))  # [1, BLOCK_N]
    b_unit, _, _ = _unit(b, eps)
    out, _, _ = _unit(h + a * (b_unit - h), eps)
    tl.store(out_ptr + rows * n_cols + cols, out.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _hypersphere_update_bwd_kernel(dout_ptr, h_ptr, b_ptr, alpha_ptr, dh_ptr, db_ptr, dalpha_partial_ptr,
                                   n_rows, n_cols, h_row_stride, b_row_stride, blocks_per_program, eps,
                                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, COMPUTE: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    a_cols = tl.arange(0, BLOCK_N)
    a = tl.abs(tl.load(alpha_ptr + a_cols, mask=a_cols < n_cols, other=0.0).to(COMPUTE))[None, :]
    # Each program owns blocks_per_program consecutive row blocks and one partial row of d|alpha|.
    dalpha = tl.zeros([BLOCK_N], dtype=COMPUTE)
    for i in range(blocks_per_program):
        row_start = (pid * blocks_per_program + i) * BLOCK_M
        rows, cols, mask = _row_offsets(row_start, n_rows, n_cols, BLOCK_M, BLOCK_N)
        h = tl.load(h_ptr + rows * h_row_stride + cols, mask=mask, other=0.0).to(COMPUTE)
        b = tl.load(b_ptr + rows * b_row_stride + cols, mask=mask, other=0.0).to(COMPUTE)
        dout = tl.load(dout_ptr + rows * n_cols + cols, mask=mask, other=0.0).to(COMPUTE)
        b_unit, b_inv, b_above_eps = _unit(b, eps)
        out, r_inv, r_above_eps = _unit(h + a * (b_unit - h), eps)
        dr = _unit_bwd(dout, out, r_inv, r_above_eps)  # gradient at r = h + |alpha| (b_unit - h)
        db = _unit_bwd(dr * a, b_unit, b_inv, b_above_eps)
        tl.store(dh_ptr + rows * n_cols + cols, (dr * (1.0 - a)).to(dh_ptr.dtype.element_ty), mask=mask)
        tl.store(db_ptr + rows * n_cols + cols, db.to(db_ptr.dtype.element_ty), mask=mask)
        dalpha += tl.sum(dr * (b_unit - h), axis=0)
    tl.store(dalpha_partial_ptr + pid * n_cols + a_cols, dalpha, mask=a_cols < n_cols)


def hypersphere_update_fwd(h: Tensor, h_branch: Tensor, alpha: Tensor, eps: float) -> Tensor:
    """h, h_branch: [rows, d] row views; alpha: [d] contiguous -> h' [rows, d] contiguous, h.dtype."""
    n_rows, n_cols = h.shape
    out = torch.empty((n_rows, n_cols), dtype=h.dtype, device=h.device)
    if n_cols > MAX_ROW_ELEMENTS:
        block_n, num_warps = split_row_tile(n_cols)
        _hypersphere_update_split_fwd_kernel[(n_rows,)](
            h, h_branch, alpha, out, n_cols, h.stride(0), h_branch.stride(0), eps, BLOCK_N=block_n,
            num_warps=num_warps, COMPUTE=compute_dtype(h.dtype))
        return out
    block_m, block_n, num_warps = row_tile(n_rows, n_cols)
    _hypersphere_update_fwd_kernel[(triton.cdiv(n_rows, block_m),)](
        h, h_branch, alpha, out, n_rows, n_cols, h.stride(0), h_branch.stride(0), eps,
        BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps, COMPUTE=compute_dtype(h.dtype))
    return out


def hypersphere_update_bwd(dout: Tensor, h: Tensor, h_branch: Tensor, alpha: Tensor,
                           eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """dout: [rows, d] contiguous -> (dh, dh_branch) [rows, d] in h.dtype, dalpha [d] in alpha.dtype."""
    n_rows, n_cols = h.shape
    dh = torch.empty((n_rows, n_cols), dtype=h.dtype, device=h.device)
    db = torch.empty((n_rows, n_cols), dtype=h_branch.dtype, device=h.device)
    if n_cols > MAX_ROW_ELEMENTS:
        block_n, num_warps = split_row_tile(n_cols)
        n_programs, rows_per_program = reduction_grid(n_rows, 1, h.device)
        dabs_partial = torch.zeros((n_programs, n_cols), dtype=accumulator_dtype(h.dtype), device=h.device)
        _hypersphere_update_split_bwd_kernel[(n_programs,)](
            dout, h, h_branch, alpha, dh, db, dabs_partial, n_rows, n_cols, h.stride(0), h_branch.stride(0),
            rows_per_program, eps, BLOCK_N=block_n, num_warps=num_warps, COMPUTE=compute_dtype(h.dtype))
    else:
        block_m, block_n, num_warps = row_tile(n_rows, n_cols)
        n_programs, blocks_per_program = reduction_grid(n_rows, block_m, h.device)
        dabs_partial = torch.empty((n_programs, n_cols), dtype=accumulator_dtype(h.dtype), device=h.device)
        _hypersphere_update_bwd_kernel[(n_programs,)](
            dout, h, h_branch, alpha, dh, db, dabs_partial, n_rows, n_cols, h.stride(0), h_branch.stride(0),
            blocks_per_program, eps, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps,
            COMPUTE=compute_dtype(h.dtype))
    dalpha = dabs_partial.sum(0) * torch.sign(alpha.float())  # d|alpha|/dalpha = sign(alpha)
    return dh, db, dalpha.to(alpha.dtype)


# ---- split rows: rows longer than MAX_ROW_ELEMENTS, one program per row streaming [BLOCK_N] chunks -------------
# The register-resident kernels above would spill on such rows. These make one pass per row reduction they need
# (the norms, then the dot products of the backward) and a last one that writes, re-reading the row each time.


@triton.jit
def _chunk(row_ptr, c0, n_cols, BLOCK_N: tl.constexpr, COMPUTE: tl.constexpr):
    """Elements c0 .. c0 + BLOCK_N of a row [BLOCK_N] in COMPUTE, their offsets and mask."""
    cols = c0 + tl.arange(0, BLOCK_N)
    mask = cols < n_cols
    return tl.load(row_ptr + cols, mask=mask, other=0.0).to(COMPUTE), cols, mask


@triton.jit
def _l2_normalize_split_fwd_kernel(x_ptr, y_ptr, n_cols, x_row_stride, eps, BLOCK_N: tl.constexpr,
                                   COMPUTE: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    x_row, y_row = x_ptr + row * x_row_stride, y_ptr + row * n_cols
    sum_sq, scale = tl.zeros([BLOCK_N], dtype=COMPUTE), tl.zeros([BLOCK_N], dtype=COMPUTE)
    for c0 in range(0, n_cols, BLOCK_N):
        x, _, _ = _chunk(x_row, c0, n_cols, BLOCK_N, COMPUTE)
        sum_sq, scale = _add_squares(sum_sq, scale, x)
    row_scale, to_unit, _, _ = _lanes_inv_norm(sum_sq, scale, eps)
    for c0 in range(0, n_cols, BLOCK_N):
        x, cols, mask = _chunk(x_row, c0, n_cols, BLOCK_N, COMPUTE)
        tl.store(y_row + cols, (x / row_scale * to_unit).to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _l2_normalize_split_bwd_kernel(dy_ptr, x_ptr, dx_ptr, n_cols, x_row_stride, eps, BLOCK_N: tl.constexpr,
                                   COMPUTE: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    x_row, dy_row, dx_row = x_ptr + row * x_row_stride, dy_ptr + row * n_cols, dx_ptr + row * n_cols
    sum_sq, scale = tl.zeros([BLOCK_N], dtype=COMPUTE), tl.zeros([BLOCK_N], dtype=COMPUTE)
    x_dot_dy = tl.zeros([BLOCK_N], dtype=COMPUTE)
    for c0 in range(0, n_cols, BLOCK_N):
        x, _, _ = _chunk(x_row, c0, n_cols, BLOCK_N, COMPUTE)
        dy, _, _ = _chunk(dy_row, c0, n_cols, BLOCK_N, COMPUTE)
        x_dot_dy = _add_dot(x_dot_dy, scale, x, dy)
        sum_sq, scale = _add_squares(sum_sq, scale, x)
    row_scale, to_unit, inv, above_eps = _lanes_inv_norm(sum_sq, scale, eps)
    y_dot_dy = tl.where(above_eps, _lanes_dot(x_dot_dy, scale, row_scale) * to_unit, 0.0)
    for c0 in range(0, n_cols, BLOCK_N):
        x, cols, mask = _chunk(x_row, c0, n_cols, BLOCK_N, COMPUTE)
        dy, _, _ = _chunk(dy_row, c0, n_cols, BLOCK_N, COMPUTE)
        y = x / row_scale * to_unit
        tl.store(dx_row + cols, ((dy - y * y_dot_dy) * inv).to(dx_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _residual_chunk(h_row, b_row, alpha_ptr, b_scale, b_to_unit, c0, n_cols, BLOCK_N: tl.constexpr,
                    COMPUTE: tl.constexpr):
    """(r, h, Norm(b), |alpha|, cols, mask) of one chunk: r = h + |alpha| (Norm(b) - h), eq. 10 before its Norm."""
    h, cols, mask = _chunk(h_row, c0, n_cols, BLOCK_N, COMPUTE)
    b, _, _ = _chunk(b_row, c0, n_cols, BLOCK_N, COMPUTE)
    a = tl.abs(tl.load(alpha_ptr + cols, mask=mask, other=0.0).to(COMPUTE))
    b_unit = b / b_scale * b_to_unit
    return h + a * (b_unit - h), h, b_unit, a, cols, mask


@triton.jit
def _branch_inv_norm(b_row, n_cols, eps, BLOCK_N: tl.constexpr, COMPUTE: tl.constexpr):
    sum_sq, scale = tl.zeros([BLOCK_N], dtype=COMPUTE), tl.zeros([BLOCK_N], dtype=COMPUTE)
    for c0 in range(0, n_cols, BLOCK_N):
        b, _, _ = _chunk(b_row, c0, n_cols, BLOCK_N, COMPUTE)
        sum_sq, scale = _add_squares(sum_sq, scale, b)
    return _lanes_inv_norm(sum_sq, scale, eps)


@triton.jit
def _hypersphere_update_split_fwd_kernel(h_ptr, b_ptr, alpha_ptr, out_ptr, n_cols, h_row_stride, b_row_stride, eps,
                                         BLOCK_N: tl.constexpr, COMPUTE: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    h_row, b_row, out_row = h_ptr + row * h_row_stride, b_ptr + row * b_row_stride, out_ptr + row * n_cols
    b_scale, b_to_unit, _, _ = _branch_inv_norm(b_row, n_cols, eps, BLOCK_N, COMPUTE)
    sum_sq, scale = tl.zeros([BLOCK_N], dtype=COMPUTE), tl.zeros([BLOCK_N], dtype=COMPUTE)
    for c0 in range(0, n_cols, BLOCK_N):
        r, h, b_unit, a, cols, mask = _residual_chunk(h_row, b_row, alpha_ptr, b_scale, b_to_unit, c0, n_cols,
                                                      BLOCK_N, COMPUTE)
        sum_sq, scale = _add_squares(sum_sq, scale, r)
    r_scale, r_to_unit, _, _ = _lanes_inv_norm(sum_sq, scale, eps)
    for c0 in range(0, n_cols, BLOCK_N):
        r, h, b_unit, a, cols, mask = _residual_chunk(h_row, b_row, alpha_ptr, b_scale, b_to_unit, c0, n_cols,
                                                      BLOCK_N, COMPUTE)
        tl.store(out_row + cols, (r / r_scale * r_to_unit).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _hypersphere_update_split_bwd_kernel(dout_ptr, h_ptr, b_ptr, alpha_ptr, dh_ptr, db_ptr, dalpha_partial_ptr,
                                         n_rows, n_cols, h_row_stride, b_row_stride, rows_per_program, eps,
                                         BLOCK_N: tl.constexpr, COMPUTE: tl.constexpr):
    # As _hypersphere_update_bwd_kernel, a row at a time: dr = (dout - out (out.dout)) / ||r||, db from the
    # gradient g = |alpha| dr at Norm(b), and this program's partial row of d|alpha| (zeroed by the launcher).
    pid = tl.program_id(0).to(tl.int64)
    dalpha_row = dalpha_partial_ptr + pid * n_cols
    for i in range(rows_per_program):
        row = pid * rows_per_program + i
        if row < n_rows:
            h_row, b_row = h_ptr + row * h_row_stride, b_ptr + row * b_row_stride
            dout_row = dout_ptr + row * n_cols
            b_scale, b_to_unit, b_inv, b_above_eps = _branch_inv_norm(b_row, n_cols, eps, BLOCK_N, COMPUTE)
            r_sq, r_lane_scale = tl.zeros([BLOCK_N], dtype=COMPUTE), tl.zeros([BLOCK_N], dtype=COMPUTE)
            r_dot_dout = tl.zeros([BLOCK_N], dtype=COMPUTE)
            for c0 in range(0, n_cols, BLOCK_N):
                r, _, _, _, _, _ = _residual_chunk(h_row, b_row, alpha_ptr, b_scale, b_to_unit, c0, n_cols,
                                                   BLOCK_N, COMPUTE)
                dout, _, _ = _chunk(dout_row, c0, n_cols, BLOCK_N, COMPUTE)
                r_dot_dout = _add_dot(r_dot_dout, r_lane_scale, r, dout)
                r_sq, r_lane_scale = _add_squares(r_sq, r_lane_scale, r)
            r_scale, r_to_unit, r_inv, r_above_eps = _lanes_inv_norm(r_sq, r_lane_scale, eps)
            out_dot_dout = tl.where(r_above_eps, _lanes_dot(r_dot_dout, r_lane_scale, r_scale) * r_to_unit, 0.0)
            unit_dot_g = tl.zeros([BLOCK_N], dtype=COMPUTE)
            for c0 in range(0, n_cols, BLOCK_N):
                r, _, b_unit, a, _, _ = _residual_chunk(h_row, b_row, alpha_ptr, b_scale, b_to_unit, c0, n_cols,
                                                        BLOCK_N, COMPUTE)
                dout, _, _ = _chunk(dout_row, c0, n_cols, BLOCK_N, COMPUTE)
                unit_dot_g += b_unit * (dout - r / r_scale * r_to_unit * out_dot_dout) * r_inv * a
            b_unit_dot_g = tl.where(b_above_eps, tl.sum(unit_dot_g), 0.0)
            for c0 in range(0, n_cols, BLOCK_N):
                r, h, b_unit, a, cols, mask = _residual_chunk(h_row, b_row, alpha_ptr, b_scale, b_to_unit, c0, n_cols,
                                                              BLOCK_N, COMPUTE)
                dout, _, _ = _chunk(dout_row, c0, n_cols, BLOCK_N, COMPUTE)
                dr = (dout - r / r_scale * r_to_unit * out_dot_dout) * r_inv
                db = (dr * a - b_unit * b_unit_dot_g) * b_inv
                tl.store(dh_ptr + row * n_cols + cols, (dr * (1.0 - a)).to(dh_ptr.dtype.element_ty), mask=mask)
                tl.store(db_ptr + row * n_cols + cols, db.to(db_ptr.dtype.element_ty), mask=mask)
                dalpha = tl.load(dalpha_row + cols, mask=mask, other=0.0)
                tl.store(dalpha_row + cols, dalpha + dr * (b_unit - h), mask=mask)


# ---- qk_norm_rope: q <- Norm(RoPE(q)) * s_qk, same for k (section 2.3.2) --------------------------------------
# Programs are laid out as (block of (b, t) positions, head): axis 1 runs over the q heads, then the k heads,
# so q and k share one launch and every program sees a single head (one row of s_qk, one ds_qk partial).


@triton.jit
def _qk_tile(x_ptr, cos_ptr, sin_ptr, bt_start, head, T, H, half, n_bt, stride_b, stride_t, stride_h,
             BLOCK_M: tl.constexpr, BLOCK_HALF: tl.constexpr, COMPUTE: tl.constexpr):
    """Loads a [BLOCK_M, D] tile of one head as its rotated halves (r1, r2), each [BLOCK_M, BLOCK_HALF] fp32."""
    bt = bt_start + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_HALF)
    mask = (bt[:, None] < n_bt) & (cols[None, :] < half)
    b, t = (bt // T)[:, None], (bt % T)[:, None]
    x = x_ptr + b * stride_b + t * stride_t + head * stride_h + cols[None, :]
    x1 = tl.load(x, mask=mask, other=0.0).to(COMPUTE)
    x2 = tl.load(x + half, mask=mask, other=0.0).to(COMPUTE)
    c = tl.load(cos_ptr + t * half + cols[None, :], mask=mask, other=0.0)
    s = tl.load(sin_ptr + t * half + cols[None, :], mask=mask, other=0.0)
    # Half-split RoPE: a true rotation of each pair (x_i, x_{i + D/2}).
    return x1 * c - x2 * s, x1 * s + x2 * c, c, s, b, t, cols[None, :], mask


@triton.jit
def _rotated_unit(r1, r2, eps):
    """_unit of rows held as two halves r1, r2 [BLOCK_M, BLOCK_HALF] (RoPE's pairs): (y1, y2, inv, above_eps)."""
    scale = tl.maximum(_row_scale(r1), _row_scale(r2))
    r1s, r2s = r1 / scale, r2 / scale
    to_unit, inv, above_eps = _inv_norm(tl.sum(r1s * r1s + r2s * r2s, axis=1)[:, None], scale, eps)
    return r1s * to_unit, r2s * to_unit, inv, above_eps


@triton.jit
def _qk_norm_rope_fwd_rows(x_ptr, out_ptr, cos_ptr, sin_ptr, scale_ptr, head, T, H, half, n_bt,
                           stride_b, stride_t, stride_h, eps,
                           BLOCK_M: tl.constexpr, BLOCK_HALF: tl.constexpr, COMPUTE: tl.constexpr):
    bt_start = tl.program_id(0).to(tl.int64) * BLOCK_M
    r1, r2, c, s, b, t, cols, mask = _qk_tile(x_ptr, cos_ptr, sin_ptr, bt_start, head, T, H, half, n_bt,
                                              stride_b, stride_t, stride_h, BLOCK_M, BLOCK_HALF, COMPUTE)
    y1, y2, _, _ = _rotated_unit(r1, r2, eps)
    scale1 = tl.load(scale_ptr + cols, mask=cols < half, other=0.0).to(COMPUTE)
    scale2 = tl.load(scale_ptr + half + cols, mask=cols < half, other=0.0).to(COMPUTE)
    out = out_ptr + ((b * H + head) * T + t) * (2 * half) + cols  # output layout [B, H, T, D]
    tl.store(out, (y1 * scale1).to(out_ptr.dtype.element_ty), mask=mask)
    tl.store(out + half, (y2 * scale2).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _qk_norm_rope_fwd_kernel(q_ptr, k_ptr, cos_ptr, sin_ptr, s_ptr, q_out_ptr, k_out_ptr, T, Hq, Hk, half, n_bt,
                             q_stride_b, q_stride_t, q_stride_h, k_stride_b, k_stride_t, k_stride_h,
                             s_head_stride, eps,
                             BLOCK_M: tl.constexpr, BLOCK_HALF: tl.constexpr, COMPUTE: tl.constexpr):
    head = tl.program_id(1).to(tl.int64)
    if head < Hq:
        _qk_norm_rope_fwd_rows(q_ptr, q_out_ptr, cos_ptr, sin_ptr, s_ptr + head * s_head_stride, head, T, Hq, half,
                               n_bt, q_stride_b, q_stride_t, q_stride_h, eps, BLOCK_M, BLOCK_HALF, COMPUTE)
    else:
        _qk_norm_rope_fwd_rows(k_ptr, k_out_ptr, cos_ptr, sin_ptr, s_ptr + (head - Hq) * s_head_stride, head - Hq,
                               T, Hk, half, n_bt, k_stride_b, k_stride_t, k_stride_h, eps, BLOCK_M, BLOCK_HALF, COMPUTE)


@triton.jit
def _qk_norm_rope_bwd_rows(dout_ptr, x_ptr, dx_ptr, cos_ptr, sin_ptr, scale_ptr, ds_partial_ptr, head, T, H, half,
                           n_bt, stride_b, stride_t, stride_h, blocks_per_program, eps,
                           BLOCK_M: tl.constexpr, BLOCK_HALF: tl.constexpr, COMPUTE: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    s_cols = tl.arange(0, BLOCK_HALF)
    scale1 = tl.load(scale_ptr + s_cols, mask=s_cols < half, other=0.0).to(COMPUTE)[None, :]
    scale2 = tl.load(scale_ptr + half + s_cols, mask=s_cols < half, other=0.0).to(COMPUTE)[None, :]
    ds1 = tl.zeros([BLOCK_HALF], dtype=COMPUTE)
    ds2 = tl.zeros([BLOCK_HALF], dtype=COMPUTE)
    for i in range(blocks_per_program):
        bt_start = (pid * blocks_per_program + i) * BLOCK_M
        r1, r2, c, s, b, t, cols, mask = _qk_tile(x_ptr, cos_ptr, sin_ptr, bt_start, head, T, H, half, n_bt,
                                                  stride_b, stride_t, stride_h, BLOCK_M, BLOCK_HALF, COMPUTE)
        y1, y2, inv, above_eps = _rotated_unit(r1, r2, eps)
        dout = dout_ptr + ((b * H + head) * T + t) * (2 * half) + cols
        g1 = tl.load(dout, mask=mask, other=0.0).to(COMPUTE)
        g2 = tl.load(dout + half, mask=mask, other=0.0).to(COMPUTE)
        ds1 += tl.sum(g1 * y1, axis=0)
        ds2 += tl.sum(g2 * y2, axis=0)
        g1, g2 = g1 * scale1, g2 * scale2
        y_dot_g = tl.where(above_eps, tl.sum(y1 * g1 + y2 * g2, axis=1)[:, None], 0.0)
        dr1, dr2 = (g1 - y1 * y_dot_g) * inv, (g2 - y2 * y_dot_g) * inv
        dx = dx_ptr + ((b * T + t) * H + head) * (2 * half) + cols  # gradient layout [B, T, H, D]
        tl.store(dx, (dr1 * c + dr2 * s).to(dx_ptr.dtype.element_ty), mask=mask)  # inverse rotation
        tl.store(dx + half, (dr2 * c - dr1 * s).to(dx_ptr.dtype.element_ty), mask=mask)
    tl.store(ds_partial_ptr + s_cols, ds1, mask=s_cols < half)
    tl.store(ds_partial_ptr + half + s_cols, ds2, mask=s_cols < half)


@triton.jit
def _qk_norm_rope_bwd_kernel(dq_out_ptr, dk_out_ptr, q_ptr, k_ptr, cos_ptr, sin_ptr, s_ptr, dq_ptr, dk_ptr,
                             ds_partial_ptr, T, Hq, Hk, half, n_bt, q_stride_b, q_stride_t, q_stride_h,
                             k_stride_b, k_stride_t, k_stride_h, s_head_stride, blocks_per_program, eps,
                             BLOCK_M: tl.constexpr, BLOCK_HALF: tl.constexpr, COMPUTE: tl.constexpr):
    head = tl.program_id(1).to(tl.int64)
    # ds_partial is [programs, Hq + Hk, D]: one slot per (program, q or k head), no two programs share one.
    ds_partial = ds_partial_ptr + (tl.program_id(0).to(tl.int64) * (Hq + Hk) + head) * (2 * half)
    if head < Hq:
        _qk_norm_rope_bwd_rows(dq_out_ptr, q_ptr, dq_ptr, cos_ptr, sin_ptr, s_ptr + head * s_head_stride, ds_partial,
                               head, T, Hq, half, n_bt, q_stride_b, q_stride_t, q_stride_h, blocks_per_program, eps,
                               BLOCK_M, BLOCK_HALF, COMPUTE)
    else:
        _qk_norm_rope_bwd_rows(dk_out_ptr, k_ptr, dk_ptr, cos_ptr, sin_ptr, s_ptr + (head - Hq) * s_head_stride,
                               ds_partial, head - Hq, T, Hk, half, n_bt, k_stride_b, k_stride_t, k_stride_h,
                               blocks_per_program, eps, BLOCK_M, BLOCK_HALF, COMPUTE)


def _qk_shape(q: Tensor, k: Tensor, s_qk: Tensor):
    B, T, Hq, D = q.shape
    Hk = k.shape[2]
    s_head_stride = D if s_qk.dim() == 2 else 0  # s_qk is [H, D] or one [D] row shared by all heads
    block_m, block_half, num_warps = row_tile(B * T, D // 2)
    return B, T, Hq, Hk, D, s_head_stride, block_m, block_half, num_warps


def qk_norm_rope_fwd(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, s_qk: Tensor,
                     eps: float) -> tuple[Tensor, Tensor]:
    """q: [B, T, Hq, D], k: [B, T, Hk, D] (unit stride on D); cos, sin: [T, D/2] fp32 contiguous;
    s_qk: [D] or [Hq, D] contiguous -> q, k normalised and scaled, in the attention layout [B, H, T, D]."""
    B, T, Hq, Hk, D, s_head_stride, block_m, block_half, num_warps = _qk_shape(q, k, s_qk)
    q_out = torch.empty((B, Hq, T, D), dtype=q.dtype, device=q.device)
    k_out = torch.empty((B, Hk, T, D), dtype=k.dtype, device=k.device)
    _qk_norm_rope_fwd_kernel[(triton.cdiv(B * T, block_m), Hq + Hk)](
        q, k, cos, sin, s_qk, q_out, k_out, T, Hq, Hk, D // 2, B * T, q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2), s_head_stride, eps,
        BLOCK_M=block_m, BLOCK_HALF=block_half, num_warps=num_warps, COMPUTE=compute_dtype(q.dtype))
    return q_out, k_out


def qk_norm_rope_bwd(dq_out: Tensor, dk_out: Tensor, q: Tensor, k: Tensor, cos: Tensor, sin: Tensor,
                     s_qk: Tensor, eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """dq_out: [B, Hq, T, D], dk_out: [B, Hk, T, D] contiguous -> dq [B, T, Hq, D], dk [B, T, Hk, D]
    (contiguous, dtypes of q and k) and ds_qk (shape and dtype of s_qk)."""
    B, T, Hq, Hk, D, s_head_stride, block_m, block_half, num_warps = _qk_shape(q, k, s_qk)
    dq = torch.empty((B, T, Hq, D), dtype=q.dtype, device=q.device)
    dk = torch.empty((B, T, Hk, D), dtype=k.dtype, device=k.device)
    n_programs, blocks_per_program = reduction_grid(B * T, block_m, q.device)
    ds_partial = torch.empty((n_programs, Hq + Hk, D), dtype=accumulator_dtype(q.dtype), device=q.device)
    _qk_norm_rope_bwd_kernel[(n_programs, Hq + Hk)](
        dq_out, dk_out, q, k, cos, sin, s_qk, dq, dk, ds_partial, T, Hq, Hk, D // 2, B * T,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2), s_head_stride,
        blocks_per_program, eps, BLOCK_M=block_m, BLOCK_HALF=block_half, num_warps=num_warps,
        COMPUTE=compute_dtype(q.dtype))
    ds_per_head = ds_partial.sum(0)  # [Hq + Hk, D]
    ds_qk = ds_per_head.sum(0) if s_qk.dim() == 1 else ds_per_head[:Hq] + ds_per_head[Hq:]
    return dq, dk, ds_qk.to(s_qk.dtype)


# ---- scaled_swiglu: (u * s_u) * SiLU(v * s_v * sqrt(d_model)), section 2.4 --------------------------------------


@triton.jit
def _swiglu_tile(u_ptr, v_ptr, s_u_ptr, s_v_ptr, rows, cols, mask, n_cols, u_row_stride, v_row_stride, v_scale,
                 COMPUTE: tl.constexpr):
    u = tl.load(u_ptr + rows * u_row_stride + cols, mask=mask, other=0.0).to(COMPUTE)
    v = tl.load(v_ptr + rows * v_row_stride + cols, mask=mask, other=0.0).to(COMPUTE)
    s_u = tl.load(s_u_ptr + cols, mask=cols < n_cols, other=0.0).to(COMPUTE)
    s_v = tl.load(s_v_ptr + cols, mask=cols < n_cols, other=0.0).to(COMPUTE) * v_scale
    z = v * s_v
    e = tl.exp(-tl.abs(z))  # sigmoid from exp(-|z|): no overflow for large |z|
    sig = tl.where(z >= 0, 1.0 / (1.0 + e), e / (1.0 + e))
    return u, v, s_u, s_v, z, sig


@triton.jit
def _scaled_swiglu_fwd_kernel(u_ptr, v_ptr, s_u_ptr, s_v_ptr, out_ptr, n_rows, n_cols, u_row_stride, v_row_stride,
                              v_scale, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, COMPUTE: tl.constexpr):
    row_start = tl.program_id(0).to(tl.int64) * BLOCK_M
    col_start = tl.program_id(1).to(tl.int64) * BLOCK_N
    rows, cols, mask = _row_offsets(row_start, n_rows, n_cols - col_start, BLOCK_M, BLOCK_N)
    cols += col_start
    u, v, s_u, s_v, z, sig = _swiglu_tile(u_ptr, v_ptr, s_u_ptr, s_v_ptr, rows, cols, mask, n_cols,
                                          u_row_stride, v_row_stride, v_scale, COMPUTE)
    tl.store(out_ptr + rows * n_cols + cols, (u * s_u * z * sig).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _scaled_swiglu_bwd_kernel(dout_ptr, u_ptr, v_ptr, s_u_ptr, s_v_ptr, du_ptr, dv_ptr, ds_u_partial_ptr,
                              ds_v_partial_ptr, n_rows, n_cols, u_row_stride, v_row_stride, v_scale,
                              blocks_per_program, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, COMPUTE: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    col_start = tl.program_id(1).to(tl.int64) * BLOCK_N
    ds_u = tl.zeros([BLOCK_N], dtype=COMPUTE)
    ds_v = tl.zeros([BLOCK_N], dtype=COMPUTE)
    for i in range(blocks_per_program):
        row_start = (pid * blocks_per_program + i) * BLOCK_M
        rows, cols, mask = _row_offsets(row_start, n_rows, n_cols - col_start, BLOCK_M, BLOCK_N)
        cols += col_start
        u, v, s_u, s_v, z, sig = _swiglu_tile(u_ptr, v_ptr, s_u_ptr, s_v_ptr, rows, cols, mask, n_cols,
                                              u_row_stride, v_row_stride, v_scale, COMPUTE)
        dout = tl.load(dout_ptr + rows * n_cols + cols, mask=mask, other=0.0).to(COMPUTE)
        da = dout * z * sig  # gradient at a = u * s_u
        dz = dout * u * s_u * sig * (1.0 + z * (1.0 - sig))  # SiLU'(z) = sig (1 + z (1 - sig))
        tl.store(du_ptr + rows * n_cols + cols, (da * s_u).to(du_ptr.dtype.element_ty), mask=mask)
        tl.store(dv_ptr + rows * n_cols + cols, (dz * s_v).to(dv_ptr.dtype.element_ty), mask=mask)
        ds_u += tl.sum(da * u, axis=0)
        ds_v += tl.sum(dz * v, axis=0)
    cols_1d = col_start + tl.arange(0, BLOCK_N)
    tl.store(ds_u_partial_ptr + pid * n_cols + cols_1d, ds_u, mask=cols_1d < n_cols)
    tl.store(ds_v_partial_ptr + pid * n_cols + cols_1d, ds_v * v_scale, mask=cols_1d < n_cols)


def scaled_swiglu_fwd(u: Tensor, v: Tensor, s_u: Tensor, s_v: Tensor, d_model: int) -> Tensor:
    """u, v: [rows, d_mlp] row views; s_u, s_v: [d_mlp] contiguous -> [rows, d_mlp] contiguous, u.dtype."""
    n_rows, n_cols = u.shape
    out = torch.empty((n_rows, n_cols), dtype=u.dtype, device=u.device)
    block_m, block_n, num_warps = elementwise_tile(n_rows, n_cols)
    _scaled_swiglu_fwd_kernel[(triton.cdiv(n_rows, block_m), triton.cdiv(n_cols, block_n))](
        u, v, s_u, s_v, out, n_rows, n_cols, u.stride(0), v.stride(0), math.sqrt(d_model),
        BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps, COMPUTE=compute_dtype(u.dtype))
    return out


def scaled_swiglu_bwd(dout: Tensor, u: Tensor, v: Tensor, s_u: Tensor, s_v: Tensor,
                      d_model: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """dout: [rows, d_mlp] contiguous -> du, dv [rows, d_mlp] (u.dtype, v.dtype), ds_u, ds_v [d_mlp]."""
    n_rows, n_cols = u.shape
    du = torch.empty((n_rows, n_cols), dtype=u.dtype, device=u.device)
    dv = torch.empty((n_rows, n_cols), dtype=v.dtype, device=v.device)
    block_m, block_n, num_warps = elementwise_tile(n_rows, n_cols)
    n_programs, blocks_per_program = reduction_grid(n_rows, block_m, u.device)
    ds_u_partial = torch.empty((n_programs, n_cols), dtype=accumulator_dtype(u.dtype), device=u.device)
    ds_v_partial = torch.empty((n_programs, n_cols), dtype=accumulator_dtype(u.dtype), device=u.device)
    _scaled_swiglu_bwd_kernel[(n_programs, triton.cdiv(n_cols, block_n))](
        dout, u, v, s_u, s_v, du, dv, ds_u_partial, ds_v_partial, n_rows, n_cols, u.stride(0), v.stride(0),
        math.sqrt(d_model), blocks_per_program, BLOCK_M=block_m, BLOCK_N=block_n,
        num_warps=num_warps, COMPUTE=compute_dtype(u.dtype))
    return du, dv, ds_u_partial.sum(0).to(s_u.dtype), ds_v_partial.sum(0).to(s_v.dtype)
