"""Triton launches, recorded instead of run, and compiled for a GPU that need not be here.

`recording()` swaps every `kernel[grid](...)` call for a record of what the launcher asked for: the kernel, its
arguments as the compiler sees them (a tensor is its dtype and the alignment of its address, a number is its
value) and its constexprs and options. Nothing runs, so outputs keep whatever their allocation held. Without
TRITON_INTERPRET, CPU tensors then take the path CUDA tensors take (torchext._backend.RECORDING): the launchers
pick exactly what they pick on a GPU, 16-bit dot operands included, on a machine with no GPU. With the interpreter
it records interpreted launches (the tests count specialisations that way).

`compile_launch(launch, arch)` compiles a record for sm_<arch> through Triton's own binder and compiler, so the
specialisation (which integers are 1 or multiples of 16, which pointers are 16-byte aligned) is the one a real
launch gets; a stand-in driver names the target, so no GPU is touched. It must run in a process where
TRITON_INTERPRET is unset (kernels are then JIT functions, not interpreted ones).

Users: bench/offline.py (the compile check and its table), bench/gpu.py (warming the kernels before timing), both
through `record_case`, and the tests that count a kernel's specialisations.
"""

import contextlib
import dataclasses
import importlib
import inspect
import io
import os
import re
from collections.abc import Iterator
from typing import Any

import torch

LAUNCH_OPTIONS = ("num_warps", "num_stages", "num_ctas", "maxnreg")


@dataclasses.dataclass(frozen=True)
class TensorArg:
    """A tensor argument as Triton's binder reads it: a dtype and an address (only its remainder mod 16 matters)."""

    dtype: torch.dtype
    address_mod_16: int

    def data_ptr(self) -> int:
        return self.address_mod_16


@dataclasses.dataclass(frozen=True)
class Launch:
    """One `kernel[grid](*args, **kwargs)` call: kernel by module and name, args as TensorArg / numbers / None."""

    module: str
    kernel: str
    grid: tuple
    args: tuple
    kwargs: tuple  # sorted (name, value) pairs: constexprs passed by keyword and launch options

    @property
    def options(self) -> dict:
        return {k: v for k, v in self.kwargs if k in LAUNCH_OPTIONS}

    @property
    def constexprs(self) -> dict:
        """Every constexpr the launch sets, positional or keyword, by name (the configuration of the compile)."""
        names = _parameters(self.module, self.kernel)
        positional = {name: value for (name, is_constexpr), value in zip(names, self.args) if is_constexpr}
        return {**positional, **{k: v for k, v in self.kwargs if k not in LAUNCH_OPTIONS}}

    def specialization(self) -> tuple:
        """What Triton keys its compiled-kernel cache on, from the arguments: each tensor's dtype and 16-byte
        alignment, each integer's type and whether it is 1 or a multiple of 16, each constexpr's value, and the
        options. Two launches with equal keys share one compile."""
        names = _parameters(self.module, self.kernel)
        key = []
        for (name, is_constexpr), value in zip(names, self.args):
            key.append((name, value) if is_constexpr else (name, _argument_class(value)))
        return (self.module, self.kernel, tuple(key), self.kwargs)

    def config(self) -> str:
        """The constexprs and options as one short string, e.g. "BLOCK_M=64 BLOCK_N=128 num_warps=8"."""
        items = {**self.constexprs, **self.options}
        return " ".join(f"{k}={_short(v)}" for k, v in items.items())


def _short(value) -> str:
    text = str(value)
    return text.removeprefix("triton.language.")


def _argument_class(value) -> Any:
    if isinstance(value, TensorArg):
        return ("tensor", str(value.dtype), value.address_mod_16 == 0)
    if isinstance(value, bool) or value is None:
        return value
    if isinstance(value, int):
        width = "i32" if -2**31 <= value < 2**31 else ("u64" if value >= 2**63 else "i64")
        return (width, value == 1, value % 16 == 0)
    if isinstance(value, float):
        return "fp32"
    return repr(value)


def _parameters(module: str, kernel: str) -> list[tuple[str, bool]]:
    """(name, is constexpr) of each parameter of a kernel."""
    fn = getattr(importlib.import_module(module), kernel).fn
    import triton.language as tl

    return [(p.name, p.annotation is tl.constexpr or p.annotation == "tl.constexpr")
            for p in inspect.signature(fn).parameters.values()]


def _describe(value):
    if isinstance(value, torch.Tensor):
        return TensorArg(value.dtype, value.data_ptr() % 16)
    return value


@contextlib.contextmanager
def recording() -> Iterator[list[Launch]]:
    """Within the block, `kernel[grid](...)` records a Launch into the yielded list instead of launching."""
    from triton.runtime.jit import KernelInterface

    from torchext import _backend

    launches: list[Launch] = []

    def record(kernel, grid):
        def launch(*args, **kwargs):
            fn = kernel.fn
            resolved_grid = grid(kwargs) if callable(grid) else tuple(grid)
            launches.append(Launch(fn.__module__, fn.__name__, tuple(int(g) for g in resolved_grid),
                                   tuple(_describe(a) for a in args),
                                   tuple(sorted((k, _describe(v)) for k, v in kwargs.items()))))
        return launch

    original, recording_before = KernelInterface.__getitem__, _backend.RECORDING
    KernelInterface.__getitem__ = record
    _backend.RECORDING = True
    try:
        yield launches
    finally:
        KernelInterface.__getitem__ = original
        _backend.RECORDING = recording_before


def record_case(case, device: torch.device) -> list[Launch]:
    """The launches of one benchmark case (bench/_harness.Case) in each of its modes but "step" (an optimizer step
    launches nothing its forward and backward do not), its inputs made on `device`."""
    from bench._harness import _make_work

    launches = []
    for mode in case.modes:
        if mode == "step":
            continue
        torch.manual_seed(0)
        args = case.make_inputs(device, case.dtype)
        with recording() as recorded:
            _make_work(case.torchext, args, mode)()
        launches += recorded
    return launches


def unique(launches: list[Launch]) -> list[Launch]:
    """One launch per specialization, in first-seen order."""
    return list({launch.specialization(): launch for launch in reversed(launches)}.values())[::-1]


# ---- compiling -------------------------------------------------------------------------------------------------------


class _TargetDriver:
    """Stands in for Triton's active driver: names the GPU to compile for, and launches nothing."""

    def __init__(self, arch: int):
        from triton.backends.compiler import GPUTarget

        self.target = GPUTarget("cuda", arch, 32)

    def get_current_target(self):
        return self.target

    def get_current_device(self):
        return self.target.arch  # JIT functions keep one binder per "device": here, one per architecture

    def get_current_stream(self, device=None):
        return 0


@dataclasses.dataclass(frozen=True)
class Build:
    """What ptxas reports for one compiled launch, and the instructions it uses."""

    registers: int
    spill_bytes: int  # spill stores + spill loads
    stack_bytes: int
    shared_bytes: int  # dynamic shared memory Triton asks for at launch
    tensor_cores: str  # "wgmma", "mma" or "-"
    tma: bool


_PTXAS = {
    "registers": re.compile(r"Used (\d+) registers"),
    "spill_stores": re.compile(r"(\d+) bytes spill stores"),
    "spill_loads": re.compile(r"(\d+) bytes spill loads"),
    "stack_bytes": re.compile(r"(\d+) bytes stack frame"),
}


def _ptxas_number(log: str, name: str) -> int:
    found = _PTXAS[name].findall(log)
    return max(map(int, found)) if found else 0


def compile_launch(launch: Launch, arch: int, report: bool = True):
    """Compile a recorded launch for sm_<arch> (80, 90, ...). Returns (CompiledKernel, Build or None).

    report=True compiles afresh (not from Triton's cache) so that ptxas's own report of this compile can be read;
    report=False only fills the cache (warming kernels ahead of a run)."""
    from triton import knobs
    from triton.runtime import driver

    kernel = getattr(importlib.import_module(launch.module), launch.kernel)
    previous = driver._active
    driver.set_active(_TargetDriver(arch))
    log = io.StringIO()
    try:
        with knobs.compilation.scope(), knobs.nvidia.scope(), contextlib.redirect_stdout(log):
            knobs.compilation.always_compile = report
            knobs.nvidia.dump_ptxas_log = report
            compiled = kernel.warmup(*launch.args, grid=(1,), **dict(launch.kwargs))
    finally:
        driver._active = previous
    if not report:
        return compiled, None
    text, ptx = log.getvalue(), compiled.asm["ptx"]
    build = Build(
        registers=_ptxas_number(text, "registers"),
        spill_bytes=_ptxas_number(text, "spill_stores") + _ptxas_number(text, "spill_loads"),
        stack_bytes=_ptxas_number(text, "stack_bytes"),
        shared_bytes=int(compiled.metadata.shared),
        tensor_cores="wgmma" if "wgmma.mma_async" in ptx else ("mma" if "mma.sync" in ptx else "-"),
        tma="cp.async.bulk.tensor" in ptx,
    )
    return compiled, build


def compiling_process() -> None:
    """Initializer of a compile worker process: its kernels must be JIT functions, whatever the parent ran."""
    os.environ.pop("TRITON_INTERPRET", None)


def warm_launch(launch: Launch, arch: int) -> str | None:
    """Compile a launch into Triton's cache (for the run that follows); its error in one line, or None."""
    try:
        compile_launch(launch, arch, report=False)
    except Exception as e:  # the real launch raises it again, where it is reported
        return f"{launch.kernel}: {type(e).__name__}"
    return None
