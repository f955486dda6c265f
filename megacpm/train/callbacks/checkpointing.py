"""Checkpoints: every checkpoint.interval steps (in the background with checkpoint.async_save), at the
last step, and when SIGTERM / Ctrl-C asks the run to stop; collective on every rank."""
from __future__ import annotations

import contextlib
import signal
from typing import Dict, Iterator, Optional, Tuple

import torch
import torch.distributed as dist

from megacpm.train.callbacks.base import Callback


class StopRequest:
    """SIGTERM / first Ctrl-C ask the loop to checkpoint and leave after the current step.

    A second Ctrl-C interrupts at once (the default behaviour), for a user who means it.
    """

    def __init__(self) -> None:
        self.requested: Optional[str] = None
        self._previous: Dict[int, object] = {}

    def _handle(self, signum, frame) -> None:
        if self.requested is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = signal.Signals(signum).name

    @contextlib.contextmanager
    def installed(self) -> Iterator["StopRequest"]:
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)
        try:
            yield self
        finally:
            for sig, handler in self._previous.items():
                signal.signal(sig, handler)


class Checkpointing(Callback):
    """After every step, on every rank:

    * the ranks agree (one all-reduce) whether any of them was asked to stop and whether every
      rank's background save has finished writing; if so, that checkpoint is published (``latest``);
    * the step is saved if it is an interval step, the last step, or a stop was asked: the run's last
      checkpoint (last step, stop) synchronously, the others in the background with async_save;
    * after a stop's save the loop is told to leave (``trainer.should_stop``): status "interrupted".

    The signal handlers of ``stop`` are installed from on_train_start to on_train_end.
    """

    def __init__(self) -> None:
        self.stop = StopRequest()
        self._handlers: Optional[contextlib.ExitStack] = None

    def on_train_start(self, trainer) -> None:
        self.stop = StopRequest()
        self._handlers = contextlib.ExitStack()
        self._handlers.enter_context(self.stop.installed())

    def on_train_end(self, trainer, result) -> None:
        if self._handlers is not None:
            self._handlers.close()
            self._handlers = None

    def agree(self, trainer) -> Tuple[bool, bool]:
        """(whether any rank was asked to stop, whether every rank's background save is written):
        all ranks must save, leave and publish a checkpoint at the same step."""
        asked = self.stop.requested is not None
        writing = trainer.pending is not None and not trainer.pending.done()
        if trainer.ctx.world_size == 1:
            return asked, not writing
        flags = torch.tensor([float(asked), float(writing)], device=trainer.device)
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        return bool(flags[0].item()), not bool(flags[1].item())

    def on_step_end(self, trainer, step, metrics) -> None:
        last_step = step == trainer.cfg.train.steps
        interval = trainer.cfg.checkpoint.interval
        stopping, written = self.agree(trainer)
        if written:
            trainer._finish_pending()  # a background save is complete everywhere: publish it
        if not (last_step or (interval and step % interval == 0) or stopping):
            return
        # The run's last checkpoint is written before leaving; the others may overlap the next steps.
        background = trainer.cfg.checkpoint.async_save and not (last_step or stopping)
        path = trainer._save(background)
        trainer.callbacks.on_checkpoint(trainer, step, path)
        if stopping:
            trainer.callbacks.on_message(
                trainer, f"{self.stop.requested or 'stop on another rank'}: saved {path}; stopping at step {step}")
            trainer.should_stop = True
