"""What a run is made of, from its settings: the data, the supernet and their agreement.

:func:`check` runs every check that can fail before a run creates its folder (and is what
``apsfast search --print-config`` runs too): the data load (a data factory imported and
called), the model options against the data (a user model's factory imported, called and
converted), its outputs against the classes, the FLOPs target against the smallest arch, the
batch size against the splits. :func:`adopt` describes a supernet passed to
``search(model=...)`` in the run's settings, :func:`adopt_data` data sets passed to it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Union

import torch
from torch.utils.data import DataLoader

from apsfast import data as datasets
from apsfast import models
from apsfast.models.registry import CONVERTED, is_factory, load_factory
from apsfast.search import strategies
from apsfast.search.config import Config, ConfigError
from apsfast.search.portable import input_shape_of
from apsfast.search.settings import config_from_dict


@dataclass
class Plan:
    """A run's data (``train``: the whole train split, ``test``) and the supernet's build
    options, checked against each other."""

    train: datasets.ImageSet
    test: Optional[datasets.ImageSet]  # None: a search given no held-out set in Python
    options: dict

    @property
    def num_classes(self) -> int:
        return self.train.num_classes

    @property
    def image_size(self) -> Union[int, tuple[int, int]]:
        return self.train.image_size


Sets = tuple[datasets.ImageSet, Optional[datasets.ImageSet]]


def as_set(data: Any, what: str, workers: Optional[int], num_classes: Optional[int] = None) -> datasets.ImageSet:
    """``data`` (``what`` names it in messages) as a set a run reads: a map-style ``Dataset``
    wrapped in a :class:`~apsfast.data.DatasetImageSet` with ``workers`` loader processes (and
    ``num_classes``: a held-out set takes the training set's), or an
    :class:`~apsfast.data.ImageSet` as it is."""
    if isinstance(data, datasets.ImageSet):
        return data
    if isinstance(data, DataLoader):
        raise ConfigError(f"{what} is a DataLoader: pass its dataset, and its batching as "
                          f"apsfast.data.DatasetImageSet(dataset, loader=lambda dataset, batch_size: DataLoader(dataset, "
                          f"batch_size, collate_fn=...)): the run orders and resumes the samples itself")
    try:
        return datasets.DatasetImageSet(data, num_classes=num_classes, num_workers=workers or 0)
    except (TypeError, ValueError) as error:
        raise ConfigError(f"{what}: {error}") from None


def _paired(train: datasets.ImageSet, val: Optional[datasets.ImageSet], names: tuple[str, str]) -> Sets:
    """``(train, val)`` after checking that they agree: classes and input shape."""
    if val is not None:
        for key in ("num_classes", "input_shape"):
            if getattr(train, key) != getattr(val, key):
                raise ConfigError(f"{names[1]} has {key} {getattr(val, key)}, {names[0]} {getattr(train, key)}: the "
                                  f"held-out set must have the classes and input shape of the training set")
    return train, val


def adopt_data(config: Config, train_data: Any, val_data: Any = None) -> tuple[Config, Sets]:
    """Data sets passed to ``search(train_data=..., val_data=...)`` (or ``retrain``) as sets, and
    a copy of ``config`` whose ``data`` section describes them: ``name: python:<class>`` and
    ``options`` with their sizes, classes and input shape (so that a resume with other data is
    refused). Such a run cannot load its data by name: it is passed again."""
    train = as_set(train_data, "train_data", config.data.workers)
    sets = _paired(train, None if val_data is None else
                   as_set(val_data, "val_data", config.data.workers, train.num_classes), ("train_data", "val_data"))
    name = datasets.PYTHON + type(getattr(sets[0], "dataset", sets[0])).__name__
    options = {"num_classes": sets[0].num_classes, "input_shape": list(sets[0].input_shape), "train": len(sets[0])}
    data = {**config.to_dict()["data"], "name": name, "root": None, "image_size": None, "options": options}
    return config_from_dict({**config.to_dict(), "data": data}), sets


def given_data(config: Config, train_data: Any, val_data: Any) -> tuple[Config, Optional[Sets]]:
    """:func:`adopt_data` of data sets passed in Python, or ``(config, None)`` where none are."""
    if train_data is None:
        if val_data is not None:
            raise ConfigError("val_data was given without train_data: pass both, or neither (config.data is read)")
        return config, None
    return adopt_data(config, train_data, val_data)


def load_data(config: Config, given: Optional[Sets] = None) -> Sets:
    """The ``(train, test)`` sets of ``config.data`` (or ``given``: sets passed in Python); a
    wrong setting is a :class:`ConfigError`."""
    if given is not None:
        return given
    data = config.data
    if data.name.startswith(datasets.PYTHON):
        raise ConfigError(f"data.name = {data.name!r}: the run was given its data sets in Python, which cannot be "
                          f"loaded by name: pass them again (search(config, RUN, resume=True, train_data=...), "
                          f"retrain(RUN, train_data=..., val_data=...)), or name a factory (data.name = "
                          f"package.module:factory) so that the run's folder loads them")
    if ":" in data.name:
        return _factory_data(config)
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


def _factory_data(config: Config) -> Sets:
    """The sets a data factory returns: ``factory(**data.options)`` (and ``root=data.root``
    when it is set) must return the ``(train, val)`` pair."""
    data = config.data
    factory = load_factory(data.name, "data", datasets.FACTORY_RETURNS)
    kwargs = {**data.options, **({"root": data.root} if data.root is not None else {})}
    try:
        made = factory(**kwargs)
    except TypeError as error:  # the options do not fit the factory's signature
        raise ConfigError(f"data.name = {data.name!r}: calling it with {kwargs} failed: {error}") from None
    if not isinstance(made, (tuple, list)) or len(made) != 2:
        raise ConfigError(f"data.name = {data.name!r} returned a {type(made).__name__}; expected "
                          f"{datasets.FACTORY_RETURNS}")
    what = (f"the train set of {data.name!r}", f"the val set of {data.name!r}")
    train = as_set(made[0], what[0], data.workers)
    return _paired(train, as_set(made[1], what[1], data.workers, train.num_classes), what)


def model_options(config: Config, num_classes: int, image_size: Union[int, tuple[int, int]],
                  input_shape: tuple[int, ...] = (3,)) -> dict:
    """``config.model.options`` with the data's classes and image size, which must agree. For
    a model of your own, the build options ``{"options", "convert"}`` with the data's image
    size as ``convert.input_size`` (``[H, W]`` where not square) and its channels as
    ``convert.in_channels`` where not 3 (its classifier is its own: see :func:`check_outputs`)."""
    size = image_size if isinstance(image_size, int) else list(image_size)
    if ":" in config.model.name:
        settings = dict(config.model.convert)
        for key, value in (("input_size", size), ("in_channels", input_shape[0])):
            if settings.get(key) not in (None, value):
                raise ConfigError(f"model.convert.{key} = {settings[key]!r} but the data {config.data.name!r} has "
                                  f"{value}; drop the setting or fix the data")
        settings["input_size"] = size
        if input_shape[0] != 3:
            settings["in_channels"] = input_shape[0]
        return {"options": dict(config.model.options), "convert": settings}
    if tuple(input_shape) != (3, size, size):
        raise ConfigError(f"model.name = {config.model.name!r} reads square RGB images, [3, S, S]; the data "
                          f"{config.data.name!r} gives inputs of {list(input_shape)}: search a model of your own "
                          f"(--model package.module:factory) that reads them")
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


def check_outputs(net: models.Supernet, num_classes: int, input_shape: tuple[int, ...], what: str) -> None:
    """``net`` (``what`` names it in messages) must read the data's inputs (``input_shape``,
    ``[C, H, W]``) and return one logit per class: ``[N, num_classes]`` (a meta net runs on the
    meta device: no compute)."""
    shape = input_shape_of(net)
    if shape != list(input_shape):
        raise ConfigError(f"{what} counts its MACs at inputs [C, H, W] = {shape}, but the data's are "
                          f"{list(input_shape)}: build or convert it at the data's shape")
    parameter = next(net.parameters(), None)
    device = parameter.device if parameter is not None else torch.device("cpu")
    training = net.training
    try:
        net.eval()
        with torch.no_grad():
            out = net(torch.zeros(1, *input_shape, device=device))
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
          model: Optional[models.Supernet] = None, data: Optional[Sets] = None) -> Optional[Plan]:
    """Load the data and check the settings against it and the model (built on the meta
    device: no memory; a user model's factory is imported, called and converted); returns the
    plan a run starts from. ``search=False`` checks what a retrain needs only;
    ``with_data=False`` checks the model settings alone (no data to read; a user model only
    when ``model.convert.input_size`` is set). ``model``: the supernet to search instead of
    building one (its ``config`` from :func:`adopt`); ``data``: the sets to read instead of
    loading ``config.data`` (its ``config`` from :func:`adopt_data`)."""
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
    train, test = load_data(config, data)
    if test is None and not search:
        raise ConfigError("a retrain needs the held-out set to score on: pass val_data")
    options = {} if model is not None else model_options(config, train.num_classes, train.image_size,
                                                         train.input_shape)
    net = model
    if net is None and (search or is_factory(config.model.name)):  # a retrain builds a factory's only
        net = _checked_build(config, options)
    if model is not None or is_factory(config.model.name):
        what = "the supernet passed as model" if model is not None else f"model.name = {config.model.name!r}"
        check_outputs(net, train.num_classes, train.input_shape, what)
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
