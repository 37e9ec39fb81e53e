"""Build metadata written by ``setup.py`` and the guarded import of compiled extensions.

``setup.py`` writes ``_build_info.json`` beside this file: the torch it compiled against, the
CUDA version and architectures, and which extensions it built. An extension built against
another torch is refused with a message saying how to rebuild, instead of being loaded and
failing on an undefined symbol (or worse).
"""
from __future__ import annotations

import importlib
import json
from pathlib import Path
from typing import Any

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
