"""The interface between the search schedule and a searcher.

The schedule calls, in this order:

* :meth:`Searcher.begin_step` before each weight step after warm-up, with the number of
  weight steps the search phase has taken before it (the ``train.widest_every`` steps
  included, which sample nothing): what a searcher whose settings follow the schedule (TAS's
  temperature) reads its position from;
* :meth:`Searcher.sample_train_arch` before each weight step after warm-up that does not
  train the widest arch (``train.widest_every``): the arch that step trains (the schedule
  sets it on the supernet);
* :meth:`Searcher.train_forward` around that weight step: a context in which the supernet's
  forward is the one the searcher wants trained (a no-op for most searchers; TAS mixes two
  widths per decision there);
* :meth:`Searcher.step` every ``controller.every`` weight steps, with a function that scores
  archs on a validation batch and that batch itself (for searchers that differentiate a
  validation loss); a searcher may finish a step at the next one (so as not to wait for the
  device), and :meth:`Searcher.flush` finishes it now;
* :meth:`Searcher.flush` at the end of the search, before the result is read;
* :meth:`Searcher.beam`, :meth:`Searcher.probabilities`, :meth:`Searcher.policy_entropy` at
  the end of each epoch and for the result;
* ``state_dict`` / ``load_state_dict`` at every checkpoint and resume: everything an exact
  resume needs, random streams included.
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable, ContextManager, Optional, Sequence, Union

from torch import Tensor

Arch = list[int]
Score = Callable[[list[Arch]], Union[Tensor, Sequence[float]]]
Batch = tuple[Tensor, Tensor]


class Searcher:
    """What picks the archs a search trains and ends with (see the module's documentation).

    ``exports``: how the result picks its arch from :meth:`beam` when the search has a target:
    ``"select"``, by the rule ``result.select`` names (the most likely within the target, or the
    closest to it without exceeding it: REINFORCE's rewards steer the whole distribution
    towards the target); ``"argmax"``, the most likely arch whatever its cost (what the
    differentiable searchers' authors export: their FLOPs loss steers the argmax itself).
    """

    exports: str = "select"

    def begin_step(self, done: int) -> None:
        """Told before every weight step of the search phase: ``done`` weight steps of the phase
        came before it. By default it is ignored."""

    def sample_train_arch(self) -> Arch:
        """The arch the next weight step trains."""
        raise NotImplementedError

    def train_forward(self) -> ContextManager[None]:
        """A context around the weight step whose arch :meth:`sample_train_arch` returned last;
        by default it changes nothing."""
        return contextlib.nullcontext()

    def step(self, score: Score, batch: Optional[Batch] = None) -> dict[str, float]:
        """One search step: ``score(archs)`` returns the validation accuracy of each arch (a
        device tensor, not read back, or floats), and ``batch`` is that validation batch
        ``(images, labels)`` on the run's device. The returned dict holds ``reward`` and
        ``entropy`` (logged per epoch) of the step it finished, or is empty if it finished none."""
        raise NotImplementedError

    def flush(self) -> dict[str, float]:
        """Finish a step left pending by :meth:`step` (what it returned then); ``{}`` if none."""
        return {}

    def beam(self, size: int) -> list[tuple[Arch, float]]:
        """The ``size`` most likely archs with their log-likelihoods, best first."""
        raise NotImplementedError

    def probabilities(self, arch: Arch) -> list[list[float]]:
        """Each decision's candidate probabilities along ``arch``."""
        raise NotImplementedError

    def policy_entropy(self, samples: int = 256) -> tuple[float, float]:
        """The policy's entropy (nats, summed over the decisions) and its uniform maximum."""
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        """Everything an exact resume needs, random streams included."""
        raise NotImplementedError

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
        raise NotImplementedError


def require_batch(kind: str, batch: Optional[Batch]) -> Batch:
    """``batch``, or a one-line error saying that this searcher needs the validation batch."""
    if batch is None:
        raise ValueError(f"the {kind} searcher differentiates a validation loss: step() needs the validation batch "
                         f"(step(score, batch=(images, labels)))")
    return batch
