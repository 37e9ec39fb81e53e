"""Where a supernet's weight step goes on a CPU core: the construction of each layer shape, and
the step split into its parts.

``apsfast bench weight-parts [--widths 1,0.25] [--steps N] [--out PATH]``

* construction: ``apsfast.construct`` forward and its meta-weight gradient (a construction
  with the transposed transforms) for the layer shapes of ResNet-20's APS-T space at the
  preset's widths: meta width 208 (the sum of 16/32/64/96), 3×3, candidate pairs
  (c_o, c_i) as an arch meets them; µs, median of 40 calls, the two interleaved.
* the weight step of ``apsfast bench host``'s case (ResNet-20 APS-T supernet in its
  transitional state, batch 2, 8×8, one thread), split: ``set_arch``, the forward with the
  loss (the grouped construction included), the backward, the SGD step; ms, median of N
  steps after 5.

Run it under each checkout (``PYTHONPATH`` set to it) to compare them; glibc's allocator
settings change the backward (``GLIBC_TUNABLES``: see docs/performance.md, host cost).
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from apsfast.benchmarks.common import environment, median_times, report
from apsfast.benchmarks.step import Case, make_search, step_data

META, KERNEL = 208, (3, 3)
PAIRS = ((16, 16), (96, 96), (32, 96), (96, 32), (16, 64), (64, 16), (64, 64), (32, 32))


def construction_rows() -> list[str]:
    from apsfast._backends.cpu import construct  # the C++ library's op, loaded by its backend
    generator = torch.Generator().manual_seed(0)
    rows, total = [], [0.0, 0.0]
    for c_o, c_i in PAIRS:
        weight = torch.randn(META, META, *KERNEL, generator=generator)
        P, Q = (torch.randn(META, c, generator=generator) for c in (c_o, c_i))
        grad = torch.randn(c_o, c_i, *KERNEL, generator=generator)
        t = median_times({"forward": lambda: construct(weight, P, Q),
                          "backward": lambda: construct(grad, P.t(), Q.t())}, rounds=40, min_time=0.0)
        forward, backward = t["forward"] * 1e6, t["backward"] * 1e6
        total[0] += forward
        total[1] += backward
        rows.append(f"| {c_o} → {c_i} | {forward:.0f} | {backward:.0f} |")
    rows.append(f"| all eight | {total[0]:.0f} | {total[1]:.0f} |")
    return rows


def step_row(width: float, steps: int) -> str:
    with tempfile.TemporaryDirectory() as out:
        search = make_search(Case("resnet20_cifar", 8, 2, width), "cpu", "none", False, Path(out))
        data = step_data(search)
        net, optimizer = search.net, search.optimizer
        net.train()
        parts: dict[str, list[float]] = {"set_arch": [], "forward": [], "backward": [], "SGD": []}
        for step in range(steps + 5):
            t0 = time.perf_counter()
            net.set_arch(data.arch)
            t1 = time.perf_counter()
            loss = F.cross_entropy(net(data.x).float(), data.y)
            t2 = time.perf_counter()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            t3 = time.perf_counter()
            optimizer.step()
            t4 = time.perf_counter()
            if step >= 5:
                for times, seconds in zip(parts.values(), (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
                    times.append(seconds)
    cells = [statistics.median(times) * 1e3 for times in parts.values()]
    return f"| ×{width:g} | " + " | ".join(f"{c:.2f}" for c in cells) + f" | {sum(cells):.2f} |"


def main(argv: Optional[Sequence[str]] = None, prog: str = "apsfast bench weight-parts") -> int:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    parser.add_argument("--widths", default="1,0.25", help="width multipliers of the step rows")
    parser.add_argument("--steps", type=int, default=25, help="timed steps per row")
    parser.add_argument("--out", type=Path, help="also write PATH.md and PATH.jsonl")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    lines = ["| c_o → c_i (meta 208, 3×3) | forward µs | meta-weight gradient µs |", "|---|---|---|",
             *construction_rows(), "",
             "| widths | set_arch ms | forward ms | backward ms | SGD ms | weight step ms |", "|---|---|---|---|---|---|",
             *(step_row(float(w), args.steps) for w in args.widths.split(","))]
    report("Where a supernet's weight step goes", environment(f"{prog} --widths {args.widths} --steps {args.steps}"),
           [], "\n".join(lines), args.out)
    return 0
