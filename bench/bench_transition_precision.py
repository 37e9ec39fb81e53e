"""The transition (paper eq. 5) under each float32 matmul precision: its cost on a large space
and how far Φ's path drifts from the float32 one.

``python bench/bench_transition_precision.py [--steps N] [--tau T] [--reps R] [--out PATH]``

* ms per step: one transition of every layer of the MobileNet-v2 ImageNet supernet
  (transitional sharing, meta widths Σ candidates: 85 sides, nine of them 3360 × 3360),
  ``apsfast.transition_step_all(..., precision=p)`` timed with ``torch.utils.benchmark.Timer``,
  the precisions interleaved, median of R; the same on ResNet-20 (CIFAR).
* drift: N steps on the ResNet-20 supernet at the search's width-free rate τ from one perturbed
  ordinal start (a deep copy each), Φ before every step; the largest
  ``|Φ_p − Φ_highest| / Φ_highest`` over the path.

On a CPU, ``"high"`` is float32 (TF32 exists on CUDA GPUs only) and ``"medium"`` runs the GEMMs
in bf16 with float32 accumulation through oneDNN where the CPU has AVX-512 bf16 / AMX; the CPU
kernel then forms its Grams from three bf16 products (a split of each transform) so that Φ
keeps float32 accuracy (csrc/cpu/transition.cpp).
"""
from __future__ import annotations

import argparse
import copy
import statistics
from pathlib import Path

import torch
from torch.utils.benchmark import Timer

import apsfast
from apsfast import models
from apsfast.benchmarks.common import environment, report
from apsfast.nn import aps_layers

PRECISIONS = ("highest", "high", "medium")


def supernet(name: str, seed: int = 0) -> torch.nn.Module:
    """A transitional supernet whose APS-T layers have left their exact ordinal start."""
    torch.manual_seed(seed)
    net = models.build(name, sharing="transitional", num_classes=10)
    for layer in aps_layers(net):
        layer.begin_transition()
        layer.mark_transformed()
    return net


def pairs_of(net: torch.nn.Module) -> list:
    return [(layer.P, layer.Q) for layer in aps_layers(net) if layer.P is not None or layer.Q is not None]


def step_ms(name: str, reps: int, tau: float = 1e-3) -> dict[str, float]:
    """Median ms of one transition of every layer of ``name``, per precision (interleaved)."""
    pairs = pairs_of(supernet(name))
    times: dict[str, list[float]] = {p: [] for p in PRECISIONS}
    for p in PRECISIONS:  # warm-up: oneDNN builds its bf16 kernels on first use
        apsfast.transition_step_all(pairs, tau, relative=True, precision=p)
    for _ in range(reps):
        for p in PRECISIONS:
            timer = Timer("step(pairs, tau, relative=True, precision=p)", num_threads=torch.get_num_threads(),
                          globals={"step": apsfast.transition_step_all, "pairs": pairs, "tau": tau, "p": p})
            times[p].append(timer.timeit(1).median * 1e3)
    return {p: statistics.median(v) for p, v in times.items()}


def drift(steps: int, tau: float) -> tuple[dict[str, float], list[float]]:
    """Largest relative difference of Φ from the float32 path, per precision, and that path's
    Φ at the start and the end."""
    start = supernet("resnet20_cifar")
    paths = {}
    for p in PRECISIONS:
        pairs = pairs_of(copy.deepcopy(start))
        paths[p] = [float(apsfast.transition_step_all(pairs, tau, relative=True, precision=p)) for _ in range(steps)]
    exact = paths["highest"]
    return ({p: max(abs(a - b) / b for a, b in zip(path, exact)) for p, path in paths.items()},
            [exact[0], exact[-1]])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=1000, help="transition steps of the drift run (default 1000)")
    parser.add_argument("--tau", type=float, default=5e-3, help="width-free rate of the drift run (default 5e-3)")
    parser.add_argument("--reps", type=int, default=3, help="timed steps per precision (default 3)")
    parser.add_argument("--out", type=Path, help="also write PATH.md and PATH.jsonl")
    args = parser.parse_args()
    mbv2 = step_ms("mobilenetv2_imagenet", args.reps)
    r20 = step_ms("resnet20_cifar", max(args.reps, 20))
    worst, (phi0, phi_end) = drift(args.steps, args.tau)
    rows = [{"precision": p, "mobilenetv2_ms": round(mbv2[p], 1), "resnet20_ms": round(r20[p], 2),
             "resnet20_max_rel_phi_diff": worst[p]} for p in PRECISIONS]
    table = "\n".join(
        ["| precision | ms per step, MobileNet-v2 space | ms per step, ResNet-20 | "
         f"max \\|Φ − Φ_fp32\\| / Φ_fp32, ResNet-20, {args.steps} steps at τ = {args.tau:g} |",
         "|---|---|---|---|"]
        + [f"| {r['precision']} | {r['mobilenetv2_ms']:.0f} | {r['resnet20_ms']:.2f} | "
           f"{r['resnet20_max_rel_phi_diff']:.2e} |" for r in rows]
        + ["", f"ResNet-20's Φ (float32 path): {phi0:.6g} at the start, {phi_end:.6g} after {args.steps} steps."])
    env = environment("python bench/bench_transition_precision.py "
                      f"--steps {args.steps} --tau {args.tau:g} --reps {args.reps}")
    env.update(threads=torch.get_num_threads(), cpu_capability=torch.backends.cpu.get_cpu_capability(),
               avx512_bf16=torch.cpu._is_avx512_bf16_supported(), amx=torch.cpu._is_amx_tile_supported())
    report("The transition under each float32 matmul precision (CPU)", env, rows, table, args.out)


if __name__ == "__main__":
    main()
