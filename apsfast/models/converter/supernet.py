"""The supernet of a converted model: its traced graph with APS layers in place of the
searched convs, batch norms and linear layers, and the cost and export walks over that graph."""
from __future__ import annotations

import copy
from collections import OrderedDict
from typing import Any, Optional, Sequence, Union

from torch import fx, nn

from apsfast.models.base import DecisionSpace, Supernet
from apsfast.models.converter.groups import Analysis, LayerPlan, layout_width, layout_widths
from apsfast.models.converter.layers import (FlattenedAPSLinear, GroupedAPSConv2d, aps_batch_norm, aps_conv, aps_linear,
                                             channel_view)
from apsfast.models.converter.memory import check_fits
from apsfast.models.converter.trace import Traced
from apsfast.models.cost import LayerShape
from apsfast.models.static import reinitialise
from apsfast.nn import APSBatchNorm2d, APSConv2d, APSLinear
from apsfast.nn.base import copy_without_hooks

PART = "net"  # the one part of a converted supernet: the graph module


def _set_module(root: nn.Module, path: str, module: nn.Module) -> None:
    """Put ``module`` at ``path``, keeping the children the graph calls there (a batch norm that
    carries its activation, as timm's does: ``bn1.act``)."""
    parent, _, name = path.rpartition(".")
    for child_name, child in root.get_submodule(path).named_children():
        if not hasattr(module, child_name):
            module.add_module(child_name, child)
    setattr(root.get_submodule(parent) if parent else root, name, module)


def _searched_layer(plan: LayerPlan, plain: nn.Module, analysis: Analysis,
                    candidates: dict[int, tuple[int, ...]], sharing: str,
                    meta_width: Union[str, float]) -> Optional[nn.Module]:
    """The APS layer replacing ``plain``, or ``None`` where every width it sees is fixed."""
    groups = analysis.groups
    ins = layout_widths(plan.inputs, groups, candidates)
    outs = layout_widths(plan.outputs, groups, candidates)
    if len(ins) == 1 and len(outs) == 1:
        return None
    if plan.kind == "bn":
        return aps_batch_norm(plain, ins)
    if plan.kind == "linear":
        return aps_linear(plain, ins, sharing, meta_width)
    if plan.kind == "flat_linear":
        return FlattenedAPSLinear(plain, ins, plan.out_hw, sharing, meta_width)
    if plan.kind == "token_linear":
        return FlattenedAPSLinear(plain, ins, (1, 1), sharing, meta_width, outs)
    if plan.kind == "grouped":
        return GroupedAPSConv2d(plain, ins, outs, sharing, meta_width)
    return aps_conv(plain, ins, outs, plan.kind == "depthwise", sharing, meta_width)


def build_supernet(name: str, traced: Traced, analysis: Analysis, ratios: Sequence[float], round_to: int,
                   sharing: str, input_hw: tuple[int, int], in_channels: int,
                   meta_width: Union[str, float] = "sum") -> "ConvertedSupernet":
    """Replace the searched layers of ``traced.module`` (in place) and wrap it as a supernet."""
    module, groups = traced.module, analysis.groups
    candidates = {root: groups.candidates(root, ratios, round_to) for root in groups.roots()}
    searched = [root for root in groups.roots() if len(candidates[root]) > 1]
    standard = sum(p.numel() for p in module.parameters())
    element_size = next(module.parameters()).element_size() if standard else 4
    estimate = check_fits(module, analysis, candidates, sharing, meta_width, element_size, name)
    space = DecisionSpace()
    for root in searched:
        space.add(groups.name(root), candidates[root], groups.width(root))
    for plan in analysis.layers:
        layer = _searched_layer(plan, module.get_submodule(plan.path), analysis, candidates, sharing, meta_width)
        if layer is None:
            continue
        _set_module(module, plan.path, layer)
        if plan.kind in ("conv", "grouped", "token_linear") and len(candidates[groups.find(plan.outputs[0])]) > 1:
            space.drive(groups.name(plan.outputs[0]), f"{PART}.{plan.path}")
    for node in module.graph.nodes:
        if node.name in analysis.reshapes:  # read the live channel count
            node.op, node.target = "call_function", channel_view
            node.args, node.kwargs = (node.args[0], analysis.reshapes[node.name]), {}
    module.recompile()
    net = ConvertedSupernet(name, module, space, analysis, candidates, searched, input_hw, in_channels)
    net.leaf_shapes = traced.leaf_shapes
    net.peak_estimate = estimate
    # Parameters outside the costed layers (a learned scale, what an excluded module holds
    # besides convs, batch norms and linear layers) never change width: counted once here.
    net.extra_params = standard - net.params(net.standard_arch())
    return net


class ConvertedSupernet(Supernet):
    """A :class:`~apsfast.models.Supernet` made by :func:`apsfast.convert` from a plain model.

    Its one part ``net`` is the model's traced graph module with APS layers in place of the
    searched ones; :meth:`export` returns a copy of that graph with plain layers of the
    architecture's widths, under the original module names. ``input_size`` is the example
    input's side (``(H, W)`` if it is not square).
    """

    def __init__(self, name: str, module: fx.GraphModule, space: DecisionSpace, analysis: Analysis,
                 candidates: dict[int, tuple[int, ...]], searched: list[int], input_hw: tuple[int, int],
                 in_channels: int) -> None:
        super().__init__(name, OrderedDict([(PART, module)]), space, input_hw[0], in_channels)
        self._analysis, self._candidates, self._searched = analysis, candidates, searched
        if input_hw[0] != input_hw[1]:
            self.input_size = input_hw
        self.leaf_shapes: dict[str, list[LayerShape]] = {}
        self.extra_params = 0
        self.peak_estimate = 0  # bytes: convert's estimate of a training step's peak (memory.check_fits)
        self.options: dict[str, Any] = {}

    def _check_wiring(self) -> None:
        """Every searched output is set by exactly one decision, over its widths."""
        owned = set()
        for decision, paths, layers in zip(self._decisions, self._layer_paths, self._driven):
            if not paths:
                raise RuntimeError(f"internal: decision {decision.name!r} sets no layer")
            for path, layer in zip(paths, layers):
                if layer.out_widths != decision.widths:
                    raise RuntimeError(f"internal: {path} has out_widths {layer.out_widths}, its "
                                       f"decision {decision.name!r} {decision.widths}")
                owned.add(id(layer))
                owned.update(id(part) for part in getattr(layer, "parts", ()))
        for path, layer in self.named_modules():
            if isinstance(layer, (APSConv2d, GroupedAPSConv2d)) and id(layer) not in owned \
                    and not getattr(layer, "depthwise", False) and len(layer.out_widths) > 1:
                raise RuntimeError(f"internal: {path} has out_widths {layer.out_widths} but no decision")

    def _chosen(self, arch: Sequence[int]) -> dict[int, int]:
        """``{group root: width}`` under ``arch``."""
        chosen = {root: widths[-1] for root, widths in self._candidates.items()}
        for root, index in zip(self._searched, arch):
            chosen[root] = self._candidates[root][index]
        return chosen

    def _widths_of(self, plan: LayerPlan, chosen: dict[int, int]) -> tuple[int, int]:
        groups = self._analysis.groups
        return layout_width(plan.inputs, groups, chosen), layout_width(plan.outputs, groups, chosen)

    def layer_shapes(self, arch: Optional[Sequence[int]] = None) -> list[LayerShape]:
        """The conv, batch-norm and linear layers of ``export(arch)`` with their shapes at the
        example input's resolution (those inside excluded submodules as traced)."""
        arch = self.arch if arch is None else self.check_arch(arch)
        chosen = self._chosen(arch)
        module = self.get_submodule(PART)
        shapes = []
        for plan in self._analysis.layers:
            c_in, c_out = self._widths_of(plan, chosen)
            layer = module.get_submodule(plan.path)
            if plan.kind == "bn":
                affine = (layer.bns[0] if isinstance(layer, APSBatchNorm2d) else layer).affine
                shapes.append(LayerShape(plan.path, "bn", c_in, c_in, bias=affine))
            elif plan.kind == "flat_linear":  # the conv with an H×W kernel that it is: the same cost
                shapes.append(LayerShape(plan.path, "conv", c_in, c_out, plan.out_hw, (1, 1), 1, (1, 1),
                                         layer.bias is not None))
            elif plan.kind in ("linear", "token_linear"):  # over H·W tokens for the latter
                shapes.append(LayerShape(plan.path, "linear", c_in, c_out, out_hw=plan.out_hw,
                                         bias=layer.bias is not None))
            else:
                groups = c_in if plan.kind == "depthwise" else plan.groups
                conv = layer.parts[0] if isinstance(layer, GroupedAPSConv2d) else layer
                shapes.append(LayerShape(plan.path, "conv", c_in, c_out, tuple(conv.kernel_size),
                                         tuple(conv.stride), groups, plan.out_hw, conv.bias is not None))
        for leaf in self._analysis.opaque:
            shapes += self.leaf_shapes.get(leaf, [])
        return shapes

    def params(self, arch: Optional[Sequence[int]] = None) -> int:
        """Learnable parameters of ``export(arch)`` (its layers', a standardised conv's gain per
        output channel, and the fixed rest's)."""
        arch = self.arch if arch is None else self.check_arch(arch)
        chosen = self._chosen(arch)
        module = self.get_submodule(PART)
        gains = sum(self._widths_of(plan, chosen)[1] for plan in self._analysis.layers
                    if getattr(module.get_submodule(plan.path), "gain", None) is not None)
        return super().params(arch) + gains + self.extra_params

    def export(self, arch: Optional[Sequence[int]] = None, inherit_weights: bool = True) -> fx.GraphModule:
        """A plain graph module with the widths of ``arch``: the converted model's graph with
        ``nn.Conv2d``/``nn.BatchNorm2d``/``nn.Linear`` of those widths (the candidate kernels
        and per-width statistics with ``inherit_weights``, so that in eval mode it computes
        what the supernet computes; else freshly initialised) under the original names."""
        arch = self.arch if arch is None else self.check_arch(arch)
        chosen = self._chosen(arch)
        module = self.get_submodule(PART)
        plans = {plan.path: plan for plan in self._analysis.layers}
        root: dict[str, Any] = {}
        for node in module.graph.nodes:
            if node.op == "get_attr":
                root[node.target] = copy.deepcopy(getattr_path(module, node.target))
            elif node.op == "call_module":
                layer = module.get_submodule(node.target)
                plan = plans.get(node.target)
                root[node.target] = copy_without_hooks(layer) if plan is None else \
                    _static(layer, *self._widths_of(plan, chosen))
        static = fx.GraphModule(root, copy.deepcopy(module.graph), class_name=type(module).__name__)
        static.train(self.training)
        return static if inherit_weights else reinitialise(static)


def getattr_path(module: nn.Module, path: str) -> Any:
    for name in path.split("."):
        module = getattr(module, name)
    return module


def _static(layer: nn.Module, in_width: int, out_width: int) -> nn.Module:
    """The plain form of one layer of the converted graph at these widths."""
    if isinstance(layer, (GroupedAPSConv2d, FlattenedAPSLinear)):
        return layer.to_static(in_width, out_width)
    if isinstance(layer, APSConv2d):
        return layer.to_static(in_width, None if layer.depthwise else out_width)
    if isinstance(layer, (APSBatchNorm2d, APSLinear)):
        return layer.to_static(in_width)
    return copy_without_hooks(layer)  # a plain layer whose widths are all fixed
