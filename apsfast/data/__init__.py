"""Image data for the search and the retrain: one interface, three sources, nothing downloaded,
and any map-style ``torch.utils.data.Dataset`` of yours.

* ``embedded`` — generated 16×16 images (:func:`embedded`), the default: nothing to pass;
* ``cifar10`` — CIFAR-10 from ``cifar-10-batches-py`` (:func:`cifar10`);
* ``folder`` (alias ``imagenet``) — an ImageFolder tree with ``train/`` and ``val/``
  (:func:`image_folder`), e.g. ImageNet;
* your ``Dataset`` of ``(input, label)`` pairs, with its own transform (:class:`DatasetImageSet`).

>>> train, test = apsfast.data.load("embedded")
>>> weights, val = apsfast.data.split(train, 0.5, seed=0)
>>> for x, y in weights.batches(128, seed=0, epoch=0, augment=True, drop_last=True): ...
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional, Union

from apsfast.data.base import ImageSet, TensorImageSet, balanced_subset, split
from apsfast.data.cifar import cifar10
from apsfast.data.dataset import DatasetImageSet
from apsfast.data.shapes import embedded
from apsfast.data.folder import AUGMENTS, IMAGENET_MEAN, IMAGENET_STD, FolderImageSet, discover, image_statistics
from apsfast.data.prefetch import prefetch

DATASETS = ("embedded", "cifar10", "folder")
ALIASES = {"imagenet": "folder"}
#: How a run names data sets passed to it in Python (``python:<class name>``): they cannot be
#: loaded by name, only passed again.
PYTHON = "python:"
#: What a data factory (``data.name = package.module:factory``) returns.
FACTORY_RETURNS = ("the (train, val) pair of data sets: map-style torch.utils.data.Dataset objects or "
                   "apsfast.data.DatasetImageSet")

_ROOT_HINTS = {"cifar10": "the folder holding cifar-10-batches-py",
               "folder": "the folder holding train/ and val/ with one folder per class"}
# num_workers is accepted by every set so callers can pass it unconditionally; only the
# folder set has loader processes (the in-memory sets batch on tensors in this process).
_OPTIONS = {"embedded": ("num_train", "num_test", "num_classes", "num_workers"), "cifar10": ("num_workers",),
            "folder": ("num_workers", "augment", "normalize")}


def image_size_of(samples: list[tuple[str, int]], root: Path, probes: int = 16) -> int:
    """The side of the images of a folder set: the shorter side of a few of its images spread
    over the set (headers only), which must agree; else ask for ``data.image_size``."""
    from PIL import Image
    picked = samples[::max(1, len(samples) // probes)][:probes]
    sizes = set()
    for path, _ in picked:
        with Image.open(path) as image:
            sizes.add(image.size)
    sides = {min(size) for size in sizes}
    if len(sides) != 1:
        shown = ", ".join(f"{w}x{h}" for w, h in sorted(sizes)[:4])
        raise ValueError(f"the images under {str(root)!r} have different sizes ({shown}): set data.image_size to "
                         f"the side the network should see (e.g. 224)")
    return sides.pop()


NORMALIZE = ("auto", "data", "imagenet")


def image_folder(root: Union[str, os.PathLike], *, image_size: Optional[int] = None,
                 num_workers: Optional[int] = None, augment: str = "auto",
                 normalize: str = "auto") -> tuple[FolderImageSet, FolderImageSet]:
    """The train and validation sets of an ImageNet-style tree: ``root/train/<class>/<image>``
    and ``root/val/<class>/<image>`` with the same classes. Without ``image_size`` the side
    is read from the images (which must then share it). ``augment`` picks the training
    transform (see :class:`FolderImageSet`); ``normalize``: ``imagenet`` (ImageNet's
    statistics), ``data`` (the set's own, from up to 256 training images), or ``auto``
    (ImageNet's for images above 64 px, the set's own for smaller ones).

    Raises ``FileNotFoundError`` for a missing folder and ``ValueError`` for a folder without
    images or class folders that differ between ``train`` and ``val``.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder root {str(root)!r} does not exist; expected a folder with "
                                f"train/ and val/, each with one folder of images per class")
    train_classes, train_samples = discover(root / "train")
    val_classes, val_samples = discover(root / "val")
    if train_classes != val_classes:
        missing, extra = sorted(set(train_classes) - set(val_classes)), sorted(set(val_classes) - set(train_classes))
        raise ValueError(f"the classes of {str(root / 'val')!r} must equal those of {str(root / 'train')!r}: "
                         f"val lacks {missing}, val has extra {extra}")
    if image_size is None:
        image_size = image_size_of(train_samples, root)
    if normalize not in NORMALIZE:
        raise ValueError(f"normalize must be one of {', '.join(NORMALIZE)}, got {normalize!r}")
    if normalize == "data" or (normalize == "auto" and image_size <= 64):
        mean, std = image_statistics(train_samples, image_size)
    else:
        mean, std = IMAGENET_MEAN, IMAGENET_STD
    options = dict(image_size=image_size, num_workers=num_workers, augment=augment, mean=mean, std=std)
    return (FolderImageSet(train_samples, train_classes, **options),
            FolderImageSet(val_samples, val_classes, **options))


def load(name: str, root: Optional[Union[str, os.PathLike]] = None, *, image_size: Optional[int] = None,
         seed: int = 0, **options: Any) -> tuple[ImageSet, ImageSet]:
    """The ``(train, test)`` sets of data set ``name`` (one of :data:`DATASETS`).

    Args:
        name: ``"embedded"`` (generated; ``root`` is ignored), ``"cifar10"`` or ``"folder"``
            (alias ``"imagenet"``; ``root`` required: nothing is downloaded).
        root: the folder of the files.
        image_size: the side of the images (default: the set's own: 16, 32, or read from a
            folder's images); CIFAR-10 is 32 only.
        seed: the embedded set's generation seed (the others are files).
        options: ``num_train``, ``num_test``, ``num_classes`` for ``embedded``;
            ``num_workers`` (loader processes), ``augment`` and ``normalize`` for ``folder``
            (``num_workers`` is accepted and unused by the others).
    """
    name = ALIASES.get(name, name)
    if name not in DATASETS:
        raise ValueError(f"unknown data set {name!r}; the data sets are {', '.join(DATASETS)}")
    unknown = sorted(set(options) - set(_OPTIONS[name]))
    if unknown:
        raise TypeError(f"unknown option(s) {unknown} for data set {name!r}; its options are "
                        f"{list(_OPTIONS[name]) or 'none'}")
    num_workers = options.pop("num_workers", None)
    if name == "embedded":
        return embedded(seed=seed, **({} if image_size is None else {"image_size": image_size}), **options)
    if root is None:
        raise ValueError(f"dataset {name!r} needs data.root: {_ROOT_HINTS[name]} (nothing is downloaded)")
    if name == "cifar10":
        if image_size not in (None, 32):
            raise ValueError(f"image_size for 'cifar10' must be 32 or None (its images are 32×32), got {image_size!r}")
        return cifar10(root)
    return image_folder(root, image_size=image_size, num_workers=num_workers, **options)


__all__ = ["ALIASES", "AUGMENTS", "DATASETS", "FACTORY_RETURNS", "PYTHON", "IMAGENET_MEAN", "IMAGENET_STD", "NORMALIZE", "DatasetImageSet",
           "FolderImageSet", "ImageSet", "TensorImageSet", "balanced_subset", "cifar10", "embedded", "image_folder", "load",
           "prefetch", "split"]
