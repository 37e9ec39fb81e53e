"""The search loop (paper Algorithm 1).

Warm-up epochs train the meta-weights on uniformly sampled archs with P, Q frozen. Then each
weight step trains the arch the controller samples, APS-T takes one transition step, and every
``controller.every`` weight steps the controller takes a REINFORCE step on a validation batch,
rewarded by the sampled archs' accuracy there, penalised by FLOPs. At the end a beam search
ranks the controller's most likely archs and the one closest to the FLOPs target (without
exceeding it) is written to ``result.json`` and exported.

Everything random comes from generators whose states are checkpointed with the weights, the
optimizers and the data position, so a run killed at any moment resumes from its last
checkpoint and continues as if it had not been stopped.

Launched with ``torchrun``, each process computes its slice of every global batch (see
:mod:`apsfast.search.distributed`); ``run.amp`` trains in bfloat16 or float16 autocast with
float32 master weights, ``run.channels_last`` in the channels-last memory format.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from apsfast import data as datasets
from apsfast import models
from apsfast.nn import sync_batch_norm
from apsfast.search import distributed, strategies
from apsfast.search.checkpoint import load_checkpoint, save_checkpoint
from apsfast.search.config import Config, ConfigError, dump_config
from apsfast.search.controller import Controller, Reinforce, flops_reward
from apsfast.search.metrics import MetricsLog, read_metrics

CHECKPOINT, METRICS, RESULT, MODEL = "checkpoint.pt", "metrics.jsonl", "result.json", "model.pt"
CURVES, DECISIONS, CONFIG = "curves.png", "decisions.png", "config.yaml"
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


@contextlib.contextmanager
def batch_statistics(net: nn.Module) -> Iterator[None]:
    """Evaluate with each batch's own batch-norm statistics, leaving the running ones alone.

    A supernet's running statistics mix every arch it was trained on, so the reward of one
    arch is measured with that batch's statistics (as weight-sharing NAS does); nothing about
    the validation data leaks into the running statistics. Dropout is off.
    """
    norms = [m for m in net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    was_training = net.training
    net.eval()
    for norm in norms:
        norm.train()
        norm.track_running_stats = False  # then batch statistics are used and nothing is updated
    try:
        with torch.no_grad():
            yield
    finally:
        for norm in norms:
            norm.track_running_stats = True
        net.train(was_training)


def select_arch(candidates: list[dict[str, Any]], target: Optional[float]) -> tuple[int, str]:
    """The candidate (index into the beam, best first) closest to ``target`` MACs without
    exceeding it, ties to the more likely; without a target the most likely. Returns the
    index and why it was chosen."""
    if target is None:
        return 0, "the most likely arch (no FLOPs target)"
    under = [i for i, c in enumerate(candidates) if c["flops"] <= target]
    if under:
        best = max(under, key=lambda i: (candidates[i]["flops"], candidates[i]["loglik"]))
        return best, f"the arch of the beam closest to the target {target:.4g} MACs without exceeding it"
    best = min(range(len(candidates)), key=lambda i: (candidates[i]["flops"], -candidates[i]["loglik"]))
    return best, (f"no arch of the beam is within the target {target:.4g} MACs: the cheapest "
                  f"(raise result.beam or the reward's beta)")


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2))
    os.replace(tmp, path)


@dataclass
class _Epoch:
    """Running sums of one epoch (checkpointed: a resumed epoch reports what a whole one would)."""

    loss: float = 0.0
    correct: float = 0.0
    seen: int = 0
    reward: float = 0.0
    entropy: float = 0.0
    controller_steps: int = 0
    started: float = field(default_factory=time.perf_counter)

    def state(self) -> dict[str, float]:
        return {k: getattr(self, k) for k in ("loss", "correct", "seen", "reward", "entropy", "controller_steps")}


class Search:
    """One search run writing into ``out_dir``.

    Args:
        config: a validated :class:`Config`.
        out_dir: where checkpoints, metrics, the result and plots go (created).
        resume: continue from ``out_dir/checkpoint.pt`` (started afresh if there is none yet:
            the run was stopped before its first checkpoint). Without it a folder that holds
            a checkpoint is refused, so no run is overwritten by accident.
        log: where one-line messages go (default: print to stdout).
    """

    def __init__(self, config: Config, out_dir: Union[str, Path], *, resume: bool = False,
                 log: Optional[Callable[[str], None]] = None) -> None:
        self.config = config
        self.out = Path(out_dir)
        run, train = config.run, config.train
        self.processes = distributed.setup(run.device, run.dist_backend)
        self.main = self.processes.main
        self.log = (log or (lambda text: print(text, flush=True))) if self.main else (lambda text: None)
        checkpoint = self.out / CHECKPOINT
        if checkpoint.exists() and not resume:
            raise FileExistsError(f"{str(self.out)!r} already holds a search (checkpoint.pt): pass --resume to "
                                  f"continue it, or another output folder")
        if train.batch_size % self.processes.world:
            raise ConfigError(f"train.batch_size = {train.batch_size} must be divisible by the number of processes "
                              f"({self.processes.world}): each computes an equal slice of every batch")
        if self.main:
            self.out.mkdir(parents=True, exist_ok=True)
        self.device = self.processes.device
        self.precision = Precision(run.amp, run.channels_last, self.device)
        self.strategy = config.sharing.strategy

        train_set, _ = load_data(config)
        self.w_train, self.val = datasets.split(train_set, 1 - config.data.val_fraction, seed=run.seed)
        self.num_classes, self.image_size = train_set.num_classes, train_set.image_size

        torch.manual_seed(run.seed)  # the supernet's and the controller's initialisation
        self.net = build_supernet(config, self.num_classes, self.image_size, self.device)
        if run.channels_last:
            self.net.to(memory_format=torch.channels_last)
        if self.processes.distributed:
            sync_batch_norm(self.net)
        self._parallel: Optional[tuple[tuple[int, ...], nn.Module]] = None
        # APS-T's step (strategies.transition); the benchmarks swap in the plain-PyTorch one.
        self.transition: Callable[[nn.Module, float], Tensor] = strategies.transition
        self.decisions = self.net.decisions()
        target = config.reward.flops_target
        if target is not None and target < self.net.flops(self.net.min_arch()):
            raise ConfigError(f"reward.flops_target = {target:.4g} MACs is below the smallest arch of "
                              f"{self.net.name} ({self.net.flops(self.net.min_arch()):.4g} MACs): no arch can meet it")
        transforms = set(map(id, strategies.transform_parameters(self.net)))
        groups = [{"params": [p for p in self.net.parameters() if id(p) not in transforms]}]
        if self.strategy == "learned":
            groups.append({"params": strategies.transform_parameters(self.net), "weight_decay": 0.0,
                           "lr": config.sharing.transforms_lr or train.lr})
        for group in groups:
            group["initial_lr"] = group.get("lr", train.lr)
        self.optimizer = torch.optim.SGD(groups, lr=train.lr, momentum=train.momentum,
                                         weight_decay=train.weight_decay, nesterov=train.nesterov)
        ctl = config.controller
        # The controller stays on the CPU whatever the run's device: sampling is one tiny LSTM step
        # per decision whose choice the host needs before the next, so on a GPU every decision
        # would cost a round trip (measured: 8.5 of a 62 ms ResNet-20 step on an H200).
        self.controller = Controller(self.decisions, ctl.hidden_size)
        self.reinforce = Reinforce(self.controller, lr=ctl.lr, betas=tuple(ctl.betas),
                                   baseline_decay=ctl.baseline_decay, entropy_weight=ctl.entropy_weight)
        self.arch_generator = torch.Generator().manual_seed(run.seed + 1)
        self.controller_generator = torch.Generator().manual_seed(run.seed + 2)

        batches = self.w_train.num_batches(train.batch_size, drop_last=True)
        if batches == 0 or self.val.num_batches(train.batch_size, drop_last=True) == 0:
            raise ConfigError(f"train.batch_size = {train.batch_size} exceeds a half of the train split "
                              f"({len(self.w_train)} / {len(self.val)} images)")
        self.steps_per_epoch = min(batches, train.steps_per_epoch or batches)
        self.total_steps = self.steps_per_epoch * train.epochs
        # Position: the next epoch and batch to run, weight steps done, and the validation stream's.
        self.epoch = self.batch = self.step = self.val_epoch = self.val_batch = 0
        self.sums = _Epoch()
        self.done = False
        self.metrics = MetricsLog(self.out / METRICS, tensorboard_dir=self.out / "tensorboard") if self.main else None
        if checkpoint.exists():
            self._restore(checkpoint)
        elif self.main:
            self.metrics.truncate(0)
            (self.out / CONFIG).write_text(dump_config(config))
        self._val_stream = self._validation_batches()

    # --- state --------------------------------------------------------------------------

    def _expect(self) -> dict[str, Any]:
        return {"kind": "search", "model": self.net.name, "config": self.config.digest()}

    def _state(self) -> dict[str, Any]:
        rng = {"torch": torch.get_rng_state(), "arch": self.arch_generator.get_state(),
               "controller": self.controller_generator.get_state()}
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        return {**self._expect(), "config_dict": self.config.to_dict(),
                "position": {"epoch": self.epoch, "batch": self.batch, "step": self.step,
                             "val_epoch": self.val_epoch, "val_batch": self.val_batch, "done": self.done},
                "epoch_sums": self.sums.state(), "supernet": self.net.state_dict(),
                "optimizer": self.optimizer.state_dict(), "reinforce": self.reinforce.state_dict(),
                "scaler": self.precision.scaler.state_dict(), "rng": rng, "metrics_offset": self.metrics.offset()}

    def save(self) -> None:
        """Checkpoint now (atomically; process 0 writes, every process waits for it)."""
        if self.main:
            save_checkpoint(self.out / CHECKPOINT, self._state())
        self.processes.barrier()

    def _restore(self, path: Path) -> None:
        state = load_checkpoint(path, expect=self._expect())
        if self.epoch_phase(state["position"]["epoch"]) == "search":
            strategies.begin_search(self.net, self.strategy)  # so the optimizer state matches
        self.net.load_state_dict(state["supernet"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.reinforce.load_state_dict(state["reinforce"])
        self.precision.scaler.load_state_dict(state["scaler"])
        torch.set_rng_state(state["rng"]["torch"])
        self.arch_generator.set_state(state["rng"]["arch"])
        self.controller_generator.set_state(state["rng"]["controller"])
        if "cuda" in state["rng"] and self.device.type == "cuda":
            torch.cuda.set_rng_state(state["rng"]["cuda"], self.device)
        for key, value in state["position"].items():
            setattr(self, key, value)
        for key, value in state["epoch_sums"].items():
            setattr(self.sums, key, value)
        if self.main:
            self.metrics.truncate(state["metrics_offset"])
        self.log(f"resumed from {path} at epoch {self.epoch + 1}, step {self.step}")

    # --- the schedule -------------------------------------------------------------------

    def epoch_phase(self, epoch: int) -> str:
        return "warmup" if epoch < self.config.train.warmup_epochs else "search"

    def _lr_factor(self) -> float:
        """Cosine decay over every weight step of the search."""
        return 0.5 * (1 + math.cos(math.pi * self.step / self.total_steps))

    def _validation_batches(self) -> Iterator[tuple[Tensor, Tensor]]:
        """The controller's validation batches, epoch after epoch, from the saved position."""
        size = self.config.train.batch_size
        while True:
            for x, y in self.val.batches(size, seed=self.config.run.seed + 1, epoch=self.val_epoch, shuffle=True,
                                         drop_last=True, start=self.val_batch):
                self.val_batch += 1
                yield x, y
            self.val_epoch, self.val_batch = self.val_epoch + 1, 0

    def _local(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """This process's slice of a global batch, on the device in the run's memory format."""
        x, y = self.processes.local(x), self.processes.local(y)
        x = x.to(self.device, non_blocking=True)
        return self.precision.inputs(x), y.to(self.device, non_blocking=True)

    def _model(self) -> nn.Module:
        """The supernet as the weight step runs it: wrapped for data parallelism when there are
        several processes (re-wrapped when the trainable parameters change, as ``learned``
        unfreezes P, Q after warm-up). Parameters a sampled arch leaves unused get no gradient
        on any process, so the optimizer skips them, as it does in a single process."""
        if not self.processes.distributed:
            return self.net
        trainable = tuple(i for i, p in enumerate(self.net.parameters()) if p.requires_grad)
        if self._parallel is None or self._parallel[0] != trainable:
            self._parallel = None  # the old wrapper's gradient hooks go with it
            ids = [self.device] if self.device.type == "cuda" else None
            self._parallel = (trainable, nn.parallel.DistributedDataParallel(
                self.net, device_ids=ids, find_unused_parameters=True, broadcast_buffers=False))
        return self._parallel[1]

    # --- the steps ----------------------------------------------------------------------

    def _sample_train_arch(self, phase: str) -> list[int]:
        if phase == "warmup":
            return self.net.sample_uniform(self.arch_generator)
        with torch.no_grad():
            return self.controller.sample(1, self.controller_generator).archs[0].tolist()

    def weight_step(self, x: Tensor, y: Tensor, phase: str) -> dict[str, float]:
        """Train the meta-weights on one global batch for a sampled arch; then APS-T's transition."""
        train, precision = self.config.train, self.precision
        self.net.train()
        self.net.set_arch(self.processes.same(self._sample_train_arch(phase)))
        model = self._model()
        x, y = self._local(x, y)
        with precision.autocast():
            logits = model(x)
            loss = F.cross_entropy(logits.float(), y)
        loss_sum, correct = self.processes.sum([float(loss.detach()) * len(y), float((logits.argmax(1) == y).sum())])
        seen = len(y) * self.processes.world
        if not math.isfinite(loss_sum):
            raise FloatingPointError(
                f"the training loss is {loss_sum / seen} at epoch {self.epoch + 1}, step {self.step + 1} "
                f"(arch {self.net.arch}); the last good checkpoint is {self.out / CHECKPOINT}. Lower train.lr "
                f"or set train.grad_clip, then resume with --resume")
        self.optimizer.zero_grad(set_to_none=True)
        precision.scaler.scale(loss).backward()
        if train.grad_clip is not None:
            precision.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_(self.net.parameters(), train.grad_clip)
        factor = self._lr_factor()
        for group in self.optimizer.param_groups:
            group["lr"] = group["initial_lr"] * factor
        precision.scaler.step(self.optimizer)
        precision.scaler.update()
        phi = strategies.after_weight_step(self.net, self.strategy, self.config.sharing.tau, phase == "search",
                                           self.transition)
        out = {"loss": loss_sum / seen, "acc": correct / seen, "lr": train.lr * factor}
        if phi is not None:
            out["phi"] = float(phi)
        self.sums.loss += loss_sum
        self.sums.correct += correct
        self.sums.seen += seen
        return out

    def correct(self, arch: list[int], x: Tensor, y: Tensor) -> float:
        """How many samples of this process's slice of a global batch ``arch`` classifies right,
        with the batch's normalisation statistics (summed over the processes by the caller)."""
        with batch_statistics(self.net), self.precision.autocast():
            self.net.set_arch(arch)
            return float((self.net(x).argmax(1) == y).sum())

    def controller_step(self) -> dict[str, float]:
        """One REINFORCE step: sample archs, reward each by its validation accuracy and FLOPs."""
        x, y = self._local(*next(self._val_stream))
        reward_cfg = self.config.reward
        rollout = self.controller.sample(self.config.controller.samples, self.controller_generator)
        archs = rollout.archs.tolist()
        size = len(y) * self.processes.world
        accuracies = [c / size for c in self.processes.sum([self.correct(arch, x, y) for arch in archs])]
        rewards = [flops_reward(acc, self.net.flops(arch), reward_cfg.flops_target, reward_cfg.alpha, reward_cfg.beta)
                   for acc, arch in zip(accuracies, archs)]
        out = self.reinforce.step(rollout, rewards)
        self.sums.reward += out["reward"]
        self.sums.entropy += out["entropy"]
        self.sums.controller_steps += 1
        return out

    def most_likely(self) -> tuple[list[int], list[list[float]]]:
        """The controller's most likely arch and the candidate probabilities along it."""
        arch = self.controller.beam_search(1)[0][0]
        with torch.no_grad():
            probs = self.controller.evaluate([arch]).probs
        return arch, [p[0].tolist() for p in probs]

    def evaluate(self, arch: list[int]) -> float:
        """Accuracy of ``arch`` on the first ``run.eval_batches`` validation batches."""
        correct = seen = 0.0
        size = self.config.train.batch_size
        for x, y in islice(self.val.batches(size, seed=0, epoch=0, shuffle=False, drop_last=True),
                           self.config.run.eval_batches):
            correct += self.correct(arch, *self._local(x, y))
            seen += len(y)
        return self.processes.sum([correct])[0] / seen

    # --- the run ------------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        """Run (or continue) the search to its end; returns the result (also in ``result.json``)."""
        try:
            return self._run()
        finally:
            if self.metrics is not None:
                self.metrics.close()

    def _run(self) -> dict[str, Any]:
        config, train = self.config, self.config.train
        if self.done:
            self.log(f"the search in {self.out} is complete")
            return json.loads((self.out / RESULT).read_text()) if (self.out / RESULT).exists() else self.finish()
        world = f"{self.processes.world} processes on {self.device.type}" if self.processes.distributed \
            else str(self.device)
        amp = "" if config.run.amp == "none" else f", {config.run.amp} autocast"
        self.log(f"searching {self.net.name} ({len(self.decisions)} decisions) with {self.strategy} sharing on "
                 f"{config.data.name} ({len(self.w_train)} images for the weights, {len(self.val)} for the "
                 f"controller), {train.epochs} epochs ({train.warmup_epochs} warm-up) of {self.steps_per_epoch} "
                 f"steps, on {world}{amp}; output in {self.out}")
        from tqdm.auto import tqdm
        while self.epoch < train.epochs:
            phase = self.epoch_phase(self.epoch)
            if phase == "search":
                strategies.begin_search(self.net, self.strategy)
            batches = self.w_train.batches(train.batch_size, seed=config.run.seed, epoch=self.epoch, shuffle=True,
                                           augment=True, drop_last=True, start=self.batch)
            # disable=None: no bar where stderr is not a terminal (a log file gets the epoch lines only).
            bar = tqdm(total=self.steps_per_epoch, initial=self.batch,
                       disable=None if config.run.progress and self.main else True,
                       desc=f"epoch {self.epoch + 1}/{train.epochs} {phase}", leave=False, file=sys.stderr)
            record: dict[str, float] = {}
            for x, y in datasets.prefetch(islice(batches, self.steps_per_epoch - self.batch), self.device):
                record = self.weight_step(x, y, phase)
                if phase == "search" and self.step % config.controller.every == 0:
                    record.update({f"controller_{k}": v for k, v in self.controller_step().items()})
                self.batch += 1
                self.step += 1
                bar.update(1)
                bar.set_postfix({k: f"{record[k]:.4g}" for k in ("loss", "acc", "phi", "controller_reward",
                                                                   "controller_entropy") if k in record})
                if self.step % config.run.log_every == 0 and self.main:
                    if "phi" not in record:
                        record["phi"] = strategies.sharing_level(self.net)
                    self.metrics.write({"kind": "step", "step": self.step, "epoch": self.epoch, "phase": phase,
                                        **record})
                if self.step % config.run.checkpoint_every == 0 and self.batch < self.steps_per_epoch:
                    self.save()
            bar.close()
            self._end_epoch(phase)
        return self.finish()

    def _end_epoch(self, phase: str) -> None:
        arch, probs = self.most_likely()
        sums = self.sums
        record = {"kind": "epoch", "epoch": self.epoch, "step": self.step, "phase": phase,
                  "train_loss": sums.loss / max(sums.seen, 1), "train_acc": sums.correct / max(sums.seen, 1),
                  "val_acc": self.evaluate(arch), "phi": strategies.sharing_level(self.net),
                  "reward": sums.reward / sums.controller_steps if sums.controller_steps else None,
                  "entropy": sums.entropy / sums.controller_steps if sums.controller_steps else None,
                  "arch": arch, "flops": self.net.flops(arch), "probs": probs,
                  "seconds": time.perf_counter() - sums.started}
        if self.main:
            self.metrics.write(record)
        extra = "" if record["reward"] is None else \
            f"  reward {record['reward']:.4f}  entropy {record['entropy']:.3f}"
        self.log(f"epoch {self.epoch + 1}/{self.config.train.epochs} {phase:<6}  loss {record['train_loss']:.4f}  "
                 f"train acc {record['train_acc']:.2%}  val acc (most likely) {record['val_acc']:.2%}  "
                 f"Φ {record['phi']:.4g}{extra}  ({record['seconds']:.1f} s)")
        self.epoch, self.batch, self.sums = self.epoch + 1, 0, _Epoch()
        self.save()

    def finish(self) -> dict[str, Any]:
        """Beam search, choice of the arch, ``result.json``, the exported model and the plots."""
        config = self.config
        target = config.reward.flops_target
        candidates = []
        for arch, loglik in self.controller.beam_search(config.result.beam):
            candidates.append({"arch": arch, "widths": self.net.widths(arch), "loglik": loglik,
                               "probability": math.exp(loglik), "flops": self.net.flops(arch),
                               "params": self.net.params(arch)})
        index, why = select_arch(candidates, target)
        chosen = candidates[index]
        with torch.no_grad():
            probs = [p[0].tolist() for p in self.controller.evaluate([chosen["arch"]]).probs]
        decisions = [{"name": d.name, "widths": list(d.widths), "chosen": d.widths[a], "probs": p}
                     for d, a, p in zip(self.decisions, chosen["arch"], probs)]
        result = {"model": self.net.name, "options": self.net.options, "strategy": self.strategy,
                  "data": config.data.name, "num_classes": self.num_classes, "input_size": self.image_size,
                  "flops_target": target, "chosen": {**chosen, "rank": index, "why": why},
                  "candidates": candidates, "decisions": decisions, "phi": strategies.sharing_level(self.net),
                  "max_flops": self.net.flops(self.net.max_arch()), "config": config.to_dict()}
        if self.main:
            export = self.net.export(chosen["arch"], inherit_weights=True)
            save_checkpoint(self.out / MODEL, {"kind": "exported", "model": self.net.name,
                                               "options": self.net.options, "arch": chosen["arch"],
                                               "state_dict": export.state_dict()})
            _write_json(self.out / RESULT, result)
            self._plot(decisions)
        self.done = True
        self.save()
        widths = ", ".join(f"{d['name']}={d['chosen']}" for d in decisions)
        self.log(f"chosen ({why}): {chosen['flops'] / 1e6:.2f}M MACs, {chosen['params']:,} params, "
                 f"probability {chosen['probability']:.3g}; widths {widths}")
        self.log(f"result: {self.out / RESULT}; model: {self.out / MODEL}; plots: {self.out / CURVES}, "
                 f"{self.out / DECISIONS}")
        return result

    def _plot(self, decisions: list[dict[str, Any]]) -> None:
        from apsfast.search.plots import plot_curves, plot_decisions
        epochs = read_metrics(self.out / METRICS, kind="epoch")
        title = f"{self.net.name}, {self.strategy} sharing"
        plot_curves(epochs, self.out / CURVES, title=title)
        plot_decisions(epochs, decisions, self.out / DECISIONS, title=title)


def load_data(config: Config) -> tuple[datasets.ImageSet, datasets.ImageSet]:
    """The ``(train, test)`` sets of ``config.data``; a wrong setting is a :class:`ConfigError`."""
    data = config.data
    options = dict(data.options)
    if data.workers is not None:
        options["num_workers"] = data.workers
    try:
        # The embedded set's own seed (data.options.seed, default 0) is not the run's: searches
        # with different seeds must see the same data.
        return datasets.load(data.name, data.root, image_size=data.image_size, **options)
    except (TypeError, ValueError) as error:
        raise ConfigError(f"data: {error}") from None
    except (FileNotFoundError, NotADirectoryError) as error:
        raise ConfigError(f"data.root: {error}") from None


def build_supernet(config: Config, num_classes: int, image_size: int, device: Union[str, torch.device],
                   dtype: Optional[torch.dtype] = None) -> models.Supernet:
    """The supernet of ``config.model`` for the strategy, sized for the data."""
    options = dict(config.model.options)
    for key, value in (("num_classes", num_classes), ("input_size", image_size)):
        if options.setdefault(key, value) != value:
            raise ConfigError(f"model.options.{key} = {options[key]!r} but the data {config.data.name!r} "
                              f"has {value}; drop the option or fix the data")
    return models.build(config.model.name, sharing=strategies.supernet_sharing(config.sharing.strategy),
                        device=device, dtype=dtype, **options)


def load_exported(path: Union[str, Path], device: Union[str, torch.device] = "cpu") -> nn.Sequential:
    """The static model a search exported (``model.pt``), with its weights."""
    state = load_checkpoint(path, expect={"kind": "exported"})
    net = models.build(state["model"], device="meta", **state["options"])
    static = net.export(state["arch"]).to_empty(device=device)
    static.load_state_dict(state["state_dict"])
    return static


def search(config: Config, out_dir: Union[str, Path], *, resume: bool = False) -> dict[str, Any]:
    """Run a search to its end (see :class:`Search`); returns the result. Under ``torchrun``
    every process calls it; the process group is left at the end."""
    runner = Search(config, out_dir, resume=resume)
    try:
        return runner.run()
    finally:
        distributed.teardown(runner.processes)
