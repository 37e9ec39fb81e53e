"""One step of an APS-T search as the schedule runs it, and the static network's, for the
benchmarks that time them (``apsfast bench search``, ``host``, ``profile``, ``weight-parts``):
a search of a :class:`Case` in its transitional phase (:func:`make_search`), the batches and
arch every provider shares (:func:`step_data`), and the providers: apsfast's step, the same
algorithm in plain PyTorch, the exported static network's weight step (the limit), and the
parts of apsfast's step alone (:func:`providers`).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional

import torch
from torch import Tensor, nn

from apsfast import reference
from apsfast.benchmarks.common import forced_backend
from apsfast.nn import aps_layers
from apsfast.search import Search, load_config, steps, strategies

PROVIDERS = ("apsfast", "plain", "limit")


@dataclass(frozen=True)
class Case:
    """One benchmarked configuration: a preset's search space at an input size, a global
    batch size and a multiplier of every candidate width."""

    model: str
    image_size: int
    batch: int
    width: float = 1.0

    @property
    def name(self) -> str:
        return f"{self.model}@{self.image_size} b{self.batch} w×{self.width:g}"


def scaled_widths(model: str, factor: float) -> list[int]:
    """The preset's first-stage candidates times ``factor`` (at least 1 channel each)."""
    base = {"resnet20_cifar": (16, 32, 64, 96), "mobilenetv2_imagenet": (8, 12, 16, 20)}[model]
    return sorted({max(1, round(w * factor)) for w in base})


def make_search(case: Case, device: str, amp: str, channels_last: bool, out: Path) -> Search:
    """A search in its APS-T phase on generated images of the case's size: controller running,
    transforms off their ordinal start (dense: the construction runs). A small learning rate
    keeps the weights finite over the many timed steps on one batch; it does not change the
    time of a step."""
    config = load_config(case.model, overrides=[
        "data.name=embedded", "data.root=null", f"data.image_size={case.image_size}",
        f"data.options={{num_train: {2 * case.batch}, num_test: 2, num_classes: 10}}",
        f"model.options.widths={scaled_widths(case.model, case.width)}", "model.options.num_classes=10",
        f"model.options.input_size={case.image_size}", f"train.batch_size={case.batch}", "train.lr=1e-4",
        "train.epochs=2", "train.warmup_epochs=1", f"run.device={device}", f"run.amp={amp}", f"run.channels_last={channels_last}",
        "run.progress=false"])
    search = Search(config, out, log=lambda text: None)
    strategies.begin_search(search.net, search.strategy)
    strategies.transition(search.net, search.rate.tau)  # leave the exact ordinal start
    return search


def plain_transition(net: nn.Module, tau: float) -> Tensor:
    """APS-T's transition step without apsfast: per layer, each side's score by autograd."""
    phi = 0.0
    for layer in aps_layers(net):
        if layer.P is not None or layer.Q is not None:
            layer.begin_transition()
            phi = phi + reference.transition_step_autograd(layer.P, layer.Q, tau, relative=True)
    return torch.as_tensor(phi)


def using(backend: Optional[str]) -> contextlib.AbstractContextManager:
    """``backend`` forced for apsfast's ops; ``None``: the dispatch's choice per op."""
    return forced_backend(backend) if backend else contextlib.nullcontext()


@contextlib.contextmanager
def cudnn_benchmark(device: str) -> Iterator[None]:
    """``torch.backends.cudnn.benchmark`` on for the block where ``device`` is a GPU (as a
    training run would set it), restored after."""
    before = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = before or torch.device(device).type == "cuda"
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = before


@dataclass(frozen=True)
class StepData:
    """What every provider of a case trains and scores on: one training batch and one
    validation batch, already on the device (in the run's memory format), and the arch."""

    x: Tensor
    y: Tensor
    val_x: Tensor
    val_y: Tensor
    arch: list[int]


def step_data(search: Search) -> StepData:
    """The first training and validation batches (seed 0) and a uniformly sampled arch (seed 0)."""
    train, session = search.config.train, search.session
    x, y = session.local(*next(search.w_train.batches(train.batch_size, seed=0, epoch=0, drop_last=True)))
    val_x, val_y = session.local(*next(search.val.batches(train.batch_size, seed=0, epoch=0, drop_last=True)))
    return StepData(x, y, val_x, val_y, search.net.sample_uniform(torch.Generator().manual_seed(0)))


def static_step(search: Search, data: StepData, compiled: bool = False) -> Callable[[], object]:
    """The limit's weight step: ``export(arch)`` on the device (channels_last as the run is) with
    its own SGD of the search's settings, under ``torch.compile`` with ``compiled`` (the model
    only: its forward and backward)."""
    train, session = search.config.train, search.session
    static = search.net.export(data.arch).to(session.device)
    if search.config.run.channels_last:
        static.to(memory_format=torch.channels_last)
    optimizer = steps.sgd(static.parameters(), lr=train.lr, momentum=train.momentum,
                          weight_decay=train.weight_decay, nesterov=train.nesterov)
    model = torch.compile(static) if compiled else static

    def step() -> None:
        steps.train_mode(model)
        steps.weight_step(model, optimizer, session.precision, data.x, data.y)
    return step


def compiled_static_step(search: Search, data: StepData) -> tuple[Optional[Callable[[], object]], Optional[str]]:
    """:func:`static_step` under ``torch.compile``, compiled here by one call (not timed); or
    ``None`` and why compilation failed (the error's first two lines: a compiler's names the
    stage, the second the cause)."""
    import torch._dynamo
    torch._dynamo.reset()  # each case's network is new: without a reset the recompile limit sends later ones to eager
    step = static_step(search, data, compiled=True)
    try:
        step()
        if search.session.device.type == "cuda":
            torch.cuda.synchronize(search.session.device)
    except Exception as error:  # noqa: BLE001 - any failure of the compiler is a result to record
        lines = [line.strip() for line in str(error).splitlines() if line.strip()]
        return None, f"{type(error).__name__}: {' / '.join(lines[:2])}"[:300]
    return step, None


def providers(search: Search, backend: Optional[str] = None, data: Optional[StepData] = None
              ) -> tuple[dict[str, Callable[[], object]], dict[str, Callable[[], object]]]:
    """The three step functions, and the parts of the apsfast step timed alone (apsfast's ops
    on ``backend``, see :func:`using`). Every provider trains the same arch on the same batch,
    already on the device (``data``; default :func:`step_data`)."""
    data = data or step_data(search)
    x, y, val_x, val_y, arch = data.x, data.y, data.val_x, data.val_y, data.arch
    precision, tau = search.session.precision, search.rate.tau
    limit_step = static_step(search, data)

    def weight_step(model: nn.Module, opt: torch.optim.Optimizer) -> None:
        steps.train_mode(model)
        steps.weight_step(model, opt, precision, x, y)

    def controller() -> None:  # as the schedule's search step: the accuracies stay on the device
        search.searcher.step(lambda archs: steps.count_correct(search.net, archs, val_x, val_y, precision) / len(val_y),
                             batch=(val_x, val_y))

    def apsfast_step() -> None:
        with using(backend):
            search.net.set_arch(arch)
            weight_step(search.net, search.optimizer)
            strategies.transition(search.net, tau)
            controller()

    def plain_step() -> None:
        with forced_backend("reference"):
            search.net.set_arch(arch)
            weight_step(search.net, search.optimizer)
            plain_transition(search.net, tau)
            controller()

    def weight_alone() -> None:
        with using(backend):
            search.net.set_arch(arch)
            weight_step(search.net, search.optimizer)

    def transition() -> None:
        with using(backend):
            strategies.transition(search.net, tau)

    def controller_alone() -> None:
        with using(backend):
            controller()

    parts = {"weight": weight_alone, "transition": transition, "controller": controller_alone}
    return {"apsfast": apsfast_step, "plain": plain_step, "limit": limit_step}, parts


def synchronised(fn: Callable[[], object], device: torch.device) -> Callable[[], object]:
    """``fn`` followed by a wait for the device, so a host timer sees its whole cost."""
    if device.type != "cuda":
        return fn

    def run() -> None:
        fn()
        torch.cuda.synchronize(device)
    return run
