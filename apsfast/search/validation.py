"""The checks of a config that its types alone do not make: ranges, choices, consistency, and
the model's options (by building the supernet on the meta device). Each failure is one
:class:`~apsfast.search.config.ConfigError` naming the field, the value and what it expects."""
from __future__ import annotations

import os
from typing import Optional

from apsfast.search.config import AMP, BASELINES, DEVICES, DIST_BACKENDS, SEARCHER_KINDS, SELECTS, Config, ConfigError
from apsfast.search.strategies import STRATEGIES, supernet_sharing
from apsfast.sharing import PRECISIONS


def _positive(path: str, value: Optional[float], *, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if value is None or value <= 0:
        raise ConfigError(f"{path} must be > 0, got {value!r}")


def check_config(config: Config) -> None:
    """Range and consistency checks that types alone do not catch, and the model's options
    (by building nothing: the option names are checked against the model's builder)."""
    _check_model(config)
    _check_data(config.data)
    _check_training(config)
    _check_controller(config)
    _check_searchers(config)
    _check_run(config)
    _check_reward(config)


def _check_model(config: Config) -> None:
    from apsfast.models import available, build, options_of

    model, sharing = config.model, config.sharing
    if sharing.strategy not in STRATEGIES:
        raise ConfigError(f"sharing.strategy must be one of {', '.join(STRATEGIES)}, got {sharing.strategy!r}")
    _positive("sharing.tau", sharing.tau, allow_none=True)
    _positive("sharing.transforms_lr", sharing.transforms_lr, allow_none=True)
    for name, value, closed in (("transition_fall", sharing.transition_fall, False),
                                ("transition_end", sharing.transition_end, True)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1 \
                or (value == 1 and not closed):
            bound = "0 < x ≤ 1" if closed else "0 < x < 1"
            raise ConfigError(f"sharing.{name} must be a fraction {bound}, got {value!r}")
    if sharing.transition_precision is not None and sharing.transition_precision not in PRECISIONS:
        raise ConfigError(f"sharing.transition_precision must be null or one of {', '.join(PRECISIONS)}, "
                          f"got {sharing.transition_precision!r}")
    every = sharing.transition_every
    if isinstance(every, bool) or not isinstance(every, int) or every < 1:
        raise ConfigError(f"sharing.transition_every must be an integer ≥ 1 (1: a transition step after every "
                          f"weight step), got {every!r}")
    if ":" in model.name:
        _check_user_model(model)
        return
    if model.name not in available():
        raise ConfigError(f"model.name must be one of {', '.join(available())}, or package.module:factory for a "
                          f"model of your own, got {model.name!r}")
    if model.convert:
        raise ConfigError(f"model.convert applies to a model of your own (model.name = package.module:factory), "
                          f"not to {model.name!r}; drop it")
    reserved = {"sharing", "device", "dtype"} & set(model.options)
    if reserved:
        raise ConfigError(f"model.options may not set {sorted(reserved)}: sharing comes from "
                          f"sharing.strategy, device from run.device")
    unknown = sorted(set(model.options) - set(options_of(model.name)))
    if unknown:
        raise ConfigError(f"model.options has unknown option(s) {unknown} for {model.name!r}; its options are "
                          f"{sorted(set(options_of(model.name)) - {'sharing'})}")
    try:  # the option values, by the builder's own checks, on the meta device (no memory)
        build(model.name, device="meta", sharing=supernet_sharing(sharing.strategy), **model.options)
    except (TypeError, ValueError) as error:
        raise ConfigError(f"model.options: {error}") from None


def _check_user_model(model) -> None:
    """A factory's name and the keys of ``model.convert`` (no import here: the factory is
    imported, called and converted by :func:`apsfast.search.assemble.check`, before any file
    is written). A ``converted:`` name is a supernet passed to ``search(model=...)``."""
    from apsfast.models.registry import CONVERT_OPTIONS, CONVERTED, check_factory_name, check_input_size

    if not model.name.startswith(CONVERTED):
        try:
            check_factory_name(model.name)
        except ValueError as error:
            raise ConfigError(f"model.name: {error}") from None
    unknown = sorted(set(model.convert) - set(CONVERT_OPTIONS))
    if unknown:
        raise ConfigError(f"model.convert has unknown setting(s) {unknown}; its settings are {list(CONVERT_OPTIONS)} "
                          f"(sharing comes from sharing.strategy)")
    size, channels = model.convert.get("input_size"), model.convert.get("in_channels")
    try:
        if size is not None:
            check_input_size(size, "model.convert.input_size (null: the data's)", model.name)
    except ValueError as error:
        raise ConfigError(str(error)) from None
    if channels is not None and (isinstance(channels, bool) or not isinstance(channels, int) or channels < 1):
        raise ConfigError(f"model.convert.in_channels must be an int > 0 or null (the data's), got {channels!r}")


def _check_data(data) -> None:
    from apsfast import data as datasets

    if data.root is not None:  # a shell leaves `~` after `=` alone: -s data.root=~/data
        data.root = os.path.expandvars(os.path.expanduser(data.root))
    data.name = datasets.ALIASES.get(data.name, data.name)
    if ":" in data.name:
        _check_user_data(data)
    elif data.name not in datasets.DATASETS:
        raise ConfigError(f"data.name must be one of {', '.join(datasets.DATASETS)} (or the alias imagenet), or "
                          f"package.module:factory returning your data sets, got {data.name!r}")
    for key, options in (("augment", datasets.AUGMENTS), ("normalize", datasets.NORMALIZE)):
        value = getattr(data, key)
        if value not in options:
            raise ConfigError(f"data.{key} must be one of {', '.join(options)}, got {value!r}")
        if value != "auto" and data.name != "folder":
            raise ConfigError(f"data.{key} applies to folder sets only; {data.name!r} has its own (leave it auto)")
    if not 0 < data.val_fraction < 1:
        raise ConfigError(f"data.val_fraction must be in (0, 1), got {data.val_fraction!r}")
    for path, value in (("data.image_size", data.image_size), ("data.workers", data.workers)):
        if value is not None and value < (0 if path == "data.workers" else 1):
            raise ConfigError(f"{path} must be {'≥ 0' if path == 'data.workers' else '> 0'}, got {value!r}")


def _check_user_data(data) -> None:
    """A data factory's name (imported by :func:`apsfast.search.assemble.check`, before any file
    is written), or ``python:…``: data sets passed to ``search(train_data=...)``."""
    from apsfast import data as datasets
    from apsfast.models.registry import check_factory_name

    if not data.name.startswith(datasets.PYTHON):
        try:
            check_factory_name(data.name, "data", datasets.FACTORY_RETURNS)
        except ValueError as error:
            raise ConfigError(f"data.name: {error}") from None
    if data.image_size is not None:
        raise ConfigError(f"data.image_size applies to the built-in sets; {data.name!r} gives its inputs' size "
                          f"(set it in its transform), got {data.image_size!r}")


def _check_training(config: Config) -> None:
    train = config.train
    for section, name in ((train, "train"), (config.retrain, "retrain")):
        for key in ("epochs", "batch_size", "lr"):
            _positive(f"{name}.{key}", getattr(section, key))
        _positive(f"{name}.steps_per_epoch", section.steps_per_epoch, allow_none=True)
        if not 0 <= section.momentum < 1:
            raise ConfigError(f"{name}.momentum must be in [0, 1), got {section.momentum!r}")
        if section.weight_decay < 0:
            raise ConfigError(f"{name}.weight_decay must be ≥ 0, got {section.weight_decay!r}")
    if not 0 <= train.warmup_epochs < train.epochs:
        raise ConfigError(f"train.warmup_epochs must be in [0, train.epochs={train.epochs}) so that the "
                          f"controller gets some epochs, got {train.warmup_epochs!r}")
    _positive("train.grad_clip", train.grad_clip, allow_none=True)
    if not isinstance(train.widest_every, int) or train.widest_every < 0:
        raise ConfigError(f"train.widest_every must be an integer ≥ 0 (0: never), got {train.widest_every!r}")
    _positive("retrain.grad_clip", config.retrain.grad_clip, allow_none=True)
    if not 0 <= config.retrain.label_smoothing < 1:
        raise ConfigError(f"retrain.label_smoothing must be in [0, 1), got {config.retrain.label_smoothing!r}")
    retrain = config.retrain
    if retrain.distill is not None and retrain.distill != "widest" \
            and not os.path.isfile(os.path.expanduser(retrain.distill)):
        raise ConfigError(f"retrain.distill must be widest or the path of an exported model.pt, got "
                          f"{retrain.distill!r} (no such file)")
    if not 0 <= retrain.distill_alpha <= 1:
        raise ConfigError(f"retrain.distill_alpha must be in [0, 1], got {retrain.distill_alpha!r}")
    _positive("retrain.distill_temperature", retrain.distill_temperature)
    _positive("reward.flops_target", config.reward.flops_target, allow_none=True)
    _positive("result.beam", config.result.beam)
    if config.result.select not in SELECTS:
        raise ConfigError(f"result.select must be one of {', '.join(SELECTS)}, got {config.result.select!r}")
    if config.analysis.every < 0:
        raise ConfigError(f"analysis.every must be ≥ 0 (0: off), got {config.analysis.every!r}")
    for key in ("pairs", "samples"):
        _positive(f"analysis.{key}", getattr(config.analysis, key))


def _check_controller(config: Config) -> None:
    ctl = config.controller
    if ctl.kind not in SEARCHER_KINDS:
        raise ConfigError(f"controller.kind must be one of {', '.join(SEARCHER_KINDS)}, got {ctl.kind!r}")
    for key in ("hidden_size", "layers", "lr", "samples", "every"):
        _positive(f"controller.{key}", getattr(ctl, key))
    if ctl.weight_decay < 0:
        raise ConfigError(f"controller.weight_decay must be ≥ 0, got {ctl.weight_decay!r}")
    if len(ctl.betas) != 2 or not all(isinstance(b, (int, float)) and 0 <= b < 1 for b in ctl.betas):
        raise ConfigError(f"controller.betas must be two numbers in [0, 1), got {ctl.betas!r}")
    if not 0 <= ctl.baseline_decay < 1:
        raise ConfigError(f"controller.baseline_decay must be in [0, 1), got {ctl.baseline_decay!r}")
    if ctl.baseline not in BASELINES:
        raise ConfigError(f"controller.baseline must be one of {', '.join(BASELINES)}, got {ctl.baseline!r}")
    if ctl.baseline == "leave_one_out" and ctl.samples < 2:
        raise ConfigError(f"controller.baseline = leave_one_out compares the archs of a step with each other: "
                          f"controller.samples must be ≥ 2, got {ctl.samples!r}")
    if ctl.entropy_weight < 0:
        raise ConfigError(f"controller.entropy_weight must be ≥ 0, got {ctl.entropy_weight!r}")
    if not 0 <= ctl.entropy_end <= 1:
        raise ConfigError(f"controller.entropy_end must be in [0, 1], got {ctl.entropy_end!r}")
    if not 0 <= ctl.entropy_from < 1:
        raise ConfigError(f"controller.entropy_from must be in [0, 1), got {ctl.entropy_from!r}")


def _check_run(config: Config) -> None:
    run = config.run
    if run.device not in DEVICES and not run.device.startswith("cuda:"):
        raise ConfigError(f"run.device must be one of {', '.join(DEVICES)} or cuda:N, got {run.device!r}")
    for key, options in (("amp", AMP), ("dist_backend", DIST_BACKENDS)):
        if getattr(run, key) not in options:
            raise ConfigError(f"run.{key} must be one of {', '.join(options)}, got {getattr(run, key)!r}")
    for key in ("checkpoint_every", "log_every", "eval_batches"):
        _positive(f"run.{key}", getattr(run, key))
    if run.seed < 0:
        raise ConfigError(f"run.seed must be ≥ 0, got {run.seed!r}")


def _check_searchers(config: Config) -> None:
    """The ``tas`` and ``ista`` sections (checked whatever the kind: a config is valid or not)."""
    tas, ista = config.tas, config.ista
    for path, value in (("tas.lr", tas.lr), ("tas.tau_min", tas.tau_min), ("ista.lr", ista.lr),
                        ("ista.iterations", ista.iterations), ("ista.temperature", ista.temperature)):
        _positive(path, value)
    for path, betas in (("tas.betas", tas.betas), ("ista.betas", ista.betas)):
        if len(betas) != 2 or not all(isinstance(b, (int, float)) and 0 <= b < 1 for b in betas):
            raise ConfigError(f"{path} must be two numbers in [0, 1), got {betas!r}")
    if tas.tau_max < tas.tau_min:
        raise ConfigError(f"tas.tau_max must be ≥ tas.tau_min = {tas.tau_min}, got {tas.tau_max!r}")
    for path, value in (("tas.weight_decay", tas.weight_decay), ("tas.flops_weight", tas.flops_weight),
                        ("ista.sparsity", ista.sparsity), ("ista.flops_weight", ista.flops_weight)):
        if value < 0:
            raise ConfigError(f"{path} must be ≥ 0, got {value!r}")
    for path, value in (("tas.flops_tolerance", tas.flops_tolerance), ("ista.flops_tolerance", ista.flops_tolerance)):
        if not 0 <= value < 1:
            raise ConfigError(f"{path} must be in [0, 1), got {value!r}")
    if not 0 < ista.ratio < 1:
        raise ConfigError(f"ista.ratio must be in (0, 1) (fewer measurements than candidates), got {ista.ratio!r}")


def _check_reward(config: Config) -> None:
    """A budget in MACs or in milliseconds, not both (the latency target is checked against the
    space once the run has measured its latency table: :mod:`apsfast.search.budget`)."""
    reward = config.reward
    if reward.flops_target is not None and reward.latency_target is not None:
        raise ConfigError(f"reward.flops_target = {reward.flops_target:g} and reward.latency_target = "
                          f"{reward.latency_target:g} are both set: a search has one budget, in MACs or in "
                          f"milliseconds; set the other to null")
    _positive("reward.latency_target", reward.latency_target, allow_none=True)
    if isinstance(reward.latency_batch, bool) or not isinstance(reward.latency_batch, int) \
            or reward.latency_batch < 1:
        raise ConfigError(f"reward.latency_batch must be an integer ≥ 1 (images per timed forward), got "
                          f"{reward.latency_batch!r}")
    threads = reward.latency_threads
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise ConfigError(f"reward.latency_threads must be an integer ≥ 1 or null (the run's threads), got {threads!r}")
    if reward.latency_table is not None and not isinstance(reward.latency_table, str):
        raise ConfigError(f"reward.latency_table must be the path of a latency table or null, got "
                          f"{reward.latency_table!r}")
    from apsfast.models.runtime import RUNTIMES, check_runtime

    if reward.latency_runtime not in RUNTIMES:
        raise ConfigError(f"reward.latency_runtime must be one of {', '.join(RUNTIMES)}, got "
                          f"{reward.latency_runtime!r}")
    if reward.latency_target is not None:
        try:
            check_runtime(reward.latency_runtime)
        except ImportError as error:
            raise ConfigError(f"reward.latency_runtime = {reward.latency_runtime!r}: {error}") from None
