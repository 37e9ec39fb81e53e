"""The loaders alone: in-memory CIFAR-style batches and a JPEG ImageFolder tree.

``python -m pytest bench/bench_data.py --benchmark-enable``; in the test suite each case runs
once, untimed, on a few small images. ``apsfast bench data`` prints images/s.
"""
from __future__ import annotations

import pytest

from apsfast.benchmarks.data import jpeg_tree
from apsfast.data import FolderImageSet


@pytest.mark.parametrize("workers", [0, 2])
def test_folder_batches(benchmark, tmp_path, workers):
    data = FolderImageSet.from_folder(jpeg_tree(tmp_path, 12, classes=3), image_size=64, num_workers=workers)

    def one_pass():
        return sum(len(y) for _, y in data.batches(4, seed=0, epoch=0, augment=True))

    assert benchmark(one_pass) == 12
