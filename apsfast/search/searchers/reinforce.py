"""The paper's searcher: an autoregressive LSTM policy trained by REINFORCE on FLOPs-penalised
rewards (:mod:`apsfast.search.controller`); with a latency budget the same reward on predicted
milliseconds."""
from __future__ import annotations

import math
from typing import Any, Callable, Optional, Sequence

import torch

from apsfast.models import Decision
from apsfast.search.budget import Budget, resolve_budget
from apsfast.search.config import Config
from apsfast.search.controller import Controller
from apsfast.search.policy_gradient import Reinforce, flops_reward
from apsfast.search.readback import Readback
from apsfast.search.searchers.base import Arch, Batch, Score, Searcher


class EntropySchedule:
    """The entropy bonus after ``done`` of the search phase's ``steps`` weight steps: ``weight``
    up to the fraction ``start`` of them, then a line to ``end · weight`` at the last one. Without
    ``steps`` (a searcher outside a schedule) it is ``weight`` throughout."""

    def __init__(self, weight: float, end: float, start: float, steps: Optional[int]) -> None:
        self.weight, self.end, self.start, self.steps = weight, end, start, steps

    def __call__(self, done: int) -> float:
        if not self.steps or self.end == 1:
            return self.weight
        progress = min(max(done, 0) / max(self.steps - 1, 1), 1.0)
        fall = max(progress - self.start, 0.0) / (1 - self.start)
        return self.weight * (1 - (1 - self.end) * fall)


class ReinforceSearcher(Searcher):
    """The paper's searcher: an autoregressive LSTM policy (:class:`Controller`) trained by
    REINFORCE (:class:`Reinforce`) with the MnasNet-style reward (:func:`flops_reward`).

    The controller stays on the CPU whatever the run's device: sampling is one tiny LSTM step
    per decision whose choice the host needs before the next, so on a GPU every decision
    would cost a round trip (measured: 8.5 of a 62 ms ResNet-20 step on an H200).
    """

    def __init__(self, decisions: Sequence[Decision], config: Config, flops: Callable[[Arch], float],
                 budget: Optional[Budget] = None, search_steps: Optional[int] = None, **context: Any) -> None:
        ctl, reward = config.controller, config.reward
        cost = resolve_budget(config, flops, budget)
        flops = cost.cost  # MACs, or predicted milliseconds under a latency target
        budget_left: Optional[Callable[[torch.Tensor], torch.Tensor]] = None
        if ctl.flops_input:  # the share of the budget (the target, else the widest arch) a prefix leaves
            last = [0] * len(decisions)
            total = cost.target or flops([len(d.widths) - 1 for d in decisions])

            def remaining(prefix: torch.Tensor) -> torch.Tensor:
                return torch.tensor([1 - flops(row + last[len(row):]) / total for row in prefix.tolist()])
            budget_left = remaining
        self.controller = Controller(decisions, ctl.hidden_size, layers=ctl.layers, layer_input=ctl.layer_input,
                                     budget=budget_left)
        self.reinforce = Reinforce(self.controller, lr=ctl.lr, betas=tuple(ctl.betas),
                                   baseline_decay=ctl.baseline_decay, entropy_weight=ctl.entropy_weight,
                                   weight_decay=ctl.weight_decay, baseline=ctl.baseline)
        self.generator = torch.Generator().manual_seed(config.run.seed + 2)
        self.samples = ctl.samples
        self.entropy = EntropySchedule(ctl.entropy_weight, ctl.entropy_end, ctl.entropy_from, search_steps)
        self.flops = flops
        self.target, self.alpha, self.beta = cost.target, reward.alpha, reward.beta
        # The last step's archs and their accuracies on their way to the host (see step).
        self._pending: Optional[tuple[list[Arch], Readback]] = None

    def begin_step(self, done: int) -> None:
        """The entropy bonus follows the search phase's weight steps (:class:`EntropySchedule`)."""
        self.reinforce.entropy_weight = self.entropy(done)

    def sample_train_arch(self) -> Arch:
        return self.controller.sample_archs(1, self.generator).tolist()[0]

    def step(self, score: Score, batch: Optional[Batch] = None) -> dict[str, float]:
        """Score this step's archs, and train the policy on the previous step's.

        The accuracies stay on the device and are copied back without waiting; the policy
        step that needs them runs at the next search step (or :meth:`flush`), by which time
        they are on the host, so a search step never waits for the device. REINFORCE is
        unchanged by the delay: each update uses the archs of one step, their rewards and
        their log-likelihoods under the policy that sampled them (no update comes between).
        Only the weight steps in between sample their archs from the policy before it.
        """
        out = self.flush()
        archs = self.controller.sample_archs(self.samples, self.generator, keep=True).tolist()
        accuracies = score(archs)
        self._pending = (archs, Readback(accuracies if isinstance(accuracies, torch.Tensor)
                                         else torch.as_tensor(accuracies, dtype=torch.float64)))
        return out

    def flush(self) -> dict[str, float]:
        if self._pending is None:
            return {}
        archs, accuracies = self._pending
        self._pending = None
        rewards = [flops_reward(acc, self.flops(arch), self.target, self.alpha, self.beta)
                   for acc, arch in zip(accuracies.tolist(), archs)]
        return self.reinforce.step(archs, rewards)

    def beam(self, size: int) -> list[tuple[Arch, float]]:
        return self.controller.beam_search(size)

    def probabilities(self, arch: Arch) -> list[list[float]]:
        with torch.no_grad():
            return [p[0].tolist() for p in self.controller.evaluate([arch]).probs]

    def policy_entropy(self, samples: int = 256) -> tuple[float, float]:
        # Sampled with a generator of its own, so reporting it changes no random stream.
        with torch.no_grad():
            rollout = self.controller.sample(samples, torch.Generator().manual_seed(0))
        maximum = sum(math.log(n) for n in self.controller.num_choices)
        return float(rollout.entropy.mean()), maximum

    def state_dict(self) -> dict[str, Any]:
        pending = None if self._pending is None else (self._pending[0], self._pending[1].tolist())
        return {**self.reinforce.state_dict(), "generator": self.generator.get_state(), "pending": pending}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.reinforce.load_state_dict(state)
        self.generator.set_state(state["generator"])
        pending = state.get("pending")
        self._pending = None if pending is None else \
            (pending[0], Readback(torch.tensor(pending[1], dtype=torch.float64)))
