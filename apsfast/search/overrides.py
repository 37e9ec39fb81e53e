"""How settings reach the typed config tree: values from YAML files, mappings and
``section.key=value`` overrides, each checked against its field's annotation (a float may be
written ``40M``, ``1.2G``); errors name the field, the value and what was expected. Generic over
dataclasses: :mod:`apsfast.search.config` defines the tree.
"""
from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from pathlib import Path
from typing import Any, Mapping, Optional, Union

import yaml


class ConfigError(ValueError):
    """A config field has an unknown name, a wrong type or an invalid value."""


_SUFFIX = {"K": 1e3, "M": 1e6, "G": 1e9, "T": 1e12}


def _count(text: str) -> Optional[float]:
    """``"40M"`` → 4e7: MAC counts are easier to read with a suffix."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*([KMGT]?)\s*", text)
    return None if match is None else float(match.group(1)) * _SUFFIX.get(match.group(2), 1.0)


def _convert(path: str, value: Any, kind: Any) -> Any:
    """``value`` checked against the annotation ``kind`` (after ``from __future__ import
    annotations`` resolution); raises :class:`ConfigError` naming ``path``."""
    origin = typing.get_origin(kind)
    if origin in (Union, types.UnionType):
        options = typing.get_args(kind)
        if value is None and type(None) in options:
            return None
        (inner,) = [k for k in options if k is not type(None)]
        return _convert(path, value, inner)
    if kind is bool:
        if isinstance(value, bool):
            return value
    elif kind is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif kind is float:
        # YAML 1.1 reads 1e-4 (no dot) as a string; MAC counts may carry a K/M/G suffix.
        parsed = _count(value) if isinstance(value, str) else None
        if parsed is not None and (path.endswith("flops_target") or value.strip()[-1:].isdigit()):
            return parsed
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            return float(value)
    elif kind is str:
        if isinstance(value, str):
            return value
    elif kind in (dict, list):
        if isinstance(value, kind):
            return value
    names = {bool: "a bool", int: "an int", float: "a finite number", str: "a string",
             dict: "a mapping", list: "a list"}
    raise ConfigError(f"{path} must be {names.get(kind, kind)}, got {value!r}")


def merge_fields(obj: Any, updates: Mapping[str, Any], path: str) -> None:
    """Set the fields of dataclass ``obj`` from ``updates``, recursing into sections."""
    if not isinstance(updates, Mapping):
        raise ConfigError(f"{path or 'the config'} must be a mapping of fields, got {updates!r}")
    hints = typing.get_type_hints(type(obj))
    for key, value in updates.items():
        where = f"{path}.{key}" if path else str(key)
        if key not in hints:
            raise ConfigError(f"unknown field {where!r}; {path or 'the config'} has "
                              f"{', '.join(sorted(hints))}")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            merge_fields(current, value, where)
        elif hints[key] is dict and isinstance(value, Mapping):
            setattr(obj, key, {**current, **value})  # options merge, so one key can be overridden
        else:
            setattr(obj, key, _convert(where, value, hints[key]))


def parse_override(text: str) -> tuple[str, Any]:
    """``"train.lr=0.05"`` → ``("train.lr", 0.05)``; the value is read as YAML."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"an override must be SECTION.KEY=VALUE, got {text!r}")
    return key.strip(), yaml.safe_load(value) if value.strip() else None


def nested(key: str, value: Any) -> dict[str, Any]:
    """``("train.lr", 0.05)`` → ``{"train": {"lr": 0.05}}``."""
    out: Any = value
    for part in reversed(key.split(".")):
        out = {part: out}
    return out


def read_yaml(path: Path, what: str) -> Mapping[str, Any]:
    """The YAML mapping at ``path`` (``what`` names it in errors: a preset, a config file)."""
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{what} {str(path)!r} does not exist") from None
    except yaml.YAMLError as error:
        raise ConfigError(f"{what} {str(path)!r} is not valid YAML: {error}") from None
    return {} if data is None else data
