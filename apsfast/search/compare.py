"""Compare searchers: for each ``controller.kind`` and ``sharing.strategy``, at a MACs target
of half the standard arch's and without one, over several seeds: the chosen arch's MACs, its
test accuracy after the retrain (mean ± std), the search's wall time per search epoch and its
peak memory (peak resident set of the process on a CPU, peak allocated memory on a GPU).

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
    parser.add_argument("--out", required=True, help="folder for the runs and the table")
    parser.add_argument("-s", "--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="a setting for every run (repeatable)")
    parser.add_argument("--workers", type=int, default=1, help="runs at a time (default 1: timings undisturbed)")
    args = parser.parse_args(argv)
    args.kinds, args.strategies = args.kinds.split(","), args.strategies.split(",")
    args.seeds = [int(s) for s in args.seeds.split(",")]
    args.targets = args.targets.split(",")
    bad = [t for t in args.targets if t not in TARGETS]
    if bad or args.workers < 1:
        parser.error(f"--targets must name {' or '.join(TARGETS)} (got {bad}) and --workers be ≥ 1")
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


def run_one(job: dict[str, Any]) -> dict[str, Any]:
    """One search and its retrain (in a fresh process, on ``job["threads"]`` intra-op threads
    where given); what the table needs of it."""
    import torch

    from apsfast.search import Search, load_config, retrain
    from apsfast.search.metrics import read_metrics

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
    summary = retrain(out, resume=(out / "retrain" / "checkpoint.pt").exists(), log=quiet)
    return {**{k: job[k] for k in ("kind", "strategy", "target", "seed")}, "flops_target": result["flops_target"],
            "chosen_flops": result["chosen"]["flops"], "chosen_widths": result["chosen"]["widths"],
            "chosen_rank": result["chosen"]["rank"],
            "test_acc": summary["test_acc"], "search_seconds": search_seconds,
            "seconds_per_search_epoch": statistics.mean(r["seconds"] for r in epochs) if epochs else None,
            "peak_memory_mib": peak / 2 ** 20, "memory": "gpu allocated" if cuda else "process resident set",
            "entropy_fraction": result["policy"]["entropy_fraction"], "overrides": job["overrides"],
            "digest": config.digest()}


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def summarise(runs: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (kind, strategy, target): means and standard deviations over the seeds."""
    rows = []
    keys = sorted({(r["target"], r["strategy"], r["kind"]) for r in runs}, key=lambda k: (TARGETS.index(k[0]), k[1]))
    order = {k: i for i, k in enumerate(dict.fromkeys(r["kind"] for r in runs))}
    for target, strategy, kind in sorted(keys, key=lambda k: (TARGETS.index(k[0]), k[1], order[k[2]])):
        group = [r for r in runs if (r["target"], r["strategy"], r["kind"]) == (target, strategy, kind)]
        row = {"kind": kind, "strategy": strategy, "target": target, "flops_target": group[0]["flops_target"],
               "seeds": [r["seed"] for r in group]}
        for key in ("chosen_flops", "test_acc", "seconds_per_search_epoch", "peak_memory_mib"):
            row[key], row[f"{key}_std"] = _mean_std([r[key] for r in group])
        rows.append(row)
    return rows


def markdown(rows: Sequence[dict[str, Any]], header: Sequence[str]) -> str:
    """The table, under ``header`` lines."""
    lines = [*header, "", "| target | strategy | searcher | chosen MACs | test acc | search s/epoch | peak MiB |",
             "|---|---|---|---:|---:|---:|---:|"]
    for r in rows:
        target = "none" if r["flops_target"] is None else f"{r['flops_target'] / 1e6:.2f}M"
        lines.append(f"| {target} | {r['strategy']} | {r['kind']} | {r['chosen_flops'] / 1e6:.2f}M ± "
                     f"{r['chosen_flops_std'] / 1e6:.2f} | {r['test_acc']:.2%} ± {r['test_acc_std']:.2%} | "
                     f"{r['seconds_per_search_epoch']:.1f} ± {r['seconds_per_search_epoch_std']:.1f} | "
                     f"{r['peak_memory_mib']:.0f} |")
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
    import torch

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
                                               f"run.seed={seed}", flops, "run.progress=false"]})
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
            runs.append(run.result())
            lines.write(json.dumps(runs[-1]) + "\n")  # each run as it ends: a cut comparison keeps them
            lines.flush()
    order = {(j["kind"], j["strategy"], j["target"], j["seed"]): i for i, j in enumerate(jobs)}
    runs.sort(key=lambda r: order[(r["kind"], r["strategy"], r["target"], r["seed"])])
    rows = summarise(runs)
    (out / "compare.json").write_text(json.dumps(rows, indent=2))
    header = [f"# Searchers compared on `{args.preset}`", "",
              f"{datetime.date.today().isoformat()}, {platform.machine()} {platform.processor() or ''}".rstrip() + ", "
              f"{threads} thread(s) per run, {args.workers} run(s) at a time; "
              f"settings: {' '.join(args.overrides) or 'the preset'}; seeds {args.seeds}; mean ± std over seeds."]
    (out / "compare.md").write_text(markdown(rows, header))
    print(markdown(rows, header))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
