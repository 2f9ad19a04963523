"""Shared test helpers: the tolerance table, kernel-vs-reference checks, gradcheck, opcheck, compile, bad inputs.

Every family's tests call these, so each op gets the same standard set of checks.
"""

import re
from collections.abc import Callable, Sequence

import pytest
import torch
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode

import torchext.ops

# The device the suite runs on (the `device` fixture; property tests, which cannot take fixtures, use it directly).
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")

# One table: kernel output (fp32 math, rounded to the output dtype) vs the fp32 reference rounded the
# same way. bf16/fp16 allow about one rounding step of the output format; fp32 is torch's default.
TOLERANCES = {
    torch.float32: dict(atol=1e-5, rtol=1.3e-6),
    torch.bfloat16: dict(atol=1e-2, rtol=1.6e-2),
    torch.float16: dict(atol=1e-3, rtol=1e-3),
    torch.float64: dict(atol=1e-10, rtol=1e-8),
}
# Gradients reduced over every row (d_alpha, d_s_qk, ...) sum rows in another order than torch does:
# allow fp32 rounding growing with the number of rows (errors add like a random walk).
REDUCTION_RTOL = 2e-6


def assert_close(actual: Tensor, expected: Tensor, name: str, rows_summed: int = 1) -> None:
    tol = dict(TOLERANCES[expected.dtype])
    if rows_summed > 1:
        tol["rtol"] = max(tol["rtol"], REDUCTION_RTOL * rows_summed ** 0.5)
        tol["atol"] = tol["atol"] * rows_summed ** 0.5
    assert not actual.isnan().any(), f"{name}: NaN in the output (an element left unwritten?)"
    torch.testing.assert_close(actual, expected, **tol, msg=lambda m: f"{name}: {m}")


def _as_tuple(x):
    return x if isinstance(x, tuple) else (x,)


def check_against_reference(fn: Callable, reference: Callable, inputs: Sequence[Tensor],
                            reduced: Sequence[int] = (), rows: int = 1) -> None:
    """fn(*inputs) vs reference(*inputs): every output, and the gradient of every input that requires grad.

    Gradients of the reference come from autograd through it (the ground truth). ``reduced`` lists the
    input positions whose gradient is a sum over ``rows`` rows (looser fp32 bound, see REDUCTION_RTOL).
    """
    leaves = [[x.detach().clone().requires_grad_(x.requires_grad) for x in inputs] for _ in range(2)]
    outs = [_as_tuple(f(*xs)) for f, xs in zip((fn, reference), leaves)]
    for i, (out, ref) in enumerate(zip(*outs)):
        assert out.shape == ref.shape and out.dtype == ref.dtype, f"output {i}: {out.shape}/{out.dtype} vs " \
                                                                  f"{ref.shape}/{ref.dtype}"
        assert_close(out, ref, f"output {i}")
    wants_grad = [i for i, x in enumerate(inputs) if x.requires_grad]
    if not wants_grad:
        return
    grad_outputs = [torch.randn_like(o) for o in outs[1]]
    grads = [torch.autograd.grad(out, [xs[i] for i in wants_grad], grad_outputs)
             for out, xs in zip(outs, leaves)]
    for i, g, g_ref in zip(wants_grad, *grads):
        assert_close(g, g_ref, f"grad of input {i}", rows_summed=rows if i in reduced else 1)


def check_gradcheck(fn: Callable, inputs: Sequence[Tensor], fast_mode: bool = False) -> None:
    """fp64 torch.autograd.gradcheck of fn on tiny inputs (the kernels compute in fp64 for fp64 inputs).

    fast_mode checks random directional derivatives instead of one forward per input element: for ops whose
    forward is too slow under the interpreter to run that many times."""
    inputs = [x.detach().double().requires_grad_(x.requires_grad) for x in inputs]
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-5, rtol=1e-3, fast_mode=fast_mode)


def check_opcheck(op, args: Sequence) -> None:
    """torch.library.opcheck: schema, fake tensor, autograd registration, AOT dispatch."""
    torch.library.opcheck(op, tuple(args))


def check_compile(fn: Callable, inputs: Sequence[Tensor]) -> None:
    """torch.compile(fullgraph=True) gives the same forward and gradients as eager."""
    compiled = torch.compile(fn, fullgraph=True)
    check_against_reference(compiled, fn, inputs)


def check_raises(fn: Callable, error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=re.escape(match) if not match.startswith("re:") else match[3:]):
        fn()


# ---- host reads ----------------------------------------------------------------------------------------------------
# Ops that read tensor values back to the host: on a GPU each is a sync, and inside CUDA-graph capture an error.
_HOST_READS = {"aten._local_scalar_dense", "aten.nonzero", "aten.is_nonzero", "aten.equal", "aten.masked_select",
               "aten._unique2", "aten.unique_dim", "aten.unique_consecutive", "aten.bincount", "aten.histc"}
# What each torchext op runs on CUDA; an op whose GPU path is CUDA C++ runs the reference on CPU, which may read.
_KERNEL_KINDS = {op: kind for family in torchext.ops.FAMILIES.values() for op, kind in family.KERNELS.items()}
_CPU_KEYS = torch._C.DispatchKeySet(torch._C.DispatchKey.CPU)


def _host_read(func, args, kwargs) -> str | None:
    """Why running func(*args, **kwargs) on a GPU would read the host, or None."""
    name, overload = str(func.overloadpacket), func._overloadname
    if name in _HOST_READS:
        return "reads values"
    if name == "aten.repeat_interleave" and overload != "self_int" and kwargs.get("output_size") is None:
        return "sizes its output from the repeats' values"
    if name in ("aten.index", "aten.index_put", "aten.index_put_") and any(
            isinstance(i, Tensor) and i.dtype in (torch.bool, torch.uint8) for i in args[1]):
        return "indexes with a boolean mask (a nonzero inside)"
    if name == "aten.lift_fresh" and args[0].dim() > 0:
        return "copies a tensor built from host data (torch.tensor of a list)"
    return None


class NoHostReads(TorchDispatchMode):
    """Fails on any op that would read the host on a GPU (see _host_read), including inside the torchext ops
    whose GPU path is Triton (under the interpreter they run the same launchers as on a GPU). Ops whose GPU path is
    CUDA C++ are opaque: on CPU they run the reference, which may read; their launchers are checked by the gpu
    CUDA-graph tests."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        reason = _host_read(func, args, kwargs)
        if reason:
            raise AssertionError(f"host read: {func} {reason}")
        if func.namespace == "torchext" and _KERNEL_KINDS.get(func._opname.removesuffix("_backward")) == "triton":
            with self:  # below the Python key, so the op's own aten calls come back through this mode
                return func.redispatch(_CPU_KEYS, *args, **kwargs)
        return func(*args, **kwargs)


# ---- hypothesis, optional -----------------------------------------------------------------------------------------
# ./dev installs it; an offline GPU image may lack it. Without it the property tests skip (one line each) and the
# rest of their modules run.
try:
    from hypothesis import given, settings
    from hypothesis import strategies as st
except ImportError:
    class _NoStrategies:
        def __getattr__(self, name):
            return lambda *args, **kwargs: None

    st = _NoStrategies()

    def settings(**_):
        return lambda fn: fn

    def given(**_):
        def skipped_test(fn):
            def skipped():
                pytest.skip("hypothesis is not installed")
            skipped.__name__ = fn.__name__
            return skipped
        return skipped_test
