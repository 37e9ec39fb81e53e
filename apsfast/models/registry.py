"""The named search spaces and the one entry point that builds them."""
from __future__ import annotations

import inspect
from typing import Any, Callable, Mapping

from apsfast.models.base import Supernet

_BUILDERS: dict[str, Callable[..., Supernet]] = {}


def register(name: str) -> Callable[[Callable[..., Supernet]], Callable[..., Supernet]]:
    """Register a supernet builder under ``name``; its keyword arguments are its options."""
    def add(builder: Callable[..., Supernet]) -> Callable[..., Supernet]:
        if name in _BUILDERS:
            raise ValueError(f"a model named {name!r} is already registered")
        _BUILDERS[name] = builder
        return builder
    return add


def available() -> list[str]:
    """The names :func:`build` accepts."""
    return sorted(_BUILDERS)


def options_of(name: str) -> dict[str, Any]:
    """The options of model ``name`` with their defaults."""
    return {p.name: p.default for p in inspect.signature(_builder(name)).parameters.values()
            if p.name not in ("device", "dtype")}


def _builder(name: str) -> Callable[..., Supernet]:
    if name not in _BUILDERS:
        raise ValueError(f"unknown model {name!r}; available: {', '.join(available())}")
    return _BUILDERS[name]


def build(name: str, *, device=None, dtype=None, **options: Any) -> Supernet:
    """Build the supernet ``name`` (see :func:`available`) with ``options`` (see each builder).

    Unknown options are an error naming the valid ones. ``device``/``dtype`` place the
    parameters (``device="meta"`` builds without memory, to count parameters or FLOPs). The
    options, defaults filled in, are recorded in ``supernet.options``.
    """
    chosen = {**options_of(name), **options}
    unknown = sorted(set(options) - set(options_of(name)))
    if unknown:
        raise TypeError(f"unknown option(s) {unknown} for model {name!r}; its options are "
                        f"{sorted(options_of(name))}")
    supernet = _builder(name)(**options, device=device, dtype=dtype)
    supernet.options = {key: _plain(value) for key, value in chosen.items()}
    return supernet


def _plain(value: Any) -> Any:
    """``value`` with tuples as lists and mappings as dicts, for JSON."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value
