"""The four ways the transforms P, Q evolve during a search.

* ``ordinal`` (APS-O) and ``independent`` (APS-I): fixed selections, never updated.
* ``transitional`` (APS-T): ordinal start, frozen during warm-up, then one projected-descent
  step of Φ (eq. 5) with rate τ after every weight step; the first step perturbs the exact
  ordinal start, a stationary point of the descent. τ is the width-free (``relative``) rate of
  :func:`apsfast.transition_step_all`, fixed or steered so that Φ's fall spans the search
  phase (:class:`TransitionRate`).
* ``learned``: the same supernet and schedule, but after warm-up P, Q are trained by the task
  loss with SGD like the weights instead of by the transition (the ablation the paper's
  reviewers asked for); their columns are left unconstrained.
"""
from __future__ import annotations

from typing import Optional

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


def after_weight_step(net: nn.Module, strategy: str, tau: float, searching: bool) -> Optional[Tensor]:
    """APS-T's transition after a weight step of the search phase; returns Φ before it, or
    ``None`` where the strategy does not step."""
    if strategy == "transitional" and searching:
        return transition(net, tau)
    return None


class TransitionRate:
    """APS-T's τ over the search phase.

    A fixed ``tau`` is used as it is. Without one (``sharing.tau: null``, the default) τ is
    steered so that Φ's fall spans the whole search phase, whatever its length: the target is
    ``Φ₀ · (1 − fall · u)`` at the fraction ``u`` of the phase done, and every 1% of the phase
    τ is multiplied by ``GAIN`` when Φ is above the target and divided by ``GAIN⁴`` when
    below, within ``[tau_min, TAU_MAX]`` (the fast brake: once Φ leaves its plateau it falls
    on its own, and a slow brake lets it run far ahead of the target). A fixed τ cannot do this: the ordinal start is a
    near-stationary point, so Φ stays flat for a number of steps set by the start's noise and
    then falls within a few hundred (measured on the demo space at τ = k/N over N steps: k = 1
    leaves 98% of the fall for the second half, k = 3 has done 89% of it by the middle).

    Φ is read back only at those points (a hundred per phase), so the step needs no host sync
    otherwise. The state (τ, Φ₀) is part of the run's checkpoint.
    """

    GAIN = 1.3
    TAU_MAX = 1e-2  # stable on every space measured; 1e-1 diverges (README, the transition rate)
    POINTS = 100  # adaptations per search phase

    def __init__(self, tau: Optional[float], steps: int, fall: float = 0.7) -> None:
        self.fixed = tau is not None
        self.steps = max(int(steps), 1)
        self.fall = fall
        self.tau = float(tau) if self.fixed else 1.0 / self.steps
        self.tau_min = self.tau / 1000
        self.every = max(1, self.steps // self.POINTS)
        self.phi0: Optional[float] = None

    def observe(self, step: int, phi: Optional[Tensor]) -> None:
        """After the ``step``-th transition of the phase (1-based) with Φ before it: adapt τ."""
        if self.fixed or phi is None or step % self.every:
            return
        value = float(phi)
        if self.phi0 is None:
            self.phi0 = value
            return
        target = self.phi0 * (1 - self.fall * min(step / self.steps, 1.0))
        scale = self.GAIN if value > target else self.GAIN ** -4
        self.tau = min(max(self.tau * scale, self.tau_min), self.TAU_MAX)

    def state_dict(self) -> dict[str, Optional[float]]:
        return {"tau": self.tau, "phi0": self.phi0}

    def load_state_dict(self, state: dict[str, Optional[float]]) -> None:
        self.tau, self.phi0 = state["tau"], state["phi0"]


def sharing_level(net: nn.Module) -> float:
    """The network's Φ (sum over its APS layers)."""
    return float(network_sharing_level(net).detach())
