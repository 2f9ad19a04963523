"""The benchmark showcase, `./dev bench`: what torchext does on this machine, family by family.

    .venv/bin/python bench/run.py [--quick] [--family ngpt] [--budget SECONDS]

On a GPU: every GPU-sized case of every bench/bench_<family>.py (its CASES), for each mode and provider. Columns:
max error against the fp32 reference, median time of torchext / eager PyTorch / torch.compile of it / each anchor
the family's cases name (Case.extra_providers), torchext's speed-up over the better of eager and torch.compile
and, with anchors, over the best anchor, and torchext's achieved GB/s (or TFLOP/s) and its share of the datasheet
peak (HBM, or the case's bf16 or int8 compute peak); the cases' summary lines under each table.

Without a GPU: what a CPU user gets. On CPU tensors torchext's ops run their CPU path, the PyTorch reference (int8:
torch._int_mm), never the Triton interpreter here (TRITON_INTERPRET is ignored); each family's CPU_CASES time it
against the plain PyTorch way and the anchors that run on a CPU, at sizes where the time means something, with
the peak extra memory of torchext and eager; its SHOWCASE tables then measure what the method buys whatever the
device (weight and cache memory, accuracy against exact attention, bound against the exact norm). No GPU target
appears, and torch.compile is left out (its C++ compiles would take minutes); the header says where the latest
committed GPU results are.

A progress bar counts the measurements, with an ETA; each family's table is printed as soon as the family is done.
Every row is written to bench/results/<device>/<date>-<sha>.json as soon as it is measured (a run cut short keeps
what it measured), and a PNG per family at the end. A failing case or provider is recorded in its cell (FAIL[n],
the error in footnote n) and the run goes on; an anchor that cannot run a shape shows n/a[n], its reason in
footnote n.
"""

import argparse
import importlib
import importlib.util
import os
import signal
import sys
import time
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script: `bench` and `examples` import

from bench._harness import (BENCH_DIR, PROVIDERS, Case, DeviceInfo, NotApplicable, ResultsFile, Row,  # noqa: E402
                            Showcase, anchors, bench_device, describe, device_info, latest_gpu_results, measure,
                            plot_family, reference_outputs)  # imports torch only

CPU_PROVIDERS = ("torchext", "eager")  # the CPU showcase leaves torch.compile out
SMOKE = ("No CUDA device: small shapes on CPU (reference path / Triton interpreter); times are not performance "
         "numbers, GPU numbers need a GPU.")
CPU_PATH = ("No CUDA device: torchext's ops run their CPU path on CPU tensors (the PyTorch reference; int8: "
            "torch._int_mm), what you get here. "
            "ms: the fastest of several calls; \"speed-up\": torchext's over eager PyTorch; \"err\": the max "
            "|difference| from the fp32 reference (0 where the CPU path is that reference); MiB: the peak memory a "
            "call adds.")


def discover(only: str | None) -> tuple[dict[str, ModuleType], list[str]]:
    """{family: module} of every bench/bench_<family>.py, and the import errors of those that failed."""
    families, errors = {}, []
    for path in sorted(BENCH_DIR.glob("bench_*.py")):
        family = path.stem.removeprefix("bench_")
        if only and family != only:
            continue
        try:
            families[family] = importlib.import_module(f"bench.{path.stem}")
        except Exception as e:  # one broken family must not hide the others
            errors.append(f"family {family}: {describe(e)}")
    return families, errors


def row_line(row: Row) -> str:
    """One measured row as a line (bench/gpu.py logs each as it is measured)."""
    where = f"{row.family} {row.op} {row.shape} {row.dtype} {row.mode} {row.provider}"
    if row.error:
        return f"  {where}: FAIL {row.error.splitlines()[0][:200]}"
    if row.not_applicable:
        return f"  {where}: n/a ({row.not_applicable[:120]})"
    error = "" if row.max_error is None else f", max error {row.max_error:.2e}"
    return f"  {where}: {row.ms:.4g} ms{error}"


def print_row(row: Row) -> None:
    print(row_line(row), file=sys.stderr, flush=True)


def run_case(case: Case, device, providers: tuple[str, ...], results: ResultsFile,
             on_row: Callable[[Row], None] = print_row, memory: tuple[str, ...] = ()) -> None:
    """Every mode x provider (the given ones, then the case's anchors) of one case. A failure becomes a row with
    its error ("reference" if the check failed), a NotApplicable one with its reason; the providers in `memory`
    also get their peak extra memory. Each row goes to `on_row`, and to `results`, as soon as it is measured; so
    does the case's summary line."""
    rows = []

    def add(row: Row) -> None:
        rows.append(row)
        results.add(row)
        on_row(row)

    for mode in case.modes:
        try:
            expected = reference_outputs(case, mode, device)
        except Exception as e:
            expected = None
            add(Row.of(case, "reference", mode, error=describe(e)))
        for provider in (*providers, *case.extra_providers):
            try:
                add(measure(case, provider, mode, device, expected, memory=provider in memory))
            except NotApplicable as e:
                add(Row.of(case, provider, mode, not_applicable=str(e)))
            except Exception as e:
                add(Row.of(case, provider, mode, error=describe(e)))
    if case.summary:
        results.add_summary(case.family, case.summary({r.provider: r.ms for r in rows if r.ms is not None}))


class BudgetSpent(BaseException):
    """Raised inside a case when the deadline passes (a BaseException: run_case records Exceptions as failures)."""


@contextmanager
def deadline_alarm(deadline: float):
    """Interrupt the block with BudgetSpent at the deadline (time.time() seconds; inf: never)."""
    if deadline == float("inf"):  # setitimer cannot take it
        yield
        return

    def stop(signum, frame):
        raise BudgetSpent()

    previous = signal.signal(signal.SIGALRM, stop)
    signal.setitimer(signal.ITIMER_REAL, max(deadline - time.time(), 0.01))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def run_until(cases: list[Case], device, providers: Callable[[Case], tuple[str, ...]], results: ResultsFile,
              deadline: float, say: Callable[[str], None] = print, **run_case_options
              ) -> list[tuple[Case, list[Row]]]:
    """Run cases in order until the deadline; a case still running then is cut off and keeps the rows it measured
    (they are in `results`, on disk, already). Returns (case, its rows) of each case run."""
    done = []
    for case in cases:
        if time.time() > deadline:
            say(f"budget spent: {len(cases) - len(done)} cases not run")
            break
        start = len(results.rows)
        try:
            with deadline_alarm(deadline):
                run_case(case, device, providers(case), results, **run_case_options)
        except BudgetSpent:
            say(f"budget spent inside {case.family} {case.id}: its rows so far are kept")
            done.append((case, results.rows[start:]))
            break
        done.append((case, results.rows[start:]))
    return done


def run_showcases(showcases: list[Showcase], results: ResultsFile, deadline: float,
                  done: Callable[[], None]) -> int:
    """Measure each showcase table into `results` until the deadline (a failure is recorded as its table); returns
    the number that failed."""
    failed = 0
    for showcase in showcases:
        if time.time() > deadline:
            break
        try:
            with deadline_alarm(deadline):
                header, rows = showcase.measure()
        except BudgetSpent:
            break
        except Exception as e:
            header, rows = ["FAILED"], [[describe(e).splitlines()[0][:300]]]
            failed += 1
        results.add_showcase(showcase, header, rows)
        done()
    return failed


def family_block(family: str, results: ResultsFile, info: DeviceInfo) -> str:
    """A family's table, its footnotes, its summary lines and (CPU) its showcase tables."""
    notes = Footnotes()  # numbered per table
    rows = [row for row in results.rows if row.family == family]
    lines = ["", f"== {family} ==", table(rows, info, notes) if rows else "(no rows measured)", *notes.lines()]
    lines += [line for name, line in results.summaries if name == family]
    for showcase in results.showcases:
        if showcase["family"] == family:
            lines += ["", showcase["title"], format_table(showcase["header"], showcase["rows"])]
    return "\n".join(lines)


def print_tables(results: ResultsFile, info: DeviceInfo) -> None:
    """The block of every family in `results`, in the order they were measured."""
    for family in dict.fromkeys(row.family for row in results.rows):
        print(family_block(family, results, info))


class Footnotes:
    """Numbered notes, so a cell stays narrow: FAIL[n] for a failure, n/a[n] for a provider that does not apply.
    An n/a reason recurs across shapes, so equal texts share their number."""

    def __init__(self):
        self.texts: list[str] = []

    def _number(self, text: str) -> int:
        if text not in self.texts:
            self.texts.append(text)
        return self.texts.index(text) + 1

    def cell(self, row: Row) -> str:
        if row.not_applicable:
            return f"n/a[{self._number(f'{row.provider} n/a: {row.not_applicable}')}]"
        where = f"{row.family} {row.op} {row.shape} {row.mode} {row.provider}"
        return f"FAIL[{self._number(f'{where}: {row.error.splitlines()[0][:300]}')}]"

    def lines(self) -> list[str]:
        return [f"[{i}] {text}" for i, text in enumerate(self.texts, 1)]


def _time_cell(row: Row | None, notes: Footnotes) -> str:
    if row is None:
        return "-"
    return notes.cell(row) if row.error or row.not_applicable else f"{row.ms:.4g}"


def _error_cell(row: Row | None, reference_cell: str | None) -> str:
    if reference_cell:  # the reference failed, so there is nothing to compare with
        return reference_cell
    return "-" if row is None or row.max_error is None else f"{row.max_error:.1e}"


def _memory_cell(row: Row | None) -> str:
    return "-" if row is None or row.peak_mib is None else f"{row.peak_mib:.4g}"


def _speedup_cell(by_provider: dict[str, Row], baselines: list[str]) -> str:
    """torchext's speed-up over the fastest of `baselines` that ran."""
    ours = by_provider.get("torchext")
    others = [by_provider[name].ms for name in baselines if name in by_provider and by_provider[name].ms]
    if ours is None or not ours.ms or not others:
        return "-"
    return f"{min(others) / ours.ms:.3g}x"


def _rate_cells(row: Row | None, info: DeviceInfo) -> list[str]:
    rate = row.throughput(info) if row is not None else None
    if rate is None:
        return ["-", "-"]
    unit, value, pct = rate
    return [f"{value:.4g} {unit}", "-" if pct is None else f"{pct:.0f}%"]


def table(rows: list[Row], info: DeviceInfo, notes: Footnotes) -> str:
    """One line per op x shape x dtype x mode, the providers side by side: the standard ones, then a column for each
    anchor that occurs in `rows` (one family's, since families have different anchors). On a GPU: errors, times,
    speed-ups and torchext's rate against the peak; on the CPU: the times and speed-ups, errors and the memory of
    torchext and eager (no compile column, no rates)."""
    groups: dict[tuple, dict[str, Row]] = {}
    for row in rows:
        groups.setdefault((row.family, row.op, row.shape, row.dtype, row.mode), {})[row.provider] = row
    extra = anchors(rows)
    gpu = info.slug != "cpu"
    timed = PROVIDERS if gpu else CPU_PROVIDERS
    errors = ["err torchext", "err eager"]
    speedups = ["speed-up", *(["vs best anchor"] if extra else [])]
    times = [*(f"{'compile' if p == 'torch.compile' else p} ms" for p in timed), *(f"{name} ms" for name in extra)]
    if gpu:
        header = ["family", "op", "shape", "dtype", "mode", *errors, *times, *speedups, "torchext rate", "% peak"]
    else:
        header = ["op", "shape", "dtype", "mode", *times, *speedups, *errors, "torchext MiB", "eager MiB"]
    lines = []
    for key, by_provider in groups.items():
        reference_cell = notes.cell(by_provider["reference"]) if "reference" in by_provider else None
        error_cells = [_error_cell(by_provider.get(p), reference_cell) for p in ("torchext", "eager")]
        time_cells = [_time_cell(by_provider.get(p), notes) for p in (*timed, *extra)]
        speedup_cells = [_speedup_cell(by_provider, ["eager", "torch.compile"])]
        if extra:
            speedup_cells.append(_speedup_cell(by_provider, extra))
        if gpu:
            lines.append([*key, *error_cells, *time_cells, *speedup_cells,
                          *_rate_cells(by_provider.get("torchext"), info)])
        else:
            lines.append([*key[1:], *time_cells, *speedup_cells, *error_cells,
                          *(_memory_cell(by_provider.get(p)) for p in ("torchext", "eager"))])
    return format_table(header, lines)


def format_table(header: list[str], lines: list[list[str]]) -> str:
    """Columns padded to their widest cell, a rule under the header."""
    widths = [max(len(line[i]) for line in [header, *lines]) for i in range(len(header))]
    text = ["  ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip() for line in [header, *lines]]
    return "\n".join([text[0], "  ".join("-" * w for w in widths), *text[1:]])


def device_header(info: DeviceInfo) -> str:
    if info.slug == "cpu":
        if os.environ.get("TRITON_INTERPRET") == "1":  # bench/gpu.py --rehearse: smoke sizes on the interpreter
            return f"Device: {info.name}\n{SMOKE}"
        threads = torch.get_num_threads()
        return (f"Device: {info.name}; torch {torch.__version__}, {threads} thread{'s' * (threads > 1)}\n"
                f"{CPU_PATH}\n{latest_gpu_results()}")
    peak = f"{info.hbm_peak / 1e12:.2f} TB/s" if info.hbm_peak else "unknown (using the copy bandwidth for % peak)"
    copy = f"{info.copy_bandwidth / 1e12:.2f} TB/s"
    if info.hbm_peak:
        copy += f" ({100 * info.copy_bandwidth / info.hbm_peak:.0f}% of peak)"
    bf16 = f"{info.bf16_peak / 1e12:.0f} TFLOP/s" if info.bf16_peak else "unknown"
    int8 = f"{info.int8_peak / 1e12:.0f} TOP/s" if info.int8_peak else "unknown"
    return (f"Device: {info.name}; HBM peak {peak}; measured 1 GiB copy {copy}; bf16 dense peak {bf16}; "
            f"int8 dense peak {int8}")


def plan(families: dict[str, ModuleType], gpu: bool) -> dict[str, tuple[list[Case], list[Showcase]]]:
    """{family: (cases, showcases)} to run: the GPU-sized CASES on a GPU, CPU_CASES and SHOWCASE on the CPU."""
    if gpu:
        return {name: ([case for case in module.CASES if case.gpu], []) for name, module in families.items()}
    return {name: (module.CPU_CASES, module.SHOWCASE) for name, module in families.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="skip the torch.compile provider on a GPU (its "
                                                             "compiles dominate the run time)")
    parser.add_argument("--family", help="only bench/bench_<FAMILY>.py, e.g. ngpt")
    parser.add_argument("--budget", type=float, default=float("inf"),
                        help="stop after this many seconds, keeping every row measured so far (default: no limit)")
    args = parser.parse_args(argv)
    deadline = time.time() + args.budget
    if args.family and not (BENCH_DIR / f"bench_{args.family}.py").exists():
        parser.error(f"no bench/bench_{args.family}.py")

    device = bench_device()
    gpu = device.type == "cuda"
    if not gpu:
        # One thread: on a machine others share, OpenMP's barriers stall for milliseconds whenever another process
        # holds a core (a 2-thread SVD ran 40x slower under load), and torchext and eager share the same thread.
        torch.set_num_threads(1)
        if os.environ.pop("TRITON_INTERPRET", None):  # before the families import torchext
            print("bench: TRITON_INTERPRET is ignored: the CPU showcase times the path CPU users get", flush=True)
    print("bench: measuring the device" if gpu else "bench: reading the device", flush=True)
    info = device_info(device)
    print("bench: importing the benchmark families (torchext, the anchors' libraries)", flush=True)
    families, import_errors = discover(args.family)
    print(device_header(info), flush=True)
    providers = PROVIDERS if gpu else CPU_PROVIDERS
    providers = tuple(p for p in providers if not (args.quick and p == "torch.compile"))
    work = plan(families, gpu)
    steps = sum(len(case.modes) * len((*providers, *case.extra_providers)) + bool(case.summary)
                for cases, _ in work.values() for case in cases)
    steps += sum(len(showcases) for _, showcases in work.values())

    from tqdm import tqdm  # imported here: bench/gpu.py, which imports this module, logs rows instead

    results = ResultsFile(device)
    failed_showcases = 0
    # smoothing 0: the ETA from the mean time per step so far (steps differ by 100x; a moving average jumps).
    with tqdm(total=steps, unit="step", dynamic_ncols=True, file=sys.stderr, smoothing=0) as bar:
        def on_row(row: Row) -> None:
            if row.provider != "reference":  # a failed reference is a row of its own, not a step
                bar.update()
            if row.error:
                bar.write(row_line(row), file=sys.stderr)

        for family, (cases, showcases) in work.items():
            bar.set_description(family)
            summaries = len(results.summaries)
            run_until(cases, device, lambda case: providers, results, deadline, say=bar.write, on_row=on_row,
                      memory=() if gpu else CPU_PROVIDERS)
            bar.update(len(results.summaries) - summaries)
            failed_showcases += run_showcases(showcases, results, deadline, done=bar.update)
            bar.write(family_block(family, results, info))
    for line in import_errors:
        print(line)
    print(f"\nresults: {results.path}")
    write_plots(results)
    return 1 if import_errors or failed_showcases or any(row.error for row in results.rows) else 0


def write_plots(results: ResultsFile) -> None:
    """One PNG per family next to the JSON (none, with a line saying so, without matplotlib)."""
    if importlib.util.find_spec("matplotlib") is None:
        print("plots:   skipped (matplotlib is not installed)")
        return
    if results.env["triton_interpret"]:
        note = "Triton interpreter smoke run: not performance numbers"
    else:
        note = "" if results.info.slug != "cpu" else "CPU: torchext's PyTorch reference path"
    stem = results.path.with_suffix("")
    for family in dict.fromkeys(row.family for row in results.rows):
        rows = [row for row in results.rows if row.family == family]
        if png := plot_family(stem.with_name(f"{stem.name}-{family}.png"), family, rows, results.info, note):
            print(f"plot:    {png}")


if __name__ == "__main__":
    sys.exit(main())
