"""The paper's §5.2 experiment: one search per sharing strategy (and seed) with the analysis on,
then a table and the figures (``apsfast analyze --compare ordinal,independent,transitional``).

Every search runs in ``OUT/<strategy>-seed<seed>/`` with the preset's settings, the
overrides, no FLOPs target unless one is given (``-s reward.flops_target=…``: §5.2 searches
without one) and ``analysis.every`` = ``run.log_every`` unless set. A search already complete
in its folder is reused, a stopped one resumed. The table (``compare.md``, ``compare.json``)
holds per strategy, as mean ± sample std over the seeds:

* the chosen arch's MACs over the widest arch's (1 = the widest everywhere, which §5.2's
  space without a target should find);
* the mean over decisions of the probability of the widest candidate (along the chosen arch);
* the chosen arch's accuracy: its test accuracy retrained from scratch with ``--retrain``,
  else the supernet's validation accuracy of it (the run's class-balanced evaluation subset,
  batch statistics: the number the search itself ranks by);
* Φ at the end, and the mean cos(g, g̃) and coupled norm over the search phase.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

from apsfast.analysis import plots
from apsfast.search import steps
from apsfast.search.config import Config, ConfigError
from apsfast.search.result import write_json
from apsfast.search.retrain import retrain
from apsfast.search.schedule import Search
from apsfast.search.settings import load_config
from apsfast.search.strategies import STRATEGIES

ROW, TABLE_JSON, TABLE_MD = "compare_row.json", "compare.json", "compare.md"


def parse_list(text: str, what: str, kind: type = str) -> list:
    """``"a,b,c"`` as a list of ``kind``; a :class:`ConfigError` naming ``what`` otherwise."""
    items = [t.strip() for t in text.split(",") if t.strip()]
    try:
        values = [kind(t) for t in items]
    except ValueError:
        raise ConfigError(f"{what} must be a comma-separated list of {kind.__name__}s, got {text!r}") from None
    if not values:
        raise ConfigError(f"{what} is empty")
    return values


def comparison_configs(strategies: Sequence[str], seeds: Sequence[int], *, preset: Optional[str] = None,
                       config_file: Optional[str] = None, overrides: Sequence[str] = ()) -> list[Config]:
    """One validated config per (strategy, seed), before any search starts."""
    bad = [s for s in strategies if s not in STRATEGIES]
    if bad:
        raise ConfigError(f"--compare takes strategies among {', '.join(STRATEGIES)}, got {', '.join(bad)}")
    configs = []
    for strategy in strategies:
        for seed in seeds:
            config = load_config(preset, config_file, ["reward.flops_target=null", *overrides,
                                                       f"sharing.strategy={strategy}", f"run.seed={seed}"])
            if not config.analysis.every:
                config.analysis.every = config.run.log_every
            configs.append(config)
    return configs


def _search_row(config: Config, folder: Path, log: Optional[Callable[[str], None]]) -> dict[str, Any]:
    """Run (or reuse, or resume) one search; its row of the table without the retrain."""
    runner = Search(config, folder, resume=(folder / "checkpoint.pt").exists(), log=log)
    try:
        result = runner.run()
        arch = result["chosen"]["arch"]
        batches = (runner.session.local(x, y) for x, y in runner.eval_set.batches(
            config.train.batch_size, seed=0, epoch=0, shuffle=False, drop_last=True))
        correct, seen = steps.evaluate(runner.net, arch, batches, runner.session.precision)
        correct = runner.processes.sum([float(correct)])[0]
        seen *= runner.processes.world
    finally:
        runner.session.teardown()
    records = [r for r in plots.read_run(folder).records if r.get("phase") == "search"]
    widest = [d["probs"][-1] for d in result["decisions"]]

    def mean_of(key: str) -> Optional[float]:
        values = [r[key] for r in records if r.get(key) is not None]
        return sum(values) / len(values) if values else None

    return {"strategy": config.sharing.strategy, "seed": config.run.seed, "folder": str(folder),
            "flops": result["chosen"]["flops"], "max_flops": result["max_flops"],
            "flops_ratio": result["chosen"]["flops"] / result["max_flops"], "p_widest": sum(widest) / len(widest),
            "val_acc": correct / seen, "phi": result["phi"], "cos": mean_of("cos"),
            "coupled_norm": mean_of("coupled_norm"), "widths": result["chosen"]["widths"]}


def run_one(config: Config, folder: Path, *, retrained: bool, log: Optional[Callable[[str], None]]) -> dict[str, Any]:
    """One strategy and seed: the search (reused when its row exists) and, with ``retrained``,
    the retrain of its chosen arch (resumed when stopped)."""
    path = folder / ROW
    row = json.loads(path.read_text()) if path.is_file() else _search_row(config, folder, log)
    if retrained and row.get("test_acc") is None:
        summary = retrain(folder, None, (), resume=(folder / "retrain" / "checkpoint.pt").exists(), log=log)
        row["test_acc"] = summary["test_acc"]
    write_json(path, row)
    return row


def _stats(values: Sequence[Optional[float]]) -> tuple[Optional[float], Optional[float]]:
    values = [v for v in values if v is not None]
    if not values:
        return None, None
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
    return mean, std


COLUMNS = (("flops_ratio", "chosen MACs / widest MACs", "{:.3f}"),
           ("p_widest", "mean P(widest) over decisions", "{:.3f}"), ("acc", "", "{:.2%}"), ("phi", "Φ at the end", "{:.4g}"), ("cos", "mean cos(g, g̃), search phase", "{:.3f}"),
           ("coupled_norm", "mean coupled norm, search phase", "{:.4g}"))


def summarize(rows: Sequence[dict[str, Any]], retrained: bool) -> list[dict[str, Any]]:
    """Per strategy (in the order first met): every column's mean and std over its rows."""
    table = []
    for strategy in dict.fromkeys(r["strategy"] for r in rows):
        mine = [r for r in rows if r["strategy"] == strategy]
        entry: dict[str, Any] = {"strategy": strategy, "label": plots.LABELS.get(strategy, strategy),
                                 "seeds": [r["seed"] for r in mine]}
        for key, _, _ in COLUMNS:
            source = ("test_acc" if retrained else "val_acc") if key == "acc" else key
            entry[key], entry[f"{key}_std"] = _stats([r.get(source) for r in mine])
        table.append(entry)
    return table


def markdown(table: Sequence[dict[str, Any]], retrained: bool) -> str:
    """The table as markdown, ``mean ± std`` where there are several seeds."""
    acc = "test accuracy (retrained)" if retrained else "supernet val. accuracy of the chosen arch"
    names = [acc if key == "acc" else name for key, name, _ in COLUMNS]
    lines = ["| strategy | seeds | " + " | ".join(names) + " |", "|---|---|" + "---:|" * len(names)]
    for entry in table:
        cells = []
        for key, _, fmt in COLUMNS:
            mean, std = entry[key], entry[f"{key}_std"]
            cell = "–" if mean is None else fmt.format(mean)
            if mean is not None and len(entry["seeds"]) > 1:
                cell += " ± " + fmt.format(std)
            cells.append(cell)
        lines.append(f"| {entry['label']} | {','.join(map(str, entry['seeds']))} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def compare(strategies: Sequence[str], out: Union[str, Path], *, preset: Optional[str] = None,
            config_file: Optional[str] = None, overrides: Sequence[str] = (), seeds: Sequence[int] = (0,),
            retrained: bool = False, log: Optional[Callable[[str], None]] = None) -> dict[str, Any]:
    """Run the §5.2 comparison into ``out`` (see the module's documentation); returns what
    ``compare.json`` holds: the per-run rows, the per-strategy table and the figures."""
    say = log or (lambda text: print(text, flush=True))
    configs = comparison_configs(strategies, seeds, preset=preset, config_file=config_file, overrides=overrides)
    out = Path(out)
    rows = [run_one(c, out / f"{c.sharing.strategy}-seed{c.run.seed}", retrained=retrained, log=log) for c in configs]
    table = summarize(rows, retrained)
    text = markdown(table, retrained)
    figures = plots.draw([r["folder"] for r in rows], out)
    summary = {"preset": preset, "overrides": list(overrides), "retrained": retrained, "rows": rows, "table": table,
               "figures": [str(p) for p in figures]}
    write_json(out / TABLE_JSON, summary)
    (out / TABLE_MD).write_text(text)
    say(text.rstrip())
    say(f"table: {out / TABLE_MD}, {out / TABLE_JSON}; figures: {', '.join(str(p) for p in figures)}")
    return summary
