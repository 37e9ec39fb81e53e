"""Kernel microbenchmarks: what each fused path buys, side by side in one run.

``apsfast bench kernels`` prints three markdown tables:

1. **conv**: one APS conv forward + backward (weight and input grads) against ``nn.Conv2d``
   of the same candidate shape (the limit) and against the plain-PyTorch way (two GEMMs by
   autograd, then the conv). Rows: dense transforms (APS-T after its transition started)
   and exact selections (APS-O / warm-up: the slicing path). ``bound`` is the FLOP bound
   ``(3·conv + 2·build) / (3·conv)`` of the dense path.
2. **grouped**: building every candidate kernel of the widest architecture of a supernet
   (``apsfast.models``: ResNet-20 CIFAR, MobileNet-v2) (forward + weight-grad scatter) in one
   grouped call against a per-layer loop of ``apsfast.construct``.
3. **transition**: one transition step of every layer of the same supernets, batched,
   against per-layer autograd of Φ with a per-layer projected update.

Conv shapes and layers come from the search spaces, so they are the layers a search runs.

All providers of a row are timed in the same process, interleaved round by round, and the
median is reported (``torch.utils.benchmark.Timer`` on CPU; CUDA is synchronised by it).
The "apsfast" columns run on the device's compiled backend (``fused_backend``), forced for
the whole run, whatever the default dispatch would pick.
"""
from __future__ import annotations

import argparse
import functools
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F

import apsfast
from apsfast import _backends, models, reference
from apsfast._order import construct_macs
from apsfast.benchmarks.common import environment, forced_backend, fused_backend, median_times, write_results
from apsfast.nn import APSConv2d, APSLayer, aps_layers

# The model-level tables run on these search spaces (apsfast.models) at their widest arch.
SPACES = {"resnet20": "resnet20_cifar", "mobilenetv2": "mobilenetv2_imagenet"}


@dataclass(frozen=True)
class ConvShape:
    """One searchable conv: candidate widths per side, kernel, stride, input size, batch."""
    name: str
    in_widths: tuple[int, ...]
    out_widths: tuple[int, ...]
    kernel: int
    hw: int
    batch: int
    stride: int = 1
    depthwise: bool = False


@functools.lru_cache(maxsize=None)
def supernet(model: str) -> models.Supernet:
    """The default supernet of ``model`` (a key of ``SPACES``) on the meta device: shapes only."""
    return models.build(SPACES[model], device="meta")


def conv_shape(model: str, path: str, batch: int) -> ConvShape:
    """The APS conv at ``path`` of ``model``'s supernet, at its widest arch's input size."""
    net = supernet(model)
    layer = net.get_submodule(path)
    out_hw = {s.name: s.out_hw for s in net.layer_shapes(net.max_arch())}[path]
    return ConvShape(f"{model}:{path}", layer.in_widths, layer.out_widths, layer.kernel_size[0],
                     out_hw[0] * layer.stride[0], batch, layer.stride[0], layer.depthwise)


def network_layers(model: str, device, dtype, limit: Optional[int] = None,
                   every_layer: bool = False) -> tuple[list[APSLayer], list[int]]:
    """APS layers with transforms of ``model``'s supernet, moved off their exact ordinal start
    (dense transforms), with their input widths under the widest arch: the layers that arch
    runs, or with ``every_layer`` all of them (what a network-wide transition steps; their
    input width is then unused). The first ``limit`` only."""
    net = models.build(SPACES[model], device=device, dtype=dtype)
    if every_layer:
        pairs = [(layer, 0) for layer in aps_layers(net)]
    else:
        pairs = [(net.get_submodule(s.name), s.in_channels) for s in net.layer_shapes(net.max_arch())]
    pairs = [(layer, w) for layer, w in pairs if isinstance(layer, APSLayer)
             and (layer.P is not None or layer.Q is not None)][:limit]
    for layer, _ in pairs:
        layer.begin_transition()
    return [layer for layer, _ in pairs], [w for _, w in pairs]


def make_layer(shape: ConvShape, sharing: str, device, dtype) -> APSConv2d:
    layer = APSConv2d(shape.in_widths, shape.out_widths, shape.kernel, shape.stride, shape.kernel // 2,
                      groups="depthwise" if shape.depthwise else 1, sharing=sharing, device=device, dtype=dtype)
    if sharing == "transitional":
        layer.transition_step(1e-4)  # leave the exact ordinal start: dense transforms
    return layer


def _conv_flops(shape: ConvShape, c_o: int, c_i: int) -> float:
    hw_out = shape.hw // shape.stride
    per_out = (1 if shape.depthwise else c_i) * shape.kernel ** 2
    return float(shape.batch * c_o * hw_out * hw_out * per_out)


def _build_flops(layer: APSConv2d, c_o: int, c_i: int) -> float:
    C_out, C_in = layer.meta_out_width, layer.weight.shape[1]
    k2 = layer.kernel_size[0] * layer.kernel_size[1]
    if layer.Q is None:
        return float(c_o * C_out * C_in * k2)
    return float(construct_macs(C_out, c_o, C_in, c_i) * k2)


def bench_conv(shape: ConvShape, device, dtype, rounds: int, min_time: float) -> dict:
    """APS conv fwd+bwd at the widest candidates vs nn.Conv2d and the plain-PyTorch way."""
    dense = make_layer(shape, "transitional", device, dtype)
    sliced = make_layer(shape, "ordinal", device, dtype)
    c_i, c_o = shape.in_widths[-1], shape.out_widths[-1]
    x = torch.randn(shape.batch, c_i, shape.hw, shape.hw, device=device, dtype=dtype, requires_grad=True)
    static = dense.to_static(c_i)
    P = None if dense.P is None else dense.P[-1]
    Q = None if dense.Q is None else dense.Q[-1]
    groups = c_i if shape.depthwise else 1

    def plain():
        kernel = reference.construct(dense.weight, P, Q)
        F.conv2d(x, kernel, None, dense.stride, dense.padding, 1, groups).sum().backward()

    fns = {"limit": lambda: static(x).sum().backward(),
           "apsfast": lambda: dense(x).sum().backward(),
           "slice": lambda: sliced(x).sum().backward(),
           "plain": plain}
    t = median_times(fns, rounds, min_time)
    conv, build = _conv_flops(shape, c_o, c_i), _build_flops(dense, c_o, c_i)
    return {"table": "conv", "layer": shape.name, "batch": shape.batch, "hw": shape.hw,
            "shape": f"{c_i}->{c_o} k{shape.kernel}{' dw' if shape.depthwise else ''}",
            "meta": f"{dense.meta_out_width}x{dense.weight.shape[1]}",
            **{f"t_{k}": v for k, v in t.items()},
            "aps/limit": t["apsfast"] / t["limit"], "slice/limit": t["slice"] / t["limit"],
            "plain/aps": t["plain"] / t["apsfast"], "bound": (3 * conv + 2 * build) / (3 * conv)}


def bench_grouped(model: str, device, dtype, rounds: int, min_time: float, limit: Optional[int] = None) -> dict:
    """All candidate kernels of the widest arch, forward + weight-grad scatter."""
    layers, in_widths = network_layers(model, device, dtype, limit)
    operands = [layer.prebuild_operands(w) for layer, w in zip(layers, in_widths)]
    weights = [op[1] for op in operands]
    Ps, Qs = [op[2] for op in operands], [op[3] for op in operands]

    def loop():
        torch.autograd.backward([apsfast.construct(w, P, Q).sum() for w, P, Q in zip(weights, Ps, Qs)])

    def grouped():
        torch.autograd.backward([k.sum() for k in apsfast.construct_grouped(weights, Ps, Qs)])

    def plain():
        torch.autograd.backward([reference.construct(w, P, Q).sum() for w, P, Q in zip(weights, Ps, Qs)])

    t = median_times({"loop": loop, "grouped": grouped, "plain": plain}, rounds, min_time)
    return {"table": "grouped", "model": model, "layers": len(layers), **{f"t_{k}": v for k, v in t.items()},
            "loop/grouped": t["loop"] / t["grouped"], "plain/grouped": t["plain"] / t["grouped"]}


def per_layer_autograd_step(pairs, tau: float) -> None:
    """The plain way: per layer, Φ by autograd, then the projected update of eq. 5."""
    for Ps, Qs in pairs:
        reference.transition_step_autograd(Ps, Qs, tau)


def bench_transition(model: str, device, dtype, rounds: int, min_time: float, limit: Optional[int] = None) -> dict:
    """One transition step of every APS layer of the supernet."""
    layers, _ = network_layers(model, device, dtype, limit, every_layer=True)
    pairs = [(layer.P, layer.Q) for layer in layers]
    loose = [(None if Ps is None else [M.detach().clone() for M in Ps],
              None if Qs is None else [M.detach().clone() for M in Qs]) for Ps, Qs in pairs]
    tau = 1e-9  # timing only: keep the transforms where they are
    t = median_times({"batched": lambda: apsfast.transition_step_all(pairs, tau),
                       "per_layer": lambda: per_layer_autograd_step(loose, tau)}, rounds, min_time)
    return {"table": "transition", "model": model, "layers": len(pairs), **{f"t_{k}": v for k, v in t.items()},
            "per_layer/batched": t["per_layer"] / t["batched"]}


def conv_sweep(quick: bool) -> list[ConvShape]:
    """ResNet-20 CIFAR 3×3 layers and MobileNet-v2 pointwise/depthwise layers, several batches."""
    if quick:
        return [conv_shape("resnet20", "layer3.1.conv1", 2), conv_shape("mobilenetv2", "stage7.0.layers.6", 2),
                conv_shape("mobilenetv2", "stage7.0.layers.3", 2)]
    resnet20 = ("layer1.1.conv1", "layer2.1.conv1", "layer3.1.conv1")  # 32², 16², 8²
    # 1×1 at 112², depthwise at 56², 1×1 at 28², depthwise at 14², 1×1 at 14² and 7².
    mobilenetv2 = ("stage1.0.layers.3", "stage2.1.layers.3", "stage3.1.layers.6", "stage5.1.layers.3",
                   "stage5.0.layers.6", "stage6.1.layers.6")
    return ([conv_shape("resnet20", path, batch) for batch in (8, 32, 64) for path in resnet20]
            + [conv_shape("mobilenetv2", path, batch) for batch in (8, 32) for path in mobilenetv2])


def run(quick: bool = False, device: str = "cpu", dtype: torch.dtype = torch.float32,
        rounds: Optional[int] = None, min_time: Optional[float] = None,
        progress: Callable[[str], None] = print,
        on_row: Callable[[list[dict]], None] = lambda rows: None) -> list[dict]:
    """Every row of the three tables; ``on_row`` sees the rows so far after each one (a long
    run interrupted keeps what it measured)."""
    rounds = rounds or (1 if quick else 7)
    min_time = min_time if min_time is not None else (0.0 if quick else 0.05)
    rows = []
    for shape in conv_sweep(quick):
        progress(f"conv {shape.name} batch {shape.batch}")
        rows.append(bench_conv(shape, device, dtype, rounds, min_time))
        on_row(rows)
    limit = 4 if quick else None
    for model in SPACES:
        progress(f"grouped {model}")
        rows.append(bench_grouped(model, device, dtype, rounds, min_time, limit))
        on_row(rows)
        progress(f"transition {model}")
        rows.append(bench_transition(model, device, dtype, rounds, min_time, limit))
        on_row(rows)
    return rows


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.3f}"


def markdown(rows: list[dict]) -> str:
    """The three tables, with median and worst ratios under the conv table."""
    out = []
    conv = [r for r in rows if r["table"] == "conv"]
    if conv:
        out += ["| layer | batch | hw | shape | meta | limit ms | apsfast ms | slice ms | plain ms | aps/limit | bound | slice/limit | plain/aps |",
                "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        out += [f"| {r['layer']} | {r['batch']} | {r['hw']} | {r['shape']} | {r['meta']} | {_ms(r['t_limit'])} | "
                f"{_ms(r['t_apsfast'])} | {_ms(r['t_slice'])} | {_ms(r['t_plain'])} | {r['aps/limit']:.3f} | "
                f"{r['bound']:.3f} | {r['slice/limit']:.3f} | {r['plain/aps']:.2f} |" for r in conv]
        for key in ("aps/limit", "slice/limit", "plain/aps"):
            values = [r[key] for r in conv]
            worst = max(values) if key != "plain/aps" else min(values)
            out.append(f"\n{key}: median {statistics.median(values):.3f}, worst {worst:.3f}")
        out.append("")
    grouped = [r for r in rows if r["table"] == "grouped"]
    if grouped:
        out += ["| model | layers | per-layer loop ms | grouped ms | plain ms | loop/grouped | plain/grouped |",
                "|---|---|---|---|---|---|---|"]
        out += [f"| {r['model']} | {r['layers']} | {_ms(r['t_loop'])} | {_ms(r['t_grouped'])} | {_ms(r['t_plain'])} | "
                f"{r['loop/grouped']:.2f} | {r['plain/grouped']:.2f} |" for r in grouped]
        out.append("")
    transition = [r for r in rows if r["table"] == "transition"]
    if transition:
        out += ["| model | layers | per-layer autograd ms | batched ms | per_layer/batched |", "|---|---|---|---|---|"]
        out += [f"| {r['model']} | {r['layers']} | {_ms(r['t_per_layer'])} | {_ms(r['t_batched'])} | "
                f"{r['per_layer/batched']:.2f} |" for r in transition]
    return "\n".join(out)


def main(argv: Optional[Sequence[str]] = None, prog: str = "apsfast bench kernels") -> int:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny shapes, one untimed round (a smoke test)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64", "bfloat16"])
    parser.add_argument("--backend", choices=[n for n in _backends.NAMES if n != "reference"],
                        help="the compiled backend of the apsfast columns (default: the device's first built)")
    parser.add_argument("--out", type=Path, help="write <out>.md and <out>.jsonl (rows + environment), "
                                                 "after every row")
    args = parser.parse_args(argv)
    command = " ".join([prog, *(argv if argv is not None else [])])
    fused = args.backend or fused_backend(args.device)
    env = {**environment(command), "fused_backend": fused, "device": args.device, "dtype": args.dtype}
    header = (f"# Kernel microbenchmarks ({args.device}, {args.dtype})\n\n"
              + "\n".join(f"- {k}: {v}" for k, v in env.items()) + "\n")

    def save(rows: list[dict]) -> None:
        if args.out:
            write_results(args.out, header, markdown(rows), rows, env)

    with forced_backend(fused):
        rows = run(args.quick, args.device, getattr(torch, args.dtype), on_row=save)
    print("\n" + header + "\n" + markdown(rows))
    if args.out:
        print(f"\nwrote {args.out.with_suffix('.md')} and {args.out.with_suffix('.jsonl')}")
    return 0
