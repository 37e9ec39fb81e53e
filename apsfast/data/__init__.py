"""Image data for the search and the retrain: one interface, three sources, nothing downloaded.

* ``embedded`` — generated 16×16 images (:func:`embedded`), the default: nothing to pass;
* ``cifar10`` — CIFAR-10 from ``cifar-10-batches-py`` (:func:`cifar10`);
* ``imagenet`` — an ImageFolder tree with ``train/`` and ``val/`` (:func:`image_folder`).

>>> train, test = apsfast.data.load("embedded")
>>> weights, val = apsfast.data.split(train, 0.5, seed=0)
>>> for x, y in weights.batches(128, seed=0, epoch=0, augment=True, drop_last=True): ...
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional, Union

from apsfast.data.base import ImageSet, TensorImageSet, split
from apsfast.data.cifar import cifar10
from apsfast.data.shapes import embedded
from apsfast.data.folder import FolderImageSet, discover
from apsfast.data.prefetch import prefetch

DATASETS = ("embedded", "cifar10", "imagenet")

_ROOT_HINTS = {"cifar10": "the folder holding cifar-10-batches-py",
               "imagenet": "the folder holding train/ and val/ with one folder per class"}
# num_workers is accepted by every set so callers can pass it unconditionally; only the
# folder set has loader processes (the in-memory sets batch on tensors in this process).
_OPTIONS = {"embedded": ("num_train", "num_test", "num_classes", "num_workers"), "cifar10": ("num_workers",),
            "imagenet": ("num_workers",)}


def image_folder(root: Union[str, os.PathLike], *, image_size: int = 224,
                 num_workers: Optional[int] = None) -> tuple[FolderImageSet, FolderImageSet]:
    """The train and validation sets of an ImageNet-style tree: ``root/train/<class>/<image>``
    and ``root/val/<class>/<image>`` with the same classes.

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
    options = dict(image_size=image_size, num_workers=num_workers)
    return (FolderImageSet(train_samples, train_classes, **options),
            FolderImageSet(val_samples, val_classes, **options))


def load(name: str, root: Optional[Union[str, os.PathLike]] = None, *, image_size: Optional[int] = None,
         seed: int = 0, **options: Any) -> tuple[ImageSet, ImageSet]:
    """The ``(train, test)`` sets of data set ``name`` (one of :data:`DATASETS`).

    Args:
        name: ``"embedded"`` (generated; ``root`` is ignored), ``"cifar10"`` or ``"imagenet"``
            (``root`` required: nothing is downloaded).
        root: the folder of the files.
        image_size: the side of the images (default: the set's own, 16 / 32 / 224); CIFAR-10
            is 32 only.
        seed: the embedded set's generation seed (the others are files).
        options: ``num_train``, ``num_test``, ``num_classes`` for ``embedded``;
            ``num_workers`` (loader processes) for ``imagenet``, accepted and unused by the others.
    """
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
    return image_folder(root, image_size=224 if image_size is None else image_size, num_workers=num_workers)


__all__ = ["DATASETS", "FolderImageSet", "ImageSet", "TensorImageSet", "cifar10", "embedded", "image_folder", "load",
           "prefetch", "split"]
