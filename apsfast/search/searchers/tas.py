"""TAS (Dong & Yang, "Network pruning via transformable architecture search", NeurIPS 2019)
over an APS supernet's width decisions.

* **Policy**: one logit per candidate of every decision (``θ``, ``[decisions, candidates]``);
  ``p_d = softmax(θ_d)``; the result's beam is the most probable archs of that product
  distribution (its first: the argmax widths).
* **Sampling** (every weight step and every search step): Gumbel-softmax
  ``softmax((log p_d + g)/τ)`` per decision, two distinct candidates drawn from it, and their
  mixture weights the softmax of their two perturbed logits (a decision with one candidate
  uses it alone). ``τ`` falls by a cosine from ``tas.tau_max`` to ``tas.tau_min`` over the
  search phase's weight steps (``search_steps``), as TAS anneals it over its epochs: the
  schedule tells the searcher how many weight steps the phase has taken
  (:meth:`TasSearcher.begin_step`), the ``train.widest_every`` steps included, so ``τ``
  reaches ``tas.tau_min`` at the phase's last step however often the widest arch is trained.
* **Forward** (:class:`WidthMixture`): the supernet runs the wider candidate of every pair; a
  forward hook on each conv a decision drives also runs the narrower one (the same layer,
  its ``P`` for that width) and returns ``w_wide·y_wide + w_narrow·CWI(y_narrow)``, CWI the
  channel-wise interpolation to the wider width. The mixture is taken on the conv output,
  before the wider width's batch norm (TAS mixes after each width's own batch norm; here the
  per-width norms of the narrow candidates are not trained during the search).
* **Steps**: the weights by the schedule's SGD on the train split under that forward with
  the mixture weights detached; ``θ`` by Adam (``tas.lr``, ``tas.betas``,
  ``tas.weight_decay``) on each validation batch: cross-entropy of the mixture plus
  ``tas.flops_weight`` times the FLOPs loss on the exact expected MACs with TAS's tolerance
  band ``[target − tas.flops_tolerance·(the widest arch's MACs), target]`` (:mod:`.widths`),
  judged on the argmax arch, the target being
  ``reward.flops_target`` (with ``reward.latency_target``: the same loss on the expected
  predicted latency, :mod:`apsfast.search.budget`). ``θ`` lives on the host; the device
  returns the cross-entropy's gradient at the mixture weights without being waited for, and
  the Adam step lands at the next search step (:meth:`TasSearcher.step`).
* **Result**: the argmax arch (:attr:`TasSearcher.exports`), with or without a target, as
  TAS exports it; ``result.json`` gives its rank in the beam (0) and its cost.
* **Distillation** for the retrain: ``retrain.distill`` (:func:`apsfast.search.steps.distillation_loss`,
  α = 0.9, T = 4 as TAS).

Left out: TAS's depth search, and its per-width batch norms inside the mixture. Where the run
around it differs from TAS's (the shared warm-up before the logits move, the widest steps) is
in the table of docs/differences.md.
"""
from __future__ import annotations

import contextlib
import math
from typing import Any, Callable, ContextManager, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from apsfast.models import Decision
from apsfast.search.budget import Budget, resolve_budget
from apsfast.search.config import Config
from apsfast.search.readback import Readback
from apsfast.search.searchers.base import Arch, Batch, Score, Searcher, require_batch
from apsfast.search.searchers.widths import (ExpectedMacs, Groups, Pair, WidthMixture, average_gradient, flops_band,
                                             flops_loss, product_beam, validation_mode)


def gumbel_noise(shape: Sequence[int], generator: torch.Generator) -> Tensor:
    """Standard Gumbel noise ``−log(Exp(1))`` (float64, CPU) of ``shape``."""
    noise = torch.empty(tuple(shape), dtype=torch.float64).exponential_(generator=generator)
    return -noise.clamp_min(1e-30).log()


def choose_pairs(log_probs: Tensor, gumbel: Tensor, sizes: Sequence[int], tau: float,
                 generator: torch.Generator) -> list[tuple[int, int]]:
    """Two distinct candidates ``(narrow, wide)`` per decision, drawn from the Gumbel-softmax
    ``softmax((log p + g)/τ)`` (a decision with one candidate: ``(0, 0)``)."""
    probs = ((log_probs.detach() + gumbel.to(log_probs)) / tau).softmax(dim=1).cpu().double()
    chosen = []
    for d, size in enumerate(sizes):
        if size == 1:
            chosen.append((0, 0))
            continue
        first, second = torch.multinomial(probs[d, :size] + 1e-12, 2, replacement=False, generator=generator).tolist()
        chosen.append((min(first, second), max(first, second)))
    return chosen


def mixture_weights(log_probs: Tensor, gumbel: Tensor, tau: float, chosen: Sequence[tuple[int, int]]) -> list[Pair]:
    """The pairs with their mixture weights: the softmax of the two perturbed logits
    (differentiable in ``log_probs`` ``[D, K]``; ``(0, 1)`` for a decision of one candidate)."""
    perturbed = (log_probs + gumbel.to(log_probs)) / tau
    one = torch.ones((), dtype=log_probs.dtype, device=log_probs.device)
    pairs = []
    for d, (narrow, wide) in enumerate(chosen):
        if narrow == wide:
            pairs.append((narrow, wide, one * 0, one))
            continue
        weights = torch.stack([perturbed[d, narrow], perturbed[d, wide]]).softmax(dim=0)
        pairs.append((narrow, wide, weights[0], weights[1]))
    return pairs


def gumbel_pairs(log_probs: Tensor, sizes: Sequence[int], tau: float, generator: torch.Generator) -> list[Pair]:
    """Two candidates per decision by Gumbel-softmax at temperature ``tau`` and their mixture
    weights (differentiable in ``log_probs`` ``[D, K]``, ``-inf`` on padding)."""
    gumbel = gumbel_noise(log_probs.shape, generator)
    return mixture_weights(log_probs, gumbel, tau, choose_pairs(log_probs, gumbel, sizes, tau, generator))


class TasSearcher(Searcher):
    """TAS over width decisions (see the module's documentation).

    Args:
        decisions, config, flops, budget: as every searcher (the FLOPs loss is on the budget's cost:
            MACs, or predicted milliseconds).
        net: the supernet (its driven convs get the mixing hooks).
        search_steps: the number of weight steps after warm-up, over which ``τ`` anneals.
    """

    exports = "argmax"

    def __init__(self, decisions: Sequence[Decision], config: Config, flops: Callable[[Arch], float], *,
                 net: Optional[nn.Module] = None, search_steps: Optional[int] = None, budget: Optional[Budget] = None,
                 **context: Any) -> None:
        if net is None or search_steps is None:
            raise ValueError("the tas searcher needs net= (the supernet) and search_steps= (weight steps after "
                             "warm-up) from the schedule")
        settings = config.tas
        budget = resolve_budget(config, flops, budget)
        self.net, self.flops, self.settings, self.key = net, budget.cost, settings, budget.key
        self.target = budget.target
        self.band = flops_band(settings.flops_tolerance, net, budget.cost)
        self.groups = Groups(decisions)
        # θ is tiny and lives on the host: sampling an arch never waits for the device.
        self.theta = torch.zeros(self.groups.mask.shape, requires_grad=True)
        self.optimizer = torch.optim.Adam([self.theta], lr=settings.lr, betas=tuple(settings.betas),
                                          weight_decay=settings.weight_decay)
        self.generator = torch.Generator().manual_seed(config.run.seed + 2)
        self.search_steps, self.steps = max(int(search_steps), 1), 0
        self.expected_macs = ExpectedMacs(net, budget.layer_costs, budget.layer_keys)
        self.mixture = WidthMixture(net)
        self._train_pairs: Optional[list[Pair]] = None
        # The last step's Gumbel noise, pairs and τ, and its device values on their way to
        # the host (the mixture weights' gradient, the loss, the accuracy): see step.
        self._pending: Optional[tuple[Tensor, list[tuple[int, int]], float, Readback]] = None

    def begin_step(self, done: int) -> None:
        """The schedule's position: ``done`` weight steps of the search phase came before the
        next one (``τ`` follows them)."""
        self.steps = int(done)

    def tau(self) -> float:
        """The Gumbel-softmax temperature at the search phase's current weight step: TAS's
        cosine from ``tau_max`` (the first step) to ``tau_min`` (the last one)."""
        s = self.settings
        done = min(max(self.steps, 0) / max(self.search_steps - 1, 1), 1.0)
        return s.tau_min + (s.tau_max - s.tau_min) * (1 + math.cos(math.pi * done)) / 2

    def _pairs(self) -> list[Pair]:
        return gumbel_pairs(self.groups.log_probs(self.theta), self.groups.sizes, self.tau(), self.generator)

    def sample_train_arch(self) -> Arch:
        with torch.no_grad():
            pairs = self._pairs()
        self._train_pairs = pairs
        return [wide for _, wide, _, _ in pairs]

    def train_forward(self) -> ContextManager[None]:
        # The pairs of the last sample_train_arch, used once: a weight step without one (warm-up)
        # runs the plain forward.
        pairs, self._train_pairs = self._train_pairs, None
        return self.mixture.active(pairs) if pairs is not None else contextlib.nullcontext()

    def step(self, score: Score, batch: Optional[Batch] = None) -> dict[str, float]:
        """Run the mixture on the validation batch, and update θ with the previous step's.

        The device computes the gradient of the cross-entropy with respect to the mixture
        weights (averaged over the processes) and sends it to the host without waiting; the
        host finishes the chain to θ, adds the FLOPs loss and takes the Adam step at the
        next search step (or :meth:`flush`). The update is the one the whole loss gives;
        only the weight steps in between sample from θ before it.
        """
        out = self.flush()
        x, y = require_batch("tas", batch)
        tau = self.tau()
        gumbel = gumbel_noise(self.theta.shape, self.generator)
        with torch.no_grad():
            log_probs = self.groups.log_probs(self.theta)
            chosen = choose_pairs(log_probs, gumbel, self.groups.sizes, tau, self.generator)
            host = mixture_weights(log_probs, gumbel, tau, chosen)
        # non_blocking: a copy from pageable memory that does not wait for the device's queue.
        weights = torch.stack([w for *_, narrow, wide in host for w in (narrow, wide)]).to(x.device, non_blocking=True)
        weights.requires_grad_(True)
        pairs = [(narrow, wide, weights[2 * d], weights[2 * d + 1]) for d, (narrow, wide) in enumerate(chosen)]
        self.net.set_arch([wide for _, wide in chosen])
        with validation_mode(self.net), self.mixture.active(pairs):
            logits = self.net(x)
        task = F.cross_entropy(logits.float(), y)
        (grad,) = torch.autograd.grad(task, [weights], allow_unused=True)
        grad = average_gradient(torch.zeros_like(weights) if grad is None else grad)
        accuracy = (logits.detach().argmax(1) == y).float().mean()
        values = torch.cat([grad.double(), torch.stack([task.detach(), accuracy]).double()])
        self._pending = (gumbel, chosen, tau, Readback(values))
        return out

    def flush(self) -> dict[str, float]:
        if self._pending is None:
            return {}
        gumbel, chosen, tau, values = self._pending
        self._pending = None
        *grad, task, accuracy = values.tolist()
        log_probs = self.groups.log_probs(self.theta)
        weights = torch.stack([w for *_, narrow, wide in mixture_weights(log_probs, gumbel, tau, chosen)
                               for w in (narrow, wide)])
        expected = self.expected_macs(self.groups.rows(log_probs.exp()))
        argmax = log_probs.detach().argmax(dim=1).tolist()
        cost = flops_loss(expected, self.flops(argmax), self.target, self.band)
        # The task loss through the weights (its gradient there came from the device) plus the FLOPs loss.
        task_part = (weights.double() * torch.tensor(grad, dtype=torch.float64)).sum()
        surrogate = task_part + self.settings.flops_weight * cost
        (self.theta.grad,) = torch.autograd.grad(surrogate, [self.theta])
        self.optimizer.step()
        self.theta.grad = None
        return {"reward": accuracy, "entropy": self.groups.entropy(log_probs), "loss": task,
                "flops_loss": float(cost.detach()), f"expected_{self.key}": float(expected.detach()), "tau": tau}

    def beam(self, size: int) -> list[tuple[Arch, float]]:
        return product_beam(self.groups.rows(self.groups.log_probs(self.theta.detach()).cpu()), size)

    def probabilities(self, arch: Arch) -> list[list[float]]:
        return [row.tolist() for row in self.groups.rows(self.groups.log_probs(self.theta.detach()).exp().cpu())]

    def policy_entropy(self, samples: int = 256) -> tuple[float, float]:
        return self.groups.entropy(self.groups.log_probs(self.theta.detach())), self.groups.max_entropy()

    def state_dict(self) -> dict[str, Any]:
        pending = None
        if self._pending is not None:
            gumbel, chosen, tau, values = self._pending
            pending = {"gumbel": gumbel, "chosen": chosen, "tau": tau, "values": values.tolist()}
        return {"theta": self.theta.detach().clone(), "optimizer": self.optimizer.state_dict(),
                "generator": self.generator.get_state(), "steps": self.steps, "pending": pending}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        with torch.no_grad():
            self.theta.copy_(state["theta"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.generator.set_state(state["generator"])
        self.steps = int(state["steps"])
        pending = state.get("pending")
        self._pending = None if pending is None else (
            pending["gumbel"], [tuple(p) for p in pending["chosen"]], float(pending["tau"]),
            Readback(torch.tensor(pending["values"], dtype=torch.float64)))
