"""The steps of a search and of a retrain, as plain functions of their inputs.

A schedule orders them, a benchmark or a test calls one alone. None of them reads a value back
from the device: losses and counts come back as device tensors, which the schedule reads at its
log points (so a GPU never waits for the host inside a step).
"""
from __future__ import annotations

import contextlib
import math
from typing import Iterable, Iterator, NamedTuple, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from apsfast.models import Supernet
from apsfast.search.session import Precision
from apsfast.search.strategies import transform_parameters


class StepStats(NamedTuple):
    """What one training step saw on this process's slice: the summed loss and the number of
    correctly classified samples (0-d device tensors, float32 or wider) and the slice's size."""

    loss_sum: Tensor
    correct: Tensor
    count: int


def cosine(step: int, total: int) -> float:
    """The cosine schedule's factor of the learning rate after ``step`` of ``total`` steps."""
    return 0.5 * (1 + math.cos(math.pi * step / total))


def set_lr(optimizer: torch.optim.Optimizer, factor: float) -> None:
    """Every parameter group's learning rate at ``factor`` times its initial one."""
    for group in optimizer.param_groups:
        group["lr"] = group["initial_lr"] * factor


def fusable(groups: Sequence) -> bool:
    """Whether torch has a fused optimizer kernel for every parameter of ``groups`` (tensors or
    parameter groups): floating point, on a CPU or a CUDA device."""
    tensors = [p for g in groups for p in (g["params"] if isinstance(g, dict) else [g])]
    return all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in tensors)


def adam(params: Iterable, *, lr: float, betas: tuple[float, float], weight_decay: float = 0.0) -> torch.optim.Adam:
    """Adam over ``params``, fused where :func:`fusable`: one kernel for all of a controller's
    few dozen small tensors instead of a loop over them (1.39 → 0.26 ms a step on a CPU core
    for a 19-decision controller; the same update up to rounding)."""
    groups = list(params)
    return torch.optim.Adam(groups, lr=lr, betas=betas, weight_decay=weight_decay, fused=fusable(groups) or None)


def sgd(params: Iterable, *, lr: float, momentum: float, weight_decay: float,
        nesterov: bool = False) -> torch.optim.SGD:
    """SGD over ``params`` (tensors or parameter groups), fused where torch has a fused SGD for
    every parameter (floating point, on a CPU or a CUDA device): one kernel over all of them
    instead of a loop over tensors (half the time of the loop on the CPU for a supernet's
    meta-weights; the same update up to the rounding of a fused multiply-add)."""
    groups = list(params)
    fused = fusable(groups)
    optimizer = torch.optim.SGD(groups, lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=nesterov,
                                fused=fused or None)
    if fused and momentum:
        _zero_momentum(optimizer)
    return optimizer


def make_optimizer(net: nn.Module, strategy: str, *, lr: float, momentum: float, weight_decay: float,
                   nesterov: bool = False, transforms_lr: Optional[float] = None) -> torch.optim.SGD:
    """:func:`sgd` over a supernet's meta-weights; for ``learned`` over the transforms too, at
    their own rate (``transforms_lr``, default ``lr``) and without weight decay. The other
    strategies' transforms are fixed or moved by the transition, never by the optimizer."""
    transforms = transform_parameters(net)
    ids = set(map(id, transforms))
    groups = [{"params": [p for p in net.parameters() if id(p) not in ids]}]
    if strategy == "learned":
        groups.append({"params": transforms, "weight_decay": 0.0, "lr": transforms_lr or lr})
    for group in groups:
        group["initial_lr"] = group.get("lr", lr)
    return sgd(groups, lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=nesterov)


def _zero_momentum(optimizer: torch.optim.Optimizer) -> None:
    """A zero momentum buffer for every parameter. Torch's fused SGD takes a step only where
    every parameter with a gradient has a buffer or none has one, and in a supernet a parameter
    may see its first gradient (an arch that first uses it) long after the others. With no
    dampening, a zero buffer takes the same first step as a new one: ``0.9·0 + g = g``. (A
    state loaded from a checkpoint of the loop SGD brings its groups' ``fused=None`` with it,
    so such a run goes on with the loop, as it began.)"""
    for group in optimizer.param_groups:
        for p in group["params"]:
            state = optimizer.state[p]
            if state.get("momentum_buffer") is None:
                state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)


def train_mode(model: nn.Module) -> None:
    """``model`` in training mode, walked only when it is not: ``Module.train`` visits every
    submodule (0.6 ms a call on a CPU core for ResNet-20's 280-module supernet), which a loop
    whose steps leave the model training need not pay per step."""
    if not model.training:
        model.train()


def weight_step(model: nn.Module, optimizer: torch.optim.Optimizer, precision: Precision, x: Tensor, y: Tensor,
                *, grad_clip: Optional[float] = None, label_smoothing: float = 0.0,
                teacher: Optional[nn.Module] = None, distill: tuple[float, float] = (0.9, 4.0)) -> StepStats:
    """One SGD step of ``model`` on ``(x, y)``: forward (in the run's autocast), cross-entropy
    in float32, backward through the loss scaler, optional gradient clipping, the optimizer.

    With a ``teacher`` the loss is :func:`distillation_loss` against its logits (``distill``:
    α and T). The learning rate is whatever the optimizer holds (see :func:`set_lr`). A non-finite loss
    is not checked here (that would wait for the device): the schedule checks the sums it
    accumulates at its log points and before every checkpoint.
    """
    with precision.autocast():
        logits = model(x)
        if teacher is None:
            loss = F.cross_entropy(logits.float(), y, label_smoothing=label_smoothing)
        else:
            with torch.no_grad():
                target = teacher(x)
            loss = distillation_loss(logits, target, y, alpha=distill[0], temperature=distill[1],
                                     label_smoothing=label_smoothing)
    optimizer.zero_grad(set_to_none=True)
    precision.scaler.scale(loss).backward()
    if grad_clip is not None:
        precision.scaler.unscale_(optimizer)
        params = [p for group in optimizer.param_groups for p in group["params"]]
        nn.utils.clip_grad_norm_(params, grad_clip)
    precision.scaler.step(optimizer)
    precision.scaler.update()
    with torch.no_grad():
        correct = (logits.argmax(1) == y).sum().to(torch.float64)
        return StepStats(loss.detach().to(torch.float64) * len(y), correct, len(y))


def distillation_loss(student: Tensor, teacher: Tensor, labels: Tensor, *, alpha: float = 0.9,
                      temperature: float = 4.0, label_smoothing: float = 0.0) -> Tensor:
    """Knowledge distillation as TAS retrains (Hinton et al.):
    ``α·T²·KL(softmax(teacher/T) ‖ softmax(student/T)) + (1 − α)·CE(student, labels)``, in
    float32, the teacher's logits detached."""
    student, teacher = student.float(), teacher.detach().float()
    soft = F.kl_div(F.log_softmax(student / temperature, dim=1), F.log_softmax(teacher / temperature, dim=1),
                    reduction="batchmean", log_target=True)
    hard = F.cross_entropy(student, labels, label_smoothing=label_smoothing)
    return alpha * temperature ** 2 * soft + (1 - alpha) * hard


@contextlib.contextmanager
def batch_statistics(net: nn.Module) -> Iterator[None]:
    """Evaluate with each batch's own batch-norm statistics, leaving the running ones alone.

    A supernet's running statistics mix every arch it was trained on, so the reward of one
    arch is measured with that batch's statistics (as weight-sharing NAS does); nothing about
    the validation data leaks into the running statistics. Dropout is off. Every module's
    mode is restored on exit.
    """
    # A supernet's modules are listed once (walking 280 of them costs more than the flags).
    modules = net.module_list() if isinstance(net, Supernet) else list(net.modules())
    modes = [m.training for m in modules]
    norms = [m for m in modules if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    tracking = [norm.track_running_stats for norm in norms]
    # The flags are plain attributes, written in place: Module.train recurses and
    # Module.__setattr__ checks parameters, buffers and submodules on every write, which on
    # a supernet's 280 modules cost 1.8 ms a scored batch against 0.2 ms.
    for m in modules:
        m.__dict__["training"] = False
    for norm in norms:
        # Batch statistics are used and nothing is updated.
        norm.__dict__.update(training=True, track_running_stats=False)
    try:
        with torch.no_grad():
            yield
    finally:
        for norm, track in zip(norms, tracking):
            norm.__dict__["track_running_stats"] = track
        for m, mode in zip(modules, modes):
            m.__dict__["training"] = mode


def count_correct(net: nn.Module, archs: Sequence[Sequence[int]], x: Tensor, y: Tensor,
                  precision: Precision) -> Tensor:
    """How many samples of ``(x, y)`` each arch of ``archs`` classifies right (a device tensor
    ``[len(archs)]``), each with the batch's own normalisation statistics."""
    counts = []
    with batch_statistics(net), precision.autocast():
        for arch in archs:
            net.set_arch(arch)
            counts.append((net(x).argmax(1) == y).sum())
    return torch.stack(counts).to(torch.float64)


def evaluate(net: nn.Module, arch: Sequence[int], batches, precision: Precision) -> tuple[Tensor, int]:
    """Correct count (a device tensor) and the number of samples of ``arch`` over ``batches``
    (already on the device), with each batch's own normalisation statistics."""
    correct, seen = None, 0
    for x, y in batches:
        batch = count_correct(net, [arch], x, y, precision)[0]
        correct = batch if correct is None else correct + batch
        seen += len(y)
    return correct, seen
