"""Keeping an accelerator fed: batches prepared and pinned ahead of the step that needs them."""
from __future__ import annotations

import itertools
import queue
import threading
from typing import Iterable, Iterator

import torch

from apsfast.data.base import Batch

_DONE = object()


def prefetch(batches: Iterable[Batch], device: torch.device, depth: int = 2) -> Iterator[Batch]:
    """Yield ``batches`` as they are, while for CPU batches bound for a CUDA ``device`` a
    background thread already produces the next ``depth`` ones (augmentation and
    normalisation are torch ops, which release the interpreter) into pinned memory, so the
    copy to the GPU can be asynchronous and overlap the step.

    Batches already on a device (a set placed there with
    :meth:`~apsfast.data.TensorImageSet.to`) are yielded as they come: there is nothing to
    copy, and the device queues their preparation behind the step. So are the batches for any
    other device: there a second thread would compete with the step for the same cores. The
    order of the batches never changes, so a run is the same with and without prefetching.
    """
    batches = iter(batches)
    first = next(batches, None)
    if first is None:
        return
    batches = itertools.chain([first], batches)
    if device.type == "cuda" and first[0].device.type == "cpu":
        yield from read_ahead(batches, depth, pin=True)
    else:
        yield from batches


def read_ahead(batches: Iterable[Batch], depth: int, *, pin: bool) -> Iterator[Batch]:
    """``batches`` in order, produced up to ``depth`` ahead by a background thread (pinned
    with ``pin``). An error in the producer is raised here; closing this iterator early (a
    consumer that stops) stops and joins the thread."""
    ready: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def hand_over(item: object) -> bool:
        while not stop.is_set():
            try:
                ready.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for x, y in batches:
                if not hand_over((x.pin_memory(), y.pin_memory()) if pin else (x, y)):
                    return
            hand_over(_DONE)
        except BaseException as error:  # handed to the consumer, raised there
            hand_over(error)

    worker = threading.Thread(target=produce, name="apsfast-prefetch", daemon=True)
    worker.start()
    try:
        while True:
            item = ready.get()
            if item is _DONE:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        worker.join()
