"""Width search by sparse coding, in the spirit of ISTA-NAS (Yang et al., "ISTA-NAS: efficient
and consistent neural architecture search by sparse coding", NeurIPS 2020).

**From cells to widths.** ISTA-NAS writes a DARTS cell's choices (which operations on which
edges) as a sparse vector ``z`` (``k`` non-zeros per node), keeps only a compressed vector
``b = A z`` with a fixed random dictionary ``A`` (``m`` rows, fewer than the entries of ``z``)
as the architecture parameter, recovers ``z`` from ``b`` by sparse coding (LASSO) whenever it
needs the architecture, runs the supernet on the operations ``z`` selects, weighted by ``z``,
and moves ``b`` by the gradient of the validation loss. Here:

* ``z`` is the concatenation of the one-hot width choices of the decisions that have a choice
  (``n = Σ_d K_d`` entries over the decisions with ``K_d ≥ 2``, one non-zero per decision; a
  decision pinned to one width is not coded); ``A`` is ``m × n`` Gaussian, each decision's
  block of columns centred (so no two candidates of a decision share a column: with one row,
  half of the plain Gaussian draws would) and every column of unit norm, seeded by
  ``run.seed``; ``m = ⌈ista.ratio · n⌉`` (at most ``n − 1``; at least 2 where a decision has
  three candidates or more: one row has only two directions) (:func:`~.lasso.dictionary`);
* recovery (:func:`~.lasso.ista`, our own; ISTA-NAS calls a commercial solver): the
  non-negative LASSO ``min_{z ≥ 0} ½‖A z − b‖² + λ‖z‖₁`` (``λ = ista.sparsity``) solved to its
  KKT conditions: at most ``ista.iterations`` steps of ISTA with Nesterov's momentum (FISTA;
  step ``η = 1/‖A‖₂²``) until the support they reach holds the exact solution (the closed
  form on that support, checked against the KKT conditions; a few hundred steps on the
  built-in spaces), so the arch is the LASSO's and not a function of the iteration count. It
  is a function of ``b`` alone (a resume recovers the same bits), differentiable in ``b``
  through that closed form (the solution map's exact derivative where the support is stable);
* each candidate's score is the value ISTA thresholds, ``z − η∇`` (``z`` on the support, ``≤ 0``
  off it: how near the candidate is to entering), differentiable in ``b`` on and off the
  support; each decision keeps its largest score (:func:`choose`, as ISTA-NAS keeps the top
  entries per node; the narrowest on a tie), and its probabilities are the softmax of its
  scores over ``ista.temperature`` (:func:`per_decision_probs`): every candidate's
  probability has a gradient, whether its entry is on the support or not;
* the weights train on the arch ``z`` selects, unweighted;
* each search step runs, on a validation batch, the mixture of every coded decision's two most
  probable candidates (:func:`top_pair`; the two of a decision of two), weighted by their
  probabilities renormalised over the pair: TAS's width mixture
  (:class:`~.widths.WidthMixture`, channel-wise interpolation of the narrower to the wider),
  as ISTA-NAS sums the operations of its support weighted by ``z``. The cross-entropy's
  gradient at the mixture weights compares the two widths; ``ista.flops_weight`` times TAS's
  FLOPs loss on the expected MACs of those probabilities is added, and Adam (``ista.lr``)
  steps ``b`` (``b`` lives on the host; the device returns the cross-entropy's gradient at
  the mixture weights without being waited for, and the step lands at the next search step:
  :meth:`IstaSearcher.step`);
* the result is the argmax (:attr:`IstaSearcher.exports`), with or without a target, as
  ISTA-NAS exports its recovered ``z``: the beam is ranked by the probabilities, whose argmax
  is the kept candidates.

**Left out.** ISTA-NAS's closed-form correction that keeps the supernet's ``z`` consistent
with the previous recovery (here the recovery is redone from ``b`` at every step); the
one-stage variant's ``k > 1`` non-zeros (a width has one value); cell topology. Where the
dictionary, the sign of ``z``, the mixture's weights, the start of ``b`` and the optimiser
differ from ISTA-NAS's code is in the table of docs/differences.md.
"""
from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from apsfast.models import Decision
from apsfast.search.budget import Budget, resolve_budget
from apsfast.search.config import Config
from apsfast.search.readback import Readback
from apsfast.search.searchers.base import Arch, Batch, Score, Searcher, require_batch
from apsfast.search.searchers.lasso import Recovered, dictionary, ista
from apsfast.search.searchers.widths import (ExpectedMacs, Groups, Pair, WidthMixture, average_gradient, flops_band,
                                             flops_loss, product_beam, validation_mode)


def choose(scores: Tensor, sizes: Sequence[int]) -> Arch:
    """Each block's index of its largest score (ties: the narrower)."""
    arch, start = [], 0
    for size in sizes:
        arch.append(int(torch.argmax(scores[start:start + size].detach())))
        start += size
    return arch


def per_decision_probs(scores: Tensor, sizes: Sequence[int], temperature: float) -> list[Tensor]:
    """Each block's softmax of its scores over ``temperature`` (differentiable in the scores;
    its argmax is the candidate :func:`choose` keeps)."""
    return [block.softmax(dim=0) for block in (scores / temperature).split(list(sizes))]


def top_pair(probs: Tensor) -> Pair:
    """A decision's two most likely candidates ``(narrow, wide)`` and their mixture weights:
    their probabilities renormalised over the two (differentiable; a decision of one
    candidate: ``(0, 0)`` with the weights 0 and 1)."""
    if len(probs) == 1:
        return 0, 0, probs[0] * 0, probs[0]
    first, second = torch.topk(probs.detach(), 2).indices.tolist()
    narrow, wide = min(first, second), max(first, second)
    pair = probs[[narrow, wide]]
    weights = pair / pair.sum()
    return narrow, wide, weights[0], weights[1]


class Policy(NamedTuple):
    """What a recovered code gives: the arch it selects (every decision, pinned ones at their
    one width), every decision's probabilities and the pairs of the mixture forward
    (differentiable in ``b`` where the code was)."""

    arch: Arch
    probs: list[Tensor]
    pairs: list[Pair]


class IstaSearcher(Searcher):
    """Sparse-coding width search (see the module's documentation).

    Args:
        decisions, config, flops, budget: as every searcher (the cost loss is on the budget's cost:
            MACs, or predicted milliseconds).
        net: the supernet (its driven convs get the mixing hooks).
    """

    exports = "argmax"

    def __init__(self, decisions: Sequence[Decision], config: Config, flops: Callable[[Arch], float], *,
                 net: Optional[nn.Module] = None, budget: Optional[Budget] = None, **context: Any) -> None:
        if net is None:
            raise ValueError("the ista searcher needs net= (the supernet) from the schedule")
        settings = self.settings = config.ista
        budget = resolve_budget(config, flops, budget)
        self.net, self.flops, self.target, self.key = net, budget.cost, budget.target, budget.key
        self.band = flops_band(settings.flops_tolerance, net, budget.cost)
        self.groups = Groups(decisions)
        self.sizes = self.groups.sizes
        # Only the decisions with a choice are coded; a pinned one is its single width.
        self.coded = [d for d, size in enumerate(self.sizes) if size > 1]
        self.blocks = [self.sizes[d] for d in self.coded]
        self.starts = [sum(self.blocks[:i]) for i in range(len(self.blocks))]
        n = sum(self.blocks)
        m = min(max(math.ceil(settings.ratio * n), 1), max(n - 1, 1)) if n else 0
        if max(self.blocks, default=0) > 2:  # one row has two directions: a third candidate would repeat one
            m = max(m, 2)
        generator = torch.Generator().manual_seed(config.run.seed + 3)
        self.a = dictionary(m, self.blocks, generator)
        start = torch.cat([torch.full((k,), 1.0 / k, dtype=torch.float64) for k in self.blocks]) if n else \
            torch.zeros(0, dtype=torch.float64)
        start = start + 0.01 * torch.rand(n, generator=generator, dtype=torch.float64)
        self.b = (self.a @ start).requires_grad_(True)
        self.optimizer = torch.optim.Adam([self.b], lr=settings.lr, betas=tuple(settings.betas))
        self.expected_macs = ExpectedMacs(net, budget.layer_costs, budget.layer_keys)
        self.mixture = WidthMixture(net)
        # The policy of the current b (b changes only at a search step's update): the
        # recovery is not redone for every weight step in between.
        self._current: Optional[Policy] = None
        # The last step's device values on their way to the host (the mixture weights'
        # gradient, the loss, the accuracy): see step.
        self._pending: Optional[Readback] = None

    def recover(self, b: Optional[Tensor] = None) -> Recovered:
        """The code recovered from ``b`` (default: the current one), before the cut."""
        s = self.settings
        return ista(self.a, self.b if b is None else b, s.sparsity, s.iterations)

    def policy(self, recovered: Recovered) -> Policy:
        """The arch, probabilities and mixture pairs of a recovered code (see :class:`Policy`):
        a coded decision's probabilities are the softmax of its block's scores over
        ``ista.temperature``, its pair the two most likely candidates; a pinned decision's
        probability is 1 and its pair its one width."""
        kept = choose(recovered.scores, self.blocks)
        blocks = per_decision_probs(recovered.scores, self.blocks, self.settings.temperature)
        arch = [0] * len(self.sizes)
        probs: list[Tensor] = [torch.ones(1, dtype=torch.float64) for _ in self.sizes]
        for d, index, block in zip(self.coded, kept, blocks):
            arch[d], probs[d] = index, block
        return Policy(arch, probs, [top_pair(p) for p in probs])

    def _now(self) -> Policy:
        """The policy of the current ``b``, detached (recovered once per ``b``)."""
        if self._current is None:
            with torch.no_grad():
                self._current = self.policy(self.recover())
        return self._current

    def sample_train_arch(self) -> Arch:
        return list(self._now().arch)

    def step(self, score: Score, batch: Optional[Batch] = None) -> dict[str, float]:
        """Run the mixture on the validation batch, and update ``b`` with the previous step's.

        The device computes the gradient of the cross-entropy with respect to the mixture
        weights (averaged over the processes) and sends it to the host without waiting; the
        host finishes the chain through the recovery to ``b``, adds the FLOPs loss and takes the
        Adam step at the next search step (or :meth:`flush`), recovering the same ``z`` from
        the same ``b``. The update is the one the whole loss gives; only the weight steps in
        between train the arch of ``b`` before it.
        """
        out = self.flush()
        x, y = require_batch("ista", batch)
        host = self._now().pairs
        # non_blocking: a copy from pageable memory that does not wait for the device's queue.
        weights = torch.stack([w for *_, narrow, wide in host for w in (narrow, wide)]).float()
        weights = weights.to(x.device, non_blocking=True)
        weights.requires_grad_(True)
        pairs = [(narrow, wide, weights[2 * d], weights[2 * d + 1]) for d, (narrow, wide, *_) in enumerate(host)]
        self.net.set_arch([wide for _, wide, _, _ in host])
        with validation_mode(self.net), self.mixture.active(pairs):
            logits = self.net(x)
        task = F.cross_entropy(logits.float(), y)
        (grad,) = torch.autograd.grad(task, [weights], allow_unused=True)
        grad = average_gradient(torch.zeros_like(weights) if grad is None else grad)
        accuracy = (logits.detach().argmax(1) == y).float().mean()
        self._pending = Readback(torch.cat([grad.double(), torch.stack([task.detach(), accuracy]).double()]))
        return out

    def flush(self) -> dict[str, float]:
        if self._pending is None:
            return {}
        *grad, task, accuracy = self._pending.tolist()
        self._pending = None
        recovered = self.recover()
        arch, probs, pairs = self.policy(recovered)
        expected = self.expected_macs(probs)
        cost = flops_loss(expected, self.flops(arch), self.target, self.band)
        weights = torch.stack([w for *_, narrow, wide in pairs for w in (narrow, wide)])
        # The task loss through the weights (its gradient there came from the device) plus the FLOPs loss.
        surrogate = (weights * torch.tensor(grad, dtype=weights.dtype)).sum() + self.settings.flops_weight * cost
        if surrogate.requires_grad:
            (self.b.grad,) = torch.autograd.grad(surrogate, [self.b], allow_unused=True)
        if self.b.grad is None:  # nothing reached b (no coded decision): Adam still counts the step
            self.b.grad = torch.zeros_like(self.b)
        self.optimizer.step()
        self.b.grad = None
        self._current = None
        entropy, _ = self.policy_entropy()
        return {"reward": accuracy, "entropy": entropy, "loss": task,
                "flops_loss": float(cost.detach()), f"expected_{self.key}": float(expected.detach()),
                "nonzeros": int((recovered.z.detach() > 0).sum()), "recovery_iterations": recovered.iterations}

    def beam(self, size: int) -> list[tuple[Arch, float]]:
        return product_beam([p.log() for p in self._now().probs], size)

    def probabilities(self, arch: Arch) -> list[list[float]]:
        return [p.tolist() for p in self._now().probs]

    def policy_entropy(self, samples: int = 256) -> tuple[float, float]:
        entropy = sum(float(torch.special.entr(p).sum()) for p in self._now().probs)
        return entropy, self.groups.max_entropy()

    def state_dict(self) -> dict[str, Any]:
        # A pending step needs only its device values: its z is recovered again from b.
        return {"b": self.b.detach().clone(), "optimizer": self.optimizer.state_dict(),
                "pending": None if self._pending is None else self._pending.tolist()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        with torch.no_grad():
            self.b.copy_(state["b"])
        self.optimizer.load_state_dict(state["optimizer"])
        self._current = None
        pending = state.get("pending")
        self._pending = None if pending is None else Readback(torch.tensor(pending, dtype=torch.float64))
