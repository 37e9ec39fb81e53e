"""APS layers made from a model's own layers, and the pieces a converted graph needs.

The meta-weight of each APS layer has the meta widths that ``meta_width`` gives for the
chosen sharing (by default ``Σ`` candidates per searched side for APS-T and APS-I; always the
widest for APS-O; see :func:`apsfast.models.meta_width.meta_width_of`) and is initialised as
:class:`~apsfast.nn.APSConv2d` does (He-normal); the original weight is then copied into the
block that the widest candidate's transforms select (rows and columns ``0 … C-1`` for
ordinal and transitional sharing, the last disjoint block for independent).
The widest candidate is the original width, so the standard architecture computes exactly
what the original model computes, while the extra rows leave APS-T room to move its
transforms apart.
"""
from __future__ import annotations

import copy
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from apsfast.models.converter.rewrite import StandardisedConv2d, standardise
from apsfast.models.meta_width import conv_meta_widths, meta_width_of
from apsfast.nn import APSBatchNorm2d, APSConv2d, APSLinear
from apsfast.nn.base import CandidateTransforms


def channel_view(x: Tensor, how: tuple) -> Tensor:
    """A reshape that keeps the batch and channel dims of ``x`` at their live sizes (the
    traced model's ``view``/``reshape`` may hold the original channel count as a constant):
    ``("same",)`` keeps the shape, ``("ones", n)`` gives ``n`` trailing singleton dims,
    ``("flat",)`` flattens the spatial dims into one, ``("merge",)`` flattens the channels
    with them."""
    if how[0] == "same":
        return x.reshape(x.shape)
    if how[0] == "ones":
        return x.reshape(x.shape[0], x.shape[1], *([1] * how[1]))
    if how[0] == "flat":
        return x.reshape(x.shape[0], x.shape[1], -1)
    return x.reshape(x.shape[0], -1)


def _start(side: Optional[CandidateTransforms]) -> int:
    """First meta row (or column) that the widest candidate of ``side`` selects."""
    if side is None:
        return 0
    start = side.selection_start(len(side.widths) - 1)
    if start is None:
        raise RuntimeError("internal: a freshly built APS side is not an exact selection")
    return start


@torch.no_grad()
def _embed(layer: APSConv2d, weight: Tensor, bias: Optional[Tensor]) -> None:
    rows, cols = _start(layer.out_transforms), _start(layer.in_transforms)
    c_out, c_in = weight.shape[:2]
    layer.weight[rows:rows + c_out, cols:cols + c_in].copy_(weight)
    if bias is not None:
        layer.bias[rows:rows + c_out].copy_(bias)


def aps_conv(conv: nn.Conv2d, in_widths: Sequence[int], out_widths: Sequence[int], depthwise: bool,
             sharing: str, meta_width: Union[str, float] = "sum") -> APSConv2d:
    """An :class:`APSConv2d` over the candidate widths whose widest kernel is ``conv``'s (a
    :class:`StandardisedAPSConv2d` for a :class:`StandardisedConv2d`)."""
    if isinstance(conv, StandardisedConv2d):
        return StandardisedAPSConv2d(conv, in_widths, out_widths, sharing, meta_width)
    weight = conv.weight
    layer = APSConv2d(tuple(in_widths), tuple(out_widths), conv.kernel_size, conv.stride, conv.padding,
                      conv.dilation, "depthwise" if depthwise else 1, conv.bias is not None, sharing,
                      **conv_meta_widths(in_widths, out_widths, sharing, meta_width, depthwise),
                      device=weight.device, dtype=weight.dtype)
    _embed(layer, weight, conv.bias)
    return layer


class StandardisedAPSConv2d(APSConv2d):
    """The APS form of a :class:`StandardisedConv2d`: each candidate kernel is standardised per
    output filter over its own input channels, and ``gain`` is a meta-vector projected like the
    bias (``Pᵀ g``). At the original widths it computes what the model's conv computes."""

    def __init__(self, conv: StandardisedConv2d, in_widths: Sequence[int], out_widths: Sequence[int], sharing: str,
                 meta_width: Union[str, float] = "sum") -> None:
        super().__init__(tuple(in_widths), tuple(out_widths), conv.kernel_size, conv.stride, conv.padding,
                         conv.dilation, 1, conv.bias is not None, sharing,
                         **conv_meta_widths(in_widths, out_widths, sharing, meta_width),
                         device=conv.weight.device, dtype=conv.weight.dtype)
        self.eps, self.scale = conv.eps, conv.scale
        self.gain = None
        _embed(self, conv.weight, conv.bias)
        if conv.gain is not None:
            self.gain = nn.Parameter(torch.ones_like(self.weight[:, 0, 0, 0]))
            rows = _start(self.out_transforms)
            with torch.no_grad():
                self.gain[rows:rows + conv.out_channels].copy_(conv.gain.reshape(-1))

    def _kernel(self, out_index: int, in_index: int) -> Tensor:
        # Contiguous, as the model's weight is: the statistics are then reduced in its order.
        return standardise(self._candidate_weight(out_index, in_index).contiguous(),
                           self._candidate_bias(out_index, self.gain), self.scale, self.eps)

    def forward(self, x: Tensor) -> Tensor:
        out_index, in_index = self._indices(x.shape[1])
        return F.conv2d(x, self._kernel(out_index, in_index), self._candidate_bias(out_index, self.bias),
                        self.stride, self.padding, self.dilation)

    def to_static(self, in_width: int, out_width: Optional[int] = None) -> StandardisedConv2d:
        """A :class:`StandardisedConv2d` computing this layer at these widths."""
        plain = super().to_static(in_width, out_width)
        out_index = self.out_widths.index(plain.out_channels)
        with torch.no_grad():
            conv = StandardisedConv2d(in_width, plain.out_channels, self.kernel_size, self.stride, self.padding,
                                      self.dilation, bias=plain.bias is not None, eps=self.eps, scale=self.scale,
                                      gain=self.gain is not None, device=plain.weight.device,
                                      dtype=plain.weight.dtype)
            conv.weight.copy_(plain.weight)
            if plain.bias is not None:
                conv.bias.copy_(plain.bias)
            if self.gain is not None:
                conv.gain.copy_(self._candidate_bias(out_index, self.gain).reshape(conv.gain.shape))
        return conv


class GroupedAPSConv2d(nn.Module):
    """A grouped conv (``groups`` g, neither 1 nor depthwise) over candidate widths.

    Each of the g groups is its own :class:`APSConv2d` (meta-weight, ``P``, ``Q``) over the
    per-group widths ``c / g``; the candidate kernel is their kernels stacked along the
    output channels and runs as one ``groups=g`` conv, which is also its static form, so the
    supernet and the export compute the same thing. Every total width is a multiple of g.
    """

    def __init__(self, conv: nn.Conv2d, in_widths: Sequence[int], out_widths: Sequence[int],
                 sharing: str, meta_width: Union[str, float] = "sum") -> None:
        super().__init__()
        g = conv.groups
        self.groups = g
        self.in_widths, self.out_widths = tuple(in_widths), tuple(out_widths)
        self.stride, self.padding, self.dilation = conv.stride, conv.padding, conv.dilation
        rows = conv.out_channels // g
        self.parts = nn.ModuleList()
        ins, outs = tuple(w // g for w in in_widths), tuple(w // g for w in out_widths)
        for j in range(g):
            part = APSConv2d(ins, outs, conv.kernel_size, conv.stride, conv.padding, conv.dilation, 1,
                             conv.bias is not None, sharing, **conv_meta_widths(ins, outs, sharing, meta_width),
                             device=conv.weight.device, dtype=conv.weight.dtype)
            _embed(part, conv.weight[j * rows:(j + 1) * rows],
                   None if conv.bias is None else conv.bias[j * rows:(j + 1) * rows])
            self.parts.append(part)

    @property
    def active_out_index(self) -> int:
        """Index of the output width the next forward produces."""
        return self.parts[0].active_out_index

    @property
    def active_out(self) -> int:
        return self.out_widths[self.active_out_index]

    def select_out(self, index: int) -> None:
        """Make ``out_widths[index]`` the output width."""
        for part in self.parts:
            part.select_out(index)

    def _bias(self, part: APSConv2d, index: int) -> Optional[Tensor]:
        if part.bias is None:
            return None
        return part.bias[:part.out_widths[index]] if part.P is None else part.bias @ part.P[index]

    def forward(self, x: Tensor) -> Tensor:
        width = x.shape[1] // self.groups
        kernel = torch.cat([part.candidate_kernel(width) for part in self.parts])
        bias = None
        if self.parts[0].bias is not None:
            bias = torch.cat([self._bias(part, part.active_out_index) for part in self.parts])
        return F.conv2d(x, kernel, bias, self.stride, self.padding, self.dilation, self.groups)

    def to_static(self, in_width: int, out_width: int) -> nn.Conv2d:
        """A plain ``nn.Conv2d(groups=g)`` computing this layer for these total widths."""
        if out_width not in self.out_widths:
            raise ValueError(f"out_width must be one of out_widths {self.out_widths}, got {out_width!r}")
        parts = [part.to_static(in_width // self.groups, out_width // self.groups) for part in self.parts]
        first = parts[0]
        with torch.no_grad():
            conv = nn.Conv2d(in_width, out_width, first.kernel_size, first.stride, first.padding,
                             first.dilation, self.groups, bias=first.bias is not None,
                             device=first.weight.device, dtype=first.weight.dtype)
            conv.weight.copy_(torch.cat([p.weight for p in parts]))
            if first.bias is not None:
                conv.bias.copy_(torch.cat([p.bias for p in parts]))
        return conv

    def extra_repr(self) -> str:
        return f"groups={self.groups}, in_widths={self.in_widths}, out_widths={self.out_widths}"


class FlattenedAPSLinear(APSConv2d):
    """An ``nn.Linear`` reading a flattened ``C×H×W`` map (VGG's, AlexNet's classifier), searched
    by its channels: it is the conv with an ``H×W`` kernel over the map, so ``Q`` acts on the
    channels and every spatial position shares it. (A transform over the flattened ``C·H·W``
    axis would be ``(H·W)²`` times larger — 24,576² for one layer at 32×32 — and would mix
    positions.) Its input is the flattened map, its output ``(N, out_features)``.

    With ``spatial`` ``(1, 1)`` it is a linear layer over the tokens of a channels-last map
    (ConvNeXt's MLP, a 1×1 conv in effect), whose ``out_widths`` may be searched too: input
    ``(..., c_i)``, output ``(..., c_o)``."""

    def __init__(self, linear: nn.Linear, in_widths: Sequence[int], spatial: tuple[int, int], sharing: str,
                 meta_width: Union[str, float] = "sum", out_widths: Optional[Sequence[int]] = None) -> None:
        outs = tuple(out_widths) if out_widths is not None else (linear.out_features,)
        super().__init__(tuple(in_widths), outs, spatial, 1, 0, 1, 1, linear.bias is not None, sharing,
                         **conv_meta_widths(in_widths, outs, sharing, meta_width),
                         device=linear.weight.device, dtype=linear.weight.dtype)
        self.spatial = tuple(spatial)
        _embed(self, linear.weight.detach().reshape(linear.out_features, -1, *spatial), linear.bias)

    def forward(self, x: Tensor) -> Tensor:
        # As a linear layer on the candidate kernel flattened like the input (channel-major),
        # so that the standard arch computes exactly what the model's nn.Linear computes.
        kernel = self.candidate_kernel(x.shape[-1] // (self.spatial[0] * self.spatial[1]))
        return F.linear(x, kernel.reshape(kernel.shape[0], -1), self._candidate_bias(self.active_out_index, self.bias))

    def to_static(self, in_width: int, out_width: Optional[int] = None) -> nn.Linear:
        """A plain ``nn.Linear`` over ``in_width`` channels' flattened maps."""
        conv = super().to_static(in_width, out_width)
        with torch.no_grad():
            linear = nn.Linear(conv.weight[0].numel(), conv.out_channels, bias=conv.bias is not None,
                               device=conv.weight.device, dtype=conv.weight.dtype)
            linear.weight.copy_(conv.weight.reshape(conv.out_channels, -1))
            if conv.bias is not None:
                linear.bias.copy_(conv.bias)
        return linear


@torch.no_grad()
def aps_batch_norm(bn: nn.BatchNorm2d, widths: Sequence[int]) -> APSBatchNorm2d:
    """An :class:`APSBatchNorm2d` whose widest candidate is a copy of ``bn`` and whose
    narrower ones start from its first channels (what an ordinal candidate reads)."""
    ref = bn.weight if bn.weight is not None else bn.running_mean
    layer = APSBatchNorm2d(widths, bn.eps, bn.momentum, bn.affine, bn.track_running_stats,
                           device=None if ref is None else ref.device, dtype=None if ref is None else ref.dtype)
    for width, candidate in zip(layer.widths, layer.bns):
        if width == bn.num_features:
            layer.bns[layer.widths.index(width)] = copy.deepcopy(bn)
            continue
        for name, tensor in list(bn.named_parameters()) + list(bn.named_buffers()):
            target = getattr(candidate, name)
            target.copy_(tensor if tensor.dim() == 0 else tensor[:width])
    return layer


@torch.no_grad()
def aps_linear(linear: nn.Linear, in_widths: Sequence[int], sharing: str,
               meta_width: Union[str, float] = "sum") -> APSLinear:
    """An :class:`APSLinear` over the candidate input widths whose widest weight is ``linear``'s."""
    weight = linear.weight
    layer = APSLinear(tuple(in_widths), linear.out_features, linear.bias is not None, sharing,
                      meta_in_width=meta_width_of(in_widths, sharing, meta_width),
                      device=weight.device, dtype=weight.dtype)
    cols = _start(layer.in_transforms)
    layer.weight[:, cols:cols + linear.in_features].copy_(weight)
    if linear.bias is not None:
        layer.bias.copy_(linear.bias)
    return layer
