"""Communication volume per collective kind and group on logged steps (megacpm.parallel.comm_stats)."""
from __future__ import annotations

import contextlib
from typing import Optional

from megacpm.parallel.comm_stats import CommAccounting
from megacpm.train.callbacks.base import Callback, is_log_step


class CommStats(Callback):
    """Counts the collectives of logged steps only (the accounting costs Python dispatch on every op,
    and a layout moves the same bytes every step); the record gets comm_bytes/<group>.<kind>, ...
    Runs on every rank (each counts its own calls); rank 0's numbers reach the record."""

    def __init__(self) -> None:
        self._comm: Optional[CommAccounting] = None

    def step_context(self, trainer, step):
        self._comm = None
        if trainer.ctx.world_size == 1 or not is_log_step(trainer, step):
            return contextlib.nullcontext()
        self._comm = CommAccounting(trainer.ctx)
        return self._comm

    def record_fields(self, trainer, step):
        return self._comm.metrics() if self._comm is not None else {}
