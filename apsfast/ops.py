"""``torch.library`` custom ops of apsfast, with fake (meta) implementations and autograd.

Each op dispatches at call time to the backend chosen by :mod:`apsfast._backends` for the
device and dtype of its tensors (or forced by ``APSFAST_BACKEND``). The ops are opaque to
``torch.compile``: their fake implementations read only shapes and dtypes, so a traced APS
layer has no graph break.

These are the unchecked entry points; :mod:`apsfast.functional` validates user input first.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from apsfast import _backends


def _out_shape(weight: Tensor, P: Optional[Tensor], Q: Optional[Tensor]) -> tuple[int, ...]:
    c_o = weight.shape[0] if P is None else P.shape[1]
    c_i = weight.shape[1] if Q is None else Q.shape[1]
    return (c_o, c_i, *weight.shape[2:])


@torch.library.custom_op("apsfast::construct", mutates_args=())
def construct(weight: Tensor, P: Optional[Tensor], Q: Optional[Tensor]) -> Tensor:
    """Candidate kernel ``einsum('ao,bi,abhw->oihw', P, Q, weight)`` (paper eq. 2), contiguous.

    weight ``[C_out, C_in, *kernel]``, P ``[C_out, c_o]`` or None, Q ``[C_in, c_i]`` or None
    → ``[c_o, c_i, *kernel]``.
    """
    return _backends.select("construct", weight.device, weight.dtype).construct(weight, P, Q)


@construct.register_fake
def _construct_fake(weight: Tensor, P: Optional[Tensor], Q: Optional[Tensor]) -> Tensor:
    for name, M, dim in (("P", P, 0), ("Q", Q, 1)):
        if M is not None:
            torch._check(M.dim() == 2, lambda: f"{name} must be 2-D")
            torch._check(M.shape[0] == weight.shape[dim],
                         lambda: f"{name}.shape[0] must equal weight.shape[{dim}]")
    return weight.new_empty(_out_shape(weight, P, Q))


@torch.library.custom_op("apsfast::construct_backward", mutates_args=())
def construct_backward(grad: Tensor, weight: Tensor, P: Optional[Tensor], Q: Optional[Tensor],
                       need_weight: bool, need_P: bool, need_Q: bool) -> list[Tensor]:
    """Gradients of :func:`construct` w.r.t. the inputs flagged ``need_*``, in the order W, P, Q."""
    backend = _backends.select("construct_backward", weight.device, weight.dtype)
    return backend.construct_backward(grad, weight, P, Q, need_weight, need_P, need_Q)


@construct_backward.register_fake
def _construct_backward_fake(grad, weight, P, Q, need_weight, need_P, need_Q) -> list[Tensor]:
    wanted = ((need_weight, weight), (need_P, P), (need_Q, Q))
    return [t.new_empty(t.shape) for need, t in wanted if need and t is not None]


def _construct_setup_context(ctx, inputs, output) -> None:
    # W, P and Q are parameters (or views of them): saving them keeps no extra memory alive.
    ctx.save_for_backward(*inputs)


def _construct_backward(ctx, grad: Tensor):
    weight, P, Q = ctx.saved_tensors
    need_weight, need_P, need_Q = ctx.needs_input_grad
    grads = iter(construct_backward(grad, weight, P, Q, need_weight, need_P, need_Q))
    return tuple(next(grads) if need else None for need in ctx.needs_input_grad)


construct.register_autograd(_construct_backward, setup_context=_construct_setup_context)
