"""The embedded data set (`embedded()`): small, learnable image classification of shapes, generated on the fly.

Nothing is read or downloaded. Each class is a mixture of a few prototypes. A prototype is a
shape (a rotated superellipse: diamond, ellipse or rounded square, filled or hollow) striped
by an oriented grating between two colours, on one of two background colours. The colours,
exponents, orientations and frequencies come from small menus shared by all classes, so a
single attribute says little about the class: it is told apart by a conjunction of them,
seen under per-image translation, scale, rotation, grating phase, contrast, colour jitter
and pixel noise. A linear model on pixels does poorly; a convnet learns it, and within a
short training the wider the convnet the better (it needs more feature detectors than a
narrow network has channels), which is what a channel number search must be able to see.

Generation is float64 element-wise arithmetic on CPU with seeded generators, rounded before
the conversion to ``uint8``: the same arguments give bit-identical images for any thread
count and machine (float64 keeps the last-bit differences of vectorised transcendental
functions far from a rounding boundary).
"""
from __future__ import annotations

import functools
import math
import numbers

import torch
from torch import Tensor

from apsfast import _checks
from apsfast.data.base import TensorImageSet, generator

MODES = 3  # prototypes per class
# The colour menu: the corners of the RGB cube, pulled in from black and white so contrast
# jitter keeps them apart. Well-separated colours make the set quick to learn.
PALETTE = tuple(tuple(0.15 + 0.7 * ((i >> k) & 1) for k in range(3)) for i in range(8))
BACKGROUNDS = 2  # background colours per prototype, one drawn per image: weakens pixel-linear cues
ORIENTATIONS = 6  # grating orientations: multiples of 30°
FREQUENCIES = (1.0, 1.6, 2.4)  # grating cycles per image half-width
EXPONENTS = (1.0, 2.0, 6.0)  # superellipse |u|^e + |v|^e = 1: diamond, ellipse, rounded square
SIZE = (0.7, 1.0)  # shape radius, in image half-widths
ASPECT = (0.45, 1.0)  # minor / major axis
SHIFT = 0.25  # translation, in image half-widths
SCALE_JITTER = 0.1
ROTATION_JITTER = math.pi / 24
CONTRAST = (0.8, 1.1)
COLOR_JITTER = 0.04  # per-channel offset, 0..1 units
NOISE = 0.03  # pixel noise std, 0..1 units
EDGE = 12.0  # sharpness of the shape's edge (logistic slope per radius unit)
RING = (0.7, 0.3)  # a hollow shape: radius and half-thickness of its ring

_STREAMS = {"prototypes": 0, "train": 1, "test": 2}
CHUNK = 1024  # images rendered at once


def _uniform(g: torch.Generator, *shape: int) -> Tensor:
    return torch.rand(shape, generator=g, dtype=torch.float64)


def _choice(g: torch.Generator, n: int, *shape: int) -> Tensor:
    return torch.randint(n, shape, generator=g)


def _prototypes(num_classes: int, g: torch.Generator) -> dict[str, Tensor]:
    """The attributes of ``num_classes * MODES`` prototypes, each drawn from its menu."""
    count = num_classes * MODES
    return {
        # Each prototype ranks the palette: its grating colours first, then its backgrounds,
        # so the three always differ and the shape is always visible.
        "colors": _uniform(g, count, len(PALETTE)).argsort(1),
        "exponent": torch.tensor(EXPONENTS, dtype=torch.float64)[_choice(g, len(EXPONENTS), count)],
        "hollow": _choice(g, 2, count).double(),
        "aspect": ASPECT[0] + (ASPECT[1] - ASPECT[0]) * _uniform(g, count),
        "size": SIZE[0] + (SIZE[1] - SIZE[0]) * _uniform(g, count),
        "angle": math.pi * _uniform(g, count),
        "orientation": math.pi / ORIENTATIONS * _choice(g, ORIENTATIONS, count).double(),
        "frequency": torch.tensor(FREQUENCIES, dtype=torch.float64)[_choice(g, len(FREQUENCIES), count)],
    }


def _noise(g: torch.Generator, *shape: int) -> Tensor:
    """Unit-variance triangular noise from two float32 uniforms: cheap (most of the random
    numbers drawn), and free of transcendental functions, so exactly reproducible."""
    u = torch.rand((2, *shape), generator=g, dtype=torch.float32)
    return (u[0] + u[1] - 1).double() * math.sqrt(6.0)


def _render(protos: dict[str, Tensor], labels: Tensor, size: int, g: torch.Generator) -> Tensor:
    """``uint8 [N, 3, size, size]`` images of the given labels, each from a random prototype
    of its class with its own jitter."""
    n = labels.numel()
    p = {k: v[labels * MODES + _choice(g, MODES, n)] for k, v in protos.items()}
    palette = torch.tensor(PALETTE, dtype=torch.float64)
    rank = 2 + _choice(g, BACKGROUNDS, n)
    background = palette[p["colors"].gather(1, rank.view(n, 1)).view(n)]
    color_a, color_b = palette[p["colors"][:, 0]], palette[p["colors"][:, 1]]
    coords = (torch.arange(size, dtype=torch.float64) + 0.5) * (2.0 / size) - 1.0
    ys, xs = coords.view(1, size, 1), coords.view(1, 1, size)

    # Shape: translate, rotate, scale.
    dx, dy = (SHIFT * (2 * _uniform(g, n) - 1)).view(n, 1, 1), (SHIFT * (2 * _uniform(g, n) - 1)).view(n, 1, 1)
    angle = p["angle"] + ROTATION_JITTER * (2 * _uniform(g, n) - 1)
    scale = p["size"] * (1 + SCALE_JITTER * (2 * _uniform(g, n) - 1))
    cos, sin = torch.cos(angle).view(n, 1, 1), torch.sin(angle).view(n, 1, 1)
    x, y = xs - dx, ys - dy
    u = (x * cos + y * sin) / scale.view(n, 1, 1)
    v = (y * cos - x * sin) / (scale * p["aspect"]).view(n, 1, 1)
    e = p["exponent"].view(n, 1, 1)
    radius = (u.abs().pow(e) + v.abs().pow(e)).pow(1 / e)
    filled = torch.sigmoid(EDGE * (1 - radius))
    ring = torch.sigmoid(EDGE * (RING[1] - (radius - RING[0]).abs()))
    hollow = p["hollow"].view(n, 1, 1)
    mask = (1 - hollow) * filled + hollow * ring

    # Grating inside the shape, with a random phase: its orientation and frequency matter,
    # not where its stripes fall. It turns with the shape's rotation jitter.
    theta = (p["orientation"] + angle - p["angle"]).view(n, 1, 1)
    phase = (2 * math.pi * _uniform(g, n)).view(n, 1, 1)
    wave = 0.5 + 0.5 * torch.cos(math.pi * p["frequency"].view(n, 1, 1) * (x * torch.cos(theta)
                                                                        + y * torch.sin(theta)) + phase)
    fg = color_a.view(n, 3, 1, 1) * wave.unsqueeze(1) + color_b.view(n, 3, 1, 1) * (1 - wave.unsqueeze(1))
    bg = background.view(n, 3, 1, 1)
    image = bg + mask.unsqueeze(1) * (fg - bg)

    # Photometric jitter and noise.
    contrast = (CONTRAST[0] + (CONTRAST[1] - CONTRAST[0]) * _uniform(g, n)).view(n, 1, 1, 1)
    shift = COLOR_JITTER * (2 * _uniform(g, n, 3) - 1)
    image = 0.5 + contrast * (image - 0.5) + shift.view(n, 3, 1, 1) + NOISE * _noise(g, n, 3, size, size)
    return (image.clamp(0, 1) * 255).round().to(torch.uint8)


def _labels(count: int, num_classes: int, g: torch.Generator) -> Tensor:
    """Balanced labels (counts differ by at most one) in random order."""
    return (torch.arange(count) % num_classes)[torch.randperm(count, generator=g)]


def _statistics(images: Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std in 0..1 units, from exact integer sums (a float reduction's
    order, hence its last bits, depends on the thread count)."""
    x = images.transpose(0, 1).reshape(3, -1).long()
    count = x.shape[1]
    sums, squares = x.sum(1).tolist(), (x * x).sum(1).tolist()
    mean = [s / count / 255 for s in sums]
    std = [math.sqrt(max(q / count / 255 ** 2 - m * m, 1e-12)) for q, m in zip(squares, mean)]
    return tuple(round(m, 4) for m in mean), tuple(round(s, 4) for s in std)


def embedded(*, image_size: int = 16, num_train: int = 6000, num_test: int = 2000, num_classes: int = 10,
             seed: int = 0) -> tuple[TensorImageSet, TensorImageSet]:
    """The embedded train and test sets: ``num_train`` and ``num_test`` generated RGB images
    of ``image_size``×``image_size`` in ``num_classes`` balanced classes.

    The same arguments always give the same images. The test set comes from the same
    prototypes as the train set, with its own random stream. Both are normalised by the
    train set's per-channel mean and std.
    """
    image_size = _checks.positive_int("image_size", image_size)
    if image_size < 8:
        raise ValueError(f"image_size must be ≥ 8 (the shapes and gratings need room), got {image_size}")
    num_train = _checks.positive_int("num_train", num_train)
    num_test = _checks.positive_int("num_test", num_test)
    num_classes = _checks.positive_int("num_classes", num_classes)
    if num_classes < 2:
        raise ValueError(f"num_classes must be ≥ 2, got {num_classes}")
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise ValueError(f"seed must be an int, got {seed!r}")
    train, test, mean, std = _generated(image_size, num_train, num_test, num_classes, int(seed))
    return tuple(TensorImageSet(images, labels, num_classes, mean=mean, std=std)  # type: ignore[return-value]
                 for images, labels in (train, test))


@functools.lru_cache(maxsize=2)
def _generated(image_size: int, num_train: int, num_test: int, num_classes: int, seed: int) -> tuple:
    """The images, labels and statistics :func:`embedded` wraps, made once per process for the
    same arguments (seconds on two cores; a search, its resume and its retrain each load the
    set). The sets share these tensors and never write into them."""
    protos = _prototypes(num_classes, generator(seed, _STREAMS["prototypes"]))
    sets = {}
    for name, count in (("train", num_train), ("test", num_test)):
        labels = _labels(count, num_classes, generator(seed, _STREAMS[name]))
        # Rendered in chunks, each from its own stream: bounded float64 temporaries for any size.
        chunks = [_render(protos, labels[i:i + CHUNK], image_size, generator(seed, _STREAMS[name], 1 + i // CHUNK))
                  for i in range(0, count, CHUNK)]
        sets[name] = (torch.cat(chunks), labels)
    return (sets["train"], sets["test"], *_statistics(sets["train"][0]))
