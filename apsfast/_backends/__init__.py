"""Backend registry and dispatch.

A backend is a module exposing the op functions of :mod:`apsfast.reference` that it
accelerates (``construct``, ``construct_backward``, …) plus ``supports(device, dtype)``.
Compiled backends are imported lazily on first use; a backend that fails to load is recorded
with the reason, which :func:`status` (and ``apsfast info``) reports.

``APSFAST_BACKEND=reference|cpu|triton|cuda`` forces one backend for every op; a forced
backend that cannot serve a call raises instead of falling back silently.

Unforced, an op runs on a compiled backend only where the kernel benchmark showed that
backend beating the reference (``bench/results/``); everything else stays on the reference,
with the compiled backends one ``APSFAST_BACKEND`` away.
"""
from __future__ import annotations

import importlib
import os
from types import ModuleType
from typing import Optional

import torch

NAMES = ("reference", "cpu", "triton", "cuda")
ENV_VAR = "APSFAST_BACKEND"

# Default backends per (device type, op) when nothing is forced; reference serves the rest.
# bench/results/cpu-kernels.md: the batched transition in C++ beats per-layer autograd
# (2.8x on ResNet-20, 1.9x on MobileNet-v2); the C++ construction of one layer only ties the
# reference's GEMMs (0.99x), so it is not the default, but its grouped construction (layers
# over threads, no Python per layer) makes a supernet's weight step 1.12-1.17x faster
# (bench/results/cpu-host.md, APSFAST_BACKEND=cpu against the default). bench/results/h100-kernels.md: on a GPU the CUDA
# construction beats the reference's GEMMs (median 1.27x per conv, 3x for a network's grouped
# build) and its batched transition beats per-layer autograd (41x on ResNet-20, 2.2x on
# MobileNet-v2); Triton is one APSFAST_BACKEND away.
_PREFERENCE: dict[tuple[str, str], tuple[str, ...]] = {
    ("cpu", "transition_step_all"): ("cpu",),
    ("cpu", "construct_grouped"): ("cpu",),
    **{("cuda", op): ("cuda",) for op in ("construct", "construct_backward", "construct_grouped",
                                          "transition_step_all")},
}
_MODULES = {"reference": "apsfast.reference", "cpu": "apsfast._backends.cpu",
            "triton": "apsfast._backends.triton", "cuda": "apsfast._backends.cuda"}

_loaded: dict[str, Optional[ModuleType]] = {}
_reasons: dict[str, str] = {}


class BackendUnavailable(RuntimeError):
    """A forced backend cannot serve the call (not built, or wrong device/dtype)."""


def _load(name: str) -> Optional[ModuleType]:
    if name in _loaded:
        return _loaded[name]
    module = None
    if name not in _MODULES:
        _reasons[name] = "not implemented in this version"
    else:
        try:
            module = importlib.import_module(_MODULES[name])
        except ImportError as err:
            _reasons[name] = str(err)
    _loaded[name] = module
    return module


def status() -> dict[str, str]:
    """Each backend's name mapped to ``"available"`` or the reason it is not."""
    return {name: "available" if _load(name) is not None else _reasons[name] for name in NAMES}


def available() -> tuple[str, ...]:
    """Names of the backends that loaded, in :data:`NAMES` order."""
    return tuple(name for name in NAMES if _load(name) is not None)


def defaults() -> dict[str, str]:
    """``"<device>/<op>"`` mapped to the compiled backend that serves it unforced (when built);
    every op not listed runs on the reference."""
    return {f"{device}/{op}": ", ".join(names) for (device, op), names in _PREFERENCE.items()}


def forced() -> Optional[str]:
    """The backend named by ``APSFAST_BACKEND``, or ``None``."""
    name = os.environ.get(ENV_VAR, "").strip().lower()
    if not name:
        return None
    if name not in NAMES:
        raise ValueError(f"{ENV_VAR} must be one of {', '.join(NAMES)}, got {name!r}")
    return name


def select(op: str, device: torch.device, dtype: torch.dtype) -> ModuleType:
    """The backend module that runs ``op`` for tensors of this device and dtype."""
    name = forced()
    if name is not None:
        module = _load(name)
        if module is None:
            raise BackendUnavailable(f"{ENV_VAR}={name} but that backend is unavailable: {_reasons[name]}")
        if not hasattr(module, op) or not module.supports(device, dtype):
            raise BackendUnavailable(f"{ENV_VAR}={name} cannot run {op} on {device.type} "
                                     f"tensors of dtype {dtype}")
        return module
    for name in _PREFERENCE.get((device.type, op), ()):
        module = _load(name)
        if module is not None and hasattr(module, op) and module.supports(device, dtype):
            return module
    return _load("reference")
