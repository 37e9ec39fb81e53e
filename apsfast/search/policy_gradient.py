"""REINFORCE for the architecture controller (:class:`~apsfast.search.controller.Controller`),
its gradient taken on the host, and the MnasNet-style FLOPs-penalised reward."""
from __future__ import annotations

import math
from typing import Any, Optional, Sequence

import numpy as np
from torch import Tensor

from apsfast import _checks
from apsfast.search import steps
from apsfast.search.config import BASELINES
from apsfast.search.controller import Controller, Rollout


class Reinforce:
    """REINFORCE for a :class:`Controller`: ``loss = −(R − b)·log π(a) − w·H(π)``.

    ``baseline``: ``moving_average`` (the paper's), ``b ← d·b + (1 − d)·R̄`` (the first reward
    starts it); or ``leave_one_out``, each of the B archs of a step measured against the mean
    reward of the other B − 1 (Kool et al., 2019). All archs of a step are scored on the same
    validation batch, so leave-one-out cancels how hard that batch is, which a moving average
    cannot: on a short search with small batches that difficulty swamps the differences
    between archs. It needs B ≥ 2; the moving average is still kept for the logs.

    Defaults are the authors' CIFAR settings: Adam lr 1.6e-4, betas (0.5, 0.999), baseline
    decay 0.99, entropy weight 4e-3.
    """

    def __init__(self, controller: Controller, lr: float = 1.6e-4, betas: tuple[float, float] = (0.5, 0.999),
                 baseline_decay: float = 0.99, entropy_weight: float = 4e-3, weight_decay: float = 0.0,
                 baseline: str = "moving_average") -> None:
        self.controller = controller
        self.optimizer = steps.adam(controller.parameters(), lr=_checks.finite_float("lr", lr, positive=True),
                                    betas=betas,
                                    weight_decay=_checks.finite_float("weight_decay", weight_decay, positive=False))
        self.baseline_decay = _checks.finite_float("baseline_decay", baseline_decay, positive=False)
        if self.baseline_decay >= 1:
            raise ValueError(f"baseline_decay must be in [0, 1), got {baseline_decay!r}")
        self.entropy_weight = _checks.finite_float("entropy_weight", entropy_weight, positive=False)
        if baseline not in BASELINES:
            raise ValueError(f"baseline must be one of {', '.join(BASELINES)}, got {baseline!r}")
        self.leave_one_out = baseline == "leave_one_out"
        self.baseline: Optional[float] = None

    def step(self, archs: Rollout | Tensor | Sequence[Sequence[int]],
             rewards: Tensor | Sequence[float] | float) -> dict[str, float]:
        """One policy-gradient step on sampled ``archs`` ``[B, D]`` (or a rollout's) with their
        ``rewards`` ``[B]`` (or one for all). The gradient of the loss is taken on the host from
        the archs alone (:meth:`Controller.likelihood_backward`), not through a rollout's graph:
        the same gradient, without the ~100 ops autograd dispatches for it."""
        archs = self.controller._host_archs(archs.archs if isinstance(archs, Rollout) else archs)
        count = len(archs)
        # Checked on the host, where a searcher's rewards are (a tensor's are read back once).
        values = rewards.tolist() if isinstance(rewards, Tensor) else rewards
        values = [float(v) for v in values] if isinstance(values, Sequence) else [float(values)]
        if not all(map(math.isfinite, values)):
            raise ValueError(f"rewards must be finite, got {values}")
        if len(values) not in (1, count):
            raise ValueError(f"rewards must be one per arch ({count}) or one for all, got {len(values)}")
        rewards = np.array(values * count if len(values) == 1 else values)
        mean = float(rewards.mean())
        self.baseline = mean if self.baseline is None else \
            self.baseline_decay * self.baseline + (1 - self.baseline_decay) * mean
        if self.leave_one_out:
            if count < 2:
                raise ValueError("the leave_one_out baseline needs at least 2 archs per step, got 1")
            advantage = rewards - (rewards.sum() - rewards) / (count - 1)
        else:
            advantage = rewards - self.baseline
        # loss = −mean(A·log π) − w·mean(H): its gradient through each arch's log π and H.
        log_prob, entropy = self.controller._host_backward(archs, -advantage / count,
                                                           np.full(count, -self.entropy_weight / count),
                                                           accumulate=False)
        self.optimizer.step()
        entropy = float(entropy.mean())
        loss = -float((advantage * log_prob).mean()) - self.entropy_weight * entropy
        return {"loss": loss, "reward": mean, "baseline": self.baseline, "entropy": entropy}

    def state_dict(self) -> dict[str, Any]:
        """Controller, optimizer and baseline: everything a resume needs."""
        return {"controller": self.controller.state_dict(), "optimizer": self.optimizer.state_dict(),
                "baseline": self.baseline}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.controller.load_state_dict(state["controller"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.baseline = state["baseline"]


def flops_reward(accuracy: float, flops: float, target: Optional[float], alpha: float = 0.0,
                 beta: float = -0.1) -> float:
    """The FLOPs-penalised reward (MnasNet's soft constraint): ``acc·(F/T)^α`` at or below
    the target ``T``, ``acc·(F/T)^β`` above it; ``target=None`` is unconstrained (``acc``).
    The authors' defaults α = 0, β = −0.1 leave archs under the target unpenalised."""
    if target is None:
        return float(accuracy)
    target = _checks.finite_float("target", target, positive=True)
    flops = _checks.finite_float("flops", flops, positive=True)
    return float(accuracy) * math.pow(flops / target, alpha if flops <= target else beta)
