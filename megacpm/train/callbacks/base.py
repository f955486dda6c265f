"""The callback API of the training loop.

``Trainer.run`` does only this, and everything else (logs, evaluation, checkpoints, stopping,
profiling) is a callback reacting to it::

    callbacks.on_train_start(trainer)
    for step in ...:
        with callbacks.step_context(trainer, step):
            metrics = trainer.train_step(step)
        callbacks.on_step_end(trainer, step, metrics)
        if trainer.should_stop: break
    callbacks.on_train_end(trainer, result)

Callbacks run in list order. A callback that produces an event passes it on through
``trainer.callbacks`` (the records builder calls ``on_log``, evaluation ``on_evaluate``,
checkpointing ``on_checkpoint``), so the sinks later in the list see it at once. A callback that
wants the loop to leave after the current step sets ``trainer.should_stop``.

The trainer decides which callbacks exist on which rank: the sinks (metrics file, TensorBoard,
console, W&B, GPU monitor) on rank 0 only; evaluation, checkpointing and the profiler on every rank
(the first two are collective).
"""
from __future__ import annotations

import abc

import contextlib
from typing import TYPE_CHECKING, Any, ContextManager, Dict, Iterable, List, Optional

if TYPE_CHECKING:  # the trainer imports this module
    from megacpm.train.trainer import RunResult, Trainer

Record = Dict[str, Any]


class Callback:
    """Every hook is a no-op: subclass and override the ones you need."""

    def on_train_start(self, trainer: "Trainer") -> None:
        """After resuming, before the first step of this run (``trainer.state.step`` is the resumed step)."""

    def step_context(self, trainer: "Trainer", step: int) -> ContextManager:
        """A context manager around ``trainer.train_step(step)`` (communication accounting, profiling)."""
        return contextlib.nullcontext()

    def on_step_end(self, trainer: "Trainer", step: int, metrics: Dict[str, float]) -> None:
        """After each successful step; ``metrics`` is what train_step returned (loss, grad_norm, lr, ...)."""

    def record_fields(self, trainer: "Trainer", step: int) -> Record:
        """Fields this callback adds to the record of a logged step (comm bytes, GPU memory)."""
        return {}

    def on_log(self, trainer: "Trainer", record: Record) -> None:
        """The record of a logged step: ``{"step", **metrics, "tokens", "tokens_per_sec", ...}``."""

    def on_evaluate(self, trainer: "Trainer", step: int, eval_metrics: Dict[str, float]) -> None:
        """After an evaluation at ``step`` (``{"eval_loss": ...}``)."""

    def on_checkpoint(self, trainer: "Trainer", step: int, path) -> None:
        """After a checkpoint of ``step`` was written (or, for a background save, started) at ``path``."""

    def on_message(self, trainer: "Trainer", text: str) -> None:
        """A line for the user (the console prints it)."""

    def on_train_end(self, trainer: "Trainer", result: Optional["RunResult"]) -> None:
        """Always called once after on_train_start; ``result`` is None when the run raised."""


class CallbackList(Callback):
    """Calls each hook on every callback in order."""

    def __init__(self, callbacks: Iterable[Callback] = ()):
        self.callbacks: List[Callback] = list(callbacks)

    def __iter__(self):
        return iter(self.callbacks)

    def __len__(self) -> int:
        return len(self.callbacks)

    def find(self, kind: type) -> Optional[Callback]:
        """The first callback of this type, or None."""
        return next((c for c in self.callbacks if isinstance(c, kind)), None)

    def on_train_start(self, trainer) -> None:
        for callback in self.callbacks:
            callback.on_train_start(trainer)

    @contextlib.contextmanager
    def step_context(self, trainer, step):
        with contextlib.ExitStack() as stack:
            for callback in self.callbacks:
                stack.enter_context(callback.step_context(trainer, step))
            yield

    def on_step_end(self, trainer, step, metrics) -> None:
        for callback in self.callbacks:
            callback.on_step_end(trainer, step, metrics)

    def record_fields(self, trainer, step) -> Record:
        fields: Record = {}
        for callback in self.callbacks:
            fields.update(callback.record_fields(trainer, step))
        return fields

    def on_log(self, trainer, record) -> None:
        for callback in self.callbacks:
            callback.on_log(trainer, record)

    def on_evaluate(self, trainer, step, eval_metrics) -> None:
        for callback in self.callbacks:
            callback.on_evaluate(trainer, step, eval_metrics)

    def on_checkpoint(self, trainer, step, path) -> None:
        for callback in self.callbacks:
            callback.on_checkpoint(trainer, step, path)

    def on_message(self, trainer, text) -> None:
        for callback in self.callbacks:
            callback.on_message(trainer, text)

    def on_train_end(self, trainer, result) -> None:
        # Every callback ends (files closed, signal handlers restored) even if one of them fails.
        errors = []
        for callback in self.callbacks:
            try:
                callback.on_train_end(trainer, result)
            except Exception as exc:  # re-raised below, after the others
                errors.append(exc)
        if errors:
            raise errors[0]


class Sink(Callback, abc.ABC):
    """A callback writing records somewhere: the records of logged steps and of evaluations,
    ``{"step": N, "eval_loss": ...}``, both reach ``write``; ``close`` at the end."""

    @abc.abstractmethod
    def write(self, record: Record) -> None:
        """Write one record (a logged step's or an evaluation's)."""

    def close(self) -> None:
        pass

    def on_log(self, trainer, record) -> None:
        self.write(record)

    def on_evaluate(self, trainer, step, eval_metrics) -> None:
        self.write({"step": step, **eval_metrics})

    def on_train_end(self, trainer, result) -> None:
        self.close()


def is_log_step(trainer: "Trainer", step: int) -> bool:
    """Step 1, every train.log_interval steps and the last step are logged."""
    t = trainer.cfg.train
    return step == 1 or step % t.log_interval == 0 or step == t.steps
