"""Triton kernels for tensor (triple-wise) attention: Alman & Song (arXiv 2310.04064), exact or with the sliding
windows of 2-simplicial attention (Roy et al., arXiv 2507.02754). Semantics: torchext/reference/tensor_attention.py.

    o_i = sum_(j,k) softmax_(j,k)(scale <q_i, k1_j * k2_k>) (v1_j * v2_k)

Roles. The trilinear form is symmetric in the pairs (k1, v1, w1) and (k2, v2, w2). The launchers fold the pair
with the smaller window into the rows ("row side" R: kr, vr, wr) and stream the other ("column side" C: kc, vc,
wc) through tensor-core GEMMs, so that with windows (512, 32) the 32-wide window is folded and the 512-wide one
is the GEMM's N axis.

Row tiles. A program's tile has BLOCK_M = BLOCK_Q * BLOCK_J rows; row r is the pair (i, j) of query
i = anchor + r // BLOCK_J and row-side position j = i - u, u = u0 + r % BLOCK_J the offset into i's window.
Its vector a_r = q_i * kr_j * scale is one "virtual query": the logits of all k are one GEMM
S = A @ Kc^T ([BLOCK_M, D] x [D, BLOCK_N]), and sum_k P_rk (vr_j * vc_k) = vr_j * (P @ Vc)_r (the Khatri-Rao
identity of Alman & Song). Offsets relative to i make a window exactly BLOCK_J-aligned work with no masked
rows (tiling queries instead wastes most of a 32-wide window, see the research note), and the column range a
tile needs is wc + BLOCK_Q - 1 keys, nearly all useful.

Forward. Each row runs the flash online softmax over the column axis within a chunk of BLOCK_J offsets (scores
in base 2: a_r carries scale * log2(e)); at the end of a chunk the BLOCK_J rows of each query are merged into
that query's running (max, sum, output) by log-sum-exp. The score tensor never exists; the kernel writes
out [B, H, n, d] and lse [B, H, n] (natural log).

Backward, three passes without atomics, each recomputing P = exp(s - lse):
  * column-stationary (kc, vc): a program owns BLOCK_N columns and loops over every row tile that sees them:
    dKc += dS^T A, dVc += P^T G (g_r = dO_i * vr_j), all group heads of a GQA group in the same program;
  * query-stationary: rows as in the forward, dQ_i = scale sum_j kr_j * (dS @ Kc)_r;
  * row-side-stationary: rows (j, i = j + u), dKr_j = scale sum_i q_i * (dS @ Kc)_r,
    dVr_j = sum_i dO_i * (P @ Vc)_r.
with dS = P (dP - D_i), dP = G @ Vc^T, D_i = <dO_i, o_i> - dlse_i (computed by the launcher).

FLOP convention (bench): tensor-core FLOPs = 4 d per unmasked (i, j, k) triple forward (S and P @ Vc) and 10 d
backward (S, dP, dS @ Kc, dS^T A, P^T G: the minimum; the three passes recompute S and dP and so execute 22 d).
Roy et al. count 6 d per triple forward (the q * k1 product too).

Conventions: fp32 accumulation (fp64 for fp64 inputs), int64 offsets, every load and store masked; the online
softmax and its treatment of masked and non-finite scores are triton_kernels/_attention.py's.
"""

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._attention import max_nan, maximum_nan, online_softmax_step, rescale, softmax_result
from ._launch import GPU_TILES, accumulator_dtype, compute_dtype, dot, dot_dtype

# Kernels may read only constexpr globals.
LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)


@triton.jit
def _row_pairs(anchor0, u0, N, WR, ROWS_ARE_QUERIES: tl.constexpr, CAUSAL: tl.constexpr,
               BLOCK_Q: tl.constexpr, BLOCK_J: tl.constexpr):
    """(i, j, valid) [BLOCK_M] of the rows of a tile: anchor = anchor0 + r // BLOCK_J, u = u0 + r % BLOCK_J.

    ROWS_ARE_QUERIES: the anchor is the query i and j = i - u; else the anchor is the row-side position j and
    i = j + u. Not causal: the other index is u itself (every pair).
    """
    r = tl.arange(0, BLOCK_Q * BLOCK_J)
    anchor = anchor0 + r // BLOCK_J
    u = u0 + r % BLOCK_J
    if CAUSAL:
        if ROWS_ARE_QUERIES:
            i, j = anchor, anchor - u
        else:
            i, j = anchor + u, anchor
        valid = (i < N) & (j >= 0) & (j < N) & (u < WR)
    else:
        if ROWS_ARE_QUERIES:
            i, j = anchor, u
        else:
            i, j = u, anchor
        valid = (i < N) & (j < N)
    return i, j, valid


@triton.jit
def _load_rows(ptr, idx, valid, d, D, COMPUTE: tl.constexpr):
    """Rows idx of a [n, D] matrix as a [BLOCK_M, BLOCK_D] tile (zeros where invalid or past D)."""
    return tl.load(ptr + idx[:, None] * D + d[None, :], mask=valid[:, None] & (d[None, :] < D), other=0.0).to(COMPUTE)


@triton.jit
def _column_range(i_lo, i_hi, N, WC, CAUSAL: tl.constexpr):
    """[k_lo, k_hi): the column positions rows with queries in [i_lo, i_hi] can see (window (i - wc, i])."""
    if CAUSAL:
        return tl.maximum(i_lo - WC + 1, 0), tl.minimum(i_hi + 1, N)
    return i_lo * 0, i_lo * 0 + N


@triton.jit
def _score_mask(i, valid, kk, k_hi, WC, CAUSAL: tl.constexpr):
    """[BLOCK_M, BLOCK_N] mask of the (row, column) logits that exist."""
    mask = valid[:, None] & (kk[None, :] < k_hi)
    if CAUSAL:
        mask = mask & (kk[None, :] <= i[:, None]) & (kk[None, :] > i[:, None] - WC)
    return mask


# ---- forward -------------------------------------------------------------------------------------------------------


@triton.jit
def _tensor_attention_fwd_kernel(q_ptr, kr_ptr, kc_ptr, vr_ptr, vc_ptr, out_ptr, lse_ptr, N, D, H, GROUP, WR, WC,
                                 scale2, CAUSAL: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_J: tl.constexpr,
                                 BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, DOT: tl.constexpr,
                                 COMPUTE: tl.constexpr):
    tile = tl.program_id(0).to(tl.int64)
    bh = tl.program_id(1).to(tl.int64)  # b * H + h
    kv_head = (bh // H) * (H // GROUP) + (bh % H) // GROUP  # GQA: b * Hkv + h // group
    q_ptr += bh * N * D
    kr_ptr += kv_head * N * D
    kc_ptr += kv_head * N * D
    vr_ptr += kv_head * N * D
    vc_ptr += kv_head * N * D
    i0 = tile * BLOCK_Q
    i_hi = tl.minimum(i0 + BLOCK_Q, N) - 1
    d = tl.arange(0, BLOCK_D)
    k_lo, k_hi = _column_range(i0, i_hi, N, WC, CAUSAL)
    n_offsets = tl.minimum(WR, i_hi + 1) if CAUSAL else N

    m_q = tl.full([BLOCK_Q], -float("inf"), COMPUTE)  # running max (base 2) per query
    l_q = tl.zeros([BLOCK_Q], COMPUTE)  # running sum of exp2(s - m_q)
    o_q = tl.zeros([BLOCK_Q, BLOCK_D], COMPUTE)  # running unnormalised output
    for u0 in range(0, n_offsets, BLOCK_J):
        i, j, valid = _row_pairs(i0, u0, N, WR, True, CAUSAL, BLOCK_Q, BLOCK_J)
        q = _load_rows(q_ptr, i, valid, d, D, COMPUTE)  # [BLOCK_M, BLOCK_D]
        a = (q * _load_rows(kr_ptr, j, valid, d, D, COMPUTE) * scale2).to(DOT)  # virtual queries q_i * kr_j
        m_r = tl.full([BLOCK_Q * BLOCK_J], -float("inf"), COMPUTE)
        l_r = tl.zeros([BLOCK_Q * BLOCK_J], COMPUTE)
        acc = tl.zeros([BLOCK_Q * BLOCK_J, BLOCK_D], COMPUTE)  # sum_k p_rk vc_k
        for k0 in range(k_lo, k_hi, BLOCK_N):
            kk = k0 + tl.arange(0, BLOCK_N)  # [BLOCK_N]
            col_mask = (kk < k_hi)[None, :] & (d[:, None] < D)
            kc_t = tl.load(kc_ptr + kk[None, :] * D + d[:, None], mask=col_mask, other=0.0)  # [BLOCK_D, BLOCK_N]
            s = dot(a, kc_t.to(COMPUTE).to(DOT), tl.zeros([BLOCK_Q * BLOCK_J, BLOCK_N], COMPUTE), DOT)
            mask = _score_mask(i, valid, kk, k_hi, WC, CAUSAL)
            vc = tl.load(vc_ptr + kk[:, None] * D + d[None, :], mask=tl.trans(col_mask), other=0.0)  # [BLOCK_N, D]
            m_r, l_r, acc = online_softmax_step(m_r, l_r, acc, s, mask, vc.to(COMPUTE), DOT)
        # Fold the BLOCK_J rows of each query (one per offset u) into its running state by log-sum-exp.
        acc = acc * _load_rows(vr_ptr, j, valid, d, D, COMPUTE)  # vr_j * sum_k p vc_k
        m_rows = tl.reshape(m_r, (BLOCK_Q, BLOCK_J))
        m_new = maximum_nan(m_q, max_nan(m_rows, 1))  # [BLOCK_Q]
        w = rescale(m_rows, m_new[:, None])  # [BLOCK_Q, BLOCK_J]
        alpha = rescale(m_q, m_new)
        l_q = l_q * alpha + tl.sum(tl.reshape(l_r, (BLOCK_Q, BLOCK_J)) * w, axis=1)
        o_q = o_q * alpha[:, None] + tl.sum(tl.reshape(acc, (BLOCK_Q, BLOCK_J, BLOCK_D)) * w[:, :, None], axis=1)
        m_q = m_new

    qi = i0 + tl.arange(0, BLOCK_Q)
    q_mask = qi < N
    out, lse2 = softmax_result(m_q, l_q, o_q)
    tl.store(out_ptr + bh * N * D + qi[:, None] * D + d[None, :], out.to(out_ptr.dtype.element_ty),
             mask=q_mask[:, None] & (d[None, :] < D))
    tl.store(lse_ptr + bh * N + qi, lse2 * LN2, mask=q_mask)


# ---- backward: query- and row-side-stationary passes -----------------------------------------------------------------


@triton.jit
def _tensor_attention_bwd_rows_kernel(q_ptr, kr_ptr, kc_ptr, vr_ptr, vc_ptr, do_ptr, lse_ptr, delta_ptr, dq_ptr,
                                      dkr_ptr, dvr_ptr, N, D, H, GROUP, WR, WC, scale, scale2,
                                      QUERY_STATIONARY: tl.constexpr, CAUSAL: tl.constexpr, BLOCK_Q: tl.constexpr,
                                      BLOCK_J: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                                      DOT: tl.constexpr, COMPUTE: tl.constexpr):
    """QUERY_STATIONARY: program (query tile, b * H + h) writes dq. Else: program (row-side tile, b * Hkv + hk)
    writes dkr and dvr, summing the GROUP query heads of its key/value head."""
    tile = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1).to(tl.int64)
    if QUERY_STATIONARY:
        kv_head = (head // H) * (H // GROUP) + (head % H) // GROUP
        first_q_head, n_heads = head, 1
    else:
        kv_head = head
        first_q_head, n_heads = (head // (H // GROUP)) * H + (head % (H // GROUP)) * GROUP, GROUP
    kr_ptr += kv_head * N * D
    kc_ptr += kv_head * N * D
    vr_ptr += kv_head * N * D
    vc_ptr += kv_head * N * D
    a0 = tile * BLOCK_Q  # first anchor: a query (QUERY_STATIONARY) or a row-side position
    a_hi = tl.minimum(a0 + BLOCK_Q, N) - 1
    d = tl.arange(0, BLOCK_D)
    if CAUSAL:
        n_offsets = tl.minimum(WR, a_hi + 1) if QUERY_STATIONARY else tl.minimum(WR, N - a0)
    else:
        n_offsets = N

    grad_a = tl.zeros([BLOCK_Q, BLOCK_D], COMPUTE)  # dq, or dkr
    grad_v = tl.zeros([BLOCK_Q, BLOCK_D], COMPUTE)  # dvr
    for g in range(0, n_heads):
        bh = first_q_head + g
        for u0 in range(0, n_offsets, BLOCK_J):
            i, j, valid = _row_pairs(a0, u0, N, WR, QUERY_STATIONARY, CAUSAL, BLOCK_Q, BLOCK_J)
            if QUERY_STATIONARY:
                k_lo, k_hi = _column_range(a0, a_hi, N, WC, CAUSAL)
            else:
                k_lo, k_hi = _column_range(a0 + u0, tl.minimum(a_hi + u0 + BLOCK_J - 1, N - 1), N, WC, CAUSAL)
            q = _load_rows(q_ptr + bh * N * D, i, valid, d, D, COMPUTE)
            kr = _load_rows(kr_ptr, j, valid, d, D, COMPUTE)
            do = _load_rows(do_ptr + bh * N * D, i, valid, d, D, COMPUTE)
            vr = _load_rows(vr_ptr, j, valid, d, D, COMPUTE)
            lse2 = tl.load(lse_ptr + bh * N + i, mask=valid, other=0.0).to(COMPUTE) * LOG2E
            delta = tl.load(delta_ptr + bh * N + i, mask=valid, other=0.0).to(COMPUTE)
            a = (q * kr * scale2).to(DOT)
            gv = (do * vr).to(DOT)
            d_a = tl.zeros([BLOCK_Q * BLOCK_J, BLOCK_D], COMPUTE)  # sum_k dS_rk kc_k
            pv = tl.zeros([BLOCK_Q * BLOCK_J, BLOCK_D], COMPUTE)  # sum_k P_rk vc_k (row-side pass only)
            for k0 in range(k_lo, k_hi, BLOCK_N):
                kk = k0 + tl.arange(0, BLOCK_N)
                col_mask = (kk < k_hi)[None, :] & (d[:, None] < D)
                kc_t = tl.load(kc_ptr + kk[None, :] * D + d[:, None], mask=col_mask, other=0.0).to(COMPUTE).to(DOT)
                vc_t = tl.load(vc_ptr + kk[None, :] * D + d[:, None], mask=col_mask, other=0.0).to(COMPUTE).to(DOT)
                zeros = tl.zeros([BLOCK_Q * BLOCK_J, BLOCK_N], COMPUTE)
                s = dot(a, kc_t, zeros, DOT)
                mask = _score_mask(i, valid, kk, k_hi, WC, CAUSAL)
                p = tl.where(mask, tl.exp2(s - lse2[:, None]), 0.0)  # [BLOCK_M, BLOCK_N]
                dp = dot(gv, vc_t, zeros, DOT)
                ds = p * (dp - delta[:, None])
                d_a = dot(ds.to(DOT), tl.trans(kc_t), d_a, DOT)
                if not QUERY_STATIONARY:
                    pv = dot(p.to(DOT), tl.trans(vc_t), pv, DOT)
            # Sum the BLOCK_J rows of each anchor: over j for dq_i, over i for dkr_j and dvr_j.
            if QUERY_STATIONARY:
                grad_a += tl.sum(tl.reshape(d_a * kr, (BLOCK_Q, BLOCK_J, BLOCK_D)), axis=1)
            else:
                grad_a += tl.sum(tl.reshape(d_a * q, (BLOCK_Q, BLOCK_J, BLOCK_D)), axis=1)
                grad_v += tl.sum(tl.reshape(pv * do, (BLOCK_Q, BLOCK_J, BLOCK_D)), axis=1)

    rows = a0 + tl.arange(0, BLOCK_Q)
    offsets = rows[:, None] * D + d[None, :]
    mask = (rows < N)[:, None] & (d[None, :] < D)
    if QUERY_STATIONARY:
        tl.store(dq_ptr + head * N * D + offsets, (grad_a * scale).to(dq_ptr.dtype.element_ty), mask=mask)
    else:
        tl.store(dkr_ptr + head * N * D + offsets, (grad_a * scale).to(dkr_ptr.dtype.element_ty), mask=mask)
        tl.store(dvr_ptr + head * N * D + offsets, grad_v.to(dvr_ptr.dtype.element_ty), mask=mask)


# ---- backward: column-stationary pass --------------------------------------------------------------------------------


@triton.jit
def _tensor_attention_bwd_columns_kernel(q_ptr, kr_ptr, kc_ptr, vr_ptr, vc_ptr, do_ptr, lse_ptr, delta_ptr, dkc_ptr,
                                         dvc_ptr, N, D, H, GROUP, WR, WC, scale2, CAUSAL: tl.constexpr,
                                         BLOCK_Q: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_N: tl.constexpr,
                                         BLOCK_D: tl.constexpr, DOT: tl.constexpr,
                                         COMPUTE: tl.constexpr):
    """Program (column block, b * Hkv + hk) writes dkc and dvc for BLOCK_N columns, from every row that sees them."""
    k0 = tl.program_id(0).to(tl.int64) * BLOCK_N
    kv_head = tl.program_id(1).to(tl.int64)
    heads_kv = H // GROUP
    first_q_head = (kv_head // heads_kv) * H + (kv_head % heads_kv) * GROUP
    kr_ptr += kv_head * N * D
    vr_ptr += kv_head * N * D
    d = tl.arange(0, BLOCK_D)
    kk = k0 + tl.arange(0, BLOCK_N)
    col_mask = (kk < N)[:, None] & (d[None, :] < D)
    kc = tl.load(kc_ptr + kv_head * N * D + kk[:, None] * D + d[None, :], mask=col_mask, other=0.0)
    vc = tl.load(vc_ptr + kv_head * N * D + kk[:, None] * D + d[None, :], mask=col_mask, other=0.0)
    kc, vc = kc.to(COMPUTE).to(DOT), vc.to(COMPUTE).to(DOT)  # [BLOCK_N, BLOCK_D]
    # Queries that see these columns: i in [k0, k0 + BLOCK_N - 1 + wc - 1] when causal, all when not.
    i_start = k0 if CAUSAL else k0 * 0
    i_end = tl.minimum(k0 + BLOCK_N + WC - 1, N) if CAUSAL else k0 * 0 + N

    dkc = tl.zeros([BLOCK_N, BLOCK_D], COMPUTE)
    dvc = tl.zeros([BLOCK_N, BLOCK_D], COMPUTE)
    for g in range(0, GROUP):
        bh = first_q_head + g
        for i0 in range(i_start, i_end, BLOCK_Q):
            n_offsets = tl.minimum(WR, tl.minimum(i0 + BLOCK_Q, N)) if CAUSAL else N
            for u0 in range(0, n_offsets, BLOCK_J):
                i, j, valid = _row_pairs(i0, u0, N, WR, True, CAUSAL, BLOCK_Q, BLOCK_J)
                valid = valid & (i < i_end)
                q = _load_rows(q_ptr + bh * N * D, i, valid, d, D, COMPUTE)
                do = _load_rows(do_ptr + bh * N * D, i, valid, d, D, COMPUTE)
                a = (q * _load_rows(kr_ptr, j, valid, d, D, COMPUTE) * scale2).to(DOT)  # [BLOCK_M, BLOCK_D]
                gv = (do * _load_rows(vr_ptr, j, valid, d, D, COMPUTE)).to(DOT)
                lse2 = tl.load(lse_ptr + bh * N + i, mask=valid, other=0.0).to(COMPUTE) * LOG2E
                delta = tl.load(delta_ptr + bh * N + i, mask=valid, other=0.0).to(COMPUTE)
                zeros = tl.zeros([BLOCK_N, BLOCK_Q * BLOCK_J], COMPUTE)
                s_t = dot(kc, tl.trans(a), zeros, DOT)  # [BLOCK_N, BLOCK_M]: logits transposed
                mask_t = tl.trans(_score_mask(i, valid, kk, N, WC, CAUSAL))
                p_t = tl.where(mask_t, tl.exp2(s_t - lse2[None, :]), 0.0)
                ds_t = p_t * (dot(vc, tl.trans(gv), zeros, DOT) - delta[None, :])
                dkc = dot(ds_t.to(DOT), a, dkc, DOT)
                dvc = dot(p_t.to(DOT), gv, dvc, DOT)

    offsets = kv_head * N * D + kk[:, None] * D + d[None, :]
    tl.store(dkc_ptr + offsets, (dkc / LOG2E).to(dkc_ptr.dtype.element_ty), mask=col_mask)  # a carries log2(e)
    tl.store(dvc_ptr + offsets, dvc.to(dvc_ptr.dtype.element_ty), mask=col_mask)


# ---- launchers -------------------------------------------------------------------------------------------------------


# (rows per program BLOCK_M = BLOCK_Q * BLOCK_J, BLOCK_N, num_warps, num_stages) of each kernel on a GPU: the
# largest tiles that compile for sm_80 and sm_90 with no spills at head_dim 128 (bench/offline.py, whose table
# is bench/results/offline/); 128-row tiles spilled 300-900 bytes per thread, and Triton 3.6 spilled 24-36 bytes
# with 64-column forward tiles, so the forward takes 32 columns. fp32 and fp64 operands multiply on
# the FMA units, with both tiles in registers: they get narrower tiles. Not yet timed on a GPU.
_GPU_TILES = {"fwd": (64, 32, 8, 1), "rows": (32, 64, 8, 1), "columns": (64, 32, 8, 1)}
_GPU_TILES_WIDE = {"fwd": (64, 16, 8, 1), "rows": (32, 16, 8, 1), "columns": (32, 16, 16, 1)}  # 32/64-bit operands
_INTERPRETER_ROWS = {"fwd": 64, "rows": 32, "columns": 32}  # the interpreter: few programs, small grids


def _tiles(kernel: str, n: int, d: int, wr: int, dtype: torch.dtype) -> dict:
    """Constexprs and launch options of one kernel: BLOCK_Q x BLOCK_J row tiles (BLOCK_J covers the row-side
    window when it fits), BLOCK_N columns, BLOCK_D."""
    if GPU_TILES:
        block_m, block_n, num_warps, num_stages = (_GPU_TILES_WIDE if dtype.itemsize >= 4 else _GPU_TILES)[kernel]
    else:
        block_m, block_n, num_warps, num_stages = (_INTERPRETER_ROWS[kernel],
                                                   max(16, min(64, triton.next_power_of_2(n))), 4, 1)
    block_j = min(triton.next_power_of_2(max(min(wr, n), 1)), block_m)
    return dict(BLOCK_Q=block_m // block_j, BLOCK_J=block_j, BLOCK_N=block_n,
                BLOCK_D=max(16, triton.next_power_of_2(d)), num_warps=num_warps, num_stages=num_stages)


def _common(q: Tensor, causal: bool) -> dict:
    return dict(CAUSAL=causal, DOT=dot_dtype(q.dtype), COMPUTE=compute_dtype(q.dtype))


def tensor_attention_fwd(q: Tensor, kr: Tensor, kc: Tensor, vr: Tensor, vc: Tensor, wr: int, wc: int,
                         causal: bool, scale: float) -> tuple[Tensor, Tensor]:
    """q [B, H, n, d], kr/kc/vr/vc [B, Hkv, n, d], all contiguous and of one dtype; wr, wc the row- and
    column-side windows (n when there is none; the caller puts the smaller window on the row side).

    Returns (out [B, H, n, d] in q.dtype, lse [B, H, n] fp32, fp64 for fp64 inputs, natural log).
    """
    B, H, n, d = q.shape
    out = torch.empty_like(q)
    lse = torch.empty((B, H, n), dtype=accumulator_dtype(q.dtype), device=q.device)
    tiles = _tiles("fwd", n, d, wr, q.dtype)
    grid = (triton.cdiv(n, tiles["BLOCK_Q"]), B * H)
    _tensor_attention_fwd_kernel[grid](q, kr, kc, vr, vc, out, lse, n, d, H, H // kr.shape[1], wr, wc,
                                       scale * LOG2E.value, **tiles, **_common(q, causal))
    return out, lse


def tensor_attention_bwd(grad_out: Tensor, delta: Tensor, q: Tensor, kr: Tensor, kc: Tensor, vr: Tensor,
                         vc: Tensor, lse: Tensor, wr: int, wc: int, causal: bool,
                         scale: float) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """grad_out [B, H, n, d] contiguous; delta [B, H, n] = <dO_i, o_i> - dlse_i and lse from the forward (fp32 or
    fp64); the rest as in ``tensor_attention_fwd``. Returns (dq, dkr, dkc, dvr, dvc) in the inputs' dtype."""
    B, H, n, d = q.shape
    heads_kv = kr.shape[1]
    group = H // heads_kv
    dq = torch.empty_like(q)
    dkr, dkc, dvr, dvc = (torch.empty_like(x) for x in (kr, kc, vr, vc))
    rows, columns = (_tiles(kernel, n, d, wr, q.dtype) for kernel in ("rows", "columns"))
    tensors = (q, kr, kc, vr, vc, grad_out, lse, delta)
    for query_stationary in (True, False):
        heads = B * H if query_stationary else B * heads_kv
        _tensor_attention_bwd_rows_kernel[(triton.cdiv(n, rows["BLOCK_Q"]), heads)](
            *tensors, dq, dkr, dvr, n, d, H, group, wr, wc, scale, scale * LOG2E.value,
            QUERY_STATIONARY=query_stationary, **rows, **_common(q, causal))
    _tensor_attention_bwd_columns_kernel[(triton.cdiv(n, columns["BLOCK_N"]), B * heads_kv)](
        *tensors, dkc, dvc, n, d, H, group, wr, wc, scale * LOG2E.value, **columns, **_common(q, causal))
    return dq, dkr, dkc, dvr, dvc
