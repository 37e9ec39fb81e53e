"""Compare searchers: for each ``controller.kind`` and ``sharing.strategy``, at a MACs target
of half the standard arch's and without one, over several seeds: the chosen arch's MACs, its
test accuracy after the retrain (mean ± std), the search's wall time per search epoch and its
peak memory (peak resident set of the process on a CPU, peak allocated memory on a GPU).
With ``--selects likely,closest`` each search's beam is also chosen from by each rule of
``result.select`` (one search, a retrain per distinct arch): a row per rule, with the chosen
arch's rank and probability beside the policy's top arch (TAS and ISTA export their argmax: one
row, ``argmax``).

Each (kind, strategy, target, seed) runs its search and retrain in a fresh process, so peak
memory is its own. Writes ``compare.md`` (the table), ``compare.jsonl`` (one line per run, as
each ends, with the chosen arch's rank in its searcher's beam: 0 for TAS's and ISTA's argmax)
and ``compare.json`` (the table's rows) into ``--out``. Run again with the same
arguments, a cut comparison goes on: runs already in ``compare.jsonl`` with the same resolved
settings (their digest: a changed preset counts) are kept, a run cut midway resumes from its
checkpoint.

    main(["--preset", "demo", "--kinds", "reinforce,tas,ista", "--strategies", "transitional",
          "--seeds", "0,1,2", "--out", "runs/compare", "-s", "train.epochs=8"])
"""
from __future__ import annotations

import argparse
import concurrent.futures
import datetime
import json
import multiprocessing
import platform
import resource
import statistics
import time
from pathlib import Path
from typing import Any, Optional, Sequence

TARGETS = ("half", "none")


def parse_args(argv: Optional[Sequence[str]], prog: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=prog, description="compare searchers over seeds: chosen MACs, retrained "
                                     "test accuracy, search time per epoch, peak memory")
    parser.add_argument("--preset", default="demo", help="the settings every run starts from (default: demo)")
    parser.add_argument("--kinds", default="reinforce,tas,ista", help="controller.kind values, comma-separated")
    parser.add_argument("--strategies", default="transitional", help="sharing.strategy values, comma-separated")
    parser.add_argument("--seeds", default="0,1,2", help="run.seed values, comma-separated")
    parser.add_argument("--targets", default="half,none", help="MACs targets: half (of the standard arch), none")
    parser.add_argument("--selects", default=None, help="result.select rules to choose and retrain by, comma-"
                        "separated (default: the settings' own); one search serves them all")
    parser.add_argument("--out", required=True, help="folder for the runs and the table")
    parser.add_argument("-s", "--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="a setting for every run (repeatable)")
    parser.add_argument("--workers", type=int, default=1, help="runs at a time (default 1: timings undisturbed)")
    args = parser.parse_args(argv)
    args.kinds, args.strategies = args.kinds.split(","), args.strategies.split(",")
    args.seeds = [int(s) for s in args.seeds.split(",")]
    args.targets = args.targets.split(",")
    args.selects = args.selects.split(",") if args.selects else []
    bad = [t for t in args.targets if t not in TARGETS]
    if bad or args.workers < 1:
        parser.error(f"--targets must name {' or '.join(TARGETS)} (got {bad}) and --workers be ≥ 1")
    from apsfast.search.config import SELECTS
    if any(rule not in SELECTS for rule in args.selects):
        parser.error(f"--selects must name rules of {', '.join(SELECTS)}, got {args.selects}")
    return args


def half_standard_macs(preset: str, overrides: Sequence[str]) -> float:
    """Half the MACs of the standard arch of the preset's space, at the data's image size."""
    from apsfast.search import assemble
    from apsfast.search.settings import load_config

    config = load_config(preset, overrides=list(overrides))
    plan = assemble.check(config, search=False)
    net = assemble.build_supernet(config, plan.options, "meta")
    return net.flops(net.standard_arch()) / 2


def threads_per_run(workers: int) -> int:
    """Intra-op threads for each of ``workers`` runs at a time: this process's share of its
    threads (the cores, or ``OMP_NUM_THREADS``). More threads than cores in all make waiting
    OpenMP threads spin against each other: two 2-thread runs on 2 cores took 3 to 75 s for a
    demo warm-up epoch, against 1.7 to 2.0 s with one thread each."""
    import torch
    return max(1, torch.get_num_threads() // workers)


def choices(result: dict[str, Any], selects: Sequence[str], exports: str) -> dict[str, int]:
    """``{rule: index into result["candidates"]}``: what each ``result.select`` rule of
    ``selects`` picks from the search's beam under its target (``{"argmax": 0}`` for a searcher
    that ``exports`` its argmax; no ``selects``: the result's own choice, named by its rule)."""
    from apsfast.search.result import select_arch

    if exports == "argmax":
        return {"argmax": 0}
    if not selects:
        return {result["config"]["result"]["select"]: result["chosen"]["rank"]}
    latency = result.get("latency_target") is not None
    target = result["latency_target"] if latency else result["flops_target"]
    key, unit = ("latency_ms", "ms") if latency else ("flops", "MACs")
    return {rule: select_arch(result["candidates"], target, key=key, unit=unit, rule=rule)[0] for rule in selects}


def run_one(job: dict[str, Any]) -> list[dict[str, Any]]:
    """One search and the retrain of each arch its rules choose (in a fresh process, on
    ``job["threads"]`` intra-op threads where given); what the table needs of it, a row per rule
    (:func:`choices`)."""
    import torch

    from apsfast.search import Search, load_config, retrain
    from apsfast.search.metrics import read_metrics
    from apsfast.search.searchers import SEARCHERS

    if job.get("threads"):
        torch.set_num_threads(job["threads"])

    quiet = (lambda text: None)
    config = load_config(job["preset"], overrides=job["overrides"])
    out = Path(job["out"])
    cuda = config.run.device != "cpu" and torch.cuda.is_available()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    result = Search(config, out, resume=(out / "checkpoint.pt").exists(), log=quiet).run()
    search_seconds = time.perf_counter() - started
    epochs = [r for r in read_metrics(out / "metrics.jsonl", kind="epoch") if r["phase"] == "search"]
    peak = torch.cuda.max_memory_allocated() if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    top = result["candidates"][0]
    rows, retrained = [], {}
    for rule, index in choices(result, job.get("selects", ()), SEARCHERS[config.controller.kind].exports).items():
        chosen = result["candidates"][index]
        if tuple(chosen["arch"]) not in retrained:  # the result's own choice in retrain/, another in retrain-rankN/
            folder = out / ("retrain" if chosen["arch"] == result["chosen"]["arch"] else f"retrain-rank{index}")
            retrained[tuple(chosen["arch"])] = retrain(out, folder, arch=chosen["arch"], log=quiet,
                                                       resume=(folder / "checkpoint.pt").exists())
        rows.append({**{k: job[k] for k in ("kind", "strategy", "target", "seed")}, "select": rule,
                     "flops_target": result["flops_target"], "chosen_flops": chosen["flops"],
                     "chosen_widths": chosen["widths"], "chosen_rank": index,
                     "chosen_probability": chosen["probability"], "top_probability": top["probability"],
                     "top_flops": top["flops"], "test_acc": retrained[tuple(chosen["arch"])]["test_acc"],
                     "search_seconds": search_seconds,
                     "seconds_per_search_epoch": statistics.mean(r["seconds"] for r in epochs) if epochs else None,
                     "peak_memory_mib": peak / 2 ** 20, "memory": "gpu allocated" if cuda else "process resident set",
                     "entropy_fraction": result["policy"]["entropy_fraction"], "overrides": job["overrides"],
                     "digest": config.digest()})
    return rows


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def summarise(runs: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (kind, strategy, target, select rule): means and standard deviations over
    the seeds."""
    rows = []
    what = lambda r: (r["target"], r["strategy"], r["kind"], r.get("select", ""))  # noqa: E731
    order = {k: i for i, k in enumerate(dict.fromkeys(r["kind"] for r in runs))}
    for target, strategy, kind, select in sorted({what(r) for r in runs},
                                                 key=lambda k: (TARGETS.index(k[0]), k[1], order[k[2]], k[3])):
        group = [r for r in runs if what(r) == (target, strategy, kind, select)]
        row = {"kind": kind, "strategy": strategy, "target": target, "select": select,
               "flops_target": group[0]["flops_target"], "seeds": [r["seed"] for r in group]}
        for key in ("chosen_flops", "test_acc", "seconds_per_search_epoch", "peak_memory_mib"):
            row[key], row[f"{key}_std"] = _mean_std([r[key] for r in group])
        rows.append(row)
    return rows


def markdown(rows: Sequence[dict[str, Any]], header: Sequence[str]) -> str:
    """The table, under ``header`` lines."""
    lines = [*header, "", "| target | strategy | searcher | select | chosen MACs | test acc | search s/epoch | "
             "peak MiB |", "|---|---|---|---|---:|---:|---:|---:|"]
    for r in rows:
        target = "none" if r["flops_target"] is None else f"{r['flops_target'] / 1e6:.2f}M"
        lines.append(f"| {target} | {r['strategy']} | {r['kind']} | {r['select'] or '-'} | "
                     f"{r['chosen_flops'] / 1e6:.2f}M ± "
                     f"{r['chosen_flops_std'] / 1e6:.2f} | {r['test_acc']:.2%} ± {r['test_acc_std']:.2%} | "
                     f"{r['seconds_per_search_epoch']:.1f} ± {r['seconds_per_search_epoch_std']:.1f} | "
                     f"{r['peak_memory_mib']:.0f} |")
    return "\n".join(lines) + "\n"


def per_run(runs: Sequence[dict[str, Any]]) -> str:
    """Each run's choice by each rule: MACs, rank and probability beside the policy's top arch,
    retrained test accuracy (where some run was chosen from by more than one rule)."""
    if len({r.get("select") for r in runs}) < 2:
        return ""
    lines = ["", "Per run (rank in the beam, probability; the policy's top arch beside it):", "",
             "| target | searcher | seed | select | chosen MACs | rank | probability | top arch's MACs, probability | "
             "test acc |", "|---|---|---|---|---:|---:|---:|---:|---:|"]
    for r in runs:
        target = "none" if r["flops_target"] is None else f"{r['flops_target'] / 1e6:.2f}M"
        lines.append(f"| {target} | {r['kind']} | {r['seed']} | {r['select']} | {r['chosen_flops'] / 1e6:.2f}M | "
                     f"{r['chosen_rank']} | {r['chosen_probability']:.3g} | {r['top_flops'] / 1e6:.2f}M, "
                     f"{r['top_probability']:.3g} | {r['test_acc']:.2%} |")
    return "\n".join(lines) + "\n"


def finished(path: Path, jobs: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The runs of ``jobs`` that an earlier, cut comparison already wrote to ``path``."""
    if not path.exists():
        return []
    wanted = {j["digest"] for j in jobs}  # the same resolved settings (a preset may have changed)
    runs = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in runs if r.get("digest") in wanted]


def main(argv: Optional[Sequence[str]] = None, prog: str = "apsfast compare") -> int:
    """Run the comparison the arguments describe; returns 0."""
    from apsfast.search.settings import load_config

    args = parse_args(argv, prog)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    half = half_standard_macs(args.preset, args.overrides)
    jobs = []
    for target in args.targets:
        for strategy in args.strategies:
            for kind in args.kinds:
                for seed in args.seeds:
                    flops = f"reward.flops_target={half}" if target == "half" else "reward.flops_target=null"
                    jobs.append({"kind": kind, "strategy": strategy, "target": target, "seed": seed,
                                 "preset": args.preset, "out": str(out / f"{kind}-{strategy}-{target}-{seed}"),
                                 "overrides": [*args.overrides, f"controller.kind={kind}", f"sharing.strategy={strategy}",
                                               f"run.seed={seed}", flops, "run.progress=false"],
                                 "selects": args.selects})
    threads = threads_per_run(args.workers)
    for job in jobs:
        job["digest"] = load_config(args.preset, overrides=job["overrides"]).digest()
        job["threads"] = threads
    runs = finished(out / "compare.jsonl", jobs)
    done = {(r["kind"], r["strategy"], r["target"], r["seed"]) for r in runs}
    todo = [j for j in jobs if (j["kind"], j["strategy"], j["target"], j["seed"]) not in done]
    if runs:
        print(f"{len(runs)} of {len(jobs)} runs already in {out / 'compare.jsonl'}; running the other {len(todo)}")
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(args.workers, mp_context=context, max_tasks_per_child=1) as pool, \
            open(out / "compare.jsonl", "a") as lines:
        for run in concurrent.futures.as_completed([pool.submit(run_one, job) for job in todo]):
            for row in run.result():  # each run as it ends: a cut comparison keeps them
                runs.append(row)
                lines.write(json.dumps(row) + "\n")
            lines.flush()
    order = {(j["kind"], j["strategy"], j["target"], j["seed"]): i for i, j in enumerate(jobs)}
    runs.sort(key=lambda r: (order[(r["kind"], r["strategy"], r["target"], r["seed"])], r.get("select", "")))
    rows = summarise(runs)
    (out / "compare.json").write_text(json.dumps(rows, indent=2))
    header = [f"# Searchers compared on `{args.preset}`", "",
              f"{datetime.date.today().isoformat()}, {platform.machine()} {platform.processor() or ''}".rstrip() + ", "
              f"{threads} thread(s) per run, {args.workers} run(s) at a time; "
              f"settings: {' '.join(args.overrides) or 'the preset'}; seeds {args.seeds}; mean ± std over seeds."]
    text = markdown(rows, header) + per_run(runs)
    (out / "compare.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
