"""The image-set interface every search and retrain loop reads, its in-memory implementation
and the train split into weight-training and controller-validation parts.

An :class:`ImageSet` yields normalised ``(images, labels)`` batches whose order and
augmentation depend only on ``(seed, epoch)`` and the position in the epoch, never on the
global RNG, the thread count or the number of loader processes. That makes a killed run
resumable exactly: ``batches(..., start=k)`` yields what a full pass yields from batch ``k`` on.
"""
from __future__ import annotations

import copy
import numbers
from typing import Iterator, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from apsfast import _checks

Indices = Union[Sequence[int], Tensor]
Batch = tuple[Tensor, Tensor]

_MASK64 = (1 << 64) - 1


def derive_seed(*parts: int) -> int:
    """A 63-bit seed mixed from integer ``parts`` (e.g. seed, epoch, stream, position).

    A splitmix64 mix rather than ``seed * P + epoch``: nearby tuples give unrelated streams,
    and large seeds cannot collide with other (seed, epoch) pairs or overflow.
    """
    state = 0x243F6A8885A308D3
    for part in parts:
        state = (state ^ (int(part) & _MASK64)) & _MASK64
        state = (state + 0x9E3779B97F4A7C15) & _MASK64
        z = state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
        state = z ^ (z >> 31)
    return state >> 1


def generator(*parts: int) -> torch.Generator:
    """A CPU generator seeded by :func:`derive_seed` of ``parts``."""
    return torch.Generator().manual_seed(derive_seed(*parts))


# Streams drawn from one (seed, epoch): separate generators, so that e.g. switching shuffling
# off leaves the augmentation unchanged.
ORDER_STREAM, AUGMENT_STREAM, SAMPLE_STREAM = 0, 1, 2


def check_int(name: str, value: object, *, minimum: Optional[int] = None) -> int:
    """``value`` as an int after checking it is one (Python or NumPy, not bool), ``≥ minimum``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) \
            or (minimum is not None and value < minimum):
        expected = "an int" if minimum is None else f"an int ≥ {minimum}"
        raise ValueError(f"{name} must be {expected}, got {value!r}")
    return int(value)


def check_color(name: str, value: object, *, spread: bool) -> tuple[float, float, float]:
    """Three per-channel floats as a tuple: positive for a ``spread`` (a std), else in 0..1 (a mean)."""
    try:
        out = tuple(float(v) for v in value)  # type: ignore[union-attr]
    except (TypeError, ValueError):
        out = ()
    if len(out) != 3 or not all(v > 0 if spread else 0 <= v <= 1 for v in out):
        want = "3 positive floats" if spread else "3 floats in 0..1"
        raise ValueError(f"{name} must be {want} (per RGB channel, in 0..1 pixel units), got {value!r}")
    return out  # type: ignore[return-value]


def check_indices(value: Indices, size: int) -> Tensor:
    """``value`` as a 1-D int64 tensor of indices into ``range(size)``, at least one."""
    if isinstance(value, Tensor):
        if value.dtype in (torch.bool, torch.uint8) or value.is_floating_point() or value.is_complex():
            raise TypeError(f"indices must be an integer tensor (not a mask), got dtype {value.dtype}")
        out = value.detach().to("cpu", torch.int64).reshape(-1) if value.dim() <= 1 else None
    elif isinstance(value, Sequence) and not isinstance(value, (str, bytes)) \
            and all(isinstance(i, numbers.Integral) and not isinstance(i, bool) for i in value):
        out = torch.tensor([int(i) for i in value], dtype=torch.int64)
    else:
        raise TypeError(f"indices must be a sequence of ints or a 1-D integer tensor, got {type(value).__name__}")
    if out is None:
        raise ValueError(f"indices must be 1-D, got shape {tuple(value.shape)}")
    if out.numel() == 0:
        raise ValueError("indices must select at least one sample, got none")
    low, high = int(out.min()), int(out.max())
    if low < 0 or high >= size:
        raise ValueError(f"indices must lie in 0..{size - 1} (the set has {size} samples), got {low}..{high}")
    return out


class ImageSet:
    """A labelled image set that yields deterministic, normalised batches.

    Attributes:
        num_classes: the number of labels (labels are ``0..num_classes-1``).
        image_size: the side length of the square images in a batch (``(H, W)`` where a
            set's inputs are not square, see :attr:`input_shape`).
        mean, std: per-channel normalisation in 0..1 pixel units: a batch holds
            ``(pixel / 255 - mean) / std``.
    """

    num_classes: int
    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    @property
    def input_shape(self) -> tuple[int, ...]:
        """``(C, H, W)`` of one input of a batch: ``(3, S, S)`` for square RGB images."""
        return (3, self.image_size, self.image_size)

    def __len__(self) -> int:
        raise NotImplementedError

    def subset(self, indices: Indices) -> "ImageSet":
        """The samples at ``indices``, as a set of the same class with the same settings."""
        raise NotImplementedError

    def targets(self) -> Tensor:
        """The label of every sample, ``int64 [len(self)]`` on the CPU (subsets are picked with them)."""
        raise NotImplementedError

    def num_batches(self, batch_size: int, drop_last: bool = False) -> int:
        """How many batches of ``batch_size`` one pass yields."""
        batch_size = _checks.positive_int("batch_size", batch_size)
        return len(self) // batch_size if drop_last else -(-len(self) // batch_size)

    def order(self, seed: int, epoch: int, shuffle: bool = True) -> Tensor:
        """The sample indices of epoch ``epoch`` in the order :meth:`batches` visits them."""
        seed, epoch = check_int("seed", seed), check_int("epoch", epoch, minimum=0)
        if not shuffle:
            return torch.arange(len(self))
        return torch.randperm(len(self), generator=generator(seed, epoch, ORDER_STREAM))

    def batches(self, batch_size: int, *, seed: int, epoch: int, shuffle: bool = True, augment: bool = False,
                drop_last: bool = False, start: int = 0) -> Iterator[Batch]:
        """One pass over the set: ``(images, labels)`` batches, images ``float32 [B, 3, S, S]``
        normalised by :attr:`mean`/:attr:`std`, labels ``int64 [B]``.

        The order (with ``shuffle``) and the augmentation (with ``augment``) come only from
        ``(seed, epoch)``. ``start=k`` skips the first ``k`` batches without producing them and
        yields exactly what a full pass yields from batch ``k`` on; ``drop_last`` drops a final
        batch smaller than ``batch_size``.
        """
        batch_size = _checks.positive_int("batch_size", batch_size)
        total = self.num_batches(batch_size, drop_last)
        start = check_int("start", start, minimum=0)
        if start > total:
            raise ValueError(f"start must be in 0..{total} (the batches of one pass with batch_size={batch_size}, "
                             f"drop_last={drop_last}), got {start}")
        order = self.order(seed, epoch, shuffle)
        # Positions past the last full batch are never yielded with drop_last.
        stop = total * batch_size if drop_last else len(self)
        # Checked above, run lazily: the caller gets argument errors at the call, not at next().
        return self._batches(order, batch_size, seed=int(seed), epoch=int(epoch), augment=bool(augment),
                             first=start * batch_size, stop=stop)

    def _batches(self, order: Tensor, batch_size: int, *, seed: int, epoch: int, augment: bool, first: int,
                 stop: int) -> Iterator[Batch]:
        """The batches of positions ``first..stop-1`` of ``order`` (``first`` a batch boundary)."""
        raise NotImplementedError


class TensorImageSet(ImageSet):
    """An image set held in memory as ``uint8`` tensors, augmented on whole batches.

    Augmentation is the CIFAR recipe: a random ``image_size`` crop of the image zero-padded by
    ``pad`` on each side, then a random horizontal flip, with per-sample offsets and flips.

    Args:
        images: ``uint8 [N, 3, S, S]``; the set lives on their device (see :meth:`to`).
        labels: ``int64 [N]`` in ``0..num_classes-1`` (moved to the images' device).
        num_classes: the number of classes (default: ``labels.max() + 1``).
        mean, std: per-channel normalisation in 0..1 pixel units.
        pad: the crop padding (default ``S // 8``, i.e. 4 for 32×32 images).
    """

    def __init__(self, images: Tensor, labels: Tensor, num_classes: Optional[int] = None, *,
                 mean: Sequence[float] = (0.5, 0.5, 0.5), std: Sequence[float] = (0.25, 0.25, 0.25),
                 pad: Optional[int] = None) -> None:
        if not isinstance(images, Tensor) or images.dtype != torch.uint8:
            raise TypeError(f"images must be a uint8 tensor [N, 3, S, S], got "
                            f"{images.dtype if isinstance(images, Tensor) else type(images).__name__}")
        if images.dim() != 4 or images.shape[1] != 3 or images.shape[2] != images.shape[3] or images.shape[0] == 0:
            raise ValueError(f"images must have shape [N, 3, S, S] with N ≥ 1 (square RGB images), "
                             f"got {tuple(images.shape)}")
        if not isinstance(labels, Tensor) or labels.dtype != torch.int64 or labels.shape != images.shape[:1]:
            got = f"{labels.dtype} {tuple(labels.shape)}" if isinstance(labels, Tensor) else type(labels).__name__
            raise ValueError(f"labels must be an int64 tensor of shape [{images.shape[0]}] (one per image), got {got}")
        if num_classes is None:
            num_classes = int(labels.max()) + 1
        self.num_classes = _checks.positive_int("num_classes", num_classes)
        if int(labels.min()) < 0 or int(labels.max()) >= self.num_classes:
            raise ValueError(f"labels must lie in 0..{self.num_classes - 1} (num_classes={self.num_classes}), "
                             f"got {int(labels.min())}..{int(labels.max())}")
        self.images = images.detach().contiguous()
        self.labels = labels.detach().to(images.device).contiguous()
        self.image_size = int(images.shape[-1])
        self.mean, self.std = check_color("mean", mean, spread=False), check_color("std", std, spread=True)
        self.pad = self.image_size // 8 if pad is None else check_int("pad", pad, minimum=0)
        self._scale = torch.tensor(self.std, dtype=torch.float32, device=images.device).view(1, 3, 1, 1)
        self._shift = torch.tensor(self.mean, dtype=torch.float32, device=images.device).view(1, 3, 1, 1)

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def __repr__(self) -> str:
        return (f"TensorImageSet({len(self)} images {self.image_size}×{self.image_size}, "
                f"{self.num_classes} classes, pad={self.pad})")

    def subset(self, indices: Indices) -> "TensorImageSet":
        index = check_indices(indices, len(self))
        return TensorImageSet(self.images[index], self.labels[index], self.num_classes, mean=self.mean,
                              std=self.std, pad=self.pad)

    @property
    def device(self) -> torch.device:
        """Where the images are kept and the batches are made."""
        return self.images.device

    def to(self, device: Union[str, torch.device]) -> "TensorImageSet":
        """This set with its images and labels on ``device`` (itself if they are there already).

        Its batches are then cropped, flipped and normalised on ``device``: on a GPU a step
        neither copies a batch from the host nor waits for the CPU to prepare it. The order and
        the augmentation are still drawn on the CPU, once per epoch, so every batch is the same
        as the CPU set's, bit for bit.
        """
        device = torch.device(device)
        if self.images.device == device:
            return self
        # A copy with its tensors moved, not a new set: this one was checked when it was made,
        # and checking again would read the labels back from the device.
        placed = copy.copy(self)
        placed.images, placed.labels = self.images.to(device), self.labels.to(device)
        placed._scale, placed._shift = self._scale.to(device), self._shift.to(device)
        return placed

    def targets(self) -> Tensor:
        return self.labels.cpu()

    def normalise(self, images: Tensor) -> Tensor:
        """``uint8`` images as ``(x / 255 - mean) / std`` in float32."""
        return (images.float().div_(255) - self._shift).div_(self._scale)

    def augmentation(self, seed: int, epoch: int) -> tuple[Tensor, Tensor, Tensor]:
        """Per-position crop offsets ``(dy, dx)`` in ``0..2*pad`` and flip flags of one epoch.

        Drawn for the whole epoch at once (three numbers per sample) so that a batch's
        augmentation depends on its position only, not on how many batches were produced.
        """
        g = generator(seed, epoch, AUGMENT_STREAM)
        offsets = torch.randint(0, 2 * self.pad + 1, (2, len(self)), generator=g)
        flips = torch.rand(len(self), generator=g) < 0.5
        return offsets[0], offsets[1], flips

    def crop_flip(self, images: Tensor, dy: Tensor, dx: Tensor, flips: Tensor) -> Tensor:
        """Crop ``images`` (``uint8 [B, 3, S, S]``) at offsets ``dy, dx`` of the zero-padded
        image and mirror where ``flips``: one gather for the whole batch."""
        size, pad, device = self.image_size, self.pad, images.device
        padded = F.pad(images, (pad, pad, pad, pad)) if pad else images
        steps = torch.arange(size, device=device)
        rows = dy[:, None] + steps
        # A flipped sample reads its columns right to left.
        cols = dx[:, None] + torch.where(flips[:, None], steps.flip(0), steps)
        batch = torch.arange(images.shape[0], device=device)[:, None, None, None]
        channel = torch.arange(3, device=device)[None, :, None, None]
        return padded[batch, channel, rows[:, None, :, None], cols[:, None, None, :]]

    def _batches(self, order: Tensor, batch_size: int, *, seed: int, epoch: int, augment: bool, first: int,
                 stop: int) -> Iterator[Batch]:
        # Drawn on the CPU as everywhere, moved once per epoch: a batch only slices them.
        order = order.to(self.device, non_blocking=True)  # pageable: copied at once, no wait for the device
        params = (tuple(p.to(self.device, non_blocking=True) for p in self.augmentation(seed, epoch))
                  if augment else None)
        for begin in range(first, stop, batch_size):
            positions = slice(begin, min(begin + batch_size, stop))
            index = order[positions]
            images = self.images[index]
            if params is not None:
                images = self.crop_flip(images, *(p[positions] for p in params))
            yield self.normalise(images), self.labels[index]


def split(data: ImageSet, fraction: float = 0.5, *, seed: int = 0) -> tuple[ImageSet, ImageSet]:
    """A deterministic random partition of ``data`` into two disjoint subsets of
    ``round(fraction * len(data))`` samples and the rest (e.g. the weight-training and the
    controller-validation halves of a train split)."""
    if not isinstance(data, ImageSet):
        raise TypeError(f"data must be an ImageSet, got {type(data).__name__}")
    if isinstance(fraction, bool) or not isinstance(fraction, numbers.Real) or not 0 < fraction < 1:
        raise ValueError(f"fraction must be a float in (0, 1), got {fraction!r}")
    size = len(data)
    first = round(fraction * size)
    if not 0 < first < size:
        raise ValueError(f"fraction={fraction} splits {size} samples into {first} and {size - first}: both parts "
                         f"must be non-empty")
    perm = torch.randperm(size, generator=generator(check_int("seed", seed), size, 0x5B11))
    return data.subset(perm[:first].sort().values), data.subset(perm[first:].sort().values)


def balanced_subset(data: ImageSet, count: int, *, seed: int = 0) -> ImageSet:
    """``count`` samples of ``data`` (all of them if it has fewer) with the classes as evenly
    represented as the set allows: a seeded shuffle, then the classes in turn, kept in that
    order (one of each class, then a second of each, …).

    A subset for measuring accuracy must not follow the set's own order: a folder set is
    sorted by class, so its first images are of a handful of classes only; and the subset is
    read in batches that are scored with their own batch-norm statistics, which a batch of one
    class distorts (a search on a digits folder reported 71% per-epoch accuracy for an arch
    that scores 98% on batches of every class).
    """
    count = min(check_int("count", count, minimum=1), len(data))
    labels = data.targets()
    order = torch.randperm(len(data), generator=generator(check_int("seed", seed), len(data), 0xE7A1))
    shuffled = labels[order]
    # Each sample's rank among the shuffled samples of its class: take rank 0 of every class,
    # then rank 1, and so on.
    rank = torch.empty_like(order)
    for label in shuffled.unique():
        where = (shuffled == label).nonzero().squeeze(1)
        rank[where] = torch.arange(len(where))
    keys = rank * (int(labels.max()) + 1) + shuffled
    picked = order[keys.argsort(stable=True)[:count]]
    return data.subset(picked)
