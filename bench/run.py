"""The benchmark showcase: every case of every bench/bench_<family>.py, for each mode and provider, in one table.

    .venv/bin/python bench/run.py [--quick] [--family ngpt]

Columns: max error against the fp32 reference, median time of torchext / eager PyTorch / torch.compile of
it, torchext's speed-up over the better of the other two and, on a GPU, torchext's achieved GB/s (or
TFLOP/s) and its share of the datasheet peak. Then it writes bench/results/<device>/<date>-<sha>.json
and a PNG per family. A failing case or provider is recorded in its cell and the run goes on.
Without CUDA the same table runs at smoke sizes on the CPU; those times are not performance numbers.
"""

import argparse
import importlib
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script: `bench` and `examples` import

from bench._harness import (BENCH_DIR, PROVIDERS, Case, DeviceInfo, Row, bench_device, describe,  # noqa: E402
                            device_info, enable_interpreter_without_cuda, environment, measure, plot_family,
                            reference_outputs, results_stem, write_json)  # the harness itself imports torch only

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


def run_case(case: Case, device, providers: tuple[str, ...]) -> list[Row]:
    """Every mode x provider of one case; a failure becomes a row with its error ("reference" if the check failed)."""
    rows = []
    for mode in case.modes:
        try:
            expected = reference_outputs(case, mode, device)
        except Exception as e:
            expected = None
            rows.append(Row.of(case, "reference", mode, error=describe(e)))
        for provider in providers:
            print(f"  {case.family} {case.id} {mode} {provider}", file=sys.stderr, flush=True)
            try:
                rows.append(measure(case, provider, mode, device, expected))
            except Exception as e:
                rows.append(Row.of(case, provider, mode, error=describe(e)))
    return rows


class Footnotes:
    """Failure texts, numbered, so a failed cell stays narrow: FAIL[n]."""

    def __init__(self):
        self.texts: list[str] = []

    def cell(self, row: Row) -> str:
        self.texts.append(f"[{len(self.texts) + 1}] {row.family} {row.op} {row.shape} {row.mode} {row.provider}: "
                          f"{row.error.splitlines()[0][:300]}")
        return f"FAIL[{len(self.texts)}]"


def _time_cell(row: Row | None, notes: Footnotes) -> str:
    if row is None:
        return "-"
    return notes.cell(row) if row.error else f"{row.ms:.4g}"


def _error_cell(row: Row | None, reference_cell: str | None) -> str:
    if reference_cell:  # the reference failed, so there is nothing to compare with
        return reference_cell
    return "-" if row is None or row.max_error is None else f"{row.max_error:.1e}"


def _speedup_cell(by_provider: dict[str, Row]) -> str:
    ours = by_provider.get("torchext")
    others = [r.ms for name, r in by_provider.items() if name in ("eager", "torch.compile") and r.ms]
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
    """One line per family x op x shape x dtype x mode, the providers side by side."""
    groups: dict[tuple, dict[str, Row]] = {}
    for row in rows:
        groups.setdefault((row.family, row.op, row.shape, row.dtype, row.mode), {})[row.provider] = row
    gpu = info.slug != "cpu"
    header = ["family", "op", "shape", "dtype", "mode", "err torchext", "err eager", "torchext ms", "eager ms",
              "compile ms", "speed-up"] + (["torchext rate", "% peak"] if gpu else [])
    lines = [header]
    for key, by_provider in groups.items():
        reference_cell = notes.cell(by_provider["reference"]) if "reference" in by_provider else None
        cells = [*key, _error_cell(by_provider.get("torchext"), reference_cell),
                 _error_cell(by_provider.get("eager"), reference_cell),
                 *(_time_cell(by_provider.get(p), notes) for p in PROVIDERS), _speedup_cell(by_provider)]
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
    flops = f"{info.bf16_peak / 1e12:.0f} TFLOP/s" if info.bf16_peak else "unknown"
    return f"Device: {info.name}; HBM peak {peak}; measured 1 GiB copy {copy}; bf16 dense peak {flops}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="skip the torch.compile provider (its compiles "
                                                             "dominate the run time)")
    parser.add_argument("--family", help="only bench/bench_<FAMILY>.py, e.g. ngpt")
    args = parser.parse_args(argv)
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
    on_gpu = device.type == "cuda"

    rows_by_family: dict[str, list[Row]] = {}
    summaries = []
    for family, cases in families.items():
        rows_by_family[family] = []
        for case in (c for c in cases if c.gpu == on_gpu):
            case_rows = run_case(case, device, providers)
            rows_by_family[family] += case_rows
            if case.summary:
                summaries.append(case.summary({r.provider: r.ms for r in case_rows if r.ms is not None}))

    rows = [row for family_rows in rows_by_family.values() for row in family_rows]
    notes = Footnotes()
    print()
    print(table(rows, info, notes))
    for line in [*summaries, *notes.texts, *import_errors]:
        print(line)

    env = environment(device)
    stem = results_stem(device, env)
    print(f"\nresults: {write_json(stem.with_suffix('.json'), env, rows, summaries, info)}")
    for family, family_rows in rows_by_family.items():
        if png := plot_family(stem.with_name(f"{stem.name}-{family}.png"), family, family_rows, info):
            print(f"plot:    {png}")
    return 1 if import_errors or any(row.error for row in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
