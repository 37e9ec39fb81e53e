"""End-to-end benchmark: one search step of apsfast against the plain-PyTorch way and the limit.

``apsfast bench search`` times, for ResNet-20 (CIFAR, 32×32) and MobileNet-v2 (224×224) at
several batch sizes and width multipliers, one step of an APS-T search after warm-up, made of
the steps the search schedule runs (:mod:`apsfast.search.steps`, the searcher's step):

1. the weight step: forward, backward and SGD of the supernet for a sampled arch,
2. one transition step of every layer (eq. 5 at the relative rate),
3. one controller step: sample an arch, score it on a validation batch, REINFORCE.

Providers, interleaved round by round in one process, medians reported:

* ``apsfast``: those steps with the default dispatch (fused backends where they win);
* ``plain``: the same steps with every candidate kernel built by plain PyTorch per layer
  (einsum / two GEMMs: the reference backend forced) and the transition by per-layer autograd
  of Φ (:func:`apsfast.reference.transition_step_autograd`) — what one writes without apsfast;
* ``limit``: the exported static network of the same arch (``nn.Conv2d``, ``nn.BatchNorm2d``)
  doing the same weight step, and nothing else;
* ``limit compiled``: the same under ``torch.compile`` (its own copy and SGD); where
  compilation fails the row records why and the column stays empty.

Also timed alone, the parts of the apsfast step: the weight step (``weight``, against the
limit: what the supernet's forward and backward cost beyond the static network's), the
transition and the controller step; images/s, and the peak memory of each provider's step.
Every provider trains the same arch on the same batch, already on the device. On a GPU,
``torch.backends.cudnn.benchmark`` is on while the benchmark runs. Writes a markdown table, a
JSON-lines file and a PNG plot with ``--out``.
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path
from typing import Callable, Optional, Sequence

from apsfast import _backends
from apsfast.benchmarks.common import environment, median_times, peak_memory, write_results
from apsfast.benchmarks.step import (PROVIDERS, Case, compiled_static_step, cudnn_benchmark, make_search, providers,
                                     step_data, synchronised)
# Target lines under the table: the weight step's ratio to the limit at one batch, per device kind.
WEIGHT_TARGETS = ((64, "CPU", 1.05), (256, "GPU", 1.15))


MODELS = ("resnet20_cifar", "mobilenetv2_imagenet")


def sweep(quick: bool, device: str, models: Sequence[str] = MODELS,
          batches: Optional[Sequence[int]] = None) -> list[Case]:
    """ResNet-20 CIFAR over batch sizes and width multipliers, MobileNet-v2 ImageNet over batch
    sizes (smaller on a CPU, where one step of it takes seconds); only the cases of ``models``.
    ``batches`` replaces both models' batch sizes, at width ×1 only (a shorter run: the
    width-multiplier cases belong to the default sweep); with ``quick``, the tiny cases'."""
    if quick:
        cases = [Case("resnet20_cifar", 16, 4, 0.5), Case("mobilenetv2_imagenet", 32, 4, 0.25)]
        if batches:
            cases = [Case(c.model, c.image_size, b, c.width) for c in cases for b in batches]
        return [c for c in cases if c.model in models]
    gpu = device != "cpu"
    cifar = [Case("resnet20_cifar", 32, b) for b in (batches or ((64, 256, 1024) if gpu else (16, 64, 256)))]
    if not batches:
        cifar += [Case("resnet20_cifar", 32, 256 if gpu else 64, w) for w in (0.5, 2.0)]
    imagenet = [Case("mobilenetv2_imagenet", 224, b) for b in (batches or ((32, 128, 256) if gpu else (8, 32)))]
    return [c for c in cifar + imagenet if c.model in models]


def bench_case(case: Case, device: str, amp: str, channels_last: bool, rounds: int, min_time: float,
               backend: Optional[str] = None, compile_limit: bool = True, memory: bool = True,
               long_rounds: Optional[int] = 3) -> dict:
    """One row: every provider and part timed interleaved (``rounds``, at most ``long_rounds``
    where a step takes seconds); ``limit compiled`` with ``compile_limit`` (its time, or
    ``compile_error`` and no time); with ``memory``, each provider's peak memory."""
    with tempfile.TemporaryDirectory() as out:
        search = make_search(case, device, amp, channels_last, Path(out))
        data = step_data(search)
        steps, parts = providers(search, backend, data)
        compiled, error = (compiled_static_step(search, data) if compile_limit
                           else (None, "not timed (--no-compile, or --quick without --compile)"))
        timed = {**steps, **parts, **({"limit compiled": compiled} if compiled else {})}
        fns = {name: synchronised(fn, search.session.device) for name, fn in timed.items()}
        t = median_times(fns, rounds, min_time, long_rounds)
        peaks = {name: peak_memory(steps[name], search.session.device) for name in PROVIDERS} if memory else {}
        macs = search.net.flops(data.arch)
    row = {"case": case.name, "model": case.model, "image_size": case.image_size, "batch": case.batch,
           "width": case.width, "macs": macs, **{f"t_{k}": v for k, v in t.items()},
           **{f"mem_{k}": v for k, v in peaks.items()},
           "apsfast/limit": t["apsfast"] / t["limit"], "weight/limit": t["weight"] / t["limit"],
           "plain/apsfast": t["plain"] / t["apsfast"]}
    if compiled:
        row["apsfast/limit compiled"] = t["apsfast"] / t["limit compiled"]
    else:
        row["compile_error"] = error
    row.update({f"img/s {k}": case.batch / t[k] for k in PROVIDERS})
    return row


def run(quick: bool = False, device: str = "cpu", amp: str = "none", channels_last: bool = False,
        rounds: Optional[int] = None, min_time: Optional[float] = None, models: Sequence[str] = MODELS,
        backend: Optional[str] = None, progress: Callable[[str], None] = print,
        on_row: Callable[[list[dict]], None] = lambda rows: None, batches: Optional[Sequence[int]] = None,
        compile_limit: Optional[bool] = None, memory: Optional[bool] = None) -> list[dict]:
    """Every case of the sweep (``batches``: see :func:`sweep`); ``on_row`` sees the rows so far
    after each case (a long run interrupted keeps what it measured). ``compile_limit`` times
    ``limit compiled``, ``memory`` measures peak memory; both by default but not with ``quick``,
    where compiling, or on a CPU the profiler that measures memory, would take most of the time."""
    # Rounds asked for are timed whatever a step takes; by default steps of seconds get three.
    long_rounds = None if rounds else 3
    rounds = rounds or (1 if quick else 5)
    min_time = min_time if min_time is not None else (0.0 if quick else 0.2)
    compile_limit = (not quick) if compile_limit is None else compile_limit
    memory = (not quick) if memory is None else memory
    rows = []
    with cudnn_benchmark(device):
        for case in sweep(quick, device, models, batches):
            progress(f"search step {case.name}")
            rows.append(bench_case(case, device, amp, channels_last, rounds, min_time, backend, compile_limit,
                                   memory, long_rounds))
            on_row(rows)
    return rows


def _ms(seconds: Optional[float]) -> str:
    return "—" if seconds is None else f"{seconds * 1e3:.1f}"


def _ratio(value: Optional[float]) -> str:
    return "—" if value is None else f"{value:.2f}"


def markdown(rows: list[dict]) -> str:
    """The step table, the medians against the targets, and the scaling table."""
    out = ["| case | MACs | limit ms | limit compiled ms | apsfast ms | weight ms | transition ms | controller ms | "
           "plain ms | apsfast/limit | weight/limit | apsfast/limit compiled | plain/apsfast | img/s apsfast | "
           "img/s limit | peak MB apsfast / plain / limit |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        mb = " / ".join(f"{r[f'mem_{k}'] / 2 ** 20:.0f}" if f"mem_{k}" in r else "—" for k in PROVIDERS)
        out.append(f"| {r['case']} | {r['macs'] / 1e6:.1f}M | {_ms(r['t_limit'])} | {_ms(r.get('t_limit compiled'))} | "
                   f"{_ms(r['t_apsfast'])} | {_ms(r['t_weight'])} | {_ms(r['t_transition'])} | "
                   f"{_ms(r['t_controller'])} | {_ms(r['t_plain'])} | {r['apsfast/limit']:.2f} | "
                   f"{r['weight/limit']:.2f} | {_ratio(r.get('apsfast/limit compiled'))} | "
                   f"{r['plain/apsfast']:.2f} | {r['img/s apsfast']:.0f} | {r['img/s limit']:.0f} | {mb} |")
    ratios = [r["apsfast/limit"] for r in rows]
    small = [r["plain/apsfast"] for r in rows if r["batch"] <= 64]
    out.append(f"\napsfast/limit: median {statistics.median(ratios):.2f} over the sweep (target ≤ 1.10)")
    weight = [r["weight/limit"] for r in rows]
    out.append(f"weight/limit: median {statistics.median(weight):.2f} over the sweep")
    for batch, kind, target in WEIGHT_TARGETS:
        at = [f"{r['model']} {r['weight/limit']:.2f}" for r in rows if r["batch"] == batch and r["width"] == 1.0]
        out.append(f"weight/limit at batch {batch}, width ×1: {', '.join(at) or 'not measured'} "
                   f"(target ≤ {target:.2f} on a {kind})")
    compiled = [r["apsfast/limit compiled"] for r in rows if "apsfast/limit compiled" in r]
    if compiled:
        out.append(f"apsfast/limit compiled: median {statistics.median(compiled):.2f} over "
                   f"{len(compiled)} of {len(rows)} cases")
    out += [f"limit compiled, {r['case']}: {r['compile_error']}" for r in rows if r.get("compile_error")]
    if small:
        out.append(f"plain/apsfast at batch ≤ 64: median {statistics.median(small):.2f}, worst {min(small):.2f} "
                   f"(target ≥ 1.5)")
    out += ["", "Scaling (apsfast step ms, and µs per image):", "",
            "| model | batch | width× | step ms | µs / image | MACs |", "|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["model"], r["width"], r["batch"])):
        out.append(f"| {r['model']} | {r['batch']} | {r['width']:g} | {_ms(r['t_apsfast'])} | "
                   f"{r['t_apsfast'] / r['batch'] * 1e6:.0f} | {r['macs'] / 1e6:.1f}M |")
    return "\n".join(out)


def plot(rows: list[dict], path: Path, title: str) -> None:
    """Step time per provider against batch size (width ×1), one panel per model."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    models = sorted({r["model"] for r in rows})
    fig, axes = plt.subplots(1, len(models), figsize=(5 * len(models), 3.6), squeeze=False)
    for ax, model in zip(axes[0], models):
        of_model = [r for r in rows if r["model"] == model]
        mine = sorted([r for r in of_model if r["width"] == 1.0] or of_model, key=lambda r: r["batch"])
        for name in (*PROVIDERS, "limit compiled"):
            timed = [r for r in mine if f"t_{name}" in r]
            if timed:
                ax.plot([r["batch"] for r in timed], [r[f"t_{name}"] * 1e3 for r in timed], marker="o", label=name)
        ax.set(xscale="log", yscale="log", xlabel="batch", ylabel="ms per search step", title=model)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.subplots_adjust(left=0.08, right=0.98, bottom=0.15, top=0.85, wspace=0.25)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def batch_list(text: str) -> list[int]:
    """``"16,64"`` → ``[16, 64]`` (positive integers; an argparse type)."""
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers separated by commas, got {text!r}")
    return values


def main(argv: Optional[Sequence[str]] = None, prog: str = "apsfast bench search") -> int:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="tiny cases, one untimed round, no compilation or memory (a smoke test)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    parser.add_argument("--amp", default="none", choices=["none", "bf16", "fp16"], help="autocast dtype")
    parser.add_argument("--channels-last", action="store_true", help="channels_last supernet and inputs")
    parser.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS), help="which search spaces")
    parser.add_argument("--batches", type=batch_list, metavar="B1,B2,...",
                        help="batch sizes of both models' cases, width ×1 only (default: the sweep's, with the "
                             "width-multiplier cases)")
    parser.add_argument("--rounds", type=int, help="timed rounds per case, median (default: 5, 3 where a step takes "
                                                   "seconds; 1 with --quick)")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                        help="time the static network under torch.compile (default: yes, but not with --quick)")
    parser.add_argument("--memory", action=argparse.BooleanOptionalAction, default=None,
                        help="measure each provider's peak memory (default: yes, but not with --quick)")
    parser.add_argument("--backend", choices=_backends.NAMES,
                        help="force one backend for apsfast's ops (default: the dispatch's choice per op)")
    parser.add_argument("--out", type=Path, help="write <out>.md, <out>.jsonl and <out>.png (after every case)")
    args = parser.parse_args(argv)
    command = " ".join([prog, *(argv if argv is not None else [])])
    env = {**environment(command), "device": args.device, "amp": args.amp, "channels_last": args.channels_last,
           "apsfast backend": args.backend or "dispatch"}
    header = (f"# Search-step benchmark ({args.device}, amp {args.amp}"
              f"{', channels_last' if args.channels_last else ''})\n\n"
              + "\n".join(f"- {k}: {v}" for k, v in env.items()) + "\n")

    def save(rows: list[dict]) -> None:
        if args.out:
            write_results(args.out, header, markdown(rows), rows, env)
            plot(rows, args.out.with_suffix(".png"), header.splitlines()[0].lstrip("# "))

    rows = run(args.quick, args.device, args.amp, args.channels_last, rounds=args.rounds, models=args.models,
               backend=args.backend, on_row=save, batches=args.batches, compile_limit=args.compile,
               memory=args.memory)
    print("\n" + header + "\n" + markdown(rows))
    if args.out:
        print(f"\nwrote {args.out.with_suffix('.md')}, .jsonl and .png")
    return 0
