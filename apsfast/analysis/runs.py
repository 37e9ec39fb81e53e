"""Search runs as the analysis figures read them: a run's folder with its settings and its
``analysis`` metrics lines, checked (one line when a folder is not such a run, or when runs of
different models are mixed) and labelled by strategy."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence, Union

import yaml

from apsfast.search.metrics import read_metrics

LABELS = {"ordinal": "APS-O", "independent": "APS-I", "transitional": "APS-T", "learned": "learned P, Q"}
COLORS = {"ordinal": "tab:blue", "independent": "tab:orange", "transitional": "tab:green", "learned": "tab:purple"}


class AnalysisError(ValueError):
    """A folder is not a run with analysis records, or runs cannot be compared."""


@dataclass
class Run:
    """One search run's folder as the figures read it."""

    path: Path
    config: dict
    records: list = field(default_factory=list)  # the "analysis" metrics lines
    label: str = ""

    @property
    def strategy(self) -> str:
        """The run's ``sharing.strategy``."""
        return self.config.get("sharing", {}).get("strategy", "?")

    @property
    def color(self) -> str:
        """The strategy's colour in every figure."""
        return COLORS.get(self.strategy, "tab:gray")

    @property
    def model(self) -> str:
        """The model's name and build options, as the figures' titles and the checks read them."""
        model = self.config.get("model", {})
        options = ", ".join(f"{k}={v}" for k, v in sorted(model.get("options", {}).items()))
        return f"{model.get('name', '?')}" + (f" ({options})" if options else "")

    def retrained(self) -> list[dict[str, Any]]:
        """Every retrain summary under ``retrain/`` (the chosen arch, top-k, uniform)."""
        found = sorted((self.path / "retrain").glob("**/retrain.json"))
        return [json.loads(p.read_text()) for p in found]


def read_run(path: Union[str, Path]) -> Run:
    """A search run with analysis records (Fig. 3-5) or retrained archs (Fig. 8-9);
    :class:`AnalysisError` (one line) otherwise."""
    path = Path(path)
    if not path.is_dir():
        raise AnalysisError(f"{str(path)!r} is not a folder: pass a search's output folder")
    if not (path / "config.yaml").is_file() or not (path / "metrics.jsonl").is_file():
        raise AnalysisError(f"{str(path)!r} is not a search run (it lacks config.yaml or metrics.jsonl)")
    try:
        config = yaml.safe_load((path / "config.yaml").read_text()) or {}
        records = read_metrics(path / "metrics.jsonl", kind="analysis")
    except (yaml.YAMLError, json.JSONDecodeError) as error:
        raise AnalysisError(f"{str(path)!r} is not a readable search run: {error}") from None
    if not isinstance(config, dict) or "model" not in config or "sharing" not in config:
        raise AnalysisError(f"{str(path)!r} is not a search run (its config.yaml has no model or sharing section)")
    if not records and not (path / "retrain").is_dir():
        raise AnalysisError(f"{str(path)!r} has no analysis records: run the search with -s analysis.every=N "
                            f"(a measurement every N weight steps), or retrain its archs for Fig. 8-9 "
                            f"(apsfast train RUN --top N)")
    return Run(path, config, records)


def read_runs(paths: Sequence[Union[str, Path]]) -> list[Run]:
    """The runs at ``paths``, checked to be of one model, each labelled by its strategy (and
    its seed or folder where labels would repeat)."""
    runs = [read_run(p) for p in paths]
    for run in runs[1:]:
        if run.model != runs[0].model:
            raise AnalysisError(f"the runs are of different models: {str(runs[0].path)!r} is {runs[0].model}, "
                                f"{str(run.path)!r} is {run.model}")
    for run in runs:
        run.label = LABELS.get(run.strategy, run.strategy)
    for run in runs:
        same = [r for r in runs if r.label == run.label]
        if len(same) > 1:
            seeds = {r.config.get("run", {}).get("seed") for r in same}
            for r in same:
                r.label += f" seed {r.config.get('run', {}).get('seed')}" if len(seeds) == len(same) \
                    else f" ({r.path.name})"
    return runs
