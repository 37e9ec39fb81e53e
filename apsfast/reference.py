"""Plain-PyTorch reference of every APS op.

This module is the oracle of the test suite and the fallback backend when no compiled
backend serves a device or dtype. It favours the paper's equations over speed, with one
exception: the construction never forms the outer product of P and Q (einsum over three
operands would), it applies the two mode products one after the other, cheapest first.

Shapes follow PyTorch's conv layout:

* ``weight``: ``[C_out, C_in, *kernel]`` meta-weight (``kernel`` may be empty: a linear layer);
* ``P``: ``[C_out, c_o]`` output-side transform, ``Q``: ``[C_in, c_i]`` input-side transform;
  ``None`` stands for the identity on that side;
* candidate kernel: ``[c_o, c_i, *kernel]``.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from apsfast._order import p_first


def supports(device: torch.device, dtype: torch.dtype) -> bool:
    """The reference runs on every device and floating dtype torch supports."""
    return True


def standard_strides(t: Tensor) -> Tensor:
    """``t`` contiguous with the strides of a fresh tensor, also on its unit dims (a view when
    it already is contiguous).

    ``conv2d`` infers a weight's memory format from its strides: a ``[c_o, c_i, 1, 1]`` kernel
    whose unit dims carry the stride ``c_i`` (what einsum returns) reads as channels_last, and
    the CPU conv backward of PyTorch 2.13 then writes past its buffers at stride 2 (heap
    corruption). Every construction returns kernels with these strides.
    """
    dense = t.contiguous()
    return dense.view(-1).view(dense.shape)


def channels_last_kernel(weight: Tensor) -> bool:
    """Whether the candidate kernels of ``weight`` are channels_last (every backend's rule; the
    twin of ``csrc/common/layout.h``): a 4-D weight with its channels innermost (a
    channels_last meta-weight, or a channel slice of one) and a spatial extent, so that a
    channels_last run's convolutions take its kernels as they are. 1×1 kernels keep
    :func:`standard_strides`."""
    return (weight.dim() == 4 and weight.shape[1] > 1 and weight.shape[2] * weight.shape[3] > 1
            and weight.stride(1) == 1)


def _mode_product(weight: Tensor, M: Tensor, mode: int) -> Tensor:
    """``weight ×_mode Mᵀ``: contract dim ``mode`` (0 or 1) of ``weight`` with the rows of ``M``."""
    # S computed, not inferred, so that an empty candidate (a zero-size mode) reshapes too.
    flat = weight.reshape(weight.shape[0], weight.shape[1], math.prod(weight.shape[2:]))
    if mode == 0:
        out = torch.einsum("ao,abs->obs", M, flat)
    else:
        out = torch.einsum("bi,abs->ais", M, flat)
    return standard_strides(out.reshape(out.shape[0], out.shape[1], *weight.shape[2:]))


def construct(weight: Tensor, P: Optional[Tensor], Q: Optional[Tensor]) -> Tensor:
    """Candidate kernel, paper eq. 2: ``W^{i,o} = einsum('ao,bi,abhw->oihw', P, Q, W)``."""
    if P is None and Q is None:
        return weight.clone(memory_format=torch.contiguous_format)
    if P is None:
        return _mode_product(weight, Q, 1)
    if Q is None:
        return _mode_product(weight, P, 0)
    # Both orders give the same kernel; take the cheaper one (apsfast._order).
    if p_first(*P.shape, *Q.shape):
        return _mode_product(_mode_product(weight, P, 0), Q, 1)
    return _mode_product(_mode_product(weight, Q, 1), P, 0)


def construct_backward(grad: Tensor, weight: Tensor, P: Optional[Tensor], Q: Optional[Tensor],
                       need_weight: bool, need_P: bool, need_Q: bool) -> list[Tensor]:
    """Gradients of :func:`construct` for the inputs flagged ``need_*``, in the order W, P, Q
    (contiguous, whatever the inputs' layout).

    ``dW = P · dW^{i,o} · Qᵀ`` over the channel modes, which is itself a construction with the
    transposed transforms; ``dP[a, o] = Σ (W ×₂ Qᵀ)[a, i, s] · g[o, i, s]`` and ``dQ`` likewise.
    """
    grads = []
    if need_weight:
        grads.append(construct(grad, None if P is None else P.t(), None if Q is None else Q.t()))
    if need_P:
        wq = weight if Q is None else _mode_product(weight, Q, 1)
        grads.append(standard_strides(torch.einsum("ai...,oi...->ao", wq, grad)))
    if need_Q:
        pw = weight if P is None else _mode_product(weight, P, 0)
        grads.append(standard_strides(torch.einsum("ob...,oi...->bi", pw, grad)))
    return grads


def construct_grouped(weights: Sequence[Tensor], Ps: Sequence[Optional[Tensor]],
                      Qs: Sequence[Optional[Tensor]]) -> list[Tensor]:
    """The candidate kernels of many layers: ``[construct(w, P, Q) for each layer]``.

    Its backward is itself a grouped construction, ``dW_l = construct(g_l, P_lᵀ, Q_lᵀ)``.
    """
    return [construct(w, P, Q) for w, P, Q in zip(weights, Ps, Qs)]


def sharing_score(Ms: Sequence[Tensor]) -> Tensor:
    """One side's factor of eq. 4: ``S(M) = Σ_{a ≤ ã} ‖M^{aᵀ} M^{ã}‖²_F``.

    With ``M = [M^1 … M^A]`` and Gram ``G = MᵀM``, ``S = ½‖G‖²_F + ½ Σ_a ‖G_aa‖²_F``; the Gram
    is formed on the smaller side since ``‖MᵀM‖_F = ‖MMᵀ‖_F``.
    """
    M = torch.cat(list(Ms), dim=1)
    gram = M @ M.t() if M.shape[0] < M.shape[1] else M.t() @ M
    diagonal = sum(((m.t() @ m) ** 2).sum() for m in Ms)
    return 0.5 * (gram ** 2).sum() + 0.5 * diagonal


def sharing_score_grad(Ms: Sequence[Tensor]) -> list[Tensor]:
    """``∂S/∂M^a = 2 (M Mᵀ) M^a + 2 M^a (M^{aᵀ} M^a)``, i.e. ``2 M (G + blockdiag G_aa)``."""
    M = torch.cat(list(Ms), dim=1)
    outer = M @ M.t()
    return [2.0 * (outer @ m + m @ (m.t() @ m)) for m in Ms]


def sharing_level(Ps: Optional[Sequence[Tensor]], Qs: Optional[Sequence[Tensor]]) -> Tensor:
    """Φ of one layer, eq. 4: ``Φ = S(Q) · S(P)``; a side given as ``None`` (or empty)
    contributes 1."""
    factors = [sharing_score(Ms) for Ms in (Ps, Qs) if Ms]
    return factors[0] * factors[1] if len(factors) == 2 else factors[0]


def sharing_level_backward(grad: Tensor, Ps: Optional[Sequence[Tensor]],
                           Qs: Optional[Sequence[Tensor]]) -> list[Tensor]:
    """``grad · ∂Φ/∂M`` for every transform, those of ``Ps`` then those of ``Qs``:
    ``∂Φ/∂P^a = S(Q) · ∂S(P)/∂P^a`` and ``∂Φ/∂Q^a = S(P) · ∂S(Q)/∂Q^a`` (eq. 4)."""
    sides = [Ms for Ms in (Ps, Qs) if Ms]
    scores = [sharing_score(Ms) for Ms in sides]
    grads = []
    for k, Ms in enumerate(sides):
        scale = grad * scores[1 - k] if len(sides) == 2 else grad
        grads.extend(scale * g for g in sharing_score_grad(Ms))
    return grads


def _step_sides(sides: Sequence[Sequence[Tensor]], partner: Sequence[int], tau: float,
                relative: bool = False) -> Tensor:
    """Eq. 5 on every block of every side, in place; ``partner[s]`` is the other side of the
    same layer or ``-1``. With ``relative`` every side steps by ``τ ∂S/∂p`` (eq. 5's step
    divided by the partner's ``S``). Returns ``Σ_layers S(P)·S(Q)`` before the step (float32
    or wider).

    Every new value is known before any is written, so transforms that are overlapping views
    of one tensor all step from the same point.
    """
    with torch.no_grad():
        work = [[m.float() if m.dtype in (torch.float16, torch.bfloat16) else m for m in side]
                for side in sides]
        scores = [sharing_score(side) for side in work]
        phi = sum(score * (scores[p] if p >= 0 else 1.0)
                  for s, (score, p) in enumerate(zip(scores, partner)) if p < s)
        updates = []
        for s, (side, blocks) in enumerate(zip(work, sides)):
            other = scores[partner[s]] if partner[s] >= 0 and not relative else 1.0
            for m, block, g in zip(side, blocks, sharing_score_grad(side)):
                updates.append((block, F.normalize(m - tau * other * g, dim=0)))
        for block, new in updates:
            block.copy_(new)
    return phi


def transition_step(Ps: Optional[Sequence[Tensor]], Qs: Optional[Sequence[Tensor]],
                    tau: float, relative: bool = False) -> Tensor:
    """One projected-gradient step of eq. 5 on every column of every P and Q, in place.

    ``p ← (p − τ ∂Φ/∂p) / ‖p − τ ∂Φ/∂p‖₂`` with ``∂Φ/∂P = S(Q) ∂S(P)/∂P`` and
    ``∂Φ/∂Q = S(P) ∂S(Q)/∂Q``; ``relative`` drops the partner factors ``S(Q)``, ``S(P)``.
    Every gradient is taken before any matrix moves. Returns Φ before the step.
    """
    sides = [Ms for Ms in (Ps, Qs) if Ms is not None]
    return _step_sides(sides, [1, 0] if len(sides) == 2 else [-1], tau, relative)


def transition_step_autograd(Ps: Optional[Sequence[Tensor]], Qs: Optional[Sequence[Tensor]], tau: float,
                             relative: bool = False) -> Tensor:
    """:func:`transition_step` the way plain PyTorch code would write it: Φ of the layer by
    autograd (``relative``: each side's ``S`` by autograd), then the projected update. The
    baseline the benchmarks measure the batched closed form against; returns Φ before it."""
    sides = [list(Ms) for Ms in (Ps, Qs) if Ms is not None]
    leaves = [M.detach().requires_grad_(True) for Ms in sides for M in Ms]
    with torch.enable_grad():
        split = [leaves[:len(sides[0])], leaves[len(sides[0]):]]
        scores = [sharing_score(Ms) for Ms in split[:len(sides)]]
        phi = scores[0] * scores[1] if len(scores) == 2 else scores[0]
        objective = sum(scores) if relative else phi
        grads = torch.autograd.grad(objective, leaves)
    with torch.no_grad():
        for M, leaf, g in zip((M for Ms in sides for M in Ms), leaves, grads):
            M.copy_(F.normalize(leaf - tau * g, dim=0))
    return phi.detach()


def transition_step_all(Ms: Sequence[Tensor], widths: Sequence[int], counts: Sequence[int],
                        partner: Sequence[int], tau: float, relative: bool = False) -> Tensor:
    """:func:`transition_step` for every layer of a network at once, in place.

    Each *side* (the P or the Q of one layer) is one matrix ``Ms[s]`` ``[C_s, n_s]`` holding its
    candidates' transforms side by side: ``counts[s]`` blocks whose widths follow one another
    in ``widths`` (so ``Σ`` of a side's widths is ``n_s``). ``partner[s]`` is the index of the
    other side of the same layer, or ``-1`` for a layer with one side (factor 1).

    Returns the network's Φ before the step: ``Σ_layers S(P)·S(Q)`` (float32 or wider).
    """
    sides, start = [], 0
    for M, count in zip(Ms, counts):
        sides.append(torch.split(M, list(widths[start:start + count]), dim=1))  # views of M
        start += count
    return _step_sides(sides, partner, tau, relative)
