"""The package itself: the CUDA extension is compiled wherever nvcc is, the Triton kernels never shadow
Triton's own top-level `triton_kernels`, `python -m torchext info` reports every op's backend and survives a closed
pipe, and the packaging metadata (license, py.typed, --version) is there."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import torchext
from torchext import _backend
from torchext.ops import FAMILIES


@pytest.mark.skipif(shutil.which("nvcc") is None or os.environ.get("TORCHEXT_NO_CUDA") == "1",
                    reason="no nvcc: a pure-Python install is expected")
def test_cuda_extension_is_built_and_loads_without_a_gpu():
    """CI compiles every .cu through the install; the module must load even on a machine with no GPU."""
    assert _backend.CUDA_EXT is not None, "nvcc is present but torchext._C was not built (see setup.py)"
    assert _backend.CUDA_EXT.cuda_runtime_version() >= 11000


def test_triton_kernels_ship_inside_torchext(tmp_path):
    assert torchext.triton_kernels.__name__ == "torchext.triton_kernels"
    probe = "import importlib.util as u; s = u.find_spec('triton_kernels'); print(s.origin if s else None)"
    origin = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True,
                            check=True).stdout.strip()
    repo = os.path.dirname(os.path.dirname(os.path.abspath(torchext.__file__)))
    assert origin == "None" or not origin.startswith(repo), f"a top-level triton_kernels resolves to {origin}"


def test_info_lists_every_op(tmp_path):
    out = subprocess.run([sys.executable, "-m", "torchext", "info"], cwd=tmp_path, capture_output=True, text=True,
                         check=True).stdout
    assert f"torch {__import__('torch').__version__}" in out
    for family, module in FAMILIES.items():
        for op in module.KERNELS:
            assert any(line.split()[:2] == [family, op] for line in out.splitlines()), (family, op)
    # The size rules are said where they apply: KDE attention is SDPA below its threshold.
    kde_line = next(line for line in out.splitlines() if line.split()[:2] == ["kde_attention", "kde_attention"])
    assert f"SDPA below {FAMILIES['kde_attention'].MIN_SEQ_LEN} tokens" in kde_line, kde_line


def test_every_registered_op_is_listed_after_import(tmp_path):
    """dir(torch.ops.torchext) in a fresh process right after `import torchext`: the kv_quant ops were missing until
    first called."""
    probe = "import torch, torchext; print(' '.join(dir(torch.ops.torchext)))"
    listed = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True,
                            check=True).stdout.split()
    for name in set(torchext.ops.__all__) - set(torchext.ops.PYTHON_HELPERS):
        assert name in listed, name


def test_info_survives_a_closed_pipe(tmp_path):
    """`python -m torchext info | head -1`: the reader is gone before the table is written (its end of the pipe is
    closed before the child has imported torch), and info stops without a traceback."""
    child = subprocess.Popen([sys.executable, "-m", "torchext", "info"], cwd=tmp_path, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    child.stdout.close()
    stderr = child.stderr.read()
    assert child.wait() == 0, stderr
    assert "Traceback" not in stderr and "BrokenPipeError" not in stderr, stderr


def test_version_flag_and_packaging_metadata(tmp_path):
    out = subprocess.run([sys.executable, "-m", "torchext", "--version"], cwd=tmp_path, capture_output=True,
                         text=True, check=True).stdout
    assert out.strip() == f"torchext {torchext.__version__}"
    root = Path(torchext.__file__).parent
    assert (root / "py.typed").is_file()
    assert "MIT License" in (root.parent / "LICENSE").read_text()
    assert 'license = {text = "MIT"}' in (root.parent / "pyproject.toml").read_text()
