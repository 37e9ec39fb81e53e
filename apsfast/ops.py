"""``torch.library`` custom ops of apsfast, with fake (meta) implementations and autograd.

Each op dispatches at call time to the backend chosen by :mod:`apsfast._backends` for the
device and dtype of its tensors (or forced by ``APSFAST_BACKEND``). The ops are opaque to
``torch.compile``: their fake implementations read only shapes and dtypes, so a traced APS
layer has no graph break.

These are the unchecked entry points; :mod:`apsfast.functional` validates user input first.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Optional, Sequence

import torch
from torch import Tensor

from apsfast import _backends
from apsfast.reference import channels_last_kernel


def _emitted(kernel: Tensor, weight: Tensor, dtype: Optional[torch.dtype] = None) -> Tensor:
    """A backend's kernel in the memory format of its meta-weight (channels_last where
    :func:`~apsfast.reference.channels_last_kernel`; a view where the backend built it so) and
    in ``dtype`` (default: its own)."""
    if channels_last_kernel(weight):
        kernel = kernel.contiguous(memory_format=torch.channels_last)
    return kernel if dtype is None or dtype == kernel.dtype else kernel.to(dtype)


def _empty_kernel(weight: Tensor, P: Optional[Tensor], Q: Optional[Tensor],
                  dtype: Optional[torch.dtype] = None) -> Tensor:
    """What :func:`_emitted` returns, uninitialised: the fake implementations' output."""
    kernel = weight.new_empty(_out_shape(weight, P, Q), dtype=dtype)
    return kernel.contiguous(memory_format=torch.channels_last) if channels_last_kernel(weight) else kernel


def _out_shape(weight: Tensor, P: Optional[Tensor], Q: Optional[Tensor]) -> tuple[int, ...]:
    c_o = weight.shape[0] if P is None else P.shape[1]
    c_i = weight.shape[1] if Q is None else Q.shape[1]
    return (c_o, c_i, *weight.shape[2:])


@torch.library.custom_op("apsfast::construct", mutates_args=())
def construct(weight: Tensor, P: Optional[Tensor], Q: Optional[Tensor]) -> Tensor:
    """Candidate kernel ``einsum('ao,bi,abhw->oihw', P, Q, weight)`` (paper eq. 2): dense, with
    standard strides, or channels_last where the meta-weight has its channels innermost
    (:func:`~apsfast.reference.channels_last_kernel`).

    weight ``[C_out, C_in, *kernel]``, P ``[C_out, c_o]`` or None, Q ``[C_in, c_i]`` or None
    → ``[c_o, c_i, *kernel]``.
    """
    return _emitted(_backends.select("construct", weight.device, weight.dtype).construct(weight, P, Q), weight)


@construct.register_fake
def _construct_fake(weight: Tensor, P: Optional[Tensor], Q: Optional[Tensor]) -> Tensor:
    for name, M, dim in (("P", P, 0), ("Q", Q, 1)):
        if M is not None:
            torch._check(M.dim() == 2, lambda: f"{name} must be 2-D")
            torch._check(M.shape[0] == weight.shape[dim],
                         lambda: f"{name}.shape[0] must equal weight.shape[{dim}]")
    return _empty_kernel(weight, P, Q)


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


@torch.library.custom_op("apsfast::construct_grouped", mutates_args=())
def construct_grouped(weights: list[Tensor], Ps: list[Optional[Tensor]], Qs: list[Optional[Tensor]],
                      dtype: Optional[torch.dtype] = None) -> list[Tensor]:
    """The candidate kernels of many layers in one call (one launch per mode product on the
    compiled backends), each laid out as :func:`construct`'s. All tensors share one device and
    dtype; the kernels are built in it and emitted in ``dtype`` (default: the same), e.g. the
    autocast dtype their convolutions would cast them to one by one."""
    return _grouped(weights, Ps, Qs, dtype)


def _grouped(weights: list[Tensor], Ps: list[Optional[Tensor]], Qs: list[Optional[Tensor]],
             dtype: Optional[torch.dtype]) -> list[Tensor]:
    """What :func:`construct_grouped` computes, on the backend for the weights' device and dtype."""
    backend = _backends.select("construct_grouped", weights[0].device, weights[0].dtype)
    return [_emitted(k, w, dtype) for k, w in zip(backend.construct_grouped(weights, Ps, Qs), weights)]


@construct_grouped.register_fake
def _construct_grouped_fake(weights, Ps, Qs, dtype=None) -> list[Tensor]:
    return [_empty_kernel(w, P, Q, dtype) for w, P, Q in zip(weights, Ps, Qs)]


def _construct_grouped_setup_context(ctx, inputs, output) -> None:
    weights, Ps, Qs, dtype = inputs
    ctx.transforms = (Ps, Qs)
    ctx.dtype = weights[0].dtype
    # torch.library hands the backward's result the structure of the arguments given, and a
    # dtype left at its default is not among them.
    ctx.dtype_given = dtype is not None


def _dense(grad: Tensor, dtype: torch.dtype) -> Tensor:
    """``grad`` in ``dtype`` over dense memory, keeping a channels_last layout (which gives a
    channels_last meta-weight its gradient in its own layout)."""
    if not (grad.is_contiguous() or grad.is_contiguous(memory_format=torch.channels_last)):
        grad = grad.contiguous()
    return grad.to(dtype)


def _weight_grads(grads: Sequence[Tensor], Ps: Sequence[Optional[Tensor]], Qs: Sequence[Optional[Tensor]],
                  dtype: torch.dtype, build: Callable[..., list[Tensor]]) -> list[Tensor]:
    """The meta-weights' gradients of a grouped construction, in the weights' ``dtype``:
    dW_l = P_l · g_l · Q_lᵀ, itself a grouped construction with the transposed transforms, by
    ``build`` (differentiable in turn). The transforms get no gradient here:
    apsfast.construct_grouped sends layers whose transforms require grad through the per-layer
    op instead."""
    transpose = [None if M is None else M.t() for M in Ps], [None if M is None else M.t() for M in Qs]
    return build([_dense(g, dtype) for g in grads], *transpose)


def _construct_grouped_backward(ctx, grads: list[Tensor]):
    Ps, Qs = ctx.transforms
    # The op itself, which torch.compile can trace (the backends' kernels have no fake twin).
    dweights = _weight_grads(grads, Ps, Qs, ctx.dtype, construct_grouped)
    # The gradient of a list argument mirrors its structure: torch.library treats a list that
    # holds a None as one leaf, and a list of tensors as a list.
    transforms = (None if any(M is None for M in Ms) else [None] * len(Ms) for Ms in (Ps, Qs))
    return (dweights, *transforms, *((None,) if ctx.dtype_given else ()))


construct_grouped.register_autograd(_construct_grouped_backward, setup_context=_construct_grouped_setup_context)


class _GroupedConstruction(torch.autograd.Function):
    """:func:`construct_grouped` with the same forward and backward, as a plain autograd
    function: without the custom op's dispatch and argument trees around each call, a
    network's build and its gradient cost about 0.4 ms less host time a step (27 layers)."""

    @staticmethod
    def forward(ctx, layers: int, dtype: Optional[torch.dtype], *operands: Optional[Tensor]) -> tuple[Tensor, ...]:
        weights, Ps, Qs = (list(operands[k * layers:(k + 1) * layers]) for k in range(3))
        ctx.transforms = (Ps, Qs)  # not saved: parameters (views of them), kept alive anyway
        ctx.dtype = weights[0].dtype
        device = weights[0].device.type
        # As the op's autocast registration: built in the weights' own precision.
        autocast = torch.amp.is_autocast_available(device) and torch.is_autocast_enabled(device)
        with torch.autocast(device, enabled=False) if autocast else contextlib.nullcontext():
            return tuple(_grouped(weights, Ps, Qs, dtype))

    @staticmethod
    def backward(ctx, *grads: Tensor) -> tuple[Optional[Tensor], ...]:
        dweights = _weight_grads(grads, *ctx.transforms, ctx.dtype, build_grouped)
        return (None, None, *dweights, *(None,) * (2 * len(dweights)))


def build_grouped(weights: list[Tensor], Ps: list[Optional[Tensor]], Qs: list[Optional[Tensor]],
                  dtype: Optional[torch.dtype] = None) -> list[Tensor]:
    """:func:`construct_grouped` with autograd, at the least host cost: the custom op where
    ``torch.compile`` traces (it is opaque there), else the same computation as a plain
    autograd function, which runs a search step's build at a fraction of the op's dispatch."""
    if torch.compiler.is_compiling():
        return construct_grouped(weights, Ps, Qs, dtype)
    return list(_GroupedConstruction.apply(len(weights), dtype, *weights, *Ps, *Qs))


@torch.library.custom_op("apsfast::sharing_level", mutates_args=())
def sharing_level(Ps: list[Tensor], Qs: list[Tensor]) -> Tensor:
    """Φ of one layer (paper eq. 4), ``S(P) · S(Q)``, a 0-d tensor; an empty side (the
    identity) contributes 1. All transforms share one device and dtype. See
    :func:`apsfast.reference.sharing_level`."""
    first = (Ps or Qs)[0]
    return _backends.select("sharing_level", first.device, first.dtype).sharing_level(Ps, Qs)


@sharing_level.register_fake
def _sharing_level_fake(Ps, Qs) -> Tensor:
    return (Ps or Qs)[0].new_empty(())


@torch.library.custom_op("apsfast::sharing_level_backward", mutates_args=())
def sharing_level_backward(grad: Tensor, Ps: list[Tensor], Qs: list[Tensor]) -> list[Tensor]:
    """``grad · ∂Φ/∂M`` for every transform, those of ``Ps`` then those of ``Qs``."""
    first = (Ps or Qs)[0]
    backend = _backends.select("sharing_level_backward", first.device, first.dtype)
    return backend.sharing_level_backward(grad, Ps, Qs)


@sharing_level_backward.register_fake
def _sharing_level_backward_fake(grad, Ps, Qs) -> list[Tensor]:
    return [M.new_empty(M.shape) for M in (*Ps, *Qs)]


def _sharing_level_setup_context(ctx, inputs, output) -> None:
    # Transforms are parameters (or views of them): saving them keeps no extra memory alive.
    Ps, Qs = inputs
    ctx.num_P = len(Ps)
    ctx.save_for_backward(*Ps, *Qs)


def _sharing_level_backward(ctx, grad: Tensor):
    saved = list(ctx.saved_tensors)
    grads = sharing_level_backward(grad, saved[:ctx.num_P], saved[ctx.num_P:])
    return grads[:ctx.num_P], grads[ctx.num_P:]


sharing_level.register_autograd(_sharing_level_backward, setup_context=_sharing_level_setup_context)


@torch.library.custom_op("apsfast::transition_step_all", mutates_args=("Ms",))
def transition_step_all(Ms: list[Tensor], widths: list[int], counts: list[int], partner: list[int],
                        tau: float, relative: bool = False) -> Tensor:
    """Eq. 5 on every side of every layer in one call, in place; returns the network's Φ
    before the step. See :func:`apsfast.reference.transition_step_all` for the layout."""
    return _transition(Ms, widths, counts, partner, tau, relative)


def _transition(Ms: list[Tensor], widths: list[int], counts: list[int], partner: list[int], tau: float,
                relative: bool) -> Tensor:
    """What :func:`transition_step_all` does, on the backend for the sides' device and dtype."""
    backend = _backends.select("transition_step_all", Ms[0].device, Ms[0].dtype)
    return backend.transition_step_all(Ms, widths, counts, partner, tau, relative)


def step_sides(Ms: list[Tensor], widths: list[int], counts: list[int], partner: list[int], tau: float,
               relative: bool = False) -> Tensor:
    """:func:`transition_step_all` at the least host cost: the custom op where ``torch.compile``
    traces, else its backend called directly (a quarter of a millisecond less a call), the
    sides' version counters then moved as the op's declared mutation moves them."""
    with torch.no_grad():  # the sides are stepped in place, trained or not
        if torch.compiler.is_compiling():
            return transition_step_all(Ms, widths, counts, partner, tau, relative)
        phi = _transition(Ms, widths, counts, partner, tau, relative)
    torch.autograd.graph.increment_version(Ms)
    return phi


@transition_step_all.register_fake
def _transition_step_all_fake(Ms, widths, counts, partner, tau, relative=False) -> Tensor:
    return Ms[0].new_empty((), dtype=_phi_dtype(Ms[0].dtype))


def _phi_dtype(dtype: torch.dtype) -> torch.dtype:
    """Φ is accumulated in float32 at least."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


# Under autocast the construction runs in float32 (the parameters' precision) and the conv
# that consumes the kernel casts it to the autocast dtype: bf16/fp16 in, fp32 accumulate.
for _device in ("cpu", "cuda"):
    torch.library.register_autocast("apsfast::construct", _device, torch.float32)
    torch.library.register_autocast("apsfast::construct_grouped", _device, torch.float32)
