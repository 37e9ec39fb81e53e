"""A map-style ``torch.utils.data.Dataset`` of your own as a set the search and the retrain read.

:class:`DatasetImageSet` keeps the contract of every :class:`~apsfast.data.ImageSet`: batches
depend only on ``(seed, epoch)`` and the position in the epoch. The order is drawn from
``(seed, epoch)`` (a random permutation, or your ``sampler``), and each sample is read with
the global random generators (torch, ``random``, NumPy) seeded by ``(seed, epoch, position)``,
so a random transform pipeline (torchvision's, or your own) gives the same batches for any
number of loader processes and after a resume, and the run's own random streams stay untouched.
"""
from __future__ import annotations

import contextlib
import random
from typing import Any, Callable, Iterator, Optional, Sequence

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, SequentialSampler

from apsfast import _checks
from apsfast.data.base import SAMPLE_STREAM, Batch, ImageSet, Indices, check_indices, derive_seed, generator

#: ``loader(dataset, batch_size) -> DataLoader``: your collation, loader processes, pinning.
LoaderFactory = Callable[[Dataset, int], DataLoader]
#: ``sampler(labels, generator) -> indices``: an epoch's order of the samples (``labels``: theirs).
SamplerFunction = Callable[[Tensor, torch.Generator], Indices]


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """The global torch (CPU), ``random`` and NumPy generators seeded by ``seed`` inside,
    restored after (``torch.manual_seed`` would also reseed every GPU's generator, which the
    run draws from)."""
    states = torch.get_rng_state(), random.getstate(), np.random.get_state()
    torch.default_generator.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed & 0xFFFFFFFF)
    try:
        yield
    finally:
        torch.set_rng_state(states[0])
        random.setstate(states[1])
        np.random.set_state(states[2])


class _Source:
    """The dataset and what is read from it once, shared by a set and its subsets."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset
        self.size = len(dataset)  # type: ignore[arg-type]
        self._labels: Optional[Tensor] = None

    def read(self, index: int, seed: int) -> tuple[Tensor, int]:
        with seeded(seed):
            sample = self.dataset[index]
        if not isinstance(sample, (tuple, list)) or len(sample) != 2:
            raise TypeError(f"dataset[{index}] must be an (input, label) pair, got {type(sample).__name__}")
        return sample[0], int(sample[1])

    def labels(self) -> Tensor:
        """Every sample's label: ``dataset.targets`` where it has one (torchvision's sets do),
        else read sample by sample, once."""
        if self._labels is None:
            targets = getattr(self.dataset, "targets", None)
            if targets is not None and len(targets) == self.size:
                labels = torch.as_tensor(targets, dtype=torch.int64).reshape(-1)
            else:
                labels = torch.tensor([self.read(i, i)[1] for i in range(self.size)], dtype=torch.int64)
            self._labels = labels
        return self._labels


class _Pass(Dataset):
    """Positions ``first..`` of one epoch: item ``i`` is sample ``indices[i]`` read under the
    seed of ``(seed, epoch, first + i)``, checked against the set's input shape."""

    def __init__(self, source: _Source, indices: list[int], *, first: int, seed: int, epoch: int,
                 shape: tuple[int, ...]) -> None:
        self.source, self.indices, self.first, self.seed, self.epoch, self.shape = \
            source, indices, first, seed, epoch, shape

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        index = self.indices[i]
        x, y = self.source.read(index, derive_seed(self.seed, self.epoch, SAMPLE_STREAM, self.first + i))
        if not isinstance(x, Tensor) or tuple(x.shape) != self.shape:
            got = f"shape {list(x.shape)}" if isinstance(x, Tensor) else f"a {type(x).__name__}"
            raise ValueError(f"dataset[{index}] gives an input of {got}, dataset[0] one of {list(self.shape)}: every "
                             f"input must have one shape (resize or crop them to one size in the transform)")
        return x, y


class DatasetImageSet(ImageSet):
    """The ``(input, label)`` samples of a map-style ``torch.utils.data.Dataset``.

    Each input is what ``dataset[i]`` returns after the dataset's own transform: a float
    tensor ``[C, H, W]``, the same shape for every sample (any ``C``; ``H ≠ W`` is fine); each
    label an int in ``0..num_classes-1``. The dataset's transform applies to every batch,
    training and evaluation alike (the ``augment`` flag of :meth:`batches` is not read): pass
    the held-out set with its evaluation transform as a dataset of its own.

    Args:
        dataset: ``len(dataset)`` and ``dataset[i]`` → ``(input, label)``.
        num_classes: default ``len(dataset.classes)`` where it has ``classes`` (torchvision's
            sets do), else the largest label + 1.
        num_workers: loader processes (0, the default: read in this process).
        loader: ``loader(dataset, batch_size)`` returning the ``DataLoader`` that batches one
            pass (your ``collate_fn``, ``num_workers``, ``pin_memory`` …); it must keep the
            order it is given: no ``shuffle``, no sampler of its own (``sampler`` below is the
            resumable way to sample).
        sampler: ``sampler(labels, generator)`` returning an epoch's order: ``len(labels)``
            indices into ``labels`` (the labels of this set's samples), drawn from
            ``generator`` only (seeded by the run per epoch), e.g. class-weighted sampling
            with ``torch.multinomial``. Default: a random permutation.

    The labels (for the class-balanced accuracy subset) come from ``dataset.targets`` where
    it has one, else from reading every sample once.
    """

    def __init__(self, dataset: Dataset, *, num_classes: Optional[int] = None, num_workers: int = 0,
                 loader: Optional[LoaderFactory] = None, sampler: Optional[SamplerFunction] = None) -> None:
        if isinstance(dataset, DataLoader) or not hasattr(dataset, "__getitem__") or not hasattr(dataset, "__len__"):
            raise TypeError(f"dataset must be a map-style torch.utils.data.Dataset (with __len__ and __getitem__), "
                            f"got {type(dataset).__name__}; pass a DataLoader's settings as loader=")
        source = _Source(dataset)
        if source.size == 0:
            raise ValueError("dataset must hold at least one sample, got an empty one")
        for name, value in (("loader", loader), ("sampler", sampler)):
            if value is not None and not callable(value):
                raise TypeError(f"{name} must be callable, got {type(value).__name__}")
        x, _ = source.read(0, 0)
        if not isinstance(x, Tensor) or x.dim() != 3 or not x.is_floating_point():
            got = f"a {x.dtype} tensor of shape {list(x.shape)}" if isinstance(x, Tensor) else f"a {type(x).__name__}"
            raise TypeError(f"dataset[0] must give a float tensor [C, H, W] as its input, got {got}: end the "
                            f"transform with a conversion to a float tensor (and normalisation)")
        classes = getattr(dataset, "classes", None)
        if num_classes is None:
            num_classes = len(classes) if classes is not None else int(source.labels().max()) + 1
        self._init(source, torch.arange(source.size), tuple(x.shape), _checks.positive_int("num_classes", num_classes),
                   _worker_count(num_workers), loader, sampler)

    def _init(self, source: _Source, indices: Tensor, shape: tuple[int, ...], num_classes: int, num_workers: int,
              loader: Optional[LoaderFactory], sampler: Optional[SamplerFunction]) -> None:
        self._source, self._indices, self._shape, self.num_classes = source, indices, shape, num_classes
        self.num_workers, self.loader, self.sampler = num_workers, loader, sampler
        height, width = shape[1:]
        self.image_size: Any = height if height == width else (height, width)

    @property
    def input_shape(self) -> tuple[int, ...]:
        return self._shape

    @property
    def dataset(self) -> Dataset:
        """The dataset whose samples this set reads (a subset reads some of them)."""
        return self._source.dataset

    def __len__(self) -> int:
        return len(self._indices)

    def __repr__(self) -> str:
        return (f"DatasetImageSet({type(self._source.dataset).__name__}, {len(self)} samples of "
                f"{list(self.input_shape)}, {self.num_classes} classes)")

    def subset(self, indices: Indices) -> "DatasetImageSet":
        part = DatasetImageSet.__new__(DatasetImageSet)
        part._init(self._source, self._indices[check_indices(indices, len(self))], self.input_shape,
                   self.num_classes, self.num_workers, self.loader, self.sampler)
        return part

    def targets(self) -> Tensor:
        labels = self._source.labels()[self._indices]
        bad = (labels < 0) | (labels >= self.num_classes)
        if bool(bad.any()):
            raise ValueError(f"the dataset's labels must lie in 0..{self.num_classes - 1} ({self.num_classes} "
                             f"classes), got {int(labels[bad][0])}")
        return labels

    def order(self, seed: int, epoch: int, shuffle: bool = True) -> Tensor:
        if not shuffle or self.sampler is None:
            return super().order(seed, epoch, shuffle)
        order = check_indices(self.sampler(self.targets(), generator(seed, epoch, 0x5A3)), len(self))
        if len(order) != len(self):
            raise ValueError(f"sampler must return {len(self)} indices (one epoch of this set), got {len(order)}")
        return order

    def _batches(self, order: Tensor, batch_size: int, *, seed: int, epoch: int, augment: bool, first: int,
                 stop: int) -> Iterator[Batch]:
        if first >= stop:
            return
        items = _Pass(self._source, self._indices[order[first:stop]].tolist(), first=first, seed=seed, epoch=epoch,
                      shape=self.input_shape)
        if self.loader is not None:
            loader = self.loader(items, batch_size)
            if not isinstance(loader, DataLoader) or loader.batch_size != batch_size or loader.drop_last \
                    or not isinstance(loader.sampler, SequentialSampler):
                raise ValueError(f"loader must return DataLoader(dataset, batch_size={batch_size}, ...) over the "
                                 f"dataset it is given, in its order (no shuffle, sampler or drop_last), got "
                                 f"{loader!r}")
        else:
            workers = min(self.num_workers, -(-len(items) // batch_size))
            # Seeded: a loader without a generator draws its base seed from the global RNG.
            loader = DataLoader(items, batch_size=batch_size, num_workers=workers,
                                generator=torch.Generator().manual_seed(derive_seed(seed, epoch)),
                                pin_memory=torch.cuda.is_available())
        for batch in loader:
            yield _checked(batch, self.input_shape)


def _checked(batch: Any, shape: Sequence[int]) -> Batch:
    """A collated batch as ``(float [B, *shape], int64 [B])``."""
    if not isinstance(batch, (tuple, list)) or len(batch) != 2 or not all(isinstance(t, Tensor) for t in batch):
        raise TypeError(f"a batch must be an (inputs, labels) pair of tensors, got {type(batch).__name__}: the "
                        f"loader's collate_fn must return that")
    x, y = batch
    if tuple(x.shape[1:]) != tuple(shape) or y.shape != x.shape[:1]:
        raise ValueError(f"a batch must hold inputs [B, {', '.join(map(str, shape))}] and labels [B], got "
                         f"{list(x.shape)} and {list(y.shape)}")
    return x, y.long()


def _worker_count(num_workers: object) -> int:
    if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 0:
        raise ValueError(f"num_workers must be an int ≥ 0, got {num_workers!r}")
    return num_workers
