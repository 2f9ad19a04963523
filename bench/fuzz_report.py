"""The fuzz suite's outcomes (tests/fuzz_cases.py): per path, the count of cases per outcome, the same per op, and
every case that is not a clear error or right, with what it said or returned.

    .venv/bin/python bench/fuzz_report.py                      # this checkout
    .venv/bin/python bench/fuzz_report.py --paths reference    # one path

It imports only the public APIs, so the same three files copied into an older checkout judge that checkout's
torchext (PYTHONPATH=<checkout> .venv/bin/python <checkout>/bench/fuzz_report.py; the first line says which
torchext was imported). A case that needs an API the checkout lacks counts as an unclear error.
"""

import argparse
import os
import sys
import warnings
from collections import Counter
from pathlib import Path

import torch

# As tests/conftest.py does: without a GPU, CPU tensors take the Triton kernels through the interpreter (the
# interpreter path); this must happen before triton is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import fuzz_cases as fz  # noqa: E402
import torchext  # noqa: E402


def _table(rows: list[tuple[str, Counter]], first: str) -> str:
    width = max([len(first)] + [len(name) for name, _ in rows])
    lines = [f"{first:<{width}}  " + "  ".join(f"{kind:>{len(kind)}}" for kind in fz.OUTCOMES) + "  total"]
    for name, counts in rows:
        lines.append(f"{name:<{width}}  " + "  ".join(f"{counts[kind]:>{len(kind)}}" for kind in fz.OUTCOMES)
                     + f"  {sum(counts.values()):>5}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--paths", default=",".join(p.name for p in fz.available_paths()),
                        help="comma-separated paths to run (default: every path this machine has)")
    args = parser.parse_args()
    paths = [p for p in fz.available_paths() if p.name in args.paths.split(",")]
    print(f"torchext from {torchext.__file__}")
    print(f"{len(fz.CASES)} cases; paths: {', '.join(f'{p.name} ({len(fz.cases_on(p))} cases)' for p in paths)}")
    failures = []
    for path in paths:
        per_op: dict[str, Counter] = {}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for case in fz.cases_on(path):
                outcome = fz.classify(case, path)
                per_op.setdefault(case.op, Counter())[outcome.kind] += 1
                if outcome.kind not in fz.PASSING:
                    failures.append((path.name, case.id, outcome))
        print(f"\n== {path.name} path ==")
        print(_table([("all", sum(per_op.values(), Counter()))], "outcome"))
        print()
        print(_table(sorted(per_op.items()), "op"))
    print(f"\n== {len(failures)} cases neither a clear error nor right ==")
    for path_name, case_id, outcome in failures:
        print(f"{path_name:<11} {outcome.kind:<20} {case_id}: {outcome.detail}")


if __name__ == "__main__":
    main()
