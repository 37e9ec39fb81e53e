"""Model factories of a user, importable by dotted path (``user_models:tiny_cnn``) in the tests
of ``apsfast search --model`` (pytest puts this folder on ``sys.path``)."""
from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import Dataset


class TinyCNN(nn.Module):
    """A stem, one residual block (the addition couples the stem's and the block's outputs)
    and a linear classifier."""

    def __init__(self, width: int = 8, num_classes: int = 10, in_channels: int = 3) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, width, 3, padding=1, bias=False), nn.BatchNorm2d(width),
                                  nn.ReLU())
        self.body = nn.Sequential(nn.Conv2d(width, 2 * width, 3, padding=1, bias=False), nn.BatchNorm2d(2 * width),
                                  nn.ReLU(), nn.Conv2d(2 * width, width, 3, padding=1, bias=False),
                                  nn.BatchNorm2d(width))
        self.head = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = torch.relu(x + self.body(x))
        return self.head(x.mean((2, 3)))


def tiny_cnn(width: int = 8, num_classes: int = 10, in_channels: int = 3) -> nn.Module:
    return TinyCNN(width, num_classes, in_channels)


def not_a_module() -> str:
    return "a string"


NOT_CALLABLE = 3


class Branches(nn.Module):
    """Chooses its path by the data (control flow on a value), which torch.fx cannot trace."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3, padding=1)
        self.head = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        if x.mean() > 0:
            x = x.relu()
        return self.head(x.mean((2, 3)))


class Stripes(Dataset):
    """A data set of a user's own: one-channel, non-square inputs ``[1, 6, 10]`` whose label is
    the row (0, 2 or 4) of a bright stripe, under a random transform (noise from torch's global
    generator, as torchvision's transforms draw theirs)."""

    def __init__(self, n: int, noise: float = 0.3, seed: int = 0) -> None:
        self.targets = torch.randint(0, 3, (n,), generator=torch.Generator().manual_seed(seed)).tolist()
        self.noise = noise

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        x = torch.zeros(1, 6, 10)
        x[0, 2 * self.targets[i]] = 1.0
        return x + self.noise * torch.randn_like(x), self.targets[i]


def stripes(num_train: int = 160, num_val: int = 48) -> tuple[Dataset, Dataset]:
    """A data factory: ``data.name = user_models:stripes``."""
    return Stripes(num_train), Stripes(num_val, seed=1)
