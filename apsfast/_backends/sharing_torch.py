"""Φ of one layer (paper eq. 4) and its gradient in torch ops, for the compiled backends,
which have no kernel of their own for it (their fused kernels compute Φ inside the batched
transition). Each side's Gram is formed once, on the smaller side (``‖MᵀM‖ = ‖MMᵀ‖``), and
serves both its score and its gradient:

* ``S = ½‖G‖²_F + ½ Σ_a ‖G_aa‖²_F``, ``G = MᵀM``, ``G_aa = M_aᵀM_a``;
* ``∂S/∂M_a = 2 M G[:, a] + 2 M_a G_aa`` (tall side) ``= 2 (MMᵀ) M_a + 2 M_a G_aa`` (wide side).

Not a backend itself: ``cpu``, ``cuda`` and ``triton`` expose these functions as theirs.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor


def _side(Ms: Sequence[Tensor], need_grad: bool) -> tuple[Tensor, list[Tensor]]:
    """One side's score ``S`` and, if ``need_grad``, ``∂S/∂M_a`` for every block."""
    M = torch.cat(list(Ms), dim=1)
    tall = M.shape[0] >= M.shape[1]
    gram = M.t() @ M if tall else M @ M.t()
    own = [m.t() @ m for m in Ms]
    score = 0.5 * gram.square().sum() + 0.5 * sum(g.square().sum() for g in own)
    grads, col = [], 0
    for m, g in zip(Ms, own) if need_grad else ():
        coupled = M @ gram[:, col:col + m.shape[1]] if tall else gram @ m
        grads.append(2.0 * (coupled + m @ g))
        col += m.shape[1]
    return score, grads


def sharing_level(Ps: Optional[Sequence[Tensor]], Qs: Optional[Sequence[Tensor]]) -> Tensor:
    """``Φ = S(P) · S(Q)``; an empty side (or ``None``) contributes 1."""
    scores = [_side(Ms, False)[0] for Ms in (Ps, Qs) if Ms]
    return scores[0] * scores[1] if len(scores) == 2 else scores[0]


def sharing_level_backward(grad: Tensor, Ps: Optional[Sequence[Tensor]],
                           Qs: Optional[Sequence[Tensor]]) -> list[Tensor]:
    """``grad · ∂Φ/∂M`` for every transform of ``Ps`` then ``Qs``."""
    sides = [_side(Ms, True) for Ms in (Ps, Qs) if Ms]
    out = []
    for k, (_, grads) in enumerate(sides):
        scale = grad * sides[1 - k][0] if len(sides) == 2 else grad
        out.extend(scale * g for g in grads)
    return out
