"""./dev gpu: the one bounded command for a GPU machine (no network, one command of at most 10 minutes).

    ./dev gpu [--budget 480]     on a GPU: tests on CUDA, then benchmarks, in --budget seconds in all
    ./dev gpu --rehearse         the same code path on the CPU at smoke sizes (CI runs it)

Steps, each against one deadline (`--budget` seconds from the start, setup included):
1. The benchmark kernels are warmed: the selected cases' launches are recorded (bench/_launches.py) and compiled in
   parallel, on every core, into Triton's cache, while step 2 runs. Nothing is timed before it is done.
2. The test suite on CUDA (tests/, not the benchmark smoke tests), in parallel with pytest-xdist when it is there,
   until `--test-share` of the budget is spent; each outcome is logged as it comes (bench/_pytest_budget.py).
3. The benchmarks, in order of importance: the sizes carrying the README's targets (bench/sizes.py), one family
   after another; then the sizes of the offline compile check; then the rest. Every row is printed and written to
   bench/results/<gpu>/<date>-<sha>.json as soon as it is measured; a case that would outrun the deadline is cut
   off there, and what it measured stays. torch.compile runs for the target sizes only (its compiles cost more
   than the rest of a case).
4. bench/results/<gpu>/<date>-<sha>.md: the test outcome (failures with their last lines) and every target as
   measured / target / met or missed; the plots; a short summary printed last.

Without a GPU and without --rehearse it stops after setup ("no GPU here") with status 0: that checks the offline
setup on a machine like the GPU one.
"""

import argparse
import json
import multiprocessing
import os
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._harness import (PROVIDERS, REPO_ROOT, Case, ResultsFile, Row,  # noqa: E402
                            bench_device, device_info, enable_interpreter_without_cuda)

START = float(os.environ.get("TORCHEXT_GPU_START", time.time()))  # ./dev sets it before setup: setup counts
enable_interpreter_without_cuda()  # before anything imports triton or torchext (rehearsal on the CPU)

import torch  # noqa: E402

from bench import sizes as size_table  # noqa: E402
from bench.run import device_header, discover, print_tables, run_until, write_plots  # noqa: E402

REHEARSAL_TESTS = ["tests/test_package.py"]  # the rehearsal runs the test step on these (the CI suite runs them all)


def say(text: str) -> None:
    print(f"[gpu {time.time() - START:6.1f}s] {text}", flush=True)


# ---- selection ------------------------------------------------------------------------------------------------------


def _tier(case: Case) -> int:
    size = case.size
    return 0 if size is not None and size.targets else 1 if size is not None and size.compile else 2


def selection(families: dict[str, list[Case]], gpu: bool) -> list[Case]:
    """The cases in the order they run: by tier (targets, compile sizes, the rest), and within a tier one case of
    each family in turn, so a budget that runs out cuts every family evenly. On the CPU: the smoke cases."""
    ordered = []
    for tier in (0, 1, 2):
        queues = [[c for c in cases if c.gpu == gpu and (not gpu or _tier(c) == tier)] for cases in families.values()]
        while any(queues):
            ordered += [queue.pop(0) for queue in queues if queue]
        if not gpu:
            break
    return ordered


# ---- warming --------------------------------------------------------------------------------------------------------


def warm(cases: list[Case], device: torch.device, jobs: int, deadline: float):
    """Record the launches of `cases` (forward and backward) and compile them in a pool: returns the futures."""
    from bench._launches import compiling_process, record_case, unique, warm_launch

    launches = []
    for case in cases:
        if time.time() > deadline:
            break
        try:
            launches += record_case(case, device)
        except Exception:  # outputs are garbage while recording; a case that trips on them is warmed by its run
            pass
    launches = unique(launches)
    arch = torch.cuda.get_device_capability(device) if device.type == "cuda" else (9, 0)
    pool = ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn"), initializer=compiling_process)
    futures = [pool.submit(warm_launch, launch, arch[0] * 10 + arch[1]) for launch in launches]
    say(f"warming {len(launches)} kernel specialisations on {jobs} workers")
    return pool, futures


# ---- tests ----------------------------------------------------------------------------------------------------------


def run_tests(log: Path, deadline: float, rehearse: bool) -> dict:
    """The test suite on this device until the deadline; returns the outcome summary of bench/_pytest_budget's log."""
    log.parent.mkdir(parents=True, exist_ok=True)
    log.unlink(missing_ok=True)
    command = [sys.executable, "-m", "pytest", "-q", "-p", "bench._pytest_budget", "-p", "no:cacheprovider",
               "--budget-log", str(log), "--budget-deadline", str(deadline), "-o", "addopts=--strict-markers"]
    try:
        import xdist  # noqa: F401

        command += ["-n", str(min(8, os.cpu_count() or 1))]
    except ImportError:
        pass
    command += REHEARSAL_TESTS if rehearse else ["tests"]
    say("tests: " + " ".join(command[3:]))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET" or rehearse}
    try:
        done = subprocess.run(command, cwd=REPO_ROOT, env=env, timeout=max(deadline - time.time(), 1) + 60,
                              capture_output=True, text=True)
        status, tail = done.returncode, (done.stdout + done.stderr)[-3000:]
    except subprocess.TimeoutExpired as e:
        status, tail = "killed at the deadline", str(e.stdout or "")[-3000:]
    return summarize_tests(log, status, tail)


def summarize_tests(log: Path, status, tail: str) -> dict:
    records = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    outcomes = [r for r in records if "test" in r]
    counts = {k: sum(r["outcome"] == k for r in outcomes) for k in ("passed", "failed", "error", "skipped")}
    collected = next((r["collected"] for r in records if "collected" in r), None)
    stopped = next((r["stopped"] for r in records if "stopped" in r), None)
    failures = [r for r in outcomes if r["outcome"] in ("failed", "error")]
    return {"status": status, "counts": counts, "collected": collected, "stopped": stopped, "failures": failures,
            "tail": tail if not outcomes else ""}


# ---- targets --------------------------------------------------------------------------------------------------------


def _fastest(rows: dict[tuple[str, str], Row], providers: tuple[str, ...], mode: str) -> float | None:
    times = [rows[p, mode].ms for p in providers if (p, mode) in rows and rows[p, mode].ms]
    return min(times) if times else None


def measured(target: size_table.Target, rows: dict[tuple[str, str], Row], info) -> float | None:
    """The value of a target's metric from one case's rows ({(provider, mode): row}), None if it was not measured."""
    ours = rows.get(("torchext", target.mode))
    if ours is None or not ours.ms:
        return None
    if target.metric in ("speedup", "ratio"):
        base = _fastest(rows, target.baselines, target.mode)
        if base is None:
            return None
        return base / ours.ms if target.metric == "speedup" else ours.ms / base
    if target.metric == "pct_peak":
        rate = ours.throughput(info)
        return rate[2] if rate else None
    if target.metric == "tflops":
        return ours.flops / (ours.ms * 1e-3) / 1e12 if ours.flops else None
    if target.metric == "bwd_tflops":
        fwd = rows.get(("torchext", "fwd"))
        if fwd is None or not fwd.ms or not ours.flops or ours.ms <= fwd.ms:
            return None
        return (ours.flops - fwd.flops) / ((ours.ms - fwd.ms) * 1e-3) / 1e12
    if target.metric == "ms":
        return ours.ms
    raise ValueError(f"unknown metric {target.metric!r}")


def target_lines(case_rows: list[tuple[Case, list[Row]]], info, gpu: bool) -> list[str]:
    """A markdown row per target of the selected sizes: measured, target, met / missed / not measured."""
    lines = ["| family | size | target | measured | met |", "|---|---|---|---|---|"]
    by_size: dict[int, list[tuple[Case, list[Row]]]] = {}
    for case, rows in case_rows:
        if case.size is not None and case.size.targets:
            by_size.setdefault(id(case.size), []).append((case, rows))
    sizes = [s for family in size_table.TABLE.values() for s in family if s.targets]
    for size in sizes:
        for target in size.targets:
            value = None
            for case, rows in by_size.get(id(size), []):
                if target.case in (None, case.op):
                    value = measured(target, {(r.provider, r.mode): r for r in rows}, info)
                    if value is not None:
                        break
            verdict = "not measured" if value is None else ("met" if target.met(value) else "missed")
            shown = "-" if value is None else f"{value:.3g}"
            lines.append(f"| {size.family} | {size.label.split(' ', 1)[1]} | {target.text} | {shown} | {verdict} |")
    if not gpu:
        lines.append("\n(Rehearsal on the CPU: no target is measured.)")
    return lines


# ---- the report -----------------------------------------------------------------------------------------------------


def test_lines(tests: dict) -> list[str]:
    c = tests["counts"]
    collected = tests["collected"] if tests["collected"] is not None else "?"
    head = (f"{c['passed']} passed, {c['failed']} failed, {c['error']} errors, {c['skipped']} skipped of "
            f"{collected} collected; pytest status {tests['status']}")
    lines = [head + (f"; stopped: {tests['stopped']}" if tests["stopped"] else "")]
    for failure in tests["failures"][:30]:
        lines.append(f"- {failure['outcome'].upper()} {failure['test']}")
        lines += [f"    {line}" for line in failure["message"].splitlines()]
    if len(tests["failures"]) > 30:
        lines.append(f"- ... and {len(tests['failures']) - 30} more (the JSON-lines log has them all)")
    if tests["tail"]:
        lines += ["pytest's last output:", "```", tests["tail"], "```"]
    return lines


def write_report(path: Path, results: ResultsFile, tests: dict, targets: list[str], cases_run: int,
                 cases_selected: int, budget: float) -> Path:
    env = results.env
    text = "\n".join([
        f"# ./dev gpu on {results.info.name}: {env['date']}, {env['git_sha']}"
        + (" (dirty)" if env["git_dirty"] else ""),
        "", f"torch {env['torch']}, triton {env['triton']}, CUDA {env['cuda']}, Python {env['python']}; budget "
            f"{budget:.0f} s, used {time.time() - START:.0f} s.", "",
        "## Tests", "", *test_lines(tests), "",
        "## Targets", "", *targets, "",
        "## Benchmarks", "",
        f"{cases_run} of {cases_selected} selected cases measured ({len(results.rows)} rows): "
        f"{results.path.name}; a table per family in the command's output.", ""])
    path.write_text(text)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", type=float, default=480.0, help="seconds for the whole command (default 480)")
    parser.add_argument("--test-share", type=float, default=0.4, help="share of the budget the tests may take")
    parser.add_argument("--rehearse", action="store_true", help="run on the CPU at smoke sizes (CI)")
    parser.add_argument("--jobs", type=int, default=os.cpu_count(), help="compile workers for the warm-up")
    args = parser.parse_args(argv)
    device = bench_device()
    if device.type != "cuda" and not args.rehearse:
        say("no GPU here: setup is done and nothing else runs without one (use --rehearse to run the CPU rehearsal)")
        return 0
    if device.type == "cpu":
        torch.set_num_threads(1)
    deadline = START + args.budget
    gpu = device.type == "cuda"
    info = device_info(device)
    say(device_header(info).replace("\n", "; "))
    modules, import_errors = discover(None)
    families = {family: module.CASES for family, module in modules.items()}
    cases = selection(families, gpu)
    say(f"{len(cases)} benchmark cases selected" + (f"; import errors: {import_errors}" if import_errors else ""))

    results = ResultsFile(device, command="./dev gpu" + (" --rehearse" if args.rehearse else ""))
    pool, warming = warm([c for c in cases if _tier(c) == 0] if gpu else cases[:len(families)], device,
                         max(1, args.jobs // 2), deadline)
    tests = run_tests(results.path.with_suffix(".tests.jsonl"), START + args.test_share * args.budget, args.rehearse)
    say("tests: " + test_lines(tests)[0])
    for future in warming:  # compiles that outlive the tests finish before anything is timed
        future.result(timeout=max(deadline - time.time(), 1))
    pool.shutdown()
    say("warm-up done")

    def providers(case: Case) -> tuple[str, ...]:
        return PROVIDERS if _tier(case) == 0 or not gpu else tuple(p for p in PROVIDERS if p != "torch.compile")

    case_rows = run_until(cases, device, providers, results, deadline - 5, say)

    print_tables(results, info)
    targets = target_lines(case_rows, info, gpu)
    report = write_report(results.path.with_suffix(".md"), results, tests, targets, len(case_rows), len(cases),
                          args.budget)
    write_plots(results)
    print("\n".join(["", "==== ./dev gpu summary ====", *test_lines(tests)[:40], "", *targets, "",
                     f"results: {results.path}", f"report:  {report}", f"time: {time.time() - START:.0f} s of "
                     f"{args.budget:.0f}"]))
    failed = tests["counts"]["failed"] or tests["counts"]["error"] or tests["status"] not in (0, 5)
    return 1 if failed or import_errors else 0


if __name__ == "__main__":
    sys.exit(main())
