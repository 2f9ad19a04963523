"""Triton kernels for Kronecker attention operators (Gao, Wang, Ji, arXiv 2007.08442): KAO_KV and KAO_QKV on
2-D [B, C, H, W] and 3-D [B, C, T, H, W] maps. Notation as in torchext/reference/kronecker_attention.py.

The kernels, each a single pass over the big tensors it touches:
    _kronecker_attention_pool_kernel     tokens C = X M: the row, column (and time) means of every channel, x read
                                         once.
    _kronecker_attention_fwd_kernel      out = C softmax(scale C^T Q) for a tile of queries: Q = x (KV, hw queries)
                                         or Q = C (QKV, the L tokens themselves). The L keys of one head fit one tile.
    _kronecker_attention_fold_kernel     the outer sum out[t, i, j] = w_t tok[t] + w_h tok[T + i] + w_w tok[T + H + j]:
                                         QKV's output, and the backward's spread of token gradients over positions.
    _kronecker_attention_bwd_*_kernel    the attention backward: the token-gradient reduction over queries, and the
                                         query gradient (plus the spread token gradient, so dx is written once).

HBM traffic per element of x (E bytes each; the tokens are L/N of that and ignored):
    forward  KV: 3E (x read by the pooling and again as queries, out written)   QKV: 2E (x read, out written)
    backward KV: 5E (x and dO read by the reduction and again by the dx pass, dx written)
             QKV: 2E (dO read by the pooling, dx written; x is not needed, only the saved tokens)
KV must read x twice: a query's output needs the means of the whole map. Every query tile also re-reads its
head's L x d tokens (from L2, not HBM): that on-chip traffic grows with L / BLOCK_P and is what to tune first
for KV on large maps (untuned: no GPU was available when these were written).

Conventions: fp32 accumulation (fp64 for fp64 inputs), bf16/fp16 dot operands on GPU (tensor cores),
int64 base offsets, every load and store masked. The spatial block of x (T, H, W) must be contiguous; batch
and channel strides are free (a channel slice of a fused projection is read in place).
"""

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._launch import GPU_TILES, accumulator_dtype, compute_dtype, dot, dot_dtype, reduction_grid, row_tile

# One tile holds the scores of every key for a block of queries: [BLOCK_L, BLOCK_P] with BLOCK_P >= 16. The dot
# operands are the map's dtype (16-bit maps: tensor cores, the tokens rounded to 16 bits as SDPA would see them).
# Tiles [BLOCK_D, BLOCK_P] per kernel, operand width and BLOCK_L, 8 warps: the largest that compile for sm_80 and
# sm_90 without spilling and within an A100's 163 KB of shared memory (searched with bench/offline.py; its table
# is bench/results/offline/). Past 256 tokens (16-bit) or 128 (32-bit) even the smallest backward tiles spill a
# little (bench/offline.py's ALLOWED_SPILLS says why that is kept); past 512 the forward spills too, so 512 is the
# limit. 64-bit operands (gradcheck) take the 32-bit tiles and a 256-token limit. The op refuses longer maps on
# every path (torchext/ops/_kronecker_attention.py's MAX_TOKENS). Not yet timed on a GPU.
_TILES = {
    2: {"fwd": {64: (32, 64), 128: (32, 64), 256: (16, 64), 512: (16, 32)},
        "bwd_tokens": {64: (32, 64), 128: (32, 32), 256: (16, 32), 512: (16, 16)},
        "bwd_queries": {64: (32, 64), 128: (32, 32), 256: (16, 32), 512: (16, 16)}},
    4: {"fwd": {64: (16, 32), 128: (16, 32), 256: (16, 16), 512: (16, 16)},
        "bwd_tokens": {64: (16, 32), 128: (16, 32), 256: (16, 16), 512: (16, 16)},
        "bwd_queries": {64: (16, 32), 128: (16, 16), 256: (16, 16), 512: (16, 16)}},
}
_INTERPRETER_TILE = (64, 128)  # no registers or shared memory to run out of: large tiles, few programs


# ---- pooling and fold: x [B, C, T, H, W] <-> tokens [B, C, L] ---------------------------------------------------
# Tokens are [time (3-D only), rows, columns]: row token i at offset t0 + i, column token j at t0 + H + j.


@triton.jit
def _kronecker_attention_pool_kernel(x_ptr, tok_ptr, C, T, H, W, L, stride_b, stride_c, w_t, w_h, w_w,
                           HAS_T: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr,
                           COMPUTE: tl.constexpr):
    # One program per (b, c) streams its T*H*W slab once in [BLOCK_H, W] row tiles: a tile's row sums are final
    # after the t loop, column and frame sums stay in registers (a frame's sum lands in its slot by a mask).
    pid = tl.program_id(0).to(tl.int64)
    x = x_ptr + (pid // C) * stride_b + (pid % C) * stride_c
    tok = tok_ptr + pid * L
    t0 = T if HAS_T else 0
    rows, cols, frames = tl.arange(0, BLOCK_H), tl.arange(0, BLOCK_W), tl.arange(0, BLOCK_T)
    col_sum = tl.zeros([BLOCK_W], dtype=COMPUTE)
    frame_sum = tl.zeros([BLOCK_T], dtype=COMPUTE)
    for h0 in range(0, H, BLOCK_H):
        r = h0 + rows
        mask = (r < H)[:, None] & (cols < W)[None, :]  # [BLOCK_H, BLOCK_W]
        row_sum = tl.zeros([BLOCK_H], dtype=COMPUTE)
        for t in range(T):
            tile = tl.load(x + t * H * W + r[:, None] * W + cols[None, :], mask=mask, other=0.0).to(COMPUTE)
            row_sum += tl.sum(tile, axis=1)
            col_sum += tl.sum(tile, axis=0)
            if HAS_T:
                frame_sum += tl.where(frames == t, tl.sum(tile), 0.0)
        tl.store(tok + t0 + r, row_sum * w_h, mask=r < H)
    tl.store(tok + t0 + H + cols, col_sum * w_w, mask=cols < W)
    if HAS_T:
        tl.store(tok + frames, frame_sum * w_t, mask=frames < T)


@triton.jit
def _kronecker_attention_fold_kernel(tok_ptr, out_ptr, T, H, W, L, w_t, w_h, w_w,
                           HAS_T: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr, COMPUTE: tl.constexpr):
    # Program (b * C + c, row block): writes out[b, c, :, rows, :] as the outer sum of its tokens. Nothing is
    # read but the L tokens, so the write streams at full bandwidth.
    pid = tl.program_id(0).to(tl.int64)
    tok = tok_ptr + pid * L
    t0 = T if HAS_T else 0
    r = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    cols = tl.arange(0, BLOCK_W)
    row_tok = tl.load(tok + t0 + r, mask=r < H, other=0.0).to(COMPUTE) * w_h  # [BLOCK_H]
    col_tok = tl.load(tok + t0 + H + cols, mask=cols < W, other=0.0).to(COMPUTE) * w_w  # [BLOCK_W]
    plane = row_tok[:, None] + col_tok[None, :]  # [BLOCK_H, BLOCK_W]
    mask = (r < H)[:, None] & (cols < W)[None, :]
    out = out_ptr + pid * T * H * W + r[:, None] * W + cols[None, :]
    for t in range(T):
        value = plane
        if HAS_T:
            value = plane + tl.load(tok + t).to(COMPUTE) * w_t
        tl.store(out + t * H * W, value.to(out_ptr.dtype.element_ty), mask=mask)


# ---- attention over the L tokens -----------------------------------------------------------------------------------
# A program owns one (batch, head) and BLOCK_P queries: columns p of q [B, C, N] (x for KV, the tokens for QKV).
# The head's tokens are the keys and values, read in BLOCK_D channel chunks from kv [B, C, L].


@triton.jit
def _tile_pointers(q_ptr, kv_ptr, C, N, L, D, q_stride_b, q_stride_c, p0, BLOCK_L: tl.constexpr,
                   BLOCK_P: tl.constexpr):
    """(q of the head, kv of the head, the head's first row b * C + c0 of [B, C, n] tensors, query columns, their
    mask, keys, their mask) of program (b * heads + head, ...) for the queries p0 .. p0 + BLOCK_P."""
    bh = tl.program_id(0).to(tl.int64)
    heads = C // D
    b, c0 = bh // heads, (bh % heads) * D  # batch, first channel of the head
    p = p0 + tl.arange(0, BLOCK_P)
    keys = tl.arange(0, BLOCK_L)
    row0 = b * C + c0
    return q_ptr + b * q_stride_b + c0 * q_stride_c, kv_ptr + row0 * L, row0, p, p < N, keys, keys < L


@triton.jit
def _load_rows(base, row_stride, d0, D, cols, col_mask, BLOCK_D: tl.constexpr):
    """[BLOCK_D, n] tile: channels d0 .. d0 + BLOCK_D of a head, columns cols (positions or tokens)."""
    d = d0 + tl.arange(0, BLOCK_D)
    return tl.load(base + d[:, None] * row_stride + cols[None, :], mask=(d < D)[:, None] & col_mask[None, :],
                   other=0.0)


@triton.jit
def _softmax_over_keys(scores, key_mask):
    """Column-wise softmax of [BLOCK_L, BLOCK_P] scores over the valid keys (every column has L >= 2 of them)."""
    scores = tl.where(key_mask[:, None], scores, float("-inf"))
    e = tl.exp(scores - tl.max(scores, axis=0)[None, :])
    return e / tl.sum(e, axis=0)[None, :]


@triton.jit
def _kronecker_attention_fwd_kernel(q_ptr, kv_ptr, out_ptr, C, N, L, D, q_stride_b, q_stride_c, scale,
                               BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_P: tl.constexpr,
                               DOT: tl.constexpr, COMPUTE: tl.constexpr):
    q, kv, row0, p, p_mask, keys, key_mask = _tile_pointers(
        q_ptr, kv_ptr, C, N, L, D, q_stride_b, q_stride_c, tl.program_id(1).to(tl.int64) * BLOCK_P, BLOCK_L, BLOCK_P)
    scores = tl.zeros([BLOCK_L, BLOCK_P], dtype=COMPUTE)
    for d0 in range(0, D, BLOCK_D):  # S = C^T Q, summed over channel chunks
        keys_t = tl.trans(_load_rows(kv, L, d0, D, keys, key_mask, BLOCK_D))  # [BLOCK_L, BLOCK_D]
        scores = dot(keys_t, _load_rows(q, q_stride_c, d0, D, p, p_mask, BLOCK_D), scores, DOT)
    probs = _softmax_over_keys(scores * scale, key_mask)  # [BLOCK_L, BLOCK_P]
    for d0 in range(0, D, BLOCK_D):  # O = C P
        values = _load_rows(kv, L, d0, D, keys, key_mask, BLOCK_D)  # [BLOCK_D, BLOCK_L]
        o = dot(values, probs, tl.zeros([BLOCK_D, BLOCK_P], dtype=COMPUTE), DOT)
        d = d0 + tl.arange(0, BLOCK_D)
        tl.store(out_ptr + row0 * N + d[:, None] * N + p[None, :], o.to(out_ptr.dtype.element_ty),
                 mask=(d < D)[:, None] & p_mask[None, :])


@triton.jit
def _scores_backward(q, kv, dout, q_stride_c, N, L, D, p, p_mask, keys, key_mask, scale,
                     BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_P: tl.constexpr,
                     DOT: tl.constexpr, COMPUTE: tl.constexpr):
    """(P, scale * dS) of a query tile, recomputed from q, the tokens and dO: S = C^T Q, dP = C^T dO,
    dS = P * (dP - sum_l P dP) (softmax backward; the sum is <O_p, dO_p>). Both [BLOCK_L, BLOCK_P]."""
    scores = tl.zeros([BLOCK_L, BLOCK_P], dtype=COMPUTE)
    grad_probs = tl.zeros([BLOCK_L, BLOCK_P], dtype=COMPUTE)
    for d0 in range(0, D, BLOCK_D):
        keys_t = tl.trans(_load_rows(kv, L, d0, D, keys, key_mask, BLOCK_D))  # [BLOCK_L, BLOCK_D]
        scores = dot(keys_t, _load_rows(q, q_stride_c, d0, D, p, p_mask, BLOCK_D), scores, DOT)
        grad_probs = dot(keys_t, _load_rows(dout, N, d0, D, p, p_mask, BLOCK_D), grad_probs, DOT)
    probs = _softmax_over_keys(scores * scale, key_mask)
    grad_scores = probs * (grad_probs - tl.sum(probs * grad_probs, axis=0)[None, :])
    return probs, grad_scores * scale


@triton.jit
def _kronecker_attention_bwd_tokens_kernel(q_ptr, kv_ptr, dout_ptr, partial_ptr, C, N, L, D, q_stride_b, q_stride_c,
                                      tiles_per_program, scale,
                                      BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_P: tl.constexpr,
                                      DOT: tl.constexpr, COMPUTE: tl.constexpr):
    # Program (b * heads + head, channel chunk, slice): the gradient of the head's tokens in their key and value
    # roles, dO P^T + scale Q dS^T [BLOCK_D, L], summed over the queries of tiles_per_program consecutive tiles;
    # one partial per slice (torch sums them: no atomics, deterministic).
    chunk, part = tl.program_id(1), tl.program_id(2).to(tl.int64)
    d0 = chunk * BLOCK_D
    acc = tl.zeros([BLOCK_D, BLOCK_L], dtype=COMPUTE)
    for i in range(tiles_per_program):
        q, kv, row0, p, p_mask, keys, key_mask = _tile_pointers(
            q_ptr, kv_ptr, C, N, L, D, q_stride_b, q_stride_c, (part * tiles_per_program + i) * BLOCK_P, BLOCK_L,
            BLOCK_P)
        dout = dout_ptr + row0 * N
        probs, grad_scores = _scores_backward(q, kv, dout, q_stride_c, N, L, D, p, p_mask, keys, key_mask, scale,
                                              BLOCK_L, BLOCK_D, BLOCK_P, DOT, COMPUTE)
        acc = dot(_load_rows(dout, N, d0, D, p, p_mask, BLOCK_D), tl.trans(probs), acc, DOT)
        acc = dot(_load_rows(q, q_stride_c, d0, D, p, p_mask, BLOCK_D), tl.trans(grad_scores), acc, DOT)
    d = d0 + tl.arange(0, BLOCK_D)
    keys = tl.arange(0, BLOCK_L)
    partial = partial_ptr + ((tl.program_id(0).to(tl.int64) * tl.num_programs(2) + part) * D) * L
    tl.store(partial + d[:, None] * L + keys[None, :], acc, mask=(d < D)[:, None] & (keys < L)[None, :])


@triton.jit
def _kronecker_attention_bwd_queries_kernel(q_ptr, kv_ptr, dout_ptr, spread_ptr, dq_ptr, C, N, L, D, T, H, W,
                                       q_stride_b, q_stride_c, scale, w_t, w_h, w_w,
                                       IMAGE: tl.constexpr, HAS_T: tl.constexpr, BLOCK_L: tl.constexpr,
                                       BLOCK_D: tl.constexpr, BLOCK_P: tl.constexpr, DOT: tl.constexpr,
                                       COMPUTE: tl.constexpr):
    # dQ = scale C dS, plus the token gradient G = spread [B, C, L] gathered at each query's tokens. KV (IMAGE):
    # position (t, i, j) adds w_t G[t] + w_h G[T + i] + w_w G[T + H + j] (G M^T: a token's gradient shared by the
    # positions it averages). QKV (the tokens are the queries): token p adds G[p].
    q, kv, row0, p, p_mask, keys, key_mask = _tile_pointers(
        q_ptr, kv_ptr, C, N, L, D, q_stride_b, q_stride_c, tl.program_id(1).to(tl.int64) * BLOCK_P, BLOCK_L, BLOCK_P)
    _, grad_scores = _scores_backward(q, kv, dout_ptr + row0 * N, q_stride_c, N, L, D, p, p_mask, keys, key_mask,
                                      scale, BLOCK_L, BLOCK_D, BLOCK_P, DOT, COMPUTE)
    spread = spread_ptr + row0 * L  # the head's rows, laid out like kv
    if IMAGE:
        t0 = T if HAS_T else 0
        row_tok, col_tok = t0 + (p // W) % H, t0 + H + p % W  # [BLOCK_P]
    for d0 in range(0, D, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        mask = (d < D)[:, None] & p_mask[None, :]  # [BLOCK_D, BLOCK_P]
        values = _load_rows(kv, L, d0, D, keys, key_mask, BLOCK_D)  # [BLOCK_D, BLOCK_L]
        dq = dot(values, grad_scores, tl.zeros([BLOCK_D, BLOCK_P], dtype=COMPUTE), DOT)
        rows = spread + d[:, None] * L
        if IMAGE:
            dq += (w_h * tl.load(rows + row_tok[None, :], mask=mask, other=0.0)
                   + w_w * tl.load(rows + col_tok[None, :], mask=mask, other=0.0))
            if HAS_T:
                dq += w_t * tl.load(rows + (p // (H * W))[None, :], mask=mask, other=0.0)
        else:
            dq += tl.load(rows + p[None, :], mask=mask, other=0.0)
        tl.store(dq_ptr + row0 * N + d[:, None] * N + p[None, :], dq.to(dq_ptr.dtype.element_ty), mask=mask)


# ---- launchers -----------------------------------------------------------------------------------------------------


def _spatial(shape: torch.Size) -> tuple[int, int, int, bool]:
    """(T, H, W, has_t) of a [B, C, H, W] or [B, C, T, H, W] shape."""
    if len(shape) == 5:
        return *shape[2:], True
    return 1, *shape[2:], False


def pool(x: Tensor, means: bool = True) -> Tensor:
    """x [B, C, (T,) H, W] (contiguous spatial block) -> tokens [B, C, L]: means (or sums, means=False) over the
    positions behind each token, in the accumulator dtype (fp32, fp64 for fp64)."""
    B, C = x.shape[:2]
    T, H, W, has_t = _spatial(x.shape)
    L = (T if has_t else 0) + H + W
    tokens = torch.empty((B, C, L), dtype=accumulator_dtype(x.dtype), device=x.device)
    block_h, block_w, num_warps = row_tile(H, W)  # [BLOCK_H, W] row tiles of one frame
    weights = _token_weights(T, H, W) if means else (1.0, 1.0, 1.0)
    _kronecker_attention_pool_kernel[(B * C,)](
        x, tokens, C, T, H, W, L, x.stride(0), x.stride(1), *weights, HAS_T=has_t,
        BLOCK_T=triton.next_power_of_2(T) if has_t else 1, BLOCK_H=block_h, BLOCK_W=block_w,
        COMPUTE=compute_dtype(x.dtype), num_warps=num_warps)
    return tokens


def fold(tokens: Tensor, shape: torch.Size, dtype: torch.dtype, weights: tuple[float, float, float]) -> Tensor:
    """tokens [B, C, L] -> out [B, C, (T,) H, W] in dtype, out[t, i, j] = w_t tok_t + w_h tok_i + w_w tok_j."""
    out = torch.empty(shape, dtype=dtype, device=tokens.device)
    T, H, W, has_t = _spatial(shape)
    block_h, block_w, num_warps = row_tile(H, W)
    _kronecker_attention_fold_kernel[(shape[0] * shape[1], triton.cdiv(H, block_h))](
        tokens, out, T, H, W, tokens.shape[2], *weights, HAS_T=has_t, BLOCK_H=block_h, BLOCK_W=block_w,
        COMPUTE=compute_dtype(tokens.dtype), num_warps=num_warps)
    return out


def _operand_bytes(dtype: torch.dtype) -> int:
    """Bytes of one dot operand on a GPU for a map of this dtype; the interpreter's tiles take the 16-bit ones."""
    return dtype.itemsize if GPU_TILES else 2


def _attention_tiles(kernel: str, L: int, D: int, N: int, dtype: torch.dtype) -> tuple[int, int, int, int]:
    """(BLOCK_L, BLOCK_D, BLOCK_P, num_warps) of an attention kernel for a map of `dtype`: all keys in one tile,
    channel chunks and queries from _TILES; every dot dimension >= 16."""
    block_l = max(64, triton.next_power_of_2(L))
    if GPU_TILES:
        block_d, block_p = _TILES[min(dtype.itemsize, 4)][kernel][block_l]
    else:
        block_d, block_p = _INTERPRETER_TILE
    return (block_l, max(16, min(block_d, triton.next_power_of_2(D))), max(16, min(block_p, triton.next_power_of_2(N))),
            8)


def attention_fwd(q: Tensor, kv: Tensor, heads: int, scale: float, out_dtype: torch.dtype,
                  dtype: torch.dtype) -> Tensor:
    """out[b, :, p] = C softmax(scale C^T q[b, :, p]) per head.

    q: [B, C, N] with unit stride along N (x flattened, or the tokens); kv: [B, C, L] contiguous tokens; dtype: the
    map's (it sets the dot operands). Returns [B, C, N] contiguous in out_dtype.
    """
    B, C, N = q.shape
    L, D = kv.shape[2], C // heads
    out = torch.empty((B, C, N), dtype=out_dtype, device=q.device)
    block_l, block_d, block_p, num_warps = _attention_tiles("fwd", L, D, N, dtype)
    _kronecker_attention_fwd_kernel[(B * heads, triton.cdiv(N, block_p))](
        q, kv, out, C, N, L, D, q.stride(0), q.stride(1), scale, BLOCK_L=block_l, BLOCK_D=block_d, BLOCK_P=block_p,
        DOT=dot_dtype(dtype), COMPUTE=compute_dtype(kv.dtype), num_warps=num_warps)
    return out


def attention_bwd_tokens(q: Tensor, kv: Tensor, dout: Tensor, heads: int, scale: float, dtype: torch.dtype) -> Tensor:
    """The tokens' gradient in their key and value roles, dO P^T + scale Q dS^T summed over all queries.

    q: [B, C, N] (unit stride along N); kv: [B, C, L] contiguous; dout: [B, C, N] contiguous; dtype: the map's.
    Returns [B, C, L] in kv's dtype.
    """
    B, C, N = q.shape
    L, D = kv.shape[2], C // heads
    block_l, block_d, block_p, num_warps = _attention_tiles("bwd_tokens", L, D, N, dtype)
    chunks, n_tiles = triton.cdiv(D, block_d), triton.cdiv(N, block_p)
    # Each (batch, head, chunk) splits its query tiles into n_parts slices: about 4 programs per SM in all.
    n_programs, _ = reduction_grid(B * heads * chunks * n_tiles, 1, q.device)
    n_parts = max(1, min(n_tiles, n_programs // (B * heads * chunks)))
    tiles_per_part = triton.cdiv(n_tiles, n_parts)
    partial = torch.empty((B * heads, n_parts, D, L), dtype=kv.dtype, device=q.device)
    _kronecker_attention_bwd_tokens_kernel[(B * heads, chunks, n_parts)](
        q, kv, dout, partial, C, N, L, D, q.stride(0), q.stride(1), tiles_per_part, scale, BLOCK_L=block_l,
        BLOCK_D=block_d, BLOCK_P=block_p, DOT=dot_dtype(dtype), COMPUTE=compute_dtype(kv.dtype),
        num_warps=num_warps)
    return partial.sum(1).view(B, C, L)


def attention_bwd_queries(q: Tensor, kv: Tensor, dout: Tensor, spread: Tensor, heads: int, scale: float,
                          image: torch.Size | None, out_dtype: torch.dtype, dtype: torch.dtype) -> Tensor:
    """dQ = scale C dS plus the token gradient ``spread`` [B, C, L] gathered at each query's tokens.

    image: the map's shape [B, C, (T,) H, W] when the queries are its positions (KV; the gradient of a token is
    shared equally by the positions it averages); None when the queries are the tokens themselves (QKV).
    q, kv, dout, dtype as in attention_bwd_tokens. Returns [B, C, N] contiguous in out_dtype.
    """
    B, C, N = q.shape
    L, D = kv.shape[2], C // heads
    T, H, W, has_t = _spatial(image) if image is not None else (1, 1, 1, False)
    dq = torch.empty((B, C, N), dtype=out_dtype, device=q.device)
    block_l, block_d, block_p, num_warps = _attention_tiles("bwd_queries", L, D, N, dtype)
    _kronecker_attention_bwd_queries_kernel[(B * heads, triton.cdiv(N, block_p))](
        q, kv, dout, spread, dq, C, N, L, D, T, H, W, q.stride(0), q.stride(1), scale, *_token_weights(T, H, W),
        IMAGE=image is not None,
        HAS_T=has_t, BLOCK_L=block_l, BLOCK_D=block_d, BLOCK_P=block_p, DOT=dot_dtype(dtype),
        COMPUTE=compute_dtype(kv.dtype), num_warps=num_warps)
    return dq


def _token_weights(T: int, H: int, W: int) -> tuple[float, float, float]:
    """1 / (positions behind a token) for time, row and column tokens (T = 1 in 2-D): means, and spreading a
    token's gradient over its positions."""
    return 1.0 / (H * W), 1.0 / (T * W), 1.0 / (T * H)


def kronecker_attention_fwd(x: Tensor, mode: str, heads: int, scale: float) -> tuple[Tensor, Tensor]:
    """x [B, C, (T,) H, W] (contiguous spatial block) -> (out of x's shape, contiguous, x.dtype; tokens [B, C, L]
    fp32 / fp64, saved for the backward)."""
    B, C = x.shape[:2]
    tokens = pool(x)
    if mode == "kv":
        return attention_fwd(x.view(B, C, -1), tokens, heads, scale, x.dtype, x.dtype).view(x.shape), tokens
    attended = attention_fwd(tokens, tokens, heads, scale, tokens.dtype, x.dtype)  # O' [B, C, L]
    return fold(attended, x.shape, x.dtype, (1.0, 1.0, 1.0)), tokens


def kronecker_attention_bwd(grad_out: Tensor, x: Tensor | None, tokens: Tensor, mode: str, heads: int,
                            scale: float) -> Tensor:
    """grad_out [B, C, (T,) H, W] contiguous; x the input (KV only, else None); tokens [B, C, L] from the forward.
    Returns dx [B, C, (T,) H, W] contiguous in grad_out's dtype."""
    B, C = grad_out.shape[:2]
    if mode == "kv":
        q, dout = x.view(B, C, -1), grad_out.view(B, C, -1)
        d_tokens = attention_bwd_tokens(q, tokens, dout, heads, scale, grad_out.dtype)
        dx = attention_bwd_queries(q, tokens, dout, d_tokens, heads, scale, grad_out.shape, grad_out.dtype,
                                   grad_out.dtype)
        return dx.view(grad_out.shape)
    dout = pool(grad_out, means=False)  # dO' = dO F: sums of dO over each token's positions
    spread = attention_bwd_tokens(tokens, tokens, dout, heads, scale, grad_out.dtype)  # the key and value roles
    d_tokens = attention_bwd_queries(tokens, tokens, dout, spread, heads, scale, None, tokens.dtype,
                                     grad_out.dtype)  # plus the query role
    T, H, W, _ = _spatial(grad_out.shape)
    return fold(d_tokens, grad_out.shape, grad_out.dtype, _token_weights(T, H, W))
