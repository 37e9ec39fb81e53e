"""Width search by sparse coding, in the spirit of ISTA-NAS (Yang et al., "ISTA-NAS: efficient
and consistent neural architecture search by sparse coding", NeurIPS 2020).

**From cells to widths.** ISTA-NAS writes a DARTS cell's choices (which operations on which
edges) as a sparse vector ``z`` (``k`` non-zeros per node), keeps only a compressed vector
``b = A z`` with a fixed random dictionary ``A`` (``m`` rows, fewer than the entries of ``z``)
as the architecture parameter, recovers ``z`` from ``b`` by sparse coding (LASSO) whenever it
needs the architecture, trains the supernet on the operations ``z`` selects, weighted by ``z``,
and moves ``b`` by the gradient of the validation loss. Here:

* ``z`` is the concatenation of the one-hot width choices of the decisions that have a choice
  (``n = Σ_d K_d`` entries over the decisions with ``K_d ≥ 2``, one non-zero per decision; a
  decision pinned to one width is not coded); ``A`` is ``m × n`` Gaussian with unit columns,
  seeded by ``run.seed``, ``m = ⌈ista.ratio · n⌉`` (at most ``n − 1``);
* recovery (:func:`ista`, our own; ISTA-NAS calls a commercial solver): the non-negative LASSO
  ``min_{z ≥ 0} ½‖A z − b‖² + λ‖z‖₁`` (``λ = ista.sparsity``) solved to its KKT conditions:
  at most ``ista.iterations`` steps of ISTA with Nesterov's momentum (FISTA; step
  ``1/‖A‖₂²``) until the support they reach holds the exact solution (the closed form on that
  support, checked against the KKT conditions; a few hundred steps on the built-in spaces),
  so the arch is the LASSO's and not a function of the iteration count. It is a function of
  ``b`` alone (a resume recovers the same bits), differentiable in ``b`` through that closed
  form (the solution map's exact derivative where the support is stable);
* each decision keeps its largest entry (:func:`choose`, as ISTA-NAS keeps the top entries
  per node); a decision whose block recovered as all zeros keeps the candidate nearest to
  entering the support (the largest ``z − η∇``, the value ISTA thresholds; the narrowest on
  a tie);
* the weights train on the arch ``z`` selects, unweighted;
* each search step runs that arch on a validation batch with every coded decision's convs
  gated, after their batch norm, by ``z_d / stopgrad(z_d)`` (the value 1: the forward is
  exactly the selected network; the gradient is that of the log of its coefficient; a decision
  whose block is empty has the constant gate 1: the same network, no task gradient), adds
  ``ista.flops_weight`` times TAS's FLOPs loss on the expected MACs of ``p_d = z_d / Σ z_d``
  (the recovered code before the one-per-decision cut, normalised per decision; an empty
  block's ``p_d`` is the softmax of ``(z − η∇)/(ηλ)``, whose argmax is the one kept), and
  takes an Adam step (``ista.lr``) on ``b`` (``b`` lives on the host; the device returns the
  cross-entropy's gradient at the gates without being waited for, and the step lands at the
  next search step: :meth:`IstaSearcher.step`);
* the result is the argmax (:attr:`IstaSearcher.exports`), with or without a target, as
  ISTA-NAS exports its recovered ``z``: the beam is ranked by ``p``, whose argmax is ``z``'s.

**Left out.** ISTA-NAS's closed-form correction that keeps the supernet's ``z`` consistent
with the previous recovery (here the recovery is redone from ``b`` at every step); the
one-stage variant's ``k > 1`` non-zeros (a width has one value); cell topology. The gradient
reaches the candidates a decision did not select only through the dictionary's coupling
(``AᵀA``) and the FLOPs loss: the search is greedy, and the comparison
(``apsfast.search.compare``) shows how that fares against REINFORCE and TAS. Where the
dictionary, the sign of ``z``, the start of ``b`` and the optimiser differ from ISTA-NAS's
code is in the table of docs/differences.md.
"""
from __future__ import annotations

import contextlib
import math
from typing import Any, Callable, Iterator, NamedTuple, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from apsfast.models import Decision
from apsfast.nn import APSBatchNorm2d
from apsfast.search.budget import Budget, resolve_budget
from apsfast.search.config import Config
from apsfast.search.readback import Readback
from apsfast.search.searchers.base import Arch, Batch, Score, Searcher, require_batch
from apsfast.search.searchers.widths import (ExpectedMacs, Groups, average_gradient, driven_layers, flops_band,
                                             flops_loss, product_beam, validation_mode)

# The recovery stops once the closed form on its support meets the KKT conditions to this
# (an absolute residual; the codes' entries are of order 1).
KKT_TOLERANCE = 1e-9
# How often (in iterations) the recovery compares its support with the last one and tries
# the closed form on it.
CHECK_EVERY = 10


def dictionary(m: int, n: int, generator: torch.Generator) -> Tensor:
    """A fixed ``m × n`` Gaussian dictionary with unit-norm columns (float64)."""
    a = torch.randn(m, n, generator=generator, dtype=torch.float64)
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


def choose(scores: Tensor, sizes: Sequence[int]) -> Arch:
    """Each block's index of its largest score (ties: the narrower)."""
    arch, start = [], 0
    for size in sizes:
        arch.append(int(torch.argmax(scores[start:start + size].detach())))
        start += size
    return arch


def per_decision_probs(z: Tensor, scores: Tensor, sizes: Sequence[int], temperature: float,
                       eps: float = 1e-6) -> list[Tensor]:
    """Each block of the recovered code normalised into probabilities (``eps`` added to every
    entry); an empty block: the softmax of its scores over ``temperature`` (ISTA's threshold
    ``η·λ``), whose argmax is the candidate :func:`choose` keeps."""
    out, start = [], 0
    for size in sizes:
        block = z[start:start + size]
        if bool((block.detach() > 0).any()):
            block = block + eps
        else:
            block = (scores[start:start + size] / max(temperature, 1e-12)).softmax(dim=0) + eps
        out.append(block / block.sum())
        start += size
    return out


class BatchNormGates:
    """Multiplies the batch-norm output that follows each driven conv by its decision's gate
    (inside :meth:`active` only). The conv's output tensor is recognised when a batch norm
    receives it, so no knowledge of the model's layout is needed."""

    def __init__(self, net: nn.Module) -> None:
        self.gates: Optional[Tensor] = None
        self.pending: dict[int, tuple[Tensor, int]] = {}
        self.handles = [layer.register_forward_hook(self._tag(d))
                        for d, layers in enumerate(driven_layers(net)) for layer in layers]
        norms = [m for m in net.modules() if isinstance(m, (nn.modules.batchnorm._BatchNorm, APSBatchNorm2d))]
        self.handles += [m.register_forward_hook(self._gate) for m in norms]

    def _tag(self, decision: int) -> Callable[..., None]:
        def tag(layer: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> None:
            if self.gates is not None:
                self.pending[id(output)] = (output, decision)  # the tensor kept: its id stays unique
        return tag

    def _gate(self, norm: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> Optional[Tensor]:
        if self.gates is None:
            return None
        entry = self.pending.pop(id(inputs[0]), None)
        return None if entry is None else output * self.gates[entry[1]].to(output.dtype)

    @contextlib.contextmanager
    def active(self, gates: Tensor) -> Iterator[None]:
        self.gates = gates
        try:
            yield
        finally:
            self.gates, self.pending = None, {}


class IstaSearcher(Searcher):
    """Sparse-coding width search (see the module's documentation).

    Args:
        decisions, config, flops, budget: as every searcher (the cost loss is on the budget's cost:
            MACs, or predicted milliseconds).
        net: the supernet (its driven convs' batch norms get the gates).
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
        generator = torch.Generator().manual_seed(config.run.seed + 3)
        self.a = dictionary(m, n, generator)
        self.eta = step_size(self.a) if n else 0.0
        start = torch.cat([torch.full((k,), 1.0 / k, dtype=torch.float64) for k in self.blocks]) if n else \
            torch.zeros(0, dtype=torch.float64)
        start = start + 0.01 * torch.rand(n, generator=generator, dtype=torch.float64)
        self.b = (self.a @ start).requires_grad_(True)
        self.optimizer = torch.optim.Adam([self.b], lr=settings.lr, betas=tuple(settings.betas))
        self.expected_macs = ExpectedMacs(net, budget.layer_costs, budget.layer_keys)
        self.gates = BatchNormGates(net)
        # The arch and log-probabilities of the current b (b changes only at a search step's
        # update): the recovery is not redone for every weight step in between.
        self._current: Optional[tuple[Arch, list[Tensor]]] = None
        # The last step's device values on their way to the host (the gates' gradient, the
        # loss, the accuracy): see step.
        self._pending: Optional[Readback] = None

    def recover(self, b: Optional[Tensor] = None) -> Recovered:
        """The code recovered from ``b`` (default: the current one), before the cut."""
        s = self.settings
        return ista(self.a, self.b if b is None else b, s.sparsity, s.iterations)

    def policy(self, recovered: Recovered) -> tuple[Arch, list[Tensor], Tensor]:
        """The arch a recovered code selects (every decision, pinned ones at their one width),
        every decision's probabilities (differentiable in ``b``) and the gates of the validation
        forward: ``z_d / stopgrad(z_d)`` of each coded decision's kept entry (value 1), the
        constant 1 for a decision whose block is empty and for a pinned one."""
        z, scores = recovered.z, recovered.scores
        kept = choose(scores, self.blocks)
        blocks = per_decision_probs(z, scores, self.blocks, self.eta * self.settings.sparsity)
        arch = [0] * len(self.sizes)
        probs: list[Tensor] = [torch.ones(1, dtype=torch.float64) for _ in self.sizes]
        gates: list[Tensor] = [torch.ones((), dtype=torch.float64) for _ in self.sizes]
        for d, start, index, block in zip(self.coded, self.starts, kept, blocks):
            arch[d], probs[d] = index, block
            value = z[start + index]
            if float(value.detach()) > 0:
                gates[d] = value / value.detach()
        return arch, probs, torch.stack(gates)

    def _now(self) -> tuple[Arch, list[Tensor]]:
        """The arch and log-probabilities of the current ``b`` (recovered once per ``b``)."""
        if self._current is None:
            with torch.no_grad():
                arch, probs, _ = self.policy(self.recover())
            self._current = arch, [p.log() for p in probs]
        return self._current

    def sample_train_arch(self) -> Arch:
        return list(self._now()[0])

    def step(self, score: Score, batch: Optional[Batch] = None) -> dict[str, float]:
        """Run the gated arch on the validation batch, and update ``b`` with the previous step's.

        The device computes the gradient of the cross-entropy with respect to the gates
        (averaged over the processes) and sends it to the host without waiting; the host
        finishes the chain through the recovery to ``b``, adds the FLOPs loss and takes the
        Adam step at the next search step (or :meth:`flush`), recovering the same ``z`` from
        the same ``b``. The update is the one the whole loss gives; only the weight steps in
        between train the arch of ``b`` before it.
        """
        out = self.flush()
        x, y = require_batch("ista", batch)
        arch = self.sample_train_arch()
        # Every gate's value is 1 (see policy): the device needs only the ones whose gradient
        # it returns; the host applies the chain through z at the update.
        gates = torch.ones(len(self.sizes), device=x.device, requires_grad=True)
        self.net.set_arch(arch)
        with validation_mode(self.net), self.gates.active(gates):
            logits = self.net(x)
        task = F.cross_entropy(logits.float(), y)
        (grad,) = torch.autograd.grad(task, [gates], allow_unused=True)
        grad = average_gradient(torch.zeros_like(gates) if grad is None else grad)
        accuracy = (logits.detach().argmax(1) == y).float().mean()
        self._pending = Readback(torch.cat([grad.double(), torch.stack([task.detach(), accuracy]).double()]))
        return out

    def flush(self) -> dict[str, float]:
        if self._pending is None:
            return {}
        *grad, task, accuracy = self._pending.tolist()
        self._pending = None
        recovered = self.recover()
        arch, probs, gates = self.policy(recovered)
        expected = self.expected_macs(probs)
        cost = flops_loss(expected, self.flops(arch), self.target, self.band)
        # The task loss through the gates (its gradient there came from the device) plus the FLOPs loss.
        surrogate = (gates * torch.tensor(grad, dtype=gates.dtype)).sum() + self.settings.flops_weight * cost
        if surrogate.requires_grad:
            (self.b.grad,) = torch.autograd.grad(surrogate, [self.b], allow_unused=True)
        if self.b.grad is None:  # nothing reached b (every block empty, no FLOPs loss): Adam still counts the step
            self.b.grad = torch.zeros_like(self.b)
        self.optimizer.step()
        self.b.grad = None
        self._current = None
        entropy, _ = self.policy_entropy()
        return {"reward": accuracy, "entropy": entropy, "loss": task,
                "flops_loss": float(cost.detach()), f"expected_{self.key}": float(expected.detach()),
                "nonzeros": int((recovered.z.detach() > 0).sum()), "recovery_iterations": recovered.iterations}

    def beam(self, size: int) -> list[tuple[Arch, float]]:
        return product_beam(self._now()[1], size)

    def probabilities(self, arch: Arch) -> list[list[float]]:
        return [row.exp().tolist() for row in self._now()[1]]

    def policy_entropy(self, samples: int = 256) -> tuple[float, float]:
        entropy = sum(float(-(row.exp() * row).sum()) for row in self._now()[1])
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
