"""The transition (paper eq. 5) under each float32 matmul precision: its cost on a large space
and how far Φ's path drifts from the float32 one, per backend.

``apsfast bench precision [--device cpu|cuda] [--backends B,...] [--steps N] [--tau T]
[--reps R] [--quick] [--out PATH]``

* ms per step: one transition of every layer of the MobileNet-v2 ImageNet supernet
  (transitional sharing, meta widths Σ candidates: 85 sides, nine of them 3360 × 3360),
  ``apsfast.transition_step_all(..., precision=p)`` timed with ``torch.utils.benchmark.Timer``
  (which synchronises a GPU), the providers interleaved, median of R; the same on ResNet-20
  (CIFAR).
* drift: N steps on the ResNet-20 supernet at the search's width-free rate τ from one perturbed
  ordinal start (a deep copy each), Φ before every step; the largest
  ``|Φ_p − Φ_ref| / Φ_ref`` over the path, against the first backend's ``"highest"`` path.

Providers: every backend of ``--backends`` (forced through ``APSFAST_BACKEND``; ``default`` is
what an unforced call dispatches to) under every precision, on the same supernets.

On a CPU, ``"high"`` is float32 (TF32 exists on CUDA GPUs only) and ``"medium"`` runs the GEMMs
in bf16 with float32 accumulation through oneDNN where the CPU has AVX-512 bf16 / AMX; the CPU
kernel then keeps its Grams in float32 (csrc/cpu/transition.cpp). On a GPU the Triton kernels
follow the precision (``tl.dot``: IEEE, 3×TF32, TF32 on tensor cores); the CUDA kernels run
float32 FMA tiles whatever it is: the benchmark shows what each costs and how far Φ moves.
"""
from __future__ import annotations

import argparse
import copy
import statistics
from pathlib import Path
from typing import Optional, Sequence

import torch
from torch.utils.benchmark import Timer

import apsfast
from apsfast import models
from apsfast.benchmarks.common import environment, forced_backend, report
from apsfast.nn import aps_layers
from apsfast.sharing import PRECISIONS

BACKENDS = ("default", "reference", "cpu", "triton", "cuda")


def backend(name: str):
    """``name`` forced for the body; ``default``: none (what an unforced call dispatches to)."""
    return forced_backend(None if name == "default" else name)


def supernet(name: str, device: str, seed: int = 0) -> torch.nn.Module:
    """A transitional supernet whose APS-T layers have left their exact ordinal start."""
    torch.manual_seed(seed)
    net = models.build(name, sharing="transitional", num_classes=10).to(device)
    for layer in aps_layers(net):
        layer.begin_transition()
        layer.mark_transformed()
    return net


def pairs_of(net: torch.nn.Module) -> list:
    return [(layer.P, layer.Q) for layer in aps_layers(net) if layer.P is not None or layer.Q is not None]


def step_ms(name: str, device: str, providers: list[tuple[str, str]], reps: int,
            tau: float = 1e-3) -> dict[tuple[str, str], float]:
    """Median ms of one transition of every layer of ``name``, per (backend, precision),
    interleaved round by round."""
    pairs = pairs_of(supernet(name, device))
    times: dict[tuple[str, str], list[float]] = {k: [] for k in providers}
    for b, p in providers:  # warm-up: oneDNN builds its bf16 kernels, Triton compiles, on first use
        with backend(b):
            apsfast.transition_step_all(pairs, tau, relative=True, precision=p)
    for _ in range(reps):
        for b, p in providers:
            timer = Timer("step(pairs, tau, relative=True, precision=p)", num_threads=torch.get_num_threads(),
                          globals={"step": apsfast.transition_step_all, "pairs": pairs, "tau": tau, "p": p})
            with backend(b):
                times[(b, p)].append(timer.timeit(1).median * 1e3)
    return {k: statistics.median(v) for k, v in times.items()}


def drift(device: str, providers: list[tuple[str, str]], steps: int,
          tau: float) -> tuple[dict[tuple[str, str], float], list[float]]:
    """Largest relative difference of Φ from the first provider's path (the first backend in
    ``"highest"``), per provider, and that path's Φ at the start and the end."""
    start = supernet("resnet20_cifar", device)
    paths = {}
    for b, p in providers:
        pairs = pairs_of(copy.deepcopy(start))
        with backend(b):
            paths[(b, p)] = [float(apsfast.transition_step_all(pairs, tau, relative=True, precision=p))
                             for _ in range(steps)]
    exact = paths[providers[0]]
    return ({k: max(abs(a - b) / b for a, b in zip(path, exact)) for k, path in paths.items()},
            [exact[0], exact[-1]])


def main(argv: Optional[Sequence[str]] = None, prog: str = "apsfast bench precision") -> int:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    parser.add_argument("--backends", default="default",
                        help=f"comma-separated, of {', '.join(BACKENDS)} (default: default, the unforced dispatch)")
    parser.add_argument("--steps", type=int, default=1000, help="transition steps of the drift run (default 1000)")
    parser.add_argument("--tau", type=float, default=5e-3, help="width-free rate of the drift run (default 5e-3)")
    parser.add_argument("--reps", type=int, default=3, help="timed steps per provider (default 3)")
    parser.add_argument("--quick", action="store_true",
                        help="a smoke test: no MobileNet-v2 timing, 20 drift steps, one repetition")
    parser.add_argument("--out", type=Path, help="also write PATH.md and PATH.jsonl")
    args = parser.parse_args(argv)
    device = str(torch.device(args.device))  # a readable error for a wrong name
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    unknown = [b for b in backends if b not in BACKENDS]
    if not backends or unknown:
        parser.error(f"--backends must name some of {', '.join(BACKENDS)}, got {args.backends!r}")
    if args.steps < 1 or args.reps < 1:
        parser.error(f"--steps and --reps must be ≥ 1, got {args.steps} and {args.reps}")
    steps, reps = (20, 1) if args.quick else (args.steps, args.reps)
    providers = [(b, p) for b in backends for p in PRECISIONS]
    mbv2 = {} if args.quick else step_ms("mobilenetv2_imagenet", device, providers, reps)
    r20 = step_ms("resnet20_cifar", device, providers, reps if args.quick else max(reps, 20))
    worst, (phi0, phi_end) = drift(device, providers, steps, args.tau)
    rows = [{"device": device, "backend": b, "precision": p,
             "mobilenetv2_ms": round(mbv2[(b, p)], 1) if mbv2 else None, "resnet20_ms": round(r20[(b, p)], 2),
             "resnet20_max_rel_phi_diff": worst[(b, p)]} for b, p in providers]
    reference = "/".join(providers[0])
    table = "\n".join(
        ["| backend | precision | ms per step, MobileNet-v2 space | ms per step, ResNet-20 | "
         f"max \\|Φ − Φ_ref\\| / Φ_ref, ResNet-20, {steps} steps at τ = {args.tau:g} |",
         "|---|---|---|---|---|"]
        + [f"| {r['backend']} | {r['precision']} | "
           f"{'—' if r['mobilenetv2_ms'] is None else format(r['mobilenetv2_ms'], '.0f')} | {r['resnet20_ms']:.2f} | "
           f"{r['resnet20_max_rel_phi_diff']:.2e} |" for r in rows]
        + ["", f"Φ_ref: the {reference} path; ResNet-20's Φ on it: {phi0:.6g} at the start, "
               f"{phi_end:.6g} after {steps} steps."])
    command = (f"{prog} --device {args.device} --backends {args.backends} "
               f"--steps {args.steps} --tau {args.tau:g} --reps {args.reps}" + (" --quick" if args.quick else ""))
    env = environment(command)
    env.update(threads=torch.get_num_threads())
    if device == "cpu":
        env.update(cpu_capability=torch.backends.cpu.get_cpu_capability(),
                   avx512_bf16=torch.cpu._is_avx512_bf16_supported(), amx=torch.cpu._is_amx_tile_supported())
    report(f"The transition under each float32 matmul precision ({device})", env, rows, table, args.out)
    return 0
