"""Training a searched architecture from scratch: the export of the chosen arch, freshly
initialised, trained on the whole train split and scored on the test split (which the search
never sees).

It runs on the same :class:`~apsfast.search.session.Session` and weight step as the search,
so ``run.amp``, ``run.channels_last``, the GPU prefetch, ``torchrun``, checkpoints every
``run.checkpoint_every`` steps with an exact resume, the non-finite guard and the progress
output all apply. Under ``torchrun`` the batch norm of the static network is per process.
"""
from __future__ import annotations

import copy
import os
import time
from itertools import islice
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import torch

from apsfast import models
from apsfast.models.registry import CONVERTED, is_factory
from apsfast.search import assemble, runs, steps
from apsfast.search.config import Config, ConfigError, dump_config
from apsfast.search.checkpoint import load_checkpoint
from apsfast.search.result import fresh_model, load_exported, read_result, save_exported, write_json
from apsfast.search.session import Session, restore_rng, rng_state
from apsfast.search.settings import apply_overrides, config_from_dict

SUMMARY, MODEL = "retrain.json", "retrained.pt"
DATA_STREAM = 7  # the retrain's batches are drawn from seed + 7: not the search's streams


class Retrain:
    """One retraining run of an arch of ``result`` (its chosen one by default) into ``out``
    (arguments as :func:`retrain`). ``result`` may also be a result-like dict (``model``,
    ``options``, ``strategy``, ``num_classes``, ``config``, ``chosen``, and ``source``: how
    the messages name it), as :func:`~apsfast.search.baselines.retrain_uniform` builds; ``out_dir`` is then required."""

    def __init__(self, result_path: Union[str, Path, Mapping[str, Any]], out_dir: Optional[Union[str, Path]] = None,
                 overrides: Sequence[str] = (), *, resume: bool = False,
                 log: Optional[Callable[[str], None]] = None, arch: Optional[Sequence[int]] = None,
                 model: Optional[models.Supernet] = None, train_data: Any = None, val_data: Any = None) -> None:
        if isinstance(result_path, Mapping):
            if out_dir is None:
                raise ValueError("a retrain of a result-like dict needs out_dir")
            self.result, self.result_path = dict(result_path), None
            self.source = str(self.result.get("source", out_dir))
        else:
            self.result, self.result_path = read_result(result_path)
            self.source = str(self.result_path.parent)
        self.supernet = searched_supernet(self.result, model, self.source)
        out = Path(out_dir) if out_dir is not None else self.result_path.parent / "retrain"
        if resume and (out / "config.yaml").is_file():
            config = runs.saved_config(out, overrides)
        else:
            config = apply_overrides(config_from_dict(self.result["config"]), overrides)
        config, data = assemble.given_data(config, train_data, val_data)
        self.config: Config = config
        plan = assemble.check(config, search=False, data=data)
        self.train_set, self.test_set = plan.train, plan.test
        if self.train_set.num_classes != self.result["num_classes"]:
            raise ConfigError(f"the data has {self.train_set.num_classes} classes, the searched model "
                              f"{self.result['num_classes']}")
        note = runs.resume_state(out, resume)
        self.candidate = self.result["chosen"] if arch is None else describe_arch(self.result, arch, self.supernet)
        self.arch = list(self.candidate["arch"])
        self.session = session = Session(out, config.run, log=log, expect={
            "kind": "retrain", "model": self.result["model"], "arch": self.arch})
        # Once, on a GPU: an in-memory set's batches are then made there (Session.place).
        self.train_set, self.test_set = session.place(self.train_set), session.place(self.test_set)
        self.log, cfg = session.log, config.retrain
        if cfg.batch_size % session.processes.world:
            raise ConfigError(f"retrain.batch_size = {cfg.batch_size} must be divisible by the number of processes "
                              f"({session.processes.world})")
        torch.manual_seed(config.run.seed)
        self.model = fresh_static(self.result, self.arch, session.device, self.supernet)
        if config.run.channels_last:
            self.model.to(memory_format=torch.channels_last)
        self.teacher = self._teacher(cfg.distill, session.device) if cfg.distill else None
        self.optimizer = steps.sgd(self.model.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                                   weight_decay=cfg.weight_decay, nesterov=cfg.nesterov)
        for group in self.optimizer.param_groups:
            group["initial_lr"] = cfg.lr
        batches = self.train_set.num_batches(cfg.batch_size, drop_last=True)
        self.steps_per_epoch = min(batches, cfg.steps_per_epoch or batches)
        self.epoch = self.batch = self.step = 0
        self._reset_sums()
        state = session.start(dump_config(config))
        if note:
            self.log(note)
        if state is None:
            self.save()
        else:
            self._restore(state)

    def _teacher(self, source: str, device: torch.device) -> torch.nn.Module:
        """The distillation teacher, in eval mode: the search's supernet at its widest arch
        (from the search's checkpoint) or an exported model."""
        if source != "widest":
            teacher = load_exported(os.path.expanduser(source), device)
        else:
            if self.result_path is None:
                raise ConfigError("retrain.distill=widest needs a search folder (its checkpoint.pt holds the supernet)")
            state = load_checkpoint(self.result_path.parent / "checkpoint.pt", expect={"kind": "search"})
            net = models.build(self.result["model"], device=device, **self.result["options"]) \
                if self.supernet is None else copy.deepcopy(self.supernet).to(device)
            net.load_state_dict(state["supernet"])
            teacher = net.export(net.max_arch())
        for p in teacher.parameters():
            p.requires_grad_(False)
        return teacher.eval()

    def _reset_sums(self) -> None:
        zero = torch.zeros((), dtype=torch.float64, device=self.session.device)
        self.sums: dict[str, Any] = {"loss": zero, "correct": zero.clone(), "seen": 0, "started": time.perf_counter()}

    def save(self) -> None:
        self._check_finite()
        self.session.save({"config_dict": self.config.to_dict(),
                           "position": {"epoch": self.epoch, "batch": self.batch, "step": self.step},
                           "sums": {k: float(v) for k, v in self.sums.items() if k != "started"},
                           "model_state": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                           "scaler": self.session.precision.scaler.state_dict(),
                           "rng": rng_state({}, self.session.device)})

    def _restore(self, state: dict[str, Any]) -> None:
        runs.check_resume("retrain", state["config_dict"], self.config.to_dict(), state["position"]["epoch"])
        self.model.load_state_dict(state["model_state"])
        initial = [group["initial_lr"] for group in self.optimizer.param_groups]
        self.optimizer.load_state_dict(state["optimizer"])
        for group, lr in zip(self.optimizer.param_groups, initial):  # the settings' rate, which may change
            group["initial_lr"] = lr
        self.session.precision.scaler.load_state_dict(state["scaler"])
        restore_rng(state["rng"], {}, self.session.device)
        self.epoch, self.batch, self.step = (state["position"][k] for k in ("epoch", "batch", "step"))
        for key in ("loss", "correct"):
            self.sums[key] = torch.tensor(state["sums"][key], dtype=torch.float64, device=self.session.device)
        self.sums["seen"] = int(state["sums"]["seen"])
        changed = runs.changes(state["config_dict"], self.config.to_dict())
        extra = f" with {runs.described(changed)}" if changed else ""
        self.log(f"resumed retraining from {self.session.checkpoint} {runs.where(self.epoch, self.config.retrain.epochs)}, "
                 f"step {self.step}{extra}")

    def _check_finite(self) -> None:
        if not bool(torch.isfinite(self.sums["loss"])):
            raise FloatingPointError(
                f"the retraining loss is {float(self.sums['loss'])} in epoch {self.epoch + 1}; the last good checkpoint "
                f"is {self.session.checkpoint}. Lower the learning rate and resume: apsfast train "
                f"{self.source} --out {self.session.out} --resume -s retrain.lr={self.config.retrain.lr / 10:g}")

    def accuracy(self) -> float:
        """Test accuracy of the model (each process scores the whole test split)."""
        self.model.eval()
        correct = seen = 0.0
        with torch.no_grad(), self.session.precision.autocast():
            for x, y in self.test_set.batches(self.config.retrain.batch_size, seed=0, epoch=0, shuffle=False):
                x = self.session.precision.inputs(x.to(self.session.device, non_blocking=True))
                correct += float((self.model(x).argmax(1) == y.to(self.session.device)).sum())
                seen += len(y)
        return correct / seen

    def run(self) -> dict[str, Any]:
        """Train to the last epoch (or continue); returns the summary also written to ``retrain.json``."""
        try:
            return self._run()
        finally:
            self.session.close()

    def _run(self) -> dict[str, Any]:
        cfg, chosen = self.config.retrain, self.candidate
        self.log(f"retraining {self.result['model']} ({chosen['flops'] / 1e6:.2f}M MACs, {chosen['params']:,} params) "
                 f"from scratch for {cfg.epochs} epochs of {self.steps_per_epoch} steps on {self.config.data.name}, "
                 f"on {self.session.where()}; output in {self.session.out}")
        test_acc = None
        while self.epoch < cfg.epochs:
            self._run_epoch()
            test_acc = self._end_epoch()
        if test_acc is None:  # resumed after the last epoch: score the saved weights
            test_acc = self.accuracy()
        return self._finish(test_acc)

    def _run_epoch(self) -> None:
        cfg = self.config.retrain
        total = cfg.epochs * self.steps_per_epoch
        batches = self.train_set.batches(cfg.batch_size, seed=self.config.run.seed + DATA_STREAM, epoch=self.epoch,
                                         augment=True, drop_last=True, start=self.batch)
        bar = self.session.progress(self.steps_per_epoch, self.batch, f"retrain {self.epoch + 1}/{cfg.epochs}")
        model = self.session.parallel(self.model)
        for x, y in self.session.feed(islice(batches, self.steps_per_epoch - self.batch)):
            steps.train_mode(self.model)
            steps.set_lr(self.optimizer, steps.cosine(self.step, total))
            stats = steps.weight_step(model, self.optimizer, self.session.precision, *self.session.local(x, y),
                                      grad_clip=cfg.grad_clip, label_smoothing=cfg.label_smoothing,
                                      teacher=self.teacher, distill=(cfg.distill_alpha, cfg.distill_temperature))
            self.sums["loss"] = self.sums["loss"] + stats.loss_sum
            self.sums["correct"] = self.sums["correct"] + stats.correct
            self.sums["seen"] += stats.count * self.session.processes.world
            self.batch += 1
            self.step += 1
            bar.update(1)
            if self.step % self.config.run.log_every == 0:
                self._check_finite()
                bar.set_postfix(loss=f"{float(self.sums['loss']) / max(self.sums['seen'], 1):.4f}")
            if self.step % self.config.run.checkpoint_every == 0 and self.batch < self.steps_per_epoch:
                self.save()
        bar.close()

    def _end_epoch(self) -> float:
        self._check_finite()
        loss, correct = self.session.processes.sum([float(self.sums["loss"]), float(self.sums["correct"])])
        seen = max(self.sums["seen"], 1)
        test_acc = self.accuracy()
        record = {"kind": "epoch", "epoch": self.epoch, "step": self.step, "train_loss": loss / seen,
                  "train_acc": correct / seen, "test_acc": test_acc,
                  "seconds": time.perf_counter() - self.sums["started"]}
        self.session.write(record)
        self.log(f"retrain epoch {self.epoch + 1}/{self.config.retrain.epochs}  loss {record['train_loss']:.4f}  "
                 f"train acc {record['train_acc']:.2%}  test acc {test_acc:.2%}  ({record['seconds']:.1f} s)")
        self.epoch, self.batch = self.epoch + 1, 0
        self._reset_sums()
        self.save()
        return test_acc

    def _finish(self, test_acc: float) -> dict[str, Any]:
        out, chosen = self.session.out, self.candidate
        summary = {"model": self.result["model"], "strategy": self.result["strategy"], "widths": chosen["widths"],
                   "arch": self.arch, "flops": chosen["flops"], "params": chosen["params"],
                   "epochs": self.config.retrain.epochs, "test_acc": test_acc, "data": self.config.data.name,
                   "result": str(self.result_path) if self.result_path is not None else self.source}
        if "uniform" in self.result:  # the width ratio of a uniformly scaled network
            summary["uniform"] = self.result["uniform"]
        if self.session.main:
            net = self.supernet if self.supernet is not None else \
                models.build(self.result["model"], device="meta", **self.result["options"])
            save_exported(out / MODEL, net, self.arch, self.model, portable=self.config.result.portable)
            write_json(out / SUMMARY, summary)
        self.log(f"test accuracy {test_acc:.2%} after {self.config.retrain.epochs} epochs; model: {out / MODEL}; "
                 f"summary: {out / SUMMARY}")
        return summary


def searched_supernet(result: Mapping[str, Any], model: Optional[models.Supernet],
                      source: str) -> Optional[models.Supernet]:
    """``model``, the supernet a search of ``result`` (named ``source`` in messages) was given
    in Python, checked against it; ``None`` where the result's model is rebuilt by name. A
    supernet converted in Python must be passed: a :class:`ConfigError` says so."""
    if model is None:
        if str(result["model"]).startswith(CONVERTED):
            raise ConfigError(f"{source} searched {result['model']}, a supernet made by apsfast.convert in Python, "
                              f"which cannot be rebuilt from the folder: retrain it from Python with the same "
                              f"supernet, apsfast.search.retrain({source!r}, model=net), or search a factory "
                              f"(apsfast search --model package.module:factory) to retrain from the command line")
        return None
    if not isinstance(model, models.Supernet):
        raise TypeError(f"model must be the supernet the search was given, got {type(model).__name__}")
    decisions = [[d.name, list(d.widths)] for d in model.decisions()]
    searched = [[d["name"], list(d["widths"])] for d in result.get("decisions", [])] or decisions
    if model.name != result["model"] or decisions != searched:
        raise ConfigError(f"model is {model.name} with decisions {decisions}, but {source} searched {result['model']} "
                          f"with {searched}: pass the supernet the search was given")
    return model


def fresh_static(result: Mapping[str, Any], arch: Sequence[int], device: Union[str, torch.device],
                 model: Optional[models.Supernet] = None) -> torch.nn.Module:
    """``arch`` of ``result``'s model as a static network, freshly initialised on ``device``:
    a registered space through the meta device (:func:`~apsfast.search.result.fresh_model`); a
    user model (a factory's, or ``model``) built on the CPU, so that what convert keeps as it
    is (buffers, parameters outside the convs, batch norms and linear layers, excluded
    submodules) has real values: the factory's own, or ``model``'s."""
    if model is None and not is_factory(result["model"]):
        return fresh_model(result, list(arch), device)
    net = model if model is not None else models.build(result["model"], **result["options"])
    return net.export(net.check_arch(arch), inherit_weights=False).to(device)


def describe_arch(result: Mapping[str, Any], arch: Sequence[int],
                  model: Optional[models.Supernet] = None) -> dict[str, Any]:
    """``{"arch", "widths", "flops", "params"}`` of ``arch`` in ``result``'s model (counted on
    the meta device: nothing is allocated), or in ``model``, the supernet the search was given."""
    net = model if model is not None else models.build(result["model"], device="meta", **result["options"])
    arch = net.check_arch(arch)
    return {"arch": arch, "widths": net.widths(arch), "flops": net.flops(arch), "params": net.params(arch)}


def retrain(result_path: Union[str, Path, Mapping[str, Any]], out_dir: Optional[Union[str, Path]] = None,
            overrides: Sequence[str] = (), *, resume: bool = False,
            log: Optional[Callable[[str], None]] = None, arch: Optional[Sequence[int]] = None,
            model: Optional[models.Supernet] = None, train_data: Any = None,
            val_data: Any = None) -> dict[str, Any]:
    """Train the arch of a search result from scratch and report its test accuracy.

    Args:
        result_path: the search's output folder or its ``result.json`` (or a result-like dict,
            see :class:`Retrain`).
        out_dir: where to write (default: ``retrain/`` beside the result).
        overrides: ``"retrain.epochs=5"``-style config overrides (any section may be given;
            the data and the run sections apply too). On a resume they apply to the settings
            the retrain was started with (see :mod:`apsfast.search.runs` for what may change).
        resume: continue from ``out_dir``'s checkpoint.
        arch: the arch to train (default: the result's chosen one), e.g. one of its beam.
        model: the supernet the search was given (``search(..., model=net)``) where the
            result's model cannot be rebuilt by name (one made by :func:`apsfast.convert` in
            Python); its arch is exported with fresh weights.
        train_data, val_data: the data sets a search was given in Python
            (``search(..., train_data=..., val_data=...)``), passed again: the retrain trains on
            the whole of ``train_data`` and scores on ``val_data``.

    Returns:
        The summary also written to ``retrain.json``: test accuracy, epochs, MACs, params.
    """
    runner = Retrain(result_path, out_dir, overrides, resume=resume, log=log, arch=arch, model=model,
                     train_data=train_data, val_data=val_data)
    try:
        return runner.run()
    finally:
        runner.session.teardown()
