"""Public functional API: candidate-kernel construction and the APS convolution."""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from apsfast import _checks, ops

_IntOrPair = Union[int, tuple[int, int]]


def _check_transforms(weight: Tensor, P: Optional[Tensor], Q: Optional[Tensor]) -> None:
    _checks.tensor("weight", weight, min_dim=2, layout="(C_out, C_in, *kernel)")
    if weight.numel() == 0:
        raise ValueError(f"weight must have no zero-size dimension (a meta-weight holds at least one "
                         f"channel and one kernel element), got shape {tuple(weight.shape)}")
    for name, M, dim, side in (("P", P, 0, "C_out, c_o"), ("Q", Q, 1, "C_in, c_i")):
        if M is None:
            continue
        _checks.tensor(name, M, ndim=2, layout=f"({side})")
        _checks.same_kind(name, M, "weight", weight)
        _checks.dim_size(name, M, 0, weight.shape[dim], f"weight.shape[{dim}], the meta width")
        if M.shape[1] == 0:
            raise ValueError(f"{name} must have at least one column (a candidate width ≥ 1), "
                             f"got shape {tuple(M.shape)}")


def construct(weight: Tensor, P: Optional[Tensor], Q: Optional[Tensor] = None) -> Tensor:
    """Build the candidate kernel of paper eq. 2.

    ``W^{i,o} = einsum('ao,bi,abhw->oihw', P, Q, weight)``, differentiable in all three.

    Args:
        weight: meta-weight ``[C_out, C_in, *kernel]`` (``kernel`` may be empty, as for a
            linear layer).
        P: output-side transform ``[C_out, c_o]``; ``None`` is the identity (``c_o = C_out``).
        Q: input-side transform ``[C_in, c_i]``; ``None`` is the identity (``c_i = C_in``).

    Returns:
        The candidate kernel ``[c_o, c_i, *kernel]``, in ``weight``'s dtype and device.
    """
    _check_transforms(weight, P, Q)
    return ops.construct(weight, P, Q)


def aps_conv2d(input: Tensor, weight: Tensor, P: Optional[Tensor], Q: Optional[Tensor] = None,
               bias: Optional[Tensor] = None, stride: _IntOrPair = 1, padding: Union[_IntOrPair, str] = 0,
               dilation: _IntOrPair = 1, groups: int = 1) -> Tensor:
    """``conv2d`` with the candidate kernel ``construct(weight, P, Q)``.

    Args:
        input: ``[N, c_i·groups, H, W]``.
        weight: meta-weight ``[C_out, C_in, kh, kw]``; a depthwise conv has ``C_in = 1``, uses
            ``P`` only and ``groups = c_o``.
        P, Q: as in :func:`construct`.
        bias: meta-bias ``[C_out]``, projected with the kernel as ``Pᵀ·bias`` (``[c_o]``).
        stride, padding, dilation, groups: as in :func:`torch.nn.functional.conv2d`.

    Returns:
        ``[N, c_o, H', W']``.
    """
    _check_transforms(weight, P, Q)
    _checks.tensor("weight", weight, ndim=4, layout="(C_out, C_in, kh, kw)")
    _checks.tensor("input", input, ndim=4, layout="(N, C, H, W)")
    _checks.input_kind("input", input, weight)
    _checks.positive_int("groups", groups)
    stride, dilation = _checks.pair("stride", stride, minimum=1), _checks.pair("dilation", dilation, minimum=1)
    if input.shape[2] == 0 or input.shape[3] == 0:
        raise ValueError(f"input must have a height and a width ≥ 1, got shape {tuple(input.shape)}")
    if not isinstance(padding, str):
        padding = _checks.pair("padding", padding, minimum=0)
        for d, name in ((0, "height"), (1, "width")):
            span = dilation[d] * (weight.shape[2 + d] - 1) + 1
            if input.shape[2 + d] + 2 * padding[d] < span:
                raise ValueError(f"input {name} {input.shape[2 + d]} + 2 × padding {padding[d]} must be ≥ the "
                                 f"dilated kernel's {span}, got shape {tuple(input.shape)}")
    c_o = weight.shape[0] if P is None else P.shape[1]
    if c_o % groups:
        raise ValueError(f"groups={groups} must divide the candidate output width c_o={c_o}")
    c_i = weight.shape[1] if Q is None else Q.shape[1]
    _checks.dim_size("input", input, 1, c_i * groups,
                     f"the candidate input width {c_i} × groups {groups}")
    if bias is not None:
        _checks.tensor("bias", bias, ndim=1, layout="(C_out,)")
        _checks.same_kind("bias", bias, "weight", weight)
        _checks.dim_size("bias", bias, 0, weight.shape[0], "weight.shape[0], the meta output width")
        if P is not None:
            bias = bias @ P
    kernel = ops.construct(weight, P, Q)
    return F.conv2d(input, kernel, bias, stride, padding, dilation, groups)


def construct_grouped(weights: Sequence[Tensor], Ps: Sequence[Optional[Tensor]],
                      Qs: Optional[Sequence[Optional[Tensor]]] = None, *,
                      dtype: Optional[torch.dtype] = None) -> list[Tensor]:
    """The candidate kernels of many layers in one call: ``[construct(w, P, Q) …]``.

    One op call for a whole network instead of one per layer; the backward scatters every
    layer's weight gradient in one call too. Layers whose ``P`` or ``Q`` requires grad go
    through :func:`construct` (the grouped op does not differentiate the transforms). A
    kernel is channels_last where its meta-weight is (4-D, channels innermost, not 1×1), as
    a slice of that meta-weight would be.

    Args:
        weights: meta-weights ``[C_out, C_in, *kernel]``, one per layer, all of one dtype and
            device.
        Ps: output-side transforms (or ``None``), one per layer.
        Qs: input-side transforms (or ``None``), one per layer; ``None`` for all-identity.
        dtype: the kernels' floating dtype (default: the weights'). They are built in the
            weights' dtype and then cast, inside the op: under autocast, the dtype the
            convolutions would cast them to, without a cast and an autograd node per layer.
    """
    if isinstance(weights, Tensor) or not isinstance(weights, Sequence) or len(weights) == 0:
        raise TypeError(f"weights must be a non-empty sequence of tensors, got {type(weights).__name__}")
    Qs = [None] * len(weights) if Qs is None else Qs
    for name, seq in (("Ps", Ps), ("Qs", Qs)):
        if isinstance(seq, Tensor) or not isinstance(seq, Sequence) or len(seq) != len(weights):
            raise ValueError(f"{name} must be a sequence of {len(weights)} transforms (one per weight), "
                             f"got {type(seq).__name__} of length {len(seq) if isinstance(seq, Sequence) else '-'}")
    for l, (w, P, Q) in enumerate(zip(weights, Ps, Qs)):
        try:
            _checks.tensor("weight", w)
            _checks.same_kind("weight", w, "weights[0]", weights[0])
            _check_transforms(w, P, Q)
        except (TypeError, ValueError) as err:
            raise type(err)(f"layer {l}: {err}") from None
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise TypeError(f"dtype must be a floating torch.dtype or None, got {dtype!r}")
    dtype = None if dtype == weights[0].dtype else dtype
    trained = [any(M is not None and M.requires_grad for M in (P, Q)) for P, Q in zip(Ps, Qs)]
    if not any(trained):
        return ops.build_grouped(list(weights), list(Ps), list(Qs), dtype)
    grouped = [l for l, t in enumerate(trained) if not t]
    kernels = [ops.construct(w, P, Q).to(dtype or w.dtype) if t else None
               for w, P, Q, t in zip(weights, Ps, Qs, trained)]
    if grouped:
        built = ops.build_grouped([weights[l] for l in grouped], [Ps[l] for l in grouped],
                                      [Qs[l] for l in grouped], dtype)
        for l, kernel in zip(grouped, built):
            kernels[l] = kernel
    return kernels
