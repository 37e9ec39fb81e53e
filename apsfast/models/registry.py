"""The named search spaces, user models named by their factory, and the one entry point that
builds them all (:func:`build`): every run rebuilds its supernet through it, by the name and
options its folder records."""
from __future__ import annotations

import contextlib
import importlib
import inspect
import sys
from typing import Any, Callable, Mapping, Optional

import torch
from torch import nn

from apsfast.models import zoo
from apsfast.models.base import Supernet

_BUILDERS: dict[str, Callable[..., Supernet]] = {}
#: How :func:`apsfast.convert` names its supernets (``converted:<class name>``): made in Python
#: from a model object, they cannot be rebuilt by name.
CONVERTED = "converted:"
#: The options of :func:`apsfast.convert` a user model's ``convert`` settings may give, with
#: ``input_size`` (the side of the example input, or its ``[H, W]``) and ``in_channels`` (its
#: channels, default 3): the example input is ``[1, in_channels, H, W]``.
CONVERT_OPTIONS = ("widths", "round_to", "exclude", "meta_width", "input_size", "in_channels")
#: The build options of a user model (:func:`build_factory`).
FACTORY_OPTIONS = ("options", "convert", "sharing")
def register(name: str) -> Callable[[Callable[..., Supernet]], Callable[..., Supernet]]:
    """Register a supernet builder under ``name``; its keyword arguments are its options."""
    def add(builder: Callable[..., Supernet]) -> Callable[..., Supernet]:
        if name in _BUILDERS:
            raise ValueError(f"a model named {name!r} is already registered")
        _BUILDERS[name] = builder
        return builder
    return add


def available() -> list[str]:
    """The names :func:`build` accepts."""
    return sorted(_BUILDERS)


def options_of(name: str) -> dict[str, Any]:
    """The options of model ``name`` with their defaults."""
    return {p.name: p.default for p in inspect.signature(_builder(name)).parameters.values()
            if p.name not in ("device", "dtype")}


def _builder(name: str) -> Callable[..., Supernet]:
    if name not in _BUILDERS:
        raise ValueError(f"unknown model {name!r}; available: {', '.join(available())}")
    return _BUILDERS[name]


def build(name: str, *, device=None, dtype=None, **options: Any) -> Supernet:
    """Build the supernet ``name`` (see :func:`available`) with ``options`` (see each builder),
    or the user model ``name = "package.module:factory"`` (see :func:`build_factory`).

    Unknown options are an error naming the valid ones. ``device``/``dtype`` place the
    parameters (``device="meta"`` builds without memory, to count parameters or FLOPs). The
    options, defaults filled in, are recorded in ``supernet.options``: ``build(net.name,
    **net.options)`` builds the same supernet again. A supernet made by :func:`apsfast.convert`
    in Python (named ``converted:…``) is refused: only its object can be searched again.
    """
    if name.startswith(CONVERTED):
        raise ValueError(
            f"model {name!r} was made by apsfast.convert from a model object and cannot be rebuilt by name: pass "
            f"the same supernet again (search(config, out, resume=True, model=net), retrain(RUN, model=net)), or "
            f"search a factory (model.name = package.module:factory) so that the run folder can rebuild it")
    if is_factory(name):
        unknown = sorted(set(options) - set(FACTORY_OPTIONS))
        if unknown:
            section = "convert" if unknown[0] in CONVERT_OPTIONS else "options"
            raise TypeError(f"unknown option(s) {unknown} for model {name!r}: a model of your own takes options "
                            f"(the factory's keyword arguments) and convert (apsfast.convert's settings: "
                            f"{', '.join(CONVERT_OPTIONS)}), e.g. -o '{section}={{\"{unknown[0]}\": ...}}'")
        return build_factory(name, device=device, dtype=dtype, **options)
    chosen = {**options_of(name), **options}
    unknown = sorted(set(options) - set(options_of(name)))
    if unknown:
        raise TypeError(f"unknown option(s) {unknown} for model {name!r}; its options are "
                        f"{sorted(options_of(name))}")
    supernet = _builder(name)(**options, device=device, dtype=dtype)
    supernet.options = {key: _plain(value) for key, value in chosen.items()}
    return supernet


def _plain(value: Any) -> Any:
    """``value`` with tuples as lists and mappings as dicts, for JSON."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def is_factory(name: str) -> bool:
    """Whether ``name`` names a user model by its factory, ``package.module:factory``."""
    return ":" in name and not name.startswith(CONVERTED)


def check_factory_name(name: str, kind: str = "model", returns: str = "a torch.nn.Module") -> tuple[str, str]:
    """``(module, attribute path)`` of ``"package.module:factory"``, checked without importing
    (``kind`` and ``returns`` say in messages what the factory makes: a model, or data sets).

    A run's folder names the factory its ``--resume`` and ``apsfast train`` call, so a folder
    is trusted like a script; the standard library and ``torch.hub`` (which fetches code) hold
    no model factory but callables that run commands or code, and are refused by name.
    """
    module, _, attribute = name.partition(":")
    if not all(part.isidentifier() for part in module.split(".")) or \
            not all(part.isidentifier() for part in attribute.split(".")):
        raise ValueError(f"{name!r} is not a {kind} factory: expected package.module:factory (a module Python can "
                         f"import and a callable in it returning {returns})")
    if module.split(".")[0] in sys.stdlib_module_names or module == "torch.hub" or module.startswith("torch.hub."):
        raise ValueError(f"{name!r} is not a {kind} factory: module {module!r} is part of Python's standard library "
                         f"or torch.hub; expected package.module:factory in your own code or an installed package")
    return module, attribute


def load_factory(name: str, kind: str = "model", returns: str = "a torch.nn.Module") -> Callable[..., Any]:
    """The callable ``"package.module:factory"`` names, imported from ``sys.path`` (installed
    packages, ``PYTHONPATH``, the folder of a script run with ``python``); ``kind`` and
    ``returns`` as for :func:`check_factory_name`."""
    module_name, attribute = check_factory_name(name, kind, returns)
    try:
        if module_name.split(".")[0] in ("torchvision", "timm"):  # where torchvision's compiled ops do not load
            zoo.import_timm() if module_name.split(".")[0] == "timm" else zoo.import_torchvision()
        found: Any = importlib.import_module(module_name)
    except ImportError as error:
        raise ValueError(f"cannot import module {module_name!r} of the {kind} factory {name!r} ({error}); expected "
                         f"package.module:factory importable from sys.path (e.g. run from its folder with "
                         f"PYTHONPATH=.)") from None
    for part in attribute.split("."):
        if not hasattr(found, part):
            raise ValueError(f"module {module_name!r} has no {attribute!r}: expected package.module:factory "
                             f"naming a callable that returns {returns}")
        found = getattr(found, part)
    if not callable(found):
        raise ValueError(f"{name!r} is not callable (a {type(found).__name__} object): expected a factory (a "
                         f"function or class) that returns {returns}")
    return found


def build_factory(name: str, *, options: Optional[Mapping[str, Any]] = None,
                  convert: Optional[Mapping[str, Any]] = None, sharing: str = "transitional",
                  device=None, dtype=None) -> Supernet:
    """The supernet of a user model: ``factory(**options)`` converted by :func:`apsfast.convert`.

    Args:
        name: ``"package.module:factory"``; the factory is called with ``options`` as keyword
            arguments and must return an ``nn.Module`` (a CNN taking ``[N, C, H, W]``).
        convert: :func:`apsfast.convert`'s ``widths``, ``round_to``, ``exclude``,
            ``meta_width``; ``input_size`` (required): the side ``S`` of the example input
            ``[1, C, S, S]``, or its ``[H, W]``; ``in_channels``: its ``C`` (default 3).
        sharing, device, dtype: as for the registered spaces. The model is built and traced on
            the CPU, then moved (on the meta device: without touching the global RNG).

    Returns:
        A :class:`~apsfast.models.converter.ConvertedSupernet` named ``name`` whose ``options``
        (``{"options", "convert", "sharing"}``, defaults filled in) rebuild it.

    Raises:
        ValueError, TypeError: the factory cannot be imported or called with ``options``, does
            not return an ``nn.Module``, or convert refuses the model (naming what to change).
    """
    from apsfast.models.converter import convert as convert_model

    settings = dict(convert or {})
    unknown = sorted(set(settings) - set(CONVERT_OPTIONS))
    if unknown:
        raise TypeError(f"unknown convert setting(s) {unknown} for model {name!r}; the settings are "
                        f"{list(CONVERT_OPTIONS)}")
    size, channels = settings.pop("input_size", None), settings.pop("in_channels", 3)
    hw = check_input_size(size, f"the convert setting input_size of model {name!r}", name)
    if isinstance(channels, bool) or not isinstance(channels, int) or channels < 1:
        raise ValueError(f"the convert setting in_channels of model {name!r} must be an int > 0, got {channels!r}")
    if options is not None and not isinstance(options, Mapping):
        raise TypeError(f"the options of model {name!r} must be a mapping of the factory's keyword arguments, "
                        f"got {options!r}")
    options = dict(options or {})
    factory = load_factory(name)
    # A meta build only counts: it must not move the global RNG a run is seeded with.
    keep_rng = torch.random.fork_rng(devices=[]) if str(device) == "meta" else contextlib.nullcontext()
    with keep_rng:
        try:
            model = factory(**options)
        except TypeError as error:  # the options do not fit the factory's signature
            raise TypeError(f"calling the model factory {name!r} with options {options} failed: {error}") from None
        if not isinstance(model, nn.Module):
            raise TypeError(f"the model factory {name!r} returned a {type(model).__name__}; expected a "
                            f"torch.nn.Module")
        net = convert_model(model, torch.zeros(1, channels, *hw), sharing=sharing, **settings)
    net.name = name
    net.options = {"options": _plain(options),
                   "convert": {**{key: net.options[key] for key in CONVERT_OPTIONS if key in net.options},
                               "input_size": _plain(size), **({"in_channels": channels} if channels != 3 else {})},
                   "sharing": sharing}
    if device is not None or dtype is not None:
        net.to(device=device, dtype=dtype)
    return net


def check_input_size(size: object, what: str, name: str = "NAME") -> tuple[int, int]:
    """``(H, W)`` of a convert ``input_size``: an int ``S`` (``S × S``) or ``[H, W]``, ints > 0;
    ``what`` names it in the message, ``name`` the model in its example."""
    hw = [size, size] if isinstance(size, int) and not isinstance(size, bool) else size
    if not isinstance(hw, (list, tuple)) or len(hw) != 2 \
            or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in hw):
        raise ValueError(f"{what} must be the side of the images the model reads (an int > 0) or their [H, W], "
                         f"got {size!r} (e.g. apsfast models {name} -o 'convert={{\"input_size\": 32}}'; a search sets "
                         f"it from its data)")
    return int(hw[0]), int(hw[1])
