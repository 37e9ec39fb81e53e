"""APSConv2d: a conv layer whose candidate kernels share one meta-weight through P and Q."""
from __future__ import annotations

import math
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.utils import _pair

from apsfast import _checks
from apsfast.nn.base import TRANSITION_NOISE, APSLayer

Widths = Union[int, Sequence[int]]


class APSConv2d(APSLayer):
    """Drop-in ``nn.Conv2d`` over candidate channel widths (affine parameter sharing).

    The layer keeps a meta-weight ``weight`` ``[meta_out_width, meta_in_width, kh, kw]`` and,
    per candidate, ``P^o`` ``[meta_out_width, c_o]`` and ``Q^i`` ``[meta_in_width, c_i]``; the
    candidate kernel is ``P^{oᵀ} · W · Q^i`` over the channel modes (paper eq. 2).

    The input width is read from ``x.shape[1]`` (it must be one of ``in_widths``); the output
    width is the attribute ``active_out``, initially the widest candidate.

    Args:
        in_widths: candidate input widths, ascending; an int (or a single width) is a fixed input
            with no ``Q``, e.g. the stem reading RGB.
        out_widths: candidate output widths, ascending; a single width is a fixed output with
            no ``P``.
        kernel_size, stride, padding, dilation: as in ``nn.Conv2d``.
        groups: ``1`` for a dense conv or ``"depthwise"``: one filter per channel, weight
            ``[meta_width, 1, kh, kw]``, ``P`` only, ``in_widths == out_widths``, and the output
            width follows the input width (``active_out`` is not used).
        bias: learn a meta-bias ``[meta_out_width]``, projected with the kernel as ``Pᵀ b``.
        sharing: ``"ordinal"`` (APS-O), ``"independent"`` (APS-I) or ``"transitional"``
            (APS-T: exact ordinal init, annealed by :meth:`transition_step`).
        meta_in_width, meta_out_width: meta widths; by default ``max(widths)`` for ordinal
            sharing and ``sum(widths)`` for independent and transitional sharing (the
            independent extreme needs ``Σ widths``; the transition needs it to get there).
        transition_noise: std of the Gaussian noise that the first transition step of an APS-T
            layer adds to its exact ordinal transforms (a stationary point of eq. 5).

    While a side's transforms are exact selections (APS-O, APS-I, APS-T before its
    transition) the candidate kernel is a slice of the meta-weight, copied contiguous: no
    arithmetic, and the same rounding in the convolution whatever the meta width.
    """

    def __init__(self, in_widths: Widths, out_widths: Widths, kernel_size, stride=1, padding=0,
                 dilation=1, groups: Union[int, str] = 1, bias: bool = False,
                 sharing: str = "transitional", *, meta_in_width: Optional[int] = None,
                 meta_out_width: Optional[int] = None, transition_noise: float = TRANSITION_NOISE,
                 device=None, dtype=None) -> None:
        super().__init__()
        if groups not in (1, "depthwise"):
            raise ValueError(f"groups must be 1 or 'depthwise', got {groups!r} (APS transforms "
                             f"mix every channel, so other grouped convs have no APS form)")
        self.depthwise = groups == "depthwise"
        if self.depthwise:
            if _checks.widths("in_widths", in_widths) != _checks.widths("out_widths", out_widths):
                raise ValueError(f"a depthwise APSConv2d needs in_widths == out_widths, got "
                                 f"{in_widths!r} and {out_widths!r}")
            if meta_in_width is not None:
                raise ValueError(f"meta_in_width must be None for a depthwise APSConv2d (its "
                                 f"weight has one input channel), got {meta_in_width!r}")
            # The channel mode is the output mode; the input mode of the kernel has size 1.
            self._init_sides(1, out_widths, sharing, None, meta_out_width, transition_noise, device, dtype)
            self.in_widths = self.out_widths
            self._in_index = {w: a for a, w in enumerate(self.in_widths)}
        else:
            self._init_sides(in_widths, out_widths, sharing, meta_in_width, meta_out_width,
                             transition_noise, device, dtype)
        self.kernel_size = _pair(kernel_size)
        self.stride, self.padding, self.dilation = _pair(stride), padding, _pair(dilation)
        if not isinstance(padding, str):
            self.padding = _pair(padding)
        shape = (self.meta_out_width, self.meta_in_width, *self.kernel_size)
        self.weight = nn.Parameter(torch.empty(shape, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.empty(self.meta_out_width, device=device, dtype=dtype)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """He-normal init for the widest candidate's fan-in (APS-T: the block its ordinal start
        reads, drawn as APS-O draws it; see ``_draw_meta_weight``); zero bias.

        A semi-orthogonal P, Q keep i.i.d. Gaussian entries i.i.d. with the same variance, so
        every candidate kernel starts with this scale.
        """
        fan_in = (1 if self.depthwise else self.in_widths[-1]) * math.prod(self.kernel_size)
        self._draw_meta_weight(lambda w, g: nn.init.normal_(w, std=math.sqrt(2.0 / fan_in), generator=g))
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def _indices(self, in_width: int) -> tuple[int, int]:
        i = self.input_index(in_width)
        # Depthwise: one filter per channel, so the output candidate is the input's.
        return (i, i) if self.depthwise else (self._active_out_index, i)

    def forward(self, x: Tensor) -> Tensor:
        _checks.tensor("x", x, ndim=4, layout="(N, C, H, W)")
        _checks.input_kind("x", x, self.weight)
        out_index, in_index = self._indices(x.shape[1])
        kernel = self._candidate_weight(out_index, in_index)
        return F.conv2d(x, kernel, self._candidate_bias(out_index, self.bias), self.stride,
                        self.padding, self.dilation, x.shape[1] if self.depthwise else 1)

    def candidate_kernel(self, in_width: int) -> Tensor:
        """The kernel ``[c_o, c_i, kh, kw]`` used for inputs of ``in_width`` channels."""
        return self._candidate_weight(*self._indices(in_width))

    def to_static(self, in_width: int, out_width: Optional[int] = None) -> nn.Conv2d:
        """A plain ``nn.Conv2d`` computing this layer for ``in_width`` inputs and ``out_width``
        outputs (default ``active_out``; a depthwise layer's output width is its input's)."""
        out_index, in_index = self._indices(in_width)
        if out_width is not None and not self.depthwise:
            if out_width not in self.out_widths:
                raise ValueError(f"out_width must be one of out_widths {self.out_widths}, got {out_width!r}")
            out_index = self.out_widths.index(out_width)
        with torch.no_grad():
            kernel = self._candidate_weight(out_index, in_index)
            conv = nn.Conv2d(in_width, kernel.shape[0], self.kernel_size, self.stride, self.padding,
                             self.dilation, in_width if self.depthwise else 1,
                             bias=self.bias is not None, device=kernel.device, dtype=kernel.dtype)
            conv.weight.copy_(kernel)
            if self.bias is not None:
                conv.bias.copy_(self._candidate_bias(out_index, self.bias))
        return conv

    def extra_repr(self) -> str:
        kind = "depthwise" if self.depthwise else f"in_widths={self.in_widths}"
        return (f"{kind}, out_widths={self.out_widths}, kernel_size={self.kernel_size}, "
                f"stride={self.stride}, padding={self.padding}, sharing={self.sharing!r}, "
                f"meta=({self.meta_out_width}, {self.meta_in_width}), bias={self.bias is not None}")
