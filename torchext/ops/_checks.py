"""Input checks and helpers shared by every family's ops.

Each check raises with a message that names the op, the argument, what was expected and what came.
"""

import math
from collections.abc import Sequence

import torch
from torch import Tensor

# float64 is accepted everywhere (kernels then compute in fp64) so gradcheck can test the kernels themselves.
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def check_tensor(op: str, name: str, x: Tensor, dtypes: Sequence[torch.dtype] = FLOAT_DTYPES,
                 ndim: int | None = None, min_ndim: int = 1) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in dtypes:
        raise TypeError(f"{op}: {name} must have dtype in {[str(d) for d in dtypes]}, got {x.dtype}")
    if ndim is not None and x.dim() != ndim:
        raise ValueError(f"{op}: {name} must be {ndim}-D, got shape {tuple(x.shape)}")
    if x.dim() < min_ndim:
        raise ValueError(f"{op}: {name} must have at least {min_ndim} dim(s), got shape {tuple(x.shape)}")


def check_tensors(op: str, **tensors: Tensor) -> None:
    """check_tensor with the default float dtypes for each named argument (a public wrapper's first check, before
    the op's schema sees a list or a number)."""
    for name, x in tensors.items():
        check_tensor(op, name, x)


def check_bool(op: str, name: str, value) -> None:
    """value is a Python bool (not an int or tensor: a tensor's truth would read it to the host)."""
    if not isinstance(value, bool):
        raise TypeError(f"{op}: {name} must be a bool, got {type(value).__name__} {value!r}")


def check_int(op: str, name: str, value, minimum: int | None = None) -> None:
    """value is a Python int (not a bool, float or tensor), at least `minimum`."""
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{op}: {name} must be an int, got {type(value).__name__} {value!r}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{op}: {name} must be >= {minimum}, got {value}")


def check_ints(op: str, name: str, values, length: int | None = None, minimum: int | None = None) -> None:
    """values is a list or tuple of Python ints (each as check_int), of `length` entries when given."""
    if not isinstance(values, (list, tuple)):
        raise TypeError(f"{op}: {name} must be a list or tuple of ints, got {type(values).__name__} {values!r}")
    if length is not None and len(values) != length:
        raise ValueError(f"{op}: {name} must have {length} entries, got {len(values)}: {values!r}")
    for i, value in enumerate(values):
        check_int(op, f"{name}[{i}]", value, minimum)


def check_float(op: str, name: str, value, positive: bool = False) -> None:
    """value is a finite real Python number (int or float, not a bool or tensor), > 0 when `positive`."""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise TypeError(f"{op}: {name} must be a float, got {type(value).__name__} {value!r}")
    if not math.isfinite(value) or (positive and value <= 0):
        raise ValueError(f"{op}: {name} must be finite{' and > 0' if positive else ''}, got {value}")


def check_tensor_list(op: str, name: str, tensors) -> None:
    """tensors is a list or tuple of torch.Tensors (the dtype and shape checks are the op's)."""
    if not isinstance(tensors, (list, tuple)):
        raise TypeError(f"{op}: {name} must be a list or tuple of tensors, got {type(tensors).__name__}")
    for i, t in enumerate(tensors):
        if not isinstance(t, Tensor):
            raise TypeError(f"{op}: {name}[{i}] must be a torch.Tensor, got {type(t).__name__}")


def check_dim(op: str, dim, ndim: int) -> None:
    """dim indexes one of ndim axes (negative counts from the end), as torch's own ops require."""
    check_int(op, "dim", dim)
    if not -max(ndim, 1) <= dim < max(ndim, 1):
        raise ValueError(f"{op}: dim must be in [{-max(ndim, 1)}, {max(ndim, 1) - 1}] for a {ndim}-D tensor, got {dim}")


def check_same_device(op: str, **tensors: Tensor) -> None:
    devices = {name: t.device for name, t in tensors.items()}
    if len(set(devices.values())) > 1:
        raise ValueError(f"{op}: all tensors must be on one device, got {devices}")


def check_shape(op: str, name: str, x: Tensor, shape: Sequence[int]) -> None:
    if tuple(x.shape) != tuple(shape):
        raise ValueError(f"{op}: {name} must have shape {tuple(shape)}, got {tuple(x.shape)}")


def check_unit_last_stride(op: str, name: str, x: Tensor) -> None:
    """The kernels read rows with unit stride: slices of a wider row are fine, transposes are not."""
    if x.dim() > 0 and x.shape[-1] > 1 and x.stride(-1) != 1:
        raise ValueError(f"{op}: {name} must have unit stride in its last dim (got strides {x.stride()}); "
                         f"call .contiguous() first")


def as_rows(op: str, name: str, x: Tensor) -> Tensor:
    """x [..., n] -> a [rows, n] view with unit column stride and one row stride, without copying.

    Works for contiguous tensors and for slices of wider rows (e.g. one half of a fused projection);
    anything else raises, because a silent copy would hide a slow path.
    """
    check_unit_last_stride(op, name, x)
    try:
        return x.view(-1, x.shape[-1]) if x.dim() != 2 else x
    except RuntimeError:
        raise ValueError(f"{op}: {name} with shape {tuple(x.shape)} and strides {x.stride()} cannot be seen "
                         f"as rows of one stride; call .contiguous() first") from None
