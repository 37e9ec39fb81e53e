"""Any traced CNN to a :class:`~apsfast.models.Supernet`: trace, then group.

:func:`convert` traces the model with ``torch.fx``, reads the graph for which channels are
coupled (a union-find over channel groups along the dataflow, see
:mod:`apsfast.models.converter.channels`), makes every free group one searched decision, and
swaps the searched convs, batch norms and linear layers for APS layers whose meta-weights
hold the model's own weights (see :mod:`apsfast.models.converter.layers`).

>>> net = apsfast.convert(model, torch.randn(1, 3, 32, 32))
>>> arch = net.sample_uniform(torch.Generator().manual_seed(0))
>>> net.set_arch(arch); net.flops(arch); static = net.export(arch)
"""
from __future__ import annotations

import copy
import numbers
import warnings
from typing import Iterable, Sequence, Union

import torch
from torch import nn

from apsfast import _checks
from apsfast.models.converter.channels import ChannelAnalyser
from apsfast.models.converter.layers import GroupedAPSConv2d
from apsfast.models.converter.supernet import ConvertedSupernet, build_supernet
from apsfast.models.converter.trace import trace
from apsfast.models.meta_width import check_meta_width
from apsfast.nn import SHARING

__all__ = ["ConvertedSupernet", "GroupedAPSConv2d", "convert"]


def _ratios(widths: object) -> tuple[float, ...]:
    if isinstance(widths, (str, bytes)) or not isinstance(widths, Iterable):
        raise TypeError(f"widths must be a sequence of ratios in (0, 1], e.g. (0.5, 0.75, 1.0), got {widths!r}")
    ratios = tuple(widths)
    if not ratios or any(isinstance(r, bool) or not isinstance(r, numbers.Real) or not 0 < r <= 1
                         for r in ratios):
        raise ValueError(f"widths must be a non-empty sequence of ratios in (0, 1], e.g. "
                         f"(0.5, 0.75, 1.0), got {widths!r}")
    return tuple(float(r) for r in ratios)


def _exclude(model: nn.Module, exclude: object) -> tuple[str, ...]:
    names = (exclude,) if isinstance(exclude, str) else exclude
    if not isinstance(names, Iterable) or not all(isinstance(n, str) for n in names):
        raise TypeError(f"exclude must be a sequence of submodule names (str), got {exclude!r}")
    names = tuple(names)
    known = {name for name, _ in model.named_modules() if name}
    for name in names:
        if name not in known:
            sample = sorted(known)[:8]
            raise ValueError(f"exclude names {name!r}, which is not a submodule of "
                             f"{type(model).__name__}; expected qualified names such as {sample}")
    return names


def _example(example_input: object) -> torch.Tensor:
    if not isinstance(example_input, torch.Tensor) or not example_input.is_floating_point():
        what = example_input.dtype if isinstance(example_input, torch.Tensor) else type(example_input).__name__
        raise TypeError(f"example_input must be a floating-point torch.Tensor of shape (N, C, H, W), got {what}")
    if example_input.dim() != 4 or 0 in example_input.shape:
        raise ValueError(f"example_input must be a non-empty 4-D tensor (N, C, H, W), got shape "
                         f"{tuple(example_input.shape)}")
    return example_input


def convert(model: nn.Module, example_input: torch.Tensor, *,
            widths: Sequence[float] = (0.5, 0.75, 1.0), round_to: int = 8,
            sharing: str = "transitional", exclude: Union[str, Sequence[str]] = (),
            meta_width: Union[str, float] = "sum") -> ConvertedSupernet:
    """A supernet searching the channel widths of ``model`` (which is left untouched).

    Args:
        model: a CNN that ``torch.fx.symbolic_trace`` can trace, taking one ``(N, C, H, W)``
            tensor.
        example_input: a float tensor of that shape: the shapes are read from one eval-mode run
            on it, and FLOPs are counted at its resolution (``input_size``).
        widths: ratios in ``(0, 1]``; each coupled channel group of original width ``w`` gets
            the candidates ``ratio · w`` rounded to a multiple of ``round_to`` (at least
            ``round_to``, at most ``w``), plus ``w`` itself. A group narrower than ``round_to``
            is not searched.
        round_to: the multiple candidate widths are rounded to (``≥ 1``); for a group read by a
            conv with ``g`` groups, a multiple of ``lcm(round_to, g)``.
        sharing: APS strategy of every layer: ``"ordinal"``, ``"independent"`` or
            ``"transitional"``.
        exclude: qualified names of submodules kept fixed and opaque: not traced into, and the
            widths they read and write are not searched (the way past an op convert refuses).
        meta_width: the meta width of every searched side: ``"sum"`` of its candidates,
            ``"widest"``, or ``k ≥ 1`` times the widest (at most the sum), as the registered
            spaces' option (:func:`apsfast.models.resnet.resnet20_cifar`); independent sharing
            needs ``"sum"``, ordinal ignores it.

    Returns:
        A :class:`ConvertedSupernet` named ``"converted:<class name>"``: the interface of
        :func:`apsfast.models.build`'s supernets. At :meth:`~apsfast.models.Supernet.standard_arch`
        (the original widths, also the widest) it computes exactly what ``model`` computes.

    Raises:
        TypeError, ValueError: a bad argument (naming it), or a model convert cannot follow
            (naming the node, its op and submodule, and how to proceed) — before any layer is built.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    example_input = _example(example_input)
    ratios = _ratios(widths)
    round_to = _checks.positive_int("round_to", round_to)
    sharing = _checks.choice("sharing", sharing, SHARING)
    meta_width = check_meta_width(meta_width)
    names = _exclude(model, exclude)
    # Trace a copy: the supernet takes its layers over, the user's model stays as it was.
    traced = trace(copy.deepcopy(model), example_input, names)
    analysis = ChannelAnalyser(traced.module, (*names, *traced.shape_leaves)).run()
    analysis.pinned[:0] = [f"module {leaf!r} branches on a shape ({why}): traced as a leaf at the example's shapes"
                           for leaf, why in traced.shape_leaves.items()]
    if analysis.pinned:
        warnings.warn(f"convert: {len(analysis.pinned)} op(s) of {type(model).__name__} have no channel rule; the "
                      f"channels they read and write keep their widths (the rest is searched): "
                      + "; ".join(analysis.pinned), stacklevel=2)
    net = build_supernet(f"converted:{type(model).__name__}", traced, analysis, ratios, round_to, sharing,
                         tuple(example_input.shape[2:]), example_input.shape[1], meta_width)
    net.options = {"widths": list(ratios), "round_to": round_to, "sharing": sharing, "exclude": list(names)}
    if meta_width != "sum":  # recorded where it differs from the default, which rebuilds without it
        net.options["meta_width"] = meta_width
    net.train(model.training)
    return net
