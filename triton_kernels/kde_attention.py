"""Triton kernels for KDE attention (KDEformer, arXiv 2302.02451, fused as in HyperAttention, arXiv 2310.05869).

The plan (hashes, sort permutations, blocks, samples) comes from torchext.reference.kde_attention.make_plan; these
kernels evaluate the estimator of that module's docstring without materialising any N x (b + m) matrix:

- forward: one program per query tile (queries of one LSH block, in sorted order) keeps a single online-softmax
  state over the exact keys of its block, then over the m keys sampled for that tile, whose importance weight
  log(Q / (m p_j)) is an additive logit bias and which are masked when they lie in the tile's own block. Out and
  log-sum-exp are written at the queries' original positions. Causal mode runs one launch for the exact windows,
  then one per level that resumes each query's state from (out, lse) of the launches before (each query is in at
  most one piece per level, so there are no races).
- backward (FlashAttention-2 style, recomputing P with the joint lse, so it is the exact gradient of the
  estimator): dq per query tile over the same keys; dk, dv per key tile of each block over the queries assigned
  to that block (and every query head of the kv head: GQA needs no atomics); the dq program of a query tile also
  adds the dk, dv contributions of its own sampled keys into dk, dv with atomics (a key may be drawn by many
  tiles, or twice by one; a per-slot buffer would cost B H T m (D + Dv) words, 5 GB per level at 128K causal,
  B 1, H 32), and writes each slot's d loss / d log w (the column sum of dS), through which value-norm sampling
  weights pass gradient to v.

Conventions: fp32 accumulation (fp64 for fp64 inputs), 16-bit operands straight into tl.dot on GPU and upcast
under the interpreter, int64 offsets, every load and store masked. Scores are kept in log2 units (exp2).
"""

import torch
import triton
import triton.language as tl
from torch import Tensor

from torchext.reference import kde_attention as ref

from ._attention import online_softmax_step, softmax_result
from ._launch import GPU_TILES, accumulator_dtype, compute_dtype, dot, dot_dtype

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453


# (BLOCK_N, num_warps, num_stages) of each kernel on a GPU, for head_dim <= 64 and > 64. BLOCK_M is the plan's query
# tile (min(bucket, 128): a tile lies in one block and owns one sample set). The largest that compile for sm_80 and
# sm_90 without spilling (bench/offline.py; 64-key tiles with 4 warps spilled up to 1.5 KB per thread in the
# backward; under Triton 3.6, 32-key dk/dv tiles at head_dim <= 64 spilled 48 bytes on sm_80), except the dq kernel
# at head_dim 128 on sm_80 (bench/offline.py's ALLOWED_SPILLS says why). Not yet timed on a GPU.
_GPU_BLOCKS = {"fwd": ((64, 8, 1), (32, 8, 1)), "dq": ((32, 8, 1), (16, 8, 1)), "dkdv": ((16, 8, 1), (32, 8, 1)),
               # value-norm sampling's dq also sums dS per sample slot: 32 keys spilled 188 bytes on sm_80
               "dq_value_weights": ((16, 8, 1), (16, 8, 1))}
_GPU_BLOCKS_WIDE = (16, 8, 1)  # fp32 / fp64 operands: FMA dots from registers, every kernel
_INTERPRETER_BLOCKS = (64, 4, 1)
# The head dims a 128-query tile fits on a GPU, by operand bytes: past them no tile compiles without spilling
# (fp32 spilled 2-70 KB per thread at head_dim 64; like FlashAttention, the fast path is 16-bit).
MAX_HEAD_DIM_GPU = {2: 128, 4: 32, 8: 32}


def _check_head_dims(q: Tensor, v: Tensor) -> None:
    limit = MAX_HEAD_DIM_GPU[q.dtype.itemsize]
    if GPU_TILES and max(q.shape[-1], v.shape[-1]) > limit:
        hint = f"; bfloat16 or float16 inputs allow {MAX_HEAD_DIM_GPU[2]}" if q.dtype.itemsize > 2 else ""
        raise ValueError(f"kde_attention: head dims {q.shape[-1]} / {v.shape[-1]} exceed the GPU kernels' limit of "
                         f"{limit} for {q.dtype}{hint}")


def _blocks(kernel: str, d: int, dtype: torch.dtype) -> tuple[int, int, int]:
    """(BLOCK_N, num_warps, num_stages) of one kernel."""
    if not GPU_TILES:
        return _INTERPRETER_BLOCKS
    return _GPU_BLOCKS_WIDE if dtype.itemsize >= 4 else _GPU_BLOCKS[kernel][d > 64]


# ---- shared pieces -----------------------------------------------------------------------------------------------


@triton.jit
def _rows(ptr, idx, ok, stride_n, cols, n_cols, DTYPE: tl.constexpr):
    """Gather rows idx [R] of a [N, n_cols] slab with row stride stride_n -> [R, BLOCK] in DTYPE (DOT: q, k, v and dO
    only feed dots, so 16-bit inputs stay 16-bit in registers, half the registers of an fp32 copy)."""
    mask = ok[:, None] & (cols[None, :] < n_cols)
    return tl.load(ptr + idx.to(tl.int64)[:, None] * stride_n + cols[None, :], mask=mask, other=0.0).to(DTYPE)


@triton.jit
def _query_tile(tile_start_ptr, tile_count_ptr, tile_block_ptr, perm_q_ptr, n, H, G, table_bh_stride,
                IDENTITY: tl.constexpr, BLOCK_M: tl.constexpr):
    """This program's query tile (axis 0: tile, axis 1: batch x head): original query indices [BLOCK_M], row mask,
    global block id, row count, the (batch, head, batch x kv head) it belongs to, and its row of the tile tables
    (and of the per-tile samples)."""
    tile = tl.program_id(0).to(tl.int64)
    bh = tl.program_id(1).to(tl.int64)
    b, h = bh // H, bh % H
    entry = bh * table_bh_stride + tile
    count = tl.load(tile_count_ptr + entry)
    start = tl.load(tile_start_ptr + entry)
    block = tl.load(tile_block_ptr + entry)
    offs = tl.arange(0, BLOCK_M)
    ok = offs < count
    if IDENTITY:
        qi = (start + offs).to(tl.int64)
    else:
        qi = tl.load(perm_q_ptr + bh * n + start + offs, mask=ok, other=0).to(tl.int64)
    return qi, ok, block, count, b, h, b * (H // G) + h // G, entry


@triton.jit
def _key_range(block, blocks_per_piece, keys_per_piece, bucket, n):
    """Sorted key positions [lo, hi) of a global block id (piece p, block t): p L + t b, clipped to the piece."""
    piece = block // blocks_per_piece
    lo = piece * keys_per_piece + (block % blocks_per_piece) * bucket
    hi = tl.minimum(tl.minimum(lo + bucket, piece * keys_per_piece + keys_per_piece), n)
    return lo, hi


@triton.jit
def _block_keys(perm_k_ptr, bhk, n, pos, hi, IDENTITY: tl.constexpr):
    """Original indices of the keys at sorted positions pos [BLOCK_N] (< hi), and their mask. Masked keys point
    at row 0, so tiles load without a row mask and the scores mask them out."""
    ok = pos < hi
    if IDENTITY:
        return tl.where(ok, pos, 0).to(tl.int64), ok
    return tl.load(perm_k_ptr + bhk * n + pos, mask=ok, other=0).to(tl.int64), ok


@triton.jit
def _sample_keys(s_idx_ptr, s_block_ptr, s_logw_ptr, row, slots, n_samples, log2e):
    """(key index, block, log2 weight, mask) of sample slots [BLOCK_N] of one query tile's row."""
    ok = slots < n_samples
    offs = row * n_samples + slots
    idx = tl.load(s_idx_ptr + offs, mask=ok, other=0)
    blk = tl.load(s_block_ptr + offs, mask=ok, other=-1)
    logw = tl.load(s_logw_ptr + offs, mask=ok, other=0.0) * log2e  # log(1/(m p)) in log2 units
    return idx, blk, logw, ok


@triton.jit
def _product(a, b, DOT: tl.constexpr):
    """a [R, K] @ b [K, C] into a fresh accumulator (fp64 for fp64 operands, else fp32)."""
    acc = tl.zeros((a.shape[0], b.shape[1]), dtype=tl.float64 if DOT == tl.float64 else tl.float32)
    return dot(a, b, acc, DOT)


@triton.jit
def _scores(a, b_t, DOT: tl.constexpr):
    """a [R, D] . b [C, D]^T -> [R, C]."""
    return _product(a, tl.trans(b_t), DOT)


@triton.jit
def _constants(consts_ptr, COMPUTE: tl.constexpr):
    """(scale log2(e), scale, log2(e), ln(2)) in the compute dtype: Python floats would reach the kernel as fp32,
    which is not exact enough for fp64 inputs."""
    return (tl.load(consts_ptr).to(COMPUTE), tl.load(consts_ptr + 1).to(COMPUTE), tl.load(consts_ptr + 2).to(COMPUTE),
            tl.load(consts_ptr + 3).to(COMPUTE))


@triton.jit
def _query_keys(block, blocks_per_piece, keys_per_piece, bucket, n, qi, q_ok, CAUSAL: tl.constexpr):
    """A query tile's exact keys: sorted positions [lo, hi) of its block (in a causal window, up to the tile's last
    query), and its block t within the piece."""
    lo, hi = _key_range(block, blocks_per_piece, keys_per_piece, bucket, n)
    if CAUSAL:
        hi = tl.minimum(hi, tl.max(tl.where(q_ok, qi, 0), axis=0) + 1)
    return lo, hi, block % blocks_per_piece


@triton.jit
def _query_block_tile(perm_k_ptr, bhk, n, start, hi, qi, IDENTITY: tl.constexpr, CAUSAL: tl.constexpr,
                      BLOCK_N: tl.constexpr):
    """Exact key tile at sorted positions start + [0, BLOCK_N): (key indices, [BLOCK_M, BLOCK_N] mask)."""
    kj, k_ok = _block_keys(perm_k_ptr, bhk, n, start + tl.arange(0, BLOCK_N), hi, IDENTITY)
    key_ok = k_ok[None, :]
    if CAUSAL:
        key_ok = key_ok & (kj[None, :] <= qi[:, None])
    return kj, key_ok


@triton.jit
def _query_sample_tile(s_idx_ptr, s_block_ptr, s_logw_ptr, row, start, n_samples, t, log2e, COMPUTE: tl.constexpr,
                       BLOCK_N: tl.constexpr):
    """Sampled key tile seen from a query tile of block t: (key indices, mask without block t, logit bias)."""
    kj, s_blk, logw, s_ok = _sample_keys(s_idx_ptr, s_block_ptr, s_logw_ptr, row, start + tl.arange(0, BLOCK_N),
                                         n_samples, log2e)
    return kj, (s_ok & (s_blk != t))[None, :], logw[None, :].to(COMPUTE)


# ---- forward ------------------------------------------------------------------------------------------------------


@triton.jit
def _attend(q, k_ptr, v_ptr, kj, key_ok, bias, m_i, l_i, acc, stride_kn, stride_vn, cols_d, cols_dv, D, DV, qk_scale,
            DOT: tl.constexpr):
    """Fold one key tile into the running online-softmax state of every query row."""
    k = _rows(k_ptr, kj, kj >= 0, stride_kn, cols_d, D, DOT)  # [BLOCK_N, D]
    s = _scores(q, k, DOT) * qk_scale + bias  # [BLOCK_M, BLOCK_N] log2 units
    v = _rows(v_ptr, kj, kj >= 0, stride_vn, cols_dv, DV, DOT)
    return online_softmax_step(m_i, l_i, acc, s, key_ok, v, DOT)


@triton.jit
def _kde_attention_fwd_kernel(
        q_ptr, k_ptr, v_ptr, out_ptr, lse_ptr,
        perm_q_ptr, perm_k_ptr, tile_start_ptr, tile_count_ptr, tile_block_ptr, s_idx_ptr, s_block_ptr, s_logw_ptr,
        n, H, G, D, DV, table_bh_stride, blocks_per_piece, keys_per_piece, bucket, n_samples,
        consts_ptr, stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
        IDENTITY: tl.constexpr, CAUSAL: tl.constexpr, ACCUMULATE: tl.constexpr, BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, COMPUTE: tl.constexpr,
        DOT: tl.constexpr):
    qk_scale, scale, log2e, ln2 = _constants(consts_ptr, COMPUTE)
    qi, q_ok, block, count, b, h, bhk, entry = _query_tile(tile_start_ptr, tile_count_ptr, tile_block_ptr, perm_q_ptr,
                                                           n, H, G, table_bh_stride, IDENTITY, BLOCK_M)
    if count > 0:
        cols_d = tl.arange(0, BLOCK_D)
        cols_dv = tl.arange(0, BLOCK_DV)
        q = _rows(q_ptr + b * stride_qb + h * stride_qh, qi, q_ok, stride_qn, cols_d, D, DOT)  # [BLOCK_M, D]
        k_base = k_ptr + b * stride_kb + (h // G) * stride_kh
        v_base = v_ptr + b * stride_vb + (h // G) * stride_vh
        row_out = (b * H + h) * n + qi  # [BLOCK_M]
        if ACCUMULATE:  # resume from the launches before: m = lse, l = 1, acc = out
            lse_old = tl.load(lse_ptr + row_out, mask=q_ok, other=-float("inf")).to(COMPUTE)
            m_i = lse_old * log2e
            l_i = tl.where(lse_old == -float("inf"), 0.0, 1.0).to(COMPUTE)
            acc = tl.load(out_ptr + row_out[:, None] * DV + cols_dv[None, :],
                          mask=q_ok[:, None] & (cols_dv[None, :] < DV), other=0.0).to(COMPUTE)
        else:
            m_i = tl.full([BLOCK_M], -float("inf"), dtype=COMPUTE)
            l_i = tl.zeros([BLOCK_M], dtype=COMPUTE)
            acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=COMPUTE)

        # Exact part: the keys of the tile's own block (in causal windows only those at or before each query).
        lo, hi, t = _query_keys(block, blocks_per_piece, keys_per_piece, bucket, n, qi, q_ok, CAUSAL)
        for start in range(lo, hi, BLOCK_N):
            kj, key_ok = _query_block_tile(perm_k_ptr, bhk, n, start, hi, qi, IDENTITY, CAUSAL, BLOCK_N)
            m_i, l_i, acc = _attend(q, k_base, v_base, kj, key_ok, 0.0, m_i, l_i, acc, stride_kn, stride_vn, cols_d,
                                    cols_dv, D, DV, qk_scale, DOT)
        # Sampled part: the tile's m keys with bias log(1/(m p_j)), excluding those of the own block.
        for start in range(0, n_samples, BLOCK_N):
            kj, key_ok, bias = _query_sample_tile(s_idx_ptr, s_block_ptr, s_logw_ptr, entry, start, n_samples, t,
                                                  log2e, COMPUTE, BLOCK_N)
            m_i, l_i, acc = _attend(q, k_base, v_base, kj, key_ok, bias, m_i, l_i, acc, stride_kn, stride_vn, cols_d,
                                    cols_dv, D, DV, qk_scale, DOT)

        out, lse2 = softmax_result(m_i, l_i, acc)
        tl.store(lse_ptr + row_out, lse2 * ln2, mask=q_ok)
        tl.store(out_ptr + row_out[:, None] * DV + cols_dv[None, :], out.to(out_ptr.dtype.element_ty),
                 mask=q_ok[:, None] & (cols_dv[None, :] < DV))


# ---- backward: dq ---------------------------------------------------------------------------------------------


@triton.jit
def _dq_step(q, do, lse2, delta, dq, k_ptr, v_ptr, kj, key_ok, bias, stride_kn, stride_vn, cols_d, cols_dv, D, DV,
             qk_scale, COMPUTE: tl.constexpr, DOT: tl.constexpr):
    """dq += dS K over one key tile, with P recomputed from the joint lse and dS = P (dO V^T - delta).
    Returns (dq, P [BLOCK_M, BLOCK_N], dS)."""
    k = _rows(k_ptr, kj, kj >= 0, stride_kn, cols_d, D, DOT)
    v = _rows(v_ptr, kj, kj >= 0, stride_vn, cols_dv, DV, DOT)
    s = _scores(q, k, DOT) * qk_scale + bias
    p = tl.where(key_ok, tl.exp2(s - lse2[:, None]), 0.0)  # [BLOCK_M, BLOCK_N]
    ds = p * (_scores(do, v, DOT) - delta[:, None])
    return dot(ds, k, dq, DOT), p, ds


@triton.jit
def _add_rows(ptr, rows, ok, cols, n_cols, x):
    """Atomically add x [BLOCK_N, BLOCK] to rows ``rows`` of a [*, n_cols] buffer (rows may repeat across programs
    and within x)."""
    tl.atomic_add(ptr + rows.to(tl.int64)[:, None] * n_cols + cols[None, :], x,
                  mask=ok[:, None] & (cols[None, :] < n_cols))


@triton.jit
def _kde_attention_bwd_dq_kernel(
        q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dq_ptr, dk_ptr, dv_ptr, dlogw_s_ptr,
        perm_q_ptr, perm_k_ptr, tile_start_ptr, tile_count_ptr, tile_block_ptr, s_idx_ptr, s_block_ptr, s_logw_ptr,
        n, H, G, D, DV, table_bh_stride, blocks_per_piece, keys_per_piece, bucket, n_samples,
        consts_ptr, stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh,
        stride_vn,
        IDENTITY: tl.constexpr, CAUSAL: tl.constexpr, VALUE_WEIGHTS: tl.constexpr, BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, COMPUTE: tl.constexpr,
        DOT: tl.constexpr):
    """dq of one query tile; the dk, dv contributions of its sampled keys added into dk, dv ([B, Hk, N, D / DV] fp32
    accumulators, scale applied); with VALUE_WEIGHTS (weights that depend on v) d loss / d log w of each slot,
    dlogw_s [tile rows, m] (zeros for the slots of a tile with no queries)."""
    qk_scale, scale, log2e, ln2 = _constants(consts_ptr, COMPUTE)
    qi, q_ok, block, count, b, h, bhk, entry = _query_tile(tile_start_ptr, tile_count_ptr, tile_block_ptr, perm_q_ptr,
                                                           n, H, G, table_bh_stride, IDENTITY, BLOCK_M)
    cols_d = tl.arange(0, BLOCK_D)
    cols_dv = tl.arange(0, BLOCK_DV)
    if count > 0:
        row = (b * H + h) * n + qi
        q = _rows(q_ptr + b * stride_qb + h * stride_qh, qi, q_ok, stride_qn, cols_d, D, DOT)
        do = _rows(do_ptr, row, q_ok, DV, cols_dv, DV, DOT)  # [BLOCK_M, DV]
        lse2 = tl.load(lse_ptr + row, mask=q_ok, other=0.0).to(COMPUTE) * log2e
        delta = tl.load(delta_ptr + row, mask=q_ok, other=0.0).to(COMPUTE)
        k_base = k_ptr + b * stride_kb + (h // G) * stride_kh
        v_base = v_ptr + b * stride_vb + (h // G) * stride_vh
        dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=COMPUTE)
        lo, hi, t = _query_keys(block, blocks_per_piece, keys_per_piece, bucket, n, qi, q_ok, CAUSAL)
        for start in range(lo, hi, BLOCK_N):
            kj, key_ok = _query_block_tile(perm_k_ptr, bhk, n, start, hi, qi, IDENTITY, CAUSAL, BLOCK_N)
            dq, p, ds = _dq_step(q, do, lse2, delta, dq, k_base, v_base, kj, key_ok, 0.0, stride_kn, stride_vn,
                                 cols_d, cols_dv, D, DV, qk_scale, COMPUTE, DOT)
        for start in range(0, n_samples, BLOCK_N):
            kj, key_ok, bias = _query_sample_tile(s_idx_ptr, s_block_ptr, s_logw_ptr, entry, start, n_samples, t,
                                                  log2e, COMPUTE, BLOCK_N)
            dq, p, ds = _dq_step(q, do, lse2, delta, dq, k_base, v_base, kj, key_ok, bias, stride_kn, stride_vn,
                                 cols_d, cols_dv, D, DV, qk_scale, COMPUTE, DOT)
            # The sampled keys' gradients from this tile's queries: dk = dS^T Q, dv = P^T dO (sample slots as rows).
            slots = start + tl.arange(0, BLOCK_N)
            slot_ok = slots < n_samples
            kv_rows = bhk * n + kj
            _add_rows(dk_ptr, kv_rows, slot_ok & (kj >= 0), cols_d, D, _product(tl.trans(ds), q, DOT) * scale)
            _add_rows(dv_ptr, kv_rows, slot_ok & (kj >= 0), cols_dv, DV, _product(tl.trans(p), do, DOT))
            if VALUE_WEIGHTS:
                tl.store(dlogw_s_ptr + entry * n_samples + slots, tl.sum(ds, axis=0), mask=slot_ok)
        dq_ptrs = dq_ptr + row[:, None] * D + cols_d[None, :]
        dq_mask = q_ok[:, None] & (cols_d[None, :] < D)
        tl.store(dq_ptrs, tl.load(dq_ptrs, mask=dq_mask, other=0.0) + dq * scale, mask=dq_mask)
    elif VALUE_WEIGHTS:
        for start in range(0, n_samples, BLOCK_N):
            slots = start + tl.arange(0, BLOCK_N)
            tl.store(dlogw_s_ptr + entry * n_samples + slots, tl.zeros([BLOCK_N], dtype=COMPUTE),
                     mask=slots < n_samples)


# ---- backward: dk, dv -----------------------------------------------------------------------------------------


@triton.jit
def _dkdv_step(k, v, dk, dv, q_ptr, do_ptr, lse_ptr, delta_ptr, qi, row, q_ok, allowed, stride_qn, cols_d, cols_dv,
               D, DV, qk_scale, log2e, COMPUTE: tl.constexpr, DOT: tl.constexpr):
    """dv += P^T dO and dk += dS^T Q over one query tile (transposed tiles: keys are the rows here)."""
    q = _rows(q_ptr, qi, q_ok, stride_qn, cols_d, D, DOT)  # [BLOCK_M, D]
    do = _rows(do_ptr, row, q_ok, DV, cols_dv, DV, DOT)  # [BLOCK_M, DV]
    lse2 = tl.load(lse_ptr + row, mask=q_ok, other=0.0).to(COMPUTE) * log2e
    delta = tl.load(delta_ptr + row, mask=q_ok, other=0.0).to(COMPUTE)
    s_t = _scores(k, q, DOT) * qk_scale  # [BLOCK_N, BLOCK_M]
    p_t = tl.where(allowed & q_ok[None, :], tl.exp2(s_t - lse2[None, :]), 0.0)
    dv = dot(p_t, do, dv, DOT)
    ds_t = p_t * (_scores(v, do, DOT) - delta[None, :])
    dk = dot(ds_t, q, dk, DOT)
    return dk, dv


@triton.jit
def _kde_attention_bwd_dkdv_kernel(
        q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr,
        perm_q_ptr, perm_k_ptr, block_q_start_ptr, block_q_count_ptr,
        n, H, G, D, DV, table_bh_stride, blocks_per_piece, keys_per_piece, bucket, tiles_per_block,
        consts_ptr, stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh,
        stride_vn,
        IDENTITY: tl.constexpr, CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, COMPUTE: tl.constexpr, DOT: tl.constexpr):
    """One key tile of one block: dk, dv over the queries of that block in every query head of the kv head."""
    pid = tl.program_id(0).to(tl.int64)
    bhk = tl.program_id(1).to(tl.int64)
    qk_scale, scale, log2e, ln2 = _constants(consts_ptr, COMPUTE)
    Hk = H // G
    b, hk = bhk // Hk, bhk % Hk
    block = pid // tiles_per_block
    lo, hi = _key_range(block, blocks_per_piece, keys_per_piece, bucket, n)
    key_start = lo + (pid % tiles_per_block) * BLOCK_N
    if key_start < hi:
        cols_d = tl.arange(0, BLOCK_D)
        cols_dv = tl.arange(0, BLOCK_DV)
        kj, k_ok = _block_keys(perm_k_ptr, bhk, n, key_start + tl.arange(0, BLOCK_N), hi, IDENTITY)
        k = _rows(k_ptr + b * stride_kb + hk * stride_kh, kj, k_ok, stride_kn, cols_d, D, DOT)  # [BLOCK_N, D]
        v = _rows(v_ptr + b * stride_vb + hk * stride_vh, kj, k_ok, stride_vn, cols_dv, DV, DOT)
        dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=COMPUTE)
        dv = tl.zeros([BLOCK_N, BLOCK_DV], dtype=COMPUTE)
        for g in range(0, G):
            bh = b * H + hk * G + g
            entry = bh * table_bh_stride + block
            q_lo = tl.load(block_q_start_ptr + entry)
            q_hi = q_lo + tl.load(block_q_count_ptr + entry)
            if CAUSAL:  # identity order: queries before the key tile see none of it
                q_lo = tl.maximum(q_lo, key_start // BLOCK_M * BLOCK_M)
            for q_start in range(q_lo, q_hi, BLOCK_M):
                offs = q_start + tl.arange(0, BLOCK_M)
                q_ok = offs < q_hi
                if IDENTITY:
                    qi = offs.to(tl.int64)
                else:
                    qi = tl.load(perm_q_ptr + bh * n + offs, mask=q_ok, other=0).to(tl.int64)
                allowed = k_ok[:, None]
                if CAUSAL:
                    allowed = allowed & (kj[:, None] <= qi[None, :])
                dk, dv = _dkdv_step(k, v, dk, dv, q_ptr + b * stride_qb + (hk * G + g) * stride_qh, do_ptr,
                                    lse_ptr, delta_ptr, qi, bh * n + qi, q_ok, allowed, stride_qn, cols_d, cols_dv,
                                    D, DV, qk_scale, log2e, COMPUTE, DOT)
        row = bhk * n + kj
        dk_ptrs = dk_ptr + row[:, None] * D + cols_d[None, :]
        dk_mask = k_ok[:, None] & (cols_d[None, :] < D)
        tl.store(dk_ptrs, tl.load(dk_ptrs, mask=dk_mask, other=0.0) + dk * scale, mask=dk_mask)
        dv_ptrs = dv_ptr + row[:, None] * DV + cols_dv[None, :]
        dv_mask = k_ok[:, None] & (cols_dv[None, :] < DV)
        tl.store(dv_ptrs, tl.load(dv_ptrs, mask=dv_mask, other=0.0) + dv, mask=dv_mask)


# ---- schedules (torch): which queries each program takes --------------------------------------------------------


class _Schedule:
    """Query tiles and per-block query ranges of one launch (a level of the plan, or the exact causal windows), as
    int32 tables: each block's queries sit together in perm_q (None: original order), cut into BLOCK_M tiles (see
    torchext.reference.kde_attention.QueryTiles). Tables are [B*H, *], or [1, *] shared by every head."""

    def __init__(self, perm_q: Tensor | None, tiles, blocks_per_piece: int, keys_per_piece: int):
        rows, self.n_tiles = tiles.count.shape
        self.n_blocks = tiles.block_count.shape[-1]
        self.tile_start, self.tile_count, self.tile_block, self.block_q_start, self.block_q_count = (
            x.to(torch.int32).contiguous() for x in (tiles.start, tiles.count, tiles.block, tiles.block_start,
                                                      tiles.block_count))
        self.perm_q = None if perm_q is None else perm_q.to(torch.int32).contiguous()
        self.blocks_per_piece, self.keys_per_piece = blocks_per_piece, keys_per_piece
        self.tile_stride, self.block_stride = (self.n_tiles, self.n_blocks) if rows > 1 else (0, 0)


def _window_schedule(n: int, window: int, block_m: int, device) -> _Schedule:
    """Exact causal windows in original order: block c = window c, one schedule shared by every head."""
    counts = (n - torch.arange(triton.cdiv(n, window), device=device) * window).clamp_max(window)[None]
    return _Schedule(None, ref.query_tiles(counts, block_m, n), 1, window)


def _level_schedule(level, bucket: int) -> _Schedule:
    """The plan's query order and tiles of one level (queries in no piece, the even causal chunks, unscheduled)."""
    keys_per_piece = min(level.chunk, level.q_block.shape[-1])
    return _Schedule(level.perm_q.flatten(0, 1), level.tiles, triton.cdiv(keys_per_piece, bucket), keys_per_piece)


class _Launch:
    """The tensors of one launch: its schedule, key order and samples (none for the exact windows)."""

    def __init__(self, plan, level, n: int, block_m: int, device, weight_dtype: torch.dtype):
        self.level = level
        if level is None:
            self.schedule = _window_schedule(n, plan.window, block_m, device)
            empty = torch.zeros(0, dtype=torch.int32, device=device)
            self.perm_k, self.s_idx, self.s_block, self.s_logw = empty, empty, empty, empty.to(weight_dtype)
            self.bucket, self.n_samples = plan.window, 0
        else:
            self.schedule = _level_schedule(level, plan.bucket)
            self.perm_k = level.perm_k.to(torch.int32).contiguous()
            self.s_idx = level.sample_idx.to(torch.int32).contiguous()
            self.s_block = level.sample_block.to(torch.int32).contiguous()
            self.s_logw = level.sample_logw.to(weight_dtype).contiguous()
            self.bucket, self.n_samples = plan.bucket, level.sample_idx.shape[-1]
        self.identity = self.causal = level is None
        self.perm_q = self.schedule.perm_q if self.schedule.perm_q is not None else self.perm_k


def _launches(plan, n: int, block_m: int, device, weight_dtype: torch.dtype) -> list[_Launch]:
    """The exact causal windows first (causal plans), then every level, in accumulation order; sample log weights in
    weight_dtype (the accumulator dtype: fp64 inputs get their weights in fp64, so the op is smooth in v)."""
    levels = ([None] if plan.window is not None else []) + list(plan.levels)
    return [_Launch(plan, level, n, block_m, device, weight_dtype) for level in levels]


# ---- launchers ------------------------------------------------------------------------------------------------------


def _strides(*xs: Tensor) -> tuple[int, ...]:
    """(batch, head, row) strides of each [B, H, N, D] tensor."""
    return tuple(s for x in xs for s in x.stride()[:3])


def _meta(kernel: str, q: Tensor, v: Tensor, plan) -> dict:
    """Tile sizes, warps, stages and the compute and dot dtypes of one kernel's launches."""
    D, DV = q.shape[-1], v.shape[-1]
    block_n, num_warps, num_stages = _blocks(kernel, D, q.dtype)
    # dk, dv step through a block's queries BLOCK_M at a time, any power of two up to the tile: wide operands, 32.
    block_m = min(plan.tile, 32) if kernel == "dkdv" and GPU_TILES and q.dtype.itemsize >= 4 else plan.tile
    return dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=max(16, triton.next_power_of_2(D)),
                BLOCK_DV=max(16, triton.next_power_of_2(DV)), COMPUTE=compute_dtype(q.dtype), DOT=dot_dtype(q.dtype),
                num_warps=num_warps, num_stages=num_stages)


def _consts(scale: float, dtype: torch.dtype, device) -> Tensor:
    """[qk_scale, scale, log2(e), ln(2)] in the accumulator dtype (fp64 ones for fp64 inputs, which a float kernel
    argument would round to fp32), filled on the device: torch.tensor would copy from pageable host memory on every
    call, which a CUDA graph cannot capture."""
    return torch.stack([torch.full((), c, dtype=accumulator_dtype(dtype), device=device)
                        for c in (scale * LOG2E, scale, LOG2E, LN2)])


def kde_attention_fwd(q: Tensor, k: Tensor, v: Tensor, plan, scale: float) -> tuple[Tensor, Tensor]:
    """q [B, H, N, D], k [B, Hk, N, D], v [B, Hk, N, Dv] (unit last stride), plan from make_plan ->
    (out [B, H, N, Dv] contiguous in q.dtype, lse [B, H, N] fp32, fp64 for fp64 q)."""
    B, H, n, D = q.shape
    Hk, DV = k.shape[1], v.shape[-1]
    acc_dtype = accumulator_dtype(q.dtype)
    _check_head_dims(q, v)
    meta = _meta("fwd", q, v, plan)
    launches = _launches(plan, n, meta["BLOCK_M"], q.device, acc_dtype)
    # One launch writes the output directly; several resume each other's state from an fp32 buffer.
    out = torch.empty((B, H, n, DV), dtype=q.dtype if len(launches) == 1 else acc_dtype, device=q.device)
    lse = torch.empty((B, H, n), dtype=acc_dtype, device=q.device)
    consts = _consts(scale, q.dtype, q.device)
    for i, launch in enumerate(launches):
        s = launch.schedule
        _kde_attention_fwd_kernel[(s.n_tiles, B * H)](
            q, k, v, out, lse, launch.perm_q, launch.perm_k, s.tile_start, s.tile_count, s.tile_block, launch.s_idx,
            launch.s_block, launch.s_logw, n, H, H // Hk, D, DV, s.tile_stride, s.blocks_per_piece, s.keys_per_piece,
            launch.bucket, launch.n_samples, consts, *_strides(q, k, v),
            IDENTITY=launch.identity, CAUSAL=launch.causal, ACCUMULATE=i > 0, **meta)
    return out.to(q.dtype), lse


def kde_attention_bwd(grad_out: Tensor, grad_lse: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                      plan, scale: float) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of kde_attention_fwd for the same plan: grad_out [B, H, N, Dv], grad_lse [B, H, N], and the
    forward's out and lse -> (dq, dk, dv) contiguous in the dtypes of q, k, v."""
    B, H, n, D = q.shape
    Hk, DV = k.shape[1], v.shape[-1]
    acc_dtype = accumulator_dtype(q.dtype)
    value_weights = plan.sampling != "uniform"
    dq_meta, dkdv_meta = _meta("dq_value_weights" if value_weights else "dq", q, v, plan), _meta("dkdv", q, v, plan)
    block_m = dq_meta["BLOCK_M"]
    grad_out = grad_out.contiguous()
    # delta_i = dO_i . O_i - dlse_i: dS = P (dP - delta) is then the gradient through both outputs.
    delta = ((grad_out.to(acc_dtype) * out.to(acc_dtype)).sum(-1) - grad_lse.to(acc_dtype)).contiguous()
    lse = lse.contiguous()
    dq = torch.zeros((B, H, n, D), dtype=acc_dtype, device=q.device)
    dk = torch.zeros((B, Hk, n, D), dtype=acc_dtype, device=q.device)
    dv = torch.zeros((B, Hk, n, DV), dtype=acc_dtype, device=q.device)
    consts = _consts(scale, q.dtype, q.device)
    strides = _strides(q, k, v)
    slot_grads = []  # d loss / d log w of every level's sample slots (value-norm sampling only)
    for launch in _launches(plan, n, block_m, q.device, acc_dtype):
        s = launch.schedule
        flags = dict(IDENTITY=launch.identity, CAUSAL=launch.causal)
        dlogw_s = torch.empty((B, H, s.n_tiles, launch.n_samples if value_weights else 0), dtype=acc_dtype,
                              device=q.device)
        _kde_attention_bwd_dq_kernel[(s.n_tiles, B * H)](
            q, k, v, grad_out, lse, delta, dq, dk, dv, dlogw_s, launch.perm_q, launch.perm_k, s.tile_start,
            s.tile_count, s.tile_block, launch.s_idx, launch.s_block, launch.s_logw, n, H, H // Hk, D, DV,
            s.tile_stride, s.blocks_per_piece, s.keys_per_piece, launch.bucket, launch.n_samples, consts, *strides,
            VALUE_WEIGHTS=value_weights, **flags, **dq_meta)
        tiles_per_block = triton.cdiv(launch.bucket, dkdv_meta["BLOCK_N"])
        _kde_attention_bwd_dkdv_kernel[(s.n_blocks * tiles_per_block, B * Hk)](
            q, k, v, grad_out, lse, delta, dk, dv, launch.perm_q, launch.perm_k, s.block_q_start, s.block_q_count,
            n, H, H // Hk, D, DV, s.block_stride, s.blocks_per_piece, s.keys_per_piece, launch.bucket,
            tiles_per_block, consts, *strides, **flags, **dkdv_meta)
        if launch.level is not None:
            slot_grads.append(dlogw_s)
    if value_weights:
        dv += ref.value_weight_grad(v, plan, slot_grads).to(acc_dtype)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)
