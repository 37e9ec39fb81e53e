"""The distinct static ops the archs of a search space run, and what they need to be built:
what a latency table (:mod:`apsfast.models.latency`) times.

**An op.** Every conv of ``Supernet.export(arch)`` runs, in eval mode, as the conv, its batch
norm and an activation (or the residual addition that follows, which costs alike); a linear
layer runs alone; a batch norm that follows no conv runs alone. Each such op is an
:class:`Op` (kind, widths, kernel, stride, padding, dilation, groups, input resolution), and
layers of the same shape share one, so a ResNet's blocks of a stage are one op.

**Which ops.** A layer's op depends on the few decisions that set its widths; they are found
by changing one decision at a time from a few anchor archs (:func:`layer_dependencies`, the
search of :class:`~apsfast.search.searchers.widths.ExpectedMacs` too), and :func:`space_ops`
collects the ops of each layer over the grid of its decisions' candidates
(:func:`dependency_grids`). An op that an arch still brings (a coupling no anchor revealed) is
left to the table to time when first asked for. The input resolution, padding and dilation of
every layer, and which batch norm reads which conv's output (:class:`Geometry`), come from
hooks on one forward of the supernet (batch 1; on the meta device a forward only infers
shapes: :func:`layer_geometry`).
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Hashable, Iterable, Optional, Sequence, Union

import torch
from torch import nn

from apsfast.models.base import Arch, Supernet
from apsfast.models.cost import LayerShape

GRID_LIMIT = 4096  # candidate combinations one group of coupled decisions may enumerate


@dataclass(frozen=True)
class Op:
    """One static op a latency table times (see the module's documentation).

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


# --- which layers depend on which decisions ----------------------------------------------

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


# --- the geometry the layer shapes leave out ---------------------------------------------

def input_hw(net: Supernet) -> tuple[int, int]:
    size = net.input_size
    return (size, size) if isinstance(size, int) else tuple(size)


@dataclass
class Geometry:
    """What the layer shapes leave out and an op needs: each layer's input resolution,
    padding and dilation, and the conv whose output each batch norm reads."""

    in_hw: dict[str, tuple[int, int]] = field(default_factory=dict)
    padding: dict[str, tuple[int, int]] = field(default_factory=dict)
    dilation: dict[str, tuple[int, int]] = field(default_factory=dict)
    norm_of: dict[str, str] = field(default_factory=dict)  # {batch norm: the conv it follows}

    def to_json(self) -> dict[str, Any]:
        return {"in_hw": self.in_hw, "padding": self.padding, "dilation": self.dilation, "norm_of": self.norm_of}

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> "Geometry":
        pairs = lambda d: {k: tuple(v) for k, v in d.items()}  # noqa: E731
        return cls(pairs(obj["in_hw"]), pairs(obj["padding"]), pairs(obj["dilation"]), dict(obj["norm_of"]))


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


# --- the ops of an arch ------------------------------------------------------------------

def conv_op(shape: LayerShape, geometry: Geometry, norm: bool) -> Op:
    """The op of a conv layer (``norm``: followed by its batch norm)."""
    k, out_hw, stride = shape.kernel_size, shape.out_hw, shape.stride
    dilation = geometry.dilation.get(shape.name, (1, 1))
    padding = geometry.padding.get(shape.name, tuple(d * (kk - 1) // 2 for d, kk in zip(dilation, k)))
    in_hw = geometry.in_hw.get(shape.name, tuple(o * s for o, s in zip(out_hw, stride)))
    return Op("conv", shape.in_channels, shape.out_channels, tuple(k), tuple(stride), tuple(padding),
              tuple(dilation), shape.groups, tuple(in_hw), shape.bias, norm)


def layer_ops(net: Supernet, geometry: Geometry, arch: Sequence[int]) -> dict[str, Op]:
    """``{layer: op}`` of ``net.export(arch)``: every conv (with the batch norm that reads it),
    linear layer and lone batch norm."""
    shapes = net.layer_shapes(list(arch))
    present = {s.name for s in shapes}
    norms = {conv for bn, conv in geometry.norm_of.items() if bn in present}
    ops: dict[str, Op] = {}
    for shape in shapes:
        if shape.kind == "conv":
            ops[shape.name] = conv_op(shape, geometry, shape.name in norms)
        elif shape.kind == "linear":
            ops[shape.name] = Op("linear", shape.in_channels, shape.out_channels, bias=shape.bias)
        elif shape.name not in geometry.norm_of:
            ops[shape.name] = Op("bn", shape.in_channels, shape.in_channels,
                                 in_hw=geometry.in_hw.get(shape.name, (1, 1)))
    return ops


# --- the ops of a space ------------------------------------------------------------------

def _covering_archs(net: Supernet, archs: Sequence[Arch]) -> list[Arch]:
    """As few archs (the widest, then some of ``archs``) as together contain every layer some
    of ``archs`` contains: the forwards :func:`layer_geometry` needs."""
    first: dict[str, Arch] = {}
    for arch in archs:
        for s in net.layer_shapes(arch):
            first.setdefault(s.name, arch)
    candidates = list({tuple(a): a for a in [net.max_arch(), *first.values()]}.values())
    covered: set[str] = set()
    chosen = []
    for arch in candidates:
        names = {s.name for s in net.layer_shapes(arch)}
        if names - covered:
            chosen.append(arch)
            covered |= names
    return chosen


def space_ops(net: Supernet, anchors: Sequence[Arch] = ()) -> tuple[Geometry, dict[str, Op]]:
    """The layers' :class:`Geometry` and ``{key: op}`` of every distinct op that ``anchors``
    and the archs over each dependency grid of ``net`` contain (see the module's
    documentation)."""
    shapes_of = lambda arch: {s.name: (s.kind, s.in_channels, s.out_channels, s.groups)  # noqa: E731
                              for s in net.layer_shapes(arch)}
    grids = dependency_grids(net, layer_dependencies(net, shapes_of))
    archs = list({tuple(a): list(a) for a in [*anchors, *(a for _, _, g in grids for a in g)]}.values())
    geometry = layer_geometry(net, _covering_archs(net, archs))
    ops: dict[str, Op] = {}
    for arch in archs:
        for op in layer_ops(net, geometry, arch).values():
            ops.setdefault(op.key(), op)
    return geometry, ops
