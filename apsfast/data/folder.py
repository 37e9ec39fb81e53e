"""Image sets read from an ImageFolder tree (``root/<class>/<image>``), e.g. ImageNet.

Images are decoded with PIL in loader processes. Every sample's augmentation comes from its
own generator, seeded by (seed, epoch, position in the epoch), so batches are the same for any
number of loader processes and a resumed pass reproduces the skipped-to batches exactly.
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Iterator, Optional, Sequence, Union

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from apsfast import _checks
from apsfast.data.base import SAMPLE_STREAM, Batch, ImageSet, Indices, check_color, check_indices, derive_seed

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
RESIZE_RATIO = 8 / 7  # eval: short side to 256 for 224 crops
CROP_SCALE = (0.08, 1.0)
CROP_RATIO = (3 / 4, 4 / 3)
CROP_ATTEMPTS = 10
PREFETCH_FACTOR = 4
# Training transforms: "crop-flip" is CIFAR's (pad by a eighth, random crop, flip), for small
# images; "resized-crop" ImageNet's (random area and aspect, resized), for large ones; "auto"
# picks by the image size.
AUGMENTS = ("auto", "crop-flip", "resized-crop", "none")
SMALL_IMAGES = 64
UNIFORMS = 4 * CROP_ATTEMPTS + 1

Sample = tuple[str, int]
PathLike = Union[str, "os.PathLike[str]"]


def _torchvision_folder():
    """torchvision's folder module, or ``None`` where torchvision is missing or broken (its
    compiled part can fail to load for reasons other than ImportError)."""
    try:
        from torchvision.datasets import folder
    except Exception:  # noqa: BLE001  (any failure means: use the equivalent scan below)
        return None
    return folder if hasattr(folder, "find_classes") and hasattr(folder, "make_dataset") else None


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMG_EXTENSIONS)


def find_classes(root: PathLike) -> list[str]:
    """The class folders of ``root``, sorted (torchvision's rule)."""
    with os.scandir(root) as entries:
        return sorted(entry.name for entry in entries if entry.is_dir())


def _scan(root: Path, classes: Sequence[str]) -> list[Sample]:
    """torchvision's ``make_dataset``: per class in order, files of every subfolder (links
    followed), walked in sorted order, with an image extension."""
    samples = []
    for label, name in enumerate(classes):
        for folder, _, files in sorted(os.walk(root / name, followlinks=True)):
            samples.extend((os.path.join(folder, f), label) for f in sorted(files) if _is_image(f))
    return samples


def _samples(tv, root: Path, classes: Sequence[str]) -> list[Sample]:
    """The samples from torchvision's ``make_dataset`` where it is available, else the scan."""
    if tv is not None:
        try:
            return [(str(path), int(label)) for path, label in tv.make_dataset(
                str(root), {c: i for i, c in enumerate(classes)}, extensions=IMG_EXTENSIONS)]
        except FileNotFoundError:
            pass  # a class without images: the scan finds it too, and discover() names it
    return _scan(root, classes)


def discover(root: PathLike) -> tuple[list[str], list[Sample]]:
    """The sorted class names of an ImageFolder tree and its ``(path, label)`` samples.

    Raises ``FileNotFoundError`` if ``root`` is not a folder and ``ValueError`` if it has no
    class folders or a class folder without images.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {str(root)!r} does not exist or is not a folder; expected "
                                f"one folder of images per class in it")
    tv = _torchvision_folder()
    # torchvision raises FileNotFoundError for a tree without classes or with an empty class;
    # the scan below then gives the same result with a clearer error.
    try:
        classes = list(tv.find_classes(str(root))[0]) if tv is not None else find_classes(root)
    except FileNotFoundError:
        classes = find_classes(root)
    if not classes:
        raise ValueError(f"image folder {str(root)!r} has no class folders; expected {root}/<class>/<image>")
    samples = _samples(tv, root, classes)
    found = set(label for _, label in samples)
    empty = [c for i, c in enumerate(classes) if i not in found]
    if empty:
        raise ValueError(f"image folder {str(root)!r}: class folder(s) {empty} hold no images "
                         f"(extensions {', '.join(IMG_EXTENSIONS)})")
    return classes, samples


# --- the per-sample transforms -------------------------------------------------------------

def crop_box(width: int, height: int, uniforms: Sequence[float]) -> tuple[int, int, int, int]:
    """torchvision's ``RandomResizedCrop`` box ``(left, top, right, bottom)``: up to 10
    tries of a random area fraction in ``CROP_SCALE`` and log-uniform aspect in ``CROP_RATIO``,
    then the centre crop of the nearest allowed aspect. Consumes 4 ``uniforms`` per try."""
    area = width * height
    log_low, log_high = math.log(CROP_RATIO[0]), math.log(CROP_RATIO[1])
    for attempt in range(CROP_ATTEMPTS):
        u_scale, u_ratio, u_top, u_left = uniforms[4 * attempt:4 * attempt + 4]
        target = area * (CROP_SCALE[0] + (CROP_SCALE[1] - CROP_SCALE[0]) * u_scale)
        aspect = math.exp(log_low + (log_high - log_low) * u_ratio)
        w, h = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            top, left = int(u_top * (height - h + 1)), int(u_left * (width - w + 1))
            return left, top, left + w, top + h
    ratio = width / height
    if ratio < CROP_RATIO[0]:
        w, h = width, round(width / CROP_RATIO[0])
    elif ratio > CROP_RATIO[1]:
        w, h = round(height * CROP_RATIO[1]), height
    else:
        w, h = width, height
    top, left = (height - h) // 2, (width - w) // 2
    return left, top, left + w, top + h


def train_transform(image: Image.Image, size: int, uniforms: Sequence[float]) -> Image.Image:
    """Random resized crop to ``size``×``size`` and a random horizontal flip (the last uniform)."""
    box = crop_box(image.width, image.height, uniforms)
    image = image.resize((size, size), Image.Resampling.BILINEAR, box=box)
    return image.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if uniforms[4 * CROP_ATTEMPTS] < 0.5 else image


def eval_transform(image: Image.Image, size: int) -> Image.Image:
    """Short side to ``round(size * 8 / 7)``, then the centre ``size``×``size`` crop."""
    short = round(size * RESIZE_RATIO)
    width, height = image.size
    if width <= height:
        new = (short, int(short * height / width))
    else:
        new = (int(short * width / height), short)
    image = image.resize(new, Image.Resampling.BILINEAR)
    top, left = int(round((new[1] - size) / 2.0)), int(round((new[0] - size) / 2.0))
    return image.crop((left, top, left + size, top + size))


def fit_transform(image: Image.Image, size: int) -> Image.Image:
    """Short side to ``size``, then the centre ``size``×``size`` crop (small images: no margin)."""
    width, height = image.size
    scale = size / min(width, height)
    new = (max(size, round(width * scale)), max(size, round(height * scale)))
    if new != image.size:
        image = image.resize(new, Image.Resampling.BILINEAR)
    left, top = (new[0] - size) // 2, (new[1] - size) // 2
    return image.crop((left, top, left + size, top + size))


def crop_flip_transform(image: Image.Image, size: int, uniforms: Sequence[float]) -> Image.Image:
    """CIFAR's augmentation on a fitted image: a ``size`` crop of it zero-padded by ``size // 8``
    on each side, then a horizontal flip (the first three uniforms)."""
    image = fit_transform(image, size)
    pad = size // 8
    padded = Image.new("RGB", (size + 2 * pad, size + 2 * pad))
    padded.paste(image, (pad, pad))
    left, top = int(uniforms[0] * (2 * pad + 1)), int(uniforms[1] * (2 * pad + 1))
    image = padded.crop((left, top, left + size, top + size))
    return image.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if uniforms[2] < 0.5 else image


def resolve_augment(augment: str, size: int) -> str:
    """The training transform ``augment`` names for images of side ``size`` (``auto``: by size)."""
    if augment not in AUGMENTS:
        raise ValueError(f"augment must be one of {', '.join(AUGMENTS)}, got {augment!r}")
    if augment == "auto":
        return "crop-flip" if size <= SMALL_IMAGES else "resized-crop"
    return augment


def load_image(path: str) -> Image.Image:
    """The image at ``path`` as RGB (grayscale, palette and alpha images converted)."""
    with Image.open(path) as image:
        return image.convert("RGB")


class _EpochSamples(Dataset):
    """Positions ``first..stop-1`` of one epoch's order, each loaded and transformed with its
    own generator (``augment``: ``crop-flip``, ``resized-crop`` or ``eval``); yields
    ``(uint8 [3, S, S], label)``."""

    def __init__(self, samples: Sequence[Sample], order: Tensor, *, first: int, stop: int, seed: int, epoch: int,
                 augment: str, size: int) -> None:
        # Only this pass's samples: loader processes started by spawn receive a pickled copy.
        self.samples = [samples[i] for i in order[first:stop].tolist()]
        self.first, self.seed, self.epoch, self.augment, self.size = first, seed, epoch, augment, size

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        path, label = self.samples[i]
        image = load_image(path)
        if self.augment == "eval":
            image = fit_transform(image, self.size) if self.size <= SMALL_IMAGES else eval_transform(image, self.size)
        else:
            g = torch.Generator().manual_seed(derive_seed(self.seed, self.epoch, SAMPLE_STREAM, self.first + i))
            uniforms = torch.rand(UNIFORMS, generator=g, dtype=torch.float64).tolist()
            transform = crop_flip_transform if self.augment == "crop-flip" else train_transform
            image = transform(image, self.size, uniforms)
        pixels = torch.from_numpy(np.array(image, dtype=np.uint8, copy=True)).permute(2, 0, 1)
        return pixels.contiguous(), label


class _Collate:
    """Stacks a batch and normalises it, in the loader process that built it."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)

    def __call__(self, items: list[tuple[Tensor, int]]) -> Batch:
        images = torch.stack([image for image, _ in items])
        labels = torch.tensor([label for _, label in items], dtype=torch.int64)
        return (images.float().div_(255) - self.mean).div_(self.std), labels


class FolderImageSet(ImageSet):
    """``(path, label)`` samples of an ImageFolder tree, loaded with PIL.

    Training batches are augmented by ``augment``: ``resized-crop`` (a random resized crop to
    ``image_size``, area 8–100 %, aspect 3/4–4/3, and a random flip: ImageNet's), ``crop-flip``
    (the image fitted to ``image_size``, zero-padded by an eighth, randomly cropped and flipped:
    CIFAR's), ``none``, or ``auto`` (``crop-flip`` up to 64 px, ``resized-crop`` above).
    Evaluation fits small images and takes large ones' centre crop after resizing the short
    side to ``round(image_size * 8 / 7)``. Batches come from a ``DataLoader`` with
    ``num_workers`` processes.

    Args:
        samples: ``(path, label)`` pairs.
        classes: the class names; labels index them.
        image_size: the side of the produced square images.
        num_workers: loader processes (default ``min(8, cpu count)``; 0 loads in this process).
        mean, std: normalisation (default ImageNet's; see :func:`image_statistics`).
        augment: the training transform (see above).
    """

    def __init__(self, samples: Sequence[Sample], classes: Sequence[str], *, image_size: int = 224,
                 num_workers: Optional[int] = None, mean: Sequence[float] = IMAGENET_MEAN,
                 std: Sequence[float] = IMAGENET_STD, augment: str = "auto") -> None:
        self.classes = [str(c) for c in classes]
        self.num_classes = _checks.positive_int("len(classes)", len(self.classes))
        self.samples = [(str(path), int(label)) for path, label in samples]
        if not self.samples:
            raise ValueError("samples must hold at least one (path, label) pair, got none")
        bad = [s for s in self.samples if not 0 <= s[1] < self.num_classes]
        if bad:
            raise ValueError(f"sample labels must lie in 0..{self.num_classes - 1} ({self.num_classes} classes), "
                             f"got e.g. {bad[0]}")
        self.image_size = _checks.positive_int("image_size", image_size)
        if num_workers is None:
            num_workers = min(8, os.cpu_count() or 1)
        if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 0:
            raise ValueError(f"num_workers must be an int ≥ 0, got {num_workers!r}")
        self.num_workers = num_workers
        self.mean, self.std = check_color("mean", mean, spread=False), check_color("std", std, spread=True)
        self.augment = resolve_augment(augment, self.image_size)

    @classmethod
    def from_folder(cls, root: PathLike, **options) -> "FolderImageSet":
        """The images of ``root/<class>/<image>``; ``options`` as for the constructor."""
        classes, samples = discover(root)
        return cls(samples, classes, **options)

    def __len__(self) -> int:
        return len(self.samples)

    def __repr__(self) -> str:
        return (f"FolderImageSet({len(self)} images, {self.num_classes} classes, image_size={self.image_size}, "
                f"augment={self.augment!r}, num_workers={self.num_workers})")

    def subset(self, indices: Indices) -> "FolderImageSet":
        index = check_indices(indices, len(self)).tolist()
        return FolderImageSet([self.samples[i] for i in index], self.classes, image_size=self.image_size,
                              num_workers=self.num_workers, mean=self.mean, std=self.std, augment=self.augment)

    def targets(self) -> Tensor:
        return torch.tensor([label for _, label in self.samples], dtype=torch.int64)

    def _batches(self, order: Tensor, batch_size: int, *, seed: int, epoch: int, augment: bool, first: int,
                 stop: int) -> Iterator[Batch]:
        if first >= stop:
            return
        mode = self.augment if augment and self.augment != "none" else "eval"
        dataset = _EpochSamples(self.samples, order, first=first, stop=stop, seed=seed, epoch=epoch,
                                augment=mode, size=self.image_size)
        workers = min(self.num_workers, -(-len(dataset) // batch_size))
        extra = {"prefetch_factor": PREFETCH_FACTOR} if workers > 0 else {}
        # The loader draws its worker base seed from `generator`; without one it would consume
        # the global RNG and change the training run's random stream.
        loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, drop_last=False, num_workers=workers,
                            collate_fn=_Collate(self.mean, self.std), pin_memory=torch.cuda.is_available(),
                            generator=torch.Generator().manual_seed(derive_seed(seed, epoch)), **extra)
        yield from loader


def image_statistics(samples: Sequence[Sample], size: int, count: int = 256) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std (0..1 pixel units) of up to ``count`` images spread over
    ``samples``, fitted to ``size`` as evaluation sees them: a folder set's own normalisation."""
    picked = samples[::max(1, len(samples) // count)][:count]
    total = torch.zeros(3, dtype=torch.float64)
    squares = torch.zeros(3, dtype=torch.float64)
    pixels = 0
    for path, _ in picked:
        image = fit_transform(load_image(path), size)
        values = torch.from_numpy(np.array(image, dtype=np.float64) / 255.0).reshape(-1, 3)
        total += values.sum(0)
        squares += (values ** 2).sum(0)
        pixels += values.shape[0]
    mean = total / pixels
    std = (squares / pixels - mean ** 2).clamp_min(1e-6).sqrt()
    return tuple(mean.tolist()), tuple(std.tolist())
