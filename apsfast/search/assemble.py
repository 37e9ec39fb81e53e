"""What a run is made of, from its settings: the data, the supernet and their agreement.

:func:`check` runs every check that can fail before a run creates its folder (and is what
``apsfast search --print-config`` runs too): the data load, the model options against the
data, the FLOPs target against the smallest arch, the batch size against the splits.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

import torch

from apsfast import data as datasets
from apsfast import models
from apsfast.search import strategies
from apsfast.search.config import Config, ConfigError


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
    """``config.model.options`` with the data's classes and image size, which must agree."""
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


def check_target(config: Config, options: dict) -> None:
    """The FLOPs target must be reachable: at least the smallest arch's MACs."""
    net = build_supernet(config, options, "meta")
    target, smallest = config.reward.flops_target, net.flops(net.min_arch())
    if target is not None and target < smallest:
        raise ConfigError(f"reward.flops_target = {target:.4g} MACs is below the smallest arch of "
                          f"{net.name} ({smallest:.4g} MACs): no arch can meet it")


def check(config: Config, *, search: bool = True, with_data: bool = True) -> Optional[Plan]:
    """Load the data and check the settings against it and the model (built on the meta
    device: no memory); returns the plan a run starts from. ``search=False`` checks what a
    retrain needs only; ``with_data=False`` checks the model settings alone (no data to read)."""
    if not with_data:
        check_target(config, dict(config.model.options))
        return None
    train, test = load_data(config)
    options = model_options(config, train.num_classes, train.image_size)
    if search:
        check_target(config, options)
        half = min(round(len(train) * (1 - config.data.val_fraction)), len(train) - 1)
        if min(half, len(train) - half) < config.train.batch_size:
            raise ConfigError(f"train.batch_size = {config.train.batch_size} exceeds a part of the train split "
                              f"({half} / {len(train) - half} images for the weights / the controller)")
    elif len(train) < config.retrain.batch_size:
        raise ConfigError(f"retrain.batch_size = {config.retrain.batch_size} exceeds the train split "
                          f"({len(train)} images)")
    return Plan(train, test, options)
