"""The non-negative LASSO that :mod:`.ista` recovers its code with: the dictionary, one ISTA
step, the KKT conditions, and :func:`ista`, which solves ``min_{z ≥ 0} ½‖A z − b‖² + λ‖z‖₁``
to those conditions (FISTA until the closed form on the support it reaches meets them) and
is differentiable in ``b`` through that closed form."""
from __future__ import annotations

import math
from typing import NamedTuple, Sequence

import torch
from torch import Tensor

# The recovery stops once the closed form on its support meets the KKT conditions to this
# (an absolute residual; the codes' entries are of order 1).
KKT_TOLERANCE = 1e-9
# How often (in iterations) the recovery compares its support with the last one and tries
# the closed form on it.
CHECK_EVERY = 10


def dictionary(m: int, sizes: Sequence[int], generator: torch.Generator) -> Tensor:
    """A fixed ``m × Σ sizes`` Gaussian dictionary (float64) whose columns come in blocks of
    ``sizes`` (one per decision), each block centred (its mean column subtracted) and every
    column then scaled to unit norm.

    Centring keeps two candidates of one decision from sharing a column: a one-hot code is
    told apart only by the differences of its block's columns, and two equal columns (half
    of all draws with one row) give two candidates the same score whatever ``b`` is. A
    positive combination of a block's columns is zero (the centred columns sum to zero), so
    a level common to a block costs L1 and adds nothing to ``A z``: the LASSO keeps the
    sparsest code; the two candidates of a decision of two are opposite columns (with one
    row, a decision of two is the sign of ``b``)."""
    if any(size < 2 for size in sizes):
        raise ValueError(f"every block of the dictionary needs at least 2 candidates, got sizes {list(sizes)}")
    a = torch.randn(m, sum(sizes), generator=generator, dtype=torch.float64)
    blocks = [block - block.mean(dim=1, keepdim=True) for block in a.split(list(sizes), dim=1)]
    a = torch.cat(blocks, dim=1) if blocks else a
    return a / a.norm(dim=0, keepdim=True)


def step_size(a: Tensor) -> float:
    """ISTA's step ``1/‖a‖₂²`` (the inverse Lipschitz constant of the quadratic's gradient)."""
    return 1.0 / float(torch.linalg.matrix_norm(a, ord=2)) ** 2


def ista_step(z: Tensor, gram: Tensor, correlation: Tensor, sparsity: float, eta: float) -> Tensor:
    """One step of non-negative ISTA for ``min_{z ≥ 0} ½‖a z − b‖² + sparsity·‖z‖₁``:
    ``max(z − η(aᵀa z − aᵀb) − η·sparsity, 0)`` (``gram = aᵀa``, ``correlation = aᵀb``)."""
    return torch.clamp(z - eta * (gram @ z - correlation) - eta * sparsity, min=0.0)


def lasso_gradient(a: Tensor, b: Tensor, z: Tensor, sparsity: float) -> Tensor:
    """The gradient of the smooth part plus the L1 weight, ``aᵀ(a z − b) + sparsity``: zero on
    the support of the solution, non-negative off it (the KKT conditions for ``z ≥ 0``)."""
    return a.T @ (a @ z - b) + sparsity


def kkt_residual(a: Tensor, b: Tensor, z: Tensor, sparsity: float) -> float:
    """How far ``z`` is from the non-negative LASSO's solution: ``‖z − max(z − ∇, 0)‖∞`` with
    ``∇`` from :func:`lasso_gradient` (0 exactly at the solution)."""
    grad = lasso_gradient(a, b, z, sparsity)
    return float((z - torch.clamp(z - grad, min=0.0)).abs().max()) if len(z) else 0.0


class Recovered(NamedTuple):
    """A recovered code: ``z`` (differentiable in ``b``), the values ISTA thresholds at it
    (``z − η∇``, differentiable; equal to ``z`` on the support, ``≤ 0`` off it), the
    iterations taken and the KKT residual reached."""

    z: Tensor
    scores: Tensor
    iterations: int
    residual: float


def _on_support(a: Tensor, b: Tensor, support: Tensor, sparsity: float) -> Tensor:
    """The exact solution with ``support``: ``z_S = (a_Sᵀa_S)⁻¹(a_Sᵀb − sparsity)``, zero
    elsewhere, differentiable in ``b`` (where ``a_S`` has dependent columns, e.g. two equal
    ones in a one-row dictionary, the least-norm one of the solutions)."""
    z = torch.zeros(a.shape[1], dtype=b.dtype, device=b.device)
    if not bool(support.any()):
        return z
    columns = a[:, support]
    gram, rhs = columns.T @ columns, columns.T @ b - sparsity
    try:
        values = torch.linalg.solve(gram, rhs)
    except RuntimeError:  # torch.linalg.LinAlgError: a singular system
        values = torch.linalg.pinv(gram, hermitian=True) @ rhs
    return z.index_put((support.nonzero().squeeze(1),), values)


def ista(a: Tensor, b: Tensor, sparsity: float, iterations: int, *, tolerance: float = KKT_TOLERANCE) -> Recovered:
    """The non-negative LASSO ``min_{z ≥ 0} ½‖a z − b‖² + sparsity·‖z‖₁`` (see the module's
    documentation): FISTA from ``z = 0``, every :data:`CHECK_EVERY` iterations the closed form
    on a support that has not changed since the last check, accepted once it is non-negative
    and meets the KKT conditions within ``tolerance``; at most ``iterations`` iterations (then
    the last iterate, with the closed form's derivative on its support)."""
    n = a.shape[1]
    if n == 0:
        empty = b.new_zeros(0)
        return Recovered(empty, empty, 0, 0.0)
    eta = step_size(a)
    with torch.no_grad():
        target = b.detach()
        gram, correlation = a.T @ a, a.T @ target
        z = torch.zeros(n, dtype=b.dtype, device=b.device)
        y, t, last, found, done = z, 1.0, None, None, iterations
        for it in range(1, iterations + 1):
            new = ista_step(y, gram, correlation, sparsity, eta)
            t_next = (1 + math.sqrt(1 + 4 * t * t)) / 2
            y, z, t = new + (t - 1) / t_next * (new - z), new, t_next
            if it % CHECK_EVERY and it < iterations:
                continue
            support = z > 0
            if last is not None and torch.equal(support, last):
                exact = _on_support(a, target, support, sparsity)
                if bool((exact >= 0).all()) and kkt_residual(a, target, exact, sparsity) <= tolerance:
                    found, done = support, it
                    break
            last = support
    if found is not None:
        solution = _on_support(a, b, found, sparsity)
    else:  # not converged: the iterate, with the closed form's derivative on its support
        support = z > 0
        solution = z.clone()
        if bool(support.any()) and b.requires_grad:
            solution = solution.index_put((support.nonzero().squeeze(1),),
                                          z[support] + torch.linalg.pinv(a[:, support]) @ (b - target))
    scores = torch.where(solution > 0, solution, -eta * lasso_gradient(a, b, solution, sparsity))
    return Recovered(solution, scores, done, kkt_residual(a, target, solution.detach(), sparsity))
