"""The record of each logged step, built once and handed to every sink."""
from __future__ import annotations

import time
from typing import Optional

from megacpm.train.callbacks.base import Callback, is_log_step


class StepRecords(Callback):
    """On step 1, every train.log_interval steps and the last step: ``{"step", **metrics, "tokens",
    "tokens_per_sec", **fields}`` to ``on_log``, where metrics is everything train_step returned
    (any extra key included), tokens the run's total, tokens_per_sec the throughput since the previous
    record (evaluation and checkpoint time included) and fields what the callbacks' record_fields add
    (communication bytes, GPU memory)."""

    def __init__(self) -> None:
        self._window_start: Optional[float] = None
        self._window_tokens = 0
        self._tokens = 0

    def on_train_start(self, trainer) -> None:
        self._window_start, self._window_tokens, self._tokens = None, 0, trainer.state.tokens

    def step_context(self, trainer, step):
        if self._window_start is None:  # the first window starts with the first step, not before setup
            self._window_start = time.monotonic()
        return super().step_context(trainer, step)

    def on_step_end(self, trainer, step, metrics) -> None:
        self._window_tokens += trainer.state.tokens - self._tokens
        self._tokens = trainer.state.tokens
        if not is_log_step(trainer, step):
            return
        elapsed = time.monotonic() - self._window_start
        record = {"step": step, **metrics, "tokens": trainer.state.tokens,
                  "tokens_per_sec": self._window_tokens / max(elapsed, 1e-9),
                  **trainer.callbacks.record_fields(trainer, step)}
        trainer.callbacks.on_log(trainer, record)
        self._window_start, self._window_tokens = time.monotonic(), 0
