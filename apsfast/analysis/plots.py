"""The paper's analysis figures, drawn from the ``analysis`` lines of one or several search runs
(``apsfast analyze RUN [RUN ...]``), runs overlaid and labelled by their strategy:

* ``fig3_sharing.png`` — Φ against the gradient alignment cos(g, g̃) and against the coupled
  gradient norm, one point per measurement (paper Fig. 3);
* ``fig4_accuracy.png`` — the mean and best validation accuracy of sampled archs over the
  weight steps, one panel per strategy, and cos(g, g̃) with Φ on a second axis (Fig. 4);
* ``fig5_decisions.png`` — each decision's candidate probabilities over the last part of the
  search, one panel per strategy, and the coupled norm with Φ on a second axis (Fig. 5);
* ``fig8_top.png`` — when runs hold ``retrain/top.json`` (``apsfast train RUN --top N``): the
  test accuracy of the top-N most likely archs, mean ± std for every N (Fig. 8);
* ``fig9_macs.png`` — when runs hold retrained archs (``retrain/``, ``retrain/top-k/``,
  ``retrain/uniform-R/``): test accuracy against MACs, searched archs against uniformly scaled
  networks (Fig. 9).
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Optional, Sequence, Union

from apsfast.analysis.retrained import plot_macs, plot_top
from apsfast.analysis.runs import LABELS, AnalysisError, Run, read_run, read_runs
from apsfast.search.metrics import read_metrics

FIGURES = ("fig3_sharing.png", "fig4_accuracy.png", "fig5_decisions.png", "fig8_top.png", "fig9_macs.png")
TAIL = 0.25  # Fig. 5: the last quarter of the search phase's measurements

__all__ = ["AnalysisError", "FIGURES", "LABELS", "Run", "draw", "plot_accuracy", "plot_decisions", "plot_sharing",
           "read_run", "read_runs"]


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")  # files only
    import matplotlib.pyplot as plt
    return plt


def _series(run: Run, key: str) -> tuple[list[int], list[float]]:
    points = [(r["step"], r[key]) for r in run.records if r.get(key) is not None]
    return [p[0] for p in points], [p[1] for p in points]


def _smooth(values: Sequence[float], window: int) -> list[float]:
    """A centred running mean (the raw points are drawn faintly beside it)."""
    half = max(window // 2, 0)
    out = []
    for k in range(len(values)):
        part = values[max(0, k - half):k + half + 1]
        out.append(sum(part) / len(part))
    return out


def _line(ax, run: Run, key: str, *, style: str = "-", label: Optional[str] = None, color: Optional[str] = None):
    steps, values = _series(run, key)
    color = color or run.color
    window = max(1, len(values) // 15)
    if window > 1:
        ax.plot(steps, values, style, color=color, alpha=0.25, linewidth=0.8)
        values = _smooth(values, window)
    return ax.plot(steps, values, style, color=color, label=label, linewidth=1.5)


def _warmup_end(run: Run) -> Optional[int]:
    """The last weight step of the warm-up (from the epoch lines; else the last warm-up measurement)."""
    epochs = read_metrics(run.path / "metrics.jsonl", kind="epoch")
    steps = [r["step"] for r in epochs if r.get("phase") == "warmup"] or \
        [r["step"] for r in run.records if r.get("phase") == "warmup"]
    return max(steps) if steps else None


def _shade_warmup(ax, runs: Sequence[Run], label: bool = True) -> None:
    ends = [e for e in (_warmup_end(r) for r in runs) if e is not None]
    if ends:
        ax.axvspan(0, max(ends), color="0.92", zorder=0, label="warm-up (uniform archs)" if label else None)


def _groups(runs: Sequence[Run]) -> dict[str, list[Run]]:
    groups: dict[str, list[Run]] = {}
    for run in runs:
        groups.setdefault(LABELS.get(run.strategy, run.strategy), []).append(run)
    return groups


def _title(fig, runs: Sequence[Run], what: str) -> None:
    fig.suptitle(f"{what} — {runs[0].model}", fontsize=10)


def plot_sharing(runs: Sequence[Run], path: Path) -> Path:
    """Fig. 3: Φ against cos(g, g̃) (left) and against the coupled gradient norm (right)."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key, name in ((axes[0], "cos", "gradient alignment cos(g, g̃)"),
                          (axes[1], "coupled_norm", "coupled gradient norm (Frobenius)")):
        for run in runs:
            points = [(r["phi"], r[key]) for r in run.records if r.get(key) is not None and r.get("phi")]
            ax.scatter([p[0] for p in points], [p[1] for p in points], s=14, alpha=0.6, color=run.color,
                       label=run.label, edgecolors="none")
        ax.set(xlabel="sharing level Φ (sum over layers, log scale)", ylabel=name, xscale="log",
               title=f"Φ against {name.split(' (')[0]}")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8, title="strategy", title_fontsize=8)
    _title(fig, runs, "Sharing level and the search dynamics, one point per measurement (paper Fig. 3)")
    fig.subplots_adjust(left=0.08, right=0.98, bottom=0.14, top=0.82, wspace=0.25)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _with_phi(ax, runs: Sequence[Run], key: str, ylabel: str):
    """``key`` of every run over the steps on ``ax``, Φ dotted on a second (log) axis."""
    for run in runs:
        _line(ax, run, key, label=run.label)
    twin = ax.twinx()
    for run in runs:
        steps, phi = _series(run, "phi")
        twin.plot(steps, phi, ":", color=run.color, linewidth=1.5)
    values = [v for run in runs for v in _series(run, "phi")[1] if v > 0]
    if values and max(values) > 10 * min(values):  # the strategies' Φ differ by orders of magnitude
        twin.set_yscale("log")
        twin.set_ylabel("Φ (dotted, log scale)")
    else:
        twin.set_ylabel("Φ (dotted)")
        twin.ticklabel_format(axis="y", style="sci", scilimits=(-3, 4), useOffset=False)
    ax.set(xlabel="weight step", ylabel=ylabel)
    _shade_warmup(ax, runs)
    ax.grid(alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    handles.append(twin.plot([], [], ":", color="0.3")[0])
    labels.append("Φ (right axis)")
    ax.legend(handles, labels, fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=3,
              frameon=False)  # below the panel: the curves of both axes stay visible
    return twin


def plot_accuracy(runs: Sequence[Run], path: Path) -> Path:
    """Fig. 4: mean (solid) and best (dashed) validation accuracy of sampled archs per
    strategy, and cos(g, g̃) over the steps with Φ on a second axis."""
    plt = _pyplot()
    groups = _groups(runs)
    fig, axes = plt.subplots(1, len(groups) + 1, figsize=(4.2 * (len(groups) + 1), 4.4), squeeze=False)
    samples = runs[0].config.get("analysis", {}).get("samples", "?")
    top = min(1.0, 1.15 * max([v for run in runs for v in _series(run, "acc_max")[1]] or [1.0]))
    for ax, (name, members) in zip(axes[0], groups.items()):
        for run in members:
            suffix = run.label[len(name):]
            _line(ax, run, "acc_mean", label=f"mean{suffix}")
            _line(ax, run, "acc_max", style="--", label=f"best{suffix}")
        _shade_warmup(ax, members)
        ax.set(xlabel="weight step", ylabel=f"validation accuracy of {samples} sampled archs", title=name)
        ax.set_ylim(0, top)  # one scale for every strategy's panel
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2, frameon=False)
    _with_phi(axes[0][-1], runs, "cos", "gradient alignment cos(g, g̃)")
    axes[0][-1].set_title("gradient alignment (solid) and Φ (dotted)")
    _title(fig, runs, "Accuracy of sampled archs and gradient alignment over the search (paper Fig. 4)")
    fig.subplots_adjust(left=0.06, right=0.93, bottom=0.3, top=0.8, wspace=0.4)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def tail_probabilities(runs: Sequence[Run], tail: float = TAIL) -> tuple[list[list[float]], list[list[float]], int]:
    """Per decision and candidate, the mean probability over the last ``tail`` of each run's
    search-phase measurements (runs pooled), its 95% confidence half-width, and how many
    measurements that is."""
    chosen = []
    for run in runs:
        search = [r for r in run.records if r.get("phase") == "search" and r.get("probs")] or \
                 [r for r in run.records if r.get("probs")]
        chosen += search[-max(1, math.ceil(tail * len(search))):]
    count = len(chosen)
    means, halves = [], []
    for k, first in enumerate(chosen[0]["probs"]):
        column_means, column_halves = [], []
        for a in range(len(first)):
            values = [r["probs"][k][a] for r in chosen]
            mean = sum(values) / count
            var = sum((v - mean) ** 2 for v in values) / (count - 1) if count > 1 else 0.0
            column_means.append(mean)
            column_halves.append(1.96 * math.sqrt(var / count))
        means.append(column_means)
        halves.append(column_halves)
    return means, halves, count


def _decision_names(run: Run) -> tuple[list[str], Optional[list[int]]]:
    """Decision names (from ``result.json`` when there) and the widths all decisions share, if any."""
    result = run.path / "result.json"
    if result.is_file():
        decisions = json.loads(result.read_text()).get("decisions", [])
        widths = {tuple(d["widths"]) for d in decisions}
        return [d["name"] for d in decisions], (list(widths.pop()) if len(widths) == 1 else None)
    count = len(run.records[-1].get("probs") or [])
    return [f"decision {k + 1}" for k in range(count)], None


def plot_decisions(runs: Sequence[Run], path: Path, tail: float = TAIL) -> Path:
    """Fig. 5: per strategy, each decision's candidate probabilities (along the most likely
    arch) averaged over the last ``tail`` of the search, with 95% confidence bands; and the
    coupled gradient norm over the steps with Φ on a second axis."""
    plt = _pyplot()
    groups = _groups(runs)
    names, widths = _decision_names(runs[0])
    fig, axes = plt.subplots(1, len(groups) + 1, figsize=(4.2 * (len(groups) + 1), 4.8), squeeze=False)
    cmap = plt.get_cmap("viridis")
    for ax, (name, members) in zip(axes[0], groups.items()):
        means, halves, count = tail_probabilities(members, tail)
        x = list(range(1, len(means) + 1))
        candidates = max(len(m) for m in means)
        for a in range(candidates):
            mean = [m[a] if a < len(m) else math.nan for m in means]
            half = [h[a] if a < len(h) else 0.0 for h in halves]
            color = cmap(a / max(candidates - 1, 1))
            label = f"width {widths[a]}" if widths else f"candidate {a + 1} of {candidates} (narrow → wide)"
            ax.plot(x, mean, "o-", color=color, markersize=3, label=label)
            ax.fill_between(x, [m - h for m, h in zip(mean, half)], [m + h for m, h in zip(mean, half)],
                            color=color, alpha=0.25)
        ax.set(xlabel="decision (network order)", ylabel="probability", ylim=(0, 1),
               title=f"{name}: last {tail:.0%} of the search\n(mean of {count} measurement{'s' * (count > 1)})")
        ax.set_xticks(x)
        ax.set_xticklabels(names[:len(x)] if len(x) <= 8 else [str(k) for k in x], rotation=30 if len(x) <= 8 else 0,
                           fontsize=7, ha="right" if len(x) <= 8 else "center")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="best")
    _with_phi(axes[0][-1], runs, "coupled_norm", "coupled gradient norm (Frobenius)")
    axes[0][-1].set_title("coupled gradient norm (solid) and Φ (dotted)")
    _title(fig, runs, "Decision probabilities (bands: 95% confidence) and coupled gradients (paper Fig. 5)")
    fig.subplots_adjust(left=0.06, right=0.93, bottom=0.3, top=0.8, wspace=0.4)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def default_out(paths: Sequence[Union[str, Path]]) -> Path:
    """Where ``apsfast analyze`` writes without ``--out``: the run's folder for one run, else
    the folder that holds them all."""
    if len(paths) == 1:
        return Path(paths[0])
    return Path(os.path.commonpath([os.path.abspath(p) for p in paths]))


def draw(paths: Sequence[Union[str, Path]], out: Optional[Union[str, Path]] = None) -> list[Path]:
    """Every figure the runs at ``paths`` allow (see the module's documentation), written into
    ``out`` (default: :func:`default_out`); returns their paths."""
    if not paths:
        raise AnalysisError("no run given: pass one or more search output folders")
    runs = read_runs(paths)
    folder = Path(out) if out is not None else default_out(paths)
    folder.mkdir(parents=True, exist_ok=True)
    measured = [run for run in runs if run.records]  # Fig. 3-5 need analysis records; Fig. 8-9 retrains
    written = [plot_sharing(measured, folder / FIGURES[0]), plot_accuracy(measured, folder / FIGURES[1]),
               plot_decisions(measured, folder / FIGURES[2])] if measured else []
    written += [plot_top(runs, folder / FIGURES[3]), plot_macs(runs, folder / FIGURES[4])]
    return [p for p in written if p is not None]
