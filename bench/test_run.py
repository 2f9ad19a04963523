"""./dev bench without a GPU, end to end for one family (Kronecker attention: milliseconds per call), in a subprocess:
this pytest process runs torchext on the Triton interpreter, which the CPU showcase must not. About 10 s on 2 cores,
once per CI run (./dev test; test-oldest runs tests/ only)."""

import os
import subprocess
import sys

import pytest
import torch

from bench._harness import REPO_ROOT


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU showcase runs without CUDA")
def test_cpu_showcase_of_one_family():
    env = {name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "bench/run.py", "--family", "kronecker_attention"], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    out = done.stdout
    assert "== kronecker_attention ==" in out
    assert "GPU timings need a GPU" in out  # and where the committed GPU results are, or that there are none
    header = next(line for line in out.splitlines() if line.startswith("op "))
    assert header.split() == ["op", "shape", "dtype", "mode", "torchext", "ms", "eager", "ms", "sdpa", "flat", "ms",
                              "sdpa", "flat", "math", "ms", "speed-up", "vs", "best", "anchor", "err", "torchext",
                              "err", "eager", "torchext", "MiB", "eager", "MiB"]  # no compile, rate or peak column
    assert "peak extra memory" in out and "sdpa flat math" in out
    assert "target" not in out and "interpreter" not in out.lower()
