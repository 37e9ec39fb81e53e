"""Metrics as JSON lines (one object per line, appended and flushed as they come), mirrored to
TensorBoard when it is installed. A resumed run truncates the file to the checkpoint's
offset, so the log never holds lines of steps that are then run again."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Optional, Union


class MetricsLog:
    """Append-only JSON-lines log at ``path``; ``tensorboard_dir`` adds scalars there when
    ``torch.utils.tensorboard`` imports (the ``tensorboard`` package is optional)."""

    def __init__(self, path: Union[str, Path], tensorboard_dir: Optional[Union[str, Path]] = None) -> None:
        self.path = Path(path)
        self.path.touch()
        self._file = open(self.path, "a", encoding="utf-8")
        self._board = None
        if tensorboard_dir is not None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # tensorboard not installed: JSON lines only
                pass
            else:
                self._board = SummaryWriter(str(tensorboard_dir))

    def offset(self) -> int:
        """The file's length: where a resume continues."""
        self._file.flush()
        return self.path.stat().st_size

    def truncate(self, offset: int) -> None:
        """Drop everything past ``offset`` (lines written after the checkpoint)."""
        self._file.flush()
        self._file.truncate(offset)
        self._file.seek(offset)

    def write(self, record: dict[str, Any]) -> None:
        """Append one record (non-finite floats become ``null``, which JSON lacks)."""
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        self._file.write(json.dumps(clean) + "\n")
        self._file.flush()
        if self._board is not None and "step" in record:
            prefix = record.get("kind", "metrics")
            for key, value in record.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool) and key != "step":
                    self._board.add_scalar(f"{prefix}/{key}", value, record["step"])

    def close(self) -> None:
        self._file.close()
        if self._board is not None:
            self._board.close()


def read_metrics(path: Union[str, Path], kind: Optional[str] = None) -> list[dict[str, Any]]:
    """The records of a metrics file, optionally only those of one ``kind`` (``"step"``,
    ``"epoch"``)."""
    records = [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
    return records if kind is None else [r for r in records if r.get("kind") == kind]
