"""Launch-shape helpers shared by every family's Triton launchers, and the one `dot` every kernel uses.

Tiles. On a GPU the launchers pick the tiles, warps and stages tuned for it. Under the interpreter they pick large
tiles and small grids (the interpreter runs programs one after another at ~1 ms each, whatever their size), unless
TORCHEXT_TILES=gpu, which makes every launcher pick exactly what it would pick on an H100: that is how the tests
run the masks at the tile boundaries a GPU uses, and how the offline compile check (bench/offline.py) sees the
configurations a GPU launches.
"""

import os

import torch
import triton
import triton.language as tl

from torchext._backend import INTERPRET
from torchext._dtypes import accumulator_dtype  # noqa: F401  (re-exported for the launchers)

GPU_TILES = not INTERPRET or os.environ.get("TORCHEXT_TILES") == "gpu"
H100_SMS = 132  # the streaming multiprocessors of an H100 SXM: the GPU that TORCHEXT_TILES=gpu stands for

# Row kernels hold BLOCK_M whole rows in registers. Compiled for sm_80 / sm_90 (bench/results/offline/), the
# heaviest (the hypersphere backward, fp32 math, 16 warps) takes ~120 of the 128 registers a thread gets at 8192
# elements and spills at 16384: longer rows go to the split-row kernels, which stream a row in SPLIT_ROW_CHUNK
# pieces, one pass per reduction. (fp64 rows take twice the registers: they may spill past 4096; fp64 is for
# gradcheck.)
MAX_ROW_ELEMENTS = 8192
SPLIT_ROW_CHUNK = 4096

# Elements of one program's tile.
_TILE_ELEMENTS = 4096 if GPU_TILES else 65536


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors to fill: the device's own on CUDA, an H100's under GPU tiles, else 1 (interpreter)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return H100_SMS if GPU_TILES else 1


def _tile(n_rows: int, block_n: int) -> tuple[int, int, int]:
    block_m = min(max(_TILE_ELEMENTS // block_n, 1), 64, triton.next_power_of_2(max(n_rows, 1)))
    num_warps = min(max(block_m * block_n // 256, 4), 16)  # ~8 fp32 values of each live tile per thread
    return block_m, block_n, num_warps


def row_tile(n_rows: int, n_cols: int) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps) for kernels that hold BLOCK_M whole rows of n_cols <= MAX_ROW_ELEMENTS in
    registers (row norms)."""
    if n_cols > MAX_ROW_ELEMENTS:
        raise ValueError(f"rows of {n_cols} elements exceed the register-resident kernels' limit of "
                         f"{MAX_ROW_ELEMENTS}; use split_row_tile")
    return _tile(n_rows, triton.next_power_of_2(max(n_cols, 1)))


def split_row_tile(n_cols: int) -> tuple[int, int]:
    """(BLOCK_N, num_warps) for kernels that stream one row per program in BLOCK_N chunks (rows longer than
    MAX_ROW_ELEMENTS)."""
    return min(triton.next_power_of_2(max(n_cols, 1)), SPLIT_ROW_CHUNK), 16


def elementwise_tile(n_rows: int, n_cols: int) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps) for kernels that work on [BLOCK_M, BLOCK_N] pieces of a matrix."""
    return _tile(n_rows, min(triton.next_power_of_2(max(n_cols, 1)), 1024 if GPU_TILES else 4096))


def reduction_grid(n_rows: int, block_m: int, device: torch.device) -> tuple[int, int]:
    """(programs, row blocks per program) for a kernel that also sums over rows (a column reduction).

    Each program walks consecutive row blocks and writes one partial row that torch then sums, so there
    are few programs: four per SM (four in all on the interpreter).
    """
    n_blocks = triton.cdiv(n_rows, block_m)
    n_programs = max(1, min(n_blocks, 4 * sm_count(device)))
    return n_programs, triton.cdiv(n_blocks, n_programs)


def compute_dtype(dtype: torch.dtype):
    """The Triton dtype kernels upcast every load to (the COMPUTE constexpr): see accumulator_dtype."""
    return tl.float64 if dtype == torch.float64 else tl.float32


def dot_dtype(dtype: torch.dtype):
    """tl.dot operand type: the 16-bit tensor-core type for bf16/fp16 on a GPU; the compute type for fp32/fp64
    and on the interpreter (which computes bf16 products wrongly, whatever the tiles)."""
    if dtype in (torch.bfloat16, torch.float16) and not INTERPRET:
        return tl.bfloat16 if dtype == torch.bfloat16 else tl.float16
    return compute_dtype(dtype)


@triton.jit
def dot(a, b, acc, DOT: tl.constexpr):
    """acc + a @ b with the operands cast to DOT (dot_dtype) and acc's dtype as the accumulator.

    fp32/fp64 operands get true products (ieee), not TF32. out_dtype is always named: Triton 3.6 asserts on an
    fp64 accumulator without it, where 3.9 infers it."""
    if DOT == tl.float32 or DOT == tl.float64:
        return tl.dot(a.to(DOT), b.to(DOT), acc, input_precision="ieee", out_dtype=acc.dtype)
    return tl.dot(a.to(DOT), b.to(DOT), acc, out_dtype=acc.dtype)
