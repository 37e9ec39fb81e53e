"""From a supernet part to its static equivalent for one architecture, and its cost.

A supernet is a tree of parts: APS leaves (:class:`~apsfast.nn.APSConv2d`,
:class:`~apsfast.nn.APSBatchNorm2d`, :class:`~apsfast.nn.APSLinear`), width-preserving
plain modules (activations, pooling, dropout), ``nn.Sequential`` containers and blocks that
implement the :class:`Part` protocol. Two walks follow the channel widths through that tree
for an architecture: :func:`export_part` builds the plain ``nn.Conv2d``/``nn.BatchNorm2d``
module, :func:`part_shapes` lists the shapes of the layers that module would have (for
counting MACs and parameters without building anything).
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Iterable, Mapping

from torch import nn
from torch.nn.modules.utils import _pair

from apsfast.models.cost import LayerShape
from apsfast.nn import APSBatchNorm2d, APSConv2d, APSLinear
from apsfast.nn.base import copy_without_hooks

#: ``resolve[path]``: the output width of the searchable APS conv at ``path`` under the
#: architecture being walked.
Resolve = Mapping[str, int]
HW = tuple[int, int]

# Modules that keep the channel count and whose static form is a copy of themselves.
WIDTH_PRESERVING = (nn.ReLU, nn.ReLU6, nn.Identity, nn.Dropout, nn.MaxPool2d, nn.AdaptiveAvgPool2d, nn.Flatten)


class Part(nn.Module):
    """Base of the blocks that know how widths flow through them (residual blocks)."""

    def export(self, path: str, in_width: int, resolve: Resolve) -> tuple[nn.Module, int]:
        """Its static module for inputs of ``in_width`` channels, and the output width."""
        raise NotImplementedError

    def shapes(self, path: str, in_width: int, hw: HW, resolve: Resolve) -> tuple[list[LayerShape], int, HW]:
        """The shapes of its static module's layers, the output width and spatial size."""
        raise NotImplementedError


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def _conv_out(size: int, kernel: int, stride: int, padding: int, dilation: int) -> int:
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


def _out_width(path: str, conv: APSConv2d, in_width: int, resolve: Resolve) -> int:
    if conv.depthwise:
        return in_width
    return conv.out_widths[0] if len(conv.out_widths) == 1 else resolve[path]


def export_part(module: nn.Module, path: str, in_width: int, resolve: Resolve) -> tuple[nn.Module, int]:
    """The static module computing ``module`` for inputs of ``in_width`` channels under the
    architecture that ``resolve`` maps out, with its weights; and the output width."""
    if isinstance(module, APSConv2d):
        out_width = _out_width(path, module, in_width, resolve)
        return module.to_static(in_width, out_width), out_width
    if isinstance(module, APSBatchNorm2d):
        return module.to_static(in_width), in_width
    if isinstance(module, APSLinear):
        return module.to_static(in_width), module.out_features
    if isinstance(module, nn.Sequential):
        static, out_width = export_chain(module.named_children(), path, in_width, resolve)
        return nn.Sequential(static), out_width
    if isinstance(module, Part):
        return module.export(path, in_width, resolve)
    if isinstance(module, nn.Linear):
        return copy_without_hooks(module), module.out_features
    if isinstance(module, WIDTH_PRESERVING):
        return copy_without_hooks(module), in_width
    raise TypeError(f"cannot export {type(module).__name__} at {path!r}: a supernet part must be an "
                    f"APS layer, nn.Sequential, nn.Linear, a width-preserving module or a Part")


def part_shapes(module: nn.Module, path: str, in_width: int, hw: HW,
                resolve: Resolve) -> tuple[list[LayerShape], int, HW]:
    """The layer shapes of ``export_part(module, …)``'s module for inputs of ``in_width``
    channels and spatial size ``hw``, its output width and spatial size; builds nothing."""
    if isinstance(module, APSConv2d):
        out_width = _out_width(path, module, in_width, resolve)
        if isinstance(module.padding, str):
            raise TypeError(f"{path}: string padding {module.padding!r} is not supported by the cost model")
        out_hw = tuple(_conv_out(s, k, st, p, d) for s, k, st, p, d in
                       zip(hw, module.kernel_size, module.stride, module.padding, module.dilation))
        shape = LayerShape(path, "conv", in_width, out_width, module.kernel_size, module.stride,
                           in_width if module.depthwise else 1, out_hw, module.bias is not None)
        return [shape], out_width, out_hw
    if isinstance(module, APSBatchNorm2d):
        return [LayerShape(path, "bn", in_width, in_width, bias=module.bns[0].affine)], in_width, hw
    if isinstance(module, (APSLinear, nn.Linear)):
        out = module.out_features
        return [LayerShape(path, "linear", in_width, out, bias=module.bias is not None)], out, (1, 1)
    if isinstance(module, nn.Sequential):
        return chain_shapes(module.named_children(), path, in_width, hw, resolve)
    if isinstance(module, Part):
        return module.shapes(path, in_width, hw, resolve)
    if isinstance(module, nn.MaxPool2d):
        k, s, p, d = (_pair(v) for v in
                      (module.kernel_size, module.stride, module.padding, module.dilation))
        if module.ceil_mode:
            raise TypeError(f"{path}: MaxPool2d(ceil_mode=True) is not supported by the cost model")
        return [], in_width, tuple(_conv_out(*args) for args in zip(hw, k, s, p, d))
    if isinstance(module, nn.AdaptiveAvgPool2d):
        return [], in_width, _pair(module.output_size)
    if isinstance(module, WIDTH_PRESERVING):
        return [], in_width, hw
    raise TypeError(f"cannot cost {type(module).__name__} at {path!r}: a supernet part must be an "
                    f"APS layer, nn.Sequential, nn.Linear, a width-preserving module or a Part")


def export_chain(children: Iterable[tuple[str, nn.Module]], path: str, in_width: int,
                 resolve: Resolve) -> "tuple[OrderedDict[str, nn.Module], int]":
    """:func:`export_part` of modules applied one after the other: ``{name: static}`` and the
    output width."""
    static: OrderedDict[str, nn.Module] = OrderedDict()
    for name, child in children:
        static[name], in_width = export_part(child, _join(path, name), in_width, resolve)
    return static, in_width


def chain_shapes(children: Iterable[tuple[str, nn.Module]], path: str, in_width: int, hw: HW,
                 resolve: Resolve) -> tuple[list[LayerShape], int, HW]:
    """:func:`part_shapes` of modules applied one after the other."""
    shapes: list[LayerShape] = []
    for name, child in children:
        inner, in_width, hw = part_shapes(child, _join(path, name), in_width, hw, resolve)
        shapes += inner
    return shapes, in_width, hw


def reinitialise(module: nn.Module) -> nn.Module:
    """Fresh weights for retraining from scratch, in place: He-normal (fan-out) convs, unit
    batch-norm scale with zero shift and cleared statistics, ``N(0, 0.01)`` linear weights with
    zero bias (the initialisation of the reference ResNet and MobileNet-v2 recipes)."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            m.reset_parameters()
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0.0, 0.01)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    return module
