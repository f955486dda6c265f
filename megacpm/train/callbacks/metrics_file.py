"""RUN/metrics.jsonl: one JSON object per record."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict

from megacpm.io.atomic import write_text_atomic
from megacpm.io.run_dir import read_records
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
        kept = [record for record in read_records(self.path) if _step(record) <= step]
        write_text_atomic(self.path, "".join(json.dumps(record) + "\n" for record in kept))

    def write(self, record: Record) -> None:
        self._file.write(json.dumps(record) + "\n")

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def _step(record: Dict[str, Any]) -> float:
    step = record.get("step", 0)
    return step if isinstance(step, (int, float)) else float("inf")  # a record without a usable step goes
