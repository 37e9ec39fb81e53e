"""The four ways the transforms P, Q evolve during a search.

* ``ordinal`` (APS-O) and ``independent`` (APS-I): fixed selections, never updated.
* ``transitional`` (APS-T): ordinal start, frozen during warm-up, then one projected-descent
  step of Φ (eq. 5) with rate τ after every weight step; the first step perturbs the exact
  ordinal start, a stationary point of the descent. τ is the width-free (``relative``) rate of
  :func:`apsfast.transition_step_all`, so the paper's τ = 1e-3 suits every search space.
* ``learned``: the same supernet and schedule, but after warm-up P, Q are trained by the task
  loss with SGD like the weights instead of by the transition (the ablation the paper's
  reviewers asked for); their columns are left unconstrained.
"""
from __future__ import annotations

from typing import Callable, Optional

from torch import Tensor, nn

from apsfast.nn.network import aps_layers, network_sharing_level, network_transition_step

STRATEGIES = ("ordinal", "independent", "transitional", "learned")


def supernet_sharing(strategy: str) -> str:
    """The ``sharing`` a supernet is built with for ``strategy``."""
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {', '.join(STRATEGIES)}, got {strategy!r}")
    return "transitional" if strategy == "learned" else strategy


def transform_parameters(net: nn.Module) -> list[nn.Parameter]:
    """Every candidate-transform matrix (one per searchable side) of ``net``'s APS layers."""
    return [side.matrix for layer in aps_layers(net)
            for side in (layer.out_transforms, layer.in_transforms) if side is not None]


def begin_search(net: nn.Module, strategy: str) -> None:
    """Enter the phase after warm-up: ``learned`` unfreezes P, Q (frozen, they take the free
    slicing path during warm-up)."""
    if strategy == "learned":
        for matrix in transform_parameters(net):
            matrix.requires_grad_(True)


def transition(net: nn.Module, tau: float) -> Tensor:
    """APS-T's step: eq. 5 at the width-free rate on every layer in one batched call."""
    return network_transition_step(net, tau, relative=True)


def after_weight_step(net: nn.Module, strategy: str, tau: float, searching: bool,
                      step: Callable[[nn.Module, float], Tensor] = transition) -> Optional[Tensor]:
    """APS-T's transition ``step`` after a weight step of the search phase; returns Φ before
    it, or ``None`` where the strategy does not step."""
    if strategy == "transitional" and searching:
        return step(net, tau)
    return None


def sharing_level(net: nn.Module) -> float:
    """The network's Φ (sum over its APS layers)."""
    return float(network_sharing_level(net).detach())
