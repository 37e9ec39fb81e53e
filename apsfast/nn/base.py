"""What every APS layer shares: the candidate transforms of each side and their sharing level."""
from __future__ import annotations

import numbers
from typing import Optional, Sequence

import torch
from torch import Tensor, nn

from apsfast import _checks
from apsfast.sharing import init_transforms, sharing_level, transition_step

SHARING = ("ordinal", "independent", "transitional")

# Gaussian noise on the ordinal init of APS-T: an exact ordinal init is a stationary point of
# the projected descent (each column's gradient is parallel to it), so Φ would never fall.
# 1e-3 is the value the authors used on CIFAR.
TRANSITIONAL_NOISE = 1e-3


def default_meta_width(widths: Sequence[int], sharing: str) -> int:
    """The meta width of one side: ``max(widths)`` for ordinal sharing (rows past the widest
    candidate would never be read), ``sum(widths)`` for independent (disjoint candidates) and
    transitional sharing (so that the transition can reach full independence)."""
    return max(widths) if sharing == "ordinal" else sum(widths)


class CandidateTransforms(nn.Module):
    """The transforms of one side of an APS layer, one ``[meta_width, c_a]`` matrix per
    candidate width, stored side by side in the single parameter ``matrix``
    ``[meta_width, Σ c_a]`` so that batched kernels see one buffer.

    ``matrix`` does not require grad: APS updates it by the transition alone. Set
    ``requires_grad_(True)`` on it to train the transforms by the task loss instead.
    """

    def __init__(self, widths: Sequence[int], meta_width: int, sharing: str, noise: float,
                 *, device=None, dtype=None) -> None:
        super().__init__()
        self.widths = tuple(widths)
        self.meta_width = meta_width
        mode = "independent" if sharing == "independent" else "ordinal"
        blocks = init_transforms(meta_width, self.widths, mode, noise=noise, dtype=dtype, device=device)
        self.matrix = nn.Parameter(torch.cat(blocks, dim=1), requires_grad=False)
        self._offsets = [sum(self.widths[:a]) for a in range(len(self.widths))]

    def __getitem__(self, index: int) -> Tensor:
        """The transform of candidate ``index``: a view of ``matrix``, ``[meta_width, c_index]``."""
        start = self._offsets[index]
        return self.matrix[:, start:start + self.widths[index]]

    def matrices(self) -> tuple[Tensor, ...]:
        """Every candidate's transform, as views of ``matrix``, in ascending width."""
        return tuple(self[a] for a in range(len(self.widths)))

    def extra_repr(self) -> str:
        return f"meta_width={self.meta_width}, widths={self.widths}"


class APSLayer(nn.Module):
    """Base of the APS layers: the input side ``Q`` and output side ``P``.

    A side with a single candidate width is fixed: it needs no transform (``P``/``Q`` is
    ``None``) and its meta width is that width.
    """

    in_widths: tuple[int, ...]
    out_widths: tuple[int, ...]

    def _make_side(self, name: str, widths: tuple[int, ...], meta_width: Optional[int],
                   sharing: str, noise: float, device, dtype) -> tuple[int, Optional[CandidateTransforms]]:
        if len(widths) == 1:
            if meta_width not in (None, widths[0]):
                raise ValueError(f"{name} must be None or {widths[0]} for a side with the single "
                                 f"width {widths[0]}, got {meta_width!r}")
            return widths[0], None
        needed = sum(widths) if sharing == "independent" else widths[-1]
        if meta_width is None:
            meta_width = default_meta_width(widths, sharing)
        elif _checks.positive_int(name, meta_width) < needed:
            raise ValueError(f"{name} must be ≥ {needed} for sharing={sharing!r} and widths "
                             f"{list(widths)}, got {meta_width}")
        return meta_width, CandidateTransforms(widths, meta_width, sharing, noise, device=device, dtype=dtype)

    def _init_sides(self, in_widths, out_widths, sharing: str, meta_in_width: Optional[int],
                    meta_out_width: Optional[int], init_noise: Optional[float], device, dtype) -> None:
        self.sharing = _checks.choice("sharing", sharing, SHARING)
        self.in_widths = _checks.widths("in_widths", in_widths)
        self.out_widths = _checks.widths("out_widths", out_widths)
        if init_noise is None:
            init_noise = TRANSITIONAL_NOISE if sharing == "transitional" else 0.0
        else:
            init_noise = _checks.finite_float("init_noise", init_noise, positive=False)
        self.meta_in_width, self.in_transforms = self._make_side(
            "meta_in_width", self.in_widths, meta_in_width, sharing, init_noise, device, dtype)
        self.meta_out_width, self.out_transforms = self._make_side(
            "meta_out_width", self.out_widths, meta_out_width, sharing, init_noise, device, dtype)
        self._in_index = {w: a for a, w in enumerate(self.in_widths)}
        self._active_out_index = len(self.out_widths) - 1

    @property
    def P(self) -> Optional[tuple[Tensor, ...]]:
        """Output-side transforms ``[meta_out_width, c_o]``, one per output candidate, or None."""
        return None if self.out_transforms is None else self.out_transforms.matrices()

    @property
    def Q(self) -> Optional[tuple[Tensor, ...]]:
        """Input-side transforms ``[meta_in_width, c_i]``, one per input candidate, or None."""
        return None if self.in_transforms is None else self.in_transforms.matrices()

    @property
    def active_out(self) -> int:
        """The output width (channels) the next forward produces; one of ``out_widths``."""
        return self.out_widths[self._active_out_index]

    @active_out.setter
    def active_out(self, width: int) -> None:
        if isinstance(width, bool) or not isinstance(width, numbers.Integral) or width not in self.out_widths:
            raise ValueError(f"active_out must be one of out_widths {self.out_widths}, got {width!r}")
        self._active_out_index = self.out_widths.index(width)

    def input_index(self, width: int) -> int:
        """Index of the input candidate of this width; a clear error if it is not one."""
        try:
            return self._in_index[width]
        except KeyError:
            raise ValueError(f"{type(self).__name__} got an input with {width} channels, expected "
                             f"one of in_widths {self.in_widths}") from None

    def _transform(self, side: Optional[CandidateTransforms], index: int) -> Optional[Tensor]:
        return None if side is None else side[index]

    def sharing_level(self) -> Tensor:
        """Φ of this layer (paper eq. 4); ``1`` for a layer whose both sides are fixed."""
        if self.P is None and self.Q is None:
            return torch.ones((), dtype=self.weight.dtype, device=self.weight.device)
        return sharing_level(self.P, self.Q)

    def transition_step(self, tau: float) -> Tensor:
        """One step of paper eq. 5 on this layer's transforms, in place; returns Φ before it."""
        if self.P is None and self.Q is None:
            return self.sharing_level()
        return transition_step(self.P, self.Q, tau)
