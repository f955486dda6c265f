"""RUN/metrics.jsonl: one JSON object per record."""
from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional

from megacpm.io.atomic import write_text_atomic
from megacpm.train.callbacks.base import Record, Sink


class MetricsFile(Sink):
    """Appends one JSON object per record to RUN/metrics.jsonl (line-buffered, so a crash keeps them).

    On resume (at on_train_start), records past the resumed step are dropped first: the steps after
    the last checkpoint are recomputed, and the file must not hold them twice.
    """

    def __init__(self, path: Path):
        self.path = Path(path)
        self._file = None

    def on_train_start(self, trainer) -> None:
        self.open(trainer.state.step)

    def open(self, resume_step: int) -> None:
        self._truncate_after(resume_step)
        self._file = open(self.path, "a", buffering=1)

    def _truncate_after(self, step: int) -> None:
        if not self.path.exists():
            return
        kept: List[str] = []
        for raw in self.path.read_bytes().splitlines():
            try:
                record = json.loads(raw.decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError):
                continue  # a line torn by a crash mid-write (or scribbled over)
            if isinstance(record, dict) and isinstance(record.get("step", 0), int) and record.get("step", 0) <= step:
                kept.append(raw.decode("utf-8"))
        write_text_atomic(self.path, "".join(k + "\n" for k in kept))

    def write(self, record: Record) -> None:
        self._file.write(json.dumps(record) + "\n")

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
