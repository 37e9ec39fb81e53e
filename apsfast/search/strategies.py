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


def begin_search(net: nn.Module, strategy: str, seed: int = 0) -> None:
    """Enter the phase after warm-up: ``learned`` unfreezes P, Q (frozen, they take the free
    slicing path during warm-up); ``transitional`` perturbs the exact ordinal start (see
    :meth:`apsfast.nn.APSLayer.begin_transition`) with noise from a generator of its own,
    seeded by ``seed``, so that the run's random stream after it (the controller's draws) is
    the one APS-O has with the same seed. Only the first call of a run perturbs."""
    if strategy == "learned":
        for matrix in transform_parameters(net):
            matrix.requires_grad_(True)
    elif strategy == "transitional":
        generator = torch.Generator().manual_seed(seed)
        for layer in aps_layers(net):
            layer.begin_transition(generator)


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
    steered so that Φ follows a line: ``Φ₀ · (1 − fall · min(u / end, 1))`` at the fraction
    ``u`` of the phase done. The fall is over at the fraction ``end`` of the phase; what is left
    of it, with Φ held, is for the meta-weights to adapt to the transforms they end with (a
    fall that runs to the last step, where the cosine learning rate is near zero, leaves the
    supernet 15–20 points less accurate than at its best: docs/concepts.md, the transition rate).

    A fixed τ cannot do this: the ordinal start is a near-stationary point, so Φ stays flat for
    a number of steps set by the start's noise and then falls within a few hundred (measured on
    the demo space at τ = k/N over N steps: k = 1 leaves 98% of the fall for the second half,
    k = 3 has done 89% of it by the middle). Nor can a bang-bang law (×g above the line, ÷g⁴
    below), which overshoots once Φ leaves its plateau, then brakes τ a thousandfold and
    plateaus again: a staircase. Φ depends on P, Q alone, so its path under a given τ is
    deterministic and locally proportional to τ; the law here is a ratio one. Every 1% of the
    phase, the fall per unit τ seen over the last interval predicts what τ brings Φ onto the
    line one interval ahead, and τ moves to it by at most a factor ``STEP`` per point, within
    ``[tau_min, TAU_MAX / every]``.

    Φ is copied back at those points (a hundred per phase) without waiting, and read at the
    next one (:mod:`apsfast.search.readback`): τ follows Φ one point late (the prediction
    allows for the interval under way), and no step waits for the device. The state (τ, Φ₀,
    the last point read and the Φ on its way) is part of the run's checkpoint.
    """

    STEP = 2.0  # most τ changes per adaptation point, up or down
    CATCH_UP = 2.0  # most Φ falls per interval behind the line, in the line's own falls per interval
    GROWTH = 4.0  # most the fall per unit τ is assumed to change per interval
    TAU_MAX = 1e-2  # stable on every space measured; 1e-1 diverges (docs/concepts.md, the transition rate)
    POINTS = 100  # adaptations per search phase
    FALL, END = 0.35, 0.65  # the defaults of sharing.transition_fall and sharing.transition_end

    def __init__(self, tau: Optional[float], steps: int, fall: float = FALL, every: int = 1,
                 end: float = END) -> None:
        self.fixed = tau is not None
        self.steps = max(int(steps), 1)
        self.fall, self.end = fall, end
        # One transition every `every` weight steps takes a step of every·τ: the stable bound
        # is on that step (on the demo space, every·τ = 0.1 diverges). The steered start, one
        # over the phase's steps, is held under it too: a phase of 8 steps started at 1/8 and
        # multiplied Φ by 22 with every = 2.
        self.tau_max = self.TAU_MAX / every
        self.tau = float(tau) if self.fixed else min(1.0 / self.steps, self.tau_max)
        self.tau_min = self.tau / 1000
        self.every = max(1, self.steps // self.POINTS)
        self.phi0: Optional[float] = None
        # The last point read: (step, Φ, τ in force over the interval after it), and the fall
        # per unit τ over the interval before it.
        self._last: Optional[tuple[int, float, float]] = None
        self._per_tau = 0.0
        self._pending: Optional[tuple[int, Readback]] = None  # (step, Φ then) on its way to the host

    def target(self, step: int) -> float:
        """Φ's line at the ``step``-th weight step of the phase."""
        assert self.phi0 is not None
        return self.phi0 * (1 - self.fall * min(step / (self.steps * self.end), 1.0))

    def observe(self, step: int, phi: Optional[Tensor], span: int = 1) -> None:
        """After the transition at the ``step``-th weight step of the phase (1-based), the
        first since ``span`` steps, with Φ before it: at each adaptation point passed, adapt τ
        to the Φ of the previous point, and send this one to the host."""
        if self.fixed or phi is None or step // self.every == (step - span) // self.every:
            return
        previous, self._pending = self._pending, (step, Readback(phi.reshape(1)))
        if previous is not None:
            self._adapt(previous[0], previous[1].tolist()[0], step)

    def _adapt(self, step: int, value: float, now: int) -> None:
        """Φ was ``value`` at ``step``; τ set now holds from ``now`` to the next point."""
        if self.phi0 is None:
            self.phi0 = value
        last, self._last = self._last, (step, value, self.tau)
        if last is None:
            return
        # The fall per unit τ over the last interval, and how much it grew over the one before:
        # leaving the ordinal plateau it grows several-fold per interval (an unstable
        # equilibrium, left exponentially), and a prediction without that growth overshoots.
        per_tau = max(last[1] - value, 0.0) / last[2]
        growth = min(max(per_tau / self._per_tau, 1 / self.GROWTH), self.GROWTH) if self._per_tau > 0 else 1.0
        self._per_tau = per_tau
        if per_tau <= 0:
            wanted = self.tau * self.STEP
        else:
            # The interval under way (at the τ in force now), then the one τ is set for.
            # Behind the line (as on leaving the plateau) Φ catches up at most CATCH_UP times
            # the line's own pace, so that the catching up is not a cliff either.
            expected = value - per_tau * growth * self.tau
            pace = self.target(now) - self.target(now + (now - step))
            fall = min(expected - self.target(now + (now - step)), self.CATCH_UP * pace)
            wanted = fall / (per_tau * growth ** 2)
        wanted = min(max(wanted, self.tau / self.STEP), self.tau * self.STEP)
        self.tau = min(max(wanted, self.tau_min), self.tau_max)

    def state_dict(self) -> dict[str, Any]:
        pending = None if self._pending is None else (self._pending[0], self._pending[1].tolist()[0])
        return {"tau": self.tau, "phi0": self.phi0, "last": self._last, "per_tau": self._per_tau, "pending": pending}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.tau, self.phi0 = state["tau"], state["phi0"]
        last = state.get("last")
        self._last = None if last is None else tuple(last)
        self._per_tau = state.get("per_tau", 0.0)
        pending = state.get("pending")
        self._pending = None if pending is None else \
            (pending[0], Readback(torch.tensor([pending[1]], dtype=torch.float64)))


def sharing_level(net: nn.Module) -> float:
    """The network's Φ (sum over its APS layers)."""
    return float(network_sharing_level(net).detach())
