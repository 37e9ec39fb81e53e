"""Width search by sparse coding, in the spirit of ISTA-NAS (Yang et al., "ISTA-NAS: efficient
and consistent neural architecture search by sparse coding", NeurIPS 2020).

**From cells to widths.** ISTA-NAS writes a DARTS cell's choices (which operations on which
edges) as a sparse vector ``z`` (``k`` non-zeros per node), keeps only a compressed vector
``b = A z`` with a fixed random dictionary ``A`` (``m`` rows, fewer than the entries of ``z``)
as the architecture parameter, recovers ``z`` from ``b`` by sparse coding (LASSO) whenever it
needs the architecture, trains the supernet on the operations ``z`` selects, weighted by ``z``,
and moves ``b`` by the gradient of the validation loss. Here:

* ``z`` is the concatenation of every decision's one-hot width choice (``n = Σ_d K_d``
  entries, one non-zero per decision); ``A`` is ``m × n`` Gaussian with unit columns, seeded
  by ``run.seed``, ``m = ⌈ista.ratio · n⌉`` (at most ``n − 1``);
* recovery (:func:`ista`, our own): ``ista.iterations`` steps of non-negative ISTA on
  ``½‖A z − b‖² + λ‖z‖₁`` (``λ = ista.sparsity``, step ``1/‖A‖₂²``), then each decision keeps
  only its largest entry (:func:`one_per_decision`, as ISTA-NAS keeps the top entries per
  node); the recovered ``z`` is a differentiable function of ``b`` (the iterations unrolled);
* the weights train on the arch ``z`` selects (the argmax of each decision), unweighted;
* each search step runs that arch on a validation batch with every decision's convs gated,
  after their batch norm, by ``z_d / stopgrad(z_d)`` (the value 1: the forward is exactly the
  selected network; the gradient is that of the log of its coefficient), adds
  ``ista.flops_weight`` times TAS's FLOPs loss on the expected MACs of ``p_d = z_d / Σ z_d``
  (the recovered code before the one-per-decision cut, normalised per decision), and takes
  an Adam step (``ista.lr``) on ``b`` through the unrolled recovery (``b`` lives on the
  host; the device returns the cross-entropy's gradient at the gates without being waited
  for, and the step lands at the next search step: :meth:`IstaSearcher.step`);
* the result is ``z`` at the end: its beam is ranked by ``p``, whose argmax is ``z``'s.

**Left out.** The LASSO solved by a commercial solver, and ISTA-NAS's closed-form correction
that keeps the supernet's ``z`` consistent with the previous recovery (here the recovery is
redone from ``b`` at every step); the one-stage variant's ``k > 1`` non-zeros (a width has one
value); cell topology. The gradient reaches the candidates a decision did not select only
through the dictionary's coupling (``AᵀA``) and the FLOPs loss: the search is greedy, and
the comparison (``apsfast.search.compare``) shows how that fares against REINFORCE and TAS.
"""
from __future__ import annotations

import contextlib
import math
from typing import Any, Callable, Iterator, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from apsfast.models import Decision
from apsfast.nn import APSBatchNorm2d
from apsfast.search.budget import Budget, resolve_budget
from apsfast.search.config import Config
from apsfast.search.readback import Readback
from apsfast.search.searchers.base import Arch, Batch, Score, Searcher, require_batch
from apsfast.search.searchers.widths import (ExpectedMacs, Groups, average_gradient, driven_layers, flops_loss,
                                             product_beam, validation_mode)


def dictionary(m: int, n: int, generator: torch.Generator) -> Tensor:
    """A fixed ``m × n`` Gaussian dictionary with unit-norm columns (float64)."""
    a = torch.randn(m, n, generator=generator, dtype=torch.float64)
    return a / a.norm(dim=0, keepdim=True)


def ista(a: Tensor, b: Tensor, sparsity: float, iterations: int) -> Tensor:
    """Non-negative ISTA for ``min_z ½‖a z − b‖² + sparsity·‖z‖₁, z ≥ 0`` from ``z = 0``:
    ``z ← max(z − η aᵀ(a z − b) − η·sparsity, 0)``, ``η = 1/‖a‖₂²``; differentiable in ``b``."""
    eta = 1.0 / float(torch.linalg.matrix_norm(a, ord=2)) ** 2
    z = torch.zeros(a.shape[1], dtype=b.dtype, device=b.device)
    for _ in range(iterations):
        z = F.relu(z - eta * (a.T @ (a @ z - b)) - eta * sparsity)
    return z


def one_per_decision(z: Tensor, sizes: Sequence[int]) -> tuple[Tensor, Arch]:
    """``z`` with only the largest entry of each decision's block kept (ties: the narrower),
    and those entries' indices (the arch)."""
    kept, arch, start = torch.zeros_like(z), [], 0
    for size in sizes:
        block = z[start:start + size]
        index = int(torch.argmax(block.detach()))
        kept = kept + F.one_hot(torch.tensor(start + index), len(z)).to(z) * block[index]
        arch.append(index)
        start += size
    return kept, arch


def per_decision_probs(z: Tensor, sizes: Sequence[int], eps: float = 1e-6) -> list[Tensor]:
    """Each decision's block of the recovered code, normalised into probabilities."""
    out, start = [], 0
    for size in sizes:
        block = z[start:start + size] + eps
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

    def __init__(self, decisions: Sequence[Decision], config: Config, flops: Callable[[Arch], float], *,
                 net: Optional[nn.Module] = None, budget: Optional[Budget] = None, **context: Any) -> None:
        if net is None:
            raise ValueError("the ista searcher needs net= (the supernet) from the schedule")
        settings = self.settings = config.ista
        budget = resolve_budget(config, flops, budget)
        self.net, self.flops, self.target, self.key = net, budget.cost, budget.target, budget.key
        self.groups = Groups(decisions)
        self.sizes = self.groups.sizes
        n = sum(self.sizes)
        m = min(max(math.ceil(settings.ratio * n), 1), max(n - 1, 1))
        generator = torch.Generator().manual_seed(config.run.seed + 3)
        self.a = dictionary(m, n, generator)
        start = torch.cat([torch.full((k,), 1.0 / k, dtype=torch.float64) for k in self.sizes])
        start = start + 0.01 * torch.rand(n, generator=generator, dtype=torch.float64)
        self.b = (self.a @ start).requires_grad_(True)
        self.optimizer = torch.optim.Adam([self.b], lr=settings.lr, betas=tuple(settings.betas))
        self.expected_macs = ExpectedMacs(net, budget.layer_costs, budget.layer_keys)
        self.gates = BatchNormGates(net)
        # The last step's device values on their way to the host (the gates' gradient, the
        # loss, the accuracy): see step.
        self._pending: Optional[Readback] = None

    def recover(self, b: Optional[Tensor] = None) -> Tensor:
        """The code ``z`` recovered from ``b`` (default: the current one), before the cut."""
        s = self.settings
        return ista(self.a, self.b if b is None else b, s.sparsity, s.iterations)

    def sample_train_arch(self) -> Arch:
        with torch.no_grad():
            return one_per_decision(self.recover(), self.sizes)[1]

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
        with torch.no_grad():
            gates, arch, _ = self._gates()
        # non_blocking: a copy from pageable memory that does not wait for the device's queue.
        gates = gates.to(x.device, torch.float32, non_blocking=True).requires_grad_(True)
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
        gates, arch, z = self._gates()
        expected = self.expected_macs(per_decision_probs(z, self.sizes))
        cost = flops_loss(expected, self.flops(arch), self.target, self.settings.flops_tolerance)
        # The task loss through the gates (its gradient there came from the device) plus the FLOPs loss.
        surrogate = (gates * torch.tensor(grad, dtype=gates.dtype)).sum() + self.settings.flops_weight * cost
        (self.b.grad,) = torch.autograd.grad(surrogate, [self.b])
        self.optimizer.step()
        self.b.grad = None
        entropy, _ = self.policy_entropy()
        return {"reward": accuracy, "entropy": entropy, "loss": task,
                "flops_loss": float(cost.detach()), f"expected_{self.key}": float(expected.detach()),
                "nonzeros": int((z.detach() > 0).sum())}

    def _gates(self) -> tuple[Tensor, Arch, Tensor]:
        """Every decision's gate ``z_d / stopgrad(z_d)`` (value 1, or 0 where the recovery left
        the decision empty; differentiable in ``b``), the arch they gate and the recovered
        code ``z``, from ``b`` as it is."""
        z = self.recover()
        kept, arch = one_per_decision(z, self.sizes)
        chosen = torch.stack([kept[start + a] for start, a in zip(self._starts(), arch)])
        gates = chosen / chosen.detach().clamp_min(1e-12)
        return gates, arch, z

    def _starts(self) -> list[int]:
        return [sum(self.sizes[:d]) for d in range(len(self.sizes))]

    def _log_probs(self) -> list[Tensor]:
        with torch.no_grad():
            return [p.log() for p in per_decision_probs(self.recover(), self.sizes)]

    def beam(self, size: int) -> list[tuple[Arch, float]]:
        return product_beam(self._log_probs(), size)

    def probabilities(self, arch: Arch) -> list[list[float]]:
        return [row.exp().tolist() for row in self._log_probs()]

    def policy_entropy(self, samples: int = 256) -> tuple[float, float]:
        entropy = sum(float(-(row.exp() * row).sum()) for row in self._log_probs())
        return entropy, self.groups.max_entropy()

    def state_dict(self) -> dict[str, Any]:
        # A pending step needs only its device values: its z is recovered again from b.
        return {"b": self.b.detach().clone(), "optimizer": self.optimizer.state_dict(),
                "pending": None if self._pending is None else self._pending.tolist()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        with torch.no_grad():
            self.b.copy_(state["b"])
        self.optimizer.load_state_dict(state["optimizer"])
        pending = state.get("pending")
        self._pending = None if pending is None else Readback(torch.tensor(pending, dtype=torch.float64))
