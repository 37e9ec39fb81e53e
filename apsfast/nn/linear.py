"""APSLinear: a classifier over candidate input widths, sharing one meta-weight through Q."""
from __future__ import annotations

import math
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from apsfast import _checks
from apsfast.nn.base import TRANSITION_NOISE, APSLayer


class APSLinear(APSLayer):
    """``nn.Linear`` whose input width is searched: ``y = x · (W Q^i)ᵀ + b``.

    The meta-weight is ``weight`` ``[out_features, meta_in_width]``; the input width is read
    from ``x.shape[-1]`` and must be one of ``in_widths``. ``sharing``, ``meta_in_width`` and
    ``transition_noise`` are as in :class:`apsfast.nn.APSConv2d`. The output side is fixed (``P`` is
    ``None``): the number of classes is not searched.
    """

    def __init__(self, in_widths: Union[int, Sequence[int]], out_features: int, bias: bool = True,
                 sharing: str = "transitional", *, meta_in_width: Optional[int] = None,
                 transition_noise: float = TRANSITION_NOISE, device=None, dtype=None) -> None:
        super().__init__()
        out_features = _checks.positive_int("out_features", out_features)
        self._init_sides(in_widths, out_features, sharing, meta_in_width, None, transition_noise,
                         device, dtype)
        self.out_features = out_features
        self.weight = nn.Parameter(torch.empty(out_features, self.meta_in_width, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.empty(out_features, device=device, dtype=dtype)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """``nn.Linear``'s default init, for the widest candidate's fan-in (APS-T: the columns
        its ordinal start reads, drawn as APS-O draws them; see ``_draw_meta_weight``)."""
        bound = 1.0 / math.sqrt(self.in_widths[-1])
        self._draw_meta_weight(lambda w, g: nn.init.uniform_(w, -bound, bound, generator=g))
        if self.bias is not None:
            nn.init.uniform_(self.bias, -bound, bound)

    def candidate_weight(self, in_width: int) -> Tensor:
        """The weight ``[out_features, in_width]`` used for inputs of ``in_width`` features."""
        return self._candidate_weight(*self._indices(in_width))

    def forward(self, x: Tensor) -> Tensor:
        _checks.tensor("x", x, min_dim=1, layout="(..., in_features)")
        _checks.input_kind("x", x, self.weight)
        return F.linear(x, self.candidate_weight(x.shape[-1]), self.bias)

    def to_static(self, in_width: int) -> nn.Linear:
        """A plain ``nn.Linear`` computing this layer for ``in_width`` inputs."""
        with torch.no_grad():
            weight = self.candidate_weight(in_width)
            linear = nn.Linear(in_width, self.out_features, bias=self.bias is not None,
                               device=weight.device, dtype=weight.dtype)
            linear.weight.copy_(weight)
            if self.bias is not None:
                linear.bias.copy_(self.bias)
        return linear

    def extra_repr(self) -> str:
        return (f"in_widths={self.in_widths}, out_features={self.out_features}, "
                f"sharing={self.sharing!r}, meta_in_width={self.meta_in_width}, "
                f"bias={self.bias is not None}")
