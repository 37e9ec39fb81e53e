"""The configuration reference and ``--print-config``'s comments come from the settings' own
metadata: every field described in one line, its allowed values the ones the checks accept."""
import dataclasses

import pytest
import yaml

from apsfast import data, sharing
from apsfast.models import runtime
from apsfast.search import config, explain, strategies
from apsfast.search.settings import load_config


def test_every_field_has_one_line_of_meaning():
    described = explain.settings()
    count = sum(len(dataclasses.fields(kind)) for _, kind in explain.sections())
    assert len(described) == count == len({s.path for s in described})
    for setting in described:
        assert setting.doc.strip() and "\n" not in setting.doc, setting.path


@pytest.mark.parametrize("path, values", [
    ("sharing.strategy", strategies.STRATEGIES), ("sharing.transition_precision", sharing.PRECISIONS),
    ("controller.kind", config.SEARCHER_KINDS), ("controller.baseline", config.BASELINES),
    ("result.select", config.SELECTS), ("run.device", config.DEVICES), ("run.amp", config.AMP),
    ("run.dist_backend", config.DIST_BACKENDS), ("data.augment", data.AUGMENTS), ("data.normalize", data.NORMALIZE),
    ("reward.latency_runtime", runtime.RUNTIMES),
])
def test_allowed_values_are_the_checked_ones(path, values):
    (setting,) = [s for s in explain.settings() if s.path == path]
    assert setting.allowed == "one of " + ", ".join(values)


@pytest.mark.parametrize("preset", ["demo", "resnet20_cifar"])
def test_print_config_loads_back_to_the_same_settings(preset):
    settings = load_config(preset, overrides=["train.lr=0.5", "model.options.widths=[4, 8]"])
    text = explain.commented_yaml(settings)
    assert yaml.safe_load(text) == settings.to_dict()
    assert "  lr: 0.5  # " in text


def test_reference_has_a_row_per_field():
    text = explain.markdown_reference()
    for setting in explain.settings():
        assert f"| `{setting.name}` | {setting.kind} | `{explain._yaml(setting.default)}` |" in text, setting.path
    assert text.count("\n## `") + text.startswith("## `") == len(explain.sections())
