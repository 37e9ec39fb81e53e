"""What every training run stands on, a search or a retrain: the process group and device, the
precision, the output folder with its checkpoints and exact resume, the metrics log, the
progress bar and the log lines.

A run's steps (:mod:`apsfast.search.steps`) know nothing of this: they take tensors and
modules. The schedules (:mod:`apsfast.search.schedule`, :mod:`apsfast.search.retrain`) order
the steps and hand their state to :meth:`Session.save`; a resume hands it back.
"""
from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Optional, Union

import torch
from torch import Tensor, nn

from apsfast import data as datasets
from apsfast.search import distributed
from apsfast.search.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from apsfast.search.config import RunConfig
from apsfast.search.metrics import MetricsLog

CHECKPOINT, PREVIOUS, METRICS, CONFIG = "checkpoint.pt", "checkpoint.prev.pt", "metrics.jsonl", "config.yaml"
AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


class Precision:
    """``run.amp`` and ``run.channels_last``: the autocast context of forward passes, the loss
    scaler (float16 only: its range needs one), and the memory format of the inputs."""

    def __init__(self, amp: str, channels_last: bool, device: torch.device) -> None:
        self.dtype = AMP_DTYPES.get(amp)
        self.device_type = device.type
        self.scaler = torch.amp.GradScaler(device.type, enabled=amp == "fp16")
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)

    def inputs(self, x: Tensor) -> Tensor:
        return x.contiguous(memory_format=self.memory_format)


def rng_state(generators: Mapping[str, torch.Generator], device: torch.device) -> dict[str, Tensor]:
    """The states of the global torch RNG (and the device's), and of ``generators``."""
    state = {"torch": torch.get_rng_state(), **{name: g.get_state() for name, g in generators.items()}}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def restore_rng(state: Mapping[str, Tensor], generators: Mapping[str, torch.Generator], device: torch.device) -> None:
    """Put back what :func:`rng_state` recorded."""
    torch.set_rng_state(state["torch"])
    for name, g in generators.items():
        g.set_state(state[name])
    if "cuda" in state and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)


class Session:
    """The machinery of one run writing into ``out``.

    Args:
        out: the run's folder. Process 0 creates it in :meth:`start` and writes every file.
        run: the ``run`` settings (device, precision, bookkeeping).
        expect: what a checkpoint of this run must carry (its kind, model…); a checkpoint
            of another run is refused naming the entry.
        log: where one-line messages go (default: print to stdout; silent on processes > 0).
    """

    def __init__(self, out: Union[str, Path], run: RunConfig, *, expect: Mapping[str, Any],
                 log: Optional[Callable[[str], None]] = None) -> None:
        self.out = Path(out)
        self.run = run
        self.expect = dict(expect)
        self.processes = distributed.setup(run.device, run.dist_backend)
        self.main = self.processes.main
        self.device = self.processes.device
        self.precision = Precision(run.amp, run.channels_last, self.device)
        self.log: Callable[[str], None] = (log or (lambda text: print(text, flush=True))) if self.main \
            else (lambda text: None)
        self.metrics: Optional[MetricsLog] = None
        self._parallel: Optional[tuple[tuple[int, ...], nn.Module]] = None

    # --- the folder, checkpoints and resume ------------------------------------------------

    @property
    def checkpoint(self) -> Path:
        return self.out / CHECKPOINT

    def start(self, config_text: str, *, tensorboard: bool = False) -> Optional[dict[str, Any]]:
        """Create the folder and open the metrics log; returns the checkpoint's state when the
        run resumes from one (the log is cut back to it), else ``None`` (a fresh run: the
        settings are written to ``config.yaml``)."""
        resuming = self.checkpoint.exists()
        # Every process has looked before process 0 writes anything (its first checkpoint
        # comes right after): a process that looked later would resume while the others start.
        self.processes.barrier()
        state = self.load() if resuming else None
        if self.main:
            self.out.mkdir(parents=True, exist_ok=True)
            self.metrics = MetricsLog(self.out / METRICS,
                                      tensorboard_dir=self.out / "tensorboard" if tensorboard else None)
            self.metrics.truncate(state["metrics_offset"] if state is not None else 0)
            if state is None:
                (self.out / CONFIG).write_text(config_text)
        return state

    def load(self) -> dict[str, Any]:
        """The newest checkpoint; a damaged one is refused naming the previous one if it is intact."""
        try:
            return load_checkpoint(self.checkpoint, expect=self.expect)
        except CheckpointError as error:
            previous = self.out / PREVIOUS
            if "not a readable" in str(error) and previous.is_file():
                try:
                    load_checkpoint(previous, expect=self.expect)
                except CheckpointError:
                    raise error from None
                raise CheckpointError(f"{error}; the previous checkpoint {str(previous)!r} is intact: move it to "
                                      f"{str(self.checkpoint)!r} and resume again") from None
            raise

    def save(self, state: Mapping[str, Any]) -> None:
        """Checkpoint ``state`` (with the metrics file's length) atomically, keeping the one
        before as ``checkpoint.prev.pt``; process 0 writes, every process waits for it."""
        if self.main:
            if self.checkpoint.exists():  # a hard link: checkpoint.pt itself is never missing
                link = self.out / f".{PREVIOUS}.tmp"
                link.unlink(missing_ok=True)
                os.link(self.checkpoint, link)
                os.replace(link, self.out / PREVIOUS)
            save_checkpoint(self.checkpoint, {**self.expect, **state, "metrics_offset": self.metrics.offset()})
        self.processes.barrier()

    def write(self, record: dict[str, Any]) -> None:
        """One metrics record (process 0)."""
        if self.metrics is not None:
            self.metrics.write(record)

    def close(self) -> None:
        if self.metrics is not None:
            self.metrics.close()
            self.metrics = None

    # --- data and model placement ------------------------------------------------------------

    def local(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """This process's slice of a global batch, on the device in the run's memory format."""
        x, y = self.processes.local(x), self.processes.local(y)
        x = x.to(self.device, non_blocking=True)
        return self.precision.inputs(x), y.to(self.device, non_blocking=True)

    def place(self, data: datasets.ImageSet) -> datasets.ImageSet:
        """``data`` where its batches are best made: an in-memory set moves onto a GPU once
        (CIFAR-10 is 150 MB of ``uint8``), so that it is cropped and normalised there with no
        copy from the host per step; any other set (a folder set has its loader processes),
        or any other device, keeps it where it is."""
        if self.device.type == "cuda" and isinstance(data, datasets.TensorImageSet):
            return data.to(self.device)
        return data

    def feed(self, batches: Iterable[datasets.base.Batch]) -> Iterator[datasets.base.Batch]:
        """``batches`` prepared ahead for a GPU (pinned by a background thread) when they are
        made on the CPU; as they come when they are made on the device, and elsewhere."""
        return datasets.prefetch(batches, self.device)

    def parallel(self, model: nn.Module) -> nn.Module:
        """``model`` as a training step runs it: wrapped for data parallelism when there are
        several processes (re-wrapped when its trainable parameters change, as ``learned``
        unfreezes P, Q after warm-up). Parameters a sampled arch leaves unused get no gradient
        on any process, so the optimizer skips them, as it does in a single process."""
        if not self.processes.distributed:
            return model
        trainable = tuple(i for i, p in enumerate(model.parameters()) if p.requires_grad)
        if self._parallel is None or self._parallel[0] != trainable:
            self._parallel = None  # the old wrapper's gradient hooks go with it
            ids = [self.device] if self.device.type == "cuda" else None
            self._parallel = (trainable, nn.parallel.DistributedDataParallel(
                model, device_ids=ids, find_unused_parameters=True, broadcast_buffers=False))
        return self._parallel[1]

    # --- what the user sees ------------------------------------------------------------------

    def progress(self, total: int, initial: int, desc: str):
        """A progress bar on stderr where it is a terminal (a log file gets the epoch lines only)."""
        from tqdm.auto import tqdm
        return tqdm(total=total, initial=initial, desc=desc, leave=False, file=sys.stderr,
                    disable=None if self.run.progress and self.main else True)

    def where(self) -> str:
        """The device (and processes) the run uses, for its first log line."""
        amp = "" if self.run.amp == "none" else f", {self.run.amp} autocast"
        if self.processes.distributed:
            return f"{self.processes.world} processes on {self.device.type}{amp}"
        return f"{self.device}{amp}"

    def teardown(self) -> None:
        """Close the log and leave the process group (after the last collective)."""
        self.close()
        distributed.teardown(self.processes)
