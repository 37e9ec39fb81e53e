"""What a run is made of, from its settings: the data, the supernet and their agreement.

:func:`check` runs every check that can fail before a run creates its folder (and is what
``apsfast search --print-config`` runs too): the data load, the model options against the
data (a user model's factory imported, called and converted), its outputs against the
classes, the FLOPs target against the smallest arch, the batch size against the splits.
:func:`adopt` describes a supernet passed to ``search(model=...)`` in the run's settings.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

import torch

from apsfast import data as datasets
from apsfast import models
from apsfast.models.registry import CONVERTED, is_factory, load_factory
from apsfast.search import strategies
from apsfast.search.config import Config, ConfigError
from apsfast.search.settings import config_from_dict


@dataclass
class Plan:
    """A run's data (``train``: the whole train split, ``test``) and the supernet's build
    options, checked against each other."""

    train: datasets.ImageSet
    test: datasets.ImageSet
    options: dict

    @property
    def num_classes(self) -> int:
        return self.train.num_classes

    @property
    def image_size(self) -> int:
        return self.train.image_size


def load_data(config: Config) -> tuple[datasets.ImageSet, datasets.ImageSet]:
    """The ``(train, test)`` sets of ``config.data``; a wrong setting is a :class:`ConfigError`."""
    data = config.data
    options = dict(data.options)
    if data.workers is not None:
        options["num_workers"] = data.workers
    if data.name == "folder":
        options.update(augment=data.augment, normalize=data.normalize)
    try:
        # The embedded set's own seed (data.options.seed, default 0) is not the run's: searches
        # with different seeds must see the same data.
        return datasets.load(data.name, data.root, image_size=data.image_size, **options)
    except (TypeError, ValueError) as error:
        raise ConfigError(f"data: {error}") from None
    except (FileNotFoundError, NotADirectoryError) as error:
        raise ConfigError(f"data.root: {error}") from None


def model_options(config: Config, num_classes: int, image_size: int) -> dict:
    """``config.model.options`` with the data's classes and image size, which must agree. For
    a model of your own, the build options ``{"options", "convert"}`` with the data's image
    size as ``convert.input_size`` (its classifier is its own: see :func:`check_outputs`)."""
    if ":" in config.model.name:
        settings = dict(config.model.convert)
        if settings.setdefault("input_size", image_size) not in (None, image_size):
            raise ConfigError(f"model.convert.input_size = {settings['input_size']!r} but the data "
                              f"{config.data.name!r} has {image_size}; drop the setting or fix the data")
        settings["input_size"] = image_size
        return {"options": dict(config.model.options), "convert": settings}
    options = dict(config.model.options)
    for key, value in (("num_classes", num_classes), ("input_size", image_size)):
        if options.setdefault(key, value) != value:
            raise ConfigError(f"model.options.{key} = {options[key]!r} but the data {config.data.name!r} "
                              f"has {value}; drop the option or fix the data")
    return options


def build_supernet(config: Config, options: dict, device: Union[str, torch.device],
                   dtype: Optional[torch.dtype] = None) -> models.Supernet:
    """The supernet of ``config.model`` for the strategy, with the build ``options``."""
    return models.build(config.model.name, sharing=strategies.supernet_sharing(config.sharing.strategy),
                        device=device, dtype=dtype, **options)


def _checked_build(config: Config, options: dict) -> models.Supernet:
    """:func:`build_supernet` on the meta device; a user model that cannot be imported, called
    or converted is a :class:`ConfigError` naming ``model.name``."""
    try:
        return build_supernet(config, options, "meta")
    except (TypeError, ValueError) as error:
        if ":" not in config.model.name:  # a registered space's options were checked with the config
            raise
        given = f" with model.convert = {config.model.convert}" if config.model.convert else ""
        raise ConfigError(f"model.name = {config.model.name!r}{given}: {error}") from None


def check_outputs(net: models.Supernet, num_classes: int, image_size: int, what: str) -> None:
    """``net`` (``what`` names it in messages) must read the data's images and return one
    logit per class: ``[N, num_classes]`` (a meta net runs on the meta device: no compute)."""
    if net.input_size != image_size:
        raise ConfigError(f"{what} counts its MACs at input size {net.input_size}, but the data's images are "
                          f"{image_size}×{image_size}: build or convert it at the data's size")
    parameter = next(net.parameters(), None)
    device = parameter.device if parameter is not None else torch.device("cpu")
    training = net.training
    try:
        net.eval()
        with torch.no_grad():
            out = net(torch.zeros(1, net.in_channels, image_size, image_size, device=device))
    finally:
        net.train(training)
    if not isinstance(out, torch.Tensor) or out.dim() != 2 or out.shape[1] != num_classes:
        got = f"shape {list(out.shape)}" if isinstance(out, torch.Tensor) else f"a {type(out).__name__}"
        raise ConfigError(f"{what} returns {got} for one image, but the data has {num_classes} classes: expected "
                          f"logits of shape [N, {num_classes}] (give the model a classifier with {num_classes} "
                          f"outputs)")


def check_target(config: Config, net: models.Supernet) -> None:
    """The FLOPs target must be reachable: at least the smallest arch's MACs."""
    target, smallest = config.reward.flops_target, net.flops(net.min_arch())
    if target is not None and target < smallest:
        raise ConfigError(f"reward.flops_target = {target:.4g} MACs is below the smallest arch of "
                          f"{net.name} ({smallest:.4g} MACs): no arch can meet it")


def adopt(config: Config, net: models.Supernet) -> Config:
    """A copy of ``config`` whose ``model`` section describes ``net``, a supernet passed to
    ``search(model=...)``: its name and options, so that ``config.yaml`` says what was searched
    and a resume with another supernet is refused. A registered space or a factory's model
    (:func:`apsfast.models.build`) can be rebuilt from the run's folder; one converted in
    Python (``converted:…``) only by passing it again."""
    if not isinstance(net, models.Supernet):
        raise TypeError(f"model must be a supernet (apsfast.convert(...), apsfast.models.build(...)), got "
                        f"{type(net).__name__}")
    options = dict(net.options)
    sharing, wanted = options.pop("sharing", None), strategies.supernet_sharing(config.sharing.strategy)
    if sharing is not None and sharing != wanted:
        raise ConfigError(f"the supernet passed as model has sharing={sharing!r}, but sharing.strategy = "
                          f"{config.sharing.strategy!r} needs sharing={wanted!r}: build or convert it with that")
    if net.name.startswith(CONVERTED):
        size = net.input_size if isinstance(net.input_size, int) else list(net.input_size)
        model = {"name": net.name, "options": {}, "convert": {**options, "input_size": size}}
    elif is_factory(net.name):
        model = {"name": net.name, "options": options.get("options", {}), "convert": options.get("convert", {})}
    elif net.name in models.available():
        model = {"name": net.name, "options": options, "convert": {}}
    else:
        raise ConfigError(f"the supernet passed as model is named {net.name!r}: neither apsfast.convert's, a factory's "
                          f"(package.module:factory) nor a registered model ({', '.join(models.available())}); "
                          f"register its builder with apsfast.models.register to search it")
    # Validated, and equal to the config the run's folder gives back.
    return config_from_dict({**config.to_dict(), "model": model})


def check(config: Config, *, search: bool = True, with_data: bool = True,
          model: Optional[models.Supernet] = None) -> Optional[Plan]:
    """Load the data and check the settings against it and the model (built on the meta
    device: no memory; a user model's factory is imported, called and converted); returns the
    plan a run starts from. ``search=False`` checks what a retrain needs only;
    ``with_data=False`` checks the model settings alone (no data to read; a user model only
    when ``model.convert.input_size`` is set). ``model``: the supernet to search instead of
    building one (its ``config`` from :func:`adopt`)."""
    if not with_data:
        if model is not None:
            check_target(config, model)
        elif ":" not in config.model.name:
            check_target(config, _checked_build(config, dict(config.model.options)))
        elif config.model.convert.get("input_size") is not None:
            check_target(config, _checked_build(config, {"options": dict(config.model.options),
                                                         "convert": dict(config.model.convert)}))
        elif not config.model.name.startswith(CONVERTED):
            try:  # without an image size to convert at, the factory is only imported
                load_factory(config.model.name)
            except ValueError as error:
                raise ConfigError(f"model.name = {config.model.name!r}: {error}") from None
        return None
    train, test = load_data(config)
    options = {} if model is not None else model_options(config, train.num_classes, train.image_size)
    net = model
    if net is None and (search or is_factory(config.model.name)):  # a retrain builds a factory's only
        net = _checked_build(config, options)
    if model is not None or is_factory(config.model.name):
        what = "the supernet passed as model" if model is not None else f"model.name = {config.model.name!r}"
        check_outputs(net, train.num_classes, train.image_size, what)
    if search:
        check_target(config, net)
        half = min(round(len(train) * (1 - config.data.val_fraction)), len(train) - 1)
        if min(half, len(train) - half) < config.train.batch_size:
            raise ConfigError(f"train.batch_size = {config.train.batch_size} exceeds a part of the train split "
                              f"({half} / {len(train) - half} images for the weights / the controller)")
    elif len(train) < config.retrain.batch_size:
        raise ConfigError(f"retrain.batch_size = {config.retrain.batch_size} exceeds the train split "
                          f"({len(train)} images)")
    return Plan(train, test, options)
