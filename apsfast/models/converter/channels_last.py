"""The channel rules of channels-last values: ConvNeXt's block (permute, LayerNorm, Linear,
activation, Linear, permute back) read as a channel-first block whose linear layers are 1×1
convs over the tokens."""
from __future__ import annotations

import math
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import fx, nn

from apsfast.models.converter.groups import LayerPlan, Layout
from apsfast.models.converter.known_ops import (FROM_LAST, PER_SAMPLE_NAMES, PINNED, TO_LAST, UNARY_FUNCTIONS,
                                               UNARY_METHODS, WIDTH_PRESERVING_MODULES)
from apsfast.models.converter.trace import shape_of


class ChannelsLastRules:
    """The rules of :class:`~apsfast.models.converter.channels.ChannelAnalyser` for a value
    permuted to channels-last ``(N, H, W, C)``: the analyser's ``_last`` holds those values, its
    ``_pin`` and ``_opaque`` keep the widths of what no rule follows."""

    def _permute(self, node: fx.Node) -> Any:
        source = node.args[0]
        dims = node.args[1:] if len(node.args) > 2 else node.args[1] if len(node.args) > 1 else node.kwargs["dims"]
        before = shape_of(source)
        dims = tuple(d % len(before) for d in dims) if before is not None else tuple(dims)
        if isinstance(self.layouts.get(source), tuple) and len(before) == 4:
            if source not in self._last and dims == TO_LAST:
                self._last.add(node)
                return self.layouts[source]
            if source in self._last and dims == FROM_LAST:
                return self.layouts[source]
        return self._pin(node, f"it permutes the dims to {dims}; convert follows channels-last {TO_LAST} "
                         f"and back {FROM_LAST} only")

    def _same_shape(self, node: fx.Node) -> bool:
        return shape_of(node) is not None and shape_of(node) == shape_of(node.args[0])

    def _last_layout(self, node: fx.Node) -> Layout:
        """The layout of a channels-last value passed on unchanged (an activation, dropout)."""
        self._last.add(node)
        return self.layouts[node.args[0]]

    def _layer_norm(self, node: fx.Node, normalized_shape: Sequence[int]) -> Any:
        """A layer norm over the channels of a channels-last value normalises across all of
        them: their width stays (as a batch norm's would not need), what it returns has the
        same channels."""
        if tuple(normalized_shape) != (shape_of(node.args[0])[-1],) or not self._same_shape(node):
            return self._pin_last(node, f"a layer norm over {tuple(normalized_shape)}, not the channels")
        self.groups.fix(self.layouts[node.args[0]])
        return self._last_layout(node)

    def _channels_last(self, node: fx.Node, op: Any) -> Any:
        """A function or method reading a channels-last value: the channel dim is the last."""
        if op in UNARY_FUNCTIONS or op in UNARY_METHODS or getattr(op, "__name__", None) in PER_SAMPLE_NAMES:
            if self._same_shape(node) and op not in (F.softmax, F.log_softmax, torch.softmax, torch.log_softmax,
                                                     "softmax", "log_softmax"):
                return self._last_layout(node)
        if op is F.layer_norm and len(node.args) > 1:
            return self._layer_norm(node, node.args[1])
        return self._pin_last(node, "convert follows a channels-last value through activations, a layer norm "
                              "and linear layers only")

    def _channels_last_module(self, node: fx.Node, module: nn.Module) -> Any:
        """A module reading a channels-last value."""
        if type(module) is nn.Linear:  # a 1×1 conv over the tokens: its output is a new group
            out = shape_of(node)
            layout = (self.groups.new(module.out_features, node.target),)
            self.result.layers.append(LayerPlan(node.target, "token_linear", self.layouts[node.args[0]], layout,
                                                (math.prod(out[1:-1]), 1)))
            self._last.add(node)
            return layout
        if type(module) is nn.LayerNorm:
            return self._layer_norm(node, module.normalized_shape)
        if isinstance(module, WIDTH_PRESERVING_MODULES) and not isinstance(module, nn.Softmax) \
                and self._same_shape(node) and not isinstance(module, (nn.MaxPool2d, nn.AvgPool2d,
                                                                     nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)):
            return self._last_layout(node)
        self.result.pinned.append(f"call_module {node.target}: {type(module).__name__} on a channels-last "
                                  f"value has no channel rule; kept as traced")
        return self._opaque(node)

    def _pin_last(self, node: fx.Node, why: str) -> Any:
        """:meth:`_pin` for an op reading a channels-last value: a same-shaped result stays
        channels-last (a new fixed group of its last dim)."""
        self._pin(node, why)
        out = shape_of(node)
        if out is None or len(out) != 4 or out != shape_of(node.args[0]):
            return PINNED if out is None else (self.groups.new(out[1], node.name, fixed=True),)
        self._last.add(node)
        return (self.groups.new(out[-1], node.name, fixed=True),)
