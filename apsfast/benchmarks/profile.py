"""Where one search step's time goes: each part timed alone, and the profiler's top ops.

``apsfast bench profile --device cuda --amp bf16 --channels-last --backend cuda --out DIR``

For a ResNet-20 CIFAR and a MobileNet-v2 ImageNet case of ``apsfast bench search``: the
weight step alone, the controller's sampling alone and its whole step, the transition under
every backend that runs on the device, and the static limit; then ``torch.profiler`` over a
few apsfast steps, the ops sorted by self device time and by self host time. Writes
``DIR/profile.md``.
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import Optional, Sequence

import torch

import apsfast
from apsfast.benchmarks.common import forced_backend, median_times
from apsfast.benchmarks.step import Case, make_search, providers, synchronised
from apsfast.search import strategies

CASES = (Case("resnet20_cifar", 32, 256), Case("mobilenetv2_imagenet", 224, 128))


def profile_case(case: Case, args: argparse.Namespace) -> str:
    with tempfile.TemporaryDirectory() as out:
        search = make_search(case, args.device, args.amp, args.channels_last, Path(out))
        step_fns, parts = providers(search, args.backend)

        def sample_only():
            search.searcher.sample_train_arch()

        fns = {"apsfast step": step_fns["apsfast"], "limit step": step_fns["limit"], "weight step": parts["weight"],
               "controller sample": sample_only, "controller step": parts["controller"]}
        runs_here = {"reference"} | ({"cpu"} if args.device == "cpu" else {"triton", "cuda"})
        for name in (n for n in apsfast.backends() if n in runs_here):

            def transition(name=name):
                with forced_backend(name):
                    strategies.transition(search.net, search.rate.tau)
            fns[f"transition [{name}]"] = transition
        rounds, min_time = (1, 0.0) if args.quick else (5, 0.2)  # quick: a smoke test, untimed in effect
        times = median_times({k: synchronised(f, search.session.device) for k, f in fns.items()}, rounds, min_time)
        lines = [f"## {case.name}", "", "| part | ms |", "|---|---|"]
        lines += [f"| {k} | {v * 1e3:.2f} |" for k, v in times.items()]
        activities = [torch.profiler.ProfilerActivity.CPU]
        if search.session.device.type == "cuda":
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        with torch.profiler.profile(activities=activities) as prof:
            for _ in range(3):
                synchronised(step_fns["apsfast"], search.session.device)()
        table = prof.key_averages()
        device_key = "self_cuda_time_total" if search.session.device.type == "cuda" else "self_cpu_time_total"
        lines += ["", "Top ops by self device time (3 apsfast steps):", "```",
                  table.table(sort_by=device_key, row_limit=18, max_name_column_width=60), "```",
                  "", "Top ops by host time (3 apsfast steps):", "```",
                  table.table(sort_by="cpu_time_total", row_limit=18, max_name_column_width=60), "```", ""]
        return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None, prog: str = "apsfast bench profile") -> int:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--amp", default="none", choices=["none", "bf16", "fp16"])
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--backend", help="force one backend for apsfast's ops")
    parser.add_argument("--quick", action="store_true", help="tiny cases (a smoke test)")
    parser.add_argument("--out", type=Path, required=True, help="folder for profile.md")
    args = parser.parse_args(argv)
    cases = (Case("resnet20_cifar", 16, 4, 0.5),) if args.quick else CASES
    args.out.mkdir(parents=True, exist_ok=True)
    text = []
    for case in cases:
        print(f"profiling {case.name}", flush=True)
        text.append(profile_case(case, args))
        (args.out / "profile.md").write_text("\n".join(text))
    return 0
