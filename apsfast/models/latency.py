"""Latency of an architecture, predicted from a table of its layers' latencies measured once on
the device that will run it.

**The table.** Every conv of ``Supernet.export(arch)`` runs, in eval mode, as the conv, its
batch norm and an activation (or the residual addition that follows, which costs alike); a
linear layer runs alone; a batch norm that follows no conv runs alone. Each distinct such op
(:class:`Op`: kind, widths, kernel, stride, padding, dilation, groups, input resolution) that
any arch of the space can contain is built as a plain module and timed at ``batch`` images on
the device: the median of ``repeats`` timings after ``warmup`` calls (each timing long enough
to read: short ops are timed over several calls; CUDA through events after a synchronize).
Layers of the same shape share one entry, so a ResNet's blocks of a stage are timed once.
What no entry covers (the stem's input, pooling, additions, the Python of the module tree)
is a constant, ``rest_ms``: the median over the narrowest, the standard and the widest arch
of the exported network's measured latency minus the sum of its entries. An arch's predicted
latency is ``rest_ms`` plus the sum of its layers' entries (:meth:`LatencyTable.predict`).

**Which ops.** A layer's op depends on the few decisions that set its widths; they are found
by changing one decision at a time from a few anchor archs (:func:`layer_dependencies`, the
search of :class:`~apsfast.search.searchers.widths.ExpectedMacs` too), and the table times the
ops of each layer over the grid of its decisions' candidates. An op that an arch still brings
(a coupling no anchor revealed) is timed when first asked for (``LatencyTable.late`` counts
them). The input resolution, padding and dilation of every layer, and which batch norm reads
which conv's output, come from hooks on one forward of the supernet (batch 1; on the meta
device a forward only infers shapes).

**The cache.** :func:`load_or_measure` keeps the table as JSON (``latency.json`` in a search's
folder) with what it was measured for (:func:`table_key`: device name, batch, threads, torch
version, the space's model, options and decisions); a table whose key differs is measured
again.
"""
from __future__ import annotations

import itertools
import json
import math
import os
import platform
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Hashable, Iterable, Optional, Sequence, Union

import torch
from torch import nn

from apsfast import _checks
from apsfast.models.base import Arch, Supernet
from apsfast.models.cost import LayerShape
from apsfast.models.static import reinitialise

FORMAT = 1  # of the JSON file; a table of another format is measured again
WARMUP, REPEATS = 3, 7
REPEAT_SECONDS = 2e-3  # a timing at least this long: short ops are timed over several calls
MAX_NUMBER = 1000  # calls per timing at most
GRID_LIMIT = 4096  # candidate combinations one group of coupled decisions may enumerate
CACHE_SIZE = 4096  # archs whose prediction a table remembers
REST = "(rest)"  # the name of the constant in :meth:`LatencyTable.layer_latency`

Progress = Callable[[int, str], Any]  # (total, description) -> a bar with update() and close()


@dataclass(frozen=True)
class Op:
    """One static op the table times (see the module's documentation).

    ``kind`` is ``conv`` (with ``norm``: followed by its batch norm; then a ReLU), ``bn`` (a
    batch norm alone) or ``linear``; ``in_hw`` the spatial size of its input."""

    kind: str
    in_channels: int
    out_channels: int
    kernel_size: tuple[int, int] = (1, 1)
    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int] = (0, 0)
    dilation: tuple[int, int] = (1, 1)
    groups: int = 1
    in_hw: tuple[int, int] = (1, 1)
    bias: bool = False
    norm: bool = False

    def key(self) -> str:
        """A compact unique name, e.g. ``conv+bn 16>32 k3x3 s2x2 p1x1 d1x1 g1 @32x32``."""
        pair = lambda t: f"{t[0]}x{t[1]}"  # noqa: E731
        if self.kind == "linear":
            return f"linear {self.in_channels}>{self.out_channels}{' +b' if self.bias else ''}"
        if self.kind == "bn":
            return f"bn {self.in_channels} @{pair(self.in_hw)}"
        return (f"conv{'+bn' if self.norm else ''} {self.in_channels}>{self.out_channels} k{pair(self.kernel_size)} "
                f"s{pair(self.stride)} p{pair(self.padding)} d{pair(self.dilation)} g{self.groups}"
                f"{' +b' if self.bias else ''} @{pair(self.in_hw)}")

    def module(self, device: Union[str, torch.device], dtype: Optional[torch.dtype] = None) -> nn.Module:
        """The op as a plain module in eval mode on ``device``."""
        kw = dict(device=device, dtype=dtype)
        if self.kind == "linear":
            layers: list[nn.Module] = [nn.Linear(self.in_channels, self.out_channels, bias=self.bias, **kw)]
        elif self.kind == "bn":
            layers = [nn.BatchNorm2d(self.in_channels, **kw)]
        else:
            layers = [nn.Conv2d(self.in_channels, self.out_channels, self.kernel_size, self.stride, self.padding,
                                self.dilation, self.groups, bias=self.bias, **kw)]
            if self.norm:
                layers.append(nn.BatchNorm2d(self.out_channels, **kw))
            layers.append(nn.ReLU(inplace=True))
        return nn.Sequential(*layers).eval()

    def input(self, batch: int, device: Union[str, torch.device], dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        shape = (batch, self.in_channels) if self.kind == "linear" else (batch, self.in_channels, *self.in_hw)
        return torch.randn(shape, device=device, dtype=dtype)


# --- timing -------------------------------------------------------------------------------

def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn: Callable[[], object], device: Union[str, torch.device], repeats: int = REPEATS,
            warmup: int = WARMUP) -> float:
    """Median milliseconds per call of ``fn`` on ``device`` over ``repeats`` timings after
    ``warmup`` calls; each timing runs enough calls to last about ``REPEAT_SECONDS``."""
    device = torch.device(device)
    for _ in range(max(warmup, 1)):
        fn()
    _sync(device)
    started = time.perf_counter()
    fn()
    _sync(device)
    number = max(1, min(MAX_NUMBER, int(REPEAT_SECONDS / max(time.perf_counter() - started, 1e-7))))
    samples = []
    for _ in range(max(repeats, 1)):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(number):
                fn()
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end) / number)
        else:
            started = time.perf_counter()
            for _ in range(number):
                fn()
            samples.append((time.perf_counter() - started) * 1e3 / number)
    return statistics.median(samples)


def own_rng(device: Union[str, torch.device]):
    """A context in which random draws leave the global generators (CPU and ``device``'s) as
    they were: measuring changes nothing a seeded run draws afterwards."""
    device = torch.device(device)
    return torch.random.fork_rng(devices=[device] if device.type == "cuda" else [])


def measure_op(op: Op, batch: int, device: Union[str, torch.device], repeats: int = REPEATS,
               warmup: int = WARMUP) -> float:
    """Milliseconds of ``op`` on ``batch`` images on ``device`` (see :func:`time_ms`)."""
    with own_rng(device), torch.no_grad():
        module, x = op.module(device), op.input(batch, device)
        return time_ms(lambda: module(x), device, repeats, warmup)


def measure_network(module: nn.Module, batch: int, in_channels: int, hw: Sequence[int],
                    device: Union[str, torch.device], repeats: int = REPEATS, warmup: int = WARMUP) -> float:
    """Milliseconds of a static network's eval-mode forward on ``batch`` random images."""
    module = module.eval()
    with own_rng(device), torch.no_grad():
        x = torch.randn(batch, in_channels, *hw, device=device)
        return time_ms(lambda: module(x), device, repeats, warmup)


def static_network(net: Supernet, arch: Sequence[int], device: Union[str, torch.device]) -> nn.Module:
    """``net.export(arch)`` freshly initialised on ``device`` in eval mode (through the meta
    device when the supernet lives there: no weights are computed for nothing)."""
    static = net.export(arch, inherit_weights=False)
    if any(p.is_meta for p in static.parameters()):
        static = reinitialise(static.to_empty(device=device))
    return static.to(device).eval()


def input_hw(net: Supernet) -> tuple[int, int]:
    size = net.input_size
    return (size, size) if isinstance(size, int) else tuple(size)


def device_name(device: Union[str, torch.device]) -> str:
    """The GPU's name, or the CPU's model (what a latency is measured on)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return f"{platform.machine()} {platform.processor()}".strip() or "cpu"


# --- which ops a space contains ----------------------------------------------------------

def layer_dependencies(net: Supernet, values: Callable[[Arch], dict[str, Hashable]]) -> dict[str, set[int]]:
    """``{layer: decisions}``: the decisions whose change changes ``values(arch)[layer]`` (a
    layer's cost or shape; absent counts as 0) at one of a few anchor archs (the narrowest,
    widest, standard and two seeded random ones), changing one decision at a time."""
    sizes = [len(d.widths) for d in net.decisions()]
    generator = torch.Generator().manual_seed(0)
    anchors = [net.min_arch(), net.max_arch(), net.standard_arch()]
    anchors += [[int(torch.randint(k, (), generator=generator)) for k in sizes] for _ in range(2)]
    depends: dict[str, set[int]] = {}
    for anchor in anchors:
        base = values(anchor)
        for name in base:
            depends.setdefault(name, set())
        for d, k in enumerate(sizes):
            for a in range(k):
                if a == anchor[d]:
                    continue
                changed = values(anchor[:d] + [a] + anchor[d + 1:])
                for name in set(base) | set(changed):
                    depends.setdefault(name, set())
                    if base.get(name, 0) != changed.get(name, 0):
                        depends[name].add(d)
    return depends


def dependency_grids(net: Supernet,
                     depends: dict[str, set[int]]) -> list[tuple[tuple[int, ...], list[str], list[Arch]]]:
    """For each set of decisions some layers depend on: the set, those layers, and the archs
    that run over the grid of its candidates (every other decision at its narrowest), in the
    grid's row-major order."""
    sizes = [len(d.widths) for d in net.decisions()]
    by_set: dict[tuple[int, ...], list[str]] = {}
    for name, ds in depends.items():
        by_set.setdefault(tuple(sorted(ds)), []).append(name)
    out = []
    for ds, names in sorted(by_set.items()):
        grid = [sizes[d] for d in ds]
        if math.prod(grid) > GRID_LIMIT:
            raise ValueError(f"layers {names[:3]} depend on {len(ds)} decisions jointly ({math.prod(grid)} candidate "
                             f"combinations, more than {GRID_LIMIT}): too many to tabulate")
        archs = []
        for combo in itertools.product(*(range(k) for k in grid)):
            arch = net.min_arch()
            for d, a in zip(ds, combo):
                arch[d] = a
            archs.append(arch)
        out.append((ds, names, archs))
    return out


@dataclass
class Geometry:
    """What the layer shapes leave out and an op needs: each layer's input resolution,
    padding and dilation, and the conv whose output each batch norm reads."""

    in_hw: dict[str, tuple[int, int]] = field(default_factory=dict)
    padding: dict[str, tuple[int, int]] = field(default_factory=dict)
    dilation: dict[str, tuple[int, int]] = field(default_factory=dict)
    norm_of: dict[str, str] = field(default_factory=dict)  # {batch norm: the conv it follows}


def _modules_by_layer(net: Supernet, names: Iterable[str]) -> dict[str, nn.Module]:
    """The supernet's module of each layer name of ``layer_shapes`` (a converted supernet
    names its layers inside its graph part)."""
    modules = dict(net.named_modules())
    out = {}
    for name in names:
        module = modules.get(name)
        if module is None:
            found = [m for path, m in modules.items() if path.endswith(f".{name}")]
            module = found[0] if len(found) == 1 else None
        if module is not None:
            out[name] = module
    return out


def _first(value: Any) -> Any:
    return value.parts[0] if hasattr(value, "parts") else value


def layer_geometry(net: Supernet, archs: Sequence[Arch]) -> Geometry:
    """:class:`Geometry` of the layers ``archs`` contain, from hooks on batch-1 eval forwards
    of the supernet at those archs (the arch and the training mode are restored)."""
    geometry = Geometry()
    kinds = {s.name: s.kind for arch in archs for s in net.layer_shapes(arch)}
    modules = _modules_by_layer(net, kinds)
    outputs: dict[int, tuple[torch.Tensor, str]] = {}  # the conv outputs of this forward

    def before(name: str):
        def hook(module: nn.Module, inputs: tuple) -> None:
            x = inputs[0] if inputs else None
            if isinstance(x, torch.Tensor) and x.dim() == 4:
                geometry.in_hw.setdefault(name, (int(x.shape[2]), int(x.shape[3])))
                if kinds[name] == "bn" and id(x) in outputs and outputs[id(x)][0] is x:
                    geometry.norm_of.setdefault(name, outputs[id(x)][1])
        return hook

    def after(name: str):
        def hook(module: nn.Module, inputs: tuple, output: Any) -> None:
            if isinstance(output, torch.Tensor):
                outputs[id(output)] = (output, name)
        return hook

    handles = []
    for name, module in modules.items():
        conv = _first(module)
        if kinds[name] == "conv" and hasattr(conv, "padding") and not isinstance(conv.padding, str):
            geometry.padding[name] = tuple(conv.padding)
            geometry.dilation[name] = tuple(getattr(conv, "dilation", (1, 1)))
        handles.append(module.register_forward_pre_hook(before(name)))
        if kinds[name] == "conv":
            handles.append(module.register_forward_hook(after(name)))
    parameter = next(net.parameters(), None)
    device = parameter.device if parameter is not None else torch.device("cpu")
    was_training, current = net.training, net.arch
    try:
        net.eval()
        with torch.no_grad():
            for arch in archs:
                net.set_arch(arch)
                outputs.clear()
                net(torch.zeros(1, net.in_channels, *input_hw(net), device=device))
    finally:
        outputs.clear()
        for handle in handles:
            handle.remove()
        net.set_arch(current)
        net.train(was_training)
    return geometry


# --- the table --------------------------------------------------------------------------

def table_key(net: Supernet, batch: int, device: Union[str, torch.device]) -> dict[str, Any]:
    """What a table is valid for: the device, batch, threads, torch version and the space."""
    device = torch.device(device)
    key = {"format": FORMAT, "device": device_name(device), "device_type": device.type, "batch": batch,
           "threads": torch.get_num_threads() if device.type == "cpu" else None, "torch": torch.__version__,
           "model": net.name, "options": net.options, "input_size": net.input_size,
           "decisions": [[d.name, list(d.widths)] for d in net.decisions()]}
    return json.loads(json.dumps(key, default=str))  # as it reads back from the file


class LatencyTable:
    """Predicted latency (ms at ``batch`` images on ``device``) of any arch of ``net``: the
    measured entries of its layers' ops plus ``rest_ms`` (see the module's documentation).
    Build one with :meth:`measure` or :func:`load_or_measure`."""

    def __init__(self, net: Supernet, entries: dict[str, float], rest_ms: float, *, batch: int,
                 device: Union[str, torch.device], geometry: Geometry, key: Optional[dict[str, Any]] = None,
                 repeats: int = REPEATS, warmup: int = WARMUP) -> None:
        self.net, self.entries, self.rest_ms = net, dict(entries), float(rest_ms)
        self.batch, self.device = batch, torch.device(device)
        self.geometry = geometry
        self.key = key if key is not None else table_key(net, batch, device)
        self.repeats, self.warmup = repeats, warmup
        self.late = 0  # ops timed when first asked for, after the table was built
        self._cache: dict[tuple[int, ...], float] = {}

    # --- what an arch runs --------------------------------------------------------------

    def _conv_op(self, shape: LayerShape, norm: bool) -> Op:
        g, k = self.geometry, shape.kernel_size
        out_hw, stride = shape.out_hw, shape.stride
        dilation = g.dilation.get(shape.name, (1, 1))
        padding = g.padding.get(shape.name, tuple(d * (kk - 1) // 2 for d, kk in zip(dilation, k)))
        in_hw = g.in_hw.get(shape.name, tuple(o * s for o, s in zip(out_hw, stride)))
        return Op("conv", shape.in_channels, shape.out_channels, tuple(k), tuple(stride), tuple(padding),
                  tuple(dilation), shape.groups, tuple(in_hw), shape.bias, norm)

    def layer_ops(self, arch: Sequence[int]) -> dict[str, Op]:
        """``{layer: op}`` of ``export(arch)``: every conv (with the batch norm that reads it),
        linear layer and lone batch norm."""
        shapes = self.net.layer_shapes(list(arch))
        present = {s.name for s in shapes}
        norms = {conv for bn, conv in self.geometry.norm_of.items() if bn in present}
        ops: dict[str, Op] = {}
        for shape in shapes:
            if shape.kind == "conv":
                ops[shape.name] = self._conv_op(shape, shape.name in norms)
            elif shape.kind == "linear":
                ops[shape.name] = Op("linear", shape.in_channels, shape.out_channels, bias=shape.bias)
            elif shape.name not in self.geometry.norm_of:
                ops[shape.name] = Op("bn", shape.in_channels, shape.in_channels,
                                     in_hw=self.geometry.in_hw.get(shape.name, (1, 1)))
        return ops

    def layer_keys(self, arch: Sequence[int]) -> dict[str, str]:
        """``{layer: op key}`` of ``arch`` (what a layer's latency depends on), and the constant
        under :data:`REST`: the layers of :meth:`layer_latency`."""
        return {**{name: op.key() for name, op in self.layer_ops(arch).items()}, REST: REST}

    def entry(self, op: Op) -> float:
        """The measured milliseconds of ``op``, timing it now if the table lacks it."""
        key = op.key()
        if key not in self.entries:
            self.entries[key] = measure_op(op, self.batch, self.device, self.repeats, self.warmup)
            self.late += 1
        return self.entries[key]

    def layer_latency(self, arch: Sequence[int]) -> dict[str, float]:
        """``{layer: ms}`` of ``arch``, and the constant under :data:`REST`; they sum to
        :meth:`predict`."""
        out = {name: self.entry(op) for name, op in self.layer_ops(arch).items()}
        out[REST] = self.rest_ms
        return out

    def predict(self, arch: Sequence[int]) -> float:
        """Predicted milliseconds of ``export(arch)`` at ``batch`` images: ``rest_ms`` plus the
        entries of its layers' ops (remembered per arch)."""
        arch = tuple(self.net.check_arch(arch))
        if arch not in self._cache:
            if len(self._cache) >= CACHE_SIZE:
                self._cache.pop(next(iter(self._cache)))
            self._cache[arch] = sum(self.layer_latency(arch).values())
        return self._cache[arch]

    __call__ = predict

    # --- measuring --------------------------------------------------------------------------

    @classmethod
    def measure(cls, net: Supernet, batch: int, device: Union[str, torch.device], *, repeats: int = REPEATS,
                warmup: int = WARMUP, progress: Optional[Progress] = None) -> "LatencyTable":
        """Time every op any arch of ``net`` contains at ``batch`` images on ``device``, and the
        constant (see the module's documentation). ``progress(total, description)`` makes a
        progress bar (``update(n)``, ``close()``)."""
        batch = _checks.positive_int("batch", batch)
        device = torch.device(device)
        shapes_of = lambda arch: {s.name: (s.kind, s.in_channels, s.out_channels, s.groups)  # noqa: E731
                                  for s in net.layer_shapes(arch)}
        grids = dependency_grids(net, layer_dependencies(net, shapes_of))
        anchors = [net.min_arch(), net.standard_arch(), net.max_arch()]
        archs = list({tuple(a): list(a) for a in [*anchors, *(a for _, _, g in grids for a in g)]}.values())
        # The layers' geometry from as few forwards as cover every layer some arch contains.
        first: dict[str, Arch] = {}
        for arch in archs:
            for s in net.layer_shapes(arch):
                first.setdefault(s.name, arch)
        cover = list({tuple(a): a for a in [net.max_arch(), *first.values()]}.values())
        covered: set[str] = set()
        chosen = []
        for arch in cover:
            names = {s.name for s in net.layer_shapes(arch)}
            if names - covered:
                chosen.append(arch)
                covered |= names
        table = cls(net, {}, 0.0, batch=batch, device=device, geometry=layer_geometry(net, chosen),
                    repeats=repeats, warmup=warmup)
        ops: dict[str, Op] = {}
        for arch in archs:
            for op in table.layer_ops(arch).values():
                ops.setdefault(op.key(), op)
        bar = progress(len(ops) + len(anchors), f"latency table ({len(ops)} ops at batch {batch} on "
                                                f"{device.type})") if progress else None
        for key, op in ops.items():
            table.entries[key] = measure_op(op, batch, device, repeats, warmup)
            if bar is not None:
                bar.update(1)
        residuals = []
        for arch in anchors:
            with own_rng(device):
                static = static_network(net, arch, device)
            measured = measure_network(static, batch, net.in_channels, input_hw(net), device, repeats, warmup)
            residuals.append(measured - sum(table.entries[op.key()] for op in table.layer_ops(arch).values()))
            del static
            if bar is not None:
                bar.update(1)
        if bar is not None:
            bar.close()
        table.rest_ms = statistics.median(residuals)
        return table

    # --- the file ---------------------------------------------------------------------------

    def to_json(self) -> dict[str, Any]:
        g = self.geometry
        return {"key": self.key, "rest_ms": self.rest_ms, "repeats": self.repeats, "warmup": self.warmup,
                "entries": self.entries,
                "geometry": {"in_hw": g.in_hw, "padding": g.padding, "dilation": g.dilation, "norm_of": g.norm_of}}

    @classmethod
    def from_json(cls, net: Supernet, obj: dict[str, Any], device: Union[str, torch.device]) -> "LatencyTable":
        g = obj["geometry"]
        pairs = lambda d: {k: tuple(v) for k, v in d.items()}  # noqa: E731
        geometry = Geometry(pairs(g["in_hw"]), pairs(g["padding"]), pairs(g["dilation"]), dict(g["norm_of"]))
        return cls(net, {k: float(v) for k, v in obj["entries"].items()}, obj["rest_ms"], batch=obj["key"]["batch"],
                   device=device, geometry=geometry, key=obj["key"], repeats=obj.get("repeats", REPEATS),
                   warmup=obj.get("warmup", WARMUP))

    def save(self, path: Union[str, Path]) -> None:
        """The table as JSON at ``path``, atomically."""
        path = Path(path)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(json.dumps(self.to_json(), indent=1))
        os.replace(tmp, path)


def load_or_measure(path: Union[str, Path], net: Supernet, batch: int, device: Union[str, torch.device], *,
                    repeats: int = REPEATS, warmup: int = WARMUP, progress: Optional[Progress] = None,
                    save: bool = True) -> tuple[LatencyTable, str]:
    """The table cached at ``path`` when it was measured for the same :func:`table_key`, else a
    new one measured and written there (with ``save``). Returns it and a line saying which."""
    path = Path(path)
    key = table_key(net, batch, device)
    why = f"no table at {path}"
    if path.is_file():
        try:
            obj = json.loads(path.read_text())
            old = obj.get("key", {}) if isinstance(obj, dict) else {}
        except (OSError, json.JSONDecodeError):
            obj, old = None, {}
        if old == key:
            try:
                table = LatencyTable.from_json(net, obj, device)
                return table, f"latency table read from {path} ({len(table.entries)} ops, {key['device']})"
            except (KeyError, TypeError, ValueError):
                why = f"{path} is damaged"
        else:
            diff = [k for k in key if old.get(k) != key[k]]
            why = f"{path} was measured for another {', '.join(diff) or 'format'}" if old else f"{path} is damaged"
    started = time.perf_counter()
    table = LatencyTable.measure(net, batch, device, repeats=repeats, warmup=warmup, progress=progress)
    if save:
        path.parent.mkdir(parents=True, exist_ok=True)
        table.save(path)
    return table, (f"latency table measured ({why}): {len(table.entries)} ops at batch {batch} on {key['device']} "
                   f"in {time.perf_counter() - started:.1f} s, written to {path}" if save else "")
