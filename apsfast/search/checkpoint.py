"""Checkpoints that survive a kill at any moment and refuse to load into the wrong run.

A checkpoint is written to a temporary file in the same folder, flushed to disk and renamed
over the old one, so a reader sees either the previous complete checkpoint or the new one,
never a torn file. It is loaded with ``torch.load(weights_only=True)``: only tensors and
plain containers, never arbitrary pickled objects.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any, Mapping, Optional, Union

import torch

import apsfast

FORMAT = 1


class CheckpointError(RuntimeError):
    """A checkpoint is unreadable, or belongs to another model, config or format."""


def save_checkpoint(path: Union[str, Path], state: Mapping[str, Any]) -> None:
    """Write ``state`` (tensors and plain containers) to ``path`` atomically."""
    path = Path(path)
    payload = {"format": FORMAT, "apsfast": apsfast.__version__, **state}
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            torch.save(payload, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def load_checkpoint(path: Union[str, Path], *, expect: Optional[Mapping[str, Any]] = None) -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint`.

    Args:
        path: the file.
        expect: entries the checkpoint must carry with these exact values (e.g. the model
            name and the config digest); a mismatch is refused, naming the entry.

    Raises:
        FileNotFoundError: no file at ``path``.
        CheckpointError: the file is not a readable checkpoint, has another format, or does
            not match ``expect``.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {str(path)!r}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises many kinds for a damaged or foreign file
        # Our own words only: torch's message advises unpickling the file, which is unsafe for a
        # file of unknown origin.
        raise CheckpointError(f"{str(path)!r} is not a readable apsfast checkpoint: it is damaged, cut short, or "
                              f"not written by apsfast ({type(error).__name__})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        got = state.get("format") if isinstance(state, dict) else type(state).__name__
        raise CheckpointError(f"{str(path)!r} has checkpoint format {got!r}, expected {FORMAT} "
                              f"(written by apsfast {state.get('apsfast') if isinstance(state, dict) else '?'})")
    for key, value in (expect or {}).items():
        if state.get(key) != value:
            raise CheckpointError(f"{str(path)!r} is for {key} {state.get(key)!r}, this run has {value!r}; "
                                  f"resume with the same settings or start in another folder")
    return state
