"""APSBatchNorm2d: batch norm with private statistics and affine parameters per candidate width."""
from __future__ import annotations

import copy
from typing import Sequence

from torch import Tensor, nn

from apsfast import _checks


class APSBatchNorm2d(nn.Module):
    """One ``nn.BatchNorm2d`` per candidate width, chosen by the input's channel count.

    Candidates of different widths see differently distributed activations, so sharing one
    set of running statistics would mis-normalise all but one of them (the switchable batch
    norm of slimmable networks). The per-width modules are in ``bns``.
    """

    def __init__(self, widths: Sequence[int], eps: float = 1e-5, momentum: float = 0.1,
                 affine: bool = True, track_running_stats: bool = True, device=None, dtype=None) -> None:
        super().__init__()
        self.widths = _checks.widths("widths", widths)
        self.bns = nn.ModuleList(nn.BatchNorm2d(w, eps, momentum, affine, track_running_stats,
                                                device=device, dtype=dtype) for w in self.widths)
        self._index = {w: a for a, w in enumerate(self.widths)}

    def candidate(self, width: int) -> nn.BatchNorm2d:
        """The batch norm of the candidate with ``width`` channels."""
        try:
            return self.bns[self._index[width]]
        except KeyError:
            raise ValueError(f"APSBatchNorm2d got {width} channels, expected one of widths "
                             f"{self.widths}") from None

    def forward(self, x: Tensor) -> Tensor:
        _checks.tensor("x", x, ndim=4, layout="(N, C, H, W)")
        return self.candidate(x.shape[1])(x)

    def to_static(self, width: int) -> nn.BatchNorm2d:
        """A copy of the batch norm of the ``width`` candidate."""
        return copy.deepcopy(self.candidate(width))

    def extra_repr(self) -> str:
        return f"widths={self.widths}"
