"""Latency-table benchmark: does the per-layer table predict the latency of exported networks?

``apsfast bench latency`` builds the latency table of a search space
(:mod:`apsfast.models.latency`, what ``reward.latency_target`` searches with) on a runtime
(``--runtime``: ``torch``, ``torch.compile``, ``onnxruntime``) and device, exports random archs,
measures each exported network's real latency on the same runtime (eval mode, the same batch,
median of the repeats) and reports:

* the Pearson correlation of predicted and measured latency over the archs (goal ≥ 0.9), and
  that of the MACs with the measured latency (what a MACs budget assumes);
* the mean absolute relative error of the prediction;
* the table's stability: every op measured a second time, the largest and the median relative
  difference between the two measurements of an op, and the share within 5%;
* the choice at equal MACs: the uniformly scaled network (``--ratio`` × the standard widths,
  :func:`apsfast.search.baselines.uniform_arch`) against the arch of lowest predicted latency
  among ``--samples`` random archs whose MACs lie within 10% below the uniform one's (what a
  latency budget picks where a MACs budget sees no difference), both measured; or, with
  ``--result``, a search's chosen arch against the uniform network of the nearest MACs.

Spaces: ``demo`` (ResNet-20, widths 4/8/16 per stage, one width per stage, 16×16 inputs, the
``demo`` preset's) and ``resnet20`` (CIFAR ResNet-20, the paper's widths 16/32/64/96 per
block, 32×32). ``--quick``: the demo space, 5 archs, one timing each (a smoke test).
``--table PATH`` writes the (first) space's table as a file that ``reward.latency_table``
reads: a search elsewhere then predicts the latency of this machine and runtime; where PATH
holds a table of an earlier run (same space, batch and runtime), the report first compares the
two runs op by op.
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
from apsfast.models.latency import (REPEATS, THREADS, WARMUP, LatencyTable, measure_network, read_table,
                                    static_network)
from apsfast.models.layer_ops import input_hw
from apsfast.models.runtime import RUNTIMES, check_runtime

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
    from apsfast.search.baselines import uniform_arch
    ratios = [r / 100 for r in range(5, 301)]
    best = min(ratios, key=lambda r: (abs(net.flops(uniform_arch(net, r)) - macs), r))
    return uniform_arch(net, best), best


def stability(first: LatencyTable, second: LatencyTable) -> dict[str, float]:
    """How two measurements of the same table's ops agree: the largest and the median relative
    difference of an op (over the mean of its two), and the share of ops within 5%."""
    diffs = [abs(first.entries[k] - second.entries[k]) * 2 / (first.entries[k] + second.entries[k])
             for k in first.entries]
    return {"max": max(diffs), "median": statistics.median(diffs), "within_5pct": sum(d <= 0.05 for d in diffs)
            / len(diffs)}


def bench_space(space: str, net: models.Supernet, *, batch: int, device: str, archs: int, repeats: int, warmup: int,
                ratio: float, samples: int, result: Optional[dict] = None, runtime: str = "torch",
                threads: Optional[int] = THREADS, table_path: Optional[Path] = None) -> tuple[dict, list[dict]]:
    """The summary row of one space and its per-arch rows (and its table written to
    ``table_path``; a table of the same space, batch and runtime there before, from an earlier
    run, is compared with this one first: how two runs agree)."""
    from apsfast.search.baselines import uniform_arch
    measure = lambda arch: measure_network(static_network(net, arch, device), batch, net.in_channels,  # noqa: E731
                                           input_hw(net), device, runtime, threads, repeats, warmup)
    timed = dict(runtime=runtime, threads=threads, repeats=repeats, warmup=warmup, progress=_bar)
    table = LatencyTable.measure(net, batch, device, **timed)
    previous = None
    if table_path is not None:
        if table_path.is_file():
            try:
                previous = read_table(table_path, net, batch, runtime, device)[0]
            except ValueError:  # another space, batch or runtime: nothing to compare with
                previous = None
        table.save(table_path)
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
               "device": device, "runtime": runtime, "runtime_version": table.key["runtime_version"],
               "threads": table.key["threads"], "ops": len(table.entries), "rest_ms": table.rest_ms, "archs": len(rows),
               "repeats": repeats, "pearson": pearson(predicted, measured),
               "pearson_macs": pearson([r["macs"] for r in rows], measured),
               "mare": statistics.fmean(abs(p - m) / m for p, m in zip(predicted, measured)),
               "measured_min_ms": min(measured), "measured_max_ms": max(measured), "late_ops": table.late,
               "stability": stability(table, LatencyTable.measure(net, batch, device, **timed))}
    if previous is not None and set(previous.entries) == set(table.entries):
        summary["previous_run"] = {"table": str(table_path), "measured_on": previous.key["device"],
                                   **stability(previous, table)}
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
        batch: Optional[int] = None, archs: int = 50, repeats: int = REPEATS, warmup: int = WARMUP, ratio: float = 0.5,
        samples: int = 500, result: Optional[Path] = None, runtime: str = "torch", threads: Optional[int] = THREADS,
        table: Optional[Path] = None) -> list[dict]:
    timed = dict(runtime=runtime, threads=threads)
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
                                         repeats=repeats, warmup=warmup, ratio=ratio, samples=samples, result=chosen,
                                         table_path=table, **timed)
        return [summary, *arch_rows]
    batch = batch or 32
    for space in spaces:
        name, options = SPACES[space]
        net = models.build(name, device="meta", **options)
        summary, arch_rows = bench_space(space, net, batch=batch, device=device, archs=archs, repeats=repeats,
                                         warmup=warmup, ratio=ratio, samples=samples,
                                         table_path=table if space == spaces[0] else None, **timed)
        rows += [summary, *arch_rows]
    return rows


def markdown(rows: list[dict]) -> str:
    summaries = [r for r in rows if r["table"] == "summary"]
    out = ["| space | runtime | threads | batch | ops timed | archs | Pearson r (predicted, measured) | "
           "Pearson r (MACs, measured) | mean abs. rel. error | measured ms (min–max) | rest ms | "
           "op re-measured: max / median diff, within 5% |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    out += [f"| {r['space']} | {r['runtime_version']} | {r['threads']} | {r['batch']} | {r['ops']} | {r['archs']} | "
            f"{r['pearson']:.3f} | {r['pearson_macs']:.3f} | {r['mare']:.1%} | "
            f"{r['measured_min_ms']:.3g}–{r['measured_max_ms']:.3g} | {r['rest_ms']:.3g} | "
            f"{r['stability']['max']:.1%} / {r['stability']['median']:.1%}, {r['stability']['within_5pct']:.0%} |"
            for r in summaries]
    runs = [r for r in summaries if "previous_run" in r]
    if runs:
        out += ["", "Against the table an earlier run wrote to the same `--table` file (every op, two runs):", "",
                "| space | max / median diff | within 5% |", "|---|---|---|"]
        out += [f"| {r['space']} | {r['previous_run']['max']:.1%} / {r['previous_run']['median']:.1%} | "
                f"{r['previous_run']['within_5pct']:.0%} |" for r in runs]
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
    parser.add_argument("--runtime", choices=RUNTIMES, default="torch", help="what runs the networks (default: torch, "
                        "eager; onnxruntime: its CPU provider)")
    parser.add_argument("--threads", type=int, default=THREADS, help=f"intra-op threads, pinned (default: {THREADS})")
    parser.add_argument("--repeats", type=int, default=REPEATS,
                        help=f"timing rounds per op and network, median (default: {REPEATS})")
    parser.add_argument("--ratio", type=float, default=0.5,
                        help="the uniform network's ratio of the standard widths for the equal-MACs choice")
    parser.add_argument("--samples", type=int, default=500, help="random archs the equal-MACs choice looks at")
    parser.add_argument("--result", type=Path, help="a search's folder or result.json: compare its chosen arch "
                                                    "with the uniform network of the nearest MACs")
    parser.add_argument("--table", type=Path, help="write the (first) space's latency table to this file, for "
                                                   "reward.latency_table")
    parser.add_argument("--out", type=Path, help="write <out>.md and <out>.jsonl")
    args = parser.parse_args(argv)
    command = " ".join([prog, *(argv if argv is not None else [])])
    if args.device != "cpu":
        torch.device(args.device)  # a readable error for a wrong name
    if args.threads < 1:
        parser.error(f"--threads must be ≥ 1, got {args.threads}")
    try:
        check_runtime(args.runtime)
    except ImportError as error:
        parser.error(str(error))
    rows = run(args.quick, args.spaces, device=args.device, batch=args.batch, archs=args.archs, repeats=args.repeats,
               ratio=args.ratio, samples=args.samples, result=args.result, runtime=args.runtime, threads=args.threads,
               table=args.table)
    report(f"Latency-table benchmark ({args.runtime}, {args.device})", {**environment(command), "device": args.device}, rows,
           markdown(rows), args.out)
    return 0
