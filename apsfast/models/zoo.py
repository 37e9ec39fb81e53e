"""The model zoos people bring (torchvision, timm): importing them where their compiled ops do
not load, and building their classification networks by name.

torchvision's wheel from the package index is built against one torch; beside another torch
build (a CPU wheel, say) its ``_meta_registrations`` module fails at import ("operator
torchvision::nms does not exist"), which takes the whole package down although its model code
needs none of those ops. :func:`import_torchvision` imports it as usual and, only on that
failure, again with that one module replaced by an empty one. timm imports torchvision, so
:func:`import_timm` goes through the same door. Neither zoo is a dependency of apsfast.
"""
from __future__ import annotations

import importlib
import sys
import types
from typing import Any

from torch import nn

_META = "torchvision._meta_registrations"


def import_torchvision() -> types.ModuleType:
    """``torchvision``, imported for its model code even where its compiled ops do not load.

    Raises ``ImportError`` (with how to install it) where torchvision is not installed."""
    try:
        return importlib.import_module("torchvision")
    except ModuleNotFoundError as error:
        raise ImportError("torchvision is not installed: pip install torchvision (its model code "
                          "is all apsfast uses)") from error
    except RuntimeError as error:
        if "torchvision::" not in str(error):
            raise
    for name in [n for n in sys.modules if n == "torchvision" or n.startswith("torchvision.")]:
        del sys.modules[name]  # the half-imported package
    sys.modules[_META] = types.ModuleType(_META)
    return importlib.import_module("torchvision")


def import_timm() -> types.ModuleType:
    """``timm``, with torchvision imported through :func:`import_torchvision` first."""
    try:
        import_torchvision()
    except ImportError:
        pass  # timm imports without torchvision too
    try:
        return importlib.import_module("timm")
    except ModuleNotFoundError as error:
        raise ImportError("timm is not installed: pip install timm") from error


def build(zoo: str, name: str, **kwargs: Any) -> nn.Module:
    """A randomly initialised classification network of ``zoo`` (``"torchvision"`` or
    ``"timm"``) by its name in that zoo, with the zoo's own keyword arguments."""
    if zoo == "torchvision":
        models = import_torchvision().models
        return models.get_model(name, weights=None, **kwargs)
    if zoo == "timm":
        return import_timm().create_model(name, pretrained=False, **kwargs)
    raise ValueError(f"zoo must be 'torchvision' or 'timm', got {zoo!r}")
