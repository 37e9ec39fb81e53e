"""The figures of retrained archs, drawn when runs hold them: the top-N most likely archs
(paper Fig. 8, ``apsfast train RUN --top N``) and accuracy against MACs, searched archs
against uniformly scaled networks (Fig. 9, ``apsfast train RUN --uniform RATIO``)."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Optional, Sequence

from apsfast.analysis.runs import Run


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")  # files only
    import matplotlib.pyplot as plt
    return plt


def plot_top(runs: Sequence[Run], path: Path) -> Optional[Path]:
    """Fig. 8: for every N, mean ± std of the test accuracies of the N most likely archs
    (``retrain/top.json``); ``None`` when no run has one."""
    tops = [(run, json.loads((run.path / "retrain" / "top.json").read_text())) for run in runs
            if (run.path / "retrain" / "top.json").is_file()]
    if not tops:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for k, (run, top) in enumerate(tops):
        accs = [c["test_acc"] for c in top["archs"]]
        ns = list(range(1, len(accs) + 1))
        means = [sum(accs[:n]) / n for n in ns]
        stds = [_std(accs[:n]) for n in ns]
        offset = (k - (len(tops) - 1) / 2) * 0.08
        ax.errorbar([n + offset for n in ns], means, yerr=stds, fmt="o-", capsize=3, color=run.color, label=run.label)
    ax.set(xlabel="N (the N most likely archs of the beam, retrained)", ylabel="test accuracy (mean ± std)",
           title="Accuracy of the top-N likely archs (paper Fig. 8)")
    ax.xaxis.get_major_locator().set_params(integer=True)
    return _save(fig, ax, path)


def _std(values: Sequence[float]) -> float:
    """The sample standard deviation (0 for one value)."""
    if len(values) < 2:
        return 0.0
    mean = sum(values) / len(values)
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def plot_macs(runs: Sequence[Run], path: Path) -> Optional[Path]:
    """Fig. 9: test accuracy against MACs of every retrained arch under the runs' ``retrain/``
    folders, searched archs by strategy, uniformly scaled networks as one line; ``None`` when
    nothing was retrained."""
    points = [(run, s) for run in runs for s in run.retrained()]
    if not points:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.2, 4))
    uniform = sorted({(s["flops"], s["test_acc"], s.get("uniform")) for _, s in points
                      if s.get("strategy") == "uniform"})
    if uniform:
        ax.plot([u[0] / 1e6 for u in uniform], [u[1] for u in uniform], "s--", color="0.4",
                label="uniform scaling of the standard widths")
        for flops, acc, ratio in uniform:
            if ratio is not None:
                ax.annotate(f"×{ratio:g}", (flops / 1e6, acc), textcoords="offset points", xytext=(4, -10), fontsize=7)
    for run in runs:
        mine = [s for r, s in points if r is run and s.get("strategy") != "uniform"]
        if mine:
            ax.scatter([s["flops"] / 1e6 for s in mine], [s["test_acc"] for s in mine], color=run.color,
                       label=f"{run.label} (searched)", zorder=3)
    ax.set(xlabel="MACs of the network (millions)", ylabel="test accuracy after retraining",
           title="Accuracy vs MACs: search vs uniform scaling (paper Fig. 9)")
    return _save(fig, ax, path)


def _save(fig, ax, path):
    """A grid, the legend, fixed margins, the PNG written and the figure closed."""
    plt = _pyplot()
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.subplots_adjust(left=0.14, right=0.97, bottom=0.14, top=0.9)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
