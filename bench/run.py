"""The benchmark showcase: every case of every bench/bench_<family>.py, for each mode and provider, a table per family.

    .venv/bin/python bench/run.py [--quick] [--family ngpt] [--budget SECONDS]

Columns: max error against the fp32 reference, median time of torchext / eager PyTorch / torch.compile of
it / each anchor the family's cases name (Case.extra_providers), torchext's speed-up over the better of
eager and torch.compile and, with anchors, over the best anchor, and on a GPU torchext's achieved GB/s (or
TFLOP/s) and its share of the datasheet peak (HBM, or the case's bf16 or int8 compute peak). Each row is
printed and written to bench/results/<device>/<date>-<sha>.json as soon as it is measured (a run cut short keeps
what it measured); the tables and a PNG per family come at the end. A failing case or provider is
recorded in its cell (FAIL[n], the error in footnote n) and the run goes on; an anchor that cannot run a
shape shows n/a[n], its reason in footnote n. Without CUDA the same tables run at smoke sizes on the
CPU; those times are not performance numbers.
"""

import argparse
import importlib
import importlib.util
import signal
import sys
import time
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script: `bench` and `examples` import

from bench._harness import (BENCH_DIR, PROVIDERS, Case, DeviceInfo, NotApplicable, ResultsFile, Row,  # noqa: E402
                            anchors, bench_device, describe, device_info, enable_interpreter_without_cuda, measure,
                            plot_family, reference_outputs)  # imports torch only

enable_interpreter_without_cuda()  # before discover() imports the families, which import triton and torchext

NO_CUDA = ("No CUDA device: small shapes on CPU (reference path / Triton interpreter); times are not performance "
           "numbers, GPU numbers need a GPU.")


def discover(only: str | None) -> tuple[dict[str, list[Case]], list[str]]:
    """{family: CASES} of every bench/bench_<family>.py, and the import errors of those that failed."""
    families, errors = {}, []
    for path in sorted(BENCH_DIR.glob("bench_*.py")):
        family = path.stem.removeprefix("bench_")
        if only and family != only:
            continue
        try:
            families[family] = importlib.import_module(f"bench.{path.stem}").CASES
        except Exception as e:  # one broken family must not hide the others
            errors.append(f"family {family}: {describe(e)}")
    return families, errors


def row_line(row: Row) -> str:
    """One measured row as a line, printed as soon as it is measured."""
    where = f"{row.family} {row.op} {row.shape} {row.dtype} {row.mode} {row.provider}"
    if row.error:
        return f"  {where}: FAIL {row.error.splitlines()[0][:200]}"
    if row.not_applicable:
        return f"  {where}: n/a ({row.not_applicable[:120]})"
    error = "" if row.max_error is None else f", max error {row.max_error:.2e}"
    return f"  {where}: {row.ms:.4g} ms{error}"


def run_case(case: Case, device, providers: tuple[str, ...], results: ResultsFile) -> None:
    """Every mode x provider (the given ones, then the case's anchors) of one case. A failure becomes a row with
    its error ("reference" if the check failed), a NotApplicable one with its reason. Each row is printed, and
    added to `results`, as soon as it is measured; so is the case's summary line."""
    rows = []

    def add(row: Row) -> None:
        rows.append(row)
        print(row_line(row), file=sys.stderr, flush=True)
        results.add(row)

    for mode in case.modes:
        try:
            expected = reference_outputs(case, mode, device)
        except Exception as e:
            expected = None
            add(Row.of(case, "reference", mode, error=describe(e)))
        for provider in (*providers, *case.extra_providers):
            try:
                add(measure(case, provider, mode, device, expected))
            except NotApplicable as e:
                add(Row.of(case, provider, mode, not_applicable=str(e)))
            except Exception as e:
                add(Row.of(case, provider, mode, error=describe(e)))
    if case.summary:
        results.add_summary(case.summary({r.provider: r.ms for r in rows if r.ms is not None}))


class BudgetSpent(BaseException):
    """Raised inside a case when the deadline passes (a BaseException: run_case records Exceptions as failures)."""


@contextmanager
def deadline_alarm(deadline: float):
    """Interrupt the block with BudgetSpent at the deadline (time.time() seconds)."""
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
              deadline: float, say: Callable[[str], None] = print) -> list[tuple[Case, list[Row]]]:
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
                run_case(case, device, providers(case), results)
        except BudgetSpent:
            say(f"budget spent inside {case.family} {case.id}: its rows so far are kept")
            done.append((case, results.rows[start:]))
            break
        done.append((case, results.rows[start:]))
    return done


def print_tables(rows: list[Row], summaries: list[str], info: DeviceInfo) -> None:
    """A table per family, then its summary lines and footnotes."""
    families = list(dict.fromkeys(row.family for row in rows))
    for family in families:
        notes = Footnotes()  # numbered per table
        print()
        print(table([row for row in rows if row.family == family], info, notes))
        for line in notes.lines():
            print(line)
    for line in summaries:
        print(line)


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
    """One line per family x op x shape x dtype x mode, the providers side by side: the standard ones, then a
    column for each anchor that occurs in `rows` (one family's, since families have different anchors)."""
    groups: dict[tuple, dict[str, Row]] = {}
    for row in rows:
        groups.setdefault((row.family, row.op, row.shape, row.dtype, row.mode), {})[row.provider] = row
    extra = anchors(rows)
    gpu = info.slug != "cpu"
    header = ["family", "op", "shape", "dtype", "mode", "err torchext", "err eager", "torchext ms", "eager ms",
              "compile ms", *(f"{name} ms" for name in extra), "speed-up", *(["vs best anchor"] if extra else []),
              *(["torchext rate", "% peak"] if gpu else [])]
    lines = [header]
    for key, by_provider in groups.items():
        reference_cell = notes.cell(by_provider["reference"]) if "reference" in by_provider else None
        cells = [*key, _error_cell(by_provider.get("torchext"), reference_cell),
                 _error_cell(by_provider.get("eager"), reference_cell),
                 *(_time_cell(by_provider.get(p), notes) for p in (*PROVIDERS, *extra)),
                 _speedup_cell(by_provider, ["eager", "torch.compile"])]
        if extra:
            cells.append(_speedup_cell(by_provider, extra))
        lines.append(cells + (_rate_cells(by_provider.get("torchext"), info) if gpu else []))
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    text = ["  ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip() for line in lines]
    return "\n".join([text[0], "  ".join("-" * w for w in widths), *text[1:]])


def device_header(info: DeviceInfo) -> str:
    if info.slug == "cpu":
        return f"Device: {info.name}\n{NO_CUDA}"
    peak = f"{info.hbm_peak / 1e12:.2f} TB/s" if info.hbm_peak else "unknown (using the copy bandwidth for % peak)"
    copy = f"{info.copy_bandwidth / 1e12:.2f} TB/s"
    if info.hbm_peak:
        copy += f" ({100 * info.copy_bandwidth / info.hbm_peak:.0f}% of peak)"
    bf16 = f"{info.bf16_peak / 1e12:.0f} TFLOP/s" if info.bf16_peak else "unknown"
    int8 = f"{info.int8_peak / 1e12:.0f} TOP/s" if info.int8_peak else "unknown"
    return (f"Device: {info.name}; HBM peak {peak}; measured 1 GiB copy {copy}; bf16 dense peak {bf16}; "
            f"int8 dense peak {int8}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="skip the torch.compile provider (its compiles "
                                                             "dominate the run time)")
    parser.add_argument("--family", help="only bench/bench_<FAMILY>.py, e.g. ngpt")
    parser.add_argument("--budget", type=float, default=float("inf"),
                        help="stop after this many seconds, keeping every row measured so far (default: no limit)")
    args = parser.parse_args(argv)
    deadline = time.time() + args.budget
    if args.family and not (BENCH_DIR / f"bench_{args.family}.py").exists():
        parser.error(f"no bench/bench_{args.family}.py")

    device = bench_device()
    if device.type == "cpu":
        # Smoke numbers only: one thread keeps a shared machine usable, and spares the compiled kernels'
        # OpenMP barriers, which stall for milliseconds when another process holds the second core.
        torch.set_num_threads(1)
    info = device_info(device)
    print(device_header(info), flush=True)
    families, import_errors = discover(args.family)
    providers = tuple(p for p in PROVIDERS if not (args.quick and p == "torch.compile"))

    results = ResultsFile(device)
    fitting = [case for cases in families.values() for case in cases if case.gpu == (device.type == "cuda")]
    run_until(fitting, device, lambda case: providers, results, deadline)
    rows = results.rows
    print_tables(rows, results.summaries, info)
    for line in import_errors:
        print(line)
    print(f"\nresults: {results.path}")
    write_plots(results)
    return 1 if import_errors or any(row.error for row in rows) else 0


def write_plots(results: ResultsFile) -> None:
    """One PNG per family next to the JSON (none, with a line saying so, without matplotlib)."""
    if importlib.util.find_spec("matplotlib") is None:
        print("plots:   skipped (matplotlib is not installed)")
        return
    stem = results.path.with_suffix("")
    for family in dict.fromkeys(row.family for row in results.rows):
        rows = [row for row in results.rows if row.family == family]
        if png := plot_family(stem.with_name(f"{stem.name}-{family}.png"), family, rows, results.info):
            print(f"plot:    {png}")


if __name__ == "__main__":
    sys.exit(main())
