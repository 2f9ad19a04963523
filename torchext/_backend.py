"""Which backend runs an op: the CUDA extension, Triton (compiled or interpreted), or the reference.

CUDA tensors go to the kernels. CPU tensors go to the pure-PyTorch reference, except under
TRITON_INTERPRET=1, where Triton kernels run on CPU tensors through the interpreter (how CI tests them), and while
bench/_launches.py records launches (RECORDING), where CPU tensors reach the compiled kernels' launchers exactly
as CUDA tensors would and the launches are recorded instead of run (how the offline compile check sees them).
"""

import importlib.util
import os
import warnings

import torch
from torch import Tensor

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
HAS_TRITON = importlib.util.find_spec("triton") is not None
RECORDING = False  # set only by bench._launches.recording()


def _load_cuda_extension():
    """torchext._C, or None when the install is pure Python (no nvcc, or TORCHEXT_NO_CUDA=1)."""
    if importlib.util.find_spec("torchext._C") is None:
        return None
    try:
        from torchext import _C
    except ImportError as e:  # built but unloadable (e.g. a CUDA runtime mismatch): say so, keep working
        warnings.warn(f"torchext._C exists but failed to load ({e}); CUDA C++ ops fall back to PyTorch",
                      stacklevel=2)
        return None
    return _C


CUDA_EXT = _load_cuda_extension()


def cuda_dtype_code(dtype: torch.dtype) -> int:
    """The csrc/dtype.h code of a floating dtype, for the CUDA C++ launchers (fp32, bf16, fp16)."""
    return {torch.float32: CUDA_EXT.FLOAT32, torch.bfloat16: CUDA_EXT.BFLOAT16, torch.float16: CUDA_EXT.FLOAT16}[dtype]


def use_triton(x: Tensor) -> bool:
    """True when the Triton kernel should run on ``x``'s device."""
    return HAS_TRITON and (x.is_cuda or ((INTERPRET or RECORDING) and x.device.type == "cpu"))


def use_cuda_ext(x: Tensor) -> bool:
    """True when the CUDA C++ kernel should run on ``x``'s device."""
    return CUDA_EXT is not None and x.is_cuda
