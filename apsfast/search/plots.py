"""The plots a search leaves behind: accuracy and Φ along the search, and the controller's
per-layer decision probabilities over the epochs (as the paper's Fig. 4–5)."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence, Union


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")  # files only: no display is needed or wanted
    import matplotlib.pyplot as plt
    return plt


def plot_curves(epochs: Sequence[dict[str, Any]], path: Union[str, Path], *, title: str = "") -> Path:
    """Train accuracy, the validation accuracy of the controller's most likely arch and Φ
    per epoch, the warm-up shaded."""
    plt = _pyplot()
    x = [r["epoch"] + 1 for r in epochs]
    fig, (acc_ax, phi_ax) = plt.subplots(1, 2, figsize=(10, 3.6))
    acc_ax.plot(x, [r["train_acc"] for r in epochs], label="train (sampled archs)")
    images = epochs[-1].get("val_images") if epochs else None
    acc_ax.plot(x, [r["val_acc"] for r in epochs],
                label="validation (most likely arch" + (f", {images} class-balanced images)" if images else ")"))
    acc_ax.set(xlabel="epoch", ylabel="accuracy", title="accuracy")
    phi_ax.plot(x, [r["phi"] for r in epochs], color="tab:red")
    phi_ax.set(xlabel="epoch", ylabel="Φ (sum over layers)", title="sharing level Φ", yscale="log")
    warmup = [r["epoch"] + 1 for r in epochs if r["phase"] == "warmup"]
    for ax in (acc_ax, phi_ax):
        if warmup:
            ax.axvspan(0.5, max(warmup) + 0.5, color="0.9", label="warm-up" if ax is acc_ax else None)
        ax.grid(alpha=0.3)
    acc_ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    # Fixed margins: automatic layout engines measure every tick label, slower than the search's last epoch.
    fig.subplots_adjust(left=0.08, right=0.98, bottom=0.14, top=0.84, wspace=0.25)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def plot_decisions(epochs: Sequence[dict[str, Any]], decisions: Sequence[dict[str, Any]],
                   path: Union[str, Path], *, title: str = "") -> Path:
    """One panel per decision: the probability of each candidate width along the controller's
    most likely arch, over the epochs after warm-up. Where every decision has the same
    candidates one legend serves the figure, else each panel has its own (a converted model's
    decisions have widths of their own)."""
    plt = _pyplot()
    search = [r for r in epochs if r["phase"] == "search" and r.get("probs")]
    count = len(decisions)
    cols = min(6, count)
    rows = -(-count // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2.3 * cols + 0.6, 1.9 * rows + 0.5), sharex=True, sharey=True,
                             squeeze=False, layout="constrained")  # room for the titles and the legend
    shared = all(list(d["widths"]) == list(decisions[0]["widths"]) for d in decisions)
    x = [r["epoch"] + 1 for r in search]
    for k, (ax, decision) in enumerate(zip(axes.flat, decisions)):
        for a, width in enumerate(decision["widths"]):
            ax.plot(x, [r["probs"][k][a] for r in search], label=str(width))
        ax.set_title(decision["name"], fontsize=7)
        ax.set_ylim(0, 1)
        ax.tick_params(labelsize=6)
        if not shared:
            ax.legend(title="width", fontsize=5, title_fontsize=5, loc="best")
    for ax in list(axes.flat)[count:]:
        ax.axis("off")
    if shared:
        handles, labels = axes.flat[0].get_legend_handles_labels()
        fig.legend(handles, labels, title="width", loc="outside right upper", fontsize=7, title_fontsize=7)
    fig.supxlabel("epoch", fontsize=8)
    fig.supylabel("probability", fontsize=8)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)
