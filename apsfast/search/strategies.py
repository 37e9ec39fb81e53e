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

from typing import Any, Optional

import torch
from torch import Tensor, nn

from apsfast.nn.network import aps_layers, network_sharing_level, network_transition_step
from apsfast.search.readback import Readback
from apsfast.sharing import matmul_precision

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


def transition(net: nn.Module, tau: float, precision: Optional[str] = None) -> Tensor:
    """APS-T's step: eq. 5 at the width-free rate on every layer in one batched call (its
    products at the float32 matmul ``precision``, see :func:`apsfast.transition_step_all`)."""
    with matmul_precision(precision):
        return network_transition_step(net, tau, relative=True)


def after_weight_step(net: nn.Module, strategy: str, tau: float, step: Optional[int], every: int = 1,
                      precision: Optional[str] = None) -> Optional[Tensor]:
    """APS-T's transition after the ``step``-th weight step of the search phase (1-based;
    ``None`` outside it): one step of ``every``·τ after every ``every``-th, its products at
    ``precision``. Returns Φ before it, or ``None`` where no transition runs."""
    if strategy == "transitional" and step is not None and step % every == 0:
        return transition(net, tau * every, precision)
    return None


class TransitionRate:
    """APS-T's τ over the search phase.

    A fixed ``tau`` is used as it is. Without one (``sharing.tau: null``, the default) τ is
    steered so that Φ's fall spans the whole search phase, whatever its length: the target is
    ``Φ₀ · (1 − fall · u)`` at the fraction ``u`` of the phase done, and every 1% of the phase
    τ is multiplied by ``GAIN`` when Φ is above the target and divided by ``GAIN⁴`` when
    below, within ``[tau_min, TAU_MAX / every]`` (the fast brake: once Φ leaves its plateau it falls
    on its own, and a slow brake lets it run far ahead of the target). A fixed τ cannot do this: the ordinal start is a
    near-stationary point, so Φ stays flat for a number of steps set by the start's noise and
    then falls within a few hundred (measured on the demo space at τ = k/N over N steps: k = 1
    leaves 98% of the fall for the second half, k = 3 has done 89% of it by the middle).

    Φ is copied back at those points (a hundred per phase) without waiting, and read at the
    next one (:mod:`apsfast.search.readback`): τ follows Φ one point late, and no step waits
    for the device. The state (τ, Φ₀, the Φ on its way) is part of the run's checkpoint.
    """

    GAIN = 1.3
    TAU_MAX = 1e-2  # stable on every space measured; 1e-1 diverges (README, the transition rate)
    POINTS = 100  # adaptations per search phase

    def __init__(self, tau: Optional[float], steps: int, fall: float = 0.7, every: int = 1) -> None:
        self.fixed = tau is not None
        self.steps = max(int(steps), 1)
        self.fall = fall
        self.tau = float(tau) if self.fixed else 1.0 / self.steps
        self.tau_min = self.tau / 1000
        # One transition every `every` weight steps takes a step of every·τ: the stable bound
        # is on that step (on the demo space, every·τ = 0.1 diverges).
        self.tau_max = self.TAU_MAX / every
        self.every = max(1, self.steps // self.POINTS)
        self.phi0: Optional[float] = None
        self._pending: Optional[tuple[int, Readback]] = None  # (step, Φ then) on its way to the host

    def observe(self, step: int, phi: Optional[Tensor], span: int = 1) -> None:
        """After the transition at the ``step``-th weight step of the phase (1-based), the
        first since ``span`` steps, with Φ before it: at each adaptation point passed, adapt τ
        to the Φ of the previous point, and send this one to the host."""
        if self.fixed or phi is None or step // self.every == (step - span) // self.every:
            return
        previous, self._pending = self._pending, (step, Readback(phi.reshape(1)))
        if previous is not None:
            self._adapt(previous[0], previous[1].tolist()[0])

    def _adapt(self, step: int, value: float) -> None:
        if self.phi0 is None:
            self.phi0 = value
            return
        target = self.phi0 * (1 - self.fall * min(step / self.steps, 1.0))
        scale = self.GAIN if value > target else self.GAIN ** -4
        self.tau = min(max(self.tau * scale, self.tau_min), self.tau_max)

    def state_dict(self) -> dict[str, Any]:
        pending = None if self._pending is None else (self._pending[0], self._pending[1].tolist()[0])
        return {"tau": self.tau, "phi0": self.phi0, "pending": pending}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.tau, self.phi0 = state["tau"], state["phi0"]
        pending = state.get("pending")
        self._pending = None if pending is None else \
            (pending[0], Readback(torch.tensor([pending[1]], dtype=torch.float64)))


def sharing_level(net: nn.Module) -> float:
    """The network's Φ (sum over its APS layers)."""
    return float(network_sharing_level(net).detach())
