"""Pure-PyTorch reference for KDE attention: KDEformer (Zandieh et al., ICML 2023, arXiv 2302.02451) in the fused
form HyperAttention (Han et al., ICLR 2024, arXiv 2310.05869) gave it, written from the equations.

Two parts, both used by the op and by its Triton kernels:

1. ``make_plan``: the random, non-differentiable step. SimHash LSH of queries and keys with seeded hyperplanes,
   buckets ordered by the inverse Gray code, keys sorted by bucket and cut into blocks of ``bucket_size``, every
   query assigned to the key block its own hash falls into, the queries of each block cut into query tiles of
   ``min(bucket_size, QUERY_TILE)`` (the tiles the forward kernel runs), and ``num_samples`` keys drawn for each
   query tile with their importance weights. The kernels take the plan as it is, so the reference below with the
   same plan is their ground truth (forward, gradients, fp64 gradcheck).
2. ``kde_attention``: the estimator given a plan, as one dense softmax. For query i with LSH block B(i) and keys
   j_1..j_m drawn from the keys outside B(i) with probabilities p_j / Q (Q = the sum of p outside B(i)),
   stratified in hash order (s_ij = scale q_i.k_j):

       num_i = sum_{j in B(i)} e^{s_ij} v_j + (Q/m) sum_l e^{s_{i j_l}} v_{j_l} / p_{j_l}
       den_i = the same with v_j replaced by 1,      out_i = num_i / den_i,      lse_i = log den_i.

   E[second term] = sum_{j not in B(i)} e^{s_ij} v_j, so num_i and den_i are unbiased for the exact sums (the
   query's own block is exact, so its keys are left out of the draws, not drawn and masked: at n = 1K and bucket
   256 that was a quarter of the slots). Written as weights, num_i = sum_j W_ij e^{s_ij} v_j with W_ij = 1 in the
   block and c_j Q / (m p_j) outside it (c_j: how often j was drawn), so out = softmax(S + log W) V: the importance
   weight is an additive logit bias log(Q / (m p_j)) and the kernels fold it into one online softmax.

   Stratified draws: with the keys outside B(i) in hash order and F their CDF under p / Q, slot l takes the key
   whose interval [F_{j-1}, F_j) holds (l + u_l) / m, u_l uniform in (0, 1). Slot l draws key j with probability
   m |[F_{j-1}, F_j) & [l/m, (l+1)/m)|, which sums to m p_j / Q over the slots, so the second term keeps its
   expectation; a key with p_j / Q < 1/m is drawn at most once, and the slots spread over the piece's hash order
   (directions) instead of repeating keys. Against iid draws from the whole piece, at the defaults (bucket 256,
   256 samples), output cosine to exact rose from 0.530 to 0.648 (Gaussian d 64, n 1K) and from 0.918 to 0.952
   (MiniLM, n 1K), measured on the data of examples/kde_quality.py.

   Each query tile draws its own m keys. With one draw per head (KDEformer, HyperAttention) every query shares one
   sampling noise: on near-uniform attention the output error is then close to rank one and its spectral norm is
   about its Frobenius norm. Independent draws per tile make the errors of different tiles independent, and the
   spectral norm of the error drops towards that of independent rows (each row stays unbiased). The draws of a
   tile are a counter-based hash of (seed, batch, head, level, block, tile index inside the block, slot), not of
   the tile's position in the sorted order: a query's tile index inside its block depends only on the earlier
   queries of the block, so in causal mode no later token changes the samples a query sees.

Causal mode follows HyperAttention's recursive split, flattened into levels: exact causal attention inside aligned
windows of ``exact_window`` tokens, and at level l (chunks of L = exact_window 2^l tokens) the queries of every odd
chunk 2p+1 attend the keys of chunk 2p through the estimator above (its own hashing blocks and samples). Every
(query, earlier key) pair lies in exactly one window or one level. A query's block depends only on its own hash
and on earlier keys, so no output depends on a later token (HyperAttention sorts the queries of a chunk together,
which lets a later query's hash move an earlier query to another block).

Sampling probabilities ("value_norm"): p_j = (1 - VALUE_NORM_MIX) ||v_j|| / sum_k ||v_k|| + VALUE_NORM_MIX / L
over the L keys of a piece: KDEformer's value-row-norm sampling mixed with uniform by a fixed share, so the mix is
the same whatever the scale of V (KDEformer divides by a power-iteration estimate of ||V||^2, which is not), and
Q / (m p_j) <= L / (m VALUE_NORM_MIX) bounds every weight. The weights are a function of v and are differentiated
(``sample_log_weights``): the gradient is the exact gradient of the estimator the forward computed, and only the
choice of keys, a step function of v, is held fixed. "uniform": p_j = 1 / L (HyperAttention).
"""

import dataclasses
import math
from dataclasses import dataclass

import torch
from torch import Tensor

from torchext._dtypes import upcast
from torchext.reference._attention import nonfinite_heads_as_nan

SAMPLING = ("value_norm", "uniform")
VALUE_NORM_MIX = 0.5  # the uniform share of the value-norm sampling distribution (scale-free)
MAX_HASH_BITS = 16
# Hash bits by default: log2(keys per block count) + HASH_BITS_PER_BLOCK, within [MIN_HASH_BITS, MAX_HASH_BITS]. A
# SimHash bucket holding more keys than a block is split across blocks, and the query joins only the first: with 8
# bits at bucket 256, planted-heavy recall (each query 3x one random key plus noise, d 64) fell from 97% at 1K to
# 77% at 16K and 24% at 128K; this rule (8, 12 and 15 bits there) keeps it at 97%, 92% and 89% (measured with
# make_plan alone; tests/test_kde_attention.py holds the 16K case).
MIN_HASH_BITS, HASH_BITS_PER_BLOCK = 8, 6
QUERY_TILE = 128  # queries per sample set (and per forward program): min(bucket_size, QUERY_TILE)
_MASK32 = 0xFFFFFFFF


@dataclass(frozen=True)
class Level:
    """One set of pieces that share a chunk length: piece p pairs query chunk q_chunk(p) with key chunk k_chunk(p).

    Non-causal: one piece, chunk = the whole sequence (``pair`` = 0). Causal level: queries of chunk 2p+1 with keys
    of chunk 2p (``pair`` = 1), for every p with chunk 2p+1 non-empty. Blocks are numbered within their piece.

    Attributes:
        chunk: L, tokens per chunk (the non-causal piece has N).
        pair: 0 (non-causal) or 1 (causal: query chunk 2p+1, key chunk 2p).
        n_pieces: P.
        perm_k: [B, Hk, N] int64, original key index at each sorted position; the keys of piece p occupy sorted
            positions [p L, p L + L) in hash order (keys in no piece come last).
        k_block: [B, Hk, N] int64, block of each key (original order) within its piece, -1 outside every piece.
        q_block: [B, H, N] int64, the block of each query (original order), -1 for queries in no piece.
        perm_q: [B, H, N] int64, queries sorted by (piece, block), stably (queries in no piece last).
        tiles: the query tiles of perm_q (QueryTiles, T tiles per head); q_tile: [B, H, N] int64, each query's
            tile, -1 for queries in no piece.
        sample_idx: [B, H, T, m] int64, original indices of the keys sampled for each query tile (from its piece).
        sample_block: [B, H, T, m] int64, their blocks (the tile's queries count those of other blocks only).
        sample_logw: [B, H, T, m] float64, log(Q / (m p_j)) (``sample_log_weights`` as a function of v).
    """

    chunk: int
    pair: int
    n_pieces: int
    perm_k: Tensor
    k_block: Tensor
    q_block: Tensor
    perm_q: Tensor
    tiles: "QueryTiles"
    q_tile: Tensor
    sample_idx: Tensor
    sample_block: Tensor
    sample_logw: Tensor


@dataclass(frozen=True)
class QueryTiles:
    """Query tiles of a query order whose blocks are contiguous: each block's queries cut into tiles of ``size``.

    Block c of a row holds positions [block_start, block_start + block_count) of the order, and its tiles are
    block_first_tile, block_first_tile + 1, ... ([rows, n_blocks] int64). Tile tau covers positions
    [start, start + count), all in block ``block``, and is tile ``index`` of that block ([rows, T] int64). Sized
    without a host sync: T = ceil(N / size) + n_blocks tiles per row, unused ones with count 0.
    """

    size: int
    block_start: Tensor
    block_count: Tensor
    block_first_tile: Tensor
    start: Tensor
    count: Tensor
    block: Tensor
    index: Tensor


def query_tiles(counts: Tensor, size: int, n: int) -> QueryTiles:
    """QueryTiles of an order holding counts[r, c] queries of block c, blocks in order: [rows, n_blocks] -> T tiles."""
    rows, n_blocks = counts.shape
    first = torch.cumsum(counts, -1) - counts  # [rows, n_blocks] first position of each block
    tiles = (counts + size - 1) // size
    tiles_end = torch.cumsum(tiles, -1)
    first_tile = tiles_end - tiles
    n_tiles = -(-n // size) + n_blocks
    tau = torch.arange(n_tiles, device=counts.device).expand(rows, n_tiles)
    block = torch.searchsorted(tiles_end, tau.contiguous(), right=True).clamp_max(n_blocks - 1)  # [rows, T]
    index = tau - first_tile.gather(-1, block)
    count = (counts.gather(-1, block) - index * size).clamp(0, size)
    count = torch.where(tau < tiles_end[:, -1:], count, 0)
    return QueryTiles(size, first, counts, first_tile, first.gather(-1, block) + index * size, count, block, index)


@dataclass(frozen=True)
class KDEPlan:
    """Hashes, blocks and samples of one call. ``window`` is the exact causal window (None: non-causal); ``tile``
    the queries per query tile; ``sampling`` the sampling distribution (its weights depend on v under
    "value_norm")."""

    bucket: int
    num_samples: int
    tile: int
    window: int | None
    sampling: str
    levels: tuple[Level, ...]


def default_hash_bits(n: int, bucket_size: int) -> int:
    """SimHash bits for n keys in blocks of bucket_size: grows with the number of blocks (see HASH_BITS_PER_BLOCK)."""
    blocks = max(1, -(-n // bucket_size))
    return min(MAX_HASH_BITS, max(MIN_HASH_BITS, (blocks - 1).bit_length() + HASH_BITS_PER_BLOCK))


def inverse_gray(code: Tensor, bits: int) -> Tensor:
    """The position of each r-bit bucket code in the reflected Gray sequence (prefix XOR of its bits, MSB first).

    Sorting by it puts buckets whose codes differ in one bit next to each other: position t holds bucket
    gray(t) = t ^ (t >> 1), and gray(t), gray(t + 1) differ in exactly one bit. (Sorting by gray(code), as the
    public KDEformer/HyperAttention code does, gets this backwards.)
    """
    rank, shift = code.clone(), 1
    while shift < bits:
        rank ^= rank >> shift
        shift *= 2
    return rank


def simhash(x: Tensor, planes: Tensor) -> Tensor:
    """SimHash bucket of each row: the signs of x R packed into an integer, as its inverse-Gray rank.

    x: [..., D]; planes: [D, r] Gaussian hyperplane normals. Returns [...] int64 in [0, 2^r).
    """
    bits = planes.shape[1]
    if bits == 0:
        return torch.zeros(x.shape[:-1], dtype=torch.int64, device=x.device)
    signs = (x @ planes.to(x.dtype)) > 0  # [..., r]
    code = (signs.to(torch.int64) << torch.arange(bits, device=x.device)).sum(-1)
    return inverse_gray(code, bits)


def _chunk_pieces(n: int, chunk: int, pair: int, device) -> tuple[int, Tensor, Tensor]:
    """(P, the piece of each query position or -1, the piece of each key position or -1) for one level."""
    pos = torch.arange(n, device=device)
    if not pair:
        zeros = torch.zeros(n, dtype=torch.int64, device=device)
        return 1, zeros, zeros
    c = pos // chunk
    n_pieces = math.ceil(n / chunk) // 2
    q_piece = torch.where(c % 2 == 1, c // 2, -1)
    k_piece = torch.where((c % 2 == 0) & (c // 2 < n_pieces), c // 2, -1)
    return n_pieces, q_piece, k_piece


def _piece_keys(n: int, chunk: int, pair: int, n_pieces: int, device) -> Tensor:
    """[P, L] original indices of each piece's keys (key chunks are always full)."""
    first_key = torch.arange(n_pieces, device=device) * (1 + pair) * chunk
    return first_key[:, None] + torch.arange(min(chunk, n), device=device)


def _sampling_probs(v_norm: Tensor, sampling: str) -> Tensor:
    """[..., L] row norms of V over a piece's keys -> [..., L] sampling probabilities (see the module docstring)."""
    uniform = torch.full_like(v_norm, 1.0 / v_norm.shape[-1])
    if sampling == "uniform":
        return uniform
    total = v_norm.sum(-1, keepdim=True)
    by_norm = torch.where(total > 0, v_norm / total.clamp_min(torch.finfo(total.dtype).tiny), uniform)
    return (1 - VALUE_NORM_MIX) * by_norm + VALUE_NORM_MIX * uniform


def _mix32(x: Tensor) -> Tensor:
    """A 32-bit integer hash (two xor-shift-multiply rounds) of int64 tensors holding values in [0, 2^32). The
    products are split in 16-bit halves so no int64 intermediate overflows."""
    for shift, mult in ((16, 0x7FEB352D), (15, 0x846CA68B)):
        x = x ^ (x >> shift)
        x = ((((x >> 16) * mult) & 0xFFFF) << 16) + (x & 0xFFFF) * mult & _MASK32
    return x ^ (x >> 16)


# Streams of the counter-based generator: each draw hashes (seed, stream, its own counters...).
_SAMPLES_STREAM, _PLANES_STREAM = 0, 1


def _uniform(seed: Tensor, *counters) -> Tensor:
    """Uniforms in (0, 1), fp64, one per element of the broadcast counters (ints or non-negative int64 tensors below
    2^32): a hash of the seed (an int64 tensor on the counters' device, so no host read) and the counters, so each
    draw depends only on its own counters."""
    h = _mix32(seed & _MASK32)
    h = _mix32(h ^ ((seed >> 32) & _MASK32))
    for counter in counters:
        h = _mix32(h ^ counter)
    return (h.double() + 0.5) / 2.0**32


def _hyperplanes(seed: Tensor, dim: int, bits: int) -> Tensor:
    """[dim, bits] fp32 standard Gaussian hyperplane normals (Box-Muller of two counter-based uniforms)."""
    device = seed.device
    row, col = torch.arange(dim, device=device)[:, None], torch.arange(bits, device=device)
    radius = torch.sqrt(-2 * torch.log(_uniform(seed, _PLANES_STREAM, row, col, 0)))
    return (radius * torch.cos(2 * math.pi * _uniform(seed, _PLANES_STREAM, row, col, 1))).float()


def _level(q_rank: Tensor, k_rank: Tensor, v_norm: Tensor, chunk: int, pair: int, bucket: int, tile: int,
           num_samples: int, hash_bits: int, sampling: str, seed: Tensor, level: int) -> Level:
    B, H, n = q_rank.shape
    Hk = k_rank.shape[1]
    device = q_rank.device
    n_pieces, q_piece, k_piece = _chunk_pieces(n, chunk, pair, device)
    keys_per_piece = min(chunk, n)
    if hash_bits == 0:
        # No hashing: rank by the position inside the chunk, so a query's block is the one at its own offset (the
        # diagonal blocks, one chunk back in causal levels), not block 0 for every query.
        hash_bits = max(1, (keys_per_piece - 1).bit_length())
        q_rank = (torch.arange(n, device=device) % keys_per_piece).expand_as(q_rank)
        k_rank = (torch.arange(n, device=device) % keys_per_piece).expand_as(k_rank)

    # Keys: sort by (piece, hash rank); piece p's keys then sit at sorted positions [p L, p L + L).
    k_key = torch.where(k_piece >= 0, k_piece, n_pieces) * (1 << hash_bits) + k_rank  # [B, Hk, N]
    k_sorted, perm_k = torch.sort(k_key, dim=-1, stable=True)
    sorted_block = (torch.arange(n, device=device) % keys_per_piece) // bucket
    sorted_block = torch.where(k_sorted < n_pieces * (1 << hash_bits), sorted_block, -1)
    k_block = torch.empty_like(perm_k).scatter_(-1, perm_k, sorted_block.expand_as(perm_k))

    # Queries: the key block where the query's own (piece, hash rank) would be inserted into the sorted keys.
    group = H // Hk
    q_key = q_piece.clamp_min(0) * (1 << hash_bits) + q_rank  # [B, H, N]
    insert = torch.searchsorted(k_sorted.repeat_interleave(group, dim=1), q_key)
    in_piece = insert - q_piece.clamp_min(0) * keys_per_piece
    q_block = torch.where(q_piece >= 0, in_piece.clamp(0, keys_per_piece - 1) // bucket, -1)

    # Query tiles: queries sorted by global block (piece, block), stably, each block's run cut into tiles.
    blocks_per_piece = -(-keys_per_piece // bucket)
    n_blocks = n_pieces * blocks_per_piece
    global_block = torch.where(q_block >= 0, q_piece.clamp_min(0) * blocks_per_piece + q_block, n_blocks)
    perm_q = torch.sort(global_block, dim=-1, stable=True)[1]  # [B, H, N]
    counts = torch.zeros(B, H, n_blocks + 1, dtype=torch.int64, device=device)
    counts.scatter_add_(-1, global_block, torch.ones_like(global_block))
    tiles = query_tiles(counts[..., :-1].flatten(0, 1), tile, n)
    rank = torch.empty_like(perm_q).scatter_(-1, perm_q, torch.arange(n, device=device).expand_as(perm_q))
    own = global_block.clamp_max(n_blocks - 1).flatten(0, 1)  # [B H, N] (queries in no piece: masked below)
    in_block = rank.flatten(0, 1) - tiles.block_start.gather(-1, own)  # position of the query within its block
    q_tile = (tiles.block_first_tile.gather(-1, own) + in_block // tile).view(B, H, n)
    q_tile = torch.where(q_block >= 0, q_tile, -1)
    n_tiles = tiles.count.shape[-1]

    # Samples: m stratified draws per query tile from the keys of its piece's key chunk outside its own block, in
    # hash order, by inverse CDF (see the module docstring), from counter-based uniforms of the tile's identity
    # (block, index inside the block), not of its position.
    tile_block, tile_index = (x.view(B, H, n_tiles) for x in (tiles.block, tiles.index))
    probs = _sampling_probs(v_norm[..., _piece_keys(n, chunk, pair, n_pieces, device)], sampling)  # [B, Hk, P, L]
    blocks = Level(chunk, pair, n_pieces, perm_k, k_block, q_block, perm_q, tiles, q_tile, None, None, None)
    slot = torch.arange(num_samples, device=device)
    batch = torch.arange(B, device=device)[:, None, None, None]
    head = torch.arange(H, device=device)[:, None, None]
    u = _uniform(seed, _SAMPLES_STREAM, batch, head, level, tile_block[..., None], tile_index[..., None],
                 slot)  # [B, H, T, m]
    sorted_probs = probs.gather(-1, _sorted_local(blocks))  # [B, Hk, P, L]
    before, own, piece_mass = _tile_block_masses(sorted_probs, blocks, bucket)
    before, own = before / piece_mass, own / piece_mass  # [B, H, T], shares of the piece's mass
    # Slot l's stratum [l/m, (l+1)/m) of the mass outside the own block, mapped past the block onto the piece's CDF.
    outside_cdf = (slot + u) / num_samples * (1 - own[..., None])  # [B, H, T, m]
    in_piece_cdf = torch.where(outside_cdf < before[..., None], outside_cdf, outside_cdf + own[..., None])
    # One CDF per piece, each shifted by its piece number so the pieces of a head make one sorted sequence.
    cdf = torch.cumsum(sorted_probs, -1) / sorted_probs.sum(-1, keepdim=True)
    cdf[..., -1] = 1.0
    cdf = cdf + torch.arange(n_pieces, device=device, dtype=torch.float64)[:, None]  # [B, Hk, P, L]
    target = (in_piece_cdf + (tile_block // blocks_per_piece)[..., None]).reshape(B, Hk, -1)  # [B, Hk, G T m]
    pos = torch.searchsorted(cdf.flatten(2), target, right=True).clamp_max(n_pieces * keys_per_piece - 1)
    sample_idx = perm_k[..., :n_pieces * keys_per_piece].gather(-1, pos).view(B, H, n_tiles, num_samples)
    sample_block = _heads(k_block, H).gather(-1, sample_idx.flatten(2)).view_as(sample_idx)
    sample_logw = _slot_log_weights(probs, blocks, sample_idx, piece_mass * (1 - own))
    return dataclasses.replace(blocks, sample_idx=sample_idx, sample_block=sample_block, sample_logw=sample_logw)


def _sorted_local(level: Level) -> Tensor:
    """[B, Hk, P, L] the keys of each piece in hash order, as offsets into the piece's key chunk."""
    n = level.perm_k.shape[-1]
    first_key = _piece_keys(n, level.chunk, level.pair, level.n_pieces, level.perm_k.device)[:, :1]  # [P, 1]
    keys_per_piece = min(level.chunk, n)
    return level.perm_k[..., :level.n_pieces * keys_per_piece].unflatten(-1, (level.n_pieces, -1)) - first_key


def _tile_block_masses(sorted_probs: Tensor, level: Level, bucket: int) -> tuple[Tensor, Tensor, Tensor]:
    """(mass of the blocks before the tile's own block in its piece, mass of the own block, mass of the piece): three
    [B, H, T] tensors from the sampling probabilities [B, Hk, P, L] of each piece's keys in hash order (block c:
    positions [c bucket, (c + 1) bucket))."""
    L = sorted_probs.shape[-1]
    blocks_per_piece = -(-L // bucket)
    padded = torch.nn.functional.pad(sorted_probs, (0, blocks_per_piece * bucket - L))
    block_mass = padded.unflatten(-1, (blocks_per_piece, bucket)).sum(-1)  # [B, Hk, P, blocks]
    before = torch.cumsum(block_mass, -1) - block_mass
    piece_mass = block_mass.sum(-1, keepdim=True).expand_as(block_mass)
    B, H = level.q_block.shape[:2]
    tile_block = level.tiles.block.view(B, H, -1)  # global blocks: piece * blocks_per_piece + block
    return tuple(_heads(x.flatten(2), H).gather(-1, tile_block) for x in (before, block_mass, piece_mass))


def _slot_log_weights(probs: Tensor, level: Level, sample_idx: Tensor, outside: Tensor) -> Tensor:
    """[B, H, T, m] fp64 log(Q / (m p_j)) of every sample slot, from the pieces' probabilities [B, Hk, P, L] in
    original order and Q [B, H, T], each tile's probability outside its own block (from which its slots draw)."""
    H, m = sample_idx.shape[1], sample_idx.shape[-1]
    span = (1 + level.pair) * level.chunk  # a piece's key chunk starts at p span
    piece, local = sample_idx // span, sample_idx % span
    sample_p = _heads(probs, H).flatten(2, 3).gather(-1, (piece * probs.shape[-1] + local).flatten(2))
    log_outside = outside.clamp_min(torch.finfo(probs.dtype).tiny).log()
    return log_outside[..., None] - torch.log(m * sample_p.view_as(sample_idx))


def _outside_mass(probs: Tensor, level: Level, bucket: int) -> Tensor:
    """[B, H, T] Q of every tile, the probability outside its own block, from the pieces' probabilities
    [B, Hk, P, L] in original order."""
    _, own, piece_mass = _tile_block_masses(probs.gather(-1, _sorted_local(level)), level, bucket)
    return piece_mass - own


def sample_log_weights(v: Tensor, plan: "KDEPlan") -> list[Tensor]:
    """The plan's sample weights log(Q / (m p_j)) as a function of v: one [B, H, T, m] fp64 tensor per level,
    differentiable in v under "value_norm" (where p_j depends on ||v_j||), equal to ``level.sample_logw``.

    v: [B, Hk, N, Dv], the values the plan was made from.
    """
    v_norm = torch.linalg.vector_norm(v, dim=-1, dtype=torch.float64)  # [B, Hk, N]
    weights = []
    for level in plan.levels:
        keys = _piece_keys(v.shape[2], level.chunk, level.pair, level.n_pieces, v.device)
        probs = _sampling_probs(v_norm[..., keys], plan.sampling)
        weights.append(_slot_log_weights(probs, level, level.sample_idx, _outside_mass(probs, level, plan.bucket)))
    return weights


def make_plan(q: Tensor, k: Tensor, v: Tensor, seed: int | Tensor, causal: bool = False, bucket_size: int = 256,
              num_samples: int = 256, num_hash_bits: int = 8, sampling: str = "uniform",
              exact_window: int = 2048) -> KDEPlan:
    """The shared hashing / sorting / sampling step of KDE attention (deterministic given ``seed``).

    Args:
        q: [B, H, N, D]; k: [B, Hk, N, D]; v: [B, Hk, N, Dv] with Hk dividing H (any float dtype; inputs are not
            differentiated through the plan).
        seed: an int, or a one-element int64 tensor (read on the device: building the plan reads nothing back to
            the host, so it can be captured in a CUDA graph, and a graph replays with whatever seed the tensor
            holds). Hyperplanes and samples are counter-based hashes of it.
        causal: plan HyperAttention's causal split with exact windows of ``exact_window`` tokens.
        bucket_size: keys per LSH block.
        num_samples: m, sampled keys per query tile (min(bucket_size, QUERY_TILE) queries of one block).
        num_hash_bits: r, hyperplanes of the SimHash (0: no hashing, each query in the block of the original order
            at its own position).
        sampling: "uniform" or "value_norm".
        exact_window: causal only; a multiple of bucket_size.

    Returns:
        A KDEPlan (see Level for the tensors).
    """
    q, k, v = q.detach(), k.detach(), v.detach()
    seed = seed.to(q.device).reshape(()) if isinstance(seed, Tensor) else torch.full((), seed, device=q.device,
                                                                                         dtype=torch.int64)
    planes = _hyperplanes(seed, q.shape[-1], num_hash_bits)  # [D, r]
    q_rank, k_rank = simhash(q, planes), simhash(k, planes)  # [B, H, N], [B, Hk, N]
    v_norm = torch.linalg.vector_norm(v, dim=-1, dtype=torch.float64)  # [B, Hk, N]; fp64: values of 1e30 overflow fp32
    n = q.shape[2]
    if not causal:
        chunks, pair = [n], 0
    else:
        chunks, pair = [], 1
        while exact_window * 2 ** len(chunks) < n:
            chunks.append(exact_window * 2 ** len(chunks))
    tile = min(bucket_size, QUERY_TILE)
    levels = tuple(_level(q_rank, k_rank, v_norm, c, pair, bucket_size, tile, num_samples, num_hash_bits, sampling,
                          seed, i) for i, c in enumerate(chunks))
    return KDEPlan(bucket_size, num_samples, tile, exact_window if causal else None, sampling, levels)


def log_weights(plan: KDEPlan, n_heads: int, n: int, device: torch.device,
                sample_logw: list[Tensor] | None = None) -> Tensor:
    """The estimator as a dense logit bias on ``device``: [B, H, N, N] fp64 log W (0 exact, log(c_j / (m p_j))
    sampled, -inf absent); [1, H, N, N] when the plan has no levels (causal, N <= exact_window). ``sample_logw``
    (one [B, H, T, m] tensor per level, default the plan's) gives the slots' log weights, differentiably."""
    level0 = plan.levels[0] if plan.levels else None
    pos = torch.arange(n, device=device)
    log_w = torch.full((n, n), -math.inf, device=device, dtype=torch.float64)
    if plan.window is not None:  # exact causal attention inside each aligned window
        same_window = (pos[:, None] // plan.window) == (pos[None, :] // plan.window)
        log_w = torch.where(same_window & (pos[None, :] <= pos[:, None]), 0.0, log_w)
    log_w = log_w.expand(*(level0.q_block.shape[:2] if level0 else (1, n_heads)), n, n)
    weights = [level.sample_logw for level in plan.levels] if sample_logw is None else sample_logw
    for level, slot_logw in zip(plan.levels, weights):
        exact, sampled = _level_masks(level, n, device)
        weight = _key_weights(level, slot_logw, n)  # [B, H, T, N]
        tile_bias = torch.where(weight > 0, weight.clamp_min(torch.finfo(weight.dtype).tiny).log(), -math.inf)
        sampled_bias = tile_bias.gather(2, level.q_tile.clamp_min(0)[..., None].expand(-1, -1, -1, n))  # [B, H, N, N]
        log_w = torch.where(exact, 0.0, torch.where(sampled, sampled_bias, log_w))
    return log_w


def _level_masks(level: Level, n: int, device) -> tuple[Tensor, Tensor]:
    """([B, H, N, N] bool pairs attended exactly, pairs attended through the samples) of one level."""
    group = level.q_block.shape[1] // level.k_block.shape[1]
    _, q_piece, k_piece = _chunk_pieces(n, level.chunk, level.pair, device)
    same_piece = (q_piece[:, None] == k_piece[None, :]) & (q_piece[:, None] >= 0)  # [N, N]
    k_block = level.k_block.repeat_interleave(group, dim=1)
    exact = same_piece & (level.q_block[..., :, None] == k_block[..., None, :])
    return exact, same_piece & ~exact


def _key_weights(level: Level, slot_logw: Tensor, n: int) -> Tensor:
    """c_j / (m p_j) of every tile and key: the weights of the slots that drew key j, summed ([B, H, T, N] fp64, 0
    for keys not drawn)."""
    idx = level.sample_idx  # [B, H, T, m]
    return torch.zeros(idx.shape[:3] + (n,), dtype=torch.float64, device=idx.device).scatter_add(
        -1, idx, slot_logw.double().exp())


def slot_weight_grads(plan: KDEPlan, grad_logits: Tensor) -> list[Tensor]:
    """d loss / d log w of every sample slot (one [B, H, T, m] fp64 tensor per level) from d loss / d logits
    [B, H, N, N] (the logits are S + log W: a key drawn by c slots of a tile has log W = log sum of their weights,
    and each slot gets its share of the key's gradient)."""
    n = grad_logits.shape[-1]
    grads = []
    for level in plan.levels:
        _, sampled = _level_masks(level, n, grad_logits.device)
        per_tile = torch.zeros(level.sample_idx.shape[:3] + (n,), dtype=torch.float64, device=grad_logits.device)
        per_tile.scatter_add_(2, level.q_tile.clamp_min(0)[..., None].expand(-1, -1, -1, n),
                              torch.where(sampled, grad_logits.double(), 0.0))  # [B, H, T, N]
        share = level.sample_logw.exp() / _key_weights(level, level.sample_logw, n).gather(-1, level.sample_idx)
        grads.append(per_tile.gather(-1, level.sample_idx) * share)
    return grads


def value_weight_grad(v: Tensor, plan: KDEPlan, grad_log_weights: list[Tensor]) -> Tensor:
    """d loss / d v through the value-norm sample weights alone, given d loss / d log w of every sample slot (one
    [B, H, T, m] tensor per level): [B, Hk, N, Dv] fp64, zero for uniform sampling.

    Written out rather than by autograd, as it runs inside the op's backward: with log w = log Q - log(m p_j) and
    p_j = (1 - a) ||v_j|| / S + a / L over a piece (S = sum of its norms), dL/dp_j = -G_j / p_j (G_j: the summed
    slot gradients of key j) plus the sum of G_tile / Q_tile over the tiles whose own block does not hold j
    (``_outside_mass_grad``), dL/d||v_k|| = (1 - a) / S (dL/dp_k - sum_j dL/dp_j ||v_j|| / S), and
    dL/dv_k = dL/d||v_k|| v_k / ||v_k||.
    """
    B, Hk, n, _ = v.shape
    vd = v.detach().double()
    if plan.sampling == "uniform":
        return torch.zeros_like(vd)
    v_norm = torch.linalg.vector_norm(vd, dim=-1)  # [B, Hk, N]
    grad_norm = torch.zeros_like(v_norm)
    for level, grad in zip(plan.levels, grad_log_weights):
        keys = _piece_keys(n, level.chunk, level.pair, level.n_pieces, v.device)  # [P, L]
        norms = v_norm[..., keys]  # [B, Hk, P, L]
        span = (1 + level.pair) * level.chunk
        flat = (level.sample_idx // span * keys.shape[-1] + level.sample_idx % span).flatten(2)  # [B, H, T m]
        piece_probs = _sampling_probs(norms, plan.sampling)  # [B, Hk, P, L]
        probs = _heads(piece_probs, grad.shape[1]).flatten(2, 3)  # [B, H, P L]
        grad_p = torch.zeros_like(probs).scatter_add_(-1, flat, -grad.double().flatten(2) / probs.gather(-1, flat))
        grad_p = _group_sum(grad_p, Hk).view_as(norms) + _outside_mass_grad(piece_probs, level, grad, plan.bucket)
        total = norms.sum(-1, keepdim=True)
        safe = total.clamp_min(torch.finfo(total.dtype).tiny)
        by_norm = (1 - VALUE_NORM_MIX) / safe * (grad_p - (grad_p * norms).sum(-1, keepdim=True) / safe)
        grad_norm.index_add_(-1, keys.flatten(), torch.where(total > 0, by_norm, 0.0).flatten(2))
    unit = torch.where(v_norm[..., None] > 0, vd / v_norm.clamp_min(torch.finfo(vd.dtype).tiny)[..., None], 0.0)
    return grad_norm[..., None] * unit


def _outside_mass_grad(probs: Tensor, level: Level, grad: Tensor, bucket: int) -> Tensor:
    """d loss / d p_k through log Q_tile, the probability outside each tile's own block in the slots' weights
    ([B, Hk, P, L], original order in the piece, from the probabilities probs of that shape): with G_tile its
    slots' summed gradients, every key of the tile's piece outside its block gets G_tile / Q_tile."""
    outside = _outside_mass(probs, level, bucket).clamp_min(torch.finfo(probs.dtype).tiny)
    per_tile = grad.double().sum(-1) / outside  # [B, H, T]
    B, Hk, P, L = probs.shape
    blocks_per_piece = -(-L // bucket)
    by_block = torch.zeros(B, grad.shape[1], P * blocks_per_piece, dtype=torch.float64, device=probs.device)
    by_block = _group_sum(by_block.scatter_add_(-1, level.tiles.block.view_as(per_tile), per_tile), Hk)
    by_block = by_block.view(B, Hk, P, blocks_per_piece)
    sorted_block = torch.arange(L, device=probs.device) // bucket
    in_sorted_order = by_block.sum(-1, keepdim=True) - by_block[..., sorted_block]  # [B, Hk, P, L]
    return torch.zeros_like(probs).scatter_(-1, _sorted_local(level), in_sorted_order)


def _heads(x: Tensor, n_heads: int) -> Tensor:
    """[B, Hk, N, *] -> [B, H, N, *]: each kv head serves H / Hk query heads (GQA)."""
    return x.repeat_interleave(n_heads // x.shape[1], dim=1)


def _probs(q: Tensor, k: Tensor, v: Tensor, plan: KDEPlan, scale: float) -> tuple[Tensor, Tensor]:
    """(P = softmax(S + log W) [B, H, N, N], lse [B, H, N]) in the compute dtype, differentiable in q, k and v
    (through the sample weights)."""
    H, n = q.shape[1], q.shape[2]
    qf = upcast(q)
    log_w = log_weights(plan, H, n, q.device, sample_log_weights(v, plan))
    logits = (qf @ _heads(upcast(k), H).transpose(-1, -2)) * scale + log_w.to(qf.dtype)
    lse = torch.logsumexp(logits, dim=-1)
    return torch.exp(logits - lse[..., None]), lse


def kde_attention(q: Tensor, k: Tensor, v: Tensor, plan: KDEPlan, scale: float | None = None) -> tuple[Tensor, Tensor]:
    """The KDE attention estimator for a given plan, as one dense softmax (O(N^2) memory: tests and CPU).

    Args:
        q: [B, H, N, D]; k: [B, Hk, N, D]; v: [B, Hk, N, Dv], Hk dividing H.
        plan: from ``make_plan`` on the same inputs.
        scale: softmax scale, default 1 / sqrt(D).

    Returns:
        (out [B, H, N, Dv] in q.dtype, lse [B, H, N] in fp32, fp64 for fp64 q); differentiable in q, k, v.
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    probs, lse = _probs(q, k, v, plan, scale)
    return nonfinite_heads_as_nan((probs @ _heads(upcast(v), q.shape[1])).to(q.dtype), lse, k, v)


def _group_sum(x: Tensor, n_kv_heads: int) -> Tensor:
    """[B, H, ...] -> [B, Hk, ...]: the sum over the query heads that share a kv head."""
    return x.unflatten(1, (n_kv_heads, -1)).sum(2)


def kde_attention_backward(grad_out: Tensor, grad_lse: Tensor, q: Tensor, k: Tensor, v: Tensor, plan: KDEPlan,
                           scale: float | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Explicit gradient of ``kde_attention`` (the keys chosen by the plan held fixed): (dq, dk, dv) in the dtypes of
    q, k, v.

    With P = softmax(S + log W): dV = P^T dO, dS = P * (dO V^T - delta) with delta_i = dO_i.O_i - dlse_i,
    dQ = scale dS K, dK = scale dS^T Q (summed over the query heads of each kv head); with value-norm sampling
    dV also gets dS through log W (``slot_weight_grads``, ``value_weight_grad``).
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    H, Hk = q.shape[1], k.shape[1]
    probs, _ = _probs(q, k, v, plan, scale)
    grad_out, vh = upcast(grad_out), _heads(upcast(v), H)
    out = probs @ vh
    delta = (grad_out * out).sum(-1) - upcast(grad_lse)
    dlogits = probs * (grad_out @ vh.transpose(-1, -2) - delta[..., None])
    dq = scale * dlogits @ _heads(upcast(k), H)
    dk = _group_sum(scale * dlogits.transpose(-1, -2) @ upcast(q), Hk)
    dv = _group_sum(probs.transpose(-1, -2) @ grad_out, Hk)
    if plan.sampling != "uniform":
        dv = dv + value_weight_grad(v, plan, slot_weight_grads(plan, dlogits))
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


def exact_attention(q: Tensor, k: Tensor, v: Tensor, causal: bool = False,
                    scale: float | None = None) -> tuple[Tensor, Tensor]:
    """Exact softmax attention with GQA: (out [B, H, N, Dv] in q.dtype, lse [B, H, N] fp32/fp64), differentiable."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    H, n = q.shape[1], q.shape[2]
    logits = (upcast(q) @ _heads(upcast(k), H).transpose(-1, -2)) * scale
    if causal:
        logits = logits.masked_fill(torch.ones(n, n, dtype=torch.bool, device=q.device).triu(1), -math.inf)
    lse = torch.logsumexp(logits, dim=-1)
    return (torch.exp(logits - lse[..., None]) @ _heads(upcast(v), H)).to(q.dtype), lse
