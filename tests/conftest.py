"""Test harness: Triton interpreter on machines without CUDA, seeding, NaN-poisoned outputs, the gpu marker."""

import os
import random
import sys

import torch

# Must happen before triton (or torchext, which imports it) is imported: CPU tensors then run the
# Triton kernels through the interpreter instead of the PyTorch reference.
if not torch.cuda.is_available():
    if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("triton was imported before tests/conftest.py could set TRITON_INTERPRET=1")
    os.environ["TRITON_INTERPRET"] = "1"

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from harness import DEVICE  # noqa: E402

HAS_CUDA = DEVICE.type == "cuda"


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_gpu)
    # The longest tests first, so that under xdist the other workers run the rest beside them instead of after.
    items.sort(key=lambda item: "run_first" not in item.keywords)


@pytest.fixture(autouse=True)
def _seed():
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)


def _poison(allocate):
    """Wrap torch.empty / torch.empty_like so that float tensors allocated by torchext code start as NaN.

    A kernel that leaves an output element unwritten then fails the comparison instead of passing on
    whatever the allocator happened to return (flash-linear-attention's trick).
    """

    def poisoned(*args, **kwargs):
        out = allocate(*args, **kwargs)
        caller = sys._getframe(1).f_globals.get("__name__", "")
        if caller.startswith("torchext") and out.is_floating_point() and out.device.type != "meta":
            out.fill_(float("nan"))
        return out

    return poisoned


@pytest.fixture(autouse=True)
def _nan_poisoned_empty(monkeypatch):
    monkeypatch.setattr(torch, "empty", _poison(torch.empty))
    monkeypatch.setattr(torch, "empty_like", _poison(torch.empty_like))


@pytest.fixture
def device():
    return DEVICE
