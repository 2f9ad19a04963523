"""`python -m torchext info`: versions, the device, and which backend each op of each family uses;
`python -m torchext --version`."""

import argparse
import os
import platform
import sys

import torch

import torchext
from torchext import _backend
from torchext.ops import FAMILIES


def _backend_for(kind: str, device: torch.device) -> str:
    probe = torch.empty(0, device=device)
    if kind == "triton" and _backend.use_triton(probe):
        return "Triton (interpreter)" if _backend.INTERPRET else "Triton (compiled)"
    if kind == "cuda" and _backend.use_cuda_ext(probe):
        return "CUDA C++ (torchext._C)"
    return "reference (PyTorch)"


def info() -> None:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    triton_version = __import__("triton").__version__ if _backend.HAS_TRITON else "not installed"
    print(f"torchext {torchext.__version__}  python {platform.python_version()}  torch {torch.__version__}  "
          f"triton {triton_version}")
    print(f"device: {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu (no CUDA device)'}")
    ext = _backend.CUDA_EXT
    ext_state = f"built, CUDA runtime {ext.cuda_runtime_version()}" if ext else "absent (pure-Python install)"
    print(f"CUDA extension torchext._C: {ext_state}")
    print(f"Triton interpreter (TRITON_INTERPRET=1): {'on' if _backend.INTERPRET else 'off'}")
    wide_family = max(map(len, FAMILIES)) + 2
    wide_op = max(len(op) for module in FAMILIES.values() for op in module.KERNELS) + 2
    print(f"\n{'family':<{wide_family}}{'op':<{wide_op}}backend on {device.type}")
    for family, module in FAMILIES.items():
        rules = getattr(module, "DISPATCH", {})
        for op, kind in module.KERNELS.items():
            rule = f"; {rules[op]}" if op in rules else ""
            print(f"{family:<{wide_family}}{op:<{wide_op}}{_backend_for(kind, device)}{rule}")


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m torchext")
    parser.add_argument("--version", action="version", version=f"torchext {torchext.__version__}")
    parser.add_argument("command", choices=["info"], help="info: versions, device and backends")
    parser.parse_args()
    try:
        info()
        sys.stdout.flush()
    except BrokenPipeError:
        # The reader closed the pipe (`python -m torchext info | head`): stop quietly, and keep the interpreter's
        # final flush from raising again on the closed descriptor.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


if __name__ == "__main__":
    main()
