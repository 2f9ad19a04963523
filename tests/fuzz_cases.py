"""The fuzz suite's cases and its classifier (issue 12): every public op and nn module called with bad and extreme
inputs, each case saying what the input contract (README, Development) promises for it.

A case is an op (or module) name, a category, a builder of small inputs, the call, and the expectation:
``Raises`` (the exception type the contract names, with a message naming the op and the argument) or ``Matches``
(a value computed independently from the same inputs: the reference module torchext.reference.<family>, or an
equation written here; NaN positions included, a tolerance per dtype). ``classify`` runs one case on one path
(the reference, the Triton interpreter, CUDA) and names the outcome, one of OUTCOMES.

Only public APIs are used (torchext.ops, torchext.nn, torchext.reference, and torchext._backend.INTERPRET to pick
the path), and every attribute is looked up when a case runs, so bench/fuzz_report.py can judge an older checkout
with the same cases: whatever that checkout lacks shows as an unclear error of the cases that need it.

Cases written for the contract issue 12 lands (they fail on a checkout from before it):
- renormalize_ is sync-free by default: zero vectors stay zero and it returns the count of zero vectors;
- kv_quant_append_ is sync-free by default: a sequence that would overflow, or gets a count outside [0, n], is
  poisoned (lengths[b] = -1, nothing written) and its decode output is NaN;
- KV value offsets and scales are stored in the cache dtype, so an fp32 cache round-trips 7e4.
"""

import contextlib
import importlib.util
import math
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import Tensor

import torchext._backend
from torchext import nn as tnn
from torchext import ops
from torchext.reference import gram_iteration as ref_gram
from torchext.reference import int8_matmul as ref_int8
from torchext.reference import kde_attention as ref_kde
from torchext.reference import kronecker_attention as ref_kron
from torchext.reference import kv_quant as ref_kv
from torchext.reference import ngpt as ref_ngpt
from torchext.reference import tensor_attention as ref_ta

OUTCOMES = ("clear error", "right", "unclear error", "wrong", "accepted", "error on valid input")
PASSING = ("clear error", "right")

# Returned values against the expected ones: outputs rounded to their dtype from fp32 math on both sides, so a
# few ulps of the output format (fp32: kernels sum in another order than torch). Integers and bools: exact.
TOLERANCES = {
    torch.float64: dict(atol=1e-10, rtol=1e-8),
    torch.float32: dict(atol=2e-5, rtol=2e-5),
    torch.bfloat16: dict(atol=1e-2, rtol=1.6e-2),
    torch.float16: dict(atol=1e-3, rtol=1e-3),
    torch.complex128: dict(atol=1e-10, rtol=1e-8),
    torch.complex64: dict(atol=2e-5, rtol=2e-5),
}
EXACT = dict(atol=0, rtol=0)


def at_scale(factor: float) -> dict:
    """TOLERANCES for outputs `factor` times larger than usual (inputs of 1e30 or 1e-30): the same relative
    tolerance, the absolute one scaled (sums of +-1e30 terms cancel to values far below 1e30)."""
    return {dtype: dict(atol=tol["atol"] * factor, rtol=tol["rtol"]) for dtype, tol in TOLERANCES.items()}


# ---- paths ------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Path:
    """Where a case runs: the device its tensors are built on and whether CPU tensors take the Triton interpreter
    (torchext._backend.INTERPRET, read at call time) or the reference."""
    name: str
    device: str
    interpret: bool


REFERENCE = Path("reference", "cpu", False)
INTERPRETER = Path("interpreter", "cpu", True)
CUDA = Path("cuda", "cuda", False)


def available_paths() -> list[Path]:
    """The reference always; the interpreter where Triton is installed and TRITON_INTERPRET=1 was set before it was
    imported; CUDA where there is a GPU."""
    paths = [REFERENCE]
    if os.environ.get("TRITON_INTERPRET") == "1" and importlib.util.find_spec("triton") is not None:
        paths.append(INTERPRETER)
    if torch.cuda.is_available():
        paths.append(CUDA)
    return paths


@contextlib.contextmanager
def _on(path: Path):
    saved = torchext._backend.INTERPRET
    torchext._backend.INTERPRET = path.interpret
    try:
        yield
    finally:
        torchext._backend.INTERPRET = saved


@contextlib.contextmanager
def _seeded(seed: int):
    """torch's CPU generator at `seed` (inputs are drawn on the CPU), restored afterwards."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


# ---- cases and expectations -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Raises:
    """A clear error: `error` (what the README contract names), its message naming the op (one of `ops`, default
    the case's op) and `mentions` (the argument, or what about it is wrong)."""
    error: type[Exception]
    mentions: str
    ops: tuple[str, ...] = ()


@dataclass(frozen=True)
class Matches:
    """A value: equal to `expected(fresh inputs)` (NaN positions and shapes, dtypes, devices included), within
    TOLERANCES or the `tolerance` given for a dtype."""
    expected: Callable[[dict], object]
    tolerance: dict | None = None


@dataclass(frozen=True)
class Case:
    op: str  # the public name: "l2_normalize", "nn.Int8Linear"
    category: str
    name: str
    inputs: Callable[[str], dict]  # the arguments, drawn on a device
    run: Callable[[dict], object]  # the call under test
    expect: Raises | Matches
    interpret: bool = False  # also run it on the Triton interpreter (kept to a few dozen small cases per family)

    @property
    def id(self) -> str:
        return f"{self.op}[{self.category}: {self.name}]"


@dataclass(frozen=True)
class Outcome:
    kind: str  # one of OUTCOMES
    detail: str = ""


DROP = object()  # an edit that removes the argument (the call then takes its default)


@dataclass(frozen=True)
class From:
    """An edit computed from all the (valid, already edited) arguments, e.g. to build a tensor on their device."""
    build: Callable[[dict], object]


def _edited(valid: Callable[[str], dict], edits: dict) -> Callable[[str], dict]:
    """Inputs = valid(device) with each edit applied: a From builds the value from all the arguments, a callable
    takes the valid value and returns the new one (DROP removes it); anything else replaces it."""
    if not edits:
        return valid

    def inputs(device: str) -> dict:
        args = valid(device)
        for name, edit in edits.items():
            if isinstance(edit, From):
                args[name] = edit.build(args)
            else:
                args[name] = edit(args.get(name)) if callable(edit) else edit
            if args[name] is DROP:
                del args[name]
        return args

    return inputs


def accumulation(dtype: torch.dtype) -> torch.dtype:
    """The compute dtype of the package's precision policy: fp64 for fp64, fp32 for everything else."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def cotangent(out: Tensor) -> Tensor:
    """A fixed, deterministic dL/d(out) in the output's accumulation dtype."""
    return torch.arange(out.numel(), device=out.device, dtype=accumulation(out.dtype)).mul(0.7).cos() \
        .reshape(out.shape)


def with_grads(call: Callable[[dict], object], names: tuple[str, ...]) -> Callable[[dict], object]:
    """call, made a forward and backward: (outputs, gradients of the named inputs) with L = sum cotangent * out
    over the outputs that require grad. The same for the op and for its reference, whose gradients come from
    autograd through it (the ground truth)."""
    def run(args: dict):
        leaves = [args[name].detach().requires_grad_() for name in names]
        outputs = call({**args, **dict(zip(names, leaves))})
        outputs = tuple(outputs) if isinstance(outputs, (tuple, list)) else (outputs,)
        loss = sum((out.to(cotangent(out).dtype) * cotangent(out)).sum() for out in outputs
                   if isinstance(out, Tensor) and out.requires_grad)
        return tuple(out.detach() if isinstance(out, Tensor) else out for out in outputs), \
            torch.autograd.grad(loss, leaves, allow_unused=True)
    return run


@dataclass(frozen=True)
class Op:
    """One public op or module with valid inputs, from which its cases are written as edits of those inputs."""
    name: str
    valid: Callable[[str], dict]
    call: Callable[[dict], object]
    reference: Callable[[dict], object] | None = None
    names: tuple[str, ...] = ()  # what an error message may call it (default: its name)
    tolerance: dict | None = None

    def raises(self, category: str, name: str, error: type[Exception], mentions: str, interpret: bool = False,
               **edits) -> Case:
        return Case(self.name, category, name, _edited(self.valid, edits), self.call,
                    Raises(error, mentions, self.names), interpret)

    def matches(self, category: str, name: str, interpret: bool = False, expected: Callable | None = None,
                grad: tuple[str, ...] = (), tolerance: dict | None = None, **edits) -> Case:
        run, expected = self.call, expected or self.reference
        if grad:
            run, expected = with_grads(run, grad), with_grads(expected, grad)
        return Case(self.name, category, name, _edited(self.valid, edits), run,
                    Matches(expected, tolerance or self.tolerance), interpret)


# ---- the classifier ---------------------------------------------------------------------------------------------


def _said(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0][:240] if lines else ''}"


def _names(message: str, word: str) -> bool:
    return re.search(rf"(?<![\w.]){re.escape(word)}(?!\w)", message) is not None


def _judge_error(case: Case, error: Exception) -> Outcome:
    said, expect = _said(error), case.expect
    if not isinstance(expect, Raises):
        return Outcome("error on valid input", said)
    if not isinstance(error, expect.error):
        return Outcome("unclear error", f"{said} (the contract names {expect.error.__name__})")
    names = expect.ops or (case.op.removeprefix("nn."),)
    if not any(_names(str(error), name) for name in names):
        return Outcome("unclear error", f"{said} (does not name {' or '.join(names)})")
    if not _names(str(error), expect.mentions):
        return Outcome("unclear error", f"{said} (does not name {expect.mentions!r})")
    return Outcome("clear error", said)


def describe(value) -> str:
    if isinstance(value, Tensor):
        return f"tensor{list(value.shape)} {str(value.dtype).removeprefix('torch.')} on {value.device.type}"
    if isinstance(value, (tuple, list)):
        return "(" + ", ".join(describe(v) for v in value) + ")"
    return " ".join(repr(value).split())[:80]


def _compare_tensors(actual, expected: Tensor, tolerance: dict | None, where: str) -> str | None:
    if not isinstance(actual, Tensor):
        return f"{where}: got {describe(actual)}, expected {describe(expected)}"
    if actual.shape != expected.shape or actual.dtype != expected.dtype or actual.device.type != expected.device.type:
        return f"{where}: got {describe(actual)}, expected {describe(expected)}"
    if expected.device.type == "meta":
        return None
    tol = (tolerance or {}).get(expected.dtype) or TOLERANCES.get(expected.dtype, EXACT)
    try:
        torch.testing.assert_close(actual.detach(), expected.detach(), equal_nan=True, **tol)
    except AssertionError as error:
        return f"{where}: " + " ".join(line.strip() for line in str(error).strip().splitlines()[:4])
    return None


def compare(actual, expected, tolerance: dict | None = None, where: str = "output") -> str | None:
    """None when actual is expected (tensors within tolerance, NaN where expected has NaN), else what differs."""
    if isinstance(expected, Tensor):
        return _compare_tensors(actual, expected, tolerance, where)
    if isinstance(expected, (tuple, list)):
        if not isinstance(actual, (tuple, list)) or len(actual) != len(expected):
            return f"{where}: got {describe(actual)}, expected {describe(expected)}"
        fields = getattr(type(expected), "_fields", range(len(expected)))
        for field, a, e in zip(fields, actual, expected):
            problem = compare(a, e, tolerance, f"{where}.{field}" if isinstance(field, str) else f"{where}[{field}]")
            if problem:
                return problem
        return None
    if isinstance(expected, dict):
        if not isinstance(actual, dict) or set(actual) != set(expected):
            return f"{where}: got {describe(actual)}, expected {describe(expected)}"
        return next((p for key in expected if (p := compare(actual[key], expected[key], tolerance,
                                                             f"{where}[{key!r}]"))), None)
    if isinstance(expected, float) and isinstance(actual, (int, float)) and not isinstance(actual, bool):
        close = math.isclose(actual, expected, rel_tol=1e-6) or (math.isnan(actual) and math.isnan(expected))
        return None if close else f"{where}: got {actual!r}, expected {expected!r}"
    return None if type(actual) is type(expected) and actual == expected else \
        f"{where}: got {describe(actual)}, expected {describe(expected)}"


def classify(case: Case, path: Path) -> Outcome:
    """Run the case on the path: the outcome, with what was said or what differs."""
    with _on(path):
        try:
            with _seeded(0):
                args = case.inputs(path.device)
        except Exception as error:  # e.g. an older checkout without an API the inputs need
            return Outcome("unclear error", f"the case's inputs could not be built: {_said(error)}")
        try:
            with _seeded(1):
                value = case.run(args)
        except Exception as error:
            return _judge_error(case, error)
        if isinstance(case.expect, Raises):
            return Outcome("accepted", f"returned {describe(value)}; expected {case.expect.error.__name__} "
                                       f"naming {case.expect.mentions!r}")
        try:
            with _seeded(0):
                fresh = case.inputs(path.device)
            with _seeded(1):
                expected = case.expect.expected(fresh)
        except Exception as error:
            return Outcome("unclear error", f"returned {describe(value)}, but the expected value could not be "
                                            f"computed: {_said(error)}")
        problem = compare(value, expected, case.expect.tolerance)
        return Outcome("right") if problem is None else Outcome("wrong", problem)


# ---- input builders and edits -----------------------------------------------------------------------------------


def randn(*shape: int, device: str = "cpu", dtype: torch.dtype = torch.float32) -> Tensor:
    """Normal values drawn on the CPU (seeded per case), then moved: every path sees the same numbers."""
    return torch.randn(shape).to(device=device, dtype=dtype)


def cast(dtype: torch.dtype) -> Callable[[Tensor], Tensor]:
    return lambda t: t.to(dtype)


def as_list(t: Tensor) -> list:
    return t.tolist()


def on_meta(t: Tensor) -> Tensor:
    return t.to("meta")


def elsewhere(t: Tensor) -> Tensor:
    """The same tensor on another device than the path's: meta next to CPU tensors, the CPU next to CUDA ones."""
    return t.to("cpu" if t.is_cuda else "meta")


def transposed(t: Tensor) -> Tensor:
    """The same values with the last two dims stored column-major (last stride != 1)."""
    return t.transpose(-1, -2).contiguous().transpose(-1, -2)


def strided(t: Tensor) -> Tensor:
    """The same values with last-dim stride 2."""
    return torch.stack((t, t), -1).flatten(-2)[..., ::2]


def row_slice(t: Tensor) -> Tensor:
    """The same values as the first half of rows twice as wide (unit last stride, a wider row stride)."""
    return torch.cat((t, t), -1)[..., :t.shape[-1]]


def every_other(t: Tensor) -> Tensor:
    """The same values as every other entry of the first dim of a tensor twice as long."""
    return torch.stack((t, t), 1).flatten(0, 1)[::2]


def expanded(t: Tensor) -> Tensor:
    """The first entry of the first dim broadcast over it (stride 0)."""
    return t[:1].expand_as(t)


def unsqueezed(t: Tensor) -> Tensor:
    return t[None]


def sized(*shape: int, dtype: torch.dtype | None = None) -> Callable[[Tensor], Tensor]:
    """A normal tensor of another shape, on the valid one's device and dtype."""
    return lambda t: randn(*shape, device=t.device, dtype=dtype or t.dtype)


def setting(index, value) -> Callable[[Tensor], Tensor]:
    def edit(t: Tensor) -> Tensor:
        t = t.clone()
        t[index] = value
        return t
    return edit


def times(factor: float) -> Callable[[Tensor], Tensor]:
    return lambda t: t * factor


def peak(value: float, dtype: torch.dtype = torch.float32) -> Callable[[Tensor], Tensor]:
    """The values rescaled so that the largest magnitude is `value`, in dtype (near the top of its range)."""
    return lambda t: (t.double() / t.double().abs().amax() * value).to(dtype)


NAN, INF = float("nan"), float("inf")


# ---- nGPT ---------------------------------------------------------------------------------------------------------

EPS = ref_ngpt.DEFAULT_EPS


def unit_rows(x: Tensor, dim: int = -1, eps: float = EPS) -> Tensor:
    """The documented value x / max(||x||, eps) along dim, computed in fp64 (it neither overflows nor flushes)."""
    xd = x.double()
    return (xd / xd.norm(dim=dim, keepdim=True).clamp_min(eps)).to(x.dtype)


def unit_rows_of(a: dict) -> Tensor:
    return unit_rows(a["x"], a.get("dim", -1), a.get("eps", EPS))


L2 = Op("l2_normalize", lambda d: {"x": randn(3, 8, device=d)}, lambda a: ops.l2_normalize(**a),
        lambda a: ref_ngpt.l2_normalize(**a))
L2_CASES = [
    L2.raises("dtype", "x int64", TypeError, "x", x=cast(torch.int64)),
    L2.raises("dtype", "x bool", TypeError, "x", x=cast(torch.bool)),
    L2.raises("dtype", "x complex64", TypeError, "x", x=cast(torch.complex64)),
    L2.matches("dtype", "x float64", True, x=cast(torch.float64)),
    L2.matches("dtype", "x bfloat16", True, x=cast(torch.bfloat16)),
    L2.matches("dtype", "x float16", True, x=cast(torch.float16)),
    L2.raises("python type", "x a list", TypeError, "x", x=as_list),
    L2.raises("python type", "dim a float", TypeError, "dim", dim=1.0),
    L2.raises("python type", "dim a bool", TypeError, "dim", dim=True),
    L2.raises("python type", "dim a tensor", TypeError, "dim", dim=torch.tensor(1)),
    L2.matches("device", "x on meta", x=on_meta),
    L2.matches("shape", "no rows", True, x=sized(0, 8)),
    L2.matches("shape", "empty rows", x=sized(3, 0)),
    L2.matches("shape", "one element", True, x=sized(1, 1)),
    L2.matches("shape", "3-D, rows of 37", True, x=sized(2, 3, 37)),
    L2.matches("ndim", "1-D", x=sized(8)),
    L2.raises("ndim", "0-D", ValueError, "x", x=sized()),
    L2.raises("ndim", "dim 2 of a 2-D x", ValueError, "dim", dim=2),
    L2.raises("ndim", "dim -3 of a 2-D x", ValueError, "dim", dim=-3),
    L2.matches("ndim", "dim 0", True, dim=0),
    L2.raises("layout", "transposed", ValueError, "x", x=transposed),
    L2.raises("layout", "last-dim stride 2", ValueError, "x", x=strided),
    L2.matches("layout", "transposed, normalised along its unit-stride dim", True, x=lambda t: t.T, dim=0),
    L2.matches("layout", "a slice of wider rows", True, x=row_slice),
    L2.matches("layout", "every other row", True, x=every_other),
    L2.matches("layout", "one row expanded", True, x=expanded),
    L2.matches("nan", "a NaN gives a NaN row", True, x=setting((1, 2), NAN)),
    L2.matches("nan", "all NaN", x=times(NAN)),
    L2.matches("inf", "an Inf row", True, x=setting((1, 2), INF)),
    L2.matches("inf", "a -Inf row", x=setting((2, 0), -INF)),
    L2.matches("magnitude", "rows of 1e30 are unit rows", True, expected=unit_rows_of, x=times(1e30)),
    L2.matches("magnitude", "fp32 peak 3e38 gives unit rows", True, expected=unit_rows_of, x=peak(3e38)),
    L2.matches("magnitude", "rows of 1e-30 give x / eps", True, expected=unit_rows_of, x=times(1e-30)),
    L2.raises("hyperparameter", "eps below float32 tiny", ValueError, "eps", True, eps=1e-44),
    L2.matches("magnitude", "bf16 rows of 1e30 are unit rows", True, expected=unit_rows_of,
               x=lambda t: (t * 1e30).bfloat16()),
    L2.matches("magnitude", "fp16 peak 6e4 gives unit rows", True, expected=unit_rows_of,
               x=peak(6e4, torch.float16)),
    L2.matches("magnitude", "a zero row stays zero", True, x=setting(1, 0.0)),
    L2.raises("hyperparameter", "eps 0", ValueError, "eps", eps=0.0),
    L2.raises("hyperparameter", "eps -1", ValueError, "eps", eps=-1.0),
    L2.raises("hyperparameter", "eps NaN", ValueError, "eps", eps=NAN),
    L2.matches("hyperparameter", "eps 1e30", True, eps=1e30),
    L2.matches("grad", "fp32", True, grad=("x",)),
    L2.matches("grad", "bf16", True, grad=("x",), x=cast(torch.bfloat16)),
    L2.matches("grad", "fp64", grad=("x",), x=cast(torch.float64)),
    L2.matches("grad", "a zero row", True, grad=("x",), x=setting(1, 0.0)),
    L2.matches("grad", "a NaN row", True, grad=("x",), x=setting((1, 2), NAN)),
    L2.matches("grad", "rows of 1e30", True, grad=("x",), x=times(1e30)),
    L2.matches("grad", "along dim 0", grad=("x",), dim=0),
]


def _hypersphere_valid(device: str) -> dict:
    return {"h": unit_rows(randn(3, 8, device=device)), "h_branch": randn(3, 8, device=device),
            "alpha": randn(8, device=device) * 0.1}


def _all(edit: Callable, *names: str) -> dict:
    """The same edit for each named argument (as keyword edits)."""
    return {name: edit for name in names}


HS = Op("hypersphere_update", _hypersphere_valid, lambda a: ops.hypersphere_update(**a),
        lambda a: ref_ngpt.hypersphere_update(**a))
HS_TENSORS = ("h", "h_branch", "alpha")
HS_CASES = [
    HS.raises("dtype", "h int64", TypeError, "h", h=cast(torch.int64)),
    HS.raises("dtype", "h_branch int32", TypeError, "h_branch", h_branch=cast(torch.int32)),
    HS.raises("dtype", "alpha bool", TypeError, "alpha", alpha=cast(torch.bool)),
    HS.matches("dtype", "float64", True, **_all(cast(torch.float64), *HS_TENSORS)),
    HS.matches("dtype", "bfloat16 h and h_branch", True, **_all(cast(torch.bfloat16), "h", "h_branch")),
    HS.matches("dtype", "h_branch bf16 next to fp32 h", True, h_branch=cast(torch.bfloat16)),
    HS.matches("dtype", "alpha fp64 next to fp32 h", alpha=cast(torch.float64)),
    HS.raises("python type", "h a list", TypeError, "h", h=as_list),
    HS.raises("python type", "alpha a list", TypeError, "alpha", alpha=as_list),
    HS.raises("device", "alpha elsewhere", ValueError, "alpha", alpha=elsewhere),
    HS.matches("device", "all on meta", **_all(on_meta, *HS_TENSORS)),
    HS.matches("shape", "no rows", True, h=sized(0, 8), h_branch=sized(0, 8)),
    HS.matches("shape", "one element", True, h=sized(1, 1), h_branch=sized(1, 1), alpha=sized(1)),
    HS.matches("shape", "3-D, rows of 37", True, h=sized(2, 3, 37), h_branch=sized(2, 3, 37), alpha=sized(37)),
    HS.matches("shape", "empty rows", h=sized(3, 0), h_branch=sized(3, 0), alpha=sized(0)),
    HS.raises("ndim", "alpha [1, d]", ValueError, "alpha", alpha=unsqueezed),
    HS.raises("ndim", "h_branch [3, 1, 8]", ValueError, "h_branch", h_branch=lambda t: t[:, None]),
    HS.raises("layout", "h transposed", ValueError, "h", h=transposed),
    HS.raises("layout", "h_branch last-dim stride 2", ValueError, "h_branch", h_branch=strided),
    HS.matches("layout", "h a slice of wider rows", True, h=row_slice),
    HS.matches("layout", "alpha every other element", True, alpha=every_other),
    HS.matches("layout", "h one row expanded", h=expanded),
    HS.matches("nan", "NaN in h", True, h=setting((1, 2), NAN)),
    HS.matches("nan", "NaN in h_branch", True, h_branch=setting((0, 5), NAN)),
    HS.matches("nan", "NaN in alpha", True, alpha=setting(3, NAN)),
    HS.matches("inf", "Inf in h_branch", True, h_branch=setting((2, 1), INF)),
    HS.matches("magnitude", "h_branch of 1e30", True, h_branch=times(1e30)),
    HS.matches("magnitude", "h_branch of 1e-30", True, h_branch=times(1e-30)),
    HS.matches("magnitude", "alpha of 1e30", alpha=times(1e30)),
    HS.raises("hyperparameter", "eps 0", ValueError, "eps", eps=0.0),
    HS.raises("hyperparameter", "eps NaN", ValueError, "eps", eps=NAN),
    HS.matches("grad", "fp32", True, grad=HS_TENSORS),
    HS.matches("grad", "bf16", True, grad=HS_TENSORS, **_all(cast(torch.bfloat16), "h", "h_branch")),
    HS.matches("grad", "NaN in h_branch", True, grad=HS_TENSORS, h_branch=setting((0, 5), NAN)),
]


def _qk_valid(device: str) -> dict:
    cos, sin = ref_ngpt.rope_cos_sin(4, 8)
    return {"q": randn(1, 3, 2, 8, device=device), "k": randn(1, 3, 2, 8, device=device), "cos": cos.to(device),
            "sin": sin.to(device), "s_qk": 1 + 0.1 * randn(8, device=device)}


def _qk_reference(a: dict):
    """The reference on the first T rows of the tables, in the kernels' compute dtype (fp64 for fp64 q)."""
    q, T = a["q"], a["q"].shape[1]
    compute = accumulation(q.dtype)
    return ref_ngpt.qk_norm_rope(q, a["k"], a["cos"][:T].to(compute), a["sin"][:T].to(compute), a["s_qk"],
                                 a.get("eps", EPS))


QK = Op("qk_norm_rope", _qk_valid, lambda a: ops.qk_norm_rope(**a), _qk_reference)
QK_TENSORS = ("q", "k", "cos", "sin", "s_qk")
QK_CASES = [
    QK.raises("dtype", "q int64", TypeError, "q", q=cast(torch.int64)),
    QK.raises("dtype", "cos int32", TypeError, "cos", cos=cast(torch.int32)),
    QK.raises("dtype", "s_qk bool", TypeError, "s_qk", s_qk=cast(torch.bool)),
    QK.matches("dtype", "float64", True, **_all(cast(torch.float64), *QK_TENSORS)),
    QK.matches("dtype", "bfloat16 q and k", True, **_all(cast(torch.bfloat16), "q", "k")),
    QK.matches("dtype", "float16 q and k", True, **_all(cast(torch.float16), "q", "k")),
    QK.matches("dtype", "fp64 tables next to fp32 q", cos=cast(torch.float64), sin=cast(torch.float64)),
    QK.raises("python type", "q a list", TypeError, "q", q=as_list),
    QK.raises("python type", "cos a list", TypeError, "cos", cos=as_list),
    QK.raises("device", "cos elsewhere", ValueError, "cos", cos=elsewhere),
    QK.matches("device", "all on meta", **_all(on_meta, *QK_TENSORS)),
    QK.matches("shape", "no positions", True, q=sized(1, 0, 2, 8), k=sized(1, 0, 2, 8)),
    QK.matches("shape", "one position", True, q=sized(1, 1, 2, 8), k=sized(1, 1, 2, 8)),
    QK.matches("shape", "head dim 2", q=sized(1, 3, 2, 2), k=sized(1, 3, 2, 2), cos=sized(4, 1), sin=sized(4, 1),
               s_qk=sized(2)),
    QK.matches("shape", "GQA: one k head", True, k=sized(1, 3, 1, 8)),
    QK.matches("shape", "per-head s_qk", True, s_qk=sized(2, 8)),
    QK.raises("ndim", "q 3-D", ValueError, "q", q=lambda t: t[0]),
    QK.raises("ndim", "cos 1-D", ValueError, "cos", cos=lambda t: t[0]),
    QK.raises("shape", "s_qk for 3 heads", ValueError, "s_qk", s_qk=sized(3, 8)),
    QK.raises("shape", "odd head dim", ValueError, "head_dim", q=sized(1, 3, 2, 7), k=sized(1, 3, 2, 7),
              cos=sized(4, 3), sin=sized(4, 3), s_qk=sized(7)),
    QK.raises("shape", "tables shorter than T", ValueError, "cos", cos=lambda t: t[:2]),
    QK.raises("shape", "k of another batch", ValueError, "k", k=sized(2, 3, 2, 8)),
    QK.raises("shape", "per-head s_qk with GQA", ValueError, "s_qk", k=sized(1, 3, 1, 8), s_qk=sized(2, 8)),
    QK.matches("layout", "q a view of a fused projection", True, q=row_slice),
    QK.matches("layout", "q with T and H strides swapped", True, q=lambda t: t.transpose(1, 2).contiguous()
               .transpose(1, 2)),
    QK.raises("layout", "q last-dim stride 2", ValueError, "q", q=strided),
    QK.matches("layout", "cos transposed", cos=transposed),
    QK.matches("nan", "NaN in q", True, q=setting((0, 1, 1, 3), NAN)),
    QK.matches("nan", "NaN in the tables", True, cos=setting((2, 1), NAN)),
    QK.matches("inf", "Inf in k", True, k=setting((0, 2, 0, 0), INF)),
    QK.matches("magnitude", "q of 1e30", True, q=times(1e30)),
    QK.matches("magnitude", "k of 1e-30", True, k=times(1e-30)),
    QK.matches("magnitude", "s_qk of 1e30", s_qk=times(1e30)),
    QK.raises("hyperparameter", "eps 0", ValueError, "eps", eps=0.0),
    QK.matches("grad", "fp32", True, grad=("q", "k", "s_qk")),
    QK.matches("grad", "bf16", True, grad=("q", "k", "s_qk"), **_all(cast(torch.bfloat16), "q", "k")),
    QK.matches("grad", "per-head s_qk", True, grad=("q", "k", "s_qk"), s_qk=sized(2, 8)),
    QK.matches("grad", "GQA", grad=("q", "k", "s_qk"), k=sized(1, 3, 1, 8)),
]


def _swiglu_valid(device: str) -> dict:
    return {"u": randn(3, 8, device=device), "v": randn(3, 8, device=device), "s_u": randn(8, device=device),
            "s_v": randn(8, device=device), "d_model": 4}


SWIGLU = Op("scaled_swiglu", _swiglu_valid, lambda a: ops.scaled_swiglu(**a), lambda a: ref_ngpt.scaled_swiglu(**a))
SWIGLU_TENSORS = ("u", "v", "s_u", "s_v")
SWIGLU_CASES = [
    SWIGLU.raises("dtype", "u int64", TypeError, "u", u=cast(torch.int64)),
    SWIGLU.raises("dtype", "s_v bool", TypeError, "s_v", s_v=cast(torch.bool)),
    SWIGLU.matches("dtype", "float64", True, **_all(cast(torch.float64), *SWIGLU_TENSORS)),
    SWIGLU.matches("dtype", "bfloat16 u and v", True, **_all(cast(torch.bfloat16), "u", "v")),
    SWIGLU.matches("dtype", "float16 u and v", True, **_all(cast(torch.float16), "u", "v")),
    SWIGLU.matches("dtype", "s_u fp64 next to fp32 u", s_u=cast(torch.float64)),
    SWIGLU.raises("python type", "u a list", TypeError, "u", u=as_list),
    SWIGLU.raises("python type", "d_model a float", TypeError, "d_model", d_model=4.0),
    SWIGLU.raises("python type", "d_model a bool", TypeError, "d_model", d_model=True),
    SWIGLU.raises("python type", "d_model a tensor", TypeError, "d_model", d_model=torch.tensor(4)),
    SWIGLU.raises("hyperparameter", "d_model 0", ValueError, "d_model", d_model=0),
    SWIGLU.raises("hyperparameter", "d_model -3", ValueError, "d_model", d_model=-3),
    SWIGLU.raises("device", "s_u elsewhere", ValueError, "s_u", s_u=elsewhere),
    SWIGLU.matches("device", "all on meta", **_all(on_meta, *SWIGLU_TENSORS)),
    SWIGLU.matches("shape", "no rows", True, u=sized(0, 8), v=sized(0, 8)),
    SWIGLU.matches("shape", "one element", True, u=sized(1, 1), v=sized(1, 1), s_u=sized(1), s_v=sized(1)),
    SWIGLU.matches("shape", "3-D, rows of 37", True, u=sized(2, 3, 37), v=sized(2, 3, 37), s_u=sized(37),
                   s_v=sized(37)),
    SWIGLU.raises("shape", "v of another width", ValueError, "v", v=sized(3, 9)),
    SWIGLU.raises("ndim", "s_u [1, d]", ValueError, "s_u", s_u=unsqueezed),
    SWIGLU.matches("layout", "u and v halves of one projection", True, u=row_slice, v=row_slice),
    SWIGLU.raises("layout", "v transposed", ValueError, "v", v=transposed),
    SWIGLU.matches("layout", "u one row expanded", True, u=expanded),
    SWIGLU.matches("nan", "NaN in u", True, u=setting((1, 2), NAN)),
    SWIGLU.matches("nan", "NaN in v", True, v=setting((0, 3), NAN)),
    SWIGLU.matches("inf", "+Inf in v", True, v=setting((0, 3), INF)),
    SWIGLU.matches("inf", "-Inf in v", True, v=setting((2, 6), -INF)),
    SWIGLU.matches("magnitude", "v of 1e30 (outputs overflow to Inf)", True, v=times(1e30)),
    SWIGLU.matches("magnitude", "u of 1e30", True, u=times(1e30), tolerance=at_scale(1e+30)),
    SWIGLU.matches("magnitude", "u and v of 1e-30", True, u=times(1e-30), v=times(1e-30), tolerance=at_scale(1e-60)),
    SWIGLU.matches("grad", "fp32", True, grad=SWIGLU_TENSORS),
    SWIGLU.matches("grad", "bf16", True, grad=SWIGLU_TENSORS, **_all(cast(torch.bfloat16), "u", "v")),
]


def _renormalized(a: dict) -> list[Tensor]:
    """The tensors renormalize_ updated in place."""
    ops.renormalize_(**a)
    return a["tensors"]


def _renormalized_reference(a: dict) -> list[Tensor]:
    tensors = [t.clone() for t in a["tensors"]]
    ref_ngpt.renormalize_(tensors, a["dims"], a.get("eps", EPS))
    return tensors


def _renormalized_unit(a: dict) -> list[Tensor]:
    return [unit_rows(t, dim, a.get("eps", EPS)) for t, dim in zip(a["tensors"], a["dims"])]


def _renormalize_valid(device: str) -> dict:
    return {"tensors": [randn(4, 6, device=device), randn(3, 5, 2, device=device)], "dims": [1, 1]}


def first(edit: Callable[[Tensor], Tensor]) -> Callable[[list], list]:
    """An edit of the first tensor of a list."""
    return lambda tensors: [edit(tensors[0]), *tensors[1:]]


RENORM = Op("renormalize_", _renormalize_valid, _renormalized, _renormalized_reference)
RENORM_COUNTS = Op("renormalize_", _renormalize_valid, lambda a: ops.renormalize_(**a),
                   lambda a: ref_ngpt.renormalize_([t.clone() for t in a["tensors"]], a["dims"], a.get("eps", EPS)))
RENORM_NO_GRAD = replace(RENORM, call=torch.no_grad()(_renormalized))
RENORM_CASES = [
    RENORM.raises("dtype", "an int64 tensor", TypeError, "tensors[0]", tensors=first(cast(torch.int64))),
    RENORM.raises("dtype", "a bool tensor", TypeError, "tensors[1]", tensors=lambda ts: [ts[0], ts[1].bool()]),
    RENORM.matches("dtype", "float64", tensors=lambda ts: [t.double() for t in ts]),
    RENORM.matches("dtype", "bfloat16", tensors=lambda ts: [t.bfloat16() for t in ts]),
    RENORM.matches("dtype", "float16 next to float32", tensors=first(cast(torch.float16))),
    RENORM.raises("python type", "one tensor, not a list", TypeError, "tensors", tensors=lambda ts: ts[0],
                  dims=[1]),
    RENORM.raises("python type", "a list inside the list", TypeError, "tensors[0]", tensors=first(as_list)),
    RENORM.raises("python type", "dims of floats", TypeError, "dims", dims=[1.0, 1.0]),
    RENORM.raises("python type", "dims of bools", TypeError, "dims", dims=[True, True]),
    RENORM.raises("device", "tensors on two devices", ValueError, "tensors",
                  tensors=lambda ts: [ts[0], elsewhere(ts[1])]),
    RENORM.matches("shape", "no tensors", tensors=[], dims=[]),
    RENORM.matches("shape", "no rows", tensors=first(sized(0, 6))),
    RENORM.matches("shape", "rows of one element", tensors=first(sized(4, 1))),
    RENORM.raises("ndim", "a 0-D tensor", ValueError, "tensors[0]", tensors=first(sized())),
    RENORM.raises("ndim", "dim 2 of a 2-D tensor", ValueError, "dims[0]", dims=[2, 1]),
    RENORM.raises("ndim", "dim -3 of a 2-D tensor", ValueError, "dims[0]", dims=[-3, 1]),
    RENORM.raises("shape", "fewer dims than tensors", ValueError, "dims", dims=[1]),
    RENORM.matches("ndim", "columns (dim 0) and the middle dim", dims=[0, 1]),
    RENORM.raises("layout", "transposed", ValueError, "tensors[0]", tensors=first(transposed)),
    RENORM.raises("layout", "a slice of wider rows", ValueError, "tensors[0]", tensors=first(row_slice)),
    RENORM.matches("nan", "a NaN row stays NaN", tensors=first(setting((1, 2), NAN))),
    RENORM.matches("inf", "an Inf row", tensors=first(setting((1, 2), INF))),
    RENORM.matches("magnitude", "rows of 1e30 are unit rows", expected=_renormalized_unit,
                   tensors=lambda ts: [t * 1e30 for t in ts]),
    RENORM.matches("magnitude", "rows of 1e-30 give x / eps", expected=_renormalized_unit,
                   tensors=lambda ts: [t * 1e-30 for t in ts]),
    RENORM.matches("magnitude", "fp16 peak 6e4 gives unit rows", expected=_renormalized_unit,
                   tensors=first(peak(6e4, torch.float16))),
    RENORM.matches("magnitude", "a zero row stays zero (sync-free default)", tensors=first(setting(1, 0.0))),
    RENORM_COUNTS.matches("magnitude", "returns the zero-vector counts", tensors=first(setting((slice(1, 3),), 0.0))),
    RENORM_COUNTS.matches("valid", "returns zero counts when every vector has a direction"),
    RENORM.raises("magnitude", "a zero row with check=True", ValueError, "tensors", check=True,
                  tensors=first(setting(1, 0.0))),
    RENORM.raises("hyperparameter", "eps 0", ValueError, "eps", eps=0.0),
    RENORM.raises("hyperparameter", "eps NaN", ValueError, "eps", eps=NAN),
    RENORM_NO_GRAD.matches("grad", "parameters under no_grad", tensors=lambda ts: [torch.nn.Parameter(t) for t in ts]),
]


# ---- nGPT modules -------------------------------------------------------------------------------------------------


def _attention_reference(m, h: Tensor) -> Tensor:
    """NormalizedAttention from the reference: fused QKV, RoPE -> Norm -> * s_qk, SDPA at scale sqrt(d_k), out."""
    B, T, d_model = h.shape
    q, k, v = (h @ m.qkv.weight.T).view(B, T, 3, m.n_heads, m.head_dim).unbind(2)
    q, k = ref_ngpt.qk_norm_rope(q, k, m.rope_cos[:T], m.rope_sin[:T], m.s_qk().view(m.n_heads, m.head_dim))
    y = F.scaled_dot_product_attention(q, k, v.transpose(1, 2), is_causal=m.causal, scale=math.sqrt(m.head_dim))
    return y.transpose(1, 2).reshape(B, T, d_model) @ m.out.weight.T


def _swiglu_reference(m, h: Tensor) -> Tensor:
    u, v = (h @ m.up.weight.T).chunk(2, dim=-1)
    return ref_ngpt.scaled_swiglu(u, v, m.s_u(), m.s_v(), m.d_model) @ m.down.weight.T


def _block_reference(m, h: Tensor) -> Tensor:
    h = ref_ngpt.hypersphere_update(h, _attention_reference(m.attn, h), m.attn_residual.alpha())
    return ref_ngpt.hypersphere_update(h, _swiglu_reference(m.mlp, h), m.mlp_residual.alpha())


def _ngpt_reference(a: dict) -> tuple:
    m, idx = a["module"], a["idx"]
    h = m.embed.weight[idx]
    for block in m.blocks:
        h = _block_reference(block, h)
    logits = (h @ m.head.weight.T).float() * m.s_z()
    targets = a.get("targets")
    return logits, None if targets is None else F.cross_entropy(logits.flatten(0, 1), targets.flatten())


def _tiny_config(**changes):
    return tnn.NGPTConfig(**{**dict(vocab_size=11, d_model=8, n_layers=1, n_heads=2, max_seq_len=4), **changes})


def _module_valid(make: Callable, **inputs: Callable[[str], Tensor]) -> Callable[[str], dict]:
    """{"module": make(device), name: inputs[name](device)...}."""
    return lambda device: {"module": make(device), **{name: build(device) for name, build in inputs.items()}}


def _forward(*names: str) -> Callable[[dict], object]:
    return lambda a: a["module"](*(a[name] for name in names if name in a))


def _weight_of(make: Callable) -> Callable[[dict], Tensor]:
    return lambda a: make(**a).weight.detach()


def _unit_weight_of(make: Callable, dim_key: str | None = None, dim: int = 1) -> Callable[[dict], Tensor]:
    """The documented weight: the module's own weight, unit along its norm dim."""
    return lambda a: unit_rows(make(**a).weight.detach(), a.get(dim_key, dim) if dim_key else dim)


SCALED = Op("nn.ScaledVector", lambda d: {"size": 4, "init": 0.5, "scale": 2.0, "device": d},
            lambda a: tnn.ScaledVector(**a)().detach(),
            lambda a: torch.full((a["size"],), a["init"], device=a["device"]))
LINEAR_N = Op("nn.NormalizedLinear", lambda d: {"in_features": 6, "out_features": 4, "device": d},
              _weight_of(lambda **a: tnn.NormalizedLinear(**a)),
              _unit_weight_of(lambda **a: tnn.NormalizedLinear(**a), "norm_dim"))
EMBED_N = Op("nn.NormalizedEmbedding", lambda d: {"num_embeddings": 10, "embedding_dim": 6, "device": d},
             _weight_of(lambda **a: tnn.NormalizedEmbedding(**a)),
             _unit_weight_of(lambda **a: tnn.NormalizedEmbedding(**a)))
RESIDUAL = Op("nn.HypersphereResidual",
              _module_valid(lambda d: tnn.HypersphereResidual(8, device=d),
                            h=lambda d: unit_rows(randn(3, 8, device=d)), h_branch=lambda d: randn(3, 8, device=d)),
              _forward("h", "h_branch"),
              lambda a: ref_ngpt.hypersphere_update(a["h"], a["h_branch"], a["module"].alpha()),
              names=("HypersphereResidual", "hypersphere_update"))
ATTENTION_N = Op("nn.NormalizedAttention",
                 _module_valid(lambda d: tnn.NormalizedAttention(8, 2, max_seq_len=4, device=d),
                               h=lambda d: unit_rows(randn(1, 3, 8, device=d))),
                 _forward("h"), lambda a: _attention_reference(a["module"], a["h"]),
                 names=("NormalizedAttention", "qk_norm_rope"))
ATTENTION_N_INIT = Op("nn.NormalizedAttention", lambda d: {"d_model": 8, "n_heads": 2, "device": d},
                      lambda a: tnn.NormalizedAttention(**a))
SWIGLU_N = Op("nn.NormalizedSwiGLU",
              _module_valid(lambda d: tnn.NormalizedSwiGLU(4, 8, device=d),
                            h=lambda d: unit_rows(randn(3, 4, device=d))),
              _forward("h"), lambda a: _swiglu_reference(a["module"], a["h"]),
              names=("NormalizedSwiGLU", "scaled_swiglu"))
BLOCK_N = Op("nn.NGPTBlock",
             _module_valid(lambda d: tnn.NGPTBlock(_tiny_config(), device=d),
                           h=lambda d: unit_rows(randn(1, 3, 8, device=d))),
             _forward("h"), lambda a: _block_reference(a["module"], a["h"]),
             names=("NGPTBlock", "NormalizedAttention"))
NGPT_MODEL = Op("nn.NGPT",
                _module_valid(lambda d: tnn.NGPT(_tiny_config(), device=d),
                              idx=lambda d: torch.randint(0, 11, (1, 3)).to(d)),
                _forward("idx", "targets"), _ngpt_reference, names=("NGPT", "NormalizedAttention"))
NGPT_INIT = Op("nn.NGPT", lambda d: {"config": _tiny_config(), "device": d}, lambda a: tnn.NGPT(**a),
               names=("NGPT", "NormalizedAttention"))


def _scaled_linear(device: str) -> torch.nn.Module:
    """A NormalizedLinear whose rows left the sphere (as after an optimizer step)."""
    layer = tnn.NormalizedLinear(6, 4, device=device)
    with torch.no_grad():
        layer.weight.mul_(3).add_(0.1)
    return layer


def _renormalized_model(a: dict) -> Tensor:
    tnn.renormalize_model_(**a)
    return a["model"].weight.detach()


def _stepped(a: dict) -> Tensor:
    """One SGD step of a NormalizedLinear with renormalize_after_step hooked in: the weight after it."""
    model = a["model"]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    tnn.renormalize_after_step(optimizer, model, **{k: v for k, v in a.items() if k not in ("model", "x")})
    model(a["x"]).square().sum().backward()
    optimizer.step()
    return model.weight.detach()


def _stepped_reference(a: dict) -> Tensor:
    w = a["model"].weight.detach().clone().requires_grad_()
    (a["x"] @ w.T).square().sum().backward()
    return unit_rows(w.detach() - 0.5 * w.grad)


RENORM_MODEL = Op("nn.renormalize_model_", lambda d: {"model": _scaled_linear(d)}, _renormalized_model,
                  lambda a: unit_rows(a["model"].weight.detach()), names=("renormalize_",))
def _checked_after_step(a: dict) -> None:
    """renormalize_after_step's hook, checked after one SGD step."""
    model = a["model"]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    hook = tnn.renormalize_after_step(optimizer, model)
    model(a["x"]).square().sum().backward()
    optimizer.step()
    hook.check()


RENORM_STEP = Op("nn.renormalize_after_step",
                 lambda d: {"model": tnn.NormalizedLinear(6, 4, device=d), "x": randn(3, 6, device=d)},
                 _stepped, _stepped_reference, names=("renormalize_", "renormalize_after_step"))
RENORM_CHECK = Op("nn.RenormalizeAfterStep", RENORM_STEP.valid, _checked_after_step, lambda a: None,
                  names=("renormalize_after_step", "RenormalizeAfterStep"))
RENORM_COUNTS_MODEL = replace(RENORM_MODEL, call=lambda a: tnn.renormalize_model_(**a),
                              reference=lambda a: torch.tensor([1], dtype=torch.int32, device=a["model"].weight.device))


def _zero_first_row(model: torch.nn.Module) -> torch.nn.Module:
    with torch.no_grad():
        model.weight[0] = 0
    return model


NGPT_MODULE_CASES = [
    SCALED.matches("valid", "init 0.5, scale 2"),
    SCALED.matches("shape", "size 0", size=0),
    SCALED.raises("hyperparameter", "scale 0", ValueError, "scale", scale=0.0),
    SCALED.raises("hyperparameter", "size -1", ValueError, "size", size=-1),
    SCALED.raises("python type", "size a float", TypeError, "size", size=4.0),
    LINEAR_N.matches("valid", "rows unit (norm_dim 1)"),
    LINEAR_N.matches("hyperparameter", "columns unit (norm_dim 0)", norm_dim=0),
    LINEAR_N.raises("hyperparameter", "norm_dim 2", ValueError, "norm_dim", norm_dim=2),
    LINEAR_N.raises("hyperparameter", "norm_dim -1", ValueError, "norm_dim", norm_dim=-1),
    LINEAR_N.matches("shape", "in_features 0: an empty weight", in_features=0),
    LINEAR_N.matches("dtype", "float64", dtype=torch.float64),
    LINEAR_N.matches("dtype", "bfloat16", dtype=torch.bfloat16),
    EMBED_N.matches("valid", "rows unit"),
    EMBED_N.matches("dtype", "float16", dtype=torch.float16),
    RESIDUAL.matches("valid", "forward", True),
    RESIDUAL.matches("dtype", "bfloat16", True, h=cast(torch.bfloat16), h_branch=cast(torch.bfloat16)),
    RESIDUAL.raises("dtype", "h int64", TypeError, "h", h=cast(torch.int64)),
    RESIDUAL.raises("shape", "h_branch of another width", ValueError, "h_branch", h_branch=sized(3, 7)),
    RESIDUAL.matches("nan", "NaN in h_branch", True, h_branch=setting((1, 1), NAN)),
    RESIDUAL.matches("grad", "h and h_branch", True, grad=("h", "h_branch")),
    ATTENTION_N.matches("valid", "forward", True),
    ATTENTION_N.matches("shape", "one position", True, h=sized(1, 1, 8)),
    ATTENTION_N.matches("shape", "batch 0", h=sized(0, 3, 8)),
    ATTENTION_N.raises("shape", "T past max_seq_len", ValueError, "max_seq_len", h=sized(1, 5, 8)),
    ATTENTION_N.raises("ndim", "h 2-D", ValueError, "h", h=lambda t: t[0]),
    ATTENTION_N.raises("shape", "h of another width", ValueError, "h", h=sized(1, 3, 6)),
    ATTENTION_N.matches("grad", "h", True, grad=("h",)),
    ATTENTION_N_INIT.raises("hyperparameter", "d_model 6 into 4 heads", ValueError, "d_model", d_model=6,
                            n_heads=4),
    ATTENTION_N_INIT.raises("hyperparameter", "odd head dim", ValueError, "d_model", d_model=6, n_heads=2),
    SWIGLU_N.matches("valid", "forward", True),
    SWIGLU_N.matches("shape", "no rows", h=sized(0, 4)),
    SWIGLU_N.matches("grad", "h", True, grad=("h",)),
    BLOCK_N.matches("valid", "forward", True),
    BLOCK_N.matches("grad", "h", grad=("h",)),
    NGPT_MODEL.matches("valid", "logits", True),
    NGPT_MODEL.matches("valid", "logits and loss",
                       targets=From(lambda a: torch.tensor([[1, 2, 3]], device=a["idx"].device))),
    NGPT_MODEL.raises("shape", "T past max_seq_len", ValueError, "max_seq_len",
                      idx=lambda t: torch.zeros(1, 5, dtype=torch.int64, device=t.device)),
    NGPT_INIT.raises("hyperparameter", "d_model 6 into 4 heads", ValueError, "d_model",
                     config=_tiny_config(d_model=6, n_heads=4)),
    RENORM_MODEL.matches("valid", "rows back on the sphere"),
    RENORM_MODEL.matches("magnitude", "a zero row stays zero (sync-free default)", model=_zero_first_row),
    RENORM_MODEL.raises("magnitude", "a zero row with check=True", ValueError, "tensors", model=_zero_first_row,
                        check=True),
    RENORM_MODEL.matches("shape", "a model without normalized layers",
                         model=lambda m: torch.nn.Linear(6, 4, device=m.weight.device),
                         expected=lambda a: a["model"].weight.detach()),
    RENORM_STEP.matches("valid", "rows unit after an SGD step"),
    RENORM_STEP.raises("magnitude", "a zero row with check_every_step=True", ValueError, "zero vectors",
                       model=_zero_first_row, check_every_step=True),
    RENORM_CHECK.matches("valid", "check() after a step passes"),
    RENORM_CHECK.raises("magnitude", "check() after a step that met a zero row", ValueError, "zero vectors",
                        model=_zero_first_row),
    RENORM_COUNTS_MODEL.matches("magnitude", "returns the zero-vector counts", model=_zero_first_row),
]


# ---- LLM.int8() ---------------------------------------------------------------------------------------------------

K_IN, N_OUT = 16, 5  # input and output features
OUTLIER_COLS = (3, 10)  # the columns _activations gives |x| >= 6 (the default threshold)


def _activations(device: str, rows: int = 4) -> Tensor:
    x = torch.randn(rows, K_IN)
    x[:, 3] = 8.0
    x[1, 10] = -7.0
    return x.to(device)


def _weight(device: str) -> tuple[Tensor, Tensor]:
    return ref_int8.quantize_weight(torch.randn(N_OUT, K_IN).to(device))


QUANT = Op("int8_vectorwise_quant", lambda d: {"x": _activations(d), "threshold": 6.0},
           lambda a: ops.int8_vectorwise_quant(**a), lambda a: ref_int8.int8_vectorwise_quant(**a))


def _quant_shapes(a: dict) -> tuple:
    """What the op promises on meta: codes [M, K] int8, row_scale [M] fp32, outlier_cols [K] int32, count [1]."""
    M, K = a["x"].shape
    return (torch.empty(M, K, dtype=torch.int8, device="meta"), torch.empty(M, device="meta"),
            torch.empty(K, dtype=torch.int32, device="meta"), torch.empty(1, dtype=torch.int32, device="meta"))


def _quant_codes_formula(a: dict) -> tuple:
    """The reference's outputs with row 0's codes from the documented formula rint(127 x / absmax), in fp64 (the
    row is subnormal, where 127 / absmax overflows fp32)."""
    codes, scale, cols, count = ref_int8.int8_vectorwise_quant(**a)
    row = a["x"][0].double()
    codes = codes.clone()
    codes[0] = (row * (127 / row.abs().amax())).round().to(torch.int8)
    return codes, scale, cols, count


def _excluded(device: str) -> Tensor:
    return torch.zeros(K_IN, dtype=torch.bool, device=device).index_fill_(0, torch.tensor([3]).to(device), True)


QUANT_CASES = [
    QUANT.raises("dtype", "x float64", TypeError, "x", x=cast(torch.float64)),
    QUANT.raises("dtype", "x int8", TypeError, "x", x=cast(torch.int8)),
    QUANT.matches("dtype", "x bfloat16", x=cast(torch.bfloat16)),
    QUANT.matches("dtype", "x float16", x=cast(torch.float16)),
    QUANT.raises("dtype", "excluded int64", TypeError, "excluded", excluded=From(lambda a: _excluded(
        a["x"].device).long())),
    QUANT.matches("valid", "excluded columns (static mode)", excluded=From(lambda a: _excluded(a["x"].device))),
    QUANT.raises("python type", "x a list", TypeError, "x", x=as_list),
    QUANT.raises("python type", "capacity a float", TypeError, "capacity", capacity=2.5),
    QUANT.raises("python type", "capacity a bool", TypeError, "capacity", capacity=True),
    QUANT.raises("python type", "capacity a tensor", TypeError, "capacity", capacity=torch.tensor(4)),
    QUANT.raises("python type", "excluded a list", TypeError, "excluded",
                 excluded=From(lambda a: _excluded("cpu").tolist())),
    QUANT.raises("device", "excluded elsewhere", ValueError, "excluded",
                 excluded=From(lambda a: elsewhere(_excluded(a["x"].device)))),
    QUANT.matches("device", "x on meta", expected=_quant_shapes, x=on_meta),
    QUANT.matches("shape", "no rows", x=sized(0, K_IN)),
    QUANT.matches("shape", "no columns", x=sized(4, 0)),
    QUANT.matches("shape", "one element", x=sized(1, 1)),
    QUANT.matches("shape", "capacity 0 (the count stays true)", capacity=0),
    QUANT.matches("shape", "capacity 1 of 2 outlier columns", capacity=1),
    QUANT.raises("ndim", "x 1-D", ValueError, "x", x=lambda t: t[0]),
    QUANT.raises("ndim", "x 3-D", ValueError, "x", x=unsqueezed),
    QUANT.raises("ndim", "excluded [2, K]", ValueError, "excluded",
                 excluded=From(lambda a: _excluded(a["x"].device).expand(2, K_IN))),
    QUANT.raises("layout", "x transposed", ValueError, "x", x=transposed),
    QUANT.raises("layout", "x last-dim stride 2", ValueError, "x", x=strided),
    QUANT.matches("layout", "every other row", x=every_other),
    QUANT.matches("layout", "one row expanded", x=expanded),
    QUANT.matches("nan", "a NaN row has scale NaN and codes 0", x=setting((2, 5), NAN)),
    QUANT.matches("inf", "an Inf row has scale NaN and codes 0", x=setting((2, 5), INF)),
    QUANT.matches("magnitude", "x of 1e30", x=times(1e30), tolerance=at_scale(1e+30)),
    QUANT.matches("magnitude", "x of 1e-30", x=times(1e-30), tolerance=at_scale(1e-30)),
    QUANT.matches("magnitude", "a subnormal row gets rint(127 x / absmax)", expected=_quant_codes_formula,
                  x=lambda t: torch.cat((t[:1] * 1e-40, t[1:]))),
    QUANT.raises("hyperparameter", "threshold NaN", ValueError, "threshold", threshold=NAN),
    QUANT.raises("hyperparameter", "capacity -1", ValueError, "capacity", capacity=-1),
    QUANT.matches("hyperparameter", "threshold 0 (detection off)", threshold=0.0),
    QUANT.matches("hyperparameter", "threshold -1 (detection off)", threshold=-1.0),
    QUANT.matches("hyperparameter", "threshold Inf", threshold=INF),
    QUANT.matches("grad", "x requires grad (codes are not differentiable)", x=lambda t: t.requires_grad_()),
]


def _mm_valid(device: str) -> dict:
    x = _activations(device)
    a_codes, a_scale, cols, count = ref_int8.int8_vectorwise_quant(x, 6.0)
    w_codes, w_scale = _weight(device)
    return dict(a_codes=a_codes, a_scale=a_scale, w_codes=w_codes, w_scale=w_scale, bias=randn(N_OUT, device=device),
                x=x, outlier_cols=cols, n_outliers=count)


def _w16_slots(device: str) -> Tensor:
    """w16_slot [K]: the 16-bit weight column of each input column, for the two outlier columns."""
    slot = torch.full((K_IN,), -1, dtype=torch.int32)
    slot[list(OUTLIER_COLS)] = torch.arange(len(OUTLIER_COLS), dtype=torch.int32)
    return slot.to(device)


def _mm_w16_valid(device: str) -> dict:
    return {**_mm_valid(device), "w16": randn(N_OUT, len(OUTLIER_COLS), device=device), "w16_slot": _w16_slots(device)}


def _all_nan(a: dict) -> Tensor:
    """The documented value of an outlier list the GEMM cannot apply exactly: a NaN output."""
    return torch.full((*a["x"].shape[:-1], a["w_codes"].shape[0]), NAN, dtype=a["x"].dtype, device=a["x"].device)


def _mm_meta(a: dict) -> Tensor:
    return torch.empty(a["a_codes"].shape[0], a["w_codes"].shape[0], dtype=a["x"].dtype, device="meta")


MM = Op("int8_mm", _mm_valid, lambda a: ops.int8_mm(**a), lambda a: ref_int8.int8_mm(**a))
MM16 = replace(MM, valid=_mm_w16_valid)
MM_TENSORS = ("a_codes", "a_scale", "w_codes", "w_scale", "bias", "x", "outlier_cols", "n_outliers")
MM_CASES = [
    MM.matches("valid", "with outlier columns", True),
    MM.raises("dtype", "a_codes int32", TypeError, "a_codes", a_codes=cast(torch.int32)),
    MM.raises("dtype", "a_scale float16", TypeError, "a_scale", a_scale=cast(torch.float16)),
    MM.raises("dtype", "w_codes uint8", TypeError, "w_codes", w_codes=cast(torch.uint8)),
    MM.raises("dtype", "w_scale float64", TypeError, "w_scale", w_scale=cast(torch.float64)),
    MM.raises("dtype", "x float64", TypeError, "x", x=cast(torch.float64)),
    MM.raises("dtype", "outlier_cols int64", TypeError, "outlier_cols", outlier_cols=cast(torch.int64)),
    MM.raises("dtype", "n_outliers int64", TypeError, "n_outliers", n_outliers=cast(torch.int64)),
    MM.raises("dtype", "bias float64", TypeError, "bias", bias=cast(torch.float64)),
    MM.matches("dtype", "x and bias bfloat16", True, x=cast(torch.bfloat16), bias=cast(torch.bfloat16)),
    MM.matches("dtype", "x and bias float16", True, x=cast(torch.float16), bias=cast(torch.float16)),
    MM.matches("dtype", "bias bf16 next to fp32 x", True, bias=cast(torch.bfloat16)),
    MM16.matches("valid", "with 16-bit weight columns", True),
    MM16.matches("dtype", "w16 bf16 next to fp32 x", True, w16=cast(torch.bfloat16)),
    MM16.raises("dtype", "w16_slot int64", TypeError, "w16_slot", w16_slot=cast(torch.int64)),
    MM16.raises("shape", "w16 without w16_slot", ValueError, "w16", w16_slot=None),
    MM16.raises("shape", "w16 of another N", ValueError, "w16", w16=sized(N_OUT + 1, 2)),
    MM.raises("python type", "a_scale a list", TypeError, "a_scale", a_scale=as_list),
    MM.raises("python type", "bias a list", TypeError, "bias", bias=as_list),
    MM.raises("device", "w_scale elsewhere", ValueError, "w_scale", w_scale=elsewhere),
    MM.matches("device", "all on meta", expected=_mm_meta, **_all(on_meta, *MM_TENSORS)),
    MM.matches("shape", "no rows", x=sized(0, K_IN), a_codes=lambda t: t[:0], a_scale=lambda t: t[:0]),
    MM.matches("shape", "no output features", w_codes=lambda t: t[:0], w_scale=lambda t: t[:0],
               bias=lambda t: t[:0]),
    MM.matches("shape", "no input features", x=sized(4, 0), a_codes=lambda t: t[:, :0], w_codes=lambda t: t[:, :0],
               outlier_cols=lambda t: t[:0], n_outliers=lambda t: t * 0),
    MM.matches("shape", "one row", True, x=lambda t: t[:1], a_codes=lambda t: t[:1], a_scale=lambda t: t[:1]),
    MM.matches("shape", "no outliers listed", True, outlier_cols=lambda t: t[:0], n_outliers=lambda t: t * 0),
    MM.raises("ndim", "a_codes 1-D", ValueError, "a_codes", a_codes=lambda t: t[0]),
    MM.raises("ndim", "outlier_cols 2-D", ValueError, "outlier_cols", outlier_cols=unsqueezed),
    MM.raises("shape", "n_outliers [2]", ValueError, "n_outliers", n_outliers=lambda t: t.repeat(2)),
    MM.raises("shape", "a_scale of M + 1 rows", ValueError, "a_scale", a_scale=lambda t: torch.cat((t, t[:1]))),
    MM.raises("shape", "w_codes of another K", ValueError, "w_codes", w_codes=lambda t: t[:, 1:]),
    MM.raises("shape", "x of another K", ValueError, "x", x=lambda t: t[:, 1:]),
    MM.raises("layout", "a_codes transposed", ValueError, "a_codes", a_codes=transposed),
    MM.raises("layout", "x transposed", ValueError, "x", x=transposed),
    MM.matches("layout", "w_codes transposed (any strides)", True, w_codes=transposed),
    MM.matches("layout", "a_codes every other row", True, a_codes=every_other),
    MM.matches("layout", "x a slice of wider rows", True, x=row_slice),
    MM.matches("index", "an outlier column K gives NaN", True, expected=_all_nan, outlier_cols=setting(0, K_IN)),
    MM.matches("index", "an outlier column -1 inside the count gives NaN", True, expected=_all_nan,
               outlier_cols=setting(1, -1)),
    MM.matches("index", "a count past the list gives NaN", True, expected=_all_nan,
               n_outliers=lambda t: t * 0 + K_IN + 1),
    MM.matches("index", "a negative count gives NaN", True, expected=_all_nan, n_outliers=lambda t: t * 0 - 1),
    MM16.matches("index", "a w16 slot past w16 gives NaN", True, expected=_all_nan, w16_slot=setting(3, 2)),
    MM.matches("nan", "NaN in x at an outlier column", True, x=setting((0, 3), NAN)),
    MM.matches("nan", "a NaN row scale", True, a_scale=setting(2, NAN)),
    MM.matches("inf", "an Inf weight scale", True, w_scale=setting(1, INF)),
    MM.matches("magnitude", "row scales of 1e30", True, a_scale=times(1e30), tolerance=at_scale(1e+30)),
    MM.matches("magnitude", "x of 1e30 (read at the outlier columns)", True, x=times(1e30), tolerance=at_scale(1e+30)),
    MM.matches("magnitude", "row scales of 1e-30", True, a_scale=times(1e-30), tolerance=at_scale(1e-30)),
]


def _linear_valid(device: str) -> dict:
    w_codes, w_scale = _weight(device)
    return {"x": _activations(device), "w_codes": w_codes, "w_scale": w_scale, "bias": randn(N_OUT, device=device)}


def _linear_reference(a: dict) -> Tensor:
    return ref_int8.int8_linear(**{name: value for name, value in a.items() if name != "int8_backward"})


def _linear_grads(names: tuple[str, ...]) -> Callable[[dict], tuple]:
    """The documented gradients of int8_linear: dY W with W the dequantized codes, and dY summed over rows for the
    bias (the int8 path approximates the first; see its tolerance)."""
    def expected(a: dict) -> tuple:
        y = _linear_reference(a)
        dy = cotangent(y).to(y.dtype).reshape(-1, y.shape[-1])
        grads = {"x": (dy.float() @ ref_int8.int8_dequantize(a["w_codes"], a["w_scale"])).to(a["x"].dtype)
                 .reshape(a["x"].shape), "bias": dy.sum(0)}
        return (y,), tuple(grads[name] for name in names)
    return expected


def _linear_grad_case(name: str, names: tuple[str, ...], interpret: bool = False, tolerance: dict | None = None,
                      **edits) -> Case:
    return Case("int8_linear", "grad", name, _edited(_linear_valid, edits), with_grads(LINEAR8.call, names),
                Matches(_linear_grads(names), tolerance), interpret)


# The int8 input gradient quantizes dY W-scale per row: within a few int8 steps of the 16-bit one at these sizes.
INT8_GRAD_TOLERANCE = {torch.float32: dict(atol=0.05, rtol=0.02), torch.bfloat16: dict(atol=0.06, rtol=0.03)}

LINEAR8 = Op("int8_linear", _linear_valid, lambda a: ops.int8_linear(**a), _linear_reference)
LINEAR8_STATIC = replace(LINEAR8, valid=lambda d: {**_linear_valid(d), "static_cols": torch.tensor(
    OUTLIER_COLS, dtype=torch.int32, device=d)})
LINEAR8_W16 = replace(LINEAR8, valid=lambda d: {**LINEAR8_STATIC.valid(d), "w16": randn(N_OUT, 2, device=d),
                                                "w16_slot": _w16_slots(d)})
LINEAR8_CASES = [
    LINEAR8.matches("valid", "dynamic outliers", True),
    LINEAR8.raises("dtype", "x float64", TypeError, "x", x=cast(torch.float64)),
    LINEAR8.raises("dtype", "x int32", TypeError, "x", x=cast(torch.int32)),
    LINEAR8.raises("dtype", "w_codes float32", TypeError, "w_codes", w_codes=cast(torch.float32)),
    LINEAR8.raises("dtype", "w_scale float16", TypeError, "w_scale", w_scale=cast(torch.float16)),
    LINEAR8_STATIC.raises("dtype", "static_cols int64", TypeError, "static_cols", static_cols=cast(torch.int64)),
    LINEAR8.matches("dtype", "x and bias bfloat16", True, x=cast(torch.bfloat16), bias=cast(torch.bfloat16)),
    LINEAR8.matches("dtype", "x and bias float16", True, x=cast(torch.float16), bias=cast(torch.float16)),
    LINEAR8.raises("python type", "x a list", TypeError, "x", x=as_list),
    LINEAR8.raises("python type", "w_scale a list", TypeError, "w_scale", w_scale=as_list),
    LINEAR8.raises("python type", "capacity a float", TypeError, "capacity", capacity=2.5),
    LINEAR8.raises("python type", "capacity a bool", TypeError, "capacity", capacity=True),
    LINEAR8.raises("device", "w_scale elsewhere", ValueError, "w_scale", w_scale=elsewhere),
    LINEAR8.matches("device", "all on meta", expected=lambda a: torch.empty(4, N_OUT, device="meta"),
                    **_all(on_meta, "x", "w_codes", "w_scale", "bias")),
    LINEAR8.matches("shape", "no rows", x=sized(0, K_IN)),
    LINEAR8.matches("shape", "x 1-D", True, x=lambda t: t[1]),
    LINEAR8.matches("shape", "x 3-D", True, x=lambda t: t.reshape(2, 2, K_IN)),
    LINEAR8.matches("shape", "no output features", w_codes=lambda t: t[:0], w_scale=lambda t: t[:0],
                    bias=lambda t: t[:0]),
    LINEAR8.matches("shape", "no input features", x=sized(4, 0), w_codes=lambda t: t[:, :0]),
    LINEAR8.raises("ndim", "w_codes 1-D", ValueError, "w_codes", w_codes=lambda t: t[0]),
    LINEAR8.raises("shape", "x of another K", ValueError, "x", x=lambda t: t[:, 1:]),
    LINEAR8.raises("layout", "x transposed", ValueError, "x", x=transposed),
    LINEAR8.raises("layout", "w_codes transposed", ValueError, "w_codes", w_codes=transposed),
    LINEAR8.matches("layout", "x every other row", True, x=every_other),
    LINEAR8_STATIC.matches("valid", "static outlier columns", True),
    LINEAR8_W16.matches("valid", "static columns with 16-bit weights", True),
    LINEAR8_STATIC.matches("index", "a static column K gives NaN", True, expected=_all_nan,
                           static_cols=setting(0, K_IN)),
    LINEAR8_STATIC.matches("index", "a static column -1 gives NaN", True, expected=_all_nan,
                           static_cols=setting(0, -1)),
    LINEAR8.matches("nan", "a NaN row gives a NaN output row", True, x=setting((1, 4), NAN)),
    LINEAR8.matches("inf", "an Inf row gives a NaN output row", True, x=setting((2, 4), INF)),
    LINEAR8.matches("magnitude", "x of 1e30 (every column an outlier)", True, x=times(1e30), tolerance=at_scale(1e+30)),
    LINEAR8.matches("magnitude", "x of 1e-30 (no outliers)", True, x=times(1e-30), tolerance=at_scale(1e-30)),
    LINEAR8.raises("hyperparameter", "threshold NaN", ValueError, "threshold", threshold=NAN),
    LINEAR8.raises("hyperparameter", "capacity -1", ValueError, "capacity", capacity=-1),
    LINEAR8.matches("hyperparameter", "capacity 1 of 2 outlier columns gives NaN", True, expected=_all_nan,
                    capacity=1),
    LINEAR8.matches("hyperparameter", "threshold 0 (no outliers)", True, threshold=0.0),
    _linear_grad_case("x, 16-bit backward (the default)", ("x",), True),
    _linear_grad_case("x and bias, 16-bit backward (the default)", ("x", "bias")),
    _linear_grad_case("x, int8 backward", ("x",), True, INT8_GRAD_TOLERANCE, int8_backward=True),
    _linear_grad_case("x bf16, int8 backward", ("x",), True, INT8_GRAD_TOLERANCE, x=cast(torch.bfloat16),
                      bias=cast(torch.bfloat16), int8_backward=True),
]


def _int8_module(device: str, **kwargs) -> torch.nn.Module:
    return tnn.Int8Linear.from_float(torch.nn.Linear(K_IN, N_OUT, device=device), **kwargs)


def _int8_module_reference(a: dict) -> Tensor:
    m, x = a["module"], a["x"]
    static = m.outlier_cols if m.outliers == "static" else None
    w16 = m.weight16.to(x.dtype) if m.weight16 is not None else None
    bias = m.bias.to(x.dtype) if m.bias is not None else None
    return ref_int8.int8_linear(x, m.weight, m.SCB, bias, m.threshold, m.capacity, static, w16, m.weight16_slot)


def _int8_module_grads(a: dict) -> tuple:
    m = a["module"]
    y = _int8_module_reference(a)
    dy = cotangent(y).to(y.dtype)
    return (y,), ((dy.float() @ ref_int8.int8_dequantize(m.weight, m.SCB)).to(a["x"].dtype),)


INT8_MODULE = Op("nn.Int8Linear", _module_valid(_int8_module, x=_activations), _forward("x"), _int8_module_reference,
                 names=("Int8Linear", "int8_linear"))
INT8_STATIC = replace(INT8_MODULE, valid=_module_valid(
    lambda d: _int8_module(d, outliers="static", outlier_cols=torch.tensor(OUTLIER_COLS, device=d)), x=_activations))
INT8_INIT = Op("nn.Int8Linear", lambda d: {"in_features": K_IN, "out_features": N_OUT, "device": d},
               lambda a: tnn.Int8Linear(**a))
INT8_UNCALIBRATED = replace(INT8_INIT, call=lambda a: tnn.Int8Linear(**a)(torch.ones(2, K_IN, device=a["device"])))


def _set_outlier_cols(a: dict) -> None:
    a["module"].set_outlier_cols(a["cols"])


INT8_SET_COLS = Op("nn.Int8Linear", lambda d: {"module": _int8_module(d), "cols": torch.tensor([K_IN], device=d)},
                   _set_outlier_cols)


CALIBRATE8 = Op("nn.calibrate_outliers",
                lambda d: {"model": torch.nn.Sequential(torch.nn.Linear(K_IN, N_OUT, device=d)),
                           "batches": [_activations(d)]},
                lambda a: tnn.calibrate_outliers(**a),
                lambda a: {"0": torch.tensor(OUTLIER_COLS, device=a["batches"][0].device)})


def _replaced(a: dict) -> tuple:
    report = tnn.replace_linear(**a)
    return report, [type(m).__name__ for m in a["model"]]


REPLACE = Op("nn.replace_linear", lambda d: {"model": torch.nn.Sequential(
    torch.nn.Linear(K_IN, N_OUT, device=d), torch.nn.ReLU(), torch.nn.Linear(N_OUT, 3, device=d))}, _replaced,
    # fp32 weight and bias before; int8 codes, fp32 row scales and the fp32 bias after
    lambda a: ({"bytes_before": 4 * (K_IN * N_OUT + N_OUT) + 4 * (N_OUT * 3 + 3),
                "bytes_after": (K_IN * N_OUT + 8 * N_OUT) + (N_OUT * 3 + 8 * 3), "layers": {"0": None, "2": None}},
               ["Int8Linear", "ReLU", "Int8Linear"]))

INT8_MODULE_CASES = [
    INT8_MODULE.matches("valid", "dynamic", True),
    INT8_STATIC.matches("valid", "static with calibrated columns", True),
    INT8_MODULE.matches("dtype", "from a bfloat16 Linear", True, x=cast(torch.bfloat16), module=From(
        lambda a: tnn.Int8Linear.from_float(torch.nn.Linear(K_IN, N_OUT, device=a["x"].device, dtype=torch.bfloat16)))),
    INT8_MODULE.raises("dtype", "x float64", TypeError, "x", x=cast(torch.float64)),
    INT8_MODULE.raises("shape", "x of another width", ValueError, "x", x=lambda t: t[:, 1:]),
    INT8_MODULE.matches("nan", "a NaN row gives a NaN output row", True, x=setting((0, 0), NAN)),
    Case("nn.Int8Linear", "grad", "x (int8 backward)", INT8_MODULE.valid, with_grads(INT8_MODULE.call, ("x",)),
         Matches(_int8_module_grads, INT8_GRAD_TOLERANCE), True),
    INT8_MODULE.matches("hyperparameter", "capacity 1 of 2 outlier columns gives NaN", True,
                        module=From(lambda a: _int8_module(a["x"].device, capacity=1)),
                        expected=lambda a: torch.full((4, N_OUT), NAN, device=a["x"].device)),
    INT8_INIT.raises("hyperparameter", "outliers 'bogus'", ValueError, "outliers", outliers="bogus"),
    INT8_UNCALIBRATED.raises("hyperparameter", "static without calibrated columns", RuntimeError, "outlier",
                             outliers="static"),
    INT8_SET_COLS.raises("index", "an outlier column past in_features", ValueError, "cols"),
    CALIBRATE8.matches("valid", "the columns holding |x| >= 6"),
    CALIBRATE8.matches("hyperparameter", "threshold 100: none", threshold=100.0,
                       expected=lambda a: {"0": torch.zeros(0, dtype=torch.int64, device=a["batches"][0].device)}),
    CALIBRATE8.matches("hyperparameter", "capacity 1: the largest", capacity=1,
                       expected=lambda a: {"0": torch.tensor([3], device=a["batches"][0].device)}),
    CALIBRATE8.matches("shape", "no batches", batches=[], expected=lambda a: {}),
    REPLACE.matches("valid", "every Linear, with the memory report"),
    REPLACE.matches("hyperparameter", "skip the last layer", skip=("2",), expected=lambda a: (
        {"bytes_before": 4 * (K_IN * N_OUT + N_OUT), "bytes_after": K_IN * N_OUT + 8 * N_OUT, "layers": {"0": None}},
        ["Int8Linear", "ReLU", "Linear"])),
]


# ---- Gram iteration -----------------------------------------------------------------------------------------------


def _gram_reference(a: dict):
    upper, lower = (t.exp() for t in ref_gram.gram_log_bounds(a["w"], a.get("n_iter", 6)))
    return (upper, lower) if a.get("return_lower") else upper


def _zero_bounds(a: dict) -> Tensor:
    """The documented bound of matrices with no entries, or all zeros: 0."""
    return torch.zeros(a["w"].shape[:-2], dtype=a["w"].real.dtype, device=a["w"].device)


GRAM = Op("gram_spectral_norm", lambda d: {"w": randn(2, 4, 3, device=d)}, lambda a: ops.gram_spectral_norm(**a),
          _gram_reference)
GRAM_CASES = [
    GRAM.raises("dtype", "w bfloat16", TypeError, "w", w=cast(torch.bfloat16)),
    GRAM.raises("dtype", "w float16", TypeError, "w", w=cast(torch.float16)),
    GRAM.raises("dtype", "w int64", TypeError, "w", w=cast(torch.int64)),
    GRAM.matches("dtype", "w float64", w=cast(torch.float64)),
    GRAM.matches("dtype", "w complex64", w=lambda t: torch.complex(t, t.flip(-1))),
    GRAM.matches("dtype", "w complex128", w=lambda t: torch.complex(t, t.flip(-1)).to(torch.complex128)),
    GRAM.raises("python type", "w a list", TypeError, "w", w=as_list),
    GRAM.raises("python type", "n_iter a float", TypeError, "n_iter", n_iter=2.0),
    GRAM.raises("python type", "n_iter a bool", TypeError, "n_iter", n_iter=True),
    GRAM.raises("python type", "n_iter a tensor", TypeError, "n_iter", n_iter=torch.tensor(3)),
    GRAM.matches("device", "w on meta", expected=lambda a: torch.empty(2, device="meta"), w=on_meta),
    GRAM.matches("shape", "an empty batch", w=sized(0, 4, 3)),
    GRAM.matches("shape", "one element", w=sized(1, 1)),
    GRAM.matches("shape", "a matrix with no columns has bound 0", expected=_zero_bounds, w=sized(3, 0)),
    GRAM.matches("shape", "a matrix with no rows has bound 0", expected=_zero_bounds, w=sized(0, 3)),
    GRAM.matches("shape", "one matrix", w=lambda t: t[0]),
    GRAM.matches("shape", "wide matrices", w=sized(2, 3, 5)),
    GRAM.matches("shape", "a 2x2 batch", w=sized(2, 2, 3, 3)),
    GRAM.raises("ndim", "w 1-D", ValueError, "w", w=lambda t: t[0, 0]),
    GRAM.matches("layout", "transposed", w=transposed),
    GRAM.matches("layout", "one matrix expanded", w=expanded),
    GRAM.matches("layout", "every other matrix", w=every_other),
    GRAM.matches("nan", "a NaN entry", w=setting((1, 2, 0), NAN)),
    GRAM.matches("inf", "an Inf entry", w=setting((0, 0, 0), INF)),
    GRAM.matches("magnitude", "w of 1e30", w=times(1e30), tolerance=at_scale(1e+30)),
    GRAM.matches("magnitude", "w of 1e-30", w=times(1e-30), tolerance=at_scale(1e-30)),
    GRAM.matches("magnitude", "fp64 w of 1e300", w=lambda t: t.double() * 1e300),
    GRAM.matches("magnitude", "a zero matrix has bound 0", expected=_zero_bounds, w=times(0.0)),
    GRAM.raises("hyperparameter", "n_iter 0", ValueError, "n_iter", n_iter=0),
    GRAM.raises("hyperparameter", "n_iter -1", ValueError, "n_iter", n_iter=-1),
    GRAM.raises("hyperparameter", "n_iter 31", ValueError, "n_iter", n_iter=31),
    GRAM.matches("hyperparameter", "n_iter 1", n_iter=1),
    GRAM.matches("hyperparameter", "n_iter 30", n_iter=30),
    GRAM.matches("hyperparameter", "return_lower", return_lower=True),
    GRAM.matches("hyperparameter", "return_lower of a zero matrix: (0, 0)", return_lower=True, w=times(0.0),
                 expected=lambda a: (_zero_bounds(a), _zero_bounds(a))),
    GRAM.matches("grad", "fp32", grad=("w",)),
    GRAM.matches("grad", "fp64", grad=("w",), w=cast(torch.float64)),
    GRAM.matches("grad", "wide matrices", grad=("w",), w=sized(2, 3, 5)),
    GRAM.matches("grad", "complex128", grad=("w",), w=lambda t: torch.complex(t, t.flip(-1)).to(torch.complex128)),
]


def _conv_reference(a: dict) -> Tensor:
    weight, size = a["weight"], a["input_size"]
    size = (size,) * (weight.dim() - 2) if isinstance(size, int) else tuple(size)
    return ref_gram.conv_spectral_norm(weight, size, a.get("padding", "circular"), a.get("stride", 1),
                                       a.get("groups", 1), a.get("n_iter", 6))


CONV = Op("conv_spectral_norm", lambda d: {"weight": randn(4, 2, 3, device=d), "input_size": 8},
          lambda a: ops.conv_spectral_norm(**a), _conv_reference)
CONV_CASES = [
    CONV.raises("dtype", "weight int64", TypeError, "weight", weight=cast(torch.int64)),
    CONV.raises("dtype", "weight bfloat16", TypeError, "weight", weight=cast(torch.bfloat16)),
    CONV.raises("dtype", "weight complex64", TypeError, "weight", weight=cast(torch.complex64)),
    CONV.matches("dtype", "weight float64", weight=cast(torch.float64)),
    CONV.raises("python type", "weight a list", TypeError, "weight", weight=as_list),
    CONV.raises("python type", "input_size a float", TypeError, "input_size", input_size=8.0),
    CONV.raises("python type", "input_size a string", TypeError, "input_size", input_size="8"),
    CONV.matches("python type", "input_size a list", input_size=[8]),
    CONV.raises("python type", "stride a float", TypeError, "stride", stride=1.5),
    CONV.raises("python type", "stride a bool", TypeError, "stride", stride=True),
    CONV.raises("python type", "groups a float", TypeError, "groups", groups=2.0),
    CONV.raises("python type", "n_iter a float", TypeError, "n_iter", n_iter=6.0),
    CONV.matches("shape", "Conv2d", weight=sized(4, 2, 3, 3), input_size=(6, 5)),
    CONV.matches("shape", "groups 2", weight=sized(4, 1, 3), groups=2),
    CONV.matches("shape", "kernel size 1", weight=sized(4, 2, 1)),
    CONV.matches("shape", "input size equal to the kernel", input_size=3),
    CONV.matches("shape", "no output channels has bound 0", weight=sized(0, 2, 3),
                 expected=lambda a: torch.zeros((), device=a["weight"].device)),
    CONV.raises("shape", "input size 1 under a kernel of 3", ValueError, "input_size", input_size=1),
    CONV.matches("shape", "input size 1, zero padding", input_size=1, padding="zeros"),
    CONV.raises("ndim", "weight 2-D", ValueError, "weight", weight=lambda t: t[0]),
    CONV.raises("ndim", "weight 5-D", ValueError, "weight", weight=sized(4, 2, 3, 3, 3), input_size=(6, 6, 6)),
    CONV.raises("shape", "two sizes for a Conv1d", ValueError, "input_size", input_size=(8, 8)),
    CONV.raises("hyperparameter", "input size 0", ValueError, "input_size", input_size=0),
    CONV.raises("hyperparameter", "input size -4", ValueError, "input_size", input_size=-4),
    CONV.raises("hyperparameter", "padding 'reflect'", ValueError, "padding", padding="reflect"),
    CONV.raises("hyperparameter", "stride 0", ValueError, "stride", stride=0),
    CONV.matches("hyperparameter", "stride 2", stride=2),
    CONV.matches("hyperparameter", "stride 2, zero padding", stride=2, padding="zeros"),
    CONV.raises("hyperparameter", "stride 3 not dividing the input size", ValueError, "stride", stride=3),
    CONV.raises("hyperparameter", "groups 3 of 4 channels", ValueError, "groups", groups=3),
    CONV.raises("hyperparameter", "groups 0", ValueError, "groups", groups=0),
    CONV.raises("hyperparameter", "n_iter 0", ValueError, "n_iter", n_iter=0),
    CONV.matches("nan", "a NaN weight", weight=setting((1, 0, 2), NAN)),
    CONV.matches("inf", "an Inf weight", weight=setting((1, 0, 2), INF)),
    CONV.matches("magnitude", "weight of 1e30", weight=times(1e30), tolerance=at_scale(1e+30)),
    CONV.matches("magnitude", "weight of 1e-30", weight=times(1e-30), tolerance=at_scale(1e-30)),
    CONV.matches("magnitude", "a zero weight has bound 0", weight=times(0.0),
                 expected=lambda a: torch.zeros((), device=a["weight"].device)),
    CONV.matches("grad", "fp32", grad=("weight",)),
    CONV.matches("grad", "fp64", grad=("weight",), weight=cast(torch.float64)),
    CONV.matches("grad", "Conv2d, stride 2", grad=("weight",), weight=sized(4, 2, 3, 3), input_size=(6, 4),
                 stride=2),
]


# ---- Gram iteration modules ---------------------------------------------------------------------------------------


def _normalized_weight(a: dict) -> Tensor:
    module, inputs = a["module"], a.get("inputs")
    settings = {k: v for k, v in a.items() if k not in ("module", "inputs")}
    tnn.register_gram_spectral_norm(module, **settings)
    if inputs is not None:
        module(inputs)
    return module.weight.detach()


def _normalized_weight_reference(a: dict) -> Tensor:
    """W * target / b(W), b the reference bound of the layer at its input size."""
    module, w = a["module"], a["module"].weight.detach()
    if isinstance(module, torch.nn.Linear):
        bound = ref_gram.gram_spectral_norm(w, a.get("n_iter", 6))
    else:
        size = tuple(a["inputs"].shape[2:]) if a.get("inputs") is not None else tuple(a["input_size"])
        padding = "circular" if module.padding_mode == "circular" else "zeros"
        bound = ref_gram.conv_spectral_norm(w, size, padding, module.stride[0], module.groups, a.get("n_iter", 6))
    return w * (a.get("target", 1.0) / bound)


def _parametrized_by_hand(a: dict) -> Tensor:
    """GramSpectralNorm registered with torch's parametrize directly (it is a public class)."""
    module = a["module"]
    torch.nn.utils.parametrize.register_parametrization(module, "weight", tnn.GramSpectralNorm(module))
    return module.weight.detach()


GRAM_MODULES = ("register_gram_spectral_norm", "gram_spectral_norm", "GramSpectralNorm", "Linear", "Conv1d", "Conv2d",
                "ParametrizedLinear", "ParametrizedConv1d", "ParametrizedConv2d")
GRAM_NORM = Op("nn.register_gram_spectral_norm", lambda d: {"module": torch.nn.Linear(5, 4, device=d)},
               _normalized_weight, _normalized_weight_reference, names=GRAM_MODULES)
GRAM_NORM_CLASS = Op("nn.GramSpectralNorm", GRAM_NORM.valid, _parametrized_by_hand, _normalized_weight_reference)


def _conv1d(device: str, **kwargs) -> torch.nn.Module:
    return torch.nn.Conv1d(2, 4, 3, padding=1, device=device, **kwargs)


def _sequential(device: str, conv: bool = False) -> torch.nn.Module:
    if conv:
        return torch.nn.Sequential(_conv1d(device), torch.nn.ReLU(), torch.nn.Conv1d(4, 3, 3, device=device))
    return torch.nn.Sequential(torch.nn.Linear(5, 4, device=device), torch.nn.ReLU(),
                               torch.nn.Linear(4, 3, device=device))


def _product_of_bounds(a: dict) -> Tensor:
    """The reference bound of each layer at the size of its input, multiplied."""
    x, bounds = a.get("example_input"), []
    for layer in a["model"]:
        if isinstance(layer, torch.nn.Linear):
            bounds.append(ref_gram.gram_spectral_norm(layer.weight.detach()))
        elif isinstance(layer, torch.nn.Conv1d):
            bounds.append(ref_gram.conv_spectral_norm(layer.weight.detach(), tuple(x.shape[2:]), "zeros"))
        x = layer(x) if x is not None else None
    return torch.stack(bounds).prod() if bounds else torch.tensor(1.0)


def _recorded_sizes(a: dict) -> list:
    tnn.record_input_sizes(a["model"])
    a["model"](a["x"])
    return [m.torchext_input_size for m in a["model"] if isinstance(m, torch.nn.Conv1d)]


LIPSCHITZ = Op("nn.lipschitz_bound", lambda d: {"model": _sequential(d)}, lambda a: tnn.lipschitz_bound(**a)[0],
               _product_of_bounds, names=GRAM_MODULES)
PENALTY = Op("nn.lipschitz_penalty", lambda d: {"model": _sequential(d), "tau": 0.0},
             lambda a: tnn.lipschitz_penalty(**a).detach(),
             lambda a: sum(b for layer in a["model"] if isinstance(layer, torch.nn.Linear)
                           if (b := ref_gram.gram_spectral_norm(layer.weight.detach())) > a["tau"]))
RECORD = Op("nn.record_input_sizes", lambda d: {"model": _sequential(d, conv=True), "x": randn(1, 2, 8, device=d)},
            _recorded_sizes, lambda a: [(8,), (8,)])
TABLE = Op("nn.format_lipschitz_table", lambda d: {"table": []}, lambda a: tnn.format_lipschitz_table(**a),
           lambda a: f"{'product':<34}{1.0:>12.5f}")

GRAM_MODULE_CASES = [
    GRAM_NORM.matches("valid", "a Linear"),
    GRAM_NORM.matches("hyperparameter", "target 2", target=2.0),
    GRAM_NORM.matches("valid", "a Conv1d at a given input size", module=From(lambda a: _conv1d(
        a["module"].weight.device)), input_size=(8,)),
    GRAM_NORM.matches("valid", "a Conv1d at its first forward's size", module=From(lambda a: _conv1d(
        a["module"].weight.device)), inputs=From(lambda a: randn(1, 2, 8, device=a["module"].weight.device))),
    GRAM_NORM.matches("valid", "a circular Conv2d", module=From(lambda a: torch.nn.Conv2d(
        2, 3, 3, padding=1, padding_mode="circular", device=a["module"].weight.device)), input_size=(6, 6)),
    GRAM_NORM.raises("python type", "an Embedding", TypeError, "Embedding",
                     module=From(lambda a: torch.nn.Embedding(4, 3, device=a["module"].weight.device))),
    GRAM_NORM.raises("hyperparameter", "dilation 2", NotImplementedError, "dilation",
                     module=From(lambda a: _conv1d(a["module"].weight.device, dilation=2))),
    GRAM_NORM.raises("hyperparameter", "padding_mode 'reflect'", NotImplementedError, "padding_mode",
                     module=From(lambda a: _conv1d(a["module"].weight.device, padding_mode="reflect"))),
    GRAM_NORM.raises("hyperparameter", "padding past kernel_size - 1", NotImplementedError, "padding",
                     module=From(lambda a: torch.nn.Conv1d(2, 4, 3, padding=3, device=a["module"].weight.device))),
    GRAM_NORM.raises("hyperparameter", "unequal strides", NotImplementedError, "strides",
                     module=From(lambda a: torch.nn.Conv2d(2, 3, 3, stride=(1, 2), device=a["module"].weight.device))),
    GRAM_NORM.raises("shape", "a Conv1d's weight before any input size", RuntimeError, "input size",
                     module=From(lambda a: _conv1d(a["module"].weight.device))),
    GRAM_NORM.raises("hyperparameter", "n_iter 0", ValueError, "n_iter", n_iter=0),
    GRAM_NORM_CLASS.matches("valid", "registered with torch's parametrize"),
    LIPSCHITZ.matches("valid", "Linear layers"),
    LIPSCHITZ.matches("valid", "Conv1d layers with an example input", model=From(lambda a: _sequential(
        a["model"][0].weight.device, conv=True)), example_input=From(lambda a: randn(
            1, 2, 8, device=a["model"][0].weight.device))),
    LIPSCHITZ.matches("shape", "no bounded layers: 1", model=From(lambda a: torch.nn.Sequential(torch.nn.ReLU()))),
    LIPSCHITZ.raises("shape", "Conv1d layers without an input size", RuntimeError, "input size",
                     model=From(lambda a: _sequential(a["model"][0].weight.device, conv=True))),
    PENALTY.matches("valid", "tau 0: every bound"),
    PENALTY.matches("hyperparameter", "tau 1e9: none", tau=1e9,
                    expected=lambda a: torch.zeros((), device=a["model"][0].weight.device)),
    RECORD.matches("valid", "each conv's input size"),
    TABLE.matches("shape", "an empty table"),
]


# ---- KVQuant ------------------------------------------------------------------------------------------------------

HEAD_DIM, KV_HEADS, CAPACITY, PROMPT = 32, 2, 8, 5


def _key_ranges(device: str, kv_heads: int = KV_HEADS, head_dim: int = HEAD_DIM) -> dict:
    return {"key_offset": (0.1 * torch.randn(kv_heads, head_dim)).to(device),
            "key_scale": (1 + torch.rand(kv_heads, head_dim)).to(device)}


def _cache(device: str, dtype: torch.dtype = torch.float32, batch: int = 2, kv_heads: int = KV_HEADS,
           head_dim: int = HEAD_DIM, capacity: int = CAPACITY, slots: int = 1, sink: int = 1, window: int = 2):
    """(storage, codebook): 4-bit uniform levels, lengths 0."""
    codebook = ops.make_codebook(4, 4, **_key_ranges(device, kv_heads, head_dim))
    return ops.allocate_storage(batch, kv_heads, head_dim, capacity, codebook, slots, sink, window, dtype,
                                device), codebook


def _tokens(device: str, dtype: torch.dtype = torch.float32, batch: int = 2, kv_heads: int = KV_HEADS,
            n: int = PROMPT, head_dim: int = HEAD_DIM) -> Tensor:
    return randn(batch, kv_heads, n, head_dim, device=device, dtype=dtype)


def _append_valid(device: str, dtype: torch.dtype = torch.float32, batch: int = 2, kv_heads: int = KV_HEADS,
                  head_dim: int = HEAD_DIM, **cache) -> dict:
    storage, codebook = _cache(device, dtype, batch, kv_heads, head_dim, **cache)
    return {"storage": storage, "codebook": codebook, "k": _tokens(device, dtype, batch, kv_heads, head_dim=head_dim),
            "v": _tokens(device, dtype, batch, kv_heads, head_dim=head_dim)}


def _appended(a: dict):
    ops.kv_quant_append_(**a)
    return a["storage"]


def _appended_reference(a: dict):
    ref_kv.append(a["storage"], a["codebook"], a["k"], a["v"], a.get("counts"))
    return a["storage"]


def _poisoned(*sequences: int) -> Callable[[dict], object]:
    """The documented result of an append whose named sequences cannot take their tokens (a count outside [0, n],
    or past the capacity): those are poisoned (lengths -1, nothing written), the others appended."""
    def expected(a: dict):
        counts = a.get("counts")
        counts = torch.full((a["k"].shape[0],), a["k"].shape[2], dtype=torch.int32) if counts is None else counts
        counts = counts.clone()
        counts[list(sequences)] = 0
        ref_kv.append(a["storage"], a["codebook"], a["k"], a["v"], counts)
        a["storage"].lengths[list(sequences)] = -1
        return a["storage"]
    return expected


def _prefilled(counts: tuple[int, ...]) -> From:
    """The storage first filled with counts[b] tokens of sequence b, by the reference."""
    def build(a: dict):
        storage = a["storage"]
        k = _tokens(storage.key_codes.device, storage.sink_keys.dtype, n=max(counts))
        ref_kv.append(storage, a["codebook"], k, k.flip(-1), torch.tensor(counts, dtype=torch.int32))
        return storage
    return From(build)


def _counts(*values: int) -> From:
    return From(lambda a: torch.tensor(values, dtype=torch.int32, device=a["k"].device))


def _field(name: str, edit: Callable[[Tensor], Tensor]) -> Callable:
    """An edit of one tensor of a Storage or Codebook."""
    return lambda bundle: bundle._replace(**{name: edit(getattr(bundle, name))})


APPEND = Op("kv_quant_append_", _append_valid, _appended, _appended_reference)
APPEND_CASES = [
    APPEND.matches("valid", "a prompt into sink, packed slots and window"),
    APPEND.raises("dtype", "k float16 into an fp32 cache", TypeError, "k", k=cast(torch.float16)),
    APPEND.raises("dtype", "v bfloat16 into an fp32 cache", TypeError, "v", v=cast(torch.bfloat16)),
    APPEND.raises("dtype", "counts int64", TypeError, "counts", counts=From(lambda a: torch.full(
        (2,), 3, device=a["k"].device))),
    APPEND.raises("dtype", "storage.lengths int64", TypeError, "storage.lengths",
                  storage=_field("lengths", cast(torch.int64))),
    APPEND.raises("dtype", "codebook.key_boundaries float64", TypeError, "codebook.key_boundaries",
                  codebook=_field("key_boundaries", cast(torch.float64))),
    replace(APPEND, valid=lambda d: _append_valid(d, torch.bfloat16)).matches("dtype", "a bfloat16 cache"),
    replace(APPEND, valid=lambda d: _append_valid(d, torch.float16)).matches("dtype", "a float16 cache"),
    APPEND.raises("python type", "k a list", TypeError, "k", k=as_list),
    APPEND.raises("python type", "counts a list", TypeError, "counts", counts=[3, 3]),
    APPEND.raises("device", "k elsewhere", ValueError, "k", k=elsewhere, v=elsewhere),
    APPEND.matches("shape", "no new tokens", k=lambda t: t[:, :, :0], v=lambda t: t[:, :, :0]),
    APPEND.matches("shape", "counts 0", counts=_counts(0, 0)),
    APPEND.matches("shape", "counts 3 and 5", counts=_counts(3, 5)),
    APPEND.matches("shape", "the cache filled to capacity", k=sized(2, 2, CAPACITY, HEAD_DIM),
                   v=sized(2, 2, CAPACITY, HEAD_DIM)),
    replace(APPEND, valid=lambda d: _append_valid(d, sink=0, window=0)).matches("shape", "no sink, no window"),
    replace(APPEND, valid=lambda d: _append_valid(d, slots=0)).matches("shape", "no outlier slots"),
    replace(APPEND, valid=lambda d: _append_valid(d, batch=1, kv_heads=1, head_dim=64)).matches(
        "shape", "batch 1, one kv head, head_dim 64"),
    APPEND.raises("ndim", "k 3-D", ValueError, "k", k=lambda t: t[0], v=lambda t: t[0]),
    APPEND.raises("shape", "k of head_dim 16", ValueError, "k", k=lambda t: t[..., :16], v=lambda t: t[..., :16]),
    APPEND.raises("shape", "v of fewer tokens", ValueError, "v", v=lambda t: t[:, :, 1:]),
    APPEND.raises("shape", "counts [1]", ValueError, "counts", counts=_counts(3)),
    APPEND.raises("layout", "k transposed", ValueError, "k", k=transposed),
    APPEND.matches("layout", "k every other token", k=lambda t: torch.cat((t, t), 2)[:, :, ::2]),
    APPEND.raises("layout", "storage.key_codes not contiguous", ValueError, "storage.key_codes",
                  storage=_field("key_codes", transposed)),
    APPEND.matches("index", "a count past n poisons its sequence", expected=_poisoned(0),
                   counts=_counts(PROMPT + 1, 2)),
    APPEND.matches("index", "a negative count poisons its sequence", expected=_poisoned(0), counts=_counts(-1, 2)),
    APPEND.matches("index", "a sequence past the capacity is poisoned", expected=_poisoned(0),
                   storage=_prefilled((5, 1)), k=lambda t: t[:, :, :4], v=lambda t: t[:, :, :4]),
    APPEND.raises("index", "past the capacity with check=True", ValueError, "capacity", check=True,
                  storage=_prefilled((5, 1)), k=lambda t: t[:, :, :4], v=lambda t: t[:, :, :4]),
    APPEND.matches("index", "a poisoned sequence stays poisoned", expected=_poisoned(0),
                   storage=_field("lengths", setting(0, -1))),
    APPEND.raises("index", "a poisoned sequence with check=True", ValueError, "poisoned", check=True,
                  storage=_field("lengths", setting(0, -1))),
    APPEND.matches("nan", "NaN in a packed key", k=setting((0, 0, 1, 3), NAN)),
    APPEND.matches("nan", "NaN in a packed value", v=setting((1, 1, 2, 0), NAN)),
    APPEND.matches("nan", "NaN in a window value", v=setting((0, 1, 4, 0), NAN)),
    APPEND.matches("inf", "Inf in a packed key", k=setting((1, 0, 2, 7), INF)),
    APPEND.matches("magnitude", "values of 1e30", v=times(1e30)),
    APPEND.matches("magnitude", "keys of 1e30", k=times(1e30)),
    APPEND.matches("magnitude", "values of 1e-30", v=times(1e-30)),
    APPEND.matches("grad", "k and v require grad", k=lambda t: t.requires_grad_(), v=lambda t: t.requires_grad_()),
]


def _inv_freq(device: str, head_dim: int = HEAD_DIM) -> Tensor:
    return (1.0 / 10000 ** (torch.arange(0, head_dim, 2).float() / head_dim)).to(device)


def _decode_valid(device: str, dtype: torch.dtype = torch.float32, heads: int = 4, counts=(PROMPT, PROMPT),
                  kv_heads: int = KV_HEADS, head_dim: int = HEAD_DIM, **cache) -> dict:
    """A cache holding counts[b] tokens of sequence b (appended by the reference), and one query per sequence."""
    batch = len(counts)
    storage, codebook = _cache(device, dtype, batch, kv_heads, head_dim, **cache)
    k = _tokens(device, dtype, batch, kv_heads, max(counts), head_dim)
    ref_kv.append(storage, codebook, k, 2 * k.flip(-1), torch.tensor(counts, dtype=torch.int32))
    return {"q": randn(batch, heads, 1, head_dim, device=device, dtype=dtype), "storage": storage,
            "codebook": codebook, "inv_freq": _inv_freq(device, head_dim)}


def _decode_reference(a: dict) -> Tensor:
    keys, values = ref_kv.read(a["storage"], a["codebook"])
    return ref_kv.decode_attention(a["q"], keys, values, a["storage"].lengths, a["inv_freq"],
                                   a.get("attention_scaling", 1.0), a.get("scale")).to(a["q"].dtype)


def _decode_poisoned(a: dict) -> Tensor:
    """The documented output of a poisoned sequence 0: NaN; the others as the reference gives them."""
    storage = a["storage"]
    out = _decode_reference({**a, "storage": storage._replace(lengths=storage.lengths.clamp_min(0))})
    out[0] = NAN
    return out


def _round_trip_valid(device: str) -> dict:
    """An fp32 cache whose one packed token has values around 7e4 (past fp16's range)."""
    storage, codebook = _cache(device, torch.float32, batch=1, kv_heads=1, sink=0, window=0)
    k = _tokens(device, batch=1, kv_heads=1, n=1)
    v = (7e4 + 100 * torch.linspace(-1, 1, HEAD_DIM)).reshape(1, 1, 1, HEAD_DIM).to(device)
    ref_kv.append(storage, codebook, k, v)
    return {"q": randn(1, 1, 1, HEAD_DIM, device=device), "storage": storage, "codebook": codebook,
            "inv_freq": _inv_freq(device), "value": v}


# fp32: the kernel builds RoPE angles by angle addition, the reference evaluates cos(p theta) directly; 16-bit: the
# operands of both products are rounded to 16 bits for the tensor cores (tests/test_kv_quant.py's table).
DECODE_TOLERANCE = {torch.float32: dict(atol=2e-5, rtol=2e-5), torch.float16: dict(atol=5e-3, rtol=5e-3)}
DECODE = Op("kv_quant_decode_attention", _decode_valid,
            lambda a: ops.kv_quant_decode_attention(**{k: v for k, v in a.items() if k != "value"}),
            _decode_reference, tolerance=DECODE_TOLERANCE)
ROUND_TRIP = replace(DECODE, valid=_round_trip_valid)
DECODE_CASES = [
    DECODE.matches("valid", "GQA over sink, packed slots and window", True),
    DECODE.raises("dtype", "q bfloat16 over an fp32 cache", TypeError, "q", q=cast(torch.bfloat16)),
    DECODE.raises("dtype", "inv_freq float64", TypeError, "inv_freq", inv_freq=cast(torch.float64)),
    DECODE.raises("dtype", "storage.value_codes int64", TypeError, "storage.value_codes",
                  storage=_field("value_codes", cast(torch.int64))),
    DECODE.raises("dtype", "codebook.key_levels float64", TypeError, "codebook.key_levels",
                  codebook=_field("key_levels", cast(torch.float64))),
    replace(DECODE, valid=lambda d: _decode_valid(d, torch.bfloat16)).matches("dtype", "a bfloat16 cache", True),
    replace(DECODE, valid=lambda d: _decode_valid(d, torch.float16)).matches("dtype", "a float16 cache", True),
    DECODE.raises("python type", "q a list", TypeError, "q", q=as_list),
    DECODE.raises("python type", "inv_freq a list", TypeError, "inv_freq", inv_freq=as_list),
    DECODE.raises("python type", "max_length a float", TypeError, "max_length", max_length=2.5),
    DECODE.raises("python type", "max_length a bool", TypeError, "max_length", max_length=True),
    DECODE.raises("python type", "max_length a tensor", TypeError, "max_length", max_length=torch.tensor(5)),
    DECODE.raises("device", "inv_freq elsewhere", ValueError, "inv_freq", inv_freq=elsewhere),
    replace(DECODE, valid=lambda d: _decode_valid(d, heads=2)).matches("shape", "as many heads as kv heads", True),
    replace(DECODE, valid=lambda d: _decode_valid(d, kv_heads=1)).matches("shape", "MQA: one kv head", True),
    replace(DECODE, valid=lambda d: _decode_valid(d, counts=(PROMPT,))).matches("shape", "batch 1", True),
    replace(DECODE, valid=lambda d: _decode_valid(d, head_dim=64)).matches("shape", "head_dim 64", True),
    replace(DECODE, valid=lambda d: _decode_valid(d, counts=(PROMPT, 0))).matches(
        "shape", "a sequence with no tokens", True),
    replace(DECODE, valid=lambda d: _decode_valid(d, counts=(CAPACITY, 3))).matches("shape", "a full cache", True),
    replace(DECODE, valid=lambda d: _decode_valid(d, sink=0, window=0)).matches("shape", "every token packed", True),
    replace(DECODE, valid=lambda d: _decode_valid(d, sink=2, window=0)).matches("shape", "sink 2, no window", True),
    replace(DECODE, valid=lambda d: _decode_valid(d, slots=0)).matches("shape", "no outlier slots", True),
    DECODE.raises("ndim", "q 3-D", ValueError, "q", q=lambda t: t[0]),
    DECODE.raises("shape", "two query tokens", ValueError, "q", q=lambda t: torch.cat((t, t), 2)),
    DECODE.raises("shape", "3 heads over 2 kv heads", ValueError, "q", q=lambda t: t[:, :3]),
    DECODE.raises("shape", "q of head_dim 16", ValueError, "q", q=lambda t: t[..., :16]),
    DECODE.raises("shape", "inv_freq of 15 frequencies", ValueError, "inv_freq", inv_freq=lambda t: t[1:]),
    DECODE.raises("shape", "q of batch 3", ValueError, "q", q=lambda t: torch.cat((t, t[:1]))),
    DECODE.raises("layout", "q last-dim stride 2", ValueError, "q", q=strided),
    DECODE.matches("layout", "q with batch and head strides swapped", True,
                   q=lambda t: t.transpose(0, 1).contiguous().transpose(0, 1)),
    DECODE.matches("index", "a poisoned sequence decodes to NaN", True, expected=_decode_poisoned,
                   storage=_field("lengths", setting(0, -1))),
    DECODE.matches("index", "max_length below the lengths", True, max_length=3),
    DECODE.matches("index", "max_length past the capacity", True, max_length=100),
    DECODE.matches("index", "max_length 0", True, max_length=0),
    DECODE.raises("index", "max_length -1", ValueError, "max_length", max_length=-1),
    DECODE.matches("nan", "NaN in a query", True, q=setting((1, 2, 0, 5), NAN)),
    DECODE.matches("inf", "Inf in a query", True, q=setting((0, 0, 0, 1), INF)),
    DECODE.matches("magnitude", "queries of 1e30", True, q=times(1e30)),
    DECODE.matches("magnitude", "queries of 1e-30", True, q=times(1e-30)),
    ROUND_TRIP.matches("magnitude", "an fp32 cache round-trips values of 7e4", True,
                       expected=lambda a: a["value"],
                       tolerance={torch.float32: dict(atol=100 / 15, rtol=0)}),  # half a 4-bit step of the range
    DECODE.raises("hyperparameter", "scale 0", ValueError, "scale", scale=0.0),
    DECODE.raises("hyperparameter", "scale NaN", ValueError, "scale", scale=NAN),
    DECODE.raises("hyperparameter", "attention_scaling -1", ValueError, "attention_scaling", attention_scaling=-1.0),
    DECODE.matches("hyperparameter", "attention_scaling 2", True, attention_scaling=2.0),
    DECODE.matches("grad", "q requires grad (inference: the value only)", q=lambda t: t.requires_grad_()),
]


def _codebook_valid(device: str) -> dict:
    return {"key_bits": 4, "value_bits": 4, **_key_ranges(device)}


def _codebook_expected(a: dict):
    """Uniform levels unless given, boundaries at their midpoints unless given, everything fp32 on the device."""
    device = a["key_offset"].device
    tables = []
    for kind in ("key", "value"):
        levels = a.get(f"{kind}_levels")
        levels = ref_kv.uniform_levels(a[f"{kind}_bits"]) if levels is None else levels
        boundaries = a.get(f"{kind}_boundaries")
        levels = levels.float().to(device)
        tables += [levels, ref_kv.midpoints(levels) if boundaries is None else boundaries.float().to(device)]
    return ref_kv.Codebook(a["key_bits"], a["value_bits"], *tables, a["key_offset"].float(), a["key_scale"].float())


CODEBOOK = Op("make_codebook", _codebook_valid, lambda a: ops.make_codebook(**a), _codebook_expected)
CODEBOOK_CASES = [
    CODEBOOK.matches("valid", "uniform 4-bit levels"),
    CODEBOOK.matches("hyperparameter", "2 and 3 bits", key_bits=2, value_bits=3),
    CODEBOOK.matches("dtype", "key_scale float64", key_scale=cast(torch.float64)),
    CODEBOOK.matches("dtype", "key_offset int64", key_offset=lambda t: t.round().long()),
    CODEBOOK.matches("dtype", "key_levels float16", key_levels=From(lambda a: ref_kv.uniform_levels(4).half())),
    CODEBOOK.raises("python type", "key_offset a list", TypeError, "key_offset", key_offset=as_list),
    CODEBOOK.raises("python type", "key_bits a float", TypeError, "key_bits", key_bits=4.0),
    CODEBOOK.raises("python type", "key_bits a bool", TypeError, "key_bits", key_bits=True),
    CODEBOOK.raises("python type", "key_levels a list", TypeError, "key_levels",
                    key_levels=ref_kv.uniform_levels(4).tolist()),
    CODEBOOK.raises("device", "key_scale elsewhere", ValueError, "key_scale", key_scale=elsewhere),
    CODEBOOK.matches("shape", "one kv head", key_offset=lambda t: t[:1], key_scale=lambda t: t[:1]),
    CODEBOOK.raises("shape", "key_scale of another shape", ValueError, "key_scale", key_scale=lambda t: t[:, :16]),
    CODEBOOK.raises("ndim", "key_offset 1-D", ValueError, "key_offset", key_offset=lambda t: t[0],
                    key_scale=lambda t: t[0]),
    CODEBOOK.raises("shape", "8 key levels for 4 bits", ValueError, "levels",
                    key_levels=From(lambda a: ref_kv.uniform_levels(3))),
    CODEBOOK.raises("shape", "key boundaries of the wrong length", ValueError, "boundaries",
                    key_boundaries=From(lambda a: torch.linspace(-1, 1, 14))),
    CODEBOOK.raises("hyperparameter", "key_bits 5", ValueError, "key_bits", key_bits=5),
    CODEBOOK.raises("hyperparameter", "value_bits 1", ValueError, "value_bits", value_bits=1),
    CODEBOOK.raises("hyperparameter", "descending key levels", ValueError, "levels",
                    key_levels=From(lambda a: ref_kv.uniform_levels(4).flip(0))),
    CODEBOOK.raises("nan", "a NaN key level", ValueError, "levels",
                    key_levels=From(lambda a: setting(3, NAN)(ref_kv.uniform_levels(4)))),
    CODEBOOK.raises("nan", "a NaN key_scale", ValueError, "key_scale", key_scale=setting((0, 1), NAN)),
    CODEBOOK.raises("inf", "an Inf key_offset", ValueError, "key_offset", key_offset=setting((1, 0), INF)),
    CODEBOOK.raises("magnitude", "key_scale 0", ValueError, "key_scale", key_scale=setting((0, 0), 0.0)),
    CODEBOOK.raises("magnitude", "a negative key_scale", ValueError, "key_scale", key_scale=setting((0, 0), -1.0)),
    CODEBOOK.matches("magnitude", "key_scale 1e30", key_scale=times(1e30)),
    CODEBOOK.matches("magnitude", "key_scale 1e-30", key_scale=times(1e-30)),
    CODEBOOK.matches("magnitude", "a subnormal key_scale", key_scale=setting((0, 0), 1e-45)),
    CODEBOOK.matches("grad", "key_scale requires grad", key_scale=lambda t: t.requires_grad_()),
]


def _storage_valid(device: str) -> dict:
    return {"batch": 2, "kv_heads": KV_HEADS, "head_dim": HEAD_DIM, "capacity": CAPACITY,
            "codebook": ops.make_codebook(4, 4, **_key_ranges(device)), "slots": 1, "sink": 1, "window": 2,
            "dtype": torch.float16, "device": device}


def _storage_expected(a: dict):
    """Empty buffers of the documented layout: codes and counts zero, outlier indices -1, value offsets and scales
    fp16 in an fp16 cache and fp32 otherwise, key group ranges for ceil((capacity - sink) / key_group) groups."""
    p = {"slots": 1, "sink": 0, "window": 0, "dtype": torch.float16, "device": None, **a}
    cache, device, group = p["dtype"], p["device"], p["codebook"].key_group
    vectors, spatial = (p["batch"], p["kv_heads"], p["capacity"]), (p["batch"], p["kv_heads"])
    groups = math.ceil(max(p["capacity"] - p["sink"], 0) / group) if group else 0
    metadata = torch.float16 if cache == torch.float16 else torch.float32

    def zeros(*shape, dtype=cache):
        return torch.zeros(*shape, dtype=dtype, device=device)

    words = [math.ceil(p["head_dim"] / (32 // bits)) for bits in (p["codebook"].key_bits, p["codebook"].value_bits)]
    dense = {name: zeros(*spatial, p[kind], p["head_dim"]) for name, kind in
             (("sink_keys", "sink"), ("sink_values", "sink"), ("window_keys", "window"), ("window_values", "window"))}
    return ref_kv.Storage(
        key_codes=zeros(*vectors, words[0], dtype=torch.int32),
        key_outlier_index=zeros(*vectors, p["slots"], dtype=torch.int16) - 1,
        key_outlier_value=zeros(*vectors, p["slots"]),
        key_group_offset=zeros(*spatial, groups, p["head_dim"]), key_group_scale=zeros(*spatial, groups, p["head_dim"]),
        value_codes=zeros(*vectors, words[1], dtype=torch.int32),
        value_offset=zeros(*vectors, dtype=metadata), value_scale=zeros(*vectors, dtype=metadata),
        value_outlier_index=zeros(*vectors, p["slots"], dtype=torch.int16) - 1,
        value_outlier_value=zeros(*vectors, p["slots"]), **dense,
        lengths=zeros(p["batch"], dtype=torch.int32))


STORAGE = Op("allocate_storage", _storage_valid, lambda a: ops.allocate_storage(**a), _storage_expected)
STORAGE_CASES = [
    STORAGE.matches("valid", "an fp16 cache with sink, window and slots"),
    STORAGE.matches("dtype", "a bfloat16 cache keeps value offsets and scales in fp32", dtype=torch.bfloat16),
    STORAGE.matches("dtype", "an fp32 cache keeps value offsets and scales in fp32", dtype=torch.float32),
    STORAGE.raises("dtype", "dtype float64", TypeError, "dtype", dtype=torch.float64),
    STORAGE.raises("dtype", "dtype int8", TypeError, "dtype", dtype=torch.int8),
    STORAGE.raises("python type", "dtype a string", TypeError, "dtype", dtype="float16"),
    STORAGE.raises("python type", "batch a float", TypeError, "batch", batch=1.5),
    STORAGE.raises("python type", "capacity a bool", TypeError, "capacity", capacity=True),
    STORAGE.raises("python type", "head_dim a float", TypeError, "head_dim", head_dim=32.0),
    STORAGE.raises("python type", "slots a float", TypeError, "slots", slots=1.0),
    STORAGE.matches("device", "on meta", device="meta"),
    STORAGE.matches("shape", "no slots, sink or window", slots=0, sink=0, window=0),
    STORAGE.raises("shape", "batch 0", ValueError, "batch", batch=0),
    STORAGE.raises("shape", "kv_heads 0", ValueError, "kv_heads", kv_heads=0),
    STORAGE.raises("shape", "capacity 0", ValueError, "capacity", capacity=0),
    STORAGE.raises("hyperparameter", "head_dim 48", ValueError, "head_dim", head_dim=48),
    STORAGE.raises("hyperparameter", "head_dim 0", ValueError, "head_dim", head_dim=0),
    STORAGE.raises("hyperparameter", "slots = head_dim", ValueError, "slots", slots=HEAD_DIM),
    STORAGE.raises("hyperparameter", "slots -1", ValueError, "slots", slots=-1),
    STORAGE.raises("hyperparameter", "sink -1", ValueError, "sink", sink=-1),
    STORAGE.raises("hyperparameter", "window -1", ValueError, "window", window=-1),
    STORAGE.raises("shape", "a codebook for one kv head", ValueError, "codebook", kv_heads=1),
]


def _cache_update(a: dict):
    cache = tnn.KVQuantCache(a["config"], num_layers=1, inv_freq=a["inv_freq"], max_length=a["max_length"],
                             fused=False)
    return cache.update(a["keys"], a["values"], 0)


def _cache_report_tokens(a: dict) -> int:
    cache = tnn.KVQuantCache(a["config"], num_layers=1, inv_freq=a["inv_freq"], max_length=a["max_length"],
                             fused=False)
    cache.update(a["keys"], a["values"], 0)
    return cache.memory_report()["tokens"]


def _cache_valid(device: str) -> dict:
    return {"config": tnn.KVQuantConfig(window_tokens=2), "inv_freq": _inv_freq(device), "max_length": CAPACITY,
            "keys": _tokens(device, batch=1), "values": _tokens(device, batch=1)}


KV_CACHE = Op("nn.KVQuantCache", _cache_valid, _cache_update, lambda a: (a["keys"], a["values"]))
KV_CONFIG = Op("nn.KVQuantConfig", lambda d: {}, lambda a: tnn.KVQuantConfig(**a))
KV_MODULE_CASES = [
    KV_CACHE.matches("valid", "a first prefill hands back its own tokens"),
    replace(KV_CACHE, call=_cache_report_tokens, reference=lambda a: PROMPT).matches("valid",
                                                                                      "memory_report counts tokens"),
    KV_CACHE.raises("shape", "a prefill past max_length", ValueError, "max_length", max_length=4),
    replace(KV_CACHE, call=lambda a: tnn.KVQuantCache(a["config"])).raises("hyperparameter",
                                                                           "no model, no num_layers", ValueError,
                                                                           "num_layers"),
    KV_CONFIG.raises("hyperparameter", "key_bits 5", ValueError, "key_bits", key_bits=5),
    KV_CONFIG.raises("python type", "key_bits a float", TypeError, "key_bits", key_bits=4.0),
    KV_CONFIG.raises("hyperparameter", "outlier_fraction 1", ValueError, "outlier_fraction", outlier_fraction=1.0),
    KV_CONFIG.raises("nan", "outlier_fraction NaN", ValueError, "outlier_fraction", outlier_fraction=NAN),
    KV_CONFIG.raises("hyperparameter", "sink_tokens -1", ValueError, "sink_tokens", sink_tokens=-1),
    KV_CONFIG.raises("python type", "sink_tokens a float", TypeError, "sink_tokens", sink_tokens=1.5),
    KV_CONFIG.raises("python type", "window_tokens a bool", TypeError, "window_tokens", window_tokens=True),
]


# ---- KDE attention ------------------------------------------------------------------------------------------------

SEQ, KDE_DIM = 32, 8
KDE_DEFAULTS = dict(causal=False, scale=None, bucket_size=256, num_samples=256, num_hash_bits=None, seed=None,
                    sampling="uniform", exact_window=2048, min_seq_len=None, return_lse=False)


def _kde_valid(device: str) -> dict:
    q, k, v = (randn(1, 2, SEQ, KDE_DIM, device=device) for _ in range(3))
    return dict(q=q, k=k, v=v, bucket_size=16, num_samples=4, num_hash_bits=2, seed=1, min_seq_len=0,
                return_lse=True)


def _kde_reference(a: dict):
    """Exact attention below min_seq_len (default: any short sequence), else the estimator on the plan the seed
    draws; empty inputs give empty outputs."""
    p = {**KDE_DEFAULTS, **a}
    q, k, v = p["q"], p["k"], p["v"]
    B, H, n, _ = q.shape
    scale = q.shape[-1] ** -0.5 if p["scale"] is None else p["scale"]
    if q.numel() == 0 or v.numel() == 0:
        out, lse = q.new_zeros(B, H, n, v.shape[-1]), q.new_zeros(B, H, n, dtype=accumulation(q.dtype))
    elif p["min_seq_len"] is None or n < p["min_seq_len"]:
        out, lse = ref_kde.exact_attention(q, k, v, p["causal"], scale)
    else:
        seed = int(p["seed"]) if isinstance(p["seed"], (int, Tensor)) else p["seed"]
        plan = ref_kde.make_plan(q, k, v, seed, p["causal"], p["bucket_size"], p["num_samples"], p["num_hash_bits"],
                                 p["sampling"], p["exact_window"])
        out, lse = ref_kde.kde_attention(q, k, v, plan, scale)
    return (out, lse) if p["return_lse"] else out


KDE = Op("kde_attention", _kde_valid, lambda a: ops.kde_attention(**a), _kde_reference)
QKV = ("q", "k", "v")
KDE_CASES = [
    KDE.matches("valid", "the estimator", True),
    KDE.matches("valid", "causal", True, causal=True, exact_window=16),
    KDE.raises("dtype", "q int64", TypeError, "q", **_all(cast(torch.int64), *QKV)),
    KDE.raises("dtype", "k float64 next to fp32 q", TypeError, "k", k=cast(torch.float64)),
    KDE.matches("dtype", "float64", True, **_all(cast(torch.float64), *QKV)),
    KDE.matches("dtype", "bfloat16", True, **_all(cast(torch.bfloat16), *QKV)),
    KDE.matches("dtype", "float16", True, **_all(cast(torch.float16), *QKV)),
    KDE.raises("dtype", "seed an int32 tensor", TypeError, "seed", seed=torch.tensor(1, dtype=torch.int32)),
    KDE.matches("dtype", "seed an int64 tensor", seed=torch.tensor(1)),
    KDE.raises("python type", "q a list", TypeError, "q", q=as_list),
    KDE.raises("python type", "seed a float", TypeError, "seed", seed=1.5),
    KDE.raises("python type", "seed a bool", TypeError, "seed", seed=True),
    KDE.raises("python type", "bucket_size a float", TypeError, "bucket_size", bucket_size=16.0),
    KDE.raises("python type", "bucket_size a bool", TypeError, "bucket_size", bucket_size=True),
    KDE.raises("python type", "num_samples a float", TypeError, "num_samples", num_samples=4.0),
    KDE.raises("python type", "num_hash_bits a float", TypeError, "num_hash_bits", num_hash_bits=2.0),
    KDE.raises("python type", "exact_window a float", TypeError, "exact_window", causal=True, exact_window=16.0),
    KDE.raises("python type", "min_seq_len a float", TypeError, "min_seq_len", min_seq_len=1.5),
    KDE.raises("device", "v elsewhere", ValueError, "v", v=elsewhere),
    KDE.matches("shape", "no tokens", True, **_all(lambda t: t[:, :, :0], *QKV)),
    KDE.matches("shape", "one token", True, **_all(lambda t: t[:, :, :1], *QKV)),
    KDE.matches("shape", "batch 0", **_all(lambda t: t[:0], *QKV)),
    KDE.matches("shape", "GQA: one kv head", True, k=lambda t: t[:, :1], v=lambda t: t[:, :1]),
    KDE.matches("shape", "value dim 4", True, v=lambda t: t[..., :4]),
    KDE.matches("shape", "33 tokens (a ragged block)", True, **_all(sized(1, 2, SEQ + 1, KDE_DIM), *QKV)),
    KDE.matches("shape", "head dim 1", True, **_all(lambda t: t[..., :1], *QKV)),
    KDE.raises("ndim", "q 3-D", ValueError, "q", **_all(lambda t: t[0], *QKV)),
    KDE.raises("shape", "k of another length", ValueError, "k", k=lambda t: t[:, :, :16]),
    KDE.raises("shape", "v of another length", ValueError, "v", v=lambda t: t[:, :, :16]),
    KDE.raises("shape", "3 kv heads under 2 query heads", ValueError, "heads",
               k=lambda t: torch.cat((t, t[:, :1]), 1), v=lambda t: torch.cat((t, t[:, :1]), 1)),
    KDE.raises("shape", "head dim 0", ValueError, "head dims", **_all(lambda t: t[..., :0], *QKV)),
    KDE.raises("shape", "head dim 257", ValueError, "head dims", **_all(sized(1, 2, SEQ, 257), *QKV)),
    KDE.raises("layout", "q transposed", ValueError, "q", q=transposed),
    KDE.matches("layout", "q with head and token strides swapped", True,
                q=lambda t: t.transpose(1, 2).contiguous().transpose(1, 2)),
    KDE.matches("layout", "k and v one head expanded", True, k=lambda t: t[:, :1].expand_as(t),
                v=lambda t: t[:, :1].expand_as(t)),
    KDE.raises("hyperparameter", "bucket_size 24", ValueError, "bucket_size", bucket_size=24),
    KDE.raises("hyperparameter", "bucket_size 8", ValueError, "bucket_size", bucket_size=8),
    KDE.raises("hyperparameter", "num_samples -1", ValueError, "num_samples", num_samples=-1),
    KDE.matches("hyperparameter", "num_samples 0 (block-sparse)", True, num_samples=0),
    KDE.raises("hyperparameter", "num_hash_bits 17", ValueError, "num_hash_bits", num_hash_bits=17),
    KDE.raises("hyperparameter", "num_hash_bits -1", ValueError, "num_hash_bits", num_hash_bits=-1),
    KDE.matches("hyperparameter", "num_hash_bits 0", True, num_hash_bits=0),
    KDE.raises("hyperparameter", "sampling 'foo'", ValueError, "sampling", sampling="foo"),
    KDE.matches("hyperparameter", "uniform sampling", True, sampling="uniform"),
    KDE.raises("hyperparameter", "causal exact_window 24", ValueError, "exact_window", causal=True, exact_window=24),
    KDE.raises("hyperparameter", "seed 2**64", ValueError, "seed", seed=2 ** 64),
    KDE.matches("hyperparameter", "seed -2**63", seed=-2 ** 63),
    KDE.raises("hyperparameter", "scale NaN", ValueError, "scale", scale=NAN),
    KDE.raises("hyperparameter", "scale Inf", ValueError, "scale", scale=INF),
    KDE.matches("hyperparameter", "scale 0 (uniform weights)", True, scale=0.0),
    KDE.raises("hyperparameter", "scale NaN below min_seq_len (exact attention)", ValueError, "scale", scale=NAN,
               min_seq_len=DROP, return_lse=False),
    KDE.matches("hyperparameter", "below min_seq_len: exact attention", min_seq_len=DROP, return_lse=False),
    KDE.matches("hyperparameter", "below min_seq_len with the lse", True, min_seq_len=DROP),
    KDE.matches("nan", "NaN in a query", True, q=setting((0, 1, 3, 2), NAN)),
    KDE.matches("nan", "NaN in a key", True, k=setting((0, 0, 7, 0), NAN)),
    KDE.matches("nan", "NaN in a value", True, v=setting((0, 1, 9, 5), NAN)),
    KDE.matches("inf", "Inf in a key", True, k=setting((0, 0, 7, 0), INF)),
    KDE.matches("magnitude", "queries of 1e30", True, q=times(1e30)),
    KDE.matches("magnitude", "values of 1e30", True, v=times(1e30), tolerance=at_scale(1e+30)),
    KDE.matches("magnitude", "queries of 1e-30", True, q=times(1e-30)),
    KDE.matches("grad", "fp32", True, grad=QKV),
    KDE.matches("grad", "bf16", True, grad=QKV, **_all(cast(torch.bfloat16), *QKV)),
    KDE.matches("grad", "causal", True, grad=QKV, causal=True, exact_window=16),
    KDE.matches("grad", "GQA", True, grad=QKV, k=lambda t: t[:, :1], v=lambda t: t[:, :1]),
    KDE.matches("grad", "the output alone", grad=QKV, return_lse=False),
]


class _SDPALayer(torch.nn.Module):
    """A layer written with F.scaled_dot_product_attention, looked up at call time (what use_kde_attention
    reroutes)."""

    def forward(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        return torch.nn.functional.scaled_dot_product_attention(q, k, v)


def _kde_module(**kwargs) -> torch.nn.Module:
    return tnn.KDEAttention(**{**dict(bucket_size=16, num_samples=4, num_hash_bits=2, min_seq_len=0, seed=1),
                               **kwargs})


def _kde_module_call(a: dict) -> Tensor:
    extras = {name: a[name] for name in ("attn_mask", "dropout_p", "is_causal") if name in a}
    return a["module"](a["q"], a["k"], a["v"], **extras)


def _kde_module_reference(a: dict) -> Tensor:
    m = a["module"]
    if a.get("attn_mask") is not None:
        bias = torch.zeros(a["attn_mask"].shape, device=a["q"].device).masked_fill(~a["attn_mask"], -math.inf)
        return torch.softmax(a["q"] @ a["k"].transpose(-1, -2) * a["q"].shape[-1] ** -0.5 + bias, -1) @ a["v"]
    if a["q"].shape[2] != a["k"].shape[2]:
        return ref_kde.exact_attention(a["q"], a["k"], a["v"])[0]
    return _kde_reference(dict(q=a["q"], k=a["k"], v=a["v"], causal=a.get("is_causal", False),
                               bucket_size=m.bucket_size, num_samples=m.num_samples, num_hash_bits=m.num_hash_bits,
                               seed=m.seed, sampling=m.sampling, exact_window=m.exact_window,
                               min_seq_len=m.min_seq_len))


def _rerouted(a: dict) -> Tensor:
    with tnn.use_kde_attention(a["layer"], a["module"]):
        return a["layer"](a["q"], a["k"], a["v"])


def _kde_module_valid(device: str) -> dict:
    return {"module": _kde_module(), **{name: randn(1, 2, SEQ, KDE_DIM, device=device) for name in QKV}}


KDE_MODULE = Op("nn.KDEAttention", _kde_module_valid, _kde_module_call, _kde_module_reference,
                names=("KDEAttention", "kde_attention"))
KDE_SWAP = Op("nn.use_kde_attention", lambda d: {**_kde_module_valid(d), "layer": _SDPALayer()}, _rerouted,
              _kde_module_reference)
KDE_MODULE_CASES = [
    KDE_MODULE.matches("valid", "the estimator", True),
    KDE_MODULE.matches("valid", "causal", True, is_causal=True),
    KDE_MODULE.matches("shape", "keys of another length: exact SDPA", k=lambda t: t[:, :, :16],
                       v=lambda t: t[:, :, :16]),
    KDE_MODULE.matches("valid", "a padding attn_mask: exact SDPA",
                       attn_mask=From(lambda a: (torch.arange(SEQ, device=a["q"].device) < SEQ - 3).expand(SEQ, SEQ))),
    KDE_MODULE.raises("dtype", "q int64", TypeError, "q", **_all(cast(torch.int64), *QKV)),
    KDE_MODULE.matches("grad", "q, k and v", True, grad=QKV),
    KDE_SWAP.matches("valid", "a layer's SDPA call rerouted", True),
]


# ---- Kronecker attention ------------------------------------------------------------------------------------------

KRON = Op("kronecker_attention", lambda d: {"x": randn(1, 4, 3, 5, device=d), "mode": "kv", "heads": 2},
          lambda a: ops.kronecker_attention(**a), lambda a: ref_kron.kronecker_attention(**a))
KRON_CASES = [
    KRON.matches("valid", "kv", True),
    KRON.matches("valid", "qkv", True, mode="qkv"),
    KRON.raises("dtype", "x int64", TypeError, "x", x=cast(torch.int64)),
    KRON.raises("dtype", "x bool", TypeError, "x", x=cast(torch.bool)),
    KRON.raises("dtype", "x complex64", TypeError, "x", x=cast(torch.complex64)),
    KRON.matches("dtype", "float64", True, x=cast(torch.float64)),
    KRON.matches("dtype", "bfloat16", True, x=cast(torch.bfloat16)),
    KRON.matches("dtype", "float16 qkv", True, x=cast(torch.float16), mode="qkv"),
    KRON.raises("python type", "x a list", TypeError, "x", x=as_list),
    KRON.raises("python type", "heads a float", TypeError, "heads", heads=2.0),
    KRON.raises("python type", "heads a bool", TypeError, "heads", heads=True),
    KRON.raises("python type", "mode an int", ValueError, "mode", mode=1),
    KRON.matches("device", "x on meta", x=on_meta),
    KRON.matches("shape", "batch 0", x=sized(0, 4, 3, 5)),
    KRON.matches("shape", "no rows: an empty output", x=sized(1, 4, 0, 5)),
    KRON.matches("shape", "no channels: an empty output", x=sized(1, 0, 3, 5)),
    KRON.matches("shape", "one pixel, one channel", True, x=sized(1, 1, 1, 1), heads=1),
    KRON.matches("shape", "5 x 7, batch 2", True, x=sized(2, 4, 5, 7)),
    KRON.matches("shape", "3-D map", True, x=sized(1, 4, 2, 3, 5)),
    KRON.matches("shape", "3-D map, qkv", True, x=sized(1, 4, 2, 3, 5), mode="qkv"),
    KRON.matches("shape", "heads 4 (head dim 1)", True, heads=4),
    KRON.raises("ndim", "x 3-D", ValueError, "x", x=lambda t: t[0]),
    KRON.raises("ndim", "x 6-D", ValueError, "x", x=lambda t: t[None, None]),
    KRON.raises("layout", "channels last", ValueError, "x", x=lambda t: t.contiguous(
        memory_format=torch.channels_last)),
    KRON.raises("layout", "H and W transposed in memory", ValueError, "x", x=transposed),
    KRON.matches("layout", "a channel slice", True, x=lambda t: torch.cat((t, t), 1)[:, :4]),
    KRON.matches("layout", "one map expanded over the batch", True, x=lambda t: t.expand(2, -1, -1, -1)),
    KRON.raises("hyperparameter", "mode 'q'", ValueError, "mode", mode="q"),
    KRON.raises("hyperparameter", "heads 0", ValueError, "heads", heads=0),
    KRON.raises("hyperparameter", "heads -1", ValueError, "heads", heads=-1),
    KRON.raises("hyperparameter", "heads 3 of 4 channels", ValueError, "heads", heads=3),
    KRON.raises("hyperparameter", "scale NaN", ValueError, "scale", scale=NAN),
    KRON.raises("hyperparameter", "scale Inf", ValueError, "scale", scale=INF),
    KRON.matches("hyperparameter", "scale 0", True, scale=0.0),
    KRON.raises("shape", "513 tokens (past the kernels' 512)", ValueError, "tokens", True, x=sized(1, 2, 1, 512)),
    KRON.matches("nan", "a NaN pixel", True, x=setting((0, 1, 2, 3), NAN)),
    KRON.matches("inf", "an Inf pixel", True, x=setting((0, 1, 2, 3), INF)),
    KRON.matches("magnitude", "x of 1e30", True, x=times(1e30), tolerance=at_scale(1e+30)),
    KRON.matches("magnitude", "x of 1e-30", True, x=times(1e-30), tolerance=at_scale(1e-30)),
    KRON.matches("grad", "kv", True, grad=("x",)),
    KRON.matches("grad", "qkv", True, grad=("x",), mode="qkv"),
    KRON.matches("grad", "bf16", True, grad=("x",), x=cast(torch.bfloat16)),
    KRON.matches("grad", "3-D map", True, grad=("x",), x=sized(1, 4, 2, 3, 5)),
    KRON.matches("grad", "fp64", grad=("x",), x=cast(torch.float64)),
]


def _kron_block_reference(a: dict) -> Tensor:
    m, x = a["module"], a["x"]
    y = m.out_proj(ref_kron.kronecker_attention(m.in_proj(x), m.mode, m.heads, m.scale))
    return x + y if m.residual else y


def _kron_block(cls_name: str, *shape: int, **kwargs) -> Callable[[str], dict]:
    return lambda d: {"module": getattr(tnn, cls_name)(4, device=d, **{"heads": 2, **kwargs}),
                      "x": randn(*shape, device=d)}


def _kron_block_op(cls_name: str, *shape: int) -> Op:
    return Op(f"nn.{cls_name}", _kron_block(cls_name, *shape), _forward("x"), _kron_block_reference,
              names=(cls_name, "kronecker_attention"))


KRON2D = _kron_block_op("KroneckerAttention2d", 1, 4, 3, 5)
KRON3D = _kron_block_op("KroneckerAttention3d", 1, 4, 2, 3, 5)
KRON_INIT = Op("nn.KroneckerAttention2d", lambda d: {"channels": 4, "heads": 2, "device": d},
               lambda a: tnn.KroneckerAttention2d(**a))
KRON_MODULE_CASES = [
    KRON2D.matches("valid", "kv", True),
    replace(KRON2D, valid=_kron_block("KroneckerAttention2d", 1, 4, 3, 5, mode="qkv")).matches("valid", "qkv", True),
    replace(KRON2D, valid=_kron_block("KroneckerAttention2d", 1, 4, 3, 5, residual=False)).matches(
        "valid", "no residual"),
    KRON2D.matches("layout", "a channels-last input", True, x=lambda t: t.contiguous(
        memory_format=torch.channels_last)),
    KRON2D.raises("shape", "3 channels into a 4-channel block", ValueError, "input", x=lambda t: t[:, :3]),
    KRON2D.raises("ndim", "a 3-D map into the 2-D block", ValueError, "input", x=unsqueezed),
    KRON2D.matches("grad", "x", True, grad=("x",)),
    KRON3D.matches("valid", "kv", True),
    KRON3D.matches("grad", "x", True, grad=("x",)),
    KRON_INIT.raises("hyperparameter", "mode 'x'", ValueError, "mode", mode="x"),
    KRON_INIT.raises("hyperparameter", "heads 3 of 4 channels", ValueError, "heads", heads=3),
    KRON_INIT.raises("hyperparameter", "heads 0", ValueError, "heads", heads=0),
    KRON_INIT.raises("python type", "heads a float", TypeError, "heads", heads=2.0),
]


# ---- tensor attention ---------------------------------------------------------------------------------------------

TA_TENSORS = ("q", "k1", "k2", "v1", "v2")


def _tensor_attention_reference(a: dict):
    q = a["q"]
    if q.numel() == 0:
        return q.new_zeros(q.shape), q.new_zeros(q.shape[:3], dtype=accumulation(q.dtype))
    return ref_ta.tensor_attention(**a)


TA = Op("tensor_attention", lambda d: {name: randn(1, 2, 5, 8, device=d) for name in TA_TENSORS},
        lambda a: ops.tensor_attention(**a, return_lse=True), _tensor_attention_reference)
KV_PAIRS = ("k1", "k2", "v1", "v2")
TA_CASES = [
    TA.matches("valid", "causal", True),
    TA.raises("dtype", "q int64", TypeError, "q", **_all(cast(torch.int64), *TA_TENSORS)),
    TA.raises("dtype", "k1 float64 next to fp32 q", TypeError, "k1", k1=cast(torch.float64)),
    TA.matches("dtype", "float64", True, **_all(cast(torch.float64), *TA_TENSORS)),
    TA.matches("dtype", "bfloat16", True, **_all(cast(torch.bfloat16), *TA_TENSORS)),
    TA.matches("dtype", "float16", True, **_all(cast(torch.float16), *TA_TENSORS)),
    TA.raises("python type", "q a list", TypeError, "q", q=as_list),
    TA.raises("python type", "k1 a list", TypeError, "k1", k1=as_list),
    TA.raises("python type", "window of floats", TypeError, "window", window=(1.5, 2.0)),
    TA.raises("python type", "window of bools", TypeError, "window", window=(True, True)),
    TA.raises("python type", "window an int", TypeError, "window", window=2),
    TA.matches("python type", "window a list", True, window=[2, 3]),
    TA.raises("device", "v2 elsewhere", ValueError, "v2", v2=elsewhere),
    TA.matches("device", "all on meta", **_all(on_meta, *TA_TENSORS)),
    TA.matches("shape", "no tokens", True, **_all(lambda t: t[:, :, :0], *TA_TENSORS)),
    TA.matches("shape", "one token", True, **_all(lambda t: t[:, :, :1], *TA_TENSORS)),
    TA.matches("shape", "GQA: one kv head", True, **_all(lambda t: t[:, :1], *KV_PAIRS)),
    TA.matches("shape", "head dim 1", True, **_all(lambda t: t[..., :1], *TA_TENSORS)),
    TA.matches("shape", "batch 2", **_all(sized(2, 2, 5, 8), *TA_TENSORS)),
    TA.raises("ndim", "q 3-D", ValueError, "q", **_all(lambda t: t[0], *TA_TENSORS)),
    TA.raises("shape", "k1 of another length", ValueError, "k1", k1=lambda t: t[:, :, :4]),
    TA.raises("shape", "3 kv heads under 2 query heads", ValueError, "heads",
              **_all(lambda t: torch.cat((t, t[:, :1]), 1), *KV_PAIRS)),
    TA.raises("shape", "head dim 0", ValueError, "head dim", **_all(lambda t: t[..., :0], *TA_TENSORS)),
    TA.raises("shape", "head dim 257", ValueError, "head_dim", **_all(sized(1, 2, 5, 257), *TA_TENSORS)),
    TA.matches("layout", "q transposed", True, q=transposed),
    TA.matches("layout", "k1 one head expanded", True, k1=lambda t: t[:, :1].expand_as(t)),
    TA.matches("layout", "v1 a slice of wider rows", True, v1=row_slice),
    TA.matches("hyperparameter", "not causal", True, causal=False),
    TA.matches("hyperparameter", "window (2, 3)", True, window=(2, 3)),
    TA.matches("hyperparameter", "window (3, 1)", True, window=(3, 1)),
    TA.matches("hyperparameter", "window (1, 1)", True, window=(1, 1)),
    TA.raises("hyperparameter", "window (0, 2)", ValueError, "window", window=(0, 2)),
    TA.raises("hyperparameter", "window (-1, 2)", ValueError, "window", window=(-1, 2)),
    TA.raises("hyperparameter", "window (2,)", ValueError, "window", window=(2,)),
    TA.raises("hyperparameter", "a window without causal", ValueError, "causal", window=(2, 2), causal=False),
    TA.raises("hyperparameter", "scale NaN", ValueError, "scale", scale=NAN),
    TA.raises("hyperparameter", "scale Inf", ValueError, "scale", scale=INF),
    TA.matches("hyperparameter", "scale 0", True, scale=0.0),
    TA.matches("nan", "NaN in a query", True, q=setting((0, 1, 2, 3), NAN)),
    TA.matches("nan", "NaN in the last key stays out of earlier rows", True, k1=setting((0, 0, 4, 1), NAN)),
    TA.matches("nan", "NaN in a value", True, v2=setting((0, 1, 1, 0), NAN)),
    TA.matches("inf", "Inf in a key", True, k2=setting((0, 0, 2, 2), INF)),
    TA.matches("magnitude", "queries of 1e30", True, q=times(1e30)),
    TA.matches("magnitude", "values of 1e30", True, v1=times(1e30), tolerance=at_scale(1e+30)),
    TA.matches("magnitude", "queries of 1e-30", True, q=times(1e-30)),
    TA.matches("grad", "fp32", True, grad=TA_TENSORS),
    TA.matches("grad", "bf16", True, grad=TA_TENSORS, **_all(cast(torch.bfloat16), *TA_TENSORS)),
    TA.matches("grad", "GQA", True, grad=TA_TENSORS, **_all(lambda t: t[:, :1], *KV_PAIRS)),
    TA.matches("grad", "window (2, 3)", True, grad=TA_TENSORS, window=(2, 3)),
    TA.matches("grad", "not causal", grad=TA_TENSORS, causal=False),
]


def _ta_module_reference(a: dict) -> Tensor:
    m, x = a["module"], a["x"]
    B, T, d_model = x.shape
    heads = [proj(x).view(B, T, n, m.head_dim).transpose(1, 2) for proj, n in
             ((m.q, m.n_heads), (m.k1, m.n_kv_heads), (m.k2, m.n_kv_heads), (m.v1, m.n_kv_heads),
              (m.v2, m.n_kv_heads))]
    y, _ = ref_ta.tensor_attention(*heads, m.window, m.causal, m.scale)
    return m.out(y.transpose(1, 2).reshape(B, T, d_model))


def _ta_module(**kwargs) -> Callable[[str], dict]:
    return lambda d: {"module": tnn.TensorAttention(8, 2, device=d, **kwargs), "x": randn(1, 5, 8, device=d)}


TA_MODULE = Op("nn.TensorAttention", _ta_module(), _forward("x"), _ta_module_reference,
               names=("TensorAttention", "tensor_attention"))
TA_INIT = Op("nn.TensorAttention", lambda d: {"d_model": 8, "n_heads": 2, "device": d},
             lambda a: tnn.TensorAttention(**a))
TA_MODULE_CASES = [
    TA_MODULE.matches("valid", "causal", True),
    replace(TA_MODULE, valid=_ta_module(n_kv_heads=1)).matches("valid", "GQA", True),
    replace(TA_MODULE, valid=_ta_module(window=(2, 2))).matches("valid", "window (2, 2)", True),
    replace(TA_MODULE, valid=_ta_module(window=(2, 2), causal=False)).raises(
        "hyperparameter", "a window without causal", ValueError, "causal"),
    TA_MODULE.raises("ndim", "x 2-D", ValueError, "x", x=lambda t: t[0]),
    TA_MODULE.matches("grad", "x", True, grad=("x",)),
    TA_INIT.raises("hyperparameter", "d_model 7 into 2 heads", ValueError, "d_model", d_model=7),
    TA_INIT.raises("hyperparameter", "n_kv_heads 3 under 2 heads", ValueError, "n_kv_heads", n_kv_heads=3),
]


# ---- every case ---------------------------------------------------------------------------------------------------

CASES: list[Case] = [
    *L2_CASES, *HS_CASES, *QK_CASES, *SWIGLU_CASES, *RENORM_CASES, *NGPT_MODULE_CASES,
    *QUANT_CASES, *MM_CASES, *LINEAR8_CASES, *INT8_MODULE_CASES,
    *GRAM_CASES, *CONV_CASES, *GRAM_MODULE_CASES,
    *APPEND_CASES, *DECODE_CASES, *CODEBOOK_CASES, *STORAGE_CASES, *KV_MODULE_CASES,
    *KDE_CASES, *KDE_MODULE_CASES,
    *KRON_CASES, *KRON_MODULE_CASES,
    *TA_CASES, *TA_MODULE_CASES,
]


def cases_on(path: Path) -> list[Case]:
    """Every case on the reference and CUDA paths; the interpreter takes the ones marked for it."""
    return [case for case in CASES if case.interpret or path is not INTERPRETER]
