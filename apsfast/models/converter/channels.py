"""Reading a traced graph for which channels are coupled: the rules of every known op.

One pass over the nodes in forward order gives every value a layout (see
:mod:`apsfast.models.converter.groups`): convs start new groups, element-wise ops merge their
operands' groups, a concatenation along the channels concatenates layouts, depthwise convs,
batch norm, activations and pooling pass their input's layout on. An op without a rule is never
guessed at: it is *pinned* — the channels it reads keep their widths and what it returns is a
new fixed group — so the supernet stays exact and searches the rest; each pinned op is
listed (``Analysis.pinned``) and :func:`apsfast.convert` warns with that list.
"""
from __future__ import annotations

import math
import operator
from typing import Any, Optional, Sequence

import torch
from torch import fx, nn

from apsfast.models.converter.channels_last import ChannelsLastRules
from apsfast.models.converter.groups import Analysis, Groups, LayerPlan, Layout, same_structure
from apsfast.models.converter.known_ops import (CAT_FUNCTIONS, CONSTANT, CONVS, ELEMENTWISE_FUNCTIONS,
                                               ELEMENTWISE_METHODS, PER_SAMPLE_NAMES, PERMUTES, PINNED, REDUCTIONS,
                                               RESHAPES, SIZE_QUERIES, SIZED_RESHAPES, UNARY_FUNCTIONS, UNARY_METHODS,
                                               WIDTH_PRESERVING_MODULES)
from apsfast.models.converter.rewrite import StandardisedConv2d
from apsfast.models.converter.trace import SCOPE, shape_of

#: The most searched groups one layer's concatenated input may hold (see ``_fix_long_concatenations``).
MAX_SEARCHED_SEGMENTS = 2


def refuse(node: fx.Node, op: str, why: str) -> None:
    """Raise the one ``ValueError`` of an op convert cannot follow: the node, the op, the
    submodule, and how to proceed."""
    scope = node.meta.get(SCOPE, "")
    hint = (f"pass exclude=[{scope!r}] to keep that submodule fixed and opaque (its widths are not "
            f"searched)" if scope else "move it into a submodule and pass that submodule's name "
            "in exclude=, or rewrite it")
    raise ValueError(f"convert: cannot follow the channels through node {node.name!r} ({op}) in "
                     f"module {scope or '(top level)'!r}: {why}; {hint}")


def _op_name(node: fx.Node) -> str:
    target = node.target
    name = target if isinstance(target, str) else getattr(target, "__name__", repr(target))
    return f"{node.op} {name}"


def _tensor_args(node: fx.Node) -> list[fx.Node]:
    found: list[fx.Node] = []
    fx.node.map_arg((node.args, node.kwargs), lambda n: found.append(n) or n)
    return found


class ChannelAnalyser(ChannelsLastRules):
    """One forward-order pass over ``module``'s graph; :meth:`run` returns the
    :class:`Analysis`. ``exclude``: qualified names of the opaque leaves."""

    def __init__(self, module: fx.GraphModule, exclude: Sequence[str]) -> None:
        self.module = module
        self.exclude = set(exclude)
        self.result = Analysis(Groups())
        self.groups = self.result.groups
        self.layouts: dict[fx.Node, Any] = {}
        self._flat: dict[fx.Node, tuple[Layout, tuple[int, int]]] = {}  # C×H×W flattened: (channels, (H, W))
        self._last: set[fx.Node] = set()  # values permuted to channels-last (N, H, W, C)
        self._called: set[str] = set()

    def run(self) -> Analysis:
        for node in self.module.graph.nodes:
            self.layouts[node] = getattr(self, f"_{node.op}")(node)
        self._fix_long_concatenations()
        return self.result

    def _fix_long_concatenations(self) -> None:
        """A layer reading a concatenation of more than :data:`MAX_SEARCHED_SEGMENTS` searched
        groups would need one input transform per *total* width of its segments, and their
        number and meta width grow with every segment (65 totals and a meta width of 49,920
        for DenseNet-121's transition3: 126 GiB in all): such groups keep their widths
        (DenseNet's growth, GoogLeNet's branch outputs), while the widths inside each block
        (DenseNet's bottlenecks) are still searched."""
        for plan in self.result.layers:
            searched = {self.groups.find(g) for g in plan.inputs if not self.groups.is_fixed(g)}
            if len(searched) > MAX_SEARCHED_SEGMENTS:
                self.groups.fix(searched)
                self.result.pinned.append(f"{plan.path} reads a concatenation of {len(searched)} searched "
                                          f"groups; they keep their widths (at most {MAX_SEARCHED_SEGMENTS} "
                                          f"are searched together)")

    # --- node kinds ----------------------------------------------------------------------

    def _placeholder(self, node: fx.Node) -> Layout:
        return (self.groups.new(shape_of(node)[1], "input", fixed=True),)

    def _get_attr(self, node: fx.Node) -> Any:
        return CONSTANT if shape_of(node) is not None else None

    def _output(self, node: fx.Node) -> None:
        for arg in _tensor_args(node):  # the network's outputs keep their widths
            if isinstance(self.layouts.get(arg), tuple):
                self.groups.fix(self.layouts[arg])

    def _call_module(self, node: fx.Node) -> Any:
        module = self.module.get_submodule(node.target)
        if node.target in self.exclude or (type(module) in CONVS and module.padding_mode != "zeros"):
            return self._opaque(node)  # APS convs pad with zeros only
        if type(module) is StandardisedConv2d and module.groups != 1:
            self.result.pinned.append(f"call_module {node.target}: a standardised conv with groups="
                                      f"{module.groups} has no APS form; kept as traced")
            return self._opaque(node)
        if type(module) in (*CONVS, nn.BatchNorm2d, nn.Linear):
            if node.target in self._called:
                refuse(node, f"{type(module).__name__} {node.target}", "the module is called more than "
                       "once; convert needs one call per conv, batch-norm and linear module")
            self._called.add(node.target)
        if node.args and node.args[0] in self._last:
            return self._channels_last_module(node, module)
        if type(module) in CONVS:
            return self._conv(node, module)
        if type(module) is nn.BatchNorm2d:
            layout = self._unary(node)
            self._plan(node, "bn", layout, layout)
            return layout
        if type(module) is nn.Linear:
            return self._linear(node, module)
        if isinstance(module, nn.Flatten):
            return self._reshape(node, rewrite=False)
        if isinstance(module, WIDTH_PRESERVING_MODULES):
            return self._unary(node)
        # A torch layer without a channel rule (LayerNorm, ChannelShuffle, Conv1d …): opaque, as
        # if excluded: its widths stay and its layers are costed as traced.
        self.result.pinned.append(f"call_module {node.target}: {type(module).__name__} has no channel rule; "
                                  f"kept as traced")
        return self._opaque(node)

    def _call_function(self, node: fx.Node) -> Any:
        return self._call(node, node.target)

    def _call_method(self, node: fx.Node) -> Any:
        return self._call(node, node.target)

    def _call(self, node: fx.Node, op: Any) -> Any:
        if op in SIZE_QUERIES or (shape_of(node) is None and not any(
                isinstance(self.layouts.get(a), tuple) or self.layouts.get(a) is CONSTANT
                for a in _tensor_args(node))):
            return None  # arithmetic on sizes and other values without channels
        if any(self.layouts.get(a) is PINNED for a in _tensor_args(node)):
            return self._pin(node, "it reads the result of an op without a channel rule")
        if op in PERMUTES:
            return self._permute(node)
        if any(a in self._last for a in _tensor_args(node)):
            return self._channels_last(node, op)
        if op in UNARY_FUNCTIONS or op in UNARY_METHODS or getattr(op, "__name__", None) in PER_SAMPLE_NAMES:
            return self._unary(node)
        if op in ELEMENTWISE_FUNCTIONS or op in ELEMENTWISE_METHODS:
            return self._elementwise(node, [a for a in node.args[:2]])
        if op in CAT_FUNCTIONS:
            return self._cat(node)
        if op in RESHAPES:
            return self._reshape(node, rewrite=op in SIZED_RESHAPES)
        if op in REDUCTIONS:
            return self._reduce(node)
        if op is operator.getitem:
            return self._getitem(node)
        return self._pin(node, "the op is not in convert's table of known channel rules")

    def _pin(self, node: fx.Node, why: str) -> Any:
        """An op convert has no rule for keeps every width it touches: the channels it reads are
        fixed and what it returns is a new fixed group (an op with all its inputs at their
        original widths computes what it computed in the original model). Recorded, one line."""
        for arg in _tensor_args(node):
            if isinstance(self.layouts.get(arg), tuple):
                self.groups.fix(self.layouts[arg])
        scope = node.meta.get(SCOPE, "")
        self.result.pinned.append(f"{_op_name(node)} (node {node.name!r} in module {scope or '(top level)'!r}): {why}")
        out = shape_of(node)
        if out is None:
            return PINNED
        return (self.groups.new(out[1], node.name, fixed=True),) if len(out) >= 2 else PINNED

    # --- rules ---------------------------------------------------------------------------

    def _input_layout(self, node: fx.Node) -> Layout:
        source = node.args[0]
        layout = self.layouts.get(source)
        if not isinstance(layout, tuple):
            refuse(node, _op_name(node), "its input carries no channel layout convert knows")
        return layout

    def _unary(self, node: fx.Node) -> Layout:
        if self.layouts.get(node.args[0]) is CONSTANT:
            return CONSTANT  # e.g. sigmoid of a learned per-channel scale
        layout = self._input_layout(node)
        before, after = shape_of(node.args[0]), shape_of(node)
        if after is None or len(after) < 2 or after[1] != before[1]:
            return self._pin(node, f"it maps shape {tuple(before)} to "
                             f"{None if after is None else tuple(after)}, not keeping the channel dim")
        if node.args[0] in self._flat:  # dropout or an activation between a flatten and a linear layer
            self._flat[node] = self._flat[node.args[0]]
        return layout

    def _plan(self, node: fx.Node, kind: str, inputs: Layout, outputs: Layout, groups: int = 1) -> None:
        out = shape_of(node)
        hw = tuple(out[2:]) if kind not in ("bn", "linear") else (1, 1)
        self.result.layers.append(LayerPlan(node.target, kind, inputs, outputs, hw, groups))

    def _conv(self, node: fx.Node, conv: nn.Conv2d) -> Layout:
        layout = self._input_layout(node)
        g = conv.groups
        if g == 1:
            out = (self.groups.new(conv.out_channels, node.target),)
            self._plan(node, "conv", layout, out)
        elif g == conv.in_channels == conv.out_channels:
            out = layout  # one filter per channel: the output follows the input
            self._plan(node, "depthwise", layout, out, g)
        else:
            self._align_groups(layout, g)
            out = (self.groups.new(conv.out_channels, node.target, divisor=g),)
            self._plan(node, "grouped", layout, out, g)
        return out

    def _align_groups(self, layout: Layout, g: int) -> None:
        """Keep a grouped conv's input splittable into ``g`` equal groups at every width."""
        if len(layout) == 1:
            self.groups.require_divisor(layout[0], g)
            return
        k, rest = divmod(len(layout), g)
        chunks = [layout[j * k:(j + 1) * k] for j in range(g)] if k else []
        if rest or not all(same_structure(chunks[0], c, self.groups) for c in chunks):
            self.groups.fix(layout)  # the group boundaries cut through segments
            return
        for chunk in chunks[1:]:  # segment s of every group must keep one width
            for a, b in zip(chunks[0], chunk):
                self.groups.union(a, b)

    def _linear(self, node: fx.Node, linear: nn.Linear) -> Layout:
        layout = self._input_layout(node)
        if node.args[0] in self._flat:  # searched by its channels, each position sharing them
            channels, spatial = self._flat[node.args[0]]
            out = (self.groups.new(linear.out_features, node.target, fixed=True),)
            self.result.layers.append(LayerPlan(node.target, "flat_linear", channels, out, spatial))
            return out
        if len(shape_of(node.args[0])) != 2:  # over tokens (channels last): kept as traced
            self.result.pinned.append(f"call_module {node.target}: Linear over a tensor of "
                                      f"{len(shape_of(node.args[0]))} dims; kept as traced")
            return self._opaque(node)
        out = (self.groups.new(linear.out_features, node.target, fixed=True),)
        self._plan(node, "linear", layout, out)
        return out

    def _opaque(self, node: fx.Node) -> Optional[Layout]:
        """An excluded leaf: what it reads and writes keeps its width."""
        for arg in _tensor_args(node):
            if isinstance(self.layouts.get(arg), tuple):
                self.groups.fix(self.layouts[arg])
        self.result.opaque.append(node.target)
        out = shape_of(node)
        return (self.groups.new(out[1], node.target, fixed=True),) if out is not None and len(out) >= 2 else None

    def _elementwise(self, node: fx.Node, operands: list[Any]) -> Layout:
        """Broadcasting operands that span the channel dim must share its layout."""
        out = shape_of(node)
        if out is None or len(out) < 2:
            return self._pin(node, "an element-wise op whose result has no channel dim")
        coupled: list[Layout] = []
        pinned = False  # an operand with per-channel values convert cannot resize
        for arg in operands:
            shape = shape_of(arg)
            if shape is None:
                continue  # a Python number
            k = 1 - (len(out) - len(shape))  # the operand's dim aligned with the channels
            if k < 0 or (shape[k] == 1 and out[1] != 1):
                continue  # broadcast over the channels
            layout = self.layouts.get(arg)
            if k == 1 and isinstance(layout, tuple):
                coupled.append(layout)
            else:
                pinned = True
        if not coupled:
            return (self.groups.new(out[1], node.name, fixed=True),)
        return self._couple(coupled, fix=pinned)

    def _couple(self, layouts: list[Layout], fix: bool = False) -> Layout:
        first = layouts[0]
        if fix or not all(same_structure(first, other, self.groups) for other in layouts):
            for layout in layouts:  # segments that do not line up: keep every width
                self.groups.fix(layout)
            return first
        for other in layouts[1:]:
            for a, b in zip(first, other):
                self.groups.union(a, b)
        return first

    def _cat(self, node: fx.Node) -> Layout:
        tensors = node.args[0] if node.args else node.kwargs["tensors"]
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
        out = shape_of(node)
        if out is None or len(out) < 2:
            return self._pin(node, "a concatenation whose result has no channel dim")
        if dim % len(out) != 1:
            return self._elementwise(node, list(tensors))  # along another dim: channels meet
        layout: Layout = ()
        for t in tensors:
            part = self.layouts.get(t)
            if not isinstance(part, tuple):  # a constant block of channels
                part = (self.groups.new(shape_of(t)[1], node.name, fixed=True),)
            layout += part
        return layout

    def _reshape(self, node: fx.Node, rewrite: bool) -> Optional[Layout]:
        if self.layouts.get(node.args[0]) is CONSTANT:
            return CONSTANT  # e.g. a per-channel parameter viewed as [1, C, 1, 1]
        layout = self._input_layout(node)
        before, after = shape_of(node.args[0]), shape_of(node)
        if len(after) >= 2 and after[:2] == before[:2]:
            how = self._rewrite(before, after) if rewrite else None
            if rewrite and how is None:
                return self._pin(node, f"it reshapes the spatial dims of {tuple(before)} to {tuple(after)} "
                                 f"in a way convert does not follow (e.g. a space-to-depth)")
            if how is not None:  # read the channel count from the live tensor, not the traced sizes
                self.result.reshapes[node.name] = how
            return layout
        if len(after) == 2 and after[0] == before[0] and after[1] == math.prod(before[1:]):
            # Channels flattened with the spatial dims (before a linear layer): channel c fills
            # features c·HW … (c+1)·HW-1, so the first c of them are the first c·HW features.
            # Its layout repeats the channel layout HW times (what element-wise ops see); a
            # linear layer reading it is searched by the channels (see _linear).
            if rewrite:
                self.result.reshapes[node.name] = ("merge",)
            if len(before) == 4:
                self._flat[node] = (layout, (before[2], before[3]))
            return layout * math.prod(before[2:])
        return self._pin(node, f"it reshapes {tuple(before)} to {tuple(after)}, splitting or merging "
                         f"the channel dim (e.g. a channel shuffle)")

    @staticmethod
    def _rewrite(before: torch.Size, after: torch.Size) -> Optional[tuple]:
        """How :func:`~apsfast.models.converter.layers.channel_view` redoes a reshape keeping
        ``(N, C)``; ``None`` for one it does not follow."""
        if after[2:] == before[2:]:
            return ("same",)
        if math.prod(after[2:]) == 1 and math.prod(before[2:]) == 1:
            return ("ones", len(after) - 2)
        if len(after) == 3:
            return ("flat",)
        return None

    def _reduce(self, node: fx.Node) -> Optional[Layout]:
        layout = self._input_layout(node)
        before, after = shape_of(node.args[0]), shape_of(node)
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        dims = {d % len(before) for d in ((dim,) if isinstance(dim, int) else (dim or range(len(before))))}
        keep = node.kwargs.get("keepdim", len(node.args) > 2 and node.args[2])
        if 1 in dims:  # a reduction over the channels works at any width
            return (self.groups.new(after[1], node.name, fixed=True),) if len(after) >= 2 else None
        if 0 in dims and not keep:
            return self._pin(node, "it reduces the batch dim, moving the channel dim")
        return layout

    def _getitem(self, node: fx.Node) -> Optional[Layout]:
        source = node.args[0]
        if shape_of(source) is None:  # an item of a tuple (sizes, an opaque leaf's outputs)
            if shape_of(node) is not None and len(shape_of(node)) >= 2:
                if not (source.op == "call_module" and source.target in self.result.opaque) \
                        and self.layouts.get(source) is not PINNED:
                    return self._pin(node, "an item of a tuple of tensors convert cannot follow")
                return (self.groups.new(shape_of(node)[1], node.name, fixed=True),)
            return None
        index = node.args[1] if isinstance(node.args[1], tuple) else (node.args[1],)
        whole = slice(None, None, None)
        if len(index) >= 2 and index[0] == whole and (index[1] == whole or self._covers(index[1], shape_of(source)[1])):
            return self._input_layout(node)  # indexes spatial dims only (GhostNet's x[:, :C] of C channels)
        return self._pin(node, "it indexes the batch or channel dim")

    @staticmethod
    def _covers(index: Any, size: int) -> bool:
        """Whether ``index`` is a slice taking all ``size`` elements, in order."""
        if not isinstance(index, slice) or index.step not in (None, 1):
            return False
        return index.start in (None, 0) and (index.stop is None or (isinstance(index.stop, int) and index.stop >= size))
