"""What the differentiable width searchers (TAS, ISTA) share: per-decision probabilities in one
padded table, the exact expected MACs of independent width choices, the FLOPs loss with a
tolerance band, channel-wise interpolation, the beam of a factorised policy, and a forward
on a validation batch with its own normalisation statistics and gradients on.

**Expected MACs.** With every decision ``d`` drawn independently from ``p_d``, the expected
MACs are ``Σ_layers E[macs(layer)]``, and a layer's MACs depend only on the few decisions that
set its input and output widths (a conv: its input's and its output's; a shortcut projection,
present only where two widths differ: both; a depthwise conv: one). :class:`ExpectedMacs`
finds each layer's decisions by changing one decision at a time from a few anchor archs
(narrowest, widest, standard, two seeded random ones) and comparing the per-layer MACs of
``layer_shapes``; it then tabulates the layers that share a set of decisions over the grid of
those decisions' candidates. ``E[MACs] = Σ_sets Σ_grid table · Π_d p_d`` is then exact for
any coupling the anchors reveal (a layer whose cost changed with a decision at none of the
anchors would be missed: none does in the built-in spaces, which the tests check by
enumeration). It is a polynomial in the probabilities, so its gradient is exact too.
"""
from __future__ import annotations

import contextlib
import math
from typing import Callable, Hashable, Iterator, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from apsfast.models import Decision
from apsfast.models.layer_ops import dependency_grids, layer_dependencies

Arch = list[int]


class Groups:
    """Ragged per-decision candidate sets as one padded ``[decisions, max candidates]`` table;
    padding gets ``-inf`` logits (probability 0)."""

    def __init__(self, decisions: Sequence[Decision]) -> None:
        self.sizes = [len(d.widths) for d in decisions]
        self.mask = torch.zeros(len(self.sizes), max(self.sizes), dtype=torch.bool)
        for d, size in enumerate(self.sizes):
            self.mask[d, :size] = True

    def log_probs(self, logits: Tensor) -> Tensor:
        """Per-decision log-softmax of ``logits`` ``[D, K]``, ``-inf`` on the padding."""
        return logits.masked_fill(~self.mask.to(logits.device), -math.inf).log_softmax(dim=1)

    def rows(self, table: Tensor) -> list[Tensor]:
        """The valid entries of each row of ``table`` ``[D, K]``."""
        return [table[d, :size] for d, size in enumerate(self.sizes)]

    def entropy(self, log_probs: Tensor) -> float:
        """Σ_d H(p_d) in nats, and (second value via :meth:`max_entropy`) its maximum."""
        return float(sum(-(row.exp() * row).sum() for row in self.rows(log_probs.detach().cpu())))

    def max_entropy(self) -> float:
        return sum(math.log(k) for k in self.sizes)


def layer_macs(net: nn.Module, arch: Sequence[int]) -> dict[str, int]:
    """``{layer name: MACs}`` of ``net.export(arch)``, from the layer shapes (no forward)."""
    out: dict[str, int] = {}
    for shape in net.layer_shapes(list(arch)):
        if shape.macs:
            out[shape.name] = out.get(shape.name, 0) + shape.macs
    return out


class ExpectedMacs:
    """The exact expected MACs of a supernet under independent per-decision probabilities
    (see the module's documentation). ``terms``: ``(decisions, table)`` pairs.

    ``layer_costs(arch)`` (``{layer: cost}``) replaces the layers' MACs by another additive
    cost, e.g. the predicted latency of a :class:`~apsfast.models.latency.LatencyTable`; its
    layers' decisions are then found from ``layer_keys(arch)`` (``{layer: what its cost
    depends on}``; default: the costs themselves)."""

    def __init__(self, net: nn.Module, layer_costs: Optional[Callable[[Arch], dict[str, float]]] = None,
                 layer_keys: Optional[Callable[[Arch], dict[str, Hashable]]] = None) -> None:
        costs = layer_costs or (lambda arch: layer_macs(net, arch))
        sizes = [len(d.widths) for d in net.decisions()]
        try:
            grids = dependency_grids(net, layer_dependencies(net, layer_keys or costs))
        except ValueError as error:
            raise ValueError(f"{error}: no exact expected cost") from None
        self.terms: list[tuple[tuple[int, ...], Tensor]] = []
        for ds, names, archs in grids:
            values = [sum(cost.get(name, 0) for name in names) for cost in map(costs, archs)]
            self.terms.append((ds, torch.tensor(values, dtype=torch.float64).reshape([sizes[d] for d in ds])))

    def __call__(self, probs: Sequence[Tensor]) -> Tensor:
        """E[MACs] (a float64 0-d tensor, differentiable) for per-decision probability vectors."""
        total = torch.zeros((), dtype=torch.float64)
        for ds, table in self.terms:
            value = table
            for d in reversed(ds):  # contract the last mode with its decision's probabilities
                value = value @ probs[d].to(torch.float64).cpu()
            total = total + value
        return total


def flops_loss(expected: Tensor, current: float, target: Optional[float], band: float) -> Tensor:
    """TAS's FLOPs loss: ``log E[MACs]`` while the current arch is above ``target``,
    ``−log E[MACs]`` while it is below ``target − band``, zero inside the band (and without a
    target). TAS's band is its tolerance times the widest arch's cost (:func:`flops_band`)."""
    if target is None or target - band <= current <= target:
        return expected.new_zeros(())
    return expected.log() if current > target else -expected.log()


def flops_band(tolerance: float, net: nn.Module, cost: Callable[[Arch], float]) -> float:
    """The width of TAS's tolerance band under the target: ``tolerance`` times the cost of the
    widest arch (TAS's ``R − t·MAX_FLOP``), in the cost's unit."""
    return tolerance * float(cost(net.max_arch()))


def channel_interpolate(x: Tensor, channels: int) -> Tensor:
    """TAS's channel-wise interpolation (CWI): ``x`` ``[N, C, H, W]`` to ``channels`` channels by
    adaptive average pooling over the channel axis (output channel ``j`` averages input
    channels ``⌊jC/c⌋ … ⌈(j+1)C/c⌉ − 1``)."""
    if x.shape[1] == channels:
        return x
    n, c, h, w = x.shape
    flat = x.permute(0, 2, 3, 1).reshape(n * h * w, 1, c)
    return F.adaptive_avg_pool1d(flat, channels).reshape(n, h, w, channels).permute(0, 3, 1, 2)


Pair = tuple[int, int, Tensor, Tensor]  # (narrow index, wide index, narrow weight, wide weight)


class WidthMixture:
    """Forward hooks on every driven conv that mix two candidate widths of its decision
    (TAS's forward, :mod:`.tas`; ISTA's validation forward, :mod:`.ista`); active only inside
    :meth:`active`. The supernet runs the wider candidate of each pair; the hook also runs the
    narrower one (the same layer, its ``P`` for that width) and returns
    ``w_wide·y_wide + w_narrow·CWI(y_narrow)`` (:func:`channel_interpolate`); a pair of one
    candidate (``narrow == wide``) leaves the layer alone."""

    def __init__(self, net: nn.Module) -> None:
        self.pairs: Optional[list[Pair]] = None
        self.handles = [layer.register_forward_hook(self._hook(d))
                        for d, layers in enumerate(driven_layers(net)) for layer in layers]

    def _hook(self, decision: int) -> Callable[..., Optional[Tensor]]:
        def mix(layer: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> Optional[Tensor]:
            if self.pairs is None:
                return None
            narrow, wide, w_narrow, w_wide = self.pairs[decision]
            if narrow == wide:
                return None
            layer.select_out(narrow)
            try:
                small = layer.forward(inputs[0])  # not the module call: no hook recursion
            finally:
                layer.select_out(wide)
            return w_wide * output + w_narrow * channel_interpolate(small, output.shape[1])
        return mix

    @contextlib.contextmanager
    def active(self, pairs: list[Pair]) -> Iterator[None]:
        self.pairs = pairs
        try:
            yield
        finally:
            self.pairs = None

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def product_beam(log_probs: Sequence[Tensor], size: int) -> list[tuple[Arch, float]]:
    """The ``size`` most likely archs of independent per-decision distributions, best first
    (exact: a best sequence's prefixes are among the best prefixes); ties by arch."""
    beams: list[tuple[float, Arch]] = [(0.0, [])]
    for row in log_probs:
        values = row.tolist()
        beams = sorted(((score + v, arch + [a]) for score, arch in beams for a, v in enumerate(values)),
                       key=lambda item: (-item[0], item[1]))[:size]
    return [(arch, score) for score, arch in beams]


@contextlib.contextmanager
def validation_mode(net: nn.Module) -> Iterator[None]:
    """Train-mode forward with each batch's own normalisation statistics and gradients on, the
    running statistics untouched (as :func:`apsfast.search.steps.batch_statistics`, without
    ``no_grad``): a searcher's loss on validation data leaks nothing into the supernet."""
    norms = [m for m in net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    was_training = net.training
    net.eval()
    for norm in norms:
        norm.train()
        norm.track_running_stats = False
    try:
        yield
    finally:
        for norm in norms:
            norm.track_running_stats = True
        net.train(was_training)


def average_gradient(grad: Tensor) -> Tensor:
    """``grad`` averaged over the processes of a ``torchrun`` group (itself in one process), so
    every process takes the same architecture step."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        grad = grad.clone()
        torch.distributed.all_reduce(grad)
        grad /= torch.distributed.get_world_size()
    return grad


def driven_layers(net: nn.Module) -> list[list[nn.Module]]:
    """The APS convs each decision sets, in decision order (the supernet's own wiring)."""
    return net._driven
