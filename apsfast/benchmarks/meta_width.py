"""The meta width of the transitional spaces (``model.options.meta_width``): memory of the
meta-weights and transforms, the transition's ms per step, Φ at the ordinal start and Φ's
floor (:func:`apsfast.nn.network_sharing_floor`), for the MobileNet-v2 and ResNet-18 ImageNet
supernets.

``apsfast bench meta-width [--threads N] [--reps R] [--models A,B] [--out PATH]``: one row per
(space, meta width). Memory counts float32 parameters at 1,000 classes.
"""
from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path
from typing import Optional, Sequence

import torch

from apsfast import models
from apsfast.benchmarks.common import environment, report
from apsfast.nn import aps_layers, network_sharing_floor, network_sharing_level
from apsfast.search import strategies

META_WIDTHS = ("sum", 1.6, "widest")


def row(name: str, meta_width, reps: int) -> dict:
    """Memory, the transition's median seconds over ``reps`` steps, Φ's start and floor."""
    layers = aps_layers(models.build(name, meta_width=meta_width, device="meta"))
    weights = sum(layer.weight.numel() + (layer.bias.numel() if getattr(layer, "bias", None) is not None else 0)
                  for layer in layers)
    transforms = sum(side.matrix.numel() for layer in layers for side in (layer.out_transforms, layer.in_transforms)
                     if side is not None)
    torch.manual_seed(0)
    net = models.build(name, meta_width=meta_width, num_classes=10)
    start, floor = float(network_sharing_level(net)), network_sharing_floor(net)
    strategies.transition(net, 1e-3)  # leaves the exact start
    times = []
    for _ in range(reps):
        began = time.perf_counter()
        strategies.transition(net, 1e-3)
        times.append(time.perf_counter() - began)
    return {"space": name, "meta_width": meta_width, "meta_weights_mb": weights * 4 / 1e6,
            "transforms_mb": transforms * 4 / 1e6, "transition_ms": statistics.median(times) * 1e3,
            "phi_start": start, "phi_floor": floor}


def markdown(rows: list[dict]) -> str:
    lines = ["| space | meta_width | meta-weights MB | transforms MB | transition ms | Φ start | Φ floor | floor/start |",
             "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['space']} | {r['meta_width']} | {r['meta_weights_mb']:.1f} | {r['transforms_mb']:.1f} | "
              f"{r['transition_ms']:.0f} | {r['phi_start']:.4g} | {r['phi_floor']:.4g} | "
              f"{r['phi_floor'] / r['phi_start']:.3f} |" for r in rows]
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None, prog: str = "apsfast bench meta-width") -> int:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2, help="CPU threads (default 2)")
    parser.add_argument("--reps", type=int, default=2, help="timed transition steps per row (default 2)")
    parser.add_argument("--models", default="mobilenetv2_imagenet,resnet18_imagenet",
                        help="comma-separated spaces (default: the two ImageNet spaces)")
    parser.add_argument("--out", type=Path, help="also write PATH.md and PATH.jsonl")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = [row(name, meta_width, args.reps) for name in args.models.split(",") for meta_width in META_WIDTHS]
    env = environment(f"{prog} --threads {args.threads} --reps {args.reps} --models {args.models}")
    report("The meta width of the transitional spaces", env, rows, markdown(rows), args.out)
    return 0
