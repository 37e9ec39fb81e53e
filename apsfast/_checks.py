"""Argument checks shared by the public API.

Every check raises ``TypeError`` (wrong kind or dtype) or ``ValueError`` (wrong shape,
value or device) whose message names the argument, the value got and the value expected.
They are explicit ``raise`` statements, never ``assert``, so they survive ``python -O``.
"""
from __future__ import annotations

import math
import numbers
from typing import Optional, Sequence

import numpy as np
import torch
from torch import Tensor


def tensor(name: str, value: object, *, ndim: Optional[int] = None, min_dim: int = 0,
           layout: str = "") -> Tensor:
    """Check that ``value`` is a floating-point tensor of the given rank and return it.

    ``layout`` (e.g. ``"(C_out, c_o)"``) is quoted in the message so the user sees what the
    dims mean.
    """
    if not isinstance(value, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if not value.is_floating_point():
        raise TypeError(f"{name} must have a floating-point dtype, got {value.dtype}")
    if ndim is not None and value.dim() != ndim:
        want = f"{ndim} dims"
    elif value.dim() < min_dim:
        want = f"at least {min_dim} dims"
    else:
        return value
    raise ValueError(f"{name} must have {want} {layout}".rstrip() + f", got shape {tuple(value.shape)}")


def same_kind(name: str, value: Tensor, ref_name: str, ref: Tensor) -> None:
    """Check that ``value`` has the dtype and device of ``ref``."""
    if value.dtype != ref.dtype:
        raise TypeError(f"{name} has dtype {value.dtype}, expected {ref.dtype} (the dtype of {ref_name})")
    if value.device != ref.device:
        raise ValueError(f"{name} is on device {value.device}, expected {ref.device} "
                         f"(the device of {ref_name})")


def input_kind(name: str, value: Tensor, weight: Tensor) -> None:
    """An input's dtype and device against its layer's weight; the dtypes may differ under
    autocast on the input's device, which casts both for the conv or the matmul."""
    if value.dtype != weight.dtype and not torch.is_autocast_enabled(value.device.type):
        raise TypeError(f"{name} has dtype {value.dtype}, expected {weight.dtype} (the dtype of weight; "
                        f"mixed dtypes need autocast)")
    if value.device != weight.device:
        raise ValueError(f"{name} is on device {value.device}, expected {weight.device} (the device of weight)")


def dim_size(name: str, value: Tensor, dim: int, expected: int, why: str) -> None:
    """Check ``value.shape[dim] == expected``; ``why`` says where the expected size comes from."""
    if value.shape[dim] != expected:
        raise ValueError(f"{name}.shape[{dim}] must be {expected} ({why}), "
                         f"got {value.shape[dim]} (shape {tuple(value.shape)})")


def widths(name: str, value: object) -> tuple[int, ...]:
    """Check a candidate width set: a non-empty, strictly ascending sequence of positive ints."""
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        value = (value,)
    if not isinstance(value, Sequence) or isinstance(value, str) or len(value) == 0:
        raise TypeError(f"{name} must be a non-empty sequence of positive ints "
                        f"(candidate widths in ascending order), got {value!r}")
    out = []
    for w in value:
        if isinstance(w, bool) or not isinstance(w, numbers.Integral) or w < 1:
            raise ValueError(f"{name} must hold positive ints, got {w!r} in {list(value)!r}")
        out.append(int(w))
    if any(a >= b for a, b in zip(out, out[1:])):
        raise ValueError(f"{name} must be strictly ascending, got {out!r}")
    return tuple(out)


def positive_int(name: str, value: object) -> int:
    """Check a positive integer (Python or NumPy) and return it as an int."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return int(value)


def choice(name: str, value: object, options: Sequence[str]) -> str:
    """Check that ``value`` is one of ``options``."""
    if value not in options:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, options))}, got {value!r}")
    return str(value)


def pair(name: str, value: object, *, minimum: int) -> tuple[int, int]:
    """An int or a pair of ints, each ``≥ minimum`` (a conv's stride, padding, dilation)."""
    items = (value, value) if isinstance(value, numbers.Integral) else value
    if isinstance(items, (tuple, list)) and len(items) == 2 and all(
            isinstance(v, numbers.Integral) and not isinstance(v, bool) and v >= minimum for v in items):
        return int(items[0]), int(items[1])
    raise ValueError(f"{name} must be an int ≥ {minimum} or a pair of them, got {value!r}")


def flag(name: str, value: object) -> bool:
    """Check a bool (Python or NumPy) and return it."""
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be a bool, got {value!r}")
    return bool(value)


def finite_float(name: str, value: object, *, positive: bool) -> float:
    """Check a finite real number, ``> 0`` if ``positive`` else ``≥ 0``, and return it as a float."""
    bound = "> 0" if positive else "≥ 0"
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) \
            or (value <= 0 if positive else value < 0):
        raise ValueError(f"{name} must be a finite float {bound}, got {value!r}")
    return float(value)
