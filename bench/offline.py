"""The offline compile check: every kernel built for real GPUs, at the configurations its launcher picks, on a
machine with no GPU.

    .venv/bin/python -m bench.offline                  # compile, check, print the table
    .venv/bin/python -m bench.offline --write          # ... and write bench/results/offline/triton-<version>.md
    .venv/bin/python -m bench.offline --family ngpt    # one family (while tuning)

Triton: every size of bench/sizes.py marked `compile` runs its case's torchext op (forward, and backward where
the case has one) on CPU tensors while bench/_launches.py records the launches, exactly the ones a GPU would get
(tiles, warps, stages, 16-bit dot operands, the integers' and pointers' specialisation). Each distinct launch is
compiled for sm_80 and sm_90 by Triton's own compiler, and ptxas reports registers, spills and the stack; Triton
reports the shared memory. CUDA C++: every csrc/**/*.cu is compiled with `nvcc -Xptxas -v` for the same two.

It fails (exit status 1) when a kernel does not compile, needs more shared memory than a block gets (A100 163 KB,
H100 227 KB), spills in a forward kernel, spills in a backward kernel without a reason in ALLOWED_SPILLS, or when a
@triton.jit kernel of triton_kernels/ is launched by no compile size. The table (kernel, config, registers, spill
bytes, shared memory, tensor-core instructions) is committed under bench/results/offline/, so a change that makes a
kernel worse shows in review; tests/test_offline_build.py runs this check and compares with that file.

Run it with TRITON_INTERPRET unset: the kernels must be JIT functions, not interpreted ones.
"""

import argparse
import dataclasses
import importlib
import inspect
import multiprocessing
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
from collections import defaultdict
from concurrent.futures import Future, ProcessPoolExecutor
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script: `bench` and `examples` import

from bench import sizes as size_table  # noqa: E402
from bench._launches import Build, Launch, compile_launch, record_case  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
OFFLINE_DIR = ROOT / "bench" / "results" / "offline"
ARCHS = (80, 90)
# Shared memory one block may use (cudaDevAttrMaxSharedMemoryPerBlockOptin), bytes.
SHARED_LIMIT = {80: 163 * 1024, 90: 227 * 1024}
GPU_NAME = {80: "A100", 90: "H100"}
# Backward kernels whose spills are kept as the better trade: (kernel, a piece of its config) -> why. Each is to be
# measured on a GPU against the alternative.
_ONE_TILE_BACKWARD = ("all 512 keys of a head sit in one [512, 16] tile of scores, probabilities and their gradients: "
                      "at the smallest tiles a thread still spills at 512 tokens, tens of bytes for 16-bit maps and "
                      "up to 3.6 KB for fp32 ones. Splitting the keys would add a pass over dO; kept so that maps with "
                      "257-512 tokens (H + W (+ T)) run at all, to be timed on a GPU against a split")
ALLOWED_SPILLS: dict[tuple[str, str], str] = {
    ("_kronecker_attention_bwd_queries_kernel", "BLOCK_L=512"): _ONE_TILE_BACKWARD,
    ("_kronecker_attention_bwd_tokens_kernel", "BLOCK_L=512"): _ONE_TILE_BACKWARD,
    ("_kde_attention_bwd_dq_kernel", "VALUE_WEIGHTS=True"): (
        "sm_80 only, value-norm sampling (not the default): the per-slot column sum of dS, the weights' gradient "
        "to v, costs one more cross-warp reduction beside the 128-query tile's operands; 16 keys per step is the "
        "narrowest tile and still spills 16 bytes at head_dim 64"),
    ("_kde_attention_bwd_dq_kernel", "BLOCK_D=128"): (
        "sm_80 only: a 128-query tile (the plan's sampling tile) holds q and dO [128, 128] in 16 bits and dq "
        "[128, 128] in fp32 beside the [128, 16] scores; mma.sync keeps its operands in registers where sm_90's "
        "wgmma reads them from shared memory. Splitting the tile would split its sample set"),
}


@dataclasses.dataclass
class Row:
    """One kernel at one configuration: the worst of its specialisations for each architecture."""

    kernel: str
    config: str
    sizes: list[str]
    builds: dict[int, Build] = dataclasses.field(default_factory=dict)
    errors: dict[int, str] = dataclasses.field(default_factory=dict)

    def add(self, arch: int, build: Build) -> None:
        old = self.builds.get(arch)
        if old is None or (build.spill_bytes, build.registers, build.shared_bytes) > (
                old.spill_bytes, old.registers, old.shared_bytes):
            self.builds[arch] = build

    @property
    def backward(self) -> bool:
        return "_bwd" in self.kernel

    @property
    def spill_reason(self) -> str | None:
        """Why this backward configuration may spill (ALLOWED_SPILLS), or None."""
        if not self.backward:
            return None
        return next((why for (kernel, part), why in ALLOWED_SPILLS.items()
                     if kernel == self.kernel and part in self.config.split()), None)

    def problems(self) -> list[str]:
        found = [f"{self.kernel} [{self.config}] sm_{arch}: does not compile: {error}"
                 for arch, error in self.errors.items()]
        for arch, build in self.builds.items():
            where = f"{self.kernel} [{self.config}] sm_{arch}"
            if build.shared_bytes > SHARED_LIMIT[arch]:
                found.append(f"{where}: {build.shared_bytes / 1024:.0f} KB of shared memory, more than an "
                             f"{GPU_NAME[arch]} block gets ({SHARED_LIMIT[arch] // 1024} KB)")
            if build.spill_bytes and self.spill_reason is None:
                kind = "backward kernel with no reason in ALLOWED_SPILLS" if self.backward else "forward kernel"
                found.append(f"{where}: spills {build.spill_bytes} bytes in a {kind}")
        return found


# ---- recording ------------------------------------------------------------------------------------------------------


def record(size: size_table.Size) -> list[Launch]:
    """The launches of every case of a size, at its capture dims, on CPU tensors."""
    from bench._harness import cases_of

    cases = cases_of([size.for_capture()], importlib.import_module(f"bench.bench_{size.family}").KINDS)
    return [launch for case in cases for launch in record_case(case, torch.device("cpu"))]


def all_kernels() -> set[tuple[str, str]]:
    """(module, name) of every @triton.jit kernel (a *_kernel function) in triton_kernels/."""
    from triton.runtime.jit import JITFunction

    kernels = set()
    for path in sorted((ROOT / "triton_kernels").glob("*.py")):
        if path.stem.startswith("_"):
            continue
        module = importlib.import_module(f"torchext.triton_kernels.{path.stem}")
        kernels |= {(module.__name__, name) for name, value in inspect.getmembers(module)
                    if isinstance(value, JITFunction) and name.endswith("_kernel")}
    return kernels


# ---- compiling ------------------------------------------------------------------------------------------------------


def _compile_job(launch: Launch, arch: int) -> tuple[Build | None, str | None]:
    try:
        return compile_launch(launch, arch)[1], None
    except Exception as e:  # a compile error is a finding, not a crash of the check
        return None, f"{type(e).__name__}: {str(e).strip().splitlines()[-1][:300] if str(e).strip() else ''}"


def _nvcc() -> str | None:
    cuda_home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if cuda_home and (Path(cuda_home) / "bin" / "nvcc").exists():
        return str(Path(cuda_home) / "bin" / "nvcc")
    return shutil.which("nvcc")


_NVCC_FUNCTION = re.compile(r"Compiling entry function '([^']+)' for '(sm_\d+a?)'")
_NVCC_USED = re.compile(r"Used (\d+) registers(?:.*?(\d+) bytes smem)?")
_NVCC_SPILL = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")


def _kernel_name(demangled: str) -> str:
    """"void ns::(anonymous namespace)::kernel<ns::Real>(args)" -> "kernel<Real>"."""
    name = demangled.replace("(anonymous namespace)::", "").split("(")[0]
    return re.sub(r"\b\w+::", "", name).removeprefix("void ")


def _cuda_job(source: str, arch: int) -> list[tuple[str, Build]] | str:
    """(kernel, Build) of each __global__ function of a .cu file for sm_<arch>, or the compile error."""
    import pybind11

    with tempfile.TemporaryDirectory() as tmp:
        command = [_nvcc(), "-cubin", "-O3", "-std=c++17", "--expt-relaxed-constexpr", f"-arch=sm_{arch}",
                   "-Xptxas", "-v", f"-I{ROOT / 'csrc'}", f"-I{pybind11.get_include()}",
                   f"-I{sysconfig.get_paths()['include']}", source, "-o", f"{tmp}/out.cubin"]
        done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode:
        return done.stderr.strip()[-500:]
    builds, name, spill = [], None, (0, 0, 0)
    for line in done.stderr.splitlines():
        if m := _NVCC_FUNCTION.search(line):
            name = subprocess.run(["c++filt"], input=m.group(1), capture_output=True, text=True).stdout.strip()
            name = _kernel_name(name)
        elif m := _NVCC_SPILL.search(line):
            spill = tuple(map(int, m.groups()))
        elif (m := _NVCC_USED.search(line)) and name:
            builds.append((name, Build(registers=int(m.group(1)), spill_bytes=spill[1] + spill[2],
                                       stack_bytes=spill[0], shared_bytes=int(m.group(2) or 0), tensor_cores="-",
                                       tma=False)))
            name = None
    return builds


# ---- the table ------------------------------------------------------------------------------------------------------


def _cell(row: Row, field: str) -> str:
    values = []
    for arch in ARCHS:
        if arch in row.errors:
            values.append("ERROR")
        elif arch in row.builds:
            value = getattr(row.builds[arch], field)
            values.append(f"{value / 1024:.0f}K" if field == "shared_bytes" else str(value))
        else:
            values.append("-")
    return " / ".join(values)


def table(rows: list[Row]) -> str:
    header = ["kernel", "config", "registers", "spill bytes", "shared memory", "tensor cores", "sizes"]
    reasons = {}
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        spills = _cell(row, "spill_bytes")
        if row.spill_reason and any(b.spill_bytes for b in row.builds.values()):
            number = reasons.setdefault(row.spill_reason, len(reasons) + 1)
            spills += f" (kept: [{number}])"
        lines.append("| " + " | ".join([row.kernel, f"`{row.config}`", _cell(row, "registers"), spills,
                                        _cell(row, "shared_bytes"), _cell(row, "tensor_cores"),
                                        "<br>".join(row.sizes)]) + " |")
    lines += ["", *(f"[{number}] {why}" for why, number in reasons.items())] if reasons else []
    return "\n".join(lines)


def summary(rows: list[Row], n_launches: int) -> list[str]:
    lines = [f"{len({r.kernel for r in rows})} kernels, {len(rows)} configurations ({n_launches} distinct "
             f"specialised launches), each compiled for " + " and ".join(f"sm_{a}" for a in ARCHS) + "."]
    for arch in ARCHS:
        built = [(r.builds[arch], r) for r in rows if arch in r.builds]
        if not built:
            continue
        most_regs = max(built, key=lambda b: b[0].registers)
        most_spill = max(built, key=lambda b: b[0].spill_bytes)
        most_shared = max(built, key=lambda b: b[0].shared_bytes)
        lines.append(f"sm_{arch}: most registers {most_regs[0].registers} ({most_regs[1].kernel}); most spill bytes "
                     f"{most_spill[0].spill_bytes} ({most_spill[1].kernel if most_spill[0].spill_bytes else '-'}); "
                     f"most shared memory {most_shared[0].shared_bytes / 1024:.0f} KB ({most_shared[1].kernel}, "
                     f"limit {SHARED_LIMIT[arch] // 1024} KB)")
    return lines


def report(triton_rows: list[Row], cuda_rows: list[Row], n_launches: int, problems: list[str]) -> str:
    import triton

    parts = [f"# Offline GPU build: Triton {triton.__version__}, torch {torch.__version__}", "",
             "Written by `python -m bench.offline --write` (no GPU needed): every Triton kernel at the configurations "
             "its launcher picks for the compile sizes of bench/sizes.py, and every CUDA C++ kernel, compiled for "
             "sm_80 / sm_90 (each cell: sm_80 / sm_90). Spill bytes are ptxas's spill stores + loads; shared memory "
             "is per block.", "", *[f"- {line}" for line in summary(triton_rows, n_launches)],
             f"- Problems: {len(problems)}" + "".join(f"\n  - {p}" for p in problems), "",
             "## Triton", "", table(triton_rows), "", "## CUDA C++ (nvcc -Xptxas -v)", "", table(cuda_rows), ""]
    return "\n".join(parts)


def results_path() -> Path:
    import triton

    return OFFLINE_DIR / f"triton-{triton.__version__}.md"


# ---- the check ------------------------------------------------------------------------------------------------------


def run(families: list[str], jobs: int, with_cuda: bool) -> tuple[list[Row], list[Row], int, list[str]]:
    """(Triton rows, CUDA C++ rows, distinct launches, problems)."""
    started = time.perf_counter()
    context = multiprocessing.get_context("spawn")  # workers import Triton afresh, never interpreted
    pending: list[tuple[Launch, int, Future]] = []
    seen: dict[tuple, Launch] = {}
    used_by: dict[tuple, list[str]] = defaultdict(list)
    with ProcessPoolExecutor(jobs, mp_context=context) as pool:
        cuda_futures = {}
        if with_cuda and _nvcc():
            cuda_futures = {(source, arch): pool.submit(_cuda_job, str(source), arch)
                            for source in sorted((ROOT / "csrc").rglob("*.cu")) for arch in ARCHS}
        for family in families:
            for size in size_table.of(family):
                if not size.compile:
                    continue
                for launch in record(size):
                    key = launch.specialization()
                    if size.label not in used_by[key]:
                        used_by[key].append(size.label)
                    if key not in seen:
                        seen[key] = launch
                        pending += [(launch, arch, pool.submit(_compile_job, launch, arch)) for arch in ARCHS]
        print(f"offline: recorded {len(seen)} distinct launches in {time.perf_counter() - started:.0f} s; compiling "
              f"{len(pending)} on {jobs} workers", file=sys.stderr, flush=True)
        rows: dict[tuple[str, str], Row] = {}
        for launch, arch, future in pending:
            row = rows.setdefault((launch.kernel, launch.config()), Row(launch.kernel, launch.config(), []))
            for label in used_by[launch.specialization()]:
                if label not in row.sizes:
                    row.sizes.append(label)
            build, error = future.result()
            if error:
                row.errors[arch] = error
            else:
                row.add(arch, build)
        cuda_rows: dict[str, Row] = {}
        for (source, arch), future in cuda_futures.items():
            result = future.result()
            label = str(source.relative_to(ROOT))
            if isinstance(result, str):
                cuda_rows.setdefault(label, Row(label, "-", [label])).errors[arch] = result
                continue
            for kernel, build in result:
                cuda_rows.setdefault(kernel, Row(kernel, "-", [label])).add(arch, build)
    triton_rows = sorted(rows.values(), key=lambda r: (r.kernel, r.config))
    problems = [p for row in [*triton_rows, *cuda_rows.values()] for p in row.problems()]
    if len(families) == len(size_table.TABLE):
        launched = {(launch.module, launch.kernel) for launch in seen.values()}
        problems += [f"{module}.{name}: launched by no compile size of bench/sizes.py"
                     for module, name in sorted(all_kernels() - launched)]
    print(f"offline: done in {time.perf_counter() - started:.0f} s", file=sys.stderr)
    return triton_rows, sorted(cuda_rows.values(), key=lambda r: r.kernel), len(seen), problems


def main(argv: list[str] | None = None) -> int:
    if os.environ.get("TRITON_INTERPRET") == "1":
        sys.exit("bench.offline compiles JIT kernels: run it with TRITON_INTERPRET unset")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", action="append", choices=sorted(size_table.TABLE), help="only these families")
    parser.add_argument("--jobs", type=int, default=os.cpu_count(), help="compile workers (default: every core)")
    parser.add_argument("--write", action="store_true", help="write the table to bench/results/offline/")
    parser.add_argument("--output", type=Path, help="write the table here instead")
    args = parser.parse_args(argv)
    families = args.family or list(size_table.TABLE)
    triton_rows, cuda_rows, n_launches, problems = run(families, args.jobs, with_cuda=args.family is None)
    text = report(triton_rows, cuda_rows, n_launches, problems)
    print(text)
    if args.write or args.output:
        path = args.output or results_path()
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        print(f"offline: wrote {path}", file=sys.stderr)
    for problem in problems:
        print(f"offline: PROBLEM: {problem}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
