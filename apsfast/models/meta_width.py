"""Meta widths: how many rows a side of an APS layer keeps for its candidate widths, under a
sharing mode and the builders' ``meta_width`` option. The built-in spaces and
:func:`apsfast.convert` read them alike; nothing here knows of either."""
from __future__ import annotations

import math
import numbers
from typing import Optional, Sequence, Union

#: The named values of the builders' ``meta_width`` option; a number k ≥ 1 is k times the widest.
META_WIDTHS = ("sum", "widest")


def check_meta_width(meta_width: object) -> Union[str, float]:
    """The ``meta_width`` build option, checked: ``"sum"``, ``"widest"`` or a number ≥ 1."""
    if isinstance(meta_width, str) and meta_width in META_WIDTHS:
        return meta_width
    if isinstance(meta_width, bool) or not isinstance(meta_width, numbers.Real) \
            or not math.isfinite(meta_width) or meta_width < 1:
        raise ValueError(f"meta_width must be 'sum', 'widest' or a number k ≥ 1 (k times the widest candidate, "
                         f"at most the sum), got {meta_width!r}")
    return meta_width


def meta_width_of(widths: Union[int, Sequence[int]], sharing: str, meta_width: Union[str, float]) -> Optional[int]:
    """The meta width of one APS layer side with candidate ``widths`` under the build option
    ``meta_width`` (see :func:`check_meta_width`): the sum of the candidates (``"sum"``), the
    widest (``"widest"``), or ``k`` times the widest, rounded and at most the sum.

    ``None`` (the layer's own default) for a fixed side (one width) and for ordinal sharing,
    whose meta width is always the widest candidate (rows past it are never read).

    Raises:
        ValueError: for ``sharing="independent"`` below the sum: APS-I selects disjoint
            channels for the candidates, which needs ``Σ c_a`` rows.
    """
    widths = (widths,) if isinstance(widths, numbers.Integral) else tuple(widths)
    if len(widths) == 1 or sharing == "ordinal":
        return None
    total, widest = sum(widths), max(widths)
    if meta_width == "sum":
        return total
    size = widest if meta_width == "widest" else min(total, max(widest, round(meta_width * widest)))
    if sharing == "independent" and size < total:
        raise ValueError(f"meta_width={meta_width!r} is too narrow for sharing='independent': APS-I gives each "
                         f"candidate its own channels, so a side needs the sum of its widths ({total} for "
                         f"{list(widths)}, not {size}); use meta_width='sum'")
    return size


def conv_meta_widths(in_widths: Union[int, Sequence[int]], out_widths: Union[int, Sequence[int]], sharing: str,
                     meta_width: Union[str, float], depthwise: bool = False) -> dict[str, Optional[int]]:
    """``meta_in_width`` and ``meta_out_width`` of an :class:`~apsfast.nn.APSConv2d` under the
    build option ``meta_width`` (:func:`meta_width_of` per side; a depthwise conv's input mode
    has one channel, so its only side is the output's)."""
    return {"meta_in_width": None if depthwise else meta_width_of(in_widths, sharing, meta_width),
            "meta_out_width": meta_width_of(out_widths, sharing, meta_width)}
