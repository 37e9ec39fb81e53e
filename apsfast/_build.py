"""Build metadata written by ``setup.py``, the guarded import of compiled extensions, and what
``apsfast info`` reports (:func:`collect_info`, :func:`check_errors`).

``setup.py`` writes ``_build_info.json`` beside this file: the torch it compiled against, the
CUDA version and architectures, and which extensions it built. An extension built against
another torch is refused with a message saying how to rebuild, instead of being loaded and
failing on an undefined symbol (or worse).
"""
from __future__ import annotations

import importlib
import json
import os
import platform
from pathlib import Path
from typing import Any, Optional

import torch

INFO_FILE = Path(__file__).with_name("_build_info.json")
REBUILD = "pip install --no-build-isolation -e . (from the apsfast source tree)"
_BUILT_WHEN = {"_C": "always", "_cuda": "when torch has CUDA and nvcc is found, or APSFAST_FORCE_CUDA=1"}


def build_info() -> dict[str, Any]:
    """The recorded build metadata, or ``{}`` when the package was not built by setup.py."""
    try:
        return json.loads(INFO_FILE.read_text())
    except (OSError, ValueError):
        return {}


def load_extension(name: str) -> None:
    """Import ``apsfast.<name>``; raise ImportError with the reason and the fix if it cannot load."""
    info = build_info()
    if name not in info.get("extensions", ()):
        raise ImportError(f"apsfast.{name} was not built (setup.py builds it {_BUILT_WHEN[name]}); "
                          f"build it with {REBUILD}")
    built_with = info.get("torch")
    if built_with != torch.__version__:
        raise ImportError(f"apsfast.{name} was built against torch {built_with} but torch "
                          f"{torch.__version__} is installed; rebuild with {REBUILD}")
    try:
        importlib.import_module(f"apsfast.{name}")
    except ImportError as err:
        raise ImportError(f"apsfast.{name} failed to load ({err}); rebuild with {REBUILD}") from err


# One bad call to a compiled op, in a fresh process: it must raise, not bring the process down.
_BAD_CALL = """
import torch
from apsfast._backends import {backend} as ops
try:
    ops.construct(torch.ones(8, 6, 3, 3, device="{device}"), torch.ones(6, 2, device="{device}"), None)
except RuntimeError as error:
    print(str(error).splitlines()[0])
"""


def check_errors() -> dict[str, str]:
    """Whether each compiled backend loaded here raises a Python exception on bad input.

    A C++ error raised in an extension crosses into Python by unwinding through torch's
    frames; an extension compiled by a toolchain whose C++ runtime differs from the one the
    process loads can crash there instead (seen with a second GCC installed beside the
    system's: rebuild with ``CC``/``CXX`` naming the system compiler). Each backend is tried in
    its own process, so a crash is reported, not suffered. Returns ``{backend: "ok: <message>"
    or "CRASHED (...)"}``.
    """
    import subprocess
    import sys

    from apsfast import _backends

    cases = [("cpu", "cpu")] + ([("cuda", "cuda")] if torch.cuda.is_available() else [])
    results = {}
    for backend, device in cases:
        if backend not in _backends.available():
            continue
        done = subprocess.run([sys.executable, "-c", _BAD_CALL.format(backend=backend, device=device)],
                              capture_output=True, text=True, check=False)
        message = done.stdout.strip()
        if done.returncode == 0 and message:
            results[backend] = f"ok: raised {message!r}"
        else:
            tail = done.stderr.strip().splitlines()[-1:] or ["no output"]
            results[backend] = f"CRASHED (exit {done.returncode}: {tail[0]}); rebuild with CC/CXX naming the " \
                               f"compiler of the system's C++ runtime"
    return results


def collect_info() -> dict:
    """Versions, build metadata and the status of every backend."""
    from apsfast import __version__, _backends

    try:
        import triton
        triton_version: Optional[str] = triton.__version__
    except ImportError:
        triton_version = None
    return {
        "apsfast": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": triton_version,
        "build": build_info(),
        "backends": _backends.status(),
        "defaults": _backends.defaults(),
        "forced_backend": os.environ.get(_backends.ENV_VAR) or None,
    }
