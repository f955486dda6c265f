"""RUN/tb/: scalars for TensorBoard (log.tensorboard)."""
from __future__ import annotations

import math
from pathlib import Path

from megacpm.train.callbacks.base import Record, Sink


class TensorBoard(Sink):
    """Every finite numeric field of every record as a scalar, through torch's SummaryWriter (needs
    the tensorboard package): train/<key>, eval/<key> for eval_*, and keys naming their own section
    (comm_bytes/tp.all_reduce) keep it."""

    def __init__(self, log_dir: Path):
        self.log_dir = Path(log_dir)
        self._writer = None

    def on_train_start(self, trainer) -> None:
        from torch.utils.tensorboard import SummaryWriter  # imported here: tensorboard is heavy

        # A resumed run recomputes the steps after its checkpoint: their old events are purged.
        resumed = trainer.state.step
        self._writer = SummaryWriter(log_dir=str(self.log_dir), purge_step=resumed + 1 if resumed else None)

    def write(self, record: Record) -> None:
        step = record["step"]
        for key, value in record.items():
            if key != "step" and isinstance(value, (int, float)) and math.isfinite(value):
                tag = key if "/" in key else (f"eval/{key}" if key.startswith("eval") else f"train/{key}")
                self._writer.add_scalar(tag, value, step)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
