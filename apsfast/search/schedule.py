"""The search schedule (paper Algorithm 1), built on a :class:`~apsfast.search.session.Session`
and the steps of :mod:`apsfast.search.steps`.

Warm-up epochs train the meta-weights on uniformly sampled archs with P, Q frozen. Then each
weight step trains the arch the searcher samples, APS-T takes one transition step, and every
``controller.every`` weight steps the searcher takes a search step on a validation batch. At
the end the searcher's beam is ranked and its choice (by ``result.select``: the most likely
arch within the target, or the closest to it; for TAS and ISTA their argmax) is written to ``result.json`` and
exported (:mod:`apsfast.search.result`).

Everything random comes from generators whose states are checkpointed with the weights, the
optimizers and the data position, so a run killed at any moment resumes from its last
checkpoint and continues as if it had not been stopped. Losses and accuracies stay on the
device between log points; a non-finite loss is caught at the next one, before any checkpoint.
"""
from __future__ import annotations

import contextlib
import json
import time
from itertools import islice
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Union

import torch
from torch import Tensor

from apsfast import data as datasets
from apsfast import models
from apsfast.nn import sync_batch_norm
from apsfast.search import assemble, result as results, runs, steps, strategies
from apsfast.search.budget import search_budget
from apsfast.search.config import Config, ConfigError, dump_config
from apsfast.search.searchers import Searcher, build_searcher
from apsfast.search.session import Session, restore_rng, rng_state


class Search:
    """One search run writing into ``out_dir``.

    Args:
        config: a validated :class:`Config`.
        out_dir: where checkpoints, metrics, the result and plots go (created once every
            setting has been checked against the data and the model).
        resume: continue the run in ``out_dir`` from its checkpoint (see
            :mod:`apsfast.search.runs` for what may change on a resume). Without it a folder
            that holds a run is refused, so no run is overwritten by accident.
        log: where one-line messages go (default: print to stdout).
        model: a supernet to search instead of building ``config.model`` (e.g. from
            :func:`apsfast.convert`), trained in place and moved to the run's device; the run's
            ``config.model`` then describes it (:func:`~apsfast.search.assemble.adopt`). A
            supernet converted in Python cannot be rebuilt from the run's folder: resume such a
            run, and retrain its arch, by passing the same supernet again (``model=``). It starts
            from the weights it has: ``run.seed`` seeds what the run draws, not what was built
            before it, so seed the model's construction (``torch.manual_seed``) to repeat a run.
        train_data: data of your own to search on instead of loading ``config.data``: a
            map-style ``torch.utils.data.Dataset`` of ``(input [C, H, W], label)`` pairs after
            its own transform, or an :class:`~apsfast.data.DatasetImageSet` (custom sampling and
            collation); split into weight-training and validation parts by
            ``data.val_fraction``. The run's ``config.data`` then describes it
            (:func:`~apsfast.search.assemble.adopt_data`): pass it again to resume the run.
        val_data: the held-out set of the same classes and input shape (the retrain scores on
            it; the search only checks that it agrees with ``train_data``).
    """

    def __init__(self, config: Config, out_dir: Union[str, Path], *, resume: bool = False,
                 log: Optional[Callable[[str], None]] = None, model: Optional[models.Supernet] = None,
                 train_data: Any = None, val_data: Any = None) -> None:
        if model is not None:
            config = assemble.adopt(config, model)
        config, data = assemble.given_data(config, train_data, val_data)
        self.config = config
        run, train = config.run, config.train
        plan = assemble.check(config, model=model, data=data)
        note = runs.resume_state(out_dir, resume)
        self.session = session = Session(out_dir, run, expect={"kind": "search", "model": config.model.name}, log=log)
        self.out, self.log, self.processes = session.out, session.log, session.processes
        if train.batch_size % self.processes.world:
            raise ConfigError(f"train.batch_size = {train.batch_size} must be divisible by the number of processes "
                              f"({self.processes.world}): each computes an equal slice of every batch")
        self.w_train, self.val = datasets.split(plan.train, 1 - config.data.val_fraction, seed=run.seed)
        self.num_classes, self.image_size = plan.num_classes, plan.image_size
        # Per-epoch accuracy: the same class-balanced images every epoch, and after a resume.
        count = run.eval_batches * train.batch_size
        self.eval_set = datasets.balanced_subset(self.val, max(count // train.batch_size, 1) * train.batch_size,
                                                 seed=run.seed)
        # Once, on a GPU: an in-memory set's batches are then made there (Session.place).
        self.w_train, self.val, self.eval_set = (session.place(part)
                                                 for part in (self.w_train, self.val, self.eval_set))

        torch.manual_seed(run.seed)  # the supernet's and the searcher's initialisation
        self.net = model.to(session.device) if model is not None else \
            assemble.build_supernet(config, plan.options, session.device)
        if run.channels_last:
            self.net.to(memory_format=torch.channels_last)
        if self.processes.distributed:
            sync_batch_norm(self.net)
        self.strategy = config.sharing.strategy
        self.decisions = self.net.decisions()
        self.optimizer = steps.make_optimizer(self.net, self.strategy, lr=train.lr, momentum=train.momentum,
                                              weight_decay=train.weight_decay, nesterov=train.nesterov,
                                              transforms_lr=config.sharing.transforms_lr)
        batches = self.w_train.num_batches(train.batch_size, drop_last=True)
        self.steps_per_epoch = min(batches, train.steps_per_epoch or batches)
        self.total_steps = self.steps_per_epoch * train.epochs
        self.search_steps = self.steps_per_epoch * (train.epochs - train.warmup_epochs)
        # MACs, or (reward.latency_target) the latency table measured here, on the device.
        self.budget = search_budget(config, self.net, session)
        self.searcher: Searcher = build_searcher(self.decisions, config, self.net.flops, net=self.net,
                                                 search_steps=self.search_steps, budget=self.budget)
        self.arch_generator = torch.Generator().manual_seed(run.seed + 1)
        self.transition_seed = run.seed + 2  # APS-T's start noise (strategies.begin_search)
        sharing = config.sharing
        self.rate = strategies.TransitionRate(sharing.tau, self.search_steps, fall=sharing.transition_fall,
                                              every=sharing.transition_every, end=sharing.transition_end)
        # Position: the next epoch and batch to run, weight steps done, and the validation stream's.
        self.epoch = self.batch = self.step = self.val_epoch = self.val_batch = 0
        self.done = False
        self._reset_sums()
        state = session.start(dump_config(config), tensorboard=True)
        if note:
            self.log(note)
        if state is not None:
            self._restore(state)
        else:
            self.save()  # a run always has a checkpoint to come back to
        self._val_stream = self._validation_batches()

    # --- state --------------------------------------------------------------------------

    def _reset_sums(self) -> None:
        zero = torch.zeros((), dtype=torch.float64, device=self.session.device)
        self.sums: dict[str, Any] = {"loss": zero, "correct": zero.clone(), "seen": 0, "reward": 0.0,
                                     "entropy": 0.0, "controller_steps": 0, "started": time.perf_counter()}

    def _state(self) -> dict[str, Any]:
        sums = {k: float(v) if isinstance(v, Tensor) else v for k, v in self.sums.items() if k != "started"}
        return {"config_dict": self.config.to_dict(),
                "position": {"epoch": self.epoch, "batch": self.batch, "step": self.step,
                             "val_epoch": self.val_epoch, "val_batch": self.val_batch, "done": self.done},
                "epoch_sums": sums, "supernet": self.net.state_dict(), "optimizer": self.optimizer.state_dict(),
                "searcher": self.searcher.state_dict(), "rate": self.rate.state_dict(),
                "scaler": self.session.precision.scaler.state_dict(),
                "rng": rng_state({"arch": self.arch_generator}, self.session.device)}

    def save(self) -> None:
        """Checkpoint now (atomically; process 0 writes, every process waits for it)."""
        self._check_finite()
        self.session.save(self._state())

    def _restore(self, state: dict[str, Any]) -> None:
        runs.check_resume("search", state["config_dict"], self.config.to_dict(), state["position"]["epoch"])
        changed = runs.changes(state["config_dict"], self.config.to_dict())
        if self.epoch_phase(state["position"]["epoch"]) == "search":
            strategies.begin_search(self.net, self.strategy, self.transition_seed)  # so the optimizer state matches
        saved = {k: list(v.shape) for k, v in state["supernet"].items()}
        mine = {k: list(v.shape) for k, v in self.net.state_dict().items()}
        if saved != mine:  # a supernet passed in Python (model=) that is not the run's
            key = next(k for k in sorted(set(saved) | set(mine)) if saved.get(k) != mine.get(k))
            raise ConfigError(f"the checkpoint's supernet {self.config.model.name} is not this one ({key}: "
                              f"{saved.get(key)} in the checkpoint, {mine.get(key)} here): resume with the supernet "
                              f"the run was started with")
        self.net.load_state_dict(state["supernet"])
        initial = [group["initial_lr"] for group in self.optimizer.param_groups]
        self.optimizer.load_state_dict(state["optimizer"])
        for group, lr in zip(self.optimizer.param_groups, initial):  # the settings' rate, which may change
            group["initial_lr"] = lr
        self.searcher.load_state_dict(state["searcher"])
        self.rate.load_state_dict(state["rate"])
        self.session.precision.scaler.load_state_dict(state["scaler"])
        restore_rng(state["rng"], {"arch": self.arch_generator}, self.session.device)
        for key, value in state["position"].items():
            setattr(self, key, value)
        for key in ("loss", "correct"):
            self.sums[key] = torch.tensor(state["epoch_sums"][key], dtype=torch.float64, device=self.session.device)
        for key in ("seen", "reward", "entropy", "controller_steps"):
            self.sums[key] = state["epoch_sums"][key]
        extra = f" with {runs.described(changed)}" if changed else ""
        self.log(f"resumed from {self.session.checkpoint} {runs.where(self.epoch, self.config.train.epochs)}, "
                 f"step {self.step}{extra}")

    # --- the schedule -------------------------------------------------------------------

    def epoch_phase(self, epoch: int) -> str:
        return "warmup" if epoch < self.config.train.warmup_epochs else "search"

    def _validation_batches(self) -> Iterator[tuple[Tensor, Tensor]]:
        """The searcher's validation batches, epoch after epoch, from the saved position."""
        size = self.config.train.batch_size
        while True:
            for x, y in self.val.batches(size, seed=self.config.run.seed + 1, epoch=self.val_epoch, shuffle=True,
                                         drop_last=True, start=self.val_batch):
                self.val_batch += 1
                yield x, y
            self.val_epoch, self.val_batch = self.val_epoch + 1, 0

    def widest_step(self) -> bool:
        """Whether the next weight step trains the widest arch (``train.widest_every``)."""
        every = self.config.train.widest_every
        return every > 0 and self.step % every == every - 1

    def train_arch(self, phase: str) -> list[int]:
        """The arch the next weight step trains: uniform in warm-up, the searcher's after; the
        widest at every ``train.widest_every``-th step."""
        if self.widest_step():
            return self.net.max_arch()
        if phase == "warmup":
            return self.net.sample_uniform(self.arch_generator)
        return self.searcher.sample_train_arch()

    def train_step(self, x: Tensor, y: Tensor, phase: str) -> tuple[steps.StepStats, Optional[Tensor]]:
        """One weight step on a global batch for a sampled arch, then APS-T's transition
        (returns the step's statistics and Φ before the transition, or ``None``)."""
        steps.train_mode(self.net)
        # The search phase's weight steps before this one, widest steps included (TAS's
        # temperature follows them, not the steps that sample from the searcher).
        before = self.step - self.config.train.warmup_epochs * self.steps_per_epoch
        if phase == "search":
            self.searcher.begin_step(max(before, 0))
        self.net.set_arch(self.processes.same(self.train_arch(phase)))
        steps.set_lr(self.optimizer, steps.cosine(self.step, self.total_steps))
        shaped = contextlib.nullcontext() if self.widest_step() else self.searcher.train_forward()
        with shaped:  # a searcher may shape the forward of its arch (TAS mixes two widths)
            stats = steps.weight_step(self.session.parallel(self.net), self.optimizer, self.session.precision,
                                      *self.session.local(x, y), grad_clip=self.config.train.grad_clip)
        searched = before + 1
        every = self.config.sharing.transition_every
        phi = strategies.after_weight_step(self.net, self.strategy, self.rate.tau,
                                           searched if phase == "search" else None, every,
                                           self.config.sharing.transition_precision)
        self.rate.observe(searched, phi, every)
        self.sums["loss"] = self.sums["loss"] + stats.loss_sum
        self.sums["correct"] = self.sums["correct"] + stats.correct
        self.sums["seen"] += stats.count * self.processes.world
        return stats, phi

    def search_step(self) -> dict[str, float]:
        """One step of the searcher on the next validation batch (the archs' accuracies stay on
        the device; see :mod:`apsfast.search.readback`)."""
        x, y = self.session.local(*next(self._val_stream))
        size = len(y) * self.processes.world

        def score(archs: list[list[int]]) -> Tensor:
            counts = steps.count_correct(self.net, archs, x, y, self.session.precision)
            return self.processes.sum_tensor(counts) / size

        return self._controller_done(self.searcher.step(score, batch=(x, y)))

    def _controller_done(self, out: dict[str, float]) -> dict[str, float]:
        """Add a finished searcher step to the epoch's sums (a pending one adds nothing yet)."""
        if "reward" in out:
            self.sums["reward"] += out["reward"]
            self.sums["entropy"] += out["entropy"]
            self.sums["controller_steps"] += 1
        return out

    # --- the run ------------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        """Run (or continue) the search to its end; returns the result (also in ``result.json``)."""
        try:
            return self._run()
        finally:
            self.session.close()

    def _run(self) -> dict[str, Any]:
        config, train = self.config, self.config.train
        if self.done:
            self.log(f"the search in {self.out} is complete")
            path = self.out / results.RESULT
            return json.loads(path.read_text()) if path.exists() else self.finish()
        self.log(f"searching {self.net.name} ({len(self.decisions)} decisions) with {self.strategy} sharing on "
                 f"{config.data.name} ({len(self.w_train)} images for the weights, {len(self.val)} for the "
                 f"controller, {len(self.eval_set)} of them class-balanced for the per-epoch accuracy), "
                 f"{train.epochs} epochs ({train.warmup_epochs} warm-up) of {self.steps_per_epoch} steps, on "
                 f"{self.session.where()}; output in {self.out}")
        while self.epoch < train.epochs:
            phase = self.epoch_phase(self.epoch)
            if phase == "search":
                strategies.begin_search(self.net, self.strategy, self.transition_seed)
            self._run_epoch(phase)
            self._end_epoch(phase)
        return self.finish()

    def _run_epoch(self, phase: str) -> None:
        config = self.config
        batches = self.w_train.batches(config.train.batch_size, seed=config.run.seed, epoch=self.epoch, shuffle=True,
                                       augment=True, drop_last=True, start=self.batch)
        bar = self.session.progress(self.steps_per_epoch, self.batch,
                                    f"epoch {self.epoch + 1}/{config.train.epochs} {phase}")
        for x, y in self.session.feed(islice(batches, self.steps_per_epoch - self.batch)):
            stats, phi = self.train_step(x, y, phase)
            controller = None
            if phase == "search" and self.step % config.controller.every == 0:
                controller = self.search_step()
            self.batch += 1
            self.step += 1
            bar.update(1)
            if config.analysis.every and self.step % config.analysis.every == 0:
                self._analyse(x, y, phase)
            if self.step % config.run.log_every == 0:
                record = self._log_step(phase, stats, phi, controller)
                bar.set_postfix({k: f"{record[k]:.4g}" for k in ("loss", "acc", "phi", "controller_reward",
                                                                   "controller_entropy") if k in record})
            if self.step % config.run.checkpoint_every == 0 and self.batch < self.steps_per_epoch:
                self.save()
        bar.close()

    def _log_step(self, phase: str, stats: steps.StepStats, phi: Optional[Tensor],
                  controller: Optional[dict[str, float]]) -> dict[str, Any]:
        """The metrics line of a log point: the last step's loss, accuracy and rate, Φ, and the
        searcher's last step; the first values read back from the device since the last one."""
        self._check_finite()
        loss_sum, correct = self.processes.sum([float(stats.loss_sum), float(stats.correct)])
        seen = stats.count * self.processes.world
        record = {"kind": "step", "step": self.step, "epoch": self.epoch, "phase": phase, "loss": loss_sum / seen,
                  "acc": correct / seen, "lr": self.config.train.lr * steps.cosine(self.step - 1, self.total_steps),
                  "phi": float(phi) if phi is not None else strategies.sharing_level(self.net)}
        record.update({f"controller_{k}": v for k, v in (controller or {}).items()})
        self.session.write(record)
        return record

    def _analyse(self, x: Tensor, y: Tensor, phase: str) -> None:
        """The paper's §3.3 measurements on this step's batch as an ``analysis`` metrics line
        (:mod:`apsfast.analysis.measure`; they change nothing the run computes)."""
        from apsfast.analysis.measure import measure_search
        record = measure_search(self, x, y)
        self.session.write({"kind": "analysis", "step": self.step, "epoch": self.epoch, "phase": phase, **record})

    def _check_finite(self) -> None:
        """Stop on a non-finite training loss since the last check, naming the last good checkpoint."""
        loss = self.sums["loss"]
        if bool(torch.isfinite(loss)):
            return
        lr = self.config.train.lr
        raise FloatingPointError(
            f"the training loss is {float(loss)} in epoch {self.epoch + 1} (at or before step {self.step}); the last "
            f"good checkpoint is {self.session.checkpoint}. Lower the learning rate or clip the gradients and resume: "
            f"apsfast search --resume --out {self.out} -s train.lr={lr / 10:g} (or -s train.grad_clip=5)")

    def _end_epoch(self, phase: str) -> None:
        arch = self.searcher.beam(1)[0][0]
        probs = self.searcher.probabilities(arch)
        self._check_finite()
        loss, correct = self.processes.sum([float(self.sums["loss"]), float(self.sums["correct"])])
        seen, controller_steps = max(self.sums["seen"], 1), self.sums["controller_steps"]
        batches = (self.session.local(x, y) for x, y in self.eval_set.batches(
            self.config.train.batch_size, seed=0, epoch=0, shuffle=False, drop_last=True))
        val_correct, val_seen = steps.evaluate(self.net, arch, batches, self.session.precision)
        val_seen *= self.processes.world
        record = {"kind": "epoch", "epoch": self.epoch, "step": self.step, "phase": phase, "train_loss": loss / seen,
                  "train_acc": correct / seen, "val_acc": self.processes.sum([float(val_correct)])[0] / val_seen,
                  "val_images": val_seen, "phi": strategies.sharing_level(self.net),
                  "reward": self.sums["reward"] / controller_steps if controller_steps else None,
                  "entropy": self.sums["entropy"] / controller_steps if controller_steps else None,
                  "arch": arch, "flops": self.net.flops(arch), "probs": probs,
                  **({"latency_ms": self.budget.cost(arch)} if self.budget.key == "latency_ms" else {}),
                  "seconds": time.perf_counter() - self.sums["started"]}
        self.session.write(record)
        extra = "" if record["reward"] is None else \
            f"  reward {record['reward']:.4f}  entropy {record['entropy']:.3f}"
        self.log(f"epoch {self.epoch + 1}/{self.config.train.epochs} {phase:<6}  loss {record['train_loss']:.4f}  "
                 f"train acc {record['train_acc']:.2%}  val acc (most likely, {val_seen} images) "
                 f"{record['val_acc']:.2%}  Φ {record['phi']:.4g}{extra}  ({record['seconds']:.1f} s)")
        self.epoch, self.batch = self.epoch + 1, 0
        self._reset_sums()
        self.save()

    def finish(self) -> dict[str, Any]:
        """The beam, the choice, ``result.json``, the exported model and the plots."""
        self._controller_done(self.searcher.flush())  # the last search step's update
        data = {"data": self.config.data.name, "num_classes": self.num_classes, "input_size": self.image_size}
        result = results.build_result(self.net, self.searcher, self.config, data=data,
                                      phi=strategies.sharing_level(self.net), budget=self.budget)
        if self.session.main:
            results.write_outputs(self.out, self.net, result, portable=self.config.result.portable)
        self.done = True
        self.save()
        for line in results.summary_lines(self.out, result):
            self.log(line)
        return result


def search(config: Config, out_dir: Union[str, Path], *, resume: bool = False,
           model: Optional[models.Supernet] = None, train_data: Any = None, val_data: Any = None) -> dict[str, Any]:
    """Run a search to its end (see :class:`Search`, also for ``model``: a supernet to search
    instead of building ``config.model``, and ``train_data``/``val_data``: data sets of your own
    instead of ``config.data``); returns the result. Under ``torchrun`` every process calls it;
    the process group is left at the end."""
    runner = Search(config, out_dir, resume=resume, model=model, train_data=train_data, val_data=val_data)
    try:
        return runner.run()
    finally:
        runner.session.teardown()
