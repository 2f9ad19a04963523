"""The offline GPU build as a test: every Triton kernel compiled for sm_80 and sm_90 at the configurations its
launcher picks for the compile sizes of bench/sizes.py, and every CUDA C++ kernel through nvcc, on a machine with no
GPU (bench/offline.py). It fails when a kernel does not compile, needs more shared memory than a block gets, or
spills where it may not, and when the table differs from the one committed for this Triton version: a change that
makes a kernel worse (or better) shows in review. `./dev offline --write` updates the table.

It runs where a table is committed for the installed Triton (the oldest supported, what GPU machines carry: the
`./dev test-oldest` pass), and not on a GPU machine, where the real build is measured instead.
"""

import os
import subprocess
import sys

import pytest
import torch

from bench import offline

TABLE = offline.results_path()


def section(text: str, title: str) -> str:
    """The lines of one `## title` section of the table."""
    return text.split(f"## {title}\n", 1)[1].split("\n## ", 1)[0].strip()


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU machine measures the real build")
@pytest.mark.skipif(not TABLE.exists(), reason=f"no offline table committed for this Triton ({TABLE.name})")
@pytest.mark.run_first  # the longest test of the oldest-Triton pass (3 minutes): the rest runs beside it
def test_every_kernel_builds_for_sm80_and_sm90_as_committed(tmp_path):
    written = tmp_path / TABLE.name
    env = {name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-m", "bench.offline", "--output", str(written)], cwd=offline.ROOT,
                          env=env, capture_output=True, text=True, timeout=1800)
    problems = [line for line in done.stderr.splitlines() if "PROBLEM" in line or "Error" in line]
    assert done.returncode == 0, "\n".join(problems or done.stderr.splitlines()[-20:])
    got, committed = written.read_text(), TABLE.read_text()
    titles = ["Triton"] + (["CUDA C++ (nvcc -Xptxas -v)"] if offline._nvcc() else [])
    for title in titles:
        assert section(got, title) == section(committed, title), (
            f"the {title} build differs from {TABLE.relative_to(offline.ROOT)}: if the change is meant, run "
            f"`./dev offline --write` and commit the table")
