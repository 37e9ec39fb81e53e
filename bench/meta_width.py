"""The meta width of the transitional spaces (``model.options.meta_width``): memory of the
meta-weights and transforms, the transition's ms per step, Φ at the ordinal start and Φ's
floor (:func:`apsfast.nn.network_sharing_floor`), for the MobileNet-v2 and ResNet-18 ImageNet
supernets.

``python bench/meta_width.py [THREADS [REPS [MODEL,MODEL]]]`` prints one markdown row per
(space, meta width). Memory counts float32 parameters at 1,000 classes.
"""
from __future__ import annotations

import statistics
import sys
import time

import torch

from apsfast import models
from apsfast.nn import aps_layers, network_sharing_floor, network_sharing_level
from apsfast.search import strategies


def main() -> None:
    torch.set_num_threads(int(sys.argv[1]) if len(sys.argv) > 1 else 2)
    reps = int(sys.argv[2]) if len(sys.argv) > 2 else 2
    names = sys.argv[3].split(",") if len(sys.argv) > 3 else ["mobilenetv2_imagenet", "resnet18_imagenet"]
    print("| space | meta_width | meta-weights MB | transforms MB | transition ms | Φ start | Φ floor | floor/start |")
    print("|---|---|---|---|---|---|---|---|")
    for name in names:
        for meta_width in ("sum", 1.6, "widest"):
            layers = aps_layers(models.build(name, meta_width=meta_width, device="meta"))
            weights = sum(l.weight.numel() + (l.bias.numel() if getattr(l, "bias", None) is not None else 0)
                          for l in layers)
            transforms = sum(s.matrix.numel() for l in layers for s in (l.out_transforms, l.in_transforms)
                             if s is not None)
            torch.manual_seed(0)
            net = models.build(name, meta_width=meta_width, num_classes=10)
            start, floor = float(network_sharing_level(net)), network_sharing_floor(net)
            strategies.transition(net, 1e-3)  # leaves the exact start
            times = []
            for _ in range(reps):
                began = time.perf_counter()
                strategies.transition(net, 1e-3)
                times.append(time.perf_counter() - began)
            print(f"| {name} | {meta_width} | {weights * 4 / 1e6:.1f} | {transforms * 4 / 1e6:.1f} | "
                  f"{statistics.median(times) * 1e3:.0f} | {start:.4g} | {floor:.4g} | {floor / start:.3f} |", flush=True)


if __name__ == "__main__":
    main()
