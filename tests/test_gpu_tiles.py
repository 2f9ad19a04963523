"""GPU tiles under the interpreter: every kernel at the tiles, warps and stages its launcher picks on an H100
(TORCHEXT_TILES=gpu), on shapes one element short of a tile, at it, one past it (in every tiled dimension at once)
and with a ragged last tile, against the reference, forward and backward.

The tile sizes come from the launchers themselves, so the shapes follow a retuned tile. The tiles are fixed when
the kernel modules are imported, so `./dev test` runs this file in a second pytest process with
TORCHEXT_TILES=gpu; in the main pass it skips. On a GPU it runs as it is (GPU tiles are the default there).
"""

import functools

import pytest
import torch
from harness import assert_close, check_against_reference
from test_int8_matmul import quantized_weight, with_outliers
from test_kde_attention import inputs as kde_inputs
from test_kde_attention import op_and_reference as kde_op_and_reference
from test_kv_quant import check_decode, check_poisoned_decode, decode_case
from test_tensor_attention import check_sqnr_against_fp32
from test_tensor_attention import inputs as tensor_inputs

from torchext import ops
from torchext.ops import kronecker_attention
from torchext.reference import int8_matmul as int8_ref
from torchext.reference import kronecker_attention as kronecker_ref
from torchext.reference import kv_quant as kv_ref
from torchext.reference import ngpt as ngpt_ref
from torchext.triton_kernels import _launch, int8_matmul, kde_attention, kronecker_attention as kronecker_kernels
from torchext.triton_kernels import kv_quant, tensor_attention

pytestmark = pytest.mark.skipif(not _launch.GPU_TILES,
                                reason="GPU tiles: ./dev test runs this file again with TORCHEXT_TILES=gpu")

EDGES = ["short", "at", "past", "ragged"]


def around(tile: int, edge: str) -> int:
    """A size one short of `tile`, at it, one past it, or with a ragged third tile."""
    return {"short": tile - 1, "at": tile, "past": tile + 1, "ragged": 2 * tile + tile // 2 + 1}[edge]


def randn(*shape, dtype=torch.bfloat16, device="cpu", grad=True):
    return torch.randn(*shape, device=device).to(dtype).requires_grad_(grad)


# ---- nGPT: [BLOCK_M, BLOCK_N] row tiles, and the split-row kernels' SPLIT_ROW_CHUNK pieces ----------------------


def ngpt_shape(edge: str) -> tuple[int, int]:
    block_m, block_n, _ = _launch.row_tile(10**6, 64)
    return around(block_m, edge), around(block_n, edge)


@pytest.mark.parametrize("edge", EDGES)
def test_ngpt_row_kernels(edge, device):
    rows, cols = ngpt_shape(edge)
    h, branch = randn(rows, cols, device=device), randn(rows, cols, device=device)
    alpha = (torch.rand(cols, device=device) * 0.1).requires_grad_()
    check_against_reference(ops.l2_normalize, ngpt_ref.l2_normalize, [h])
    check_against_reference(ops.hypersphere_update, ngpt_ref.hypersphere_update, [h, branch, alpha], reduced=[2],
                            rows=rows)
    s_u, s_v = [(torch.rand(cols, device=device) + 0.5).requires_grad_() for _ in range(2)]
    check_against_reference(functools.partial(ops.scaled_swiglu, d_model=16),
                            functools.partial(ngpt_ref.scaled_swiglu, d_model=16), [h, branch, s_u, s_v],
                            reduced=[2, 3], rows=rows)


@pytest.mark.parametrize("edge", EDGES)
def test_ngpt_qk_norm_rope(edge, device):
    _, head_dim = ngpt_shape(edge)
    head_dim += head_dim % 2  # RoPE pairs channels
    tokens, _ = ngpt_shape(edge)
    q, k = randn(1, tokens, 2, head_dim, device=device), randn(1, tokens, 1, head_dim, device=device)
    cos, sin = ngpt_ref.rope_cos_sin(tokens, head_dim, device=device)
    s_qk = (torch.rand(head_dim, device=device) + 0.5).requires_grad_()  # one row shared by the GQA heads
    check_against_reference(ops.qk_norm_rope, ngpt_ref.qk_norm_rope, [q, k, cos, sin, s_qk], reduced=[4],
                            rows=3 * tokens)


@pytest.mark.parametrize("edge", ["past", "short", "at", "ragged"])
def test_ngpt_split_rows(edge, device):
    """Rows past MAX_ROW_ELEMENTS stream in SPLIT_ROW_CHUNK pieces: one past the limit, then around three pieces."""
    cols = _launch.MAX_ROW_ELEMENTS + 1 if edge == "past" else around(3 * _launch.SPLIT_ROW_CHUNK, edge)
    h, branch = randn(2, cols, device=device), randn(2, cols, device=device)
    alpha = (torch.rand(cols, device=device) * 0.1).requires_grad_()
    check_against_reference(ops.l2_normalize, ngpt_ref.l2_normalize, [h])
    check_against_reference(ops.hypersphere_update, ngpt_ref.hypersphere_update, [h, branch, alpha], reduced=[2],
                            rows=2)


# ---- int8: decode, prefill and wide-epilogue [BLOCK_M, BLOCK_N] tiles over BLOCK_K ---------------------------------
# (regime, M that picks it, w16 columns, activation dtype)
INT8_REGIMES = {"decode": (1, False, torch.bfloat16), "prefill": (1024, False, torch.bfloat16),
                "w16": (1024, True, torch.bfloat16), "fp32": (1024, False, torch.float32),
                "fp32_decode": (1, False, torch.float32)}


@pytest.mark.parametrize("edge", EDGES)
@pytest.mark.parametrize("regime", list(INT8_REGIMES))
def test_int8_mm(regime, edge, device):
    """The forward GEMM, and the input-gradient GEMM (the same kernel on the transposed codes)."""
    m_regime, has_w16, dtype = INT8_REGIMES[regime]
    tiles = int8_matmul._tiles(m_regime, 4096, 4096, has_w16, dtype.itemsize >= 4)
    M, N, K = (around(tiles[name], edge) for name in ("BLOCK_M", "BLOCK_N", "BLOCK_K"))
    if m_regime == 1:
        M = min(M, tiles["BLOCK_M"])  # past 16 rows is the prefill regime
    x = with_outliers(M, K, cols=(3, K - 1), dtype=dtype, device=device)
    w, w_codes, w_scale = quantized_weight(N, K, device)
    a_codes, a_scale, cols, n = int8_ref.int8_vectorwise_quant(x, 6.0, 32)
    w16 = w16_slot = None
    if has_w16:
        w16, w16_slot = w[:, [K - 1]].to(dtype).contiguous(), torch.full((K,), -1, dtype=torch.int32, device=device)
        w16_slot[K - 1] = 0
    bias = torch.randn(N, device=device).to(dtype)
    args = [a_codes, a_scale, w_codes, w_scale, bias, x, cols, n, w16, w16_slot]
    assert_close(ops.int8_mm(*args), int8_ref.int8_mm(*args), "int8_mm")
    grad = torch.randn(M, N, device=device)
    g_codes, g_scale, none_cols, zero = int8_ref.int8_vectorwise_quant(grad, 0.0, 32)
    w_t_codes = w_codes.t()  # [K, N] view: the input-gradient GEMM's weight
    t_args = [g_codes, g_scale, w_t_codes, torch.ones(K, device=device), None, grad, none_cols, zero, None, None]
    assert_close(ops.int8_mm(*t_args), int8_ref.int8_mm(*t_args), "int8_mm, transposed codes")


# ---- KV decode: BLOCK_N-token tiles, splits of CHUNK tokens, and merges of MERGE_BLOCK partials ----------------------


@pytest.mark.parametrize("edge", EDGES)
def test_kv_decode_tiles(edge, device):
    length = around(kv_quant.BLOCK_N, edge)
    for dtype in (torch.bfloat16, torch.float32):
        check_decode(*decode_case(2, 2, 4, 64, [length, max(length // 2, 1)], 4, 3, sink=1, window=4, dtype=dtype,
                                  device=device, slots=2))


@pytest.mark.parametrize("edge", EDGES)
def test_kv_decode_tiles_with_a_poisoned_sequence(edge, device):
    """A poisoned sequence between two others: NaN in every head of it, the others as the reference."""
    length = around(kv_quant.BLOCK_N, edge)
    _, storage, codebook, _, _ = decode_case(3, 2, 4, 64, [length, length, max(length // 2, 1)], 4, 3, sink=1,
                                             window=4, dtype=torch.bfloat16, device=device, slots=2)
    storage.lengths[1] = kv_ref.POISONED_LENGTH
    check_poisoned_decode(storage, codebook, [1], torch.bfloat16, device)


@pytest.mark.parametrize("edge", ["at", "past"])
def test_kv_decode_merges_more_partials_than_one_merge_block(edge, device):
    """One sequence split over about MERGE_BLOCK programs (four per SM of an H100): the merge loops over blocks."""
    length = kv_quant.MERGE_BLOCK * kv_quant.BLOCK_N + (1 if edge == "past" else 0)
    splits, _ = kv_quant._splits(1, length, torch.device(device))
    assert splits + 1 > kv_quant.MERGE_BLOCK
    check_decode(*decode_case(1, 1, 4, 32, [length], 4, 4, sink=0, window=0, dtype=torch.float32, device=device,
                              slots=0), max_length=length)


# ---- KDE attention: BLOCK_M-query tiles (the plan's), BLOCK_N-key steps over blocks and samples, BLOCK_D channels --


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("edge", EDGES)
def test_kde_attention_tiles(edge, causal, device):
    bucket = 64
    block_n = kde_attention._blocks("fwd", 64, torch.bfloat16)[0]
    n, samples = around(2 * bucket, edge), around(block_n, edge)
    head_dim = min(around(64, edge), kde_attention.MAX_HEAD_DIM_GPU[2])  # ragged: the 128-channel tile, full
    check_against_reference(*kde_op_and_reference(causal, bucket, samples, bucket),
                            kde_inputs(1, 2, 1, n, head_dim, head_dim, dtype=torch.bfloat16, device=device))


# ---- Kronecker attention: all keys in one BLOCK_L tile, [BLOCK_D, BLOCK_P] channel x query tiles -------------------
# (H, W) with H * W one short of, at and one past 64 queries, a ragged 160, and H + W one past a 64-key tile.
KRONECKER_MAPS = {"short": (7, 9), "at": (8, 8), "past": (5, 13), "ragged": (10, 16), "keys_past": (32, 33)}


@pytest.mark.parametrize("mode", kronecker_ref.MODES)
@pytest.mark.parametrize("edge", list(KRONECKER_MAPS))
def test_kronecker_attention_tiles(edge, mode, device):
    H, W = KRONECKER_MAPS[edge]
    block_d = kronecker_kernels._attention_tiles("fwd", H + W, 64, H * W, torch.bfloat16)[1]
    channels = around(block_d, "past" if edge == "keys_past" else edge)
    x = randn(1, channels, H, W, device=device)
    check_against_reference(functools.partial(kronecker_attention, mode=mode),
                            functools.partial(kronecker_ref.kronecker_attention, mode=mode), [x])


# ---- tensor attention: BLOCK_Q x BLOCK_J row tiles, BLOCK_N columns, BLOCK_D channels --------------------------------


@pytest.mark.parametrize("window", [None, (3, 5)], ids=["full", "window"])
@pytest.mark.parametrize("edge", EDGES[:3])
def test_tensor_attention_tiles(edge, window, device):
    """16-bit tiles against the fp32 reference (SQNR), forward and the three backward passes."""
    block_m = tensor_attention._GPU_TILES["fwd"][0]
    n, head_dim = around(block_m, edge), around(16, edge)
    check_sqnr_against_fp32(tensor_inputs(1, 2, 1, n, head_dim, dtype=torch.bfloat16, device=device, grad=False),
                            window)
