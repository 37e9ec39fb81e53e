"""The supernet: a network of APS layers plus the architecture encoding every tool shares.

An architecture (``arch``) is a list of candidate indices, one per decision, in the order of
:meth:`Supernet.decisions` (the order in which the forward pass first uses each width, which
is also the order in which the controller emits them). A decision sets the output width of
one or more APS convs; every other width follows from the input's channel count.
"""
from __future__ import annotations

import json
import numbers
from collections import OrderedDict
from typing import Any, Mapping, NamedTuple, Optional, Sequence, Union

import torch
from torch import nn

from apsfast import _checks
from apsfast.models.cost import LayerShape
from apsfast.models.static import export_part, part_shapes, reinitialise
from apsfast.nn import APSConv2d, APSLayer, CandidateTransforms, prebuild_kernels

Arch = list[int]
COST_CACHE_SIZE = 4096  # archs whose (MACs, params) a supernet remembers, and their kernel plans


class Decision(NamedTuple):
    """One searched width: its name and its candidate widths (ascending)."""

    name: str
    widths: tuple[int, ...]


class DecisionSpace:
    """Collects a supernet's decisions while its builder creates the layers.

    ``overrides`` (``{decision name: widths}``) replaces the default candidate set of the named
    decisions; a name that no decision has is an error listing the valid names.
    """

    def __init__(self, overrides: Optional[Mapping[str, Sequence[int]]] = None) -> None:
        if overrides is not None and not isinstance(overrides, Mapping):
            raise TypeError(f"layer_widths must be a mapping {{decision name: widths}} or None, "
                            f"got {type(overrides).__name__}")
        self._overrides = dict(overrides or {})
        self.decisions: list[Decision] = []
        self.standard: list[int] = []
        self.layers: dict[str, list[str]] = {}

    def add(self, name: str, widths: Sequence[int], standard: int) -> tuple[int, ...]:
        """Declare decision ``name`` (candidates ``widths`` unless overridden; ``standard`` is
        the standard network's width there) and return its candidate widths."""
        if name in self.layers:
            raise ValueError(f"decision {name!r} declared twice")
        chosen = _checks.widths(f"layer_widths[{name!r}]" if name in self._overrides else "widths",
                                self._overrides.get(name, widths))
        self.decisions.append(Decision(name, chosen))
        self.standard.append(standard)
        self.layers[name] = []
        return chosen

    def drive(self, name: str, path: str) -> None:
        """Let decision ``name`` set the output width of the APS conv at ``path``."""
        self.layers[name].append(path)

    def check_overrides(self) -> None:
        unknown = sorted(set(self._overrides) - set(self.layers))
        if unknown:
            raise ValueError(f"layer_widths names unknown decisions {unknown}; the decisions are "
                             f"{[d.name for d in self.decisions]}")


def scaled(base: Sequence[int], standard: int, reference: int) -> tuple[int, ...]:
    """``base`` (candidates around the ``reference`` width) scaled to a layer whose standard
    width is ``standard``: the paper's "increase candidate channels after each down-sampling
    layer according to the default expansion rates"."""
    return _checks.widths("widths", [round(w * standard / reference) for w in base])


class Supernet(nn.Sequential):
    """A searchable network: its parts run in order, like ``nn.Sequential``.

    Build one with :func:`apsfast.models.build`. The forward pass runs the architecture last
    given to :meth:`set_arch` (initially :meth:`max_arch`). It first builds every candidate
    kernel the architecture needs in one grouped call (:func:`apsfast.nn.prebuild_kernels`:
    one op and one autograd node for the network instead of one per layer, the per-layer
    host cost that dominates a small step); ``grouped_kernels = False`` lets each layer build
    its own, as a layer used alone does. Both compute the same kernels.

    Its structure is fixed once built: its modules and APS layers are listed once, on first
    use (:meth:`module_list`, :meth:`aps_layers`), since walking them costs a small step
    more host time than its arithmetic. Replace its modules only before its first forward.

    Attributes:
        name: the registered model name.
        input_size: the input resolution its FLOPs are counted at.
        options: the build options (JSON-serialisable), recorded in :meth:`arch_to_json`.
    """

    def __init__(self, name: str, parts: "OrderedDict[str, nn.Module]", space: DecisionSpace,
                 input_size: int, in_channels: int = 3) -> None:
        super().__init__(parts)
        space.check_overrides()
        self.name = name
        self.input_size = _checks.positive_int("input_size", input_size)
        self.in_channels = in_channels
        self.options: dict[str, Any] = {}
        self._decisions = tuple(space.decisions)
        self._standard = tuple(space.standard)
        self._layer_paths = tuple(tuple(space.layers[d.name]) for d in self._decisions)
        # The layers each decision sets (plain references, not registered twice): set_arch
        # runs every step, so it must not look them up by path.
        self._driven = [[self.get_submodule(p) for p in paths] for paths in self._layer_paths]
        self._check_wiring()
        self._costs: dict[tuple[int, tuple[int, ...]], tuple[int, int]] = {}
        self._plans: dict[tuple[int, ...], list[tuple[APSLayer, int]]] = {}
        self._aps_paths: Optional[dict[str, APSLayer]] = None
        self._aps_list: list[APSLayer] = []
        self._module_list: list[nn.Module] = []
        self._sides: list[CandidateTransforms] = []
        self.grouped_kernels = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.grouped_kernels and self._builds_kernels():
            prebuild_kernels(self.kernel_plan())
        return super().forward(x)

    def _builds_kernels(self) -> bool:
        """Whether a kernel is built this forward: some transform side is not an exact selection
        (else every kernel is a free slice of its meta-weight, as in warm-up, and the plan
        would cost a walk of the arch's layer shapes for nothing)."""
        self._aps_by_path()
        return not all(side.is_selection() for side in self._sides)

    def kernel_plan(self, arch: Optional[Sequence[int]] = None) -> list[tuple[APSLayer, int]]:
        """``(APS layer, input width)`` of every APS layer that ``arch`` (default: the
        current one) runs, in forward order; remembered per arch (from :meth:`layer_shapes`)."""
        key = tuple(self.arch if arch is None else self.check_arch(arch))
        if key not in self._plans:
            self._remember(key)
        return self._plans[key]

    def _remember(self, arch: tuple[int, ...]) -> None:
        """The kernel plan and the (MACs, params) of ``arch`` from one walk of its layer shapes:
        a search asks for both of every arch it samples, and the walk is the cost."""
        shapes = self.layer_shapes(arch)
        layers = self._aps_by_path()
        for cache, key, value in (
                (self._plans, arch, [(layers[s.name], s.in_channels) for s in shapes if s.name in layers]),
                (self._costs, (self.input_size, arch), (sum(s.macs for s in shapes), sum(s.params for s in shapes)))):
            if key not in cache and len(cache) >= COST_CACHE_SIZE:
                cache.pop(next(iter(cache)))  # the oldest
            cache[key] = value

    def _aps_by_path(self) -> dict[str, APSLayer]:
        """Every APS layer by its path, found once (a walk of every module costs more host
        time than a small step's transition): a supernet's structure is fixed once built."""
        if self._aps_paths is None:
            named = list(self.named_modules())
            self._module_list = [m for _, m in named]
            self._aps_paths = {path: m for path, m in named if isinstance(m, APSLayer)}
            self._aps_list = list(self._aps_paths.values())
            self._sides = [side for layer in self._aps_list for side in (layer.out_transforms, layer.in_transforms)
                           if side is not None]
        return self._aps_paths

    def aps_layers(self) -> list[APSLayer]:
        """Every APS layer, in ``modules()`` order (what :func:`apsfast.nn.aps_layers` gives for
        this network): the same list, found once."""
        self._aps_by_path()
        return self._aps_list

    def module_list(self) -> list[nn.Module]:
        """Every module, as ``list(modules())``: the same list, found once."""
        self._aps_by_path()
        return self._module_list

    def _check_wiring(self) -> None:
        """Every searchable conv is set by exactly one decision, over that decision's widths."""
        owner: dict[str, str] = {}
        for decision, paths, layers in zip(self._decisions, self._layer_paths, self._driven):
            if not paths:
                raise ValueError(f"decision {decision.name!r} sets no layer")
            for path, layer in zip(paths, layers):
                if not isinstance(layer, APSConv2d) or layer.out_widths != decision.widths:
                    raise ValueError(f"{path} is set by decision {decision.name!r} but is not an "
                                     f"APSConv2d with out_widths {decision.widths}")
                owner[path] = decision.name
        for path, layer in self.named_modules():
            if isinstance(layer, APSConv2d) and not layer.depthwise and len(layer.out_widths) > 1 \
                    and path not in owner:
                raise ValueError(f"{path} has out_widths {layer.out_widths} but no decision sets it")

    # --- the encoding --------------------------------------------------------------------

    def decisions(self) -> tuple[Decision, ...]:
        """The searched widths in order: ``(name, candidate widths)`` each."""
        return self._decisions

    def check_arch(self, arch: Sequence[int]) -> Arch:
        """``arch`` as a list of ints after checking its length and every index's range."""
        if isinstance(arch, torch.Tensor):
            arch = arch.tolist()
        if isinstance(arch, (str, bytes)) or not isinstance(arch, Sequence):
            raise TypeError(f"arch must be a sequence of {len(self._decisions)} candidate indices, "
                            f"got {type(arch).__name__}")
        if len(arch) != len(self._decisions):
            raise ValueError(f"arch must have {len(self._decisions)} entries (one per decision of "
                             f"{self.name}), got {len(arch)}")
        out = []
        for k, (index, decision) in enumerate(zip(arch, self._decisions)):
            if isinstance(index, bool) or not isinstance(index, numbers.Integral) \
                    or not 0 <= index < len(decision.widths):
                raise ValueError(f"arch[{k}] (decision {decision.name!r}, widths {decision.widths}) "
                                 f"must be an int in 0..{len(decision.widths) - 1}, got {index!r}")
            out.append(int(index))
        return out

    def set_arch(self, arch: Sequence[int]) -> None:
        """Make the forward pass run ``arch``."""
        arch = self.check_arch(arch)
        for index, layers in zip(arch, self._driven):
            for layer in layers:
                layer.select_out(index)  # a decision's widths are its layers' out_widths

    @property
    def arch(self) -> Arch:
        """The architecture the forward pass runs."""
        return [layers[0].active_out_index for layers in self._driven]

    def sample_uniform(self, generator: Optional[torch.Generator] = None) -> Arch:
        """An architecture with every decision drawn uniformly (warm-up sampling); does not set it."""
        return [int(torch.randint(len(d.widths), (), generator=generator)) for d in self._decisions]

    def max_arch(self) -> Arch:
        """The widest candidate everywhere."""
        return [len(d.widths) - 1 for d in self._decisions]

    def min_arch(self) -> Arch:
        """The narrowest candidate everywhere."""
        return [0] * len(self._decisions)

    def standard_arch(self) -> Arch:
        """The standard network's widths (e.g. 16/32/64 for CIFAR ResNets); where a decision
        lacks the standard width, its nearest candidate (the narrower on a tie)."""
        return [min(range(len(d.widths)), key=lambda a: (abs(d.widths[a] - s), a))
                for d, s in zip(self._decisions, self._standard)]

    def standard_widths(self) -> dict[str, int]:
        """``{decision name: width}`` of the standard network (which may lie outside the
        candidates, e.g. with custom ``widths``; :meth:`standard_arch` takes the nearest)."""
        return {d.name: s for d, s in zip(self._decisions, self._standard)}

    def widths(self, arch: Optional[Sequence[int]] = None) -> dict[str, int]:
        """``{decision name: width}`` of ``arch`` (default: the current one)."""
        arch = self.arch if arch is None else self.check_arch(arch)
        return {d.name: d.widths[a] for d, a in zip(self._decisions, arch)}

    def arch_to_json(self, arch: Optional[Sequence[int]] = None) -> str:
        """``arch`` as JSON: the model name and build options, the indices, the widths by
        decision name, and its MACs and parameters."""
        arch = self.arch if arch is None else self.check_arch(arch)
        return json.dumps({"model": self.name, "options": self.options, "arch": arch,
                           "widths": self.widths(arch), "flops": self.flops(arch),
                           "params": self.params(arch)})

    def arch_from_json(self, text: Union[str, Mapping[str, Any]]) -> Arch:
        """The architecture that :meth:`arch_to_json` wrote (or a bare JSON list of indices).

        Raises ``ValueError`` if it belongs to another model or its widths are not this
        supernet's candidates.
        """
        obj = json.loads(text) if isinstance(text, (str, bytes)) else text
        if isinstance(obj, list):
            return self.check_arch(obj)
        if not isinstance(obj, Mapping):
            raise TypeError(f"an architecture JSON must be an object or a list, got {type(obj).__name__}")
        if obj.get("model", self.name) != self.name:
            raise ValueError(f"the architecture is for model {obj['model']!r}, this supernet is {self.name!r}")
        if "widths" not in obj:
            if "arch" not in obj:
                raise ValueError("an architecture JSON needs 'arch' or 'widths'")
            return self.check_arch(obj["arch"])
        widths = obj["widths"]
        names = [d.name for d in self._decisions]
        if not isinstance(widths, Mapping) or sorted(widths) != sorted(names):
            raise ValueError(f"'widths' must name exactly the decisions {names}, got "
                             f"{sorted(widths) if isinstance(widths, Mapping) else widths!r}")
        arch = []
        for d in self._decisions:
            if widths[d.name] not in d.widths:
                raise ValueError(f"widths[{d.name!r}] = {widths[d.name]!r} is not a candidate {d.widths}")
            arch.append(d.widths.index(widths[d.name]))
        if "arch" in obj and list(obj["arch"]) != arch:
            raise ValueError(f"'arch' {obj['arch']} disagrees with 'widths' (which give {arch})")
        return arch

    # --- cost and export -----------------------------------------------------------------

    def _resolver(self, arch: Arch) -> dict[str, int]:
        return {path: d.widths[a] for d, a, paths in zip(self._decisions, arch, self._layer_paths)
                for path in paths}

    def layer_shapes(self, arch: Optional[Sequence[int]] = None) -> list[LayerShape]:
        """The conv, batch-norm and linear layers of ``export(arch)`` with their shapes, at
        ``input_size``; computed from the layer shapes, builds nothing."""
        arch = self.arch if arch is None else self.check_arch(arch)
        shapes, _, _ = part_shapes(self, "", self.in_channels, (self.input_size,) * 2, self._resolver(arch))
        return shapes

    def _cost(self, arch: Optional[Sequence[int]]) -> tuple[int, int]:
        """(MACs, params) of ``arch``, remembered: a search asks for the same archs again."""
        arch = tuple(self.arch if arch is None else self.check_arch(arch))
        key = (self.input_size, arch)
        if key not in self._costs:
            self._remember(arch)
        return self._costs[key]

    def flops(self, arch: Optional[Sequence[int]] = None) -> int:
        """Multiply-accumulates of one ``input_size`` image through ``export(arch)``: every
        conv (shortcut projections included) and the classifier; see :mod:`apsfast.models.cost`."""
        return self._cost(arch)[0]

    def params(self, arch: Optional[Sequence[int]] = None) -> int:
        """Learnable parameters of ``export(arch)``."""
        return self._cost(arch)[1]

    def export(self, arch: Optional[Sequence[int]] = None, inherit_weights: bool = True) -> nn.Sequential:
        """A plain static network (``nn.Conv2d``, ``nn.BatchNorm2d``, ``nn.Linear``) with the
        widths of ``arch``, with the same part names as this supernet.

        With ``inherit_weights`` its weights are the candidate kernels of ``arch`` and the
        per-width batch-norm statistics, so in eval mode it computes what the supernet
        computes; without, it is freshly initialised for retraining from scratch. Shortcuts
        are the identity wherever the block keeps its width and resolution.
        """
        arch = self.arch if arch is None else self.check_arch(arch)
        static, _ = export_part(self, "", self.in_channels, self._resolver(arch))
        static.train(self.training)
        return static if inherit_weights else reinitialise(static)

    def extra_repr(self) -> str:
        return f"name={self.name!r}, decisions={len(self._decisions)}, input_size={self.input_size}"
