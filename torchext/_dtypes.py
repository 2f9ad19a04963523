"""The precision policy every family shares: 16- and 32-bit inputs compute and accumulate in fp32; fp64 inputs
(gradcheck) stay fp64 end to end. Importable without Triton (the ops and references use it too)."""

import torch
from torch import Tensor


def accumulator_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for 16- and 32-bit inputs; fp64 for fp64 inputs."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def upcast(x: Tensor) -> Tensor:
    """x in its accumulator dtype (a no-op for fp32 and fp64)."""
    return x.to(accumulator_dtype(x.dtype))
