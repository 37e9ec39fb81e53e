"""Build of apsfast's compiled backends.

* ``apsfast._C``: the CPU C++ ops in ``csrc/cpu`` — always built.
* ``apsfast._cuda``: the CUDA ops in ``csrc/cuda`` — built when torch has CUDA and nvcc is
  found (or ``APSFAST_FORCE_CUDA=1``), for the architectures in ``APSFAST_CUDA_ARCHS``
  (default ``8.0;9.0+PTX``), never by whether a GPU is present.

Install with ``pip install --no-build-isolation -e .``: torch is not a build requirement, so
the build uses the torch already installed (an isolated build would fetch another one).
``MAX_JOBS`` limits ninja's parallel compiles.
"""
import datetime
import json
import os
from pathlib import Path

import torch
from setuptools import setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

ROOT = Path(__file__).parent
CUDA_ARCHS = os.environ.get("APSFAST_CUDA_ARCHS", "8.0;9.0+PTX")


def sources(folder: str, *patterns: str) -> list[str]:
    return sorted(str(p.relative_to(ROOT)) for pattern in patterns for p in (ROOT / folder).glob(pattern))


def want_cuda() -> bool:
    if os.environ.get("APSFAST_FORCE_CUDA") == "1":
        return True
    return torch.version.cuda is not None and CUDA_HOME is not None and bool(sources("csrc/cuda", "*.cu"))


extensions = [CppExtension("apsfast._C", sources("csrc/cpu", "*.cpp"),
                           extra_compile_args={"cxx": ["-O3"]})]
if want_cuda():
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", CUDA_ARCHS)
    extensions.append(CUDAExtension("apsfast._cuda", sources("csrc/cuda", "*.cpp", "*.cu"),
                                    extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3", "--use_fast_math"]}))

# Recorded so that a build against another torch is refused with a clear message at import.
(ROOT / "apsfast" / "_build_info.json").write_text(json.dumps({
    "torch": torch.__version__,
    "cuda": torch.version.cuda if want_cuda() else None,
    "cuda_archs": os.environ.get("TORCH_CUDA_ARCH_LIST") if want_cuda() else None,
    "extensions": [ext.name.split(".")[-1] for ext in extensions],
    "built": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
}, indent=2) + "\n")

setup(
    ext_modules=extensions,
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
