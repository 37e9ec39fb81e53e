"""APSConv2d: a conv layer whose candidate kernels share one meta-weight through P and Q."""
from __future__ import annotations

import math
from typing import Optional, Sequence, Union

import torch
from torch import Tensor, nn
from torch.nn.modules.utils import _pair

from apsfast import _checks
from apsfast.functional import aps_conv2d, construct
from apsfast.nn.base import APSLayer

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
            (APS-T: ordinal init plus ``init_noise``, annealed by :meth:`transition_step`).
        meta_in_width, meta_out_width: meta widths; by default ``max(widths)`` for ordinal
            sharing and ``sum(widths)`` for independent and transitional sharing (the
            independent extreme needs ``Σ widths``; the transition needs it to get there).
        init_noise: std of the Gaussian noise on the initial transforms; default ``1e-3`` for
            transitional sharing, ``0`` otherwise.
    """

    def __init__(self, in_widths: Widths, out_widths: Widths, kernel_size, stride=1, padding=0,
                 dilation=1, groups: Union[int, str] = 1, bias: bool = False,
                 sharing: str = "transitional", *, meta_in_width: Optional[int] = None,
                 meta_out_width: Optional[int] = None, init_noise: Optional[float] = None,
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
            self._init_sides(1, out_widths, sharing, None, meta_out_width, init_noise, device, dtype)
            self.in_widths = self.out_widths
            self._in_index = {w: a for a, w in enumerate(self.in_widths)}
        else:
            self._init_sides(in_widths, out_widths, sharing, meta_in_width, meta_out_width,
                             init_noise, device, dtype)
        self.kernel_size = _pair(kernel_size)
        self.stride, self.padding, self.dilation = _pair(stride), padding, _pair(dilation)
        if not isinstance(padding, str):
            self.padding = _pair(padding)
        shape = (self.meta_out_width, self.meta_in_width, *self.kernel_size)
        self.weight = nn.Parameter(torch.empty(shape, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.empty(self.meta_out_width, device=device, dtype=dtype)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """He-normal init for the widest candidate's fan-in; zero bias.

        A semi-orthogonal P, Q keep i.i.d. Gaussian entries i.i.d. with the same variance, so
        every candidate kernel starts with this scale.
        """
        fan_in = (1 if self.depthwise else self.in_widths[-1]) * math.prod(self.kernel_size)
        nn.init.normal_(self.weight, std=math.sqrt(2.0 / fan_in))
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def _candidate(self, in_width: int) -> tuple[Optional[Tensor], Optional[Tensor], int]:
        """``(P, Q, groups)`` of the candidate reading ``in_width`` channels."""
        i = self.input_index(in_width)
        if self.depthwise:
            return self._transform(self.out_transforms, i), None, in_width
        return (self._transform(self.out_transforms, self._active_out_index),
                self._transform(self.in_transforms, i), 1)

    def forward(self, x: Tensor) -> Tensor:
        _checks.tensor("x", x, ndim=4, layout="(N, C, H, W)")
        P, Q, groups = self._candidate(x.shape[1])
        return aps_conv2d(x, self.weight, P, Q, self.bias, self.stride, self.padding,
                          self.dilation, groups)

    def candidate_kernel(self, in_width: int) -> Tensor:
        """The kernel ``[c_o, c_i, kh, kw]`` used for inputs of ``in_width`` channels."""
        P, Q, _ = self._candidate(in_width)
        return construct(self.weight, P, Q)

    def to_static(self, in_width: int) -> nn.Conv2d:
        """A plain ``nn.Conv2d`` computing this layer for ``in_width`` inputs and ``active_out``."""
        P, _, groups = self._candidate(in_width)
        with torch.no_grad():
            kernel = self.candidate_kernel(in_width)
            conv = nn.Conv2d(in_width, kernel.shape[0], self.kernel_size, self.stride, self.padding,
                             self.dilation, groups, bias=self.bias is not None,
                             device=kernel.device, dtype=kernel.dtype)
            conv.weight.copy_(kernel)
            if self.bias is not None:
                conv.bias.copy_(self.bias if P is None else self.bias @ P)
        return conv

    def extra_repr(self) -> str:
        kind = "depthwise" if self.depthwise else f"in_widths={self.in_widths}"
        return (f"{kind}, out_widths={self.out_widths}, kernel_size={self.kernel_size}, "
                f"stride={self.stride}, padding={self.padding}, sharing={self.sharing!r}, "
                f"meta=({self.meta_out_width}, {self.meta_in_width}), bias={self.bias is not None}")
