"""The paper's §3.3 measurements, taken during a search (``analysis.every`` > 0).

Every ``analysis.every`` weight steps (warm-up and search alike) the schedule records one
``{"kind": "analysis", ...}`` line in ``metrics.jsonl`` holding:

``cos``
    the gradient alignment of paper eq. 3, ``cos(g, g̃) = gᵀg̃ / (‖g‖ ‖g̃‖)``, where
    ``g = ∇_W L(a)`` and ``g̃ = ∇_W L(ã)`` are the gradients of the cross-entropy of two
    archs ``a ≠ ã`` on the step's training batch with respect to the meta-weights ``W`` of
    every APS layer (conv and linear ``weight``), flattened into one vector; the mean over
    ``analysis.pairs`` pairs of uniformly sampled archs.
``coupled_norm``
    the norm of the coupled updates of §3.3 (the third term of the expansion of ``W^t``). In
    this code's layout (output mode first) the candidate kernel of a layer is
    ``W^{a} = P^{aᵀ} W Q^{a}``, the meta-gradient of arch ã is ``g̃ = P^{ã} G^{ã} Q^{ãᵀ}``
    (``G^{ã}`` the gradient on its candidate kernel), and the part of ã's update that lands on
    a's candidate kernel is ``P^{aᵀ} g̃ Q^{a} = P^{aᵀ}P^{ã} G^{ã} Q^{ãᵀ}Q^{a}``. The coupled
    norm of a pair is the Frobenius norm of that projection over every layer whose decision
    differs between the two archs (``(o, i)`` of ã ≠ ``(o, i)`` of a; where they agree it is
    the normal update, not a coupled one), ``sqrt(Σ_ℓ ‖P^{aᵀ}_ℓ g̃_ℓ Q^{a}_ℓ‖²_F)``, averaged
    over both directions of the pair (ã onto a, a onto ã) and over the pairs. Ordinal
    sharing maps nested candidates onto each other, so it couples most; independent sharing
    couples nothing (``P^{oᵀ}P^{õ} = 0`` for ``o ≠ õ`` and ``Q^{ĩᵀ}Q^{i} = 0`` for ``i ≠ ĩ``, so
    the norm is exactly 0).
``phi``
    the network's sharing level Φ (:func:`apsfast.nn.network_sharing_level`).
``acc_mean``, ``acc_max``
    the mean and the best accuracy of ``analysis.samples`` uniformly sampled archs on one
    validation batch (the first batch of the run's class-balanced evaluation subset, the same
    images at every measurement), each with the batch's own normalisation statistics.
``probs``, ``top2_gap``
    each decision's candidate probabilities along the searcher's most likely arch, and per
    decision the gap between its two largest probabilities.

None of it changes the run: the archs come from a generator of its own seeded from the run's
seed and the step, gradients come from ``torch.autograd.grad`` (no ``.grad`` is written, the
optimizer is not touched), batch norm uses batch statistics without updating its running
ones, and the supernet's arch is restored afterwards. Under ``torchrun`` every process
measures on its slice of the batch (batch-norm statistics are global, gradients local) and
the accuracies are summed over the processes.
"""
from __future__ import annotations

import math
from typing import Any, Optional, Protocol, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from apsfast.nn import APSConv2d, APSLayer, aps_layers, network_sharing_level
from apsfast.search import steps
from apsfast.search.session import Precision


class RunningSearch(Protocol):
    """What :func:`measure_search` reads of a running search (a
    :class:`apsfast.search.schedule.Search`, which calls it: named here by its parts so that the
    analysis does not import the schedule back)."""
    net: Any
    session: Any
    config: Any
    processes: Any
    searcher: Any
    eval_set: Any
    step: int


Arch = list[int]
Indices = Optional[tuple[int, int]]  # (output candidate, input candidate) a layer ran with
SEED_OFFSET = 7919  # keeps the analysis's arch stream apart from the run's (seed + 1, + 2, ...)
RETRIES = 16  # draws of ã before a pair is allowed to repeat a (a space with one arch)


def analysis_generator(seed: int, step: int) -> torch.Generator:
    """The generator of the archs measured at ``step``: a function of the run's seed and the
    step only, so the measurement touches none of the run's random streams and is the same
    after a resume."""
    return torch.Generator().manual_seed((seed + SEED_OFFSET) * 1_000_003 + step)


def _precision(precision: Optional[Precision], like: Tensor) -> Precision:
    return precision if precision is not None else Precision("none", False, like.device)


def arch_gradient(net: nn.Module, arch: Sequence[int], x: Tensor, y: Tensor,
                  precision: Optional[Precision] = None) -> tuple[list[Tensor], list[Indices]]:
    """``∇_W L(arch)`` on ``(x, y)`` for the meta-weight of every APS layer of ``net`` (in
    :func:`apsfast.nn.aps_layers` order; zeros where the arch leaves a layer unused), and the
    ``(output, input)`` candidate indices each layer ran with.

    Batch norm uses the batch's statistics and leaves its running ones alone; no ``.grad``
    is written. The net's arch is left at ``arch``.
    """
    layers = aps_layers(net)
    indices: list[Indices] = [None] * len(layers)

    def record(k: int, layer: APSLayer):
        def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
            width = args[0].shape[1] if isinstance(layer, APSConv2d) else args[0].shape[-1]
            i = layer.input_index(width)
            depthwise = getattr(layer, "depthwise", False)
            indices[k] = (i, i) if depthwise else (layer.active_out_index, i)
        return hook

    handles = [layer.register_forward_pre_hook(record(k, layer)) for k, layer in enumerate(layers)]
    weights = [layer.weight for layer in layers]
    net.set_arch(arch)
    try:
        with steps.batch_statistics(net), torch.enable_grad(), _precision(precision, x).autocast():
            loss = F.cross_entropy(net(x).float(), y)
            grads = torch.autograd.grad(loss, weights, allow_unused=True)
    finally:
        for handle in handles:
            handle.remove()
    return [torch.zeros_like(w) if g is None else g.detach() for g, w in zip(grads, weights)], indices


def cosine(g: Sequence[Tensor], h: Sequence[Tensor]) -> float:
    """``gᵀh / (‖g‖ ‖h‖)`` of two gradients given as lists of tensors (flattened and
    concatenated), in float64; NaN when either is zero."""
    dot = sum(float((a.double() * b.double()).sum()) for a, b in zip(g, h))
    norm_g = math.sqrt(sum(float(a.double().square().sum()) for a in g))
    norm_h = math.sqrt(sum(float(b.double().square().sum()) for b in h))
    return dot / (norm_g * norm_h) if norm_g > 0 and norm_h > 0 else math.nan


def project(grad: Tensor, layer: APSLayer, indices: tuple[int, int]) -> Tensor:
    """``P^{oᵀ} · grad · Q^{i}`` over the channel modes: a meta-shaped tensor (a meta-weight's
    gradient) seen from candidate ``indices = (o, i)`` of ``layer``, shaped like that
    candidate's kernel. A fixed side (no transform) is the identity."""
    out_index, in_index = indices
    g = grad
    if layer.out_transforms is not None:
        P = layer.out_transforms[out_index].to(g.dtype)
        g = torch.tensordot(P.t(), g, dims=([1], [0]))
    if layer.in_transforms is not None:
        Q = layer.in_transforms[in_index].to(g.dtype)
        g = torch.movedim(torch.movedim(g, 1, -1) @ Q, -1, 1)
    return g


def coupled_norm(net: nn.Module, grads: Sequence[Tensor], source: Sequence[Indices],
                 target: Sequence[Indices]) -> float:
    """The Frobenius norm of the part of the update ``grads`` (the meta-gradient of an arch
    whose layers ran with candidates ``source``) that lands on the candidate kernels of
    another arch (``target``), over the layers where the two differ (see the module's
    documentation); float64."""
    total = 0.0
    with torch.no_grad():
        for layer, grad, src, dst in zip(aps_layers(net), grads, source, target):
            if src is not None and dst is not None and src != dst:
                total += float(project(grad.double(), layer, dst).square().sum())
    return math.sqrt(total)


def _distinct_pair(net: nn.Module, generator: torch.Generator) -> tuple[Arch, Arch]:
    a = net.sample_uniform(generator)
    b = net.sample_uniform(generator)
    for _ in range(RETRIES):
        if b != a:
            break
        b = net.sample_uniform(generator)
    return a, b


def gradient_measures(net: nn.Module, x: Tensor, y: Tensor, pairs: int, generator: torch.Generator,
                      precision: Optional[Precision] = None) -> tuple[float, float]:
    """``(cos, coupled_norm)`` averaged over ``pairs`` pairs of distinct uniformly sampled
    archs (drawn from ``generator``) on ``(x, y)``."""
    cosines, norms = [], []
    for _ in range(pairs):
        a, b = _distinct_pair(net, generator)
        g, at = arch_gradient(net, a, x, y, precision)
        h, bt = arch_gradient(net, b, x, y, precision)
        cosines.append(cosine(g, h))
        norms.append(0.5 * (coupled_norm(net, h, bt, at) + coupled_norm(net, g, at, bt)))
        del g, h
    return sum(cosines) / len(cosines), sum(norms) / len(norms)


def top2_gaps(probs: Sequence[Sequence[float]]) -> list[float]:
    """Per decision, its largest probability minus its second largest (1 for one candidate)."""
    gaps = []
    for p in probs:
        ranked = sorted(p, reverse=True) + [0.0]
        gaps.append(ranked[0] - ranked[1])
    return gaps


def measure_search(search: RunningSearch, x: Tensor, y: Tensor) -> dict[str, Any]:
    """The analysis record of a running search at its current step (``x, y``: the global
    batch of the weight step just taken); see the module's documentation. Leaves the net's
    arch as it found it."""
    net, session, config = search.net, search.session, search.config
    precision, processes = session.precision, search.processes
    previous = net.arch
    generator = analysis_generator(config.run.seed, search.step)
    try:
        cos, coupled = gradient_measures(net, *session.local(x, y), config.analysis.pairs, generator, precision)
        archs = [net.sample_uniform(generator) for _ in range(config.analysis.samples)]
        vx, vy = next(iter(search.eval_set.batches(config.train.batch_size, seed=0, epoch=0, shuffle=False,
                                                   drop_last=True)))
        vx, vy = session.local(vx, vy)
        counts = processes.sum(steps.count_correct(net, archs, vx, vy, precision).tolist())
        accuracies = [c / (len(vy) * processes.world) for c in counts]
    finally:
        net.set_arch(previous)
    with torch.no_grad():
        probs = search.searcher.probabilities(search.searcher.beam(1)[0][0])
    return {"cos": cos, "coupled_norm": coupled, "phi": float(network_sharing_level(net).detach()),
            "acc_mean": sum(accuracies) / len(accuracies), "acc_max": max(accuracies),
            "probs": probs, "top2_gap": top2_gaps(probs)}
