"""Launch-shape helpers shared by every family's Triton launchers."""

import torch
import triton
import triton.language as tl

from torchext._backend import INTERPRET
from torchext._dtypes import accumulator_dtype  # noqa: F401  (re-exported for the launchers)

# A whole row lives in registers in the row-wise kernels; past this they would spill.
MAX_ROW_ELEMENTS = 65536

# Elements of one program's tile. The interpreter runs programs one after another at ~1 ms each
# whatever their size, so there tiles are large and grids small.
_TILE_ELEMENTS = 65536 if INTERPRET else 4096


def _tile(n_rows: int, block_n: int) -> tuple[int, int, int]:
    block_m = min(max(_TILE_ELEMENTS // block_n, 1), 64, triton.next_power_of_2(max(n_rows, 1)))
    num_warps = min(max(block_m * block_n // 256, 4), 16)  # ~8 fp32 values of each live tile per thread
    return block_m, block_n, num_warps


def row_tile(n_rows: int, n_cols: int) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps) for kernels that hold BLOCK_M whole rows in registers (row norms)."""
    if n_cols > MAX_ROW_ELEMENTS:
        raise ValueError(f"rows of {n_cols} elements exceed the fused kernels' limit of {MAX_ROW_ELEMENTS}")
    return _tile(n_rows, triton.next_power_of_2(max(n_cols, 1)))


def elementwise_tile(n_rows: int, n_cols: int) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps) for kernels that work on [BLOCK_M, BLOCK_N] pieces of a matrix."""
    return _tile(n_rows, min(triton.next_power_of_2(max(n_cols, 1)), 4096 if INTERPRET else 1024))


def reduction_grid(n_rows: int, block_m: int, device: torch.device) -> tuple[int, int]:
    """(programs, row blocks per program) for a kernel that also sums over rows (a column reduction).

    Each program walks consecutive row blocks and writes one partial row that torch then sums, so there
    are few programs: four per SM on a GPU, four on the interpreter.
    """
    n_blocks = triton.cdiv(n_rows, block_m)
    per_device = 4 * torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4
    n_programs = max(1, min(n_blocks, per_device))
    return n_programs, triton.cdiv(n_blocks, n_programs)


def compute_dtype(dtype: torch.dtype):
    """The Triton dtype kernels upcast every load to (the COMPUTE constexpr): see accumulator_dtype."""
    return tl.float64 if dtype == torch.float64 else tl.float32


def dot_dtype(dtype: torch.dtype):
    """tl.dot operand type: the 16-bit tensor-core type for bf16/fp16 on a GPU; the compute type for fp32/fp64
    and on the interpreter (which computes bf16 products wrongly)."""
    if dtype in (torch.bfloat16, torch.float16) and not INTERPRET:
        return tl.bfloat16 if dtype == torch.bfloat16 else tl.float16
    return compute_dtype(dtype)
