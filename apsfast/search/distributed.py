"""Data parallelism for the search: one process per device, launched with ``torchrun``.

Every process holds the whole supernet and controller and follows the same random streams,
so all of them sample the same architectures and take the same controller steps; each one
computes its slice of every global batch. Weight gradients are averaged by
``DistributedDataParallel``, batch-norm statistics and the controller's rewards are summed
over the processes, so a run on N processes computes what one process computes on the same
global batch (up to the order of floating-point sums). Process 0 alone writes files.
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor

from apsfast.search.config import ConfigError

# torchrun's variables; a run without them is a single process.
_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


@dataclass(frozen=True)
class Processes:
    """Where this process stands: its rank among ``world`` processes and its device."""

    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")
    # A gloo group for values the hosts exchange (the arch of a step) where the main group is
    # NCCL: a broadcast there would go through the GPU's stream and wait for it.
    host_group: Optional[dist.ProcessGroup] = None

    @property
    def main(self) -> bool:
        """Whether this process writes the files (checkpoints, metrics, the result)."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1

    def local(self, tensor: Tensor) -> Tensor:
        """This process's rows of a global batch (``len`` divisible by ``world``)."""
        if not self.distributed:
            return tensor
        size = tensor.shape[0] // self.world
        return tensor[self.rank * size:(self.rank + 1) * size]

    def sum(self, values: list[float]) -> list[float]:
        """``values`` summed over the processes (float64, so counts stay exact)."""
        if not self.distributed:
            return values
        total = torch.tensor(values, dtype=torch.float64, device=self._collective_device)
        dist.all_reduce(total)
        return total.tolist()

    def sum_tensor(self, values: Tensor) -> Tensor:
        """``values`` summed over the processes, as a tensor on its device (nothing read back
        where the collective runs on that device)."""
        if not self.distributed:
            return values
        total = values.to(self._collective_device, torch.float64)
        dist.all_reduce(total)
        return total.to(values.device)

    def same(self, values: list[int]) -> list[int]:
        """Process 0's ``values`` on every process (a guard: all must run the same arch),
        host to host: the device is never waited for."""
        if not self.distributed:
            return values
        shared = torch.tensor(values, dtype=torch.int64)
        dist.broadcast(shared, 0, group=self.host_group)
        return shared.tolist()

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    @property
    def _collective_device(self) -> torch.device:
        # NCCL moves only CUDA tensors; gloo only CPU ones.
        return self.device if dist.get_backend() == "nccl" else torch.device("cpu")


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """``run.device``: ``auto`` is the GPU when there is one (this process's, under torchrun)."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(f"run.device is {name!r} but torch sees no CUDA device; use auto or cpu")
        if name == "cuda":
            name = f"cuda:{local_rank}"
    return torch.device(name)


def setup(device: str, backend: str = "auto", timeout_minutes: float = 30.0) -> Processes:
    """This process's place: a single process, or (under ``torchrun``) one of a process group,
    joined here (``backend``: ``auto`` = NCCL on GPUs, gloo on CPUs)."""
    if not all(key in os.environ for key in _ENV) or int(os.environ["WORLD_SIZE"]) == 1:
        return Processes(device=resolve_device(device))
    rank, world, local_rank = (int(os.environ[key]) for key in _ENV)
    where = resolve_device(device, local_rank)
    if where.type == "cuda":
        torch.cuda.set_device(where)
    if not dist.is_initialized():
        chosen = backend if backend != "auto" else ("nccl" if where.type == "cuda" else "gloo")
        dist.init_process_group(chosen, timeout=datetime.timedelta(minutes=timeout_minutes))
    host_group = None
    if dist.get_backend() != "gloo":  # every process creates it, in the same order
        host_group = dist.new_group(backend="gloo", timeout=datetime.timedelta(minutes=timeout_minutes))
    return Processes(rank=rank, world=world, device=where, host_group=host_group)


def teardown(processes: Optional[Processes]) -> None:
    """Leave the process group (after the last collective)."""
    if processes is not None and processes.distributed and dist.is_initialized():
        dist.destroy_process_group()
