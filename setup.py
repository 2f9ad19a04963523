"""Builds torchext._C from csrc/ with nvcc when it is found; a pure-Python install otherwise.

The extension is a pybind11 module linked only against the static CUDA runtime (no libtorch), so it
builds on machines with nvcc and no GPU and survives torch upgrades.

Environment:
    TORCHEXT_NO_CUDA=1        skip the CUDA build (pure Python: Triton + reference)
    TORCHEXT_CUDA_ARCHS       e.g. "80;90" (default); TORCH_CUDA_ARCH_LIST ("8.0;9.0") is read too
    TORCHEXT_BUILD_JOBS       parallel nvcc compiles (default: every core)
    CUDA_HOME                 where to look for bin/nvcc before PATH
"""

import os
import shutil
import subprocess
import sysconfig
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent
CSRC = ROOT / "csrc"


def find_nvcc() -> Path | None:
    if os.environ.get("TORCHEXT_NO_CUDA", "0") == "1":
        return None
    cuda_home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if cuda_home and (Path(cuda_home) / "bin" / "nvcc").exists():
        return Path(cuda_home) / "bin" / "nvcc"
    found = shutil.which("nvcc")
    return Path(found).resolve() if found else None


def cuda_archs() -> list[str]:
    """["80", "90"] by default: Ampere and Hopper machine code, plus PTX of the newest for later GPUs."""
    spec = os.environ.get("TORCHEXT_CUDA_ARCHS") or os.environ.get("TORCH_CUDA_ARCH_LIST") or "80;90"
    archs = [a.replace(".", "").replace("+PTX", "") for a in spec.replace(" ", ";").split(";") if a]
    return sorted(set(archs))


class NvccBuildExt(build_ext):
    """Compiles csrc/module.cpp and every csrc/**/*.cu to objects with nvcc, in parallel (TORCHEXT_BUILD_JOBS, default
    every core), then links them into torchext._C."""

    def build_extension(self, ext: Extension) -> None:
        try:
            import pybind11
        except ImportError:
            raise SystemExit("torchext: building the CUDA extension needs pybind11: `pip install pybind11` (or "
                             "TORCHEXT_NO_CUDA=1 for a pure-Python install)") from None

        nvcc = str(find_nvcc())
        archs = cuda_archs()
        gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]
        gencode.append(f"-gencode=arch=compute_{archs[-1]},code=compute_{archs[-1]}")
        output = Path(self.get_ext_fullpath(ext.name))
        output.parent.mkdir(parents=True, exist_ok=True)
        objects_dir = Path(self.build_temp) / "torchext_C"
        objects_dir.mkdir(parents=True, exist_ok=True)
        flags = ["-O3", "-std=c++17", "-Xcompiler=-fPIC,-fvisibility=hidden", "--expt-relaxed-constexpr", *gencode,
                 f"-I{CSRC}", f"-I{pybind11.get_include()}", f"-I{sysconfig.get_paths()['include']}"]
        objects = [objects_dir / Path(source).with_suffix(".o").as_posix().replace("/", "_") for source in ext.sources]
        commands = [[nvcc, *flags, "-c", str(ROOT / source), "-o", str(obj)]
                    for source, obj in zip(ext.sources, objects)]
        jobs = int(os.environ.get("TORCHEXT_BUILD_JOBS", os.cpu_count() or 1))
        with ThreadPoolExecutor(jobs) as pool:
            for command in commands:
                print(" ".join(command))
            list(pool.map(lambda command: subprocess.run(command, check=True), commands))
        link = [nvcc, "-shared", "-cudart=static", *gencode, *(command[-1] for command in commands), "-o", str(output)]
        print(" ".join(link))
        subprocess.run(link, check=True)


def extensions() -> list[Extension]:
    if find_nvcc() is None:
        print("torchext: nvcc not found or TORCHEXT_NO_CUDA=1; installing without the CUDA extension")
        # An editable install imports from the source tree: a _C left by an earlier CUDA build would still load.
        for stale in (ROOT / "torchext").glob("_C*.so"):
            print(f"torchext: removing {stale.name} of an earlier CUDA build")
            stale.unlink()
        return []
    # setuptools wants paths relative to this file
    sources = ["csrc/module.cpp"] + sorted(p.relative_to(ROOT).as_posix() for p in CSRC.rglob("*.cu"))
    headers = sorted(p.relative_to(ROOT).as_posix() for p in CSRC.rglob("*.h"))
    return [Extension("torchext._C", sources=sources, depends=headers)]


setup(
    packages=["torchext", "torchext.ops", "torchext.reference", "torchext.nn", "torchext.triton_kernels"],
    # Shipped inside torchext: a top-level `triton_kernels` package already exists in the Triton project.
    package_dir={"torchext.triton_kernels": "triton_kernels"},
    package_data={"torchext": ["py.typed"]},  # PEP 561: the package's annotations are meant for type checkers
    ext_modules=extensions(),
    cmdclass={"build_ext": NvccBuildExt},
)
