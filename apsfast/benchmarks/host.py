"""Host-cost benchmark: what one APS search step costs beyond the static network's step where
the arithmetic is negligible.

``apsfast bench host`` times ResNet-20's CIFAR APS-T supernet in its transitional state (the
transition running, so every candidate kernel is built densely; built by
:func:`apsfast.benchmarks.step.make_search`) at batch 2 on 8×8 inputs, where a step's time is
the host's: Python, dispatch and the launch of every op, as on a GPU. Providers, interleaved
round by round in one process, medians reported, all on the same device-resident batch and
the same uniformly sampled arch (seed 0):

* ``static``: the exported static network (``export(arch)``) doing the weight step with its
  own SGD;
* ``static compiled``: the same under ``torch.compile`` (the model); where compilation fails,
  the row records why and the column stays empty;
* ``weight``: the supernet's weight step (set the arch, forward, backward, SGD);
* ``weight+transition``: that and APS-T's transition step of every layer (the search's step
  but the controller's);
* ``transition``: the transition step alone;
* ``controller``: the controller's step alone (sample an arch, score it on a validation
  batch of the same size, REINFORCE), and ``search step``: the whole step as the loop takes
  it (the weight step, the transition and the controller's step);
* ``construction``: the weight step's build of the arch's candidate kernels (one grouped call)
  and its backward (the meta-weights' gradient), alone: what the weight step does that the
  static step does not, beside the arch's forward on its kernels;
* ``scoring``: the controller step's forward alone (the supernet scoring the arch on the
  validation batch, its candidate kernels built): the floor of the controller's step; what
  the controller takes beyond it is its policy's (sampling and the REINFORCE update).

Per provider also the ATen ops one call dispatches, its backward's included (a
``TorchDispatchMode`` count: a machine-independent proxy of a GPU's kernel launches), on the
supernet's device and elsewhere (on a GPU run, the host's: the controller's policy lives
there); and, counted alone, ``scoring``: the controller step's forwards of its archs on the
validation batch, the floor of that step.

Rows: width multipliers ×1 (candidates 16/32/64/96) and ×0.25 (4/8/16/24, where the
construction's arithmetic is negligible). Per row also the construction's arithmetic: the
multiply-adds of building the arch's candidate kernels in one weight step (forward, and the
backward's gradient of the meta-weights, the same products transposed: as many again), and
the time they take at the device's float32 GEMM rate (one 1024×1024 ``torch.mm``) — beside the
static network's own forward and backward (3× its forward's MACs) at that rate. What a step
takes beyond its arithmetic is host overhead. At this size the GEMM rate is optimistic (small
products run slower), so the arithmetic columns are lower bounds.
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
from torch import Tensor

from apsfast import ops
from apsfast._order import construct_macs
from apsfast.benchmarks.common import count_ops, environment, median_times, report, write_results
from apsfast.benchmarks.step import (Case, compiled_static_step, cudnn_benchmark, make_search, providers,
                                     scaled_widths, step_data, synchronised)
from apsfast.nn import aps_layers
from apsfast.nn.base import APSLayer
from apsfast.search.steps import count_correct

MODEL, IMAGE_SIZE, BATCH = "resnet20_cifar", 8, 2
WIDTHS = (1.0, 0.25)
PROVIDERS = ("static", "static compiled", "weight", "weight+transition", "transition", "construction", "controller",
             "scoring", "search step")
TARGET = "(weight+transition)/static ≤ 1.3 at width ×1 (host cost)"
# At width ×0.25, where a step is host work: the controller step at about the cost of its forward.
TARGETS_NARROW = ("controller/static ≤ 0.6", "(search step)/static ≤ 1.8", "(weight+transition)/static ≤ 1.6",
                  "controller ops ≤ scoring ops + 60")
COUNTED = ("static", "weight", "weight+transition", "transition", "search step", "controller", "scoring")
GEMM_N = 1024


def gemm_flops(device: torch.device, rounds: int, min_time: float) -> float:
    """The device's float32 GEMM rate, FLOP/s: one ``GEMM_N``² ``torch.mm`` (2·n³ FLOP)."""
    generator = torch.Generator().manual_seed(0)
    a, b = (torch.randn(GEMM_N, GEMM_N, generator=generator).to(device) for _ in range(2))
    seconds = median_times({"mm": synchronised(lambda: torch.mm(a, b), device)}, rounds, min_time)["mm"]
    return 2 * GEMM_N ** 3 / seconds


def build_macs(layer: APSLayer, c_o: int, c_i: int) -> int:
    """Multiply-adds per kernel element of building ``layer``'s ``[c_o, c_i]`` candidate from its
    meta-weight: both mode products in the cheaper order (:func:`apsfast._order.construct_macs`),
    or the one product of the side that has transforms (a fixed side has none)."""
    C_out, C_in = layer.meta_out_width, layer.meta_in_width
    if layer.out_transforms is None and layer.in_transforms is None:
        return 0
    if layer.out_transforms is None:
        return C_out * C_in * c_i
    if layer.in_transforms is None:
        return c_o * C_out * C_in
    return construct_macs(C_out, c_o, C_in, c_i)


def construction_macs(net: torch.nn.Module, arch: Sequence[int]) -> tuple[int, int]:
    """Multiply-adds of building ``arch``'s candidate kernels in one weight step — the forward's
    products and the backward's (the meta-weight's gradient ``P ∂W Qᵀ``: the same two costs,
    the cheaper taken, so as many again) — and how many layers are built. The layers are
    ``net``'s APS layers that ``export(arch)`` has (an unused projection is not built), with
    the arch's widths from ``net.layer_shapes(arch)``; grouped layers are not costed."""
    shapes = {s.name: s for s in net.layer_shapes(arch) if s.kind in ("conv", "linear")}
    paths = {module: name for name, module in net.named_modules()}
    total = layers = 0
    for layer in aps_layers(net):
        shape = shapes.get(paths[layer])
        if shape is None:
            continue
        if shape.groups != 1:
            raise NotImplementedError(f"{paths[layer]}: grouped layers are not costed here")
        kh, kw = shape.kernel_size
        total += 2 * kh * kw * build_macs(layer, shape.out_channels, shape.in_channels)
        layers += 1
    return total, layers


def construction_step(net: torch.nn.Module, arch: Sequence[int]) -> Callable[[], object]:
    """The weight step's build of ``arch``'s candidate kernels and its backward, alone: the arch
    set (other providers set theirs), the layers' operands, one grouped construction, and the
    meta-weights' gradient of it (for a gradient of ones on every kernel)."""
    net.set_arch(arch)
    plan = net.kernel_plan(arch)

    def operands() -> list[tuple[Tensor, Optional[Tensor], Optional[Tensor]]]:
        built = (layer.prebuild_operands(width) for layer, width in plan)
        return [op[1:] for op in built if op is not None]

    metas = [layer.weight for layer, width in plan if layer.prebuild_operands(width) is not None]
    with torch.no_grad():
        grads = [torch.ones_like(k) for k in ops.build_grouped(*map(list, zip(*operands())))]

    def build() -> None:
        net.set_arch(arch)
        kernels = ops.build_grouped(*map(list, zip(*operands())))
        torch.autograd.grad(kernels, metas, grads)
    return build


def bench_width(width: float, device: str, rounds: int, min_time: float, compile_static: bool,
                flops: float) -> dict:
    """One row: the providers timed at one width multiplier, and the arithmetic of the step."""
    with tempfile.TemporaryDirectory() as out:
        search = make_search(Case(MODEL, IMAGE_SIZE, BATCH, width), device, "none", False, Path(out))
        data = step_data(search)
        steps, parts = providers(search, data=data)

        def weight_and_transition() -> None:
            parts["weight"]()
            parts["transition"]()

        scored = [list(data.arch)] * search.config.controller.samples

        def scoring() -> None:
            count_correct(search.net, scored, data.val_x, data.val_y, search.session.precision)

        fns: dict[str, Callable[[], object]] = {"static": steps["limit"], "weight": parts["weight"],
                                                "weight+transition": weight_and_transition,
                                                "transition": parts["transition"], "controller": parts["controller"],
                                                "construction": construction_step(search.net, data.arch),
                                                "scoring": scoring, "search step": steps["apsfast"]}
        compiled, error = (compiled_static_step(search, data) if compile_static
                           else (None, "not timed (--no-compile, or --quick without --compile)"))
        if compiled:
            fns["static compiled"] = compiled
        t = median_times({name: synchronised(fn, search.session.device) for name, fn in fns.items()}, rounds, min_time)
        ops = {name: count_ops(fns[name], search.session.device) for name in COUNTED[:-1]}
        # The arch the controller step (counted last) just scored — the supernet keeps the last one
        # set — as often as it scores one: a forward's ops depend on the arch (a projection or not).
        archs = [list(search.net.arch)] * search.config.controller.samples
        ops["scoring"] = count_ops(lambda: count_correct(search.net, archs, data.val_x, data.val_y,
                                                         search.session.precision), search.session.device)
        macs, layers = construction_macs(search.net, data.arch)
        static_macs = 3 * BATCH * search.net.flops(data.arch)
    row = {"width": width, "candidates": scaled_widths(MODEL, width), "batch": BATCH, "image_size": IMAGE_SIZE,
           "arch": data.arch, **{f"t_{name}": t[name] for name in PROVIDERS if name in t},
           "weight/static": t["weight"] / t["static"],
           "(weight+transition)/static": t["weight+transition"] / t["static"],
           "(search step)/static": t["search step"] / t["static"], "controller/static": t["controller"] / t["static"],
           "scoring/static": t["scoring"] / t["static"],
           "construction/static": t["construction"] / t["static"],
           **{f"ops_{name}": list(count) for name, count in ops.items()},
           "construction_macs": macs, "construction_layers": layers, "t_construction_at_gemm": 2 * macs / flops,
           "static_macs": static_macs, "t_static_at_gemm": 2 * static_macs / flops, "gemm_flops": flops}
    if error:
        row["compile_error"] = error
    return row


def run(quick: bool = False, device: str = "cpu", rounds: Optional[int] = None, min_time: Optional[float] = None,
        compile_static: Optional[bool] = None, progress: Callable[[str], None] = print,
        on_row: Callable[[list[dict]], None] = lambda rows: None) -> list[dict]:
    """Every row (``quick``: width ×0.25 alone, one untimed round, no compilation)."""
    rounds = rounds or (1 if quick else 7)
    min_time = min_time if min_time is not None else (0.0 if quick else 0.1)
    compile_static = (not quick) if compile_static is None else compile_static
    rows: list[dict] = []
    with cudnn_benchmark(device):
        flops = gemm_flops(torch.device(device), rounds, min_time)
        for width in ((0.25,) if quick else WIDTHS):
            progress(f"host cost, width ×{width:g}")
            rows.append(bench_width(width, device, rounds, min_time, compile_static, flops))
            on_row(rows)
    return rows


def _ms(seconds: Optional[float]) -> str:
    return "—" if seconds is None else f"{seconds * 1e3:.2f}"


def markdown(rows: list[dict]) -> str:
    """The table, the target line, the GEMM rate and any compilation failure."""
    out = ["| width× | candidates | static ms | static compiled ms | weight ms | weight+transition ms | transition ms | "
           "construction ms | controller ms | scoring ms | search step ms | weight/static | "
           "(weight+transition)/static | construction/static | controller/static | scoring/static | "
           "(search step)/static | construction MMAC / step | construction ms at GEMM rate | static MMAC / step | "
           "static ms at GEMM rate | weight − static − construction ms |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        beyond = r["t_weight"] - r["t_static"] - r["t_construction"]
        out.append(f"| {r['width']:g} | {'/'.join(map(str, r['candidates']))} | {_ms(r['t_static'])} | "
                   f"{_ms(r.get('t_static compiled'))} | {_ms(r['t_weight'])} | {_ms(r['t_weight+transition'])} | "
                   f"{_ms(r['t_transition'])} | {_ms(r['t_construction'])} | {_ms(r['t_controller'])} | "
                   f"{_ms(r['t_scoring'])} | {_ms(r['t_search step'])} | {r['weight/static']:.2f} | "
                   f"{r['(weight+transition)/static']:.2f} | {r['construction/static']:.2f} | "
                   f"{r['controller/static']:.2f} | {r['scoring/static']:.2f} | {r['(search step)/static']:.2f} | "
                   f"{r['construction_macs'] / 1e6:.2f} | {_ms(r['t_construction_at_gemm'])} | "
                   f"{r['static_macs'] / 1e6:.2f} | {_ms(r['t_static_at_gemm'])} | {_ms(beyond)} |")
    out += ["", "ATen ops dispatched by one call, its backward's included, on the supernet's device + elsewhere "
            "(scoring: the controller step's forwards alone):", "",
            "| width× | " + " | ".join(COUNTED) + " | controller − scoring |",
            "|---|" + "---|" * (len(COUNTED) + 1)]
    for r in rows:
        counts = [r[f"ops_{name}"] for name in COUNTED]
        beyond = sum(r["ops_controller"]) - sum(r["ops_scoring"])
        out.append(f"| {r['width']:g} | " + " | ".join(f"{on} + {off}" for on, off in counts) + f" | {beyond} |")
    at_one = [r for r in rows if r["width"] == 1.0]
    measured = f"{at_one[0]['(weight+transition)/static']:.2f}" if at_one else "not measured"
    out.append(f"\n(weight+transition)/static at width ×1: {measured} — target: {TARGET}")
    for r in (r for r in rows if r["width"] == 0.25):
        beyond = sum(r["ops_controller"]) - sum(r["ops_scoring"])
        out.append(f"width ×0.25: controller/static {r['controller/static']:.2f} (its scoring forward alone "
                   f"{r['scoring/static']:.2f}), (search step)/static "
                   f"{r['(search step)/static']:.2f}, (weight+transition)/static {r['(weight+transition)/static']:.2f}, "
                   f"controller ops − scoring ops {beyond} — targets: {'; '.join(TARGETS_NARROW)}")
    if rows:
        out.append(f"float32 GEMM rate: {rows[0]['gemm_flops'] / 1e9:.1f} GFLOP/s (one {GEMM_N}×{GEMM_N} torch.mm); "
                   f"the arithmetic columns are 2·MACs at that rate (construction ms: the build and its "
                   f"backward timed alone). Batch {BATCH}, {IMAGE_SIZE}×{IMAGE_SIZE} inputs.")
    out += [f"static compiled, width ×{r['width']:g}: {r['compile_error']}" for r in rows if r.get("compile_error")]
    return "\n".join(out)


def main(argv: Optional[Sequence[str]] = None, prog: str = "apsfast bench host") -> int:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="width ×0.25 alone, one untimed round, no compilation "
                                                            "(a smoke test)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    parser.add_argument("--rounds", type=int, help="timed rounds, median (default: 7; 1 with --quick)")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                        help="time the static network under torch.compile (default: yes, but not with --quick)")
    parser.add_argument("--threads", type=int, default=1,
                        help="intra-op threads on a CPU (default: 1; at batch 2 on 8×8 images a second thread "
                             "only adds synchronisation)")
    parser.add_argument("--out", type=Path, help="write <out>.md and <out>.jsonl (after every row)")
    args = parser.parse_args(argv)
    command = " ".join([prog, *(argv if argv is not None else [])])
    torch.device(args.device)  # a readable error for a wrong name
    threads = torch.get_num_threads()
    if torch.device(args.device).type == "cpu":
        torch.set_num_threads(args.threads)
    try:
        title = f"Host-cost benchmark ({args.device})"
        env = {**environment(command), "device": args.device}
        header = f"# {title}\n\n" + "\n".join(f"- {k}: {v}" for k, v in env.items()) + "\n"

        def save(rows: list[dict]) -> None:
            if args.out:
                write_results(args.out, header, markdown(rows), rows, env)

        rows = run(args.quick, args.device, args.rounds, compile_static=args.compile, on_row=save)
        report(title, env, rows, markdown(rows), args.out)
    finally:
        torch.set_num_threads(threads)
    return 0
