"""Shared benchmark machinery for the bench/bench_<family>.py modules, their pytest tests and bench/run.py.

A family module lists its `Case`s in `CASES` (CPU smoke sizes and GPU sizes) and, for the CPU showcase of
bench/run.py, `CPU_CASES` (the path a CPU user gets, at sizes where its time means something) and `SHOWCASE`
(`Showcase` tables of what the method buys whatever the device: memory, accuracy). A case may add anchors
(`Case.extra_providers`: other libraries' versions of the op), which raise `NotApplicable` for shapes they
cannot run. For one case, mode and provider, `measure` builds the inputs, runs the provider once (that call
compiles it and is the one compared with the fp32 reference), then times it: `triton.testing.do_bench` medians
on CUDA, the fastest of several `time.perf_counter` calls on CPU; `peak_extra_mib` measures a provider's memory.
The module also knows the device's datasheet peaks, writes the results JSON and draws one PNG per family.

Minimum-traffic convention (the bytes of a row, for cases that count bytes):
    fwd: every tensor input read once + every output written once.
    bwd: every grad_output read once + every tensor input read once (the ops save their inputs, not
         their outputs) + every input gradient written once.
    A "fwd+bwd" row moves fwd + bwd bytes; its backward share is kept separately (`Row.bytes_bwd`).
Intermediates and re-reads are not counted: it is the floor a perfect kernel pays, so GB/s achieved
against the HBM peak says how close a provider runs to the bandwidth roofline.
"""

import contextlib
import dataclasses
import datetime
import functools
import importlib.metadata
import itertools
import json
import os
import platform
import re
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
RESULTS_DIR = BENCH_DIR / "results"

PROVIDERS = ("torchext", "eager", "torch.compile")  # every case has these; Case.extra_providers adds anchors
# "step": the callable is itself the whole unit of work (e.g. forward, backward and optimizer step).
MODES = ("fwd", "fwd+bwd", "step")
CPU_TIMED_CALLS = 3  # at least; more while the case's rep_ms lasts, up to CPU_MAX_CALLS
CPU_MAX_CALLS = 20

# (substrings of torch.cuda.get_device_name, HBM bytes/s, dense bf16 FLOP/s, dense int8 OP/s), from the vendors'
# datasheets. Order matters: the first entry whose substrings all occur in the name wins.
DATASHEET = (
    (("H100", "HBM3"), 3.35e12, 989e12, 1979e12),  # H100 SXM5 80GB
    (("H100", "PCIE"), 2.0e12, 756e12, 1513e12),
    (("H200",), 4.8e12, 989e12, 1979e12),
    (("A100", "80GB"), 2.0e12, 312e12, 624e12),
    (("A100", "40GB"), 1.555e12, 312e12, 624e12),
)
PEAKS = ("bf16", "int8")  # the dense compute peaks a case's FLOPs can count against (Case.peak)


def enable_interpreter_without_cuda() -> None:
    """Set TRITON_INTERPRET=1 when there is no CUDA device, so torchext runs its Triton kernels on CPU tensors.

    Call it before anything imports triton or torchext: both read the variable at import time.
    """
    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")


class NotApplicable(Exception):
    """Raised by a provider for inputs it cannot run (e.g. torch._int_mm with M <= 16): a gap, not a failure."""


def bench_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def smoke_run(device: torch.device) -> bool:
    """True on the CPU under the Triton interpreter (the smoke runs of CI and ./dev gpu --rehearse), where times and
    memory mean nothing; False on a GPU and in bench/run.py's CPU showcase (the reference path)."""
    return device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"


def dtype_name(dtype: torch.dtype) -> str:
    return {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, str(dtype))


@dataclasses.dataclass(frozen=True)
class Case:
    """One benchmarked op at one shape and dtype.

    The provider callables take the tuple `make_inputs(device, dtype)` returns, unpacked, and return the
    op's output(s); an in-place op returns the tensors it updated. Floating tensors that should get
    gradients in "fwd+bwd" mode are created with requires_grad=True. `extra_providers` are the case's
    anchors (other libraries' versions of the op), called the same way; one may raise NotApplicable.
    """

    family: str
    op: str
    shape: str  # a label for tables, e.g. "16384x4096"
    dtype: torch.dtype
    make_inputs: Callable[[torch.device, torch.dtype], tuple]
    torchext: Callable[..., Any]
    eager: Callable[..., Any]  # plain PyTorch, written the way a user would
    reference: Callable[..., Any] | None = None  # torchext.reference.*, run on fp32 copies: the error column
    compiled: Callable[..., Any] | None = None  # the torch.compile provider; by default torch.compile(eager)
    modes: tuple[str, ...] = ("fwd", "fwd+bwd")
    count_bytes: bool = True  # rows carry the minimum traffic of the module docstring
    flops: dict[str, float] = dataclasses.field(default_factory=dict)  # FLOPs per mode, for FLOP-bound cases
    gpu: bool = False  # a GPU-sized case: runs only with CUDA
    rep_ms: int = 100  # do_bench's time budget; a slow case needs more to get several samples
    summary: Callable[[dict[str, float]], str] | None = None  # {provider: ms} -> a line printed under the table
    extra_providers: dict[str, Callable[..., Any]] = dataclasses.field(default_factory=dict)  # name -> anchor
    peak: str = "bf16"  # the datasheet peak (PEAKS) that `flops` count against for % of peak
    size: Any = None  # the bench/sizes.py Size a GPU case was built from (None for smoke cases)

    def __post_init__(self):
        if unknown := set(self.modes) - set(MODES):
            raise ValueError(f"{self.op}: unknown modes {unknown}; use {MODES}")
        if clash := set(self.extra_providers) & {*PROVIDERS, "reference"}:
            raise ValueError(f"{self.op}: extra providers {clash} shadow the standard ones")
        if self.peak not in PEAKS:
            raise ValueError(f"{self.op}: unknown peak {self.peak!r}; use {PEAKS}")

    @property
    def id(self) -> str:
        return f"{self.op}-{self.shape}-{dtype_name(self.dtype)}"

    @property
    def providers(self) -> tuple[str, ...]:
        return PROVIDERS + tuple(self.extra_providers)

    def provider_fn(self, provider: str) -> Callable[..., Any]:
        if provider in self.extra_providers:
            return self.extra_providers[provider]
        if provider == "torchext":
            return self.torchext
        if provider == "eager":
            return self.eager
        if provider == "torch.compile":
            # Dynamo caches per code object and gives up after a few recompiles; every case starts clean.
            torch._dynamo.reset()
            return self.compiled or torch.compile(self.eager, dynamic=False)
        raise ValueError(f"unknown provider {provider!r}; use {self.providers}")


@dataclasses.dataclass(frozen=True)
class Showcase:
    """What a method buys whatever the device (memory, accuracy), measured when bench/run.py shows the family on a
    CPU: `measure()` returns a small table, (header, rows of cells), printed under `title`."""

    family: str
    title: str
    measure: Callable[[], tuple[list[str], list[list[str]]]]


@dataclasses.dataclass
class Row:
    """The measurement of one case x mode x provider (or why it failed, or why the provider does not apply)."""

    family: str
    op: str
    shape: str
    dtype: str
    mode: str
    provider: str
    ms: float | None = None
    max_error: float | None = None  # max |output - reference| over outputs and, in fwd+bwd, input gradients
    bytes: int | None = None  # minimum traffic of the whole mode (fwd + bwd in fwd+bwd)
    bytes_bwd: int | None = None  # the backward's share of it
    flops: float | None = None
    peak: str = "bf16"  # Case.peak: what the FLOPs' % of peak is against
    error: str | None = None
    not_applicable: str | None = None  # the provider's NotApplicable reason
    peak_mib: float | None = None  # peak extra memory of one call, where measured (the CPU showcase)

    @classmethod
    def of(cls, case: Case, provider: str, mode: str, **fields) -> "Row":
        return cls(case.family, case.op, case.shape, dtype_name(case.dtype), mode, provider, peak=case.peak,
                   **fields)

    def throughput(self, info: "DeviceInfo") -> tuple[str, float, float | None] | None:
        """(unit, rate, % of peak) on CUDA: GB/s against HBM when the row counts bytes, else TFLOP/s against the
        case's dense peak (bf16 or int8; int8 OPs count as FLOPs)."""
        if self.ms is None or info.slug == "cpu":
            return None
        seconds = self.ms * 1e-3
        if self.bytes:
            peak = info.hbm_peak or info.copy_bandwidth
            return "GB/s", self.bytes / seconds / 1e9, 100 * self.bytes / seconds / peak if peak else None
        if self.flops:
            peak = info.flop_peak(self.peak)
            return "TFLOP/s", self.flops / seconds / 1e12, 100 * self.flops / seconds / peak if peak else None
        return None

    def to_dict(self, info: "DeviceInfo") -> dict:
        unit, rate, pct = self.throughput(info) or (None, None, None)
        return {**dataclasses.asdict(self), "throughput_unit": unit, "throughput": rate, "pct_of_peak": pct}


def cases_of(sizes: list, kinds: dict[str, Callable[..., Any]]) -> list[Case]:
    """The GPU cases of a family's bench/sizes.py sizes: kinds[size.kind](**size.dims, gpu=True) gives a Case or a
    list of them, each tagged with its size."""
    cases = []
    for size in sizes:
        made = kinds[size.kind](**size.dims, gpu=True)
        cases += [dataclasses.replace(case, size=size) for case in (made if isinstance(made, list) else [made])]
    return cases


def anchors(rows: list[Row]) -> list[str]:
    """The extra providers (Case.extra_providers) that occur in rows, in order of appearance."""
    return list(dict.fromkeys(row.provider for row in rows if row.provider not in (*PROVIDERS, "reference")))


# ---- running one case -----------------------------------------------------------------------------------------------


def _tensors(obj) -> list[Tensor]:
    """The tensors in obj, looking one level into lists and tuples (e.g. the weight list of a multi-tensor op)."""
    if isinstance(obj, Tensor):
        return [obj]
    if isinstance(obj, (list, tuple)):
        return [t for item in obj for t in _tensors(item)]
    return []


def _nbytes(tensors: list[Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _as_tuple(outputs) -> tuple:
    return tuple(outputs) if isinstance(outputs, (list, tuple)) else (outputs,)


def _fp32_copies(obj):
    """obj with every floating tensor replaced by an fp32 copy (keeping requires_grad), for the reference."""
    if isinstance(obj, Tensor):
        if not obj.is_floating_point():
            return obj.clone()
        return obj.detach().to(torch.float32, copy=True).requires_grad_(obj.requires_grad)
    if isinstance(obj, (list, tuple)):
        items = [_fp32_copies(item) for item in obj]
        return type(obj)(*items) if hasattr(obj, "_fields") else type(obj)(items)  # a NamedTuple takes fields
    return obj


def _fixed_grads(outputs: tuple) -> list[Tensor]:
    """Seeded random grad_outputs: the same values for every provider and the reference, whatever the dtype."""
    generator = torch.Generator(device=outputs[0].device).manual_seed(1)
    return [torch.randn(o.shape, generator=generator, device=o.device).to(o.dtype) for o in outputs]


def _make_work(fn: Callable, args: tuple, mode: str) -> Callable[[], Any]:
    """The zero-argument call that is timed; it returns the outputs, then (fwd+bwd) the input gradients."""
    if mode == "step":
        return lambda: fn(*args)
    if mode == "fwd":
        def forward():
            with torch.no_grad():  # no autograd bookkeeping: the forward as inference runs it
                return _as_tuple(fn(*args))
        return forward

    inputs = [t for t in _tensors(args) if t.requires_grad]
    grad_outputs = []  # drawn on the first call, once the output shapes are known, then fixed

    def forward_backward():
        outputs = _as_tuple(fn(*args))
        if not grad_outputs:
            grad_outputs.extend(_fixed_grads(outputs))
        return outputs + torch.autograd.grad(outputs, inputs, grad_outputs)
    return forward_backward


def _inputs(case: Case, device: torch.device) -> tuple:
    torch.manual_seed(0)  # every provider and the reference see the same values
    return case.make_inputs(device, case.dtype)


def peak_extra_mib(case: Case, provider: str, mode: str, device: torch.device | None = None) -> float | None:
    """Memory above the inputs at the peak of one call of a provider, after a warm-up call (see `_peak_mib`); None
    when the provider does not apply."""
    device = device or bench_device()
    work = _make_work(case.provider_fn(provider), _inputs(case, device), mode)
    try:
        work()
    except NotApplicable:
        return None
    return _peak_mib(work, device)


def _peak_mib(work: Callable[[], Any], device: torch.device) -> float:
    """MiB above what is allocated at the peak of one call of `work` (outputs, saved tensors, workspace); call it
    on a warm `work`, so state a provider builds once (a model, its optimizer) is not counted. CUDA: the caching
    allocator's peak. CPU: the allocations and frees the CPU allocator reports to torch's profiler, summed in time
    order (inside torchext's custom ops too, which a dispatch-mode tracker would see as one op)."""
    if device.type != "cuda":
        return _cpu_peak_bytes(work) / 2**20
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    work()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / 2**20


def _cpu_peak_bytes(work: Callable[[], Any]) -> int:
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    with _stderr_silenced(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as profiler:
        work()
    changes = sorted((event.start_ns(), event.nbytes()) for event in profiler.profiler.kineto_results.events()
                     if event.name() == "[memory]" and event.device_type() == DeviceType.CPU)
    return max(itertools.accumulate((nbytes for _, nbytes in changes), initial=0))


@contextlib.contextmanager
def _stderr_silenced():
    """File descriptor 2 to /dev/null: the profiler's C++ side logs a line at every start and stop (torch 2.13)."""
    saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def memory_line(case: Case, mode: str, providers: tuple[str, ...]) -> str:
    """"peak extra memory torchext a MiB, eager b MiB (b/a x torchext), ..." for the providers that apply."""
    memory = {p: peak_extra_mib(case, p, mode) for p in providers}
    ours = memory.get("torchext")
    return "peak extra memory " + ", ".join(
        f"{p} {m:.4g} MiB" + (f" ({m / ours:.3g}x torchext)" if p != "torchext" and ours else "")
        for p, m in memory.items() if m is not None)


def reference_outputs(case: Case, mode: str, device: torch.device) -> tuple | None:
    """The fp32 reference's outputs (and input gradients in fwd+bwd) for `max_error`; None if the case has none."""
    if case.reference is None or mode == "step":
        return None
    return _make_work(case.reference, _fp32_copies(_inputs(case, device)), mode)()


def max_error(results: tuple, expected: tuple) -> float:
    if len(results) != len(expected):
        raise ValueError(f"{len(results)} results but the reference gave {len(expected)}")
    return max((r.detach().float() - e.detach().float()).abs().max().item() for r, e in zip(results, expected))


def min_bytes(args: tuple, results: tuple, mode: str) -> tuple[int, int | None]:
    """(bytes of the whole mode, its backward share) by the module docstring's convention."""
    inputs = _tensors(args)
    n_grads = sum(t.requires_grad for t in inputs) if mode == "fwd+bwd" else 0
    outputs, grads = results[:len(results) - n_grads], results[len(results) - n_grads:]
    fwd = _nbytes(inputs) + _nbytes(list(outputs))
    if mode != "fwd+bwd":
        return fwd, None
    bwd = _nbytes(list(outputs)) + _nbytes(inputs) + _nbytes(list(grads))
    return fwd + bwd, bwd


def time_ms(work: Callable[[], Any], device: torch.device, rep_ms: int = 100) -> float:
    """Milliseconds per call: the median of CUDA-event times by do_bench on GPU; on CPU the fastest wall-clock time
    of at least CPU_TIMED_CALLS calls, more while rep_ms lasts (other processes on a shared machine only ever slow a
    call down, and more than a median can absorb)."""
    if device.type == "cuda":
        from triton.testing import do_bench  # imported late: triton must load after enable_interpreter_without_cuda

        return do_bench(work, warmup=25, rep=rep_ms, return_mode="median")
    times = []
    while len(times) < CPU_TIMED_CALLS or (sum(times) < rep_ms * 1e-3 and len(times) < CPU_MAX_CALLS):
        start = time.perf_counter()
        work()
        times.append(time.perf_counter() - start)
    return 1e3 * min(times)


def measure(case: Case, provider: str, mode: str, device: torch.device, expected: tuple | None = None,
            timer: Callable[[Callable[[], Any], Case], float | None] | None = None, memory: bool = False) -> Row:
    """Time one case x mode x provider; errors propagate (run.py records them, pytest reports them).

    Args:
        expected: `reference_outputs(case, mode, device)`, or None to skip the error column.
        timer: (work, case) -> median ms; defaults to `time_ms`.
        memory: also measure the peak extra memory of one more call (`Row.peak_mib`).
    """
    args = _inputs(case, device)
    work = _make_work(case.provider_fn(provider), args, mode)
    results = work()  # the first call compiles / autotunes, and is the one checked
    row = Row.of(case, provider, mode, flops=case.flops.get(mode))
    if case.count_bytes and mode != "step":
        row.bytes, row.bytes_bwd = min_bytes(args, results, mode)
    if expected is not None:
        row.max_error = max_error(results, expected)
    del results
    row.ms = timer(work, case) if timer else time_ms(work, device, case.rep_ms)
    if memory:
        row.peak_mib = _peak_mib(work, device)
    return row


def describe(error: BaseException) -> str:
    """An exception as one record: its type and message (compile errors can run to pages; keep the start)."""
    return f"{type(error).__name__}: {error}"[:2000]


# ---- pytest-benchmark -----------------------------------------------------------------------------------------------


def pytest_params(cases: list[Case]) -> list:
    """pytest.param(case, provider, mode) for every combination (extra providers included); GPU-sized cases are
    marked `gpu`."""
    import pytest

    cuda = torch.cuda.is_available()
    params = []
    for case in cases:
        for mode in case.modes:
            for provider in case.providers:
                marks = []
                if case.gpu:
                    marks += [pytest.mark.gpu, pytest.mark.skipif(not cuda, reason="GPU-sized case: needs CUDA")]
                elif provider == "torch.compile" and not cuda:
                    marks.append(pytest.mark.skip(reason="torch.compile on CPU spends tens of seconds in the C++ "
                                                         "compiler; bench/run.py covers it"))
                params.append(pytest.param(case, provider, mode, id=f"{case.id}-{mode}-{provider}", marks=marks))
    return params


def _synchronised(work: Callable[[], Any], device: torch.device) -> Callable[[], None]:
    def call():
        work()
        if device.type == "cuda":
            torch.cuda.synchronize(device)  # host timers must see the kernels finish, not just their launch
    return call


def run_benchmark(benchmark, case: Case, provider: str, mode: str) -> None:
    """The body of a family's pytest-benchmark test: benchmark.pedantic timing plus the row in extra_info.

    Under --benchmark-disable pedantic makes one call, so the test is a smoke test of the case. A provider
    that raises NotApplicable skips the test.
    """
    import pytest

    device = bench_device()
    if device.type == "cpu":
        torch.set_num_threads(1)  # as bench/run.py does: OpenMP barriers stall while others hold the second core

    def timer(work, case):
        rounds = 20 if device.type == "cuda" else CPU_TIMED_CALLS
        benchmark.pedantic(_synchronised(work, device), rounds=rounds, warmup_rounds=1, iterations=1)
        return 1e3 * benchmark.stats.stats.median if benchmark.stats else None

    try:
        row = measure(case, provider, mode, device, reference_outputs(case, mode, device), timer)
    except NotApplicable as e:
        pytest.skip(f"{provider} n/a: {e}")
    benchmark.extra_info.update(row.to_dict(device_info(device)))


# ---- device facts ---------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class DeviceInfo:
    name: str
    slug: str  # the results folder, e.g. "nvidia-h100-80gb-hbm3" or "cpu"
    hbm_peak: float | None = None  # bytes/s, datasheet
    copy_bandwidth: float | None = None  # bytes/s read + written by a measured 1 GiB device-to-device copy
    bf16_peak: float | None = None  # dense FLOP/s, datasheet
    int8_peak: float | None = None  # dense OP/s, datasheet

    def flop_peak(self, peak: str) -> float | None:
        """The dense compute peak a Case.peak names."""
        return {"bf16": self.bf16_peak, "int8": self.int8_peak}[peak]


def _datasheet(name: str) -> tuple[float | None, float | None, float | None]:
    """(HBM bytes/s, bf16 FLOP/s, int8 OP/s) of the device, or Nones for one the table does not know."""
    upper = name.upper()
    for parts, *peaks in DATASHEET:
        if all(part in upper for part in parts):
            return tuple(peaks)
    return None, None, None


def _copy_bandwidth(device: torch.device) -> float:
    """The practical bandwidth ceiling: bytes read + written per second by a 1 GiB device-to-device copy."""
    src = torch.empty(2**30, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    return 2 * src.numel() / (time_ms(lambda: dst.copy_(src), device) * 1e-3)


@functools.cache
def device_info(device: torch.device) -> DeviceInfo:
    if device.type != "cuda":
        return DeviceInfo(name=f"CPU ({platform.machine()}, {os.cpu_count()} cores)", slug="cpu")
    name = torch.cuda.get_device_name(device)
    hbm, bf16, int8 = _datasheet(name)
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    return DeviceInfo(name, slug, hbm, _copy_bandwidth(device), bf16, int8)


# ---- results files --------------------------------------------------------------------------------------------------


def _git(*args: str) -> str | None:
    try:
        return subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def environment(device: torch.device) -> dict:
    """What the numbers depend on: versions, device, commit (and whether the tree had local changes), date."""
    status = _git("status", "--porcelain")
    return {
        "date": datetime.date.today().isoformat(),
        "git_sha": _git("rev-parse", "--short", "HEAD") or "nogit",
        "git_dirty": bool(status) if status is not None else None,
        "torch": torch.__version__,
        "triton": importlib.metadata.version("triton"),
        "python": platform.python_version(),
        "cuda": torch.version.cuda,
        "triton_interpret": os.environ.get("TRITON_INTERPRET") == "1",
        "device": dataclasses.asdict(device_info(device)),
    }


def results_stem(device: torch.device, env: dict) -> Path:
    """bench/results/<device-slug>/<date>-<sha>: the JSON and the PNGs share it."""
    return RESULTS_DIR / device_info(device).slug / f"{env['date']}-{env['git_sha']}"


def latest_gpu_results() -> str:
    """A line saying where the latest committed GPU results are: per GPU folder of bench/results/, the newest
    <date>-<sha>.json git tracks (every one found, in a copy that is not a git checkout), or that there are none."""
    tracked = _git("ls-files", "--", str(RESULTS_DIR.relative_to(REPO_ROOT)))
    files = RESULTS_DIR.glob("*/*.json") if tracked is None else (REPO_ROOT / name for name in tracked.splitlines())
    newest = {}
    for path in sorted(files):
        if path.suffix == ".json" and path.parent.parent == RESULTS_DIR and path.parent.name != "cpu":
            newest[path.parent.name] = path
    committed = "found" if tracked is None else "committed"
    if not newest:
        return f"GPU timings need a GPU; no GPU results are {committed} under bench/results/ yet."
    return (f"GPU timings need a GPU; the latest {committed} GPU results: "
            + ", ".join(str(path.relative_to(REPO_ROOT)) for path in newest.values()))


class ResultsFile:
    """bench/results/<device>/<date>-<sha>.json, rewritten after every row and summary line, so that a run stopped at
    any point (a time budget, a killed command) leaves everything it measured on disk."""

    def __init__(self, device: torch.device, **extra):
        self.env = {**environment(device), **extra}
        self.info = device_info(device)
        self.path = results_stem(device, self.env).with_suffix(".json")
        self.rows: list[Row] = []
        self.summaries: list[tuple[str, str]] = []  # (family, line)
        self.showcases: list[dict] = []  # the Showcase tables measured (CPU runs)

    def add(self, row: Row) -> None:
        self.rows.append(row)
        self.write()

    def add_summary(self, family: str, line: str) -> None:
        self.summaries.append((family, line))
        self.write()

    def add_showcase(self, showcase: Showcase, header: list[str], rows: list[list[str]]) -> None:
        self.showcases.append({"family": showcase.family, "title": showcase.title, "header": header, "rows": rows})
        self.write()

    def write(self) -> Path:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        payload = {"environment": self.env, "summaries": [line for _, line in self.summaries],
                   "rows": [row.to_dict(self.info) for row in self.rows],
                   **({"showcase": self.showcases} if self.showcases else {})}
        partial = self.path.with_suffix(".json.partial")
        partial.write_text(json.dumps(payload, indent=1) + "\n")
        partial.replace(self.path)  # a reader never sees half a file
        return self.path


PROVIDER_COLORS = {"torchext": "tab:green", "eager": "tab:gray", "torch.compile": "tab:blue"}
ANCHOR_COLORS = ("tab:orange", "tab:purple", "tab:brown", "tab:olive", "tab:cyan")  # extra providers, in turn
BAR_INCHES = 0.18  # figure height per bar slot of a group


def _plot_value(row: Row, info: DeviceInfo) -> tuple[str, float] | None:
    """What a bar shows: the row's GB/s or TFLOP/s on CUDA, else its time."""
    if (rate := row.throughput(info)) is not None:
        return rate[0], rate[1]
    return ("ms", row.ms) if row.ms is not None else None


def _colors(rows: list[Row], drawn: set[str]) -> dict[str, str]:
    """provider -> bar color for the drawn providers, the standard ones first; the anchors take ANCHOR_COLORS in
    the order they occur in rows (drawn or not, so a color does not depend on which shapes an anchor could run)."""
    colors = {**PROVIDER_COLORS, **dict(zip(anchors(rows), itertools.cycle(ANCHOR_COLORS)))}
    return {provider: color for provider, color in colors.items() if provider in drawn}


def _ceilings(rows: list[Row], info: DeviceInfo) -> dict[str, list[tuple[str, float | None]]]:
    """unit -> the (label, peak) lines of its panel: HBM and copy for GB/s, bf16 and the cases' peaks for TFLOP/s."""
    flop_peaks = [p for p in PEAKS if p == "bf16" or any(row.peak == p for row in rows)]
    return {"GB/s": [("HBM peak", info.hbm_peak), ("1 GiB copy", info.copy_bandwidth)],
            "TFLOP/s": [(f"{p} dense peak", info.flop_peak(p)) for p in flop_peaks]}


def _bar_panel(ax, unit: str, groups: dict[str, dict[str, float]], colors: dict[str, str],
               ceilings: list[tuple[str, float | None]]) -> None:
    """Horizontal bars: one group per (op, shape, dtype, mode), one bar per provider, the values written on."""
    height = 0.8 / len(colors)
    for i, (provider, color) in enumerate(colors.items()):
        offset = (i - (len(colors) - 1) / 2) * height
        ys = [g + offset for g, values in enumerate(groups.values()) if provider in values]
        xs = [values[provider] for values in groups.values() if provider in values]
        bars = ax.barh(ys, xs, height, label=provider, color=color)
        ax.bar_label(bars, fmt=lambda v: f"{v:.4g}", fontsize=7, padding=2)
    ax.set_yticks(range(len(groups)), list(groups), fontsize=8)
    ax.invert_yaxis()
    if unit == "ms":
        ax.set_xscale("log")  # smoke times span decades; only their order of magnitude means anything there
        ax.set_xlabel("median time per call (ms, lower is better)")
    else:
        ax.set_xlabel(f"achieved {unit} (higher is better)")
    scale = 1e9 if unit == "GB/s" else 1e12
    for (label, value), style in zip(ceilings, ("--", ":")):
        if value:
            ax.axvline(value / scale, color="tab:red", linestyle=style, label=f"{label} {value / scale:.0f}")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))  # outside: bars fill the axes
    ax.margins(x=0.15)


def plot_family(path: Path, family: str, rows: list[Row], info: DeviceInfo, note: str = "") -> Path | None:
    """One PNG per family (a panel per unit, a bar per provider with a number), `note` after the title; None when
    no row has one."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels: dict[str, dict[str, dict[str, float]]] = {}  # unit -> group label -> provider -> value
    for row in rows:
        if (value := _plot_value(row, info)) is not None:
            label = f"{row.op} {row.shape} {row.dtype} {row.mode}"
            panels.setdefault(value[0], {}).setdefault(label, {})[row.provider] = value[1]
    if not panels:
        return None
    drawn = {provider for groups in panels.values() for values in groups.values() for provider in values}
    colors = _colors(rows, drawn)
    ceilings = _ceilings(rows, info)
    heights = [len(groups) + 1 for groups in panels.values()]
    fig, axes = plt.subplots(len(panels), 1, squeeze=False, height_ratios=heights,
                             figsize=(11, 1.5 + BAR_INCHES * max(len(colors), 3) * sum(heights)))
    for ax, (unit, groups) in zip(axes[:, 0], panels.items()):
        _bar_panel(ax, unit, groups, colors, ceilings.get(unit, []))
    fig.suptitle(f"torchext {family} on {info.name}" + (f" ({note})" if note else ""), fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
