"""RUN/metrics.jsonl: one JSON object per record."""
from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional

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
        for line in self.path.read_text().splitlines():
            try:
                if json.loads(line).get("step", 0) <= step:
                    kept.append(line)
            except json.JSONDecodeError:
                continue  # a line torn by a crash mid-write
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text("".join(k + "\n" for k in kept))
        tmp.replace(self.path)

    def write(self, record: Record) -> None:
        self._file.write(json.dumps(record) + "\n")

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
