"""The Triton backend: thin adapters over the kernels of ``apsfast.kernels``.

Serves CUDA tensors, and CPU tensors when ``TRITON_INTERPRET=1`` was set before triton was
first imported (the interpreter, for tests). Dtypes: float32, float16, bfloat16 and float64
(tl.dot accumulates float64 blocks in float64). The construction of one layer is two launches
(one mode product each), of all layers of a network two launches in all, the transition of a
network two launches; ``dP``/``dQ`` of the (rarely needed) trained-transform ablation use
torch matmuls on a Triton-built partial product.

Results are contiguous and in the input dtype.
"""
from __future__ import annotations

import os
from typing import Optional, Sequence

try:
    import triton  # noqa: F401  (the kernels below need it; fail here with the reason)
except ImportError as err:
    raise ImportError(f"the Triton backend needs the 'triton' package, which did not import: {err}") from err

import torch
from torch import Tensor

from apsfast._backends import sharing_torch
from apsfast.kernels import construct as _construct
from apsfast.kernels import transition as _transition
from apsfast.kernels.common import INTERPRETED

_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def supports(device: torch.device, dtype: torch.dtype) -> bool:
    if dtype not in _DTYPES:
        return False
    if device.type == "cuda":
        return not INTERPRETED
    # CPU tensors only through the interpreter, and only if the kernels were built for it.
    return device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1" and INTERPRETED


def _like(M: Optional[Tensor], ref: Tensor) -> Optional[Tensor]:
    """A transform in the weight's dtype (the kernels take one dtype per operand pair)."""
    return M if M is None or M.dtype == ref.dtype else M.to(ref.dtype)


# Φ of one layer: no kernel of its own (the batched transition computes it fused), torch ops.
sharing_level = sharing_torch.sharing_level
sharing_level_backward = sharing_torch.sharing_level_backward


def construct(weight: Tensor, P: Optional[Tensor], Q: Optional[Tensor]) -> Tensor:
    return _construct.construct_forward(weight, _like(P, weight), _like(Q, weight))


def construct_backward(grad: Tensor, weight: Tensor, P: Optional[Tensor], Q: Optional[Tensor],
                       need_weight: bool, need_P: bool, need_Q: bool) -> list[Tensor]:
    P, Q, grad = _like(P, weight), _like(Q, weight), grad.to(weight.dtype)
    grads = []
    if need_weight:
        # dW = P · g · Qᵀ over the channel modes: the construction with transposed transforms,
        # read through their strides.
        grads.append(_construct.construct_forward(grad, None if P is None else P.t(),
                                                  None if Q is None else Q.t()))
    if need_P and P is not None:
        # dP[a, o] = Σ_{i,s} (W ×₂ Q)[a, i, s] · g[o, i, s]
        wq = weight if Q is None else _construct.construct_forward(weight, None, Q)
        grads.append((wq.reshape(wq.shape[0], -1) @ grad.reshape(grad.shape[0], -1).t()).contiguous())
    if need_Q and Q is not None:
        # dQ[b, i] = Σ_{o,s} (W ×₁ P)[o, b, s] · g[o, i, s]
        pw = _construct.weight_3d(weight if P is None else _construct.construct_forward(weight, P, None))
        g3 = _construct.weight_3d(grad)
        grads.append(torch.einsum("obs,ois->bi", pw, g3).contiguous())
    return grads


def construct_grouped(weights: Sequence[Tensor], Ps: Sequence[Optional[Tensor]],
                      Qs: Sequence[Optional[Tensor]]) -> list[Tensor]:
    return _construct.construct_grouped_forward(
        list(weights), [_like(P, w) for P, w in zip(Ps, weights)], [_like(Q, w) for Q, w in zip(Qs, weights)])


def transition_step_all(Ms: Sequence[Tensor], widths: Sequence[int], counts: Sequence[int],
                        partner: Sequence[int], tau: float, relative: bool = False) -> Tensor:
    return _transition.transition_step_all_forward(list(Ms), list(widths), list(counts), list(partner), tau,
                                                   relative)

