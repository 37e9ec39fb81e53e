"""Data-loading benchmark: can the input pipeline keep a search step fed?

``apsfast bench data`` measures images per second of the loaders
alone, producing augmented, normalised training batches as the search reads them:

* CIFAR-style in-memory images (``TensorImageSet``, 32×32, crop and flip on whole batches in
  this process): the path of ``cifar10`` and ``embedded``;
* an ImageFolder tree of JPEG files (``FolderImageSet``, 224×224 random resized crops and
  flips, decoded by PIL) with several numbers of loader processes: the path of ``imagenet``.

The JPEG tree is generated in a temporary folder (500×375 images, ImageNet's typical size).
Compare the numbers with the ``img/s`` columns of ``apsfast bench search``: a loader faster
than the step it feeds costs the search nothing, since it runs ahead in its own processes
(and, on a GPU, in a prefetching thread).
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from PIL import Image

from apsfast.benchmarks.common import environment, report
from apsfast.data import FolderImageSet, TensorImageSet


def images_per_second(data, batch_size: int, batches: int) -> float:
    """Throughput of one pass's first ``batches`` batches (after the first, which pays the
    start-up of loader processes)."""
    stream = data.batches(batch_size, seed=0, epoch=0, augment=True, drop_last=True)
    next(stream)
    started = time.perf_counter()
    count = 0
    for _, (x, _) in zip(range(batches), stream):
        count += x.shape[0]
    return count / (time.perf_counter() - started)


def jpeg_tree(root: Path, count: int, classes: int = 10, size: tuple[int, int] = (500, 375)) -> Path:
    """``count`` random-texture JPEGs in ``classes`` class folders under ``root``."""
    rng = np.random.default_rng(0)
    for i in range(count):
        folder = root / f"class{i % classes}"
        folder.mkdir(parents=True, exist_ok=True)
        # Smooth noise compresses like a photograph (plain noise would be unrealistically large).
        small = rng.integers(0, 256, (size[1] // 8, size[0] // 8, 3), dtype=np.uint8)
        Image.fromarray(small).resize(size, Image.BILINEAR).save(folder / f"{i}.jpg", quality=90)
    return root


def run(quick: bool = False, workers: Sequence[int] = (0, 2, 4)) -> list[dict]:
    rows = []
    cifar_n, cifar_batch, jpeg_n, batch = (512, 16, 48, 16) if quick else (50000, 256, 1024, 128)
    images = torch.randint(0, 256, (cifar_n, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    cifar = TensorImageSet(images, torch.arange(cifar_n) % 10, 10)
    rows.append({"loader": "TensorImageSet 32×32 (cifar10, embedded)", "workers": 0, "batch": cifar_batch,
                 "img/s": images_per_second(cifar, cifar_batch, cifar_n // cifar_batch - 1)})
    with tempfile.TemporaryDirectory() as tmp:
        root = jpeg_tree(Path(tmp), jpeg_n)
        for w in workers:
            folder = FolderImageSet.from_folder(root, image_size=224, num_workers=w)
            rows.append({"loader": "FolderImageSet JPEG → 224×224 (imagenet)", "workers": w, "batch": batch,
                         "img/s": images_per_second(folder, batch, jpeg_n // batch - 1)})
    return rows


def markdown(rows: list[dict]) -> str:
    out = ["| loader | loader processes | batch | images/s |", "|---|---|---|---|"]
    out += [f"| {r['loader']} | {r['workers']} | {r['batch']} | {r['img/s']:.0f} |" for r in rows]
    return "\n".join(out)


def main(argv: Optional[Sequence[str]] = None, prog: str = "apsfast bench data") -> int:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="few small images (a smoke test)")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2, 4], help="loader processes to try")
    parser.add_argument("--out", type=Path, help="write <out>.md and <out>.jsonl")
    args = parser.parse_args(argv)
    command = " ".join([prog, *(argv if argv is not None else [])])
    rows = run(args.quick, args.workers)
    report("Data-loading benchmark", environment(command), rows, markdown(rows), args.out)
    return 0
