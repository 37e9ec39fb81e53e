"""Channel groups: sets of channel dimensions that must keep one width, found by union-find.

Every conv creates a group (its output channels); an operation that makes two tensors'
channels meet element by element (a residual addition, a squeeze-excitation gate) merges
their groups. A value's channels are described by its *layout*: the groups of its
contiguous channel segments in order (one segment for most values, several after a
concatenation along the channels). After the whole graph is read, every group that is not
fixed becomes one searched decision. The channel analysis
(:mod:`apsfast.models.converter.channels`) returns them as an :class:`Analysis`: the groups and
the :class:`LayerPlan` of every conv, batch-norm and linear layer.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterable, Optional, Sequence

Layout = tuple[int, ...]


class Groups:
    """Union-find over channel groups, each with its original width and constraints.

    ``fixed`` groups keep their width (the network input, the classifier's outputs, whatever
    an opaque module reads or writes); ``divisor`` is the number of conv groups that must
    divide every candidate width.
    """

    def __init__(self) -> None:
        self._parent: list[int] = []
        self._width: list[int] = []
        self._fixed: list[bool] = []
        self._divisor: list[int] = []
        self._name: list[str] = []

    def new(self, width: int, name: str, *, fixed: bool = False, divisor: int = 1) -> int:
        """A new group of ``width`` channels first produced by ``name``; returns its id."""
        self._parent.append(len(self._parent))
        self._width.append(int(width))
        self._fixed.append(fixed)
        self._divisor.append(divisor)
        self._name.append(name)
        return len(self._parent) - 1

    def find(self, group: int) -> int:
        """The representative of ``group``'s set."""
        root = group
        while self._parent[root] != root:
            root = self._parent[root]
        while self._parent[group] != root:  # path compression
            self._parent[group], group = root, self._parent[group]
        return root

    def union(self, a: int, b: int) -> None:
        """Merge the sets of ``a`` and ``b``; the older group (created first) stays the root,
        so a merged set keeps the name of its first producer in forward order."""
        a, b = self.find(a), self.find(b)
        if a == b:
            return
        if self._width[a] != self._width[b]:
            raise RuntimeError(f"internal: coupled groups of widths {self._width[a]} and {self._width[b]}")
        a, b = min(a, b), max(a, b)
        self._parent[b] = a
        self._fixed[a] = self._fixed[a] or self._fixed[b]
        self._divisor[a] = math.lcm(self._divisor[a], self._divisor[b])

    def fix(self, groups: Iterable[int]) -> None:
        """Keep the width of every set in ``groups``."""
        for g in groups:
            self._fixed[self.find(g)] = True

    def require_divisor(self, group: int, divisor: int) -> None:
        """Every candidate width of ``group``'s set must be a multiple of ``divisor``."""
        root = self.find(group)
        self._divisor[root] = math.lcm(self._divisor[root], divisor)

    def is_fixed(self, group: int) -> bool:
        return self._fixed[self.find(group)]

    def width(self, group: int) -> int:
        return self._width[self.find(group)]

    def name(self, group: int) -> str:
        return self._name[self.find(group)]

    def roots(self) -> list[int]:
        """Every set's representative, in creation (forward) order."""
        return [g for g in range(len(self._parent)) if self.find(g) == g]

    def candidates(self, group: int, ratios: Sequence[float], round_to: int) -> tuple[int, ...]:
        """The candidate widths of ``group``'s set: each ratio times its width, rounded to a
        multiple of ``round_to`` (and of its divisor), at least that multiple and at most the
        width, plus the width itself (the candidate of ratio 1). One candidate (the width) if the set is fixed or
        narrower than that multiple."""
        root = self.find(group)
        width = self._width[root]
        unit = math.lcm(round_to, self._divisor[root])
        if self._fixed[root] or width < unit:
            return (width,)
        # A ratio of 1 is the original width itself, not its rounding (16 with round_to=3
        # would otherwise give both 15 and 16).
        return tuple(sorted({min(width, max(unit, math.floor(r * width / unit + 0.5) * unit))
                             for r in ratios if r < 1} | {width}))


def layout_widths(layout: Layout, groups: Groups, candidates: dict[int, tuple[int, ...]]) -> tuple[int, ...]:
    """Every total width a value with ``layout`` can have (ascending): the sums over its
    segments of their groups' candidates, a group counted once per segment it fills."""
    counts: dict[int, int] = {}
    for g in layout:
        root = groups.find(g)
        counts[root] = counts.get(root, 0) + 1
    sums = {0}
    for root, times in counts.items():
        sums = {s + times * c for s in sums for c in candidates[root]}
    return tuple(sorted(sums))


def layout_width(layout: Layout, groups: Groups, chosen: dict[int, int]) -> int:
    """The total width of a value with ``layout`` when each set's width is ``chosen[root]``."""
    return sum(chosen[groups.find(g)] for g in layout)


def same_structure(a: Optional[Layout], b: Optional[Layout], groups: Groups) -> bool:
    """Whether two layouts have segments of equal widths in the same order (so that coupling
    them segment by segment is possible)."""
    return a is not None and b is not None and len(a) == len(b) and all(
        groups.width(x) == groups.width(y) for x, y in zip(a, b))


@dataclass
class LayerPlan:
    """A conv, batch-norm or linear module of the graph and the layouts it reads and writes.

    ``kind``: ``"conv"`` (dense), ``"depthwise"`` (output follows input), ``"grouped"``
    (``groups`` > 1, not depthwise), ``"bn"``, ``"linear"``, ``"flat_linear"`` (a linear
    layer reading a flattened ``C×H×W`` map: ``inputs`` is the channel layout and ``out_hw``
    the map's ``(H, W)``, the kernel of the conv it is), or ``"token_linear"`` (a linear layer
    over a channels-last map, a 1×1 conv in effect: ``out_hw`` is ``(H·W, 1)``, its tokens).
    """

    path: str
    kind: str
    inputs: Layout
    outputs: Layout
    out_hw: tuple[int, int]
    groups: int = 1


@dataclass
class Analysis:
    """What the graph says about the channels: the groups, the layers, the reshapes that
    must read the live channel count, and the opaque leaves (fixed, costed as traced)."""

    groups: Groups
    layers: list[LayerPlan] = field(default_factory=list)
    reshapes: dict[str, tuple] = field(default_factory=dict)
    opaque: list[str] = field(default_factory=list)
    pinned: list[str] = field(default_factory=list)  # the ops without a channel rule, one line each
