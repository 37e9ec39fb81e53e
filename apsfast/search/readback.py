"""Values on their way from the device to the host, without waiting for them.

A search step reads nothing back: the host would wait for the device to finish everything
queued before it, and the step's host work (the next arch, the next launches) would stop
overlapping the device's. The few values the host needs every step (the controller's rewards,
Φ for the transition rate) are copied without waiting and read one step later, when the
copy is long done. On a GPU the copy goes into pinned memory behind an event, so reading it
waits only for that copy (``torch.cuda.set_sync_debug_mode("error")`` holds); on a CPU there
is nothing to wait for.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor


def to_host(values: Tensor) -> tuple[Tensor, Optional[torch.cuda.Event]]:
    """A host copy of ``values`` being made, and the event after which it is complete (``None``
    when it already is). The copy never aliases ``values``: the device may change them next."""
    values = values.detach()
    if values.device.type != "cuda":
        return values.to("cpu", copy=True), None
    host = torch.empty(values.shape, dtype=values.dtype, pin_memory=True)
    host.copy_(values, non_blocking=True)
    event = torch.cuda.Event()
    event.record()
    return host, event


class Readback:
    """``values`` (a device tensor) read later: :meth:`tolist` waits only for their copy."""

    def __init__(self, values: Tensor) -> None:
        self._host, self._event = to_host(values)

    def tolist(self) -> list:
        if self._event is not None:
            self._event.synchronize()
            self._event = None
        return self._host.tolist()
