"""Every setting described from the typed config's own metadata: its path, type, default,
allowed values and one line of meaning (each field of :mod:`apsfast.search.config` carries
``doc`` and, where its values are a fixed set or a range, ``allowed``). Rendered as the
documentation's configuration reference (:func:`markdown_reference`) and as the comments of
``apsfast search --print-config`` (:func:`commented_yaml`), so the two cannot disagree.
"""
from __future__ import annotations

import dataclasses
import re
import types
import typing
from dataclasses import dataclass
from typing import Any, Union

import yaml

from apsfast.search.config import Config

_KINDS = {bool: "bool", int: "int", float: "float", str: "string", dict: "mapping", list: "list"}


@dataclass(frozen=True)
class Setting:
    """One field of the config: ``section.name``, its type, default, allowed values (``""``:
    any value of the type; ``choices`` where they are a fixed set) and meaning."""

    section: str
    name: str
    kind: str
    default: Any
    allowed: str
    choices: tuple
    doc: str

    @property
    def path(self) -> str:
        return f"{self.section}.{self.name}"


def _kind(annotation: Any) -> str:
    if typing.get_origin(annotation) in (Union, types.UnionType):
        (inner,) = [a for a in typing.get_args(annotation) if a is not type(None)]
        return f"{_kind(inner)} or null"
    return _KINDS[annotation]


def _allowed(value: Any) -> str:
    """A field's ``allowed`` metadata as text: a tuple of choices, or a sentence (a range)."""
    if value is None:
        return ""
    if isinstance(value, (tuple, list)):
        return "one of " + ", ".join(_yaml(v) for v in value)
    return str(value)


def _yaml(value: Any) -> str:
    """``value`` as YAML on one line (flow style), as a config file would hold it."""
    return yaml.safe_dump(value, default_flow_style=True, width=10 ** 9).removesuffix("\n...\n").strip()


def _default(field: dataclasses.Field) -> Any:
    return field.default_factory() if field.default_factory is not dataclasses.MISSING else field.default


def sections() -> list[tuple[str, type]]:
    """The config's sections in order, each with its dataclass."""
    hints = typing.get_type_hints(Config)
    return [(f.name, hints[f.name]) for f in dataclasses.fields(Config)]


def settings() -> list[Setting]:
    """Every field of every section, in the order of the config."""
    rows = []
    for section, kind in sections():
        hints = typing.get_type_hints(kind)
        for field in dataclasses.fields(kind):
            allowed = field.metadata.get("allowed")
            rows.append(Setting(section, field.name, _kind(hints[field.name]), _default(field), _allowed(allowed),
                                tuple(allowed) if isinstance(allowed, (tuple, list)) else (), field.metadata["doc"]))
    return rows


def _summary(kind: type) -> str:
    """A section's docstring as Markdown (Sphinx roles as code)."""
    return re.sub(r":\w+:`~?([^`]+)`", r"``\1``", " ".join((kind.__doc__ or "").split()))


def _markdown_allowed(setting: Setting) -> str:
    if setting.choices:
        return "one of " + ", ".join(f"`{_yaml(v)}`" for v in setting.choices)
    return setting.allowed.replace("|", "&#124;")


def markdown_reference() -> str:
    """The reference as Markdown: a table per section (field, type, default, allowed, meaning)."""
    by_section: dict[str, list[Setting]] = {}
    for setting in settings():
        by_section.setdefault(setting.section, []).append(setting)
    parts = []
    for section, kind in sections():
        rows = ["| field | type | default | allowed | meaning |", "| --- | --- | --- | --- | --- |"]
        rows += [f"| `{s.name}` | {s.kind} | `{_yaml(s.default)}` | {_markdown_allowed(s)} | "
                 f"{s.doc.replace('|', '&#124;')} |" for s in by_section[section]]
        table = "\n".join(rows)
        parts.append(f'## `{section}`\n\n{_summary(kind)}\n\n<div class="settings" markdown>\n\n{table}\n\n</div>')
    return "\n\n".join(parts) + "\n"


def commented_yaml(config: Config) -> str:
    """``config`` as YAML, each field followed by a comment with its meaning and allowed values:
    what ``apsfast search --print-config`` prints. It loads back to the same settings."""
    values = config.to_dict()
    lines, section = [], None
    for setting in settings():
        if setting.section != section:
            section = setting.section
            lines.append(f"{section}:")
        note = setting.doc + (f"; allowed: {setting.allowed}" if setting.allowed else "")
        lines.append(f"  {setting.name}: {_yaml(values[section][setting.name])}  # {note}")
    return "\n".join(lines) + "\n"
