"""What ``sharing.transition_every: k`` changes: Φ's path over a search phase and the transition's
cost per weight step, for k = 1 (the default), 2, 5 and 10, with the steered rate.

``apsfast bench transition-every [--steps N] [--out PATH]``: runs the transitions of a search
phase of N weight steps on the demo's and ResNet-20's CIFAR spaces (the transition depends on
P, Q only, so no data is needed) and prints a markdown table (also written to PATH.md and
PATH.jsonl).
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Optional, Sequence

import torch

from apsfast import models
from apsfast.benchmarks.common import environment, report
from apsfast.nn import network_sharing_level
from apsfast.search import load_config
from apsfast.search.strategies import TransitionRate, after_weight_step

SPACES = ("demo", "resnet20_cifar")
EVERY = (1, 2, 5, 10)
MARKS = (0.25, 0.5, 0.75, 1.0)


def trajectory(preset: str, steps: int, every: int) -> tuple[list[float], float]:
    """Φ at each mark of the phase, and the transition's seconds per weight step."""
    config = load_config(preset)
    torch.manual_seed(0)
    net = models.build(config.model.name, sharing="transitional", **config.model.options)
    rate = TransitionRate(None, steps, every=every)
    marks = {round(m * steps): m for m in MARKS}
    phis, spent = [], 0.0
    with torch.no_grad():
        for step in range(1, steps + 1):
            start = time.perf_counter()
            phi = after_weight_step(net, "transitional", rate.tau, step, every)
            spent += time.perf_counter() - start
            rate.observe(step, phi, every)
            if step in marks:
                phis.append(float(network_sharing_level(net)))
    return phis, spent / steps


def main(argv: Optional[Sequence[str]] = None, prog: str = "apsfast bench transition-every") -> int:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=1000, help="weight steps of the search phase (default 1000)")
    parser.add_argument("--out", type=Path, help="also write PATH.md and PATH.jsonl")
    args = parser.parse_args(argv)
    lines = ["| space | k | Φ at 25% | 50% | 75% | 100% of the phase | largest difference from k = 1 | "
             "transition ms per weight step |", "|---|---|---|---|---|---|---|---|"]
    rows = []
    for preset in SPACES:
        base = None
        for every in EVERY:
            phis, seconds = trajectory(preset, args.steps, every)
            base = base or phis
            worst = max(abs(a - b) / b for a, b in zip(phis, base))
            rows.append({"space": preset, "every": every, "phi": phis, "max_rel_diff": worst,
                         "transition_ms": seconds * 1e3})
            lines.append(f"| {preset} | {every} | " + " | ".join(f"{p:.4g}" for p in phis)
                         + f" | {worst:.2%} | {seconds * 1e3:.2f} |")
    report("Φ's path with one transition every k weight steps", environment(f"{prog} --steps {args.steps}"), rows,
           "\n".join(lines), args.out)
    return 0
