"""Latency-table benchmark: does the per-layer table predict the latency of exported networks?

``apsfast bench latency`` builds the latency table of a search space
(:mod:`apsfast.models.latency`, what ``reward.latency_target`` searches with) on the device,
exports random archs, measures each exported network's real latency (eval mode, the same
batch, median of the repeats) and reports:

* the Pearson correlation of predicted and measured latency over the archs (goal ≥ 0.9), and
  that of the MACs with the measured latency (what a MACs budget assumes);
* the mean absolute relative error of the prediction;
* the choice at equal MACs: the uniformly scaled network (``--ratio`` × the standard widths,
  :func:`apsfast.search.retrain.uniform_arch`) against the arch of lowest predicted latency
  among ``--samples`` random archs whose MACs lie within 10% below the uniform one's (what a
  latency budget picks where a MACs budget sees no difference), both measured; or, with
  ``--result``, a search's chosen arch against the uniform network of the nearest MACs.

Spaces: ``demo`` (ResNet-20, widths 4/8/16 per stage, one width per stage, 16×16 inputs, the
``demo`` preset's) and ``resnet20`` (CIFAR ResNet-20, the paper's widths 16/32/64/96 per
block, 32×32). ``--quick``: the demo space, 5 archs, one timing each (a smoke test).
"""
from __future__ import annotations

import argparse
import math
import statistics
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

from apsfast import models
from apsfast.benchmarks.common import environment, report
from apsfast.models.latency import LatencyTable, measure_network, static_network
from apsfast.models.layer_ops import input_hw

SPACES: dict[str, tuple[str, dict[str, Any]]] = {
    "demo": ("resnet20_cifar", {"widths": [4, 8, 16], "residual": "stage", "input_size": 16}),
    "resnet20": ("resnet20_cifar", {"input_size": 32}),
}
BAND = 0.9  # the equal-MACs band: [BAND · uniform MACs, uniform MACs]


def pearson(xs: Sequence[float], ys: Sequence[float]) -> float:
    """Pearson's correlation (NaN when either side is constant)."""
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    sxy = sum((x - mx) * (y - my) for x, y in zip(xs, ys))
    sxx, syy = sum((x - mx) ** 2 for x in xs), sum((y - my) ** 2 for y in ys)
    return sxy / math.sqrt(sxx * syy) if sxx > 0 and syy > 0 else math.nan


def _bar(total: int, desc: str):
    from tqdm.auto import tqdm
    return tqdm(total=total, desc=desc, leave=False)


def uniform_of_macs(net: models.Supernet, macs: float) -> tuple[list[int], float]:
    """The uniformly scaled arch (and its ratio) whose MACs are nearest ``macs``."""
    from apsfast.search.retrain import uniform_arch
    ratios = [r / 100 for r in range(5, 301)]
    best = min(ratios, key=lambda r: (abs(net.flops(uniform_arch(net, r)) - macs), r))
    return uniform_arch(net, best), best


def bench_space(space: str, net: models.Supernet, *, batch: int, device: str, archs: int, repeats: int, warmup: int,
                ratio: float, samples: int, result: Optional[dict] = None) -> tuple[dict, list[dict]]:
    """The summary row of one space and its per-arch rows."""
    from apsfast.search.retrain import uniform_arch
    measure = lambda arch: measure_network(static_network(net, arch, device), batch, net.in_channels,  # noqa: E731
                                           input_hw(net), device, repeats, warmup)
    table = LatencyTable.measure(net, batch, device, repeats=repeats, warmup=warmup, progress=_bar)
    generator = torch.Generator().manual_seed(0)
    chosen_archs: list[list[int]] = []
    while len(chosen_archs) < archs:
        arch = net.sample_uniform(generator)
        if arch not in chosen_archs:
            chosen_archs.append(arch)
    rows = []
    bar = _bar(len(chosen_archs), f"{space}: measuring {len(chosen_archs)} exported networks")
    for arch in chosen_archs:
        rows.append({"table": "archs", "space": space, "arch": arch, "macs": net.flops(arch),
                     "predicted_ms": table.predict(arch), "measured_ms": measure(arch)})
        bar.update(1)
    bar.close()
    predicted, measured = [r["predicted_ms"] for r in rows], [r["measured_ms"] for r in rows]
    summary = {"table": "summary", "space": space, "model": net.name, "options": net.options, "batch": batch,
               "device": device, "ops": len(table.entries), "rest_ms": table.rest_ms, "archs": len(rows),
               "repeats": repeats, "pearson": pearson(predicted, measured),
               "pearson_macs": pearson([r["macs"] for r in rows], measured),
               "mare": statistics.fmean(abs(p - m) / m for p, m in zip(predicted, measured)),
               "measured_min_ms": min(measured), "measured_max_ms": max(measured), "late_ops": table.late}
    # The choice at equal MACs.
    if result is not None:
        pick = net.check_arch(result["chosen"]["arch"])
        uniform, used = uniform_of_macs(net, net.flops(pick))
        what = (f"the search's chosen arch (result {result['source']}) against the uniform network ×{used:g} of the "
                f"nearest MACs")
    else:
        uniform, used = uniform_arch(net, ratio), ratio
        budget = net.flops(uniform)
        pool = [net.sample_uniform(generator) for _ in range(samples)]
        band = [a for a in pool if BAND * budget <= net.flops(a) <= budget] or \
            [a for a in pool if net.flops(a) <= budget] or [uniform]
        pick = min(band, key=table.predict)
        what = (f"the arch of lowest predicted latency among the {len(band)} of {samples} random archs with "
                f"{BAND:.0%}–100% of the uniform network's MACs, against the uniform network ×{used:g}")
    pick_ms, uniform_ms = measure(pick), measure(uniform)
    summary["choice"] = {"what": what, "arch": pick, "macs": net.flops(pick), "predicted_ms": table.predict(pick),
                         "measured_ms": pick_ms, "uniform_arch": uniform, "uniform_ratio": used,
                         "uniform_macs": net.flops(uniform), "uniform_predicted_ms": table.predict(uniform),
                         "uniform_measured_ms": uniform_ms, "speedup": uniform_ms / pick_ms}
    return summary, rows


def run(quick: bool = False, spaces: Sequence[str] = ("demo", "resnet20"), *, device: str = "cpu",
        batch: Optional[int] = None,
        archs: int = 50, repeats: int = 7, warmup: int = 3, ratio: float = 0.5, samples: int = 500,
        result: Optional[Path] = None) -> list[dict]:
    if quick:
        spaces, archs, repeats, samples = ["demo"], 5, 1, 50  # warm-up stays: first calls are slow
    rows: list[dict] = []
    chosen = None
    if result is not None:
        from apsfast.search.result import read_result
        chosen, path = read_result(result)
        chosen["source"] = str(path)
        batch = batch or (chosen.get("latency") or {}).get("batch") or 32
        net = models.build(chosen["model"], device="meta", **chosen["options"])
        summary, arch_rows = bench_space(f"result:{chosen['model']}", net, batch=batch, device=device, archs=archs,
                                         repeats=repeats, warmup=warmup, ratio=ratio, samples=samples, result=chosen)
        return [summary, *arch_rows]
    batch = batch or 32
    for space in spaces:
        name, options = SPACES[space]
        net = models.build(name, device="meta", **options)
        summary, arch_rows = bench_space(space, net, batch=batch, device=device, archs=archs, repeats=repeats,
                                         warmup=warmup, ratio=ratio, samples=samples)
        rows += [summary, *arch_rows]
    return rows


def markdown(rows: list[dict]) -> str:
    summaries = [r for r in rows if r["table"] == "summary"]
    out = ["| space | batch | ops timed | archs | Pearson r (predicted, measured) | Pearson r (MACs, measured) | "
           "mean abs. rel. error | measured ms (min–max) | rest ms |", "|---|---|---|---|---|---|---|---|---|"]
    out += [f"| {r['space']} | {r['batch']} | {r['ops']} | {r['archs']} | {r['pearson']:.3f} | "
            f"{r['pearson_macs']:.3f} | {r['mare']:.1%} | {r['measured_min_ms']:.3g}–{r['measured_max_ms']:.3g} | "
            f"{r['rest_ms']:.3g} |" for r in summaries]
    out += ["", "Choice at equal MACs (measured latency of both):", "",
            "| space | compared | arch MACs | arch ms (pred. / meas.) | uniform MACs | uniform ms (pred. / meas.) | "
            "uniform / arch |", "|---|---|---|---|---|---|---|"]
    for r in summaries:
        c = r["choice"]
        out.append(f"| {r['space']} | {c['what']} | {c['macs'] / 1e6:.3g}M | {c['predicted_ms']:.3g} / "
                   f"{c['measured_ms']:.3g} | {c['uniform_macs'] / 1e6:.3g}M | {c['uniform_predicted_ms']:.3g} / "
                   f"{c['uniform_measured_ms']:.3g} | {c['speedup']:.2f}× |")
    return "\n".join(out)


def main(argv: Optional[Sequence[str]] = None, prog: str = "apsfast bench latency") -> int:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="the demo space, 5 archs, one timing each (a smoke test)")
    parser.add_argument("--spaces", nargs="+", choices=sorted(SPACES), default=["demo", "resnet20"],
                        help="which search spaces (default: both)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    parser.add_argument("--batch", type=int, help="images per timed forward (default: 32; with --result a latency "
                                                 "search's reward.latency_batch)")
    parser.add_argument("--archs", type=int, default=50, help="random archs measured per space (default: 50)")
    parser.add_argument("--repeats", type=int, default=7, help="timings per op and network, median (default: 7)")
    parser.add_argument("--ratio", type=float, default=0.5,
                        help="the uniform network's ratio of the standard widths for the equal-MACs choice")
    parser.add_argument("--samples", type=int, default=500, help="random archs the equal-MACs choice looks at")
    parser.add_argument("--result", type=Path, help="a search's folder or result.json: compare its chosen arch "
                                                    "with the uniform network of the nearest MACs")
    parser.add_argument("--out", type=Path, help="write <out>.md and <out>.jsonl")
    args = parser.parse_args(argv)
    command = " ".join([prog, *(argv if argv is not None else [])])
    if args.device != "cpu":
        torch.device(args.device)  # a readable error for a wrong name
    rows = run(args.quick, args.spaces, device=args.device, batch=args.batch, archs=args.archs, repeats=args.repeats,
               ratio=args.ratio, samples=args.samples, result=args.result)
    report(f"Latency-table benchmark ({args.device})", {**environment(command), "device": args.device}, rows,
           markdown(rows), args.out)
    return 0
