"""CIFAR-10 from its standard python format (``cifar-10-batches-py``), read without running
any code the files could name: the batches are pickles, so they are opened with an
unpickler that resolves only the numpy array reconstructors they need.
"""
from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Any, Callable, Union

import numpy as np
import torch

from apsfast.data.base import TensorImageSet

FOLDER = "cifar-10-batches-py"
TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_FILE = "test_batch"
NUM_CLASSES = 10
IMAGE_SIZE = 32
ROW = 3 * IMAGE_SIZE * IMAGE_SIZE  # one image: 1024 red, 1024 green, 1024 blue bytes
MEAN = (0.4914, 0.4822, 0.4465)
STD = (0.2470, 0.2435, 0.2616)
HINT = ("pass the folder that holds cifar-10-batches-py, extracted from cifar-10-python.tar.gz "
        "(nothing is downloaded)")


def _allowed_globals() -> dict[tuple[str, str], Callable[..., Any]]:
    """The globals an ndarray pickle names, under the module paths numpy 1.x and 2.x write,
    mapped to this numpy's objects (taken from its own pickles, so the deprecated
    ``numpy.core`` is never imported). ``_codecs.encode`` turns text back into bytes in
    protocol-2 pickles written by Python 3."""
    import _codecs

    reconstruct = np.ndarray.__reduce__(np.zeros(1))[0]
    frombuffer = np.zeros(1).__reduce_ex__(5)[0]
    allowed: dict[tuple[str, str], Callable[..., Any]] = {
        ("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype, ("_codecs", "encode"): _codecs.encode}
    for module in ("numpy.core", "numpy._core"):
        allowed[(f"{module}.multiarray", "_reconstruct")] = reconstruct
        allowed[(f"{module}.numeric", "_frombuffer")] = frombuffer
    return allowed


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that builds numpy arrays and plain containers only: any other global
    (a function or class a malicious file could call) raises ``pickle.UnpicklingError``."""

    ALLOWED = _allowed_globals()

    def find_class(self, module: str, name: str) -> Any:
        try:
            return self.ALLOWED[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"refused global {module}.{name}: a CIFAR batch holds only numpy "
                                         f"arrays, lists and bytes") from None


def read_batch(path: Union[str, os.PathLike]) -> tuple[np.ndarray, np.ndarray]:
    """``(data uint8 [N, 3072], labels int64 [N])`` of one CIFAR-10 batch file.

    Raises ``ValueError`` naming the file if it is not a CIFAR-10 python batch.
    """
    try:
        with open(path, "rb") as f:
            batch = RestrictedUnpickler(f, encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError) as e:
        raise ValueError(f"{str(path)!r} is not a CIFAR-10 python batch: {e}") from e
    if not isinstance(batch, dict) or b"data" not in batch or b"labels" not in batch:
        keys = sorted(batch) if isinstance(batch, dict) else type(batch).__name__
        raise ValueError(f"{str(path)!r} is not a CIFAR-10 python batch: expected a dict with b'data' and "
                         f"b'labels', got {keys}")
    data, labels = batch[b"data"], batch[b"labels"]
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != ROW \
            or data.shape[0] == 0:
        got = f"{data.dtype} {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise ValueError(f"{str(path)!r}: b'data' must be a uint8 array [N, {ROW}] (N ≥ 1), got {got}")
    labels = np.asarray(labels)
    if labels.shape != (data.shape[0],) or labels.dtype.kind not in "iu" \
            or labels.min() < 0 or labels.max() >= NUM_CLASSES:
        raise ValueError(f"{str(path)!r}: b'labels' must be {data.shape[0]} ints in 0..{NUM_CLASSES - 1} "
                         f"(one per row of b'data'), got {labels.dtype} {labels.shape}")
    return data, labels.astype(np.int64)


def find_folder(root: Union[str, os.PathLike]) -> Path:
    """``root`` itself or ``root/cifar-10-batches-py``: whichever holds the batch files."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"CIFAR-10 folder {str(root)!r} does not exist: {HINT}")
    for folder in (root, root / FOLDER):
        if (folder / TRAIN_FILES[0]).is_file():
            return folder
    archive = " (it holds cifar-10-python.tar.gz: extract it there first)" \
        if (root / "cifar-10-python.tar.gz").exists() else ""
    raise FileNotFoundError(f"CIFAR-10 file {TRAIN_FILES[0]!r} not found in {str(root)!r} or "
                            f"{str(root / FOLDER)!r}{archive}: {HINT}")


def _load(folder: Path, names: tuple[str, ...]) -> TensorImageSet:
    data, labels = [], []
    for name in names:
        path = folder / name
        if not path.is_file():
            raise FileNotFoundError(f"CIFAR-10 file {name!r} not found in {str(folder)!r} (the folder has "
                                    f"{TRAIN_FILES[0]}, so it is incomplete): {HINT}")
        d, y = read_batch(path)
        data.append(d)
        labels.append(y)
    images = torch.from_numpy(np.concatenate(data)).view(-1, 3, IMAGE_SIZE, IMAGE_SIZE)
    return TensorImageSet(images, torch.from_numpy(np.concatenate(labels)), NUM_CLASSES, mean=MEAN, std=STD,
                          pad=4)


def cifar10(root: Union[str, os.PathLike]) -> tuple[TensorImageSet, TensorImageSet]:
    """The CIFAR-10 train (50000) and test (10000) sets from ``data_batch_1..5`` and
    ``test_batch`` in ``root`` or ``root/cifar-10-batches-py``; nothing is downloaded.

    Raises ``FileNotFoundError`` for a missing folder or file and ``ValueError`` for a file
    that is not a CIFAR-10 python batch.
    """
    folder = find_folder(root)
    return _load(folder, TRAIN_FILES), _load(folder, (TEST_FILE,))
