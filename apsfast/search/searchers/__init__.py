"""Searchers: what picks the architectures a search trains and ends with.

The search schedule talks to a searcher through one small interface, :class:`Searcher`
(:mod:`.base` says when the schedule calls what). ``controller.kind`` picks one of
:data:`SEARCHERS`:

* ``reinforce`` (the paper's, the default): an LSTM policy trained by REINFORCE on
  FLOPs-penalised rewards (:mod:`.reinforce`);
* ``tas``: TAS's per-decision logits, two widths per decision mixed by channel-wise
  interpolation, a FLOPs loss on the expected MACs (:mod:`.tas`);
* ``ista``: ISTA-NAS-style sparse coding of the one-hot width choices (:mod:`.ista`).

A new searcher is one class implementing :class:`Searcher`, constructed as
``cls(decisions, config, flops, net=supernet, search_steps=N, budget=budget)`` and registered
here (and its name in ``config.SEARCHER_KINDS``). ``budget``
(:class:`~apsfast.search.budget.Budget`) is the cost the searcher weighs and its target: MACs
against ``reward.flops_target``, or predicted milliseconds against ``reward.latency_target``.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

from torch import nn

from apsfast.models import Decision
from apsfast.search.budget import Budget
from apsfast.search.config import Config
from apsfast.search.searchers.base import Arch, Batch, Score, Searcher
from apsfast.search.searchers.ista import IstaSearcher
from apsfast.search.searchers.reinforce import ReinforceSearcher
from apsfast.search.searchers.tas import TasSearcher
from apsfast.search.steps import distillation_loss

SEARCHERS: dict[str, Callable[..., Searcher]] = {
    "reinforce": ReinforceSearcher,
    "tas": TasSearcher,
    "ista": IstaSearcher,
}


def build_searcher(decisions: Sequence[Decision], config: Config, flops: Callable[[Arch], float], *,
                   net: Optional[nn.Module] = None, search_steps: Optional[int] = None,
                   budget: Optional[Budget] = None) -> Searcher:
    """The searcher ``config.controller.kind`` names.

    Args:
        decisions: the supernet's decisions; ``flops``: MACs of an arch.
        net: the supernet (the differentiable searchers hook its layers).
        search_steps: weight steps after warm-up (TAS anneals its temperature over them).
        budget: the cost and target (default: ``flops`` against ``reward.flops_target``); a
            ``reward.latency_target`` needs the latency budget
            (:func:`apsfast.search.budget.search_budget`).
    """
    kind = config.controller.kind
    if kind not in SEARCHERS:
        raise ValueError(f"controller.kind must be one of {', '.join(SEARCHERS)}, got {kind!r}")
    return SEARCHERS[kind](decisions, config, flops, net=net, search_steps=search_steps, budget=budget)


__all__ = ["Arch", "Batch", "Budget", "IstaSearcher", "ReinforceSearcher", "SEARCHERS", "Score", "Searcher",
           "TasSearcher", "build_searcher", "distillation_loss"]
