"""Reading the settings: the defaults, then a preset, a YAML file and ``section.key=value``
overrides, the result checked before any work starts. Above the types
(:mod:`apsfast.search.config`), their reading (:mod:`apsfast.search.overrides`) and their
checks (:mod:`apsfast.search.validation`), which know nothing of it."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union

from apsfast.search.config import PRESET_DIR, Config, ConfigError, ModelConfig, presets
from apsfast.search.overrides import merge_fields, nested, parse_override, read_yaml
from apsfast.search.validation import check_config


def load_config(preset: Optional[str] = None, file: Optional[Union[str, Path]] = None,
                overrides: Sequence[Union[str, tuple[str, Any]]] = (), *, model: Optional[str] = None) -> Config:
    """The defaults, then ``preset``, then the YAML ``file``, then ``model`` (a model name that
    replaces the whole ``model`` section: the preset's options belong to the preset's model),
    then ``overrides`` (``"section.key=value"`` strings or ``(key, value)`` pairs), validated.

    Raises:
        ConfigError: an unknown preset, file, section or field, a wrong type or an invalid
            value; the message names the field.
    """
    config = Config()
    if preset is not None:
        if preset not in presets():
            raise ConfigError(f"unknown preset {preset!r}; presets: {', '.join(presets())}")
        merge_fields(config, read_yaml(PRESET_DIR / f"{preset}.yaml", "preset"), "")
    if file is not None:
        merge_fields(config, read_yaml(Path(file), "config file"), "")
    if model is not None:
        config.model = ModelConfig(name=model)
    return apply_overrides(config, overrides)


def apply_overrides(config: Config, overrides: Sequence[Union[str, tuple[str, Any]]]) -> Config:
    """``config`` (changed in place) with ``overrides`` (``"section.key=value"`` strings or
    ``(key, value)`` pairs) applied, validated."""
    for item in overrides:
        key, value = parse_override(item) if isinstance(item, str) else item
        merge_fields(config, nested(key, value), "")
    check_config(config)
    return config


def config_from_dict(data: Mapping[str, Any]) -> Config:
    """A config from :meth:`Config.to_dict` output (a checkpoint's or a result's), validated."""
    config = Config()
    merge_fields(config, data, "")
    check_config(config)
    return config
